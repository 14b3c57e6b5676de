"""Softmax cross-entropy on any model's logits: the checks of its labels and mask, and its
value and gradient.

:func:`softmax_cross_entropy` is public as :func:`xlstm.softmax_cross_entropy` (its home is
:mod:`xlstm.training.losses`); the notebook LSTM's :func:`xlstm.sequence_cross_entropy` runs
the same :func:`check_targets` and :func:`cross_entropy` on the logits of its output layer.
"""

from __future__ import annotations

import math

from .checks import check_shape
from .compat import device_of, is_concrete, namespace, on_input_device
from .typing import Array

__all__ = ["softmax_cross_entropy", "check_targets", "cross_entropy"]


@on_input_device
def softmax_cross_entropy(
    logits: Array, labels: Array, *, mask: Array | None = None
) -> tuple[Array, Array]:
    r"""Softmax cross-entropy of logits at every step, and its gradient: the loss of
    :func:`sequence_cross_entropy` for any model's outputs.

    ``logits`` ``(n_y, m, T)`` are, for example, a linear head on a model's outputs, ``Wy
    @ y + by``; the loss is the (weighted) mean of ``-log softmax(logits)[label]`` over the
    counted positions and ``dlogits = w (p - e_label) / N``, as in
    :func:`sequence_cross_entropy` (whose math this is).

    Parameters
    ----------
    logits : array, shape (n_y, m, T)
        Unnormalised log-probabilities of every class, example and step.
    labels : array of integers, shape (m, T)
        The class index in ``[0, n_y)`` of every counted position (any value elsewhere).
    mask : array, shape (m, T), optional
        Which positions count (boolean) or their weights (floating, finite, >= 0). With a
        model's ``lengths``, ``arange(T) < lengths[:, None]`` counts each sequence's steps.

    Returns
    -------
    loss : array, shape ()
        A 0-d array of the logits' dtype, namespace and device.
    dlogits : array, shape (n_y, m, T)
        The gradient of ``loss`` with respect to ``logits``.

    Raises
    ------
    TypeError, ValueError
        As :func:`sequence_cross_entropy`, naming ``logits``, ``labels`` or ``mask``.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> logits = np.zeros((3, 2, 4))  # (n_y, m, T): every class equally likely
    >>> labels = np.zeros((2, 4), dtype=np.int64)  # (m, T)
    >>> loss, dlogits = xlstm.softmax_cross_entropy(logits, labels)
    >>> bool(np.isclose(loss, np.log(3))), dlogits.shape
    (True, (3, 2, 4))
    >>> mask = np.arange(4) < np.array([4, 2])[:, None]  # lengths 4 and 2
    >>> _, dlogits = xlstm.softmax_cross_entropy(logits, labels, mask=mask)
    >>> bool(np.all(dlogits[:, 1, 2:] == 0.0))  # nothing from past the end
    True
    """
    xp = namespace(logits=logits, labels=labels, mask=mask, optional=("mask",),
                   kinds={"labels": ("integral",), "mask": ("bool",)})
    check_shape("logits", logits, (None, None, None), "(n_y, m, T)")
    n_y, m, T = logits.shape
    targets = check_targets(xp, labels, mask, n_y, m, T, logits.dtype, device_of(logits))
    loss, dZ = cross_entropy(xp, xp.reshape(logits, (n_y, m * T)), targets)
    return loss, xp.reshape(dZ, (n_y, m, T))


def check_targets(xp, labels, mask, n_y, m, T_x, dtype, dev):
    """The checked labels and mask of a cross-entropy, for :func:`cross_entropy`:
    ``(labels, weights, count, bad, dtype, dev)``, the labels in the default integer dtype,
    ``weights`` ``None`` (all count) or the mask as weights, ``count`` their sum and
    ``bad`` a traced flag of a bad label or weight (or ``None``)."""
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    check_shape("labels", labels, (m, T_x), "(m, T_x)")
    # Compare classes in the namespace's default integer dtype: a narrow dtype (uint8 with
    # 300 classes, say) cannot hold arange(n_y), and a wrapped class index would count a
    # label twice. Values beyond that dtype wrap to negatives and are reported below.
    wide = xp.__array_namespace_info__().default_dtypes(device=dev)["integral"]
    labels = xp.astype(labels, wide, copy=False)
    if mask is None:
        weights = None
        count = float(m * T_x)
        counted = None
        bad_mask = None
    else:
        check_shape("mask", mask, (m, T_x), "(m, T_x)")
        is_bool = xp.isdtype(mask.dtype, "bool")
        weights = xp.astype(mask, dtype) if is_bool else mask
        counted = mask if is_bool else mask != 0.0
        bad_mask = None
        if not is_bool:
            bad_mask = xp.any(~(xp.isfinite(mask) & (mask >= 0.0)))
            # Weights near the dtype's maximum (1e308) overflow their sum, and every share
            # w / sum would be 0. They are taken relative to a power of two near the
            # largest (one below the one at or under it, as log2 rounds: 2**128 would not
            # fit float32), so that their sum is at most 8 m T: dividing by a power of two
            # is exact, so the shares w / sum are the same numbers as unscaled ones
            # wherever those did not overflow.
            top = xp.max(weights)
            usable = xp.isfinite(top) & (top > 0.0)
            exponent = xp.floor(xp.log2(xp.where(usable, top, xp.ones_like(top)))) - 1.0
            low = math.log2(xp.finfo(weights.dtype).smallest_normal)  # 2**low is normal
            exponent = xp.where(exponent < low, xp.full_like(exponent, low), exponent)
            weights = weights / 2.0**exponent
        count = xp.sum(weights)
    outside = (labels < 0) | (labels >= n_y)
    if counted is not None:
        outside = outside & counted
    bad = _check_values(labels, outside, counted, count, bad_mask, n_y, xp=xp)
    return labels, weights, count, bad, dtype, dev


def cross_entropy(xp, Z, targets):
    """Loss and ``dZ`` of the logits ``Z`` ``(n_y, m T)`` (columns in (example, step)
    order) against the :func:`check_targets`: the loss a 0-d array (numpy reductions give
    scalars, hence the ``asarray``)."""
    labels, weights, count, bad, dtype, dev = targets
    n_y, cols = Z.shape
    shifted = Z - xp.max(Z, axis=0, keepdims=True)
    lse = xp.log(xp.sum(xp.exp(shifted), axis=0, keepdims=True))
    logp = shifted - lse
    classes = xp.arange(n_y, dtype=labels.dtype, device=dev)
    onehot = xp.astype(xp.reshape(labels, (1, cols)) == classes[:, None], dtype)
    nll = -xp.sum(onehot * logp, axis=0, keepdims=True)  # (1, m T)
    if weights is None:
        scale = 1.0 / count
        # A 0-d array of the loss's dtype: a Python float times numpy 1.x's float32 scalar
        # would give float64.
        loss = xp.sum(nll) * xp.asarray(scale, dtype=dtype, device=dev)
        dZ = (xp.exp(logp) - onehot) * scale
    else:
        scale = xp.reshape(weights, (1, cols)) / count  # 0 at masked positions
        loss = xp.sum(nll * scale)  # nll is finite everywhere, so masked terms are 0
        dZ = (xp.exp(logp) - onehot) * scale
    if bad is not None:  # traced values (jax.jit): a bad label or weight makes the loss NaN
        loss = xp.where(bad, xp.asarray(float("nan"), dtype=dtype, device=dev), loss)
    return xp.asarray(loss), dZ


def _check_values(labels, outside, counted, count, bad_mask, n_y, *, xp):
    """Raise ValueError for a counted label outside ``[0, n_y)``, a mask weight that is
    negative or not finite, or nothing counted.

    One reduction is read back to the host; the detailed message is worked out only when
    something is wrong. Where the values cannot be read (JAX tracers under ``jax.jit``)
    nothing is raised: the 0-d flag of a problem is returned for the loss to become NaN.
    """
    bad = xp.any(outside)
    if counted is not None:
        bad = bad | (count <= 0.0)
    if bad_mask is not None:
        bad = bad | bad_mask
    if not is_concrete(bad):
        return bad
    if not bool(bad):
        return None
    if bad_mask is not None and bool(bad_mask):
        raise ValueError(
            "mask weights must be finite and >= 0; the mask holds negative, NaN or "
            "infinite values"
        )
    if counted is not None and bool(count <= 0.0):
        raise ValueError(
            "mask counts no position (it is all False or its weights sum to <= 0); "
            "the mean over counted positions is undefined"
        )
    n_bad = int(xp.sum(xp.astype(outside, xp.int64)))
    # min/max over the offending values only (they are a subset of all labels)
    lo = int(xp.min(xp.where(outside, labels, xp.max(labels))))
    hi = int(xp.max(xp.where(outside, labels, xp.min(labels))))
    raise ValueError(
        f"labels must lie in [0, n_y) = [0, {n_y}) at every counted position; "
        f"{n_bad} counted value(s) fall outside, from {lo} to {hi}"
    )
