"""The model classes: LSTM, GRU, RNN and sLSTM over the engine (``recurrent``), and the mLSTM's
own parallel, chunkwise and recurrent forms (``mlstm``)."""

from .mlstm import MLSTM
from .recurrent import GRU, LSTM, RNN, SLSTM, ModelCache

__all__ = ["LSTM", "GRU", "RNN", "SLSTM", "MLSTM", "ModelCache"]
