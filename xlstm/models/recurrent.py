"""The models over the engine's cells: ``LSTM``, ``GRU`` and ``RNN`` (torch's semantics) and
the ``SLSTM`` of xLSTM, each a stack (:mod:`xlstm.models.stack`) of one cell's layers.

The LSTM's state is ``(a, c)``, the GRU's and the RNN's ``(a,)``, each ``(num_layers D,
n_a, m)``; the sLSTM's ``(h, c, n, m)``.
"""

from __future__ import annotations

from typing import Any

from .._lib.checks import positive_int
from ..cells.base import cell_named
from ..cells.gru import GRU_CELL
from ..cells.lstm import LSTM_CELL
from ..cells.rnn import RNN_RELU, RNN_TANH
from ..cells.slstm import FORGET_GATES, SLSTM_CELL, SLSTM_EXP_CELL
from .layers import CellLayer
from .stack import ModelCache, _Model

__all__ = ["LSTM", "GRU", "RNN", "SLSTM", "Recurrent", "ModelCache"]


class LSTM(_Model):
    """The notebook's LSTM as a model: state ``(a, c)``; each (layer, direction) holds the
    notebook's dict ``Wf, bf, Wi, bi, Wc, bc, Wo, bo`` and torch's second biases
    ``bhf, bhi, bhc, bho`` (added to ``bf, bi, bc, bo``).

    Parameters
    ----------
    n_x, n_a : int
        Input and hidden sizes.
    num_layers : int, optional
        Stacked layers; layer ``k > 0`` reads the output of layer ``k - 1``.
    bidirectional : bool, optional
        A second direction per layer, over the reversed sequence; the output of a step is
        ``[forward; reverse]``.
    dropout : float, optional
        Dropout between layers, in ``[0, 1)`` (no effect with one layer).
    layout : {"notebook", "batch_first"}, optional
        Axis order of ``x`` and ``y``: ``(n_x, m, T)`` and ``(D n_a, m, T)``, or
        ``(m, T, n_x)`` and ``(m, T, D n_a)``.
    xp, dtype, device : optional
        Namespace (default numpy), real floating dtype (default float32) and device of the
        parameters. torch's ``input_size``, ``hidden_size`` and ``batch_first`` are
        accepted as aliases of ``n_x``, ``n_a`` and ``layout``.
    seed : int, optional
        Seed of the initial parameters (torch's scheme, drawn on the host).

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> model = xlstm.LSTM(3, 5, num_layers=2)
    >>> model
    LSTM(n_x=3, n_a=5, num_layers=2, dtype='float32', xp='numpy')
    >>> x = np.ones((3, 4, 7), dtype=np.float32)  # (n_x, m, T)
    >>> y, (a, c) = model(x)                       # inference
    >>> y.shape, a.shape, c.shape
    ((5, 4, 7), (2, 5, 4), (2, 5, 4))
    >>> y, state, cache = model.forward(x)         # training: then the backward pass
    >>> dx, dstate0, grads = model.backward(np.ones_like(y), cache)
    >>> dx.shape, sorted(grads[0])[:4]
    ((3, 4, 7), ['Wc', 'Wf', 'Wi', 'Wo'])
    """

    cell = LSTM_CELL
    torch_name = "LSTM"
    variants = {"lstm": {}}


class GRU(_Model):
    """A GRU with torch's ``nn.GRU`` semantics, ``n = tanh(W_in x + b_in + r * (W_hn a +
    b_hn))``: state ``(a,)``; each (layer, direction) holds ``Wr, br, Wz, bz, Wn, bn`` (``W*``
    of shape ``(n_a, n_a + n_x)`` acting on ``[a_prev; x_t]``) and ``bhr, bhz, bhn``.

    The parameters are those of :class:`LSTM`.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> model = xlstm.GRU(input_size=3, hidden_size=4, batch_first=True)  # torch's names
    >>> y, (a,) = model(np.zeros((2, 6, 3), dtype=np.float32))            # (m, T, n_x)
    >>> y.shape, a.shape, model.num_parameters()
    ((2, 6, 4), (1, 4, 2), 108)
    """

    cell = GRU_CELL
    torch_name = "GRU"
    variants = {"gru": {}}


class RNN(_Model):
    """An Elman RNN with torch's ``nn.RNN`` semantics, ``a_t = act(Wax x_t + Waa a_{t-1} +
    ba + bha)``: state ``(a,)``; each (layer, direction) holds ``Wax, Waa, ba, bha``.

    ``nonlinearity`` is ``"tanh"`` (default) or ``"relu"``; the other parameters are those
    of :class:`LSTM`.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> model = xlstm.RNN(3, 4, nonlinearity="relu", dtype="float64")
    >>> y_t, (a,) = model.step(np.ones((3, 2)))  # one step: x_t (n_x, m)
    >>> y_t.shape, y_t.dtype, bool((y_t >= 0).all())
    ((4, 2), dtype('float64'), True)
    """

    torch_name = "RNN"
    variants = {"rnn_tanh": {}, "rnn_relu": {"nonlinearity": "relu"}}

    def __init__(self, n_x: int, n_a: int, *, nonlinearity: str = "tanh", **kwargs: Any) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        self.cell = RNN_TANH if nonlinearity == "tanh" else RNN_RELU
        super().__init__(n_x, n_a, **kwargs)

    def _extra_config(self):
        return {"nonlinearity": self.nonlinearity}

    @classmethod
    def _torch_kwargs(cls, module):
        return {"nonlinearity": module.nonlinearity}

    def _torch_module_kwargs(self):
        return {"nonlinearity": self.nonlinearity}


class SLSTM(_Model):
    """The sLSTM of xLSTM (Beck et al. 2024): exponential input gate, a normaliser and a
    stabiliser, and a block-diagonal recurrence with ``num_heads`` heads
    (the module ``xlstm.cells.slstm`` has the equations). State ``(h, c, n, m)``; ``m`` is the
    stabiliser, which the output does not depend on: its gradient is zero. Where ``n`` of
    the initial state is zero (a zero state), that unit's memory is empty and the first
    step starts it afresh.

    Each (layer, direction) holds ``W (4, n_h, n_in)``, ``R (4, num_heads, d, d)`` with
    ``d = n_h / num_heads`` and ``b (4, n_h, 1)``, gate order ``(i, f, z, o)``; the
    recurrent term of gate ``g`` for head ``k`` is ``R[g, k] @ h_prev[k d:(k + 1) d]``.

    Parameters
    ----------
    n_x, n_h : int
        Input and hidden sizes.
    num_heads : int, optional
        Heads of the recurrence; ``n_h`` must be a multiple of it.
    forget_gate : {"sigmoid", "exp"}, optional
        ``logsigmoid(f~)`` (default) or ``f~`` itself as the forget gate's exponent.
    **kwargs
        ``num_layers``, ``bidirectional``, ``dropout``, ``layout``, ``xp``, ``dtype``,
        ``device`` and ``seed``, as for :class:`LSTM`.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> model = xlstm.SLSTM(3, 8, num_heads=2)
    >>> model.params[0]["R"].shape  # (gates, heads, d, d): one block per head
    (4, 2, 4, 4)
    >>> y, (h, c, n, m) = model(np.ones((3, 5, 10), dtype=np.float32))
    >>> y.shape, n.shape, bool((n > 0).all())
    ((8, 5, 10), (1, 8, 5), True)
    """

    torch_name = None
    variants = {"slstm": {}, "slstm_exp": {"forget_gate": "exp"}}

    def __init__(self, n_x: int, n_h: int, *, num_heads: int = 1, forget_gate: str = "sigmoid",
                 **kwargs: Any) -> None:
        self.num_heads = positive_int("num_heads", num_heads)
        n_h = positive_int("n_h", n_h)
        if n_h % self.num_heads:
            raise ValueError(f"n_h={n_h} is not divisible by num_heads={self.num_heads}")
        if forget_gate not in FORGET_GATES:
            raise ValueError(f"forget_gate must be one of {FORGET_GATES}, got {forget_gate!r}")
        self.forget_gate = forget_gate
        self.cell = SLSTM_CELL if forget_gate == "sigmoid" else SLSTM_EXP_CELL
        super().__init__(n_x, n_h, **kwargs)

    _hidden = "n_h"

    def _make_layer(self):
        return CellLayer(self.cell, self.n_h, num_heads=self.num_heads)

    def _extra_config(self):
        return {"num_heads": self.num_heads, "forget_gate": self.forget_gate}



class Recurrent(_Model):
    """A stack of layers of any registered engine cell (``xlstm.cells.CELLS``), by name.

    The cell brings its parameters, state and initialisation; :class:`xlstm.LSTM`,
    :class:`xlstm.GRU`, :class:`xlstm.RNN` and :class:`xlstm.SLSTM` are the same stack over
    their cells, with their own keywords and torch counterparts.

    Parameters
    ----------
    n_x, n_a : int
        Input and hidden sizes.
    cell : str
        The cell's name (``"gru"``, ``"rnn_relu"``, ...).
    **kwargs
        ``num_layers``, ``bidirectional``, ``dropout``, ``layout``, ``xp``, ``dtype``,
        ``device`` and ``seed``, as for :class:`xlstm.LSTM`.

    Examples
    --------
    >>> import numpy as np
    >>> from xlstm.models import Recurrent
    >>> model = Recurrent(3, 4, cell="gru", seed=0)
    >>> y, (a,) = model(np.zeros((3, 2, 5), dtype=np.float32))
    >>> y.shape, a.shape
    ((4, 2, 5), (1, 4, 2))
    """

    torch_name = None
    variants: dict = {}

    def __init__(self, n_x: int, n_a: int, *, cell: str, **kwargs: Any) -> None:
        if not isinstance(cell, str):
            raise TypeError(f"cell must be a cell's name (a str), got {type(cell).__name__}")
        self.cell = cell_named(cell)
        super().__init__(n_x, n_a, **kwargs)

    def _extra_config(self):
        return {"cell": self.cell.name}
