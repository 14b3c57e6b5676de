"""Recurrent cells for the engine: one module per cell, the contract in :mod:`.base`."""

from .base import Cell, cell_named
from .gru import GRU_CELL, GRUCell
from .lstm import LSTM_CELL, LSTMCell
from .rnn import RNN_RELU, RNN_TANH, RNNCell
from .slstm import SLSTM_CELL, SLSTM_EXP_CELL, SLSTMCell, SLSTMExpCell

#: Every cell, by name.
CELLS = {c.name: c for c in (LSTM_CELL, GRU_CELL, RNN_TANH, RNN_RELU, SLSTM_CELL, SLSTM_EXP_CELL)}

__all__ = ["CELLS", "cell_named", "Cell", "LSTMCell", "LSTM_CELL", "GRUCell", "GRU_CELL", "RNNCell", "RNN_TANH",
           "RNN_RELU", "SLSTMCell", "SLSTM_CELL", "SLSTMExpCell", "SLSTM_EXP_CELL"]
