"""The LSTM API of the notebook "Building your LSTM RNN - Step by Step": cell and sequence,
forward and backward.

Shapes follow the notebook (``n_x`` inputs, ``n_a`` hidden units, ``n_y`` classes, ``m``
examples, ``T_x`` steps): a step's arrays are ``(features, m)``, a sequence's are
``(features, m, T_x)``. Equation numbers (1)-(21) are the notebook's.

Sequences run through the fused engine (:mod:`xlstm.engine.loop`); the cell functions use the
same pointwise code, so the two agree to floating-point rounding.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Literal, overload

from .._lib.compat import copy, namespace, on_input_device
from .._lib.typing import Array, Grads, Params
from ..cells.lstm import LSTM_CELL
from ..engine import loop as _engine
from ._common import (
    SequenceCaches,
    StepCaches,
    backward_fused,
    check_inputs,
    check_step_cache,
    sequence_backward,
    time_major,
)
from .head import SoftmaxHead
from .params import param_arrays, param_sizes, require_keys

#: The output layer's keys in the notebook's parameter dict.
_HEAD = SoftmaxHead("Wy", "by")

__all__ = [
    "LSTMCache",
    "LSTMCaches",
    "lstm_cell_forward",
    "lstm_forward",
    "lstm_cell_backward",
    "lstm_backward",
]

LSTMCache = namedtuple(
    "LSTMCache", ["a_next", "c_next", "a_prev", "c_prev", "ft", "it", "cct", "ot", "xt", "params"]
)
LSTMCache.__doc__ = """One step's cache, in the notebook's order. All arrays are ``(n_a, m)``
except ``xt`` ``(n_x, m)``; ``params`` is a copy of the parameter dict taken by the forward
pass, so that changing the caller's parameters afterwards does not change the gradients.

Examples
--------
>>> import numpy as np
>>> import xlstm
>>> params = xlstm.init_params(3, 5, 2, seed=0)  # n_x, n_a, n_y
>>> *_, cache = xlstm.lstm_cell_forward(np.ones((3, 4)), np.zeros((5, 4)),
...                                     np.zeros((5, 4)), params)
>>> isinstance(cache, xlstm.LSTMCache), cache._fields[:4]
(True, ('a_next', 'c_next', 'a_prev', 'c_prev'))
>>> cache.ft.shape, cache.xt.shape, cache.params is params
((5, 4), (3, 4), False)
"""


class _StepCaches(StepCaches):
    """The per-step caches of a sequence, built on access as views into the stacked state."""

    def step(self, t):
        st, n, tr = self._state, self._state.n_a, self._xp.matrix_transpose
        m = st.A.shape[1]
        s = st.S[t, ...]
        return LSTMCache(
            tr(st.A[t + 1, ...]), tr(st.C[t + 1, ...]), tr(st.A[t, ...]), tr(st.C[t, ...]),
            tr(s[:, n : 2 * n]), tr(s[:, 2 * n :]), tr(st.CCT[t, ...]), tr(s[:, :n]),
            tr(st.X[t * m : (t + 1) * m, :]), st.params,
        )  # fmt: skip


class LSTMCaches(SequenceCaches):
    """What :func:`lstm_forward` returns as ``caches``: the notebook's pair ``(caches, x)``.

    ``caches[0]`` is the sequence of per-step :class:`LSTMCache` tuples (views into the
    stacked forward state, built on access) and ``caches[1]`` is ``x``. The stacked state
    itself is :attr:`state`; :func:`lstm_backward` uses it directly.

    It can be copied (``copy.copy``, ``copy.deepcopy``) and pickled, as far as the
    arrays of its namespace can.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> params = xlstm.init_params(3, 5, 2, seed=0)  # n_x, n_a, n_y
    >>> x = np.random.default_rng(0).standard_normal((3, 4, 7))  # (n_x, m, T_x)
    >>> _, _, _, caches = xlstm.lstm_forward(x, np.zeros((5, 4)), params)
    >>> steps, x_again = caches
    >>> len(steps), type(steps[0]).__name__, steps[-1].a_next.shape, x_again is x
    (7, 'LSTMCache', (5, 4), True)
    """


# ----------------------------------------------------------------------------- validation
#: Array arguments of the public functions that may be ``None``.
_OPTIONAL = ("c0", "mask")


def _resolve(params, need_output=True, kinds=None, **arrays):
    """Check params' keys, then namespace/dtype/device of everything, then params' shapes.

    ``kinds`` passes through to :func:`xlstm._lib.compat.namespace` (non-floating arguments).
    Of ``arrays``, only those named in :data:`_OPTIONAL` may be ``None``.
    """
    require_keys(params, need_output=need_output)
    xp = namespace(kinds=kinds, optional=_OPTIONAL, **arrays,
                   **param_arrays(params, need_output=need_output))
    return xp, param_sizes(params, need_output=need_output)


def _check_sequence(params, x, a0, c0, **extra):
    """Check the arguments of :func:`lstm_forward` (and ``extra`` arrays of the same call,
    with their ``kinds``) once: ``(xp, (n_a, n_x, n_y))``."""
    return check_inputs(_resolve, params, x, {"a0": a0, "c0": c0}, **extra)


# ----------------------------------------------------------------------------- forward
@on_input_device
def lstm_cell_forward(
    xt: Array, a_prev: Array, c_prev: Array, params: Params
) -> tuple[Array, Array, Array, LSTMCache]:
    """One LSTM step, equations (1)-(6), and the softmax prediction.

    Parameters
    ----------
    xt : array, shape (n_x, m)
        Input at step t.
    a_prev : array, shape (n_a, m)
        Hidden state at step t-1.
    c_prev : array, shape (n_a, m)
        Cell state at step t-1.
    params : dict
        ``Wf, Wi, Wc, Wo`` of shape ``(n_a, n_a + n_x)`` acting on ``[a_prev; xt]``,
        ``bf, bi, bc, bo`` ``(n_a, 1)``, ``Wy`` ``(n_y, n_a)`` and ``by`` ``(n_y, 1)``.

    Returns
    -------
    a_next : array, shape (n_a, m)
        ``ot * tanh(c_next)``, eq. (6).
    c_next : array, shape (n_a, m)
        ``ft * c_prev + it * cct``, eq. (4).
    yt_pred : array, shape (n_y, m)
        ``softmax(Wy a_next + by)`` over axis 0.
    cache : LSTMCache
        ``(a_next, c_next, a_prev, c_prev, ft, it, cct, ot, xt, params)`` for
        :func:`lstm_cell_backward`.

    Raises
    ------
    KeyError, TypeError, ValueError
        For a missing parameter, mixed namespaces or dtypes, or a shape that disagrees;
        the message names the argument.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> params = xlstm.init_params(3, 5, 2, seed=0)  # n_x, n_a, n_y
    >>> xt, a_prev, c_prev = np.ones((3, 4)), np.zeros((5, 4)), np.zeros((5, 4))
    >>> a_next, c_next, yt_pred, cache = xlstm.lstm_cell_forward(xt, a_prev, c_prev, params)
    >>> a_next.shape, c_next.shape, yt_pred.shape, a_next.dtype
    ((5, 4), (5, 4), (2, 4), dtype('float64'))
    >>> bool(np.allclose(yt_pred.sum(axis=0), 1.0))  # a softmax over the classes
    True
    """
    xp, (n_a, n_x, _) = check_inputs(_resolve, params, xt, {"a_prev": a_prev, "c_prev": c_prev},
                                     step=True)
    m = xt.shape[1]
    tr = xp.matrix_transpose
    x = xp.reshape(tr(xt), (1, m, n_x))  # the engine's time-major layout
    stacks, _, Y, state = _engine.forward(
        LSTM_CELL, x, (tr(a_prev), tr(c_prev)), params, n_a, xp=xp, keep=True, head=_HEAD
    )
    A, C = stacks["A"], stacks["C"]
    cache = _StepCaches(state, xp)[0]
    return copy(tr(A[1, ...])), copy(tr(C[1, ...])), tr(Y[0, ...]), cache


@overload
def lstm_forward(
    x: Array, a0: Array, params: Params, c0: Array | None = None, *, return_caches: Literal[True] = True
) -> tuple[Array, Array, Array, LSTMCaches]: ...

@overload
def lstm_forward(
    x: Array, a0: Array, params: Params, c0: Array | None = None, *, return_caches: Literal[False]
) -> tuple[Array, Array, Array, None]: ...

@overload
def lstm_forward(
    x: Array, a0: Array, params: Params, c0: Array | None = None, *, return_caches: bool
) -> tuple[Array, Array, Array, LSTMCaches | None]: ...

@on_input_device
def lstm_forward(
    x: Array, a0: Array, params: Params, c0: Array | None = None, *, return_caches: bool = True
) -> tuple[Array, Array, Array, LSTMCaches | None]:
    """Run the LSTM over a whole sequence, equations (1)-(6) at every step.

    Parameters
    ----------
    x : array, shape (n_x, m, T_x)
        Inputs of every step.
    a0 : array, shape (n_a, m)
        Initial hidden state.
    params : dict
        The notebook's parameters, see :func:`lstm_cell_forward`.
    c0 : array, shape (n_a, m), optional
        Initial cell state. Default ``None`` means zeros, as in the notebook.
    return_caches : bool, optional
        Default True. False runs the inference path: nothing is kept for a backward pass
        and ``caches`` is ``None``.

    Returns
    -------
    a : array, shape (n_a, m, T_x)
        Hidden states.
    y : array, shape (n_y, m, T_x)
        Softmax predictions, ``softmax(Wy a_t + by)`` over axis 0.
    c : array, shape (n_a, m, T_x)
        Cell states.
    caches : LSTMCaches or None
        The notebook's pair ``(list of per-step caches, x)``: ``len(caches) == 2`` and
        ``caches[1]`` is ``x``. The per-step caches are views into one stacked forward
        state, which :func:`lstm_backward` uses directly.

    Notes
    -----
    One GEMM computes the input projections of up to ``4096 // m`` steps at a time; each
    step is then one GEMM with the recurrent weights plus pointwise math; the predictions
    are one GEMM and one softmax per block of steps.

    Memory. With caches, the forward state costs ``(7 n_a + n_x) m`` numbers per step
    (gates ``4 n_a``, ``c``, ``tanh(c)`` and ``a``, and a copy of ``x_t``), on top of the
    outputs, and no per-step copy of ``params``. Without caches, the extra memory is
    ``O((4 n_a + n_x) m)`` per step of one block of at most ``4096 // m`` steps, independent of
    ``T_x`` (on namespaces with immutable arrays, such as JAX, the outputs are assembled
    by concatenation, which briefly holds them twice).

    The returned ``a``, ``c`` and ``y`` are independent of ``caches``: writing into them
    never changes what :func:`lstm_backward` computes.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> params = xlstm.init_params(3, 5, 2, seed=0)  # n_x, n_a, n_y
    >>> x = np.random.default_rng(0).standard_normal((3, 4, 7))  # (n_x, m, T_x)
    >>> a, y, c, caches = xlstm.lstm_forward(x, np.zeros((5, 4)), params)
    >>> a.shape, y.shape, c.shape, len(caches)
    ((5, 4, 7), (2, 4, 7), (5, 4, 7), 2)
    >>> xlstm.lstm_forward(x, np.zeros((5, 4)), params, return_caches=False)[3] is None
    True
    """
    xp, (n_a, _, _) = _check_sequence(params, x, a0, c0)
    return _forward(x, a0, params, c0, n_a, xp=xp, keep=bool(return_caches))


def _forward(x, a0, params, c0, n_a, *, xp, keep):
    """:func:`lstm_forward` of checked arguments (``keep`` is ``return_caches``)."""
    stacks, _, Y, state = _engine.forward(
        LSTM_CELL, *time_major(xp, x, (a0, c0)), params, n_a, xp=xp, keep=keep, head=_HEAD
    )
    A, C = stacks["A"], stacks["C"]
    seed = (2, 1, 0)  # (T, m, k) -> (k, m, T)
    a = xp.permute_dims(A[1:, ...], seed)
    c = xp.permute_dims(C[1:, ...], seed)
    y = xp.permute_dims(Y, seed)
    if not keep:
        return a, y, c, None
    return copy(a), y, copy(c), LSTMCaches(_StepCaches(state, xp), x, state)


# ---------------------------------------------------------------------------- backward
@on_input_device
def lstm_cell_backward(da_next: Array, dc_next: Array, cache: tuple) -> Grads:
    """Backward pass of one LSTM step, equations (7)-(21).

    Parameters
    ----------
    da_next : array, shape (n_a, m)
        Gradient of the loss with respect to this step's hidden state.
    dc_next : array, shape (n_a, m)
        Gradient with respect to this step's cell state.
    cache : tuple
        The 10-field cache of :func:`lstm_cell_forward`, in the notebook's order
        ``(a_next, c_next, a_prev, c_prev, ft, it, cct, ot, xt, params)``; a hand-built
        tuple works too.

    Returns
    -------
    dict
        ``dxt`` ``(n_x, m)`` eq. (21); ``da_prev`` ``(n_a, m)`` eq. (19);
        ``dc_prev`` ``(n_a, m)`` eq. (20); ``dWf, dWi, dWc, dWo`` ``(n_a, n_a + n_x)``
        eqs. (11)-(14); ``dbf, dbi, dbc, dbo`` ``(n_a, 1)`` eqs. (15)-(18).

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> params = xlstm.init_params(3, 5, 2, seed=0)  # n_x, n_a, n_y
    >>> *_, cache = xlstm.lstm_cell_forward(np.ones((3, 4)), np.zeros((5, 4)),
    ...                                     np.zeros((5, 4)), params)
    >>> grads = xlstm.lstm_cell_backward(np.ones((5, 4)), np.zeros((5, 4)), cache)
    >>> grads["dxt"].shape, grads["da_prev"].shape, grads["dWf"].shape, grads["dbf"].shape
    ((3, 4), (5, 4), (5, 8), (5, 1))
    """
    xp, n_a, m = check_step_cache(cache, LSTMCache._fields,
                                  {"da_next": da_next, "dc_next": dc_next}, _resolve,
                                  "lstm_cell_forward")
    (a_next, c_next, a_prev, c_prev, ft, it, cct, ot, xt, params) = cache
    # the engine's backward pass over a one-step state built from the cache, with dc_next
    # as the gradient on the final cell state
    tr = xp.matrix_transpose
    state = LSTM_CELL.Cache(
        A=xp.stack([tr(a_prev), tr(a_next)]), C=xp.stack([tr(c_prev), tr(c_next)]),
        S=xp.concat([tr(ot), tr(ft), tr(it)], axis=-1)[None, ...], CCT=tr(cct)[None, ...],
        TC=xp.tanh(tr(c_next))[None, ...], X=tr(xt), params=params, n_a=n_a,
    )  # fmt: skip
    dX, (da_prev, dc_prev), grads = _engine.backward(
        LSTM_CELL, xp.reshape(tr(da_next), (1, m, n_a)), state, xp=xp,
        dstate=(None, tr(dc_next))
    )
    return {
        "dxt": tr(dX[0, ...]),  # (21)
        "da_prev": tr(da_prev),  # (19)
        "dc_prev": tr(dc_prev),  # (20)
        **grads,  # (11)-(18)
    }


@on_input_device
def lstm_backward(da: Array, caches: tuple) -> Grads:
    """Backward pass over a whole sequence (backpropagation through time).

    Parameters
    ----------
    da : array, shape (n_a, m, T_da)
        Gradient of the loss with respect to the hidden states ``a``. It may cover only the
        first ``T_da <= T_x`` steps: the loss then depends on those steps only, so the
        gradients of later inputs are zero and backpropagation starts at step ``T_da - 1``.
    caches : tuple
        The ``caches`` returned by :func:`lstm_forward`. A hand-built notebook-style pair
        ``(list of per-step caches, x)`` also works, through the per-step path.

    Returns
    -------
    dict
        ``dx`` ``(n_x, m, T_x)`` eq. (21); ``da0`` ``(n_a, m)`` eq. (19);
        ``dWf, dbf, dWi, dbi, dWc, dbc, dWo, dbo`` summed over steps, eqs. (11)-(18); and
        ``dc0`` ``(n_a, m)``, the gradient with respect to the initial cell state, eq. (20).

    Notes
    -----
    Per step: the pointwise math of eqs. (7)-(10), (20) and one GEMM ``dG @ Wa``. After the
    loop: one GEMM each for ``dW`` and ``dx`` and one reduction for ``db`` over the stacked
    pre-activation gradients ``dG``. Extra memory: ``dG``, ``4 n_a m`` numbers per step,
    plus the backward coefficients, another ``5 n_a m`` per step (the CUDA kernels on CuPy
    form them on the fly).

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> params = xlstm.init_params(3, 5, 2, seed=0)  # n_x, n_a, n_y
    >>> x = np.random.default_rng(0).standard_normal((3, 4, 7))  # (n_x, m, T_x)
    >>> a, _, _, caches = xlstm.lstm_forward(x, np.zeros((5, 4)), params)
    >>> grads = xlstm.lstm_backward(np.ones_like(a), caches)  # the loss sum(a)
    >>> grads["dx"].shape, grads["da0"].shape, grads["dWf"].shape, grads["dc0"].shape
    ((3, 4, 7), (5, 4), (5, 8), (5, 4))
    """
    return sequence_backward(da, caches, cell=LSTM_CELL, fused=LSTMCaches, resolve=_resolve,
                             step_backward=lstm_cell_backward, fields=len(LSTMCache._fields),
                             api="lstm_forward")


def _backward(da, caches, *, xp):
    """:func:`lstm_backward` of the caches of :func:`_forward` and a ``da`` that fits them."""
    return backward_fused(LSTM_CELL, da, caches.state, xp=xp)
