"""Recurrent cells for the engine: one module per cell, the contract in :mod:`.base`."""

from .base import Cell
from .lstm import LSTM_CELL, LSTMCell
from .rnn import RNN_RELU, RNN_TANH, RNNCell

__all__ = ["Cell", "LSTMCell", "LSTM_CELL", "RNNCell", "RNN_TANH", "RNN_RELU"]
