"""Numerically stable activations, written once against the array API.

Derivatives are expressed through the outputs (``s * (1 - s)`` for the sigmoid,
``1 - t**2`` for tanh), so the backward pass never re-evaluates an exponential.
"""

from __future__ import annotations

from .._lib.compat import namespace, on_input_device
from .._lib.typing import Array

__all__ = ["sigmoid", "softmax"]


@on_input_device
def sigmoid(x: Array) -> Array:
    """Logistic sigmoid, ``1 / (1 + exp(-x))``, computed as ``0.5 * tanh(0.5 * x) + 0.5``.

    The tanh form never overflows: ``sigmoid(±1e4)`` and ``sigmoid(±710)`` give exactly 1
    and 0, with no warning. It is the sigmoid of equations (1), (2) and (5).

    Parameters
    ----------
    x : array
        Any real floating array.

    Returns
    -------
    array
        Same namespace, dtype, shape and device as ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> xlstm.sigmoid(np.array([-1e4, 0.0, 1e4]))
    array([0. , 0.5, 1. ])
    """
    xp = namespace(x=x)
    return _sigmoid(x, xp=xp)


@on_input_device
def softmax(x: Array, axis: int = 0) -> Array:
    """Softmax along ``axis`` (axis 0, the class axis of the notebook's ``(n_y, m)`` layout).

    The maximum along ``axis`` is subtracted before ``exp``, so inputs of ±1e4 give exact
    one-hot limits with no overflow, warning or NaN.

    Parameters
    ----------
    x : array
        Real floating array with at least one dimension.
    axis : int, optional
        Axis holding the classes. Default 0.

    Returns
    -------
    array
        Same namespace, dtype, shape and device as ``x``; sums to 1 along ``axis``.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> xlstm.softmax(np.array([[0.0, -1e4], [0.0, 1e4]]))  # classes along axis 0
    array([[0.5, 0. ],
           [0.5, 1. ]])
    >>> p = xlstm.softmax(np.array([[1.0, 2.0, 3.0]]), axis=1)
    >>> p.shape, bool(np.isclose(p.sum(), 1.0))
    ((1, 3), True)
    """
    xp = namespace(x=x)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x with {x.ndim} dimensions")
    return _softmax(x, axis, xp=xp)


def _sigmoid(x, *, xp):
    return 0.5 * xp.tanh(0.5 * x) + 0.5


def _softmax(x, axis, *, xp):
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)
