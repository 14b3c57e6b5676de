"""The model classes: stacks (:mod:`.stack`) of one kind of layer (:mod:`.layers`). LSTM,
GRU, RNN, sLSTM and any registered cell run on the engine (:mod:`.recurrent`); the mLSTM
runs its own parallel, chunkwise and recurrent forms (:mod:`.mlstm`).

:data:`MODELS` is the registry of models: one entry per kind of layer, the class and the
keywords that make it. The tests, the CUDA kernels' checks and the demos derive from it.
"""

from ..cells.base import CELLS
from .mlstm import MLSTM
from .recurrent import GRU, LSTM, RNN, SLSTM, ModelCache, Recurrent

__all__ = ["LSTM", "GRU", "RNN", "SLSTM", "MLSTM", "Recurrent", "ModelCache", "MODELS"]

#: Every kind of layer, by name: the model class that runs it and its keywords. A
#: registered cell that no named class claims runs in :class:`Recurrent`.
MODELS: dict[str, tuple[type, dict]] = {
    name: (cls, kwargs) for cls in (LSTM, GRU, RNN, SLSTM, MLSTM)
    for name, kwargs in cls.variants.items()
}
MODELS.update((name, (Recurrent, {"cell": name})) for name in CELLS if name not in MODELS)
