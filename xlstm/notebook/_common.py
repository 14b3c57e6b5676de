"""What the notebook APIs (:mod:`xlstm.lstm`, :mod:`xlstm.rnn`) share: their caches.

A sequence's ``caches`` is the notebook's pair ``(list of per-step caches, x)``. Here the
per-step caches are built on access, as views into the engine's stacked forward state,
which the pair carries as ``.state`` for the fused backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._lib.checks import check_da
from .._lib.compat import device_of, namespace
from ..engine import loop as _engine


class StepCaches(Sequence):
    """The per-step caches of a sequence, built on access as views into the stacked state.

    Subclasses define :meth:`step`, the cache of step ``t`` (``0 <= t < len(self)``).
    """

    def __init__(self, state, xp=None):
        self._state = state
        self._xp = namespace(caches=state.A) if xp is None else xp

    def __reduce__(self):  # the namespace (a module) is found again from the arrays
        return (type(self), (self._state,))

    def __len__(self):
        return self._state.A.shape[0] - 1

    def __getitem__(self, t):
        if isinstance(t, slice):
            return [self[k] for k in range(*t.indices(len(self)))]
        T = len(self)
        if not -T <= t < T:
            raise IndexError(f"step {t} is out of range for a sequence of {T} steps")
        return self.step(t % T)

    def step(self, t):
        raise NotImplementedError


class SequenceCaches(tuple):
    """The notebook's pair ``(caches, x)``, carrying the stacked forward state as
    :attr:`state`. It can be copied (``copy.copy``, ``copy.deepcopy``) and pickled, as far
    as the arrays of its namespace can."""

    def __new__(cls, steps, x, state):
        obj = super().__new__(cls, (steps, x))
        obj.state = state
        return obj

    def __reduce__(self):  # copy, deepcopy and pickle rebuild it from its three parts
        return (type(self), (self[0], self[1], self.state))


def check_state(state, cell, resolve, api):
    """The namespace of a forward state after checking it is one that ``api`` made.

    A forged or damaged ``caches.state`` (wrong type, arrays of other shapes, namespaces or
    dtypes) is a TypeError or ValueError here rather than a failure deep in the math.
    ``resolve(params, need_output=False, **arrays)`` is the API's own check of its
    parameters, returning ``(xp, (n_a, n_x, n_y))``.
    """
    if not isinstance(state, cell.State):
        raise TypeError(
            f"caches.state is not the forward state of {api}; pass the caches that "
            f"{api} returned (got a state of type {type(state).__name__})"
        )
    n_a = state.n_a
    if isinstance(n_a, bool) or not isinstance(n_a, int) or n_a < 1:
        raise ValueError(f"caches.state.n_a must be a positive int, got {n_a!r}")
    if not isinstance(state.params, dict):
        raise TypeError("caches.state.params must be the parameter dict of the forward pass")
    names = (*cell.state_names, *cell.saved, "X")
    fields = {f"caches.state.{k}": getattr(state, k) for k in names}
    xp, (p_n_a, n_x, _) = resolve(state.params, need_output=False, **fields)
    if p_n_a != n_a:
        raise ValueError(f"caches.state.params has n_a={p_n_a} but caches.state.n_a is {n_a}")
    A = state.A
    if A.ndim != 3 or A.shape[0] < 2:
        raise ValueError(f"caches.state.A must be (T_x+1, m, n_a), got shape {tuple(A.shape)}")
    T1, m = A.shape[0], A.shape[1]
    expected = {k: (T1, m, n_a) for k in cell.state_names}
    expected.update((k, (T1 - 1, m, w * n_a)) for k, w in cell.saved.items())
    expected["X"] = ((T1 - 1) * m, n_x)
    for k, shape in expected.items():
        got = tuple(getattr(state, k).shape)
        if got != shape:
            raise ValueError(
                f"caches.state.{k} has shape {got}, expected {shape}; the caches were not "
                f"made by {api}, or were changed since"
            )
    return xp


def backward_fused(cell, da, state, resolve, api):
    """The fused backward pass of a notebook API over a checked forward state.

    Returns ``(dx, dstate0, grads)``: ``dx`` in the seed layout ``(n_x, m, T_x)`` (zero for
    the steps after the ``T_da`` that ``da`` covers), the gradients on the initial states
    ``(n_a, m)`` and the parameter gradients in the cell's names.
    """
    check_state(state, cell, resolve, api)
    xp = namespace(da=da, caches=state.A)
    n_a, (T1, m, _) = state.n_a, state.A.shape
    T_x = T1 - 1
    check_da(da, n_a, m, T_x)
    dX, dstate0, grads = _engine.backward(cell, da, state, xp=xp)
    T_da, n_x = dX.shape[0], dX.shape[2]
    if T_da < T_x:  # later steps do not touch the loss
        zeros = xp.zeros((T_x - T_da, m, n_x), dtype=dX.dtype, device=device_of(dX))
        dX = xp.concat([dX, zeros], axis=0)
    tr = xp.matrix_transpose
    return xp.permute_dims(dX, (2, 1, 0)), tuple(tr(d) for d in dstate0), grads


def backward_per_step(da, steps, x, step_backward, fields, carried=()):
    """The backward pass of a hand-built notebook pair ``(list of per-step caches, x)``:
    the API's cell backward step by step, from the last step ``da`` covers.

    ``fields`` is the length of a per-step cache; ``carried`` names the states besides
    ``a`` whose gradients pass from step to step (``("c",)`` for the LSTM: the cell backward
    takes ``dc_next`` after ``da_next`` and returns ``dc_prev``, and the result has ``dc0``).
    """
    if len(steps) == 0:
        raise ValueError("caches holds no steps")
    first = steps[0]
    if not isinstance(first, tuple) or len(first) != fields:
        raise TypeError(f"caches[0] must be a list of {fields}-field per-step caches")
    xp = namespace(da=da, **{"caches[1]": x, "caches[0][0].a_next": first[0]})
    n_a, m = first[0].shape
    T_x = len(steps)
    check_da(da, n_a, m, T_x)
    da_prev = xp.zeros((n_a, m), dtype=da.dtype, device=device_of(da))
    extra = [da_prev for _ in carried]
    total, dxs = None, []
    for t in range(da.shape[2] - 1, -1, -1):
        g = step_backward(da[:, :, t] + da_prev, *extra, steps[t])
        da_prev = g["da_prev"]
        extra = [g[f"d{k}_prev"] for k in carried]
        dxs.append(g["dxt"])
        sums = {k: v for k, v in g.items() if k[:2] in ("dW", "db")}
        total = sums if total is None else {k: total[k] + v for k, v in sums.items()}
    zero = xp.zeros_like(dxs[0])
    dx = xp.stack(dxs[::-1] + [zero] * (T_x - len(dxs)), axis=-1)
    return {"dx": dx, "da0": da_prev, **total, **{f"d{k}0": e for k, e in zip(carried, extra)}}
