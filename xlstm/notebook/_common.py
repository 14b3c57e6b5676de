"""What the notebook APIs (:mod:`xlstm.lstm`, :mod:`xlstm.rnn`) share: their caches, the
checks of their arguments and their backward passes over a sequence.

A sequence's ``caches`` is the notebook's pair ``(list of per-step caches, x)``. Here the
per-step caches are built on access, as views into the engine's stacked forward state,
which the pair carries as ``.state`` for the fused backward pass.

Each API's ``resolve(params, need_output=True, **arrays)`` checks its parameter dict (keys,
then the namespace, dtype and device of it and of ``arrays``, then its shapes) and returns
``(xp, (n_a, n_x, n_y))``. The ``check_*`` functions here run it once per public call; what
they checked, the trusted functions (:func:`backward_fused`) take as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._lib.checks import check_da, check_shape
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


def check_inputs(resolve, params, x, states, *, step=False, **extra):
    """Check the arguments of a forward pass once: ``(xp, (n_a, n_x, n_y))``.

    ``x`` is a sequence's ``x`` ``(n_x, m, T_x)``, or with ``step`` a step's ``xt`` ``(n_x,
    m)``; ``states`` the initial states by name, ``(n_a, m)`` each (``None`` where the API
    allows it); ``extra`` more arrays (and ``kinds``) for ``resolve``.
    """
    name, what = ("xt", "(n_x, m)") if step else ("x", "(n_x, m, T_x)")
    xp, sizes = resolve(params, **{name: x}, **states, **extra)
    n_a, n_x, _ = sizes
    check_shape(name, x, (n_x, None) if step else (n_x, None, None), what)
    for key, value in states.items():
        if value is not None:
            check_shape(key, value, (n_a, x.shape[1]), "(n_a, m)")
    return xp, sizes


def check_step_cache(cache, fields, grads, resolve, api):
    """Check the cache of one step and the gradients on its states once: ``(xp, n_a, m)``.

    ``fields`` are the names of the cache's fields, its parameter dict last (the cache
    type's ``_fields``); ``grads`` the gradients by name, ``(n_a, m)`` each, like every
    field but ``xt`` ``(n_x, m)``. ``api`` is the function that makes such caches.
    """
    if not isinstance(cache, tuple) or len(cache) != len(fields):
        raise TypeError(f"cache must be the {len(fields)}-tuple ({', '.join(fields)}) "
                        f"returned by {api}")
    arrays = {**grads, **{f"cache.{k}": v for k, v in zip(fields[:-1], cache[:-1])}}
    xp, (n_a, n_x, _) = resolve(cache[-1], need_output=False, **arrays)
    xt = arrays.pop("cache.xt")
    check_shape("cache.xt", xt, (n_x, None), "(n_x, m)")
    m = xt.shape[1]
    for name, arr in arrays.items():
        check_shape(name, arr, (n_a, m), "(n_a, m)")
    return xp, n_a, m


def sequence_backward(da, caches, *, cell, fused, resolve, step_backward, fields, api):
    """The backward pass of a notebook API over a sequence's ``caches``, checked once.

    The ``fused`` caches that ``api`` returned go through :func:`backward_fused`; a
    hand-built pair ``(list of per-step caches, x)``, of ``fields``-field caches, goes step
    by step through ``step_backward``, the API's cell backward (which checks each step's
    cache).
    """
    if not isinstance(caches, tuple) or len(caches) != 2:
        raise TypeError(f"caches must be the pair (list of per-step caches, x) from {api}")
    if not isinstance(caches, fused):
        return _backward_per_step(cell, da, *caches, step_backward, fields)
    state = getattr(caches, "state", None)
    xp = check_backward(cell, da, state, resolve, api)
    return backward_fused(cell, da, state, xp=xp)


def check_backward(cell, da, state, resolve, api):
    """The namespace of a fused backward pass, after checking the forward state and then
    ``da`` against it.

    A forged or damaged ``caches.state`` (wrong type, arrays of other shapes, namespaces or
    dtypes) is a TypeError or ValueError here rather than a failure deep in the math, as is
    a ``da`` that does not fit it.
    """
    if not isinstance(state, cell.Cache):
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
    _, (p_n_a, n_x, _) = resolve(state.params, need_output=False, **fields)
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
    xp = namespace(da=da, caches=A)
    check_da(da, n_a, m, T1 - 1)
    return xp


def time_major(xp, x, states):
    """The notebook's ``x (n_x, m, T)`` and states ``(n_a, m)`` (or ``None``) in the
    engine's time-major layout, ``(T, m, n_x)`` and ``(m, n_a)``: views, no copies."""
    return (xp.permute_dims(x, (2, 1, 0)),
            tuple(None if s is None else xp.matrix_transpose(s) for s in states))


def backward_fused(cell, da, state, *, xp):
    """The fused backward pass over a checked forward state and ``da``.

    Returns the notebook's gradient dict: ``dx`` in the seed layout ``(n_x, m, T_x)`` (zero
    for the steps after the ``T_da`` that ``da`` covers), ``da0``, the parameter gradients
    in the cell's names, then the gradients on the other initial states (``dc0``).
    """
    T_x, m = state.A.shape[0] - 1, state.A.shape[1]
    dX, dstate0, grads = _engine.backward(cell, xp.permute_dims(da, (2, 1, 0)), state, xp=xp)
    T_da, n_x = dX.shape[0], dX.shape[2]
    if T_da < T_x:  # later steps do not touch the loss
        zeros = xp.zeros((T_x - T_da, m, n_x), dtype=dX.dtype, device=device_of(dX))
        dX = xp.concat([dX, zeros], axis=0)
    tr = xp.matrix_transpose
    return _grads(cell, xp.permute_dims(dX, (2, 1, 0)), [tr(d) for d in dstate0], grads)


def _grads(cell, dx, dstate0, grads):
    """The notebook's gradient dict: ``dx``, ``da0``, ``grads``, then ``dc0`` and so on for
    the cell's other states."""
    da0, *others = dstate0
    return {"dx": dx, "da0": da0, **grads,
            **{f"d{k.lower()}0": d for k, d in zip(cell.state_names[1:], others)}}


def _backward_per_step(cell, da, steps, x, step_backward, fields):
    """The backward pass of a hand-built notebook pair ``(list of per-step caches, x)``:
    ``step_backward``, the API's cell backward, step by step from the last step ``da``
    covers.

    ``fields`` is the length of a per-step cache. The cell backward takes ``da_next``, then
    ``dc_next`` and so on for the cell's other states (the LSTM's), and returns
    ``da_prev``, ``dc_prev``, ... with ``dxt`` and the parameter gradients, which are summed.
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
    carried = [da_prev for _ in cell.state_names[1:]]
    total, dxs = None, []
    for t in range(da.shape[2] - 1, -1, -1):
        g = step_backward(da[:, :, t] + da_prev, *carried, steps[t])
        da_prev = g["da_prev"]
        carried = [g[f"d{k.lower()}_prev"] for k in cell.state_names[1:]]
        dxs.append(g["dxt"])
        sums = {k: v for k, v in g.items() if k[:2] in ("dW", "db")}
        total = sums if total is None else {k: total[k] + v for k, v in sums.items()}
    zero = xp.zeros_like(dxs[0])
    dx = xp.stack(dxs[::-1] + [zero] * (T_x - len(dxs)), axis=-1)
    return _grads(cell, dx, [da_prev, *carried], total)
