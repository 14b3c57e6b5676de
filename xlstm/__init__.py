"""xlstm: the LSTM of the step-by-step notebook, written once for the Python array API.

The same call runs on numpy, CuPy, torch, JAX and array-api-strict arrays; results keep the
inputs' namespace, dtype and device.
"""

from . import autodiff
from ._engine import accelerators
from .activations import sigmoid, softmax
from .interop import from_torch_lstm_weights, to_torch_lstm_weights
from .io import load_params, save_params
from .mlstm import MLSTM
from .models import GRU, LSTM, RNN, SLSTM, ModelCache
from .losses import (
    last_step_mse,
    last_step_predict,
    sequence_cross_entropy,
    softmax_cross_entropy,
)
from .lstm import (
    LSTMCache,
    LSTMCaches,
    lstm_backward,
    lstm_cell_backward,
    lstm_cell_forward,
    lstm_forward,
)
from .optim import SGD, Adam, clip_by_global_norm, clip_by_value
from .params import init_params
from .rnn import (
    RNNCache,
    RNNCaches,
    rnn_backward,
    rnn_cell_backward,
    rnn_cell_forward,
    rnn_forward,
)
from .train import FitResult, StepInfo, fit

__version__ = "0.1.0"

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
    # persistence and interop
    "save_params",
    "load_params",
    "to_torch_lstm_weights",
    "from_torch_lstm_weights",
    # autodiff through the hand-written backward pass
    "autodiff",
    "__version__",
]
