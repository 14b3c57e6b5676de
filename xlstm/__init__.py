"""xlstm: LSTM, GRU, RNN, sLSTM and mLSTM, written once for the Python array API.

The same call runs on numpy, CuPy, torch, JAX and array-api-strict arrays; results keep the
inputs' namespace, dtype and device.
"""

import logging as _logging
import sys as _sys

from . import autodiff, models, notebook, training
from .engine.loop import accelerators
from .io import load, load_params, save, save_params
from .models.mlstm import MLSTM
from .models.recurrent import GRU, LSTM, RNN, SLSTM, ModelCache
from .notebook.activations import sigmoid, softmax
from .notebook.interop import from_torch_lstm_weights, to_torch_lstm_weights
from .notebook.losses import last_step_mse, last_step_predict, sequence_cross_entropy
from .notebook.lstm import (
    LSTMCache,
    LSTMCaches,
    lstm_backward,
    lstm_cell_backward,
    lstm_cell_forward,
    lstm_forward,
)
from .notebook.params import init_params
from .notebook.rnn import (
    RNNCache,
    RNNCaches,
    rnn_backward,
    rnn_cell_backward,
    rnn_cell_forward,
    rnn_forward,
)
from .training.callbacks import Callback, Checkpoint, EarlyStopping, ProgressBar
from .training.fit import FitResult, StepInfo, fit
from .training.losses import softmax_cross_entropy
from .training.optim import SGD, Adam, clip_by_global_norm, clip_by_value

__version__ = "0.1.0"

# A library logs and leaves the handling to the application (the logging HOWTO's rule).
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

# The module paths of earlier versions keep working: ``import xlstm.lstm``, ``xlstm.train.fit``.
_MOVED = {
    "activations": notebook.activations,
    "interop": notebook.interop,
    "losses": notebook.losses,
    "lstm": notebook.lstm,
    "params": notebook.params,
    "rnn": notebook.rnn,
    "mlstm": models.mlstm,
    "optim": training.optim,
    "train": training.fit,
}
for _name, _module in _MOVED.items():
    globals()[_name] = _module
    _sys.modules[f"{__name__}.{_name}"] = _module
del _name, _module

__all__ = [
    # the notebook's API
    "lstm_cell_forward",
    "lstm_forward",
    "lstm_cell_backward",
    "lstm_backward",
    "sigmoid",
    "softmax",
    "LSTMCache",
    "LSTMCaches",
    # model classes
    "LSTM",
    "GRU",
    "RNN",
    "SLSTM",
    "MLSTM",
    "ModelCache",
    # the notebook's RNN
    "rnn_cell_forward",
    "rnn_forward",
    "rnn_cell_backward",
    "rnn_backward",
    "RNNCache",
    "RNNCaches",
    # training
    "init_params",
    "sequence_cross_entropy",
    "softmax_cross_entropy",
    "last_step_mse",
    "last_step_predict",
    "SGD",
    "Adam",
    "clip_by_value",
    "clip_by_global_norm",
    "fit",
    "accelerators",
    "FitResult",
    "StepInfo",
    "Callback",
    "EarlyStopping",
    "Checkpoint",
    "ProgressBar",
    # persistence and interop
    "save",
    "load",
    "save_params",
    "load_params",
    "to_torch_lstm_weights",
    "from_torch_lstm_weights",
    # autodiff through the hand-written backward pass
    "autodiff",
    "__version__",
]
