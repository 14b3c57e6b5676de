"""The RNN API of the notebook "Building your Recurrent Neural Network - Step by Step": cell
and sequence, forward and backward.

Shapes follow the notebook (``n_x`` inputs, ``n_a`` hidden units, ``n_y`` classes, ``m``
examples, ``T_x`` steps): a step's arrays are ``(features, m)``, a sequence's are
``(features, m, T_x)``. One step is

* ``a_next = tanh(Wax xt + Waa a_prev + ba)``,
* ``yt_pred = softmax(Wya a_next + by)``;

and its backward pass, with ``da_next`` the gradient on ``a_next``,

* ``dtanh = (1 - a_next^2) * da_next``,
* ``dxt = Wax^T dtanh``, ``dWax = dtanh xt^T``, ``da_prev = Waa^T dtanh``,
  ``dWaa = dtanh a_prev^T``, ``dba = sum(dtanh, axis=1)``.

Sequences run through the fused engine (:mod:`xlstm.engine.loop`) with the cell
:data:`xlstm.cells.rnn.RNN_TANH`; the cell functions use the same pointwise code, so the two
agree to floating-point rounding.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Literal, overload

from .._lib.checks import check_shape, require_mapping_keys
from .._lib.compat import copy, namespace, on_input_device
from .._lib.typing import Array, Grads, Params
from ..cells.rnn import RNN_TANH
from ..engine import loop as _engine
from ._common import (
    SequenceCaches,
    StepCaches,
    check_inputs,
    check_step_cache,
    sequence_backward,
    time_major,
)
from .head import SoftmaxHead

__all__ = [
    "RNNCache",
    "RNNCaches",
    "rnn_cell_forward",
    "rnn_forward",
    "rnn_cell_backward",
    "rnn_backward",
]

#: The notebook's parameter keys: the cell's, then the output layer's.
PARAM_KEYS = ("Wax", "Waa", "Wya", "ba", "by")
#: The output layer's keys.
_HEAD = SoftmaxHead("Wya", "by")
_CELL_KEYS = ("Wax", "Waa", "ba")

RNNCache = namedtuple("RNNCache", ["a_next", "a_prev", "xt", "parameters"])
RNNCache.__doc__ = """One step's cache, in the notebook's order: ``a_next`` and ``a_prev``
``(n_a, m)``, ``xt`` ``(n_x, m)``; ``parameters`` is a copy of the parameter dict taken by
the forward pass, so that changing the caller's parameters afterwards does not change the
gradients.

Examples
--------
>>> import numpy as np
>>> import xlstm
>>> rng = np.random.default_rng(0)
>>> parameters = {"Wax": rng.standard_normal((5, 3)), "Waa": rng.standard_normal((5, 5)),
...               "Wya": rng.standard_normal((2, 5)), "ba": np.zeros((5, 1)),
...               "by": np.zeros((2, 1))}  # n_x=3, n_a=5, n_y=2
>>> *_, cache = xlstm.rnn_cell_forward(np.ones((3, 4)), np.zeros((5, 4)), parameters)
>>> isinstance(cache, xlstm.RNNCache), cache._fields
(True, ('a_next', 'a_prev', 'xt', 'parameters'))
>>> cache.a_next.shape, cache.xt.shape
((5, 4), (3, 4))
"""


class _StepCaches(StepCaches):
    """The per-step caches of a sequence, built on access as views into the stacked state."""

    def step(self, t):
        st, tr = self._state, self._xp.matrix_transpose
        m = st.A.shape[1]
        return RNNCache(tr(st.A[t + 1, ...]), tr(st.A[t, ...]),
                        tr(st.X[t * m : (t + 1) * m, :]), st.params)


class RNNCaches(SequenceCaches):
    """What :func:`rnn_forward` returns as ``caches``: the notebook's pair ``(caches, x)``.

    ``caches[0]`` is the sequence of per-step :class:`RNNCache` tuples (views into the
    stacked forward state, built on access) and ``caches[1]`` is ``x``. The stacked state
    itself is :attr:`state`; :func:`rnn_backward` uses it directly.

    It can be copied (``copy.copy``, ``copy.deepcopy``) and pickled, as far as the
    arrays of its namespace can.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> rng = np.random.default_rng(0)
    >>> parameters = {"Wax": rng.standard_normal((5, 3)), "Waa": rng.standard_normal((5, 5)),
    ...               "Wya": rng.standard_normal((2, 5)), "ba": np.zeros((5, 1)),
    ...               "by": np.zeros((2, 1))}  # n_x=3, n_a=5, n_y=2
    >>> x = rng.standard_normal((3, 4, 7))  # (n_x, m, T_x)
    >>> _, _, caches = xlstm.rnn_forward(x, np.zeros((5, 4)), parameters)
    >>> steps, x_again = caches
    >>> len(steps), type(steps[0]).__name__, steps[-1].a_next.shape, x_again is x
    (7, 'RNNCache', (5, 4), True)
    """


# ----------------------------------------------------------------------------- validation
def _resolve(parameters, need_output=True, **arrays):
    """Check the keys, then namespace/dtype/device of everything, then the shapes.

    Returns ``(xp, (n_a, n_x, n_y))``, ``n_y`` being ``None`` without the output layer.
    """
    keys = PARAM_KEYS if need_output else _CELL_KEYS
    require_mapping_keys(parameters, keys, name="parameters")
    xp = namespace(**arrays, **{f"parameters['{k}']": parameters[k] for k in keys})
    Wax = parameters["Wax"]
    check_shape("parameters['Wax']", Wax, (None, None), "(n_a, n_x)")
    n_a, n_x = Wax.shape
    check_shape("parameters['Waa']", parameters["Waa"], (n_a, n_a), "(n_a, n_a)")
    check_shape("parameters['ba']", parameters["ba"], (n_a, 1), "(n_a, 1)")
    n_y = None
    if need_output:
        check_shape("parameters['Wya']", parameters["Wya"], (None, n_a), "(n_y, n_a)")
        n_y = parameters["Wya"].shape[0]
        check_shape("parameters['by']", parameters["by"], (n_y, 1), "(n_y, 1)")
    return xp, (n_a, n_x, n_y)


# ----------------------------------------------------------------------------- forward
@on_input_device
def rnn_cell_forward(
    xt: Array, a_prev: Array, parameters: Params
) -> tuple[Array, Array, RNNCache]:
    """One RNN step and its softmax prediction.

    ``a_next = tanh(Wax xt + Waa a_prev + ba)`` and ``yt_pred = softmax(Wya a_next + by)``.

    Parameters
    ----------
    xt : array, shape (n_x, m)
        Input at step t.
    a_prev : array, shape (n_a, m)
        Hidden state at step t-1.
    parameters : dict
        ``Wax`` ``(n_a, n_x)``, ``Waa`` ``(n_a, n_a)``, ``Wya`` ``(n_y, n_a)``, ``ba``
        ``(n_a, 1)`` and ``by`` ``(n_y, 1)``.

    Returns
    -------
    a_next : array, shape (n_a, m)
        The next hidden state.
    yt_pred : array, shape (n_y, m)
        ``softmax(Wya a_next + by)`` over axis 0.
    cache : RNNCache
        ``(a_next, a_prev, xt, parameters)`` for :func:`rnn_cell_backward`.

    Raises
    ------
    KeyError, TypeError, ValueError
        For a missing parameter, mixed namespaces, dtypes or devices, or a shape that
        disagrees; the message names the argument.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> rng = np.random.default_rng(0)
    >>> parameters = {"Wax": rng.standard_normal((5, 3)), "Waa": rng.standard_normal((5, 5)),
    ...               "Wya": rng.standard_normal((2, 5)), "ba": np.zeros((5, 1)),
    ...               "by": np.zeros((2, 1))}  # n_x=3, n_a=5, n_y=2
    >>> a_next, yt_pred, cache = xlstm.rnn_cell_forward(np.ones((3, 4)), np.zeros((5, 4)),
    ...                                                 parameters)
    >>> a_next.shape, yt_pred.shape, a_next.dtype
    ((5, 4), (2, 4), dtype('float64'))
    >>> bool(np.allclose(a_next, np.tanh(parameters["Wax"] @ np.ones((3, 4)))))
    True
    """
    xp, (n_a, n_x, _) = check_inputs(_resolve, parameters, xt, {"a_prev": a_prev}, step=True)
    m = xt.shape[1]
    tr = xp.matrix_transpose
    x = xp.reshape(tr(xt), (1, m, n_x))  # the engine's time-major layout
    stacks, _, Y, state = _engine.forward(
        RNN_TANH, x, (tr(a_prev),), parameters, n_a, xp=xp, keep=True, head=_HEAD
    )
    return copy(tr(stacks["A"][1, ...])), tr(Y[0, ...]), _StepCaches(state, xp)[0]


@overload
def rnn_forward(
    x: Array, a0: Array, parameters: Params, *, return_caches: Literal[True] = True
) -> tuple[Array, Array, RNNCaches]: ...

@overload
def rnn_forward(
    x: Array, a0: Array, parameters: Params, *, return_caches: Literal[False]
) -> tuple[Array, Array, None]: ...

@overload
def rnn_forward(
    x: Array, a0: Array, parameters: Params, *, return_caches: bool
) -> tuple[Array, Array, RNNCaches | None]: ...

@on_input_device
def rnn_forward(
    x: Array, a0: Array, parameters: Params, *, return_caches: bool = True
) -> tuple[Array, Array, RNNCaches | None]:
    """Run the RNN over a whole sequence: :func:`rnn_cell_forward`'s step at every step.

    Parameters
    ----------
    x : array, shape (n_x, m, T_x)
        Inputs of every step.
    a0 : array, shape (n_a, m)
        Initial hidden state.
    parameters : dict
        The notebook's parameters, see :func:`rnn_cell_forward`.
    return_caches : bool, optional
        Default True. False runs the inference path: nothing is kept for a backward pass
        and ``caches`` is ``None``.

    Returns
    -------
    a : array, shape (n_a, m, T_x)
        Hidden states, ``a[:, :, t] = tanh(Wax x[:, :, t] + Waa a[:, :, t-1] + ba)``.
    y_pred : array, shape (n_y, m, T_x)
        Softmax predictions, ``softmax(Wya a_t + by)`` over axis 0.
    caches : RNNCaches or None
        The notebook's pair ``(list of per-step caches, x)``: ``len(caches) == 2`` and
        ``caches[1]`` is ``x``. The per-step caches are views into one stacked forward
        state, which :func:`rnn_backward` uses directly.

    Notes
    -----
    One GEMM computes the input terms of up to ``4096 // m`` steps at a time; each step
    is then one GEMM with ``Waa`` and one ``tanh``; the predictions are one GEMM and one
    softmax per block of steps. With caches the forward state costs ``(2 n_a + n_x) m``
    numbers per step (``a`` twice and a copy of ``x_t``) on top of the outputs. The
    returned ``a`` and ``y_pred`` are independent of ``caches``: writing into them never
    changes what :func:`rnn_backward` computes.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> rng = np.random.default_rng(0)
    >>> parameters = {"Wax": rng.standard_normal((5, 3)), "Waa": rng.standard_normal((5, 5)),
    ...               "Wya": rng.standard_normal((2, 5)), "ba": np.zeros((5, 1)),
    ...               "by": np.zeros((2, 1))}  # n_x=3, n_a=5, n_y=2
    >>> x = rng.standard_normal((3, 4, 7))  # (n_x, m, T_x)
    >>> a, y_pred, caches = xlstm.rnn_forward(x, np.zeros((5, 4)), parameters)
    >>> a.shape, y_pred.shape, len(caches)
    ((5, 4, 7), (2, 4, 7), 2)
    >>> bool(np.allclose(y_pred.sum(axis=0), 1.0))  # a softmax over the classes
    True
    """
    xp, (n_a, _, _) = check_inputs(_resolve, parameters, x, {"a0": a0})
    keep = bool(return_caches)
    stacks, _, Y, state = _engine.forward(
        RNN_TANH, *time_major(xp, x, (a0,)), parameters, n_a, xp=xp, keep=keep, head=_HEAD
    )
    seed = (2, 1, 0)  # (T, m, k) -> (k, m, T)
    a = xp.permute_dims(stacks["A"][1:, ...], seed)
    y = xp.permute_dims(Y, seed)
    if not keep:
        return a, y, None
    return copy(a), y, RNNCaches(_StepCaches(state, xp), x, state)


# ---------------------------------------------------------------------------- backward
@on_input_device
def rnn_cell_backward(da_next: Array, cache: tuple) -> Grads:
    """Backward pass of one RNN step.

    With ``dtanh = (1 - a_next^2) * da_next``: ``dxt = Wax^T dtanh``, ``da_prev = Waa^T
    dtanh``, ``dWax = dtanh xt^T``, ``dWaa = dtanh a_prev^T`` and ``dba`` the sum of
    ``dtanh`` over the examples.

    Parameters
    ----------
    da_next : array, shape (n_a, m)
        Gradient of the loss with respect to this step's hidden state ``a_next`` (the
        ``1 - a_next^2`` factor is applied here).
    cache : tuple
        The cache of :func:`rnn_cell_forward`, ``(a_next, a_prev, xt, parameters)``; a
        hand-built tuple works too (``parameters`` needs ``Wax``, ``Waa`` and ``ba``).

    Returns
    -------
    dict
        ``dxt`` ``(n_x, m)``, ``da_prev`` ``(n_a, m)``, ``dWax`` ``(n_a, n_x)``, ``dWaa``
        ``(n_a, n_a)`` and ``dba`` ``(n_a, 1)``.

    Raises
    ------
    KeyError, TypeError, ValueError
        For a cache that is not the 4-tuple, a missing parameter, mixed namespaces, dtypes
        or devices, or a shape that disagrees; the message names the argument.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> rng = np.random.default_rng(0)
    >>> parameters = {"Wax": rng.standard_normal((5, 3)), "Waa": rng.standard_normal((5, 5)),
    ...               "Wya": rng.standard_normal((2, 5)), "ba": np.zeros((5, 1)),
    ...               "by": np.zeros((2, 1))}  # n_x=3, n_a=5, n_y=2
    >>> a_next, _, cache = xlstm.rnn_cell_forward(np.ones((3, 4)), np.zeros((5, 4)),
    ...                                           parameters)
    >>> grads = xlstm.rnn_cell_backward(np.ones((5, 4)), cache)
    >>> grads["dxt"].shape, grads["da_prev"].shape, grads["dWax"].shape, grads["dba"].shape
    ((3, 4), (5, 4), (5, 3), (5, 1))
    >>> bool(np.allclose(grads["dba"], (1 - a_next**2).sum(axis=1, keepdims=True)))
    True
    """
    xp, n_a, m = check_step_cache(cache, RNNCache._fields, {"da_next": da_next}, _resolve,
                                  "rnn_cell_forward")
    a_next, a_prev, xt, parameters = cache
    # the engine's backward pass over a one-step state built from the cache
    tr = xp.matrix_transpose
    state = RNN_TANH.Cache(A=xp.stack([tr(a_prev), tr(a_next)]), H=tr(a_next)[None, ...],
                           X=tr(xt), params=parameters, n_a=n_a)
    dX, (da_prev,), grads = _engine.backward(RNN_TANH, xp.reshape(tr(da_next), (1, m, n_a)),
                                             state, xp=xp)
    return {"dxt": tr(dX[0, ...]), "da_prev": tr(da_prev), **grads}


@on_input_device
def rnn_backward(da: Array, caches: tuple) -> Grads:
    """Backward pass over a whole sequence (backpropagation through time).

    At each step ``t``, from the last, :func:`rnn_cell_backward` runs with ``da[:, :, t]``
    plus the ``da_prev`` of step ``t + 1``; the weight and bias gradients are summed.

    Parameters
    ----------
    da : array, shape (n_a, m, T_da)
        Gradient of the loss with respect to the hidden states ``a``. It may cover only the
        first ``T_da <= T_x`` steps: the gradients of later inputs are then zero.
    caches : tuple
        The ``caches`` returned by :func:`rnn_forward`. A hand-built notebook-style pair
        ``(list of per-step caches, x)`` also works, through the per-step path.

    Returns
    -------
    dict
        ``dx`` ``(n_x, m, T_x)``, ``da0`` ``(n_a, m)`` and ``dWax``, ``dWaa``, ``dba``
        summed over steps.

    Raises
    ------
    TypeError, ValueError
        For caches that :func:`rnn_forward` did not make (or that were changed since),
        mixed namespaces, dtypes or devices, or a ``da`` whose shape disagrees.

    Notes
    -----
    Per step: one pointwise pass and one GEMM with ``Waa``. After the loop: one GEMM each
    for ``dWax``, ``dWaa`` and ``dx`` and one reduction for ``dba`` over the stacked
    pre-activation gradients, ``n_a m`` numbers per step.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> rng = np.random.default_rng(0)
    >>> parameters = {"Wax": rng.standard_normal((5, 3)), "Waa": rng.standard_normal((5, 5)),
    ...               "Wya": rng.standard_normal((2, 5)), "ba": np.zeros((5, 1)),
    ...               "by": np.zeros((2, 1))}  # n_x=3, n_a=5, n_y=2
    >>> x = rng.standard_normal((3, 4, 7))  # (n_x, m, T_x)
    >>> a, _, caches = xlstm.rnn_forward(x, np.zeros((5, 4)), parameters)
    >>> grads = xlstm.rnn_backward(np.ones_like(a), caches)  # the loss sum(a)
    >>> grads["dx"].shape, grads["da0"].shape, grads["dWaa"].shape, grads["dba"].shape
    ((3, 4, 7), (5, 4), (5, 5), (5, 1))
    """
    return sequence_backward(da, caches, cell=RNN_TANH, fused=RNNCaches, resolve=_resolve,
                             step_backward=rnn_cell_backward, fields=len(RNNCache._fields),
                             api="rnn_forward")
