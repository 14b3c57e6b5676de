"""Recurrent cells for the engine: one module per cell, the contract in :mod:`.base`.

The registry is :data:`CELLS`: importing this package imports every cell module below, and
each registers its cells. Adding a cell is one module here, one line below, and one CUDA
header (``xlstm/accel/cuda/<cell>_pointwise.cuh``).
"""

from . import gru, lstm, mgu, rnn, slstm  # noqa: F401  (every cell module registers its cells)
from .base import CELLS, Cell, cell_named, register
from .gru import GRU_CELL, GRUCell
from .lstm import LSTM_CELL, LSTMCell
from .rnn import RNN_RELU, RNN_TANH, RNNCell
from .slstm import SLSTM_CELL, SLSTM_EXP_CELL, SLSTMCell, SLSTMExpCell

__all__ = ["CELLS", "cell_named", "register", "Cell", "LSTMCell", "LSTM_CELL", "GRUCell",
           "GRU_CELL", "RNNCell", "RNN_TANH", "RNN_RELU", "SLSTMCell", "SLSTM_CELL",
           "SLSTMExpCell", "SLSTM_EXP_CELL"]
