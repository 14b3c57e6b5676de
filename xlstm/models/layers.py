"""The Layer protocol: what the model stack (:mod:`xlstm.models.stack`) drives, one
(layer, direction) at a time, and :class:`CellLayer`, the layer of any engine cell.

A model is a stack of layers of one kind: the stack owns layers x directions x lengths x
dropout and the layouts at the model's edge; a layer owns its parameters (shapes and
initialisation), its state and its forward and backward passes. The mLSTM's layer
(:class:`xlstm.models.mlstm.MLSTMLayer`) runs its own forms; later layers (xLSTM blocks)
plug in the same way, and a test can define one inline.

Layouts, as the stack hands them over, time-major: the input ``x (T, m, n_in)`` and output
``y (T, m, n_h)``; each state array with the batch first, as in the model's state without
its leading ``num_layers * D`` axis and with its last axis, the batch, moved to the front
(``(m, n_h)`` for a cell), ``None`` for zeros; ``active (T, m, 1)``, whether each step is
within its sequence's length, or ``None`` (no padding). The stack converts the model's
layouts once, at its edge. The stack has
already replaced the input past each length by zeros, and does the same with ``dy``:
padding is never read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from .._lib.compat import c_contiguous
from .._lib.typing import Array
from ..cells.base import NO_OUT, Cell, array_ops
from ..engine import loop as _engine

__all__ = ["Layer", "CellLayer"]


@runtime_checkable
class Layer(Protocol):
    """One (layer, direction) of a model, as the stack drives it.

    Attributes
    ----------
    name : str
        Short name (the cell's for a :class:`CellLayer`, ``"mlstm"``).
    n_h : int
        Output features.
    state_names : tuple of str
        The state's parts, in order.
    frozen, positive, scaled : tuple of str
        Parts that carry no gradient (a stabiliser), that a valid state has positive (a
        normaliser), and that are defined up to the scale of a frozen part.
    state_axes : tuple of str
        Each part's axes after ``num_layers * D``, for messages (``"n_a, m"``).
    """

    name: str
    n_h: int
    state_names: tuple[str, ...]
    frozen: tuple[str, ...]
    positive: tuple[str, ...]
    scaled: tuple[str, ...]
    state_axes: tuple[str, ...]

    def config(self) -> tuple:
        """What, besides the model's sizes, tells two layers of one name apart."""

    def param_shapes(self, n_in: int) -> dict[str, tuple[int, ...]]:
        """The parameter dict for ``n_in`` input features: key to shape, in order."""

    def init_params(self, rng: Any, n_in: int) -> dict:
        """Parameters drawn from numpy's ``Generator`` ``rng``, as host numpy arrays."""

    def state_shapes(self, m: int) -> tuple[tuple[int, ...], ...]:
        """Each state array's shape for a batch of ``m``."""

    def forward(self, x: Array, state0: tuple, params: Mapping, *, xp: Any, keep: bool,
                active: Array | None, opts: Mapping) -> tuple[Array, tuple, Any]:
        """``(y, final_state, cache)``; ``cache`` is ``None`` unless ``keep``. ``opts``
        holds the call's options for this kind of layer (the mLSTM's ``form``)."""

    def backward(self, dy: Array, cache: Any, dstate: tuple | None, *, xp: Any,
                 active: Array | None) -> tuple[Array, tuple, dict]:
        """``(dx, dstate0, grads)`` from ``dy`` and the gradient on the final state
        (``None``, whole or per part, for zero); ``grads`` keyed like the parameters."""

    def prepare(self, params: Mapping, *, xp: Any) -> Any:
        """The parameters as :meth:`step` reads them (fused weights, say), made once for
        many steps."""

    def step(self, x: Array, state: tuple, prepared: Any, *, xp: Any) -> tuple[Array, tuple]:
        """One step of inference: ``(y, state)`` from ``x (m, n_in)`` and the state (batch
        first, every part given), with the weights of :meth:`prepare`."""


class CellLayer:
    """The layer of an engine cell: the engine's one time loop runs ``cell`` (and its
    compiled loops where an accelerator has them).

    Parameters
    ----------
    cell : Cell
        The cell (registered in ``xlstm.cells.CELLS``).
    n_h : int
        Hidden size (``n_a``).
    **hyper
        The cell's other sizes, passed to its parameter shapes and initialisation (the
        sLSTM's ``num_heads``).
    """

    def __init__(self, cell: Cell, n_h: int, **hyper: Any) -> None:
        self.cell, self.n_h, self.hyper = cell, n_h, hyper

    name = property(lambda self: self.cell.name)
    state_names = property(lambda self: self.cell.state_names)
    frozen = property(lambda self: self.cell.frozen)
    positive = property(lambda self: self.cell.positive)
    scaled = property(lambda self: self.cell.scaled)
    state_axes = property(lambda self: ("n_a, m",) * len(self.cell.state_names))

    def config(self) -> tuple:
        return tuple(self.hyper.values())

    def param_shapes(self, n_in: int) -> dict[str, tuple[int, ...]]:
        return self.cell.param_shapes(n_in, self.n_h, **self.hyper)

    def init_params(self, rng: Any, n_in: int) -> dict:
        return self.cell.init_params(rng, n_in, self.n_h, **self.hyper)

    def state_shapes(self, m: int) -> tuple[tuple[int, ...], ...]:
        return ((self.n_h, m),) * len(self.cell.state_names)

    def forward(self, x, state0, params, *, xp, keep, active, opts):
        cell = self.cell
        stacks, fin, _, kept = _engine.forward(cell, x, state0, params, self.n_h, xp=xp,
                                               keep=keep, collect=(), active=active)
        return stacks[cell.state_names[0]][1:, ...], tuple(fin[k] for k in cell.state_names), kept

    def backward(self, dy, cache, dstate, *, xp, active):
        dX, d0, g = _engine.backward(self.cell, dy, cache, xp=xp, dstate=dstate, active=active)
        keys = self.param_shapes(cache.X.shape[1])
        return dX, tuple(d0), self.cell.param_grads(g, keys)

    def prepare(self, params, *, xp):
        WxT, bx, WaT, ba = self.cell.fuse_forward(params, self.n_h, xp=xp)
        return c_contiguous(WxT), bx, c_contiguous(WaT), ba

    def step(self, x, state, prepared, *, xp):
        """The engine's step frame over one step: the input term, then
        :func:`~xlstm.engine.loop.forward_step` on the array path."""
        WxT, bx, WaT, ba = prepared
        gx = x @ WxT
        gx = gx + bx
        cell = self.cell
        new = _engine.forward_step(array_ops(xp), cell, WaT, ba, gx,
                                   cell.start(state, xp=xp), None, NO_OUT)
        return new[cell.state_names[0]], tuple([new[k] for k in cell.state_names])

    def __repr__(self):
        return f"CellLayer({self.cell.name}, n_h={self.n_h})"
