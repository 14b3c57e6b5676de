"""The models over the engine's cells: ``LSTM``, ``GRU`` and ``RNN`` (torch's semantics) and
the ``SLSTM`` of xLSTM, each a stack (:mod:`xlstm.models.stack`) of one cell's layers.

The LSTM's state is ``(a, c)``, the GRU's and the RNN's ``(a,)``, each ``(num_layers D,
n_a, m)``; the sLSTM's ``(h, c, n, m)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .._lib.checks import positive_int
from .._lib.compat import c_contiguous, copy
from ..cells.base import NO_OUT, array_ops, cell_named
from ..cells.gru import GRU_CELL
from ..cells.lstm import GATES, LSTM_CELL
from ..cells.rnn import RNN_RELU, RNN_TANH
from ..cells.slstm import FORGET_GATES, SLSTM_CELL, SLSTM_EXP_CELL
from ..engine import loop as _engine
from .layers import CellLayer
from .stack import ModelCache, _Model

__all__ = ["LSTM", "GRU", "RNN", "SLSTM", "Recurrent", "ModelCache"]


class _ProjectedKept(NamedTuple):
    """What the projected LSTM's forward keeps: the engine's cache over ``a``, copies of
    ``W_hr``, of each gate's recurrent block and of ``h_0``, and the final ``a``."""

    cell: Any
    Whr: Any
    Wh: dict
    h0: Any
    a_final: Any

    @property
    def X(self) -> Any:
        """The saved input, time-major ``(T m, n_in)``, as every layer's cache has it."""
        return self.cell.X


class ProjectedLSTMLayer:
    """The layer of an LSTM with a projection (torch's ``proj_size``, the LSTMP of Sak et
    al. 2014): the cell's output ``a = o * tanh(c)`` (``n_a`` units) is projected to
    ``h = W_hr a`` (``p`` units), which is the layer's output and the recurrent input.

    Parameters per (layer, direction): the LSTM's ``W<g> (n_a, p + n_in)`` acting on
    ``[h_prev; x_t]``, ``b<g>``, ``bh<g>``, and ``Whr (p, n_a)``. State ``(h, c)``: ``h
    (m, p)``, ``c (m, n_a)``.

    The engine runs the LSTM cell over ``a`` with the recurrent weights of each gate
    fused with the projection, ``W<g>[:, :p] W_hr`` (``h_prev W_h^T = a_prev (W_h
    W_hr)^T``): the time loop, its compiled loops and kernels are the LSTM's. The initial
    state's recurrent term ``h_0 W_h^T`` enters the first step's input term. Results
    equal torch's to rounding (the products are associated differently).
    """

    name = "lstm_proj"
    state_names = ("A", "C")
    frozen: tuple[str, ...] = ()
    positive: tuple[str, ...] = ()
    scaled: tuple[str, ...] = ()
    state_axes = ("proj_size, m", "n_a, m")
    cell = LSTM_CELL

    def __init__(self, n_a: int, proj_size: int) -> None:
        self.n_a, self.p = n_a, proj_size
        self.n_h = proj_size  # the output's features

    def config(self) -> tuple:
        return (self.p,)

    def param_shapes(self, n_in: int) -> dict[str, tuple[int, ...]]:
        shapes = {k: (self.n_a, self.p + n_in) if k[0] == "W" else v
                  for k, v in self.cell.param_shapes(n_in, self.n_a).items()}
        return {**shapes, "Whr": (self.p, self.n_a)}

    def init_params(self, rng: Any, n_in: int) -> dict:
        """torch's initialisation: every weight uniform in ``(-k, k)``, ``k = 1 /
        sqrt(n_a)``, drawn in the order of torch's parameters."""
        import numpy as np

        k, rows = 1.0 / np.sqrt(self.n_a), 4 * self.n_a
        w_ih = rng.uniform(-k, k, size=(rows, n_in))
        w_hh = rng.uniform(-k, k, size=(rows, self.p))
        b_ih, b_hh = rng.uniform(-k, k, size=rows), rng.uniform(-k, k, size=rows)
        w_hr = rng.uniform(-k, k, size=(self.p, self.n_a))
        return {**self.cell.from_torch_arrays(w_ih, w_hh, b_ih, b_hh), "Whr": w_hr}

    def state_shapes(self, m: int) -> tuple[tuple[int, ...], ...]:
        return ((self.p, m), (self.n_a, m))

    def _fused(self, params, xp):
        """The LSTM cell's dict over ``a``: each gate's recurrent block times ``W_hr``."""
        p, Whr = self.p, params["Whr"]
        out = {}
        for k, v in params.items():
            if k == "Whr":
                continue
            out[k] = xp.concat([v[:, :p] @ Whr, v[:, p:]], axis=1) if k[0] == "W" else v
        return out

    def forward(self, x, state0, params, *, xp, keep, active, opts):
        cell, p = self.cell, self.p
        h0, c0 = state0
        g0 = None
        if h0 is not None:  # the initial state's recurrent term, in the fused layout
            _, _, WhT, _ = cell.fuse_forward(params, p, xp=xp)
            g0 = h0 @ WhT
        stacks, fin, _, kept = _engine.forward(cell, x, (None, c0), self._fused(params, xp),
                                               self.n_a, xp=xp, keep=keep, collect=(),
                                               active=active, g0=g0)
        WhrT = xp.matrix_transpose(params["Whr"])
        y = stacks["A"][1:, ...] @ WhrT
        final = (fin["A"] @ WhrT, fin["C"])
        if not keep:
            return y, final, None
        # copies: a later write into the caller's arrays cannot change the gradients
        Wh = {g: copy(params["W" + g][:, :p]) for g in GATES}
        return y, final, _ProjectedKept(kept, copy(params["Whr"]), Wh,
                                        None if h0 is None else copy(h0), fin["A"])

    def backward(self, dy, cache, dstate, *, xp, active):
        kept, Whr, Wh, h0, a_fin = cache
        n, p = self.n_a, self.p
        T, m = dy.shape[0], dy.shape[1]
        A = kept.A[1:, ...]
        dWhr = xp.matrix_transpose(xp.reshape(dy, (T * m, p))) @ xp.reshape(A, (T * m, n))
        dh, dc = (None, None) if dstate is None else dstate
        da_fin = None
        if dh is not None:  # the final h = a W_hr^T
            da_fin = dh @ Whr
            dWhr = dWhr + xp.matrix_transpose(dh) @ a_fin
        dX, d0, g, dg0 = _engine.backward(self.cell, dy @ Whr, kept, xp=xp,
                                          dstate=(da_fin, dc), active=active, first=True)
        keys = self.cell.param_shapes(kept.X.shape[1], n)
        fused = self.cell.param_grads(g, keys)
        grads = {}
        dh0 = None
        for j, gate in enumerate(GATES):
            key = "W" + gate
            dM = fused[key][:, :n]  # the gradient on W_h W_hr
            dWh = dM @ xp.matrix_transpose(Whr)
            dWhr = dWhr + xp.matrix_transpose(Wh[gate]) @ dM
            dg = dg0[:, j * n:(j + 1) * n]  # the first step's input term: h0 W_h^T
            if h0 is not None:
                dWh = dWh + xp.matrix_transpose(dg) @ h0
            dh0 = dg @ Wh[gate] if dh0 is None else dh0 + dg @ Wh[gate]
            grads[key] = xp.concat([dWh, fused[key][:, n:]], axis=1)
        grads = {k: grads.get(k, fused.get(k)) for k in self.param_shapes(kept.X.shape[1])
                 if k != "Whr"}
        grads["Whr"] = dWhr
        return dX, (dh0, d0[1]), grads

    def prepare(self, params, *, xp):
        WxT, bx, WhT, ba = self.cell.fuse_forward(params, self.p, xp=xp)
        return (c_contiguous(WxT), bx, c_contiguous(WhT), ba,
                c_contiguous(xp.matrix_transpose(params["Whr"])))

    def step(self, x, state, prepared, *, xp):
        WxT, bx, WhT, ba, WhrT = prepared
        new = _engine.forward_step(array_ops(xp), self.cell, WhT, ba, x @ WxT + bx, state,
                                   None, NO_OUT)
        h = new["A"] @ WhrT
        return h, (h, new["C"])

    def __repr__(self):
        return f"ProjectedLSTMLayer(n_a={self.n_a}, proj_size={self.p})"


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
    proj_size : int, optional
        torch's LSTMP: with ``0 < proj_size < n_a``, each layer's output ``h = W_hr (o *
        tanh(c))`` has ``proj_size`` units, and is the recurrent input (each (layer,
        direction) then holds ``W* (n_a, proj_size + n_in)`` and ``Whr (proj_size,
        n_a)``); ``y`` has ``D proj_size`` features and the state is ``(h, c)``, ``h``
        of shape ``(num_layers D, proj_size, m)``. Default 0: none.
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

    def __init__(self, n_x: int, n_a: int, *, proj_size: int = 0, **kwargs: Any) -> None:
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
            raise ValueError(f"proj_size must be an int >= 0, got {proj_size!r}")
        if proj_size and isinstance(n_a, int) and proj_size >= n_a:
            raise ValueError(f"proj_size must be smaller than n_a={n_a} (torch's rule), "
                             f"got {proj_size}")
        self.proj_size = proj_size
        super().__init__(n_x, n_a, **kwargs)

    def _make_layer(self):
        if self.proj_size:
            return ProjectedLSTMLayer(self.n_h, self.proj_size)
        return CellLayer(self.cell, self.n_h)

    def _extra_config(self):
        return {"proj_size": self.proj_size}

    @classmethod
    def _torch_kwargs(cls, module):
        return {"proj_size": int(getattr(module, "proj_size", 0))}

    def _torch_module_kwargs(self):
        return {"proj_size": self.proj_size} if self.proj_size else {}


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
