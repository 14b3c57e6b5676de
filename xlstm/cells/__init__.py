"""Recurrent cells for the engine: one module per cell, the contract in :mod:`.base`."""

from .base import Cell
from .gru import GRU_CELL, GRUCell
from .lstm import LSTM_CELL, LSTMCell

__all__ = ["Cell", "LSTMCell", "LSTM_CELL", "GRUCell", "GRU_CELL"]
