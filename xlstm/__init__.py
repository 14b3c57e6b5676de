"""xlstm: the LSTM of the step-by-step notebook, written once for the Python array API.

The same call runs on numpy, CuPy, torch, JAX and array-api-strict arrays; results keep the
inputs' namespace, dtype and device.
"""

from .activations import sigmoid, softmax
from .lstm import (
    LSTMCache,
    LSTMCaches,
    lstm_backward,
    lstm_cell_backward,
    lstm_cell_forward,
    lstm_forward,
)
from .params import init_params

__version__ = "0.1.0"

__all__ = [
    "sigmoid",
    "softmax",
    "lstm_cell_forward",
    "lstm_forward",
    "lstm_cell_backward",
    "lstm_backward",
    "init_params",
    "LSTMCache",
    "LSTMCaches",
    "__version__",
]
