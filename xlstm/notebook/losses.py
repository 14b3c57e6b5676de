"""Training losses on top of the LSTM: the loss value and every gradient in one call.

Shape letters are those of :mod:`xlstm.params` (``n_x`` inputs, ``n_a`` hidden units,
``n_y`` outputs, ``m`` examples, ``T_x`` steps). Both losses reuse the output layer of the
seed's parameter dict, ``Wy`` ``(n_y, n_a)`` and ``by`` ``(n_y, 1)``, and return a ``grads``
dict holding everything :func:`xlstm.lstm.lstm_backward` returns plus ``dWy`` and ``dby``.

* :func:`sequence_cross_entropy`: softmax cross-entropy at every step (sequence labelling,
  language modelling), with an optional mask for padded positions;
* :func:`last_step_mse`: mean squared error of a linear read-out of the last hidden state
  (sequence regression); :func:`last_step_predict` is its inference path.
"""

from __future__ import annotations

import math

from .._lib.compat import device_of, is_concrete, namespace, on_input_device
from .._lib.typing import Array, Grads, Params
from .lstm import _check_shape, _resolve, lstm_backward, lstm_forward

__all__ = ["sequence_cross_entropy", "softmax_cross_entropy", "last_step_mse",
           "last_step_predict"]


# ----------------------------------------------------------------------------- validation
def _prepare(params, x, a0, c0, kinds=None, **extra):
    """Namespace and sizes of a loss call: ``(xp, n_a, n_x, n_y, m, T_x)``."""
    xp, (n_a, n_x, n_y) = _resolve(params, kinds=kinds, x=x, a0=a0, c0=c0, **extra)
    _check_shape("x", x, (n_x, None, None), "(n_x, m, T_x)")
    _, m, T_x = x.shape
    return xp, n_a, n_x, n_y, m, T_x


def _output_grads(dZ, a, Wy, *, xp):
    """``dWy``, ``dby`` and ``da`` of a linear layer ``Z = Wy a + by`` (2-D, columns)."""
    dWy = dZ @ xp.matrix_transpose(a)
    dby = xp.sum(dZ, axis=1, keepdims=True)
    da = xp.matrix_transpose(Wy) @ dZ
    return dWy, dby, da


# ---------------------------------------------------------------------- sequence labelling
@on_input_device
def sequence_cross_entropy(
    x: Array, a0: Array, params: Params, labels: Array, *, mask: Array | None = None,
    c0: Array | None = None,
) -> tuple[Array, Grads]:
    r"""Softmax cross-entropy over every step of a sequence, and all its gradients.

    With ``a = lstm_forward(x, a0, params, c0)[0]`` the logits, log-probabilities and loss are

    .. math::

        z_{:,i,t} = W_y a_{:,i,t} + b_y, \qquad
        \log p_{k,i,t} = z_{k,i,t} - \max_j z_{j,i,t}
                         - \log \sum_j e^{z_{j,i,t} - \max_l z_{l,i,t}},

        L = \frac{1}{N} \sum_{i,t} w_{i,t} \, \bigl(-\log p_{y_{i,t},i,t}\bigr), \qquad
        N = \sum_{i,t} w_{i,t},

    where ``y`` are the ``labels`` and ``w`` the ``mask`` (all ones when omitted, so ``N`` is
    ``m T_x`` and ``L`` is the plain mean). The gradients start from

    .. math::

        \frac{\partial L}{\partial z_{:,i,t}} = \frac{w_{i,t}}{N}
            \bigl(p_{:,i,t} - e_{y_{i,t}}\bigr),

    (``e_k`` the one-hot vector of class ``k``), then
    ``dWy = sum_{i,t} dz a^T``, ``dby = sum_{i,t} dz`` and ``da = Wy^T dz``, which
    :func:`xlstm.lstm.lstm_backward` carries back through time.

    Parameters
    ----------
    x : array, shape (n_x, m, T_x)
        Inputs of every step.
    a0 : array, shape (n_a, m)
        Initial hidden state.
    params : dict
        The notebook's parameters, ``Wf, bf, Wi, bi, Wc, bc, Wo, bo, Wy, by``.
    labels : array of integers, shape (m, T_x)
        The class index in ``[0, n_y)`` of every example and step; same namespace and
        device as ``x``, any integer dtype. Values at masked-out positions are ignored and
        may be anything (for example a padding value such as -100).
    mask : array, shape (m, T_x), optional
        Which positions count. A boolean mask keeps the ``True`` positions. A floating mask
        (of the parameters' dtype) weighs each position by its value, so a 0/1 mask keeps
        the ones; the loss is then the weighted mean. Weights must be finite and
        non-negative. Default: every position counts.
    c0 : array, shape (n_a, m), optional
        Initial cell state; default zeros.

    Returns
    -------
    loss : array, shape ()
        ``L``, a 0-d array of the parameters' dtype, namespace and device.
    grads : dict
        ``dx`` ``(n_x, m, T_x)``, ``da0`` ``(n_a, m)``,
        ``dWf, dbf, dWi, dbi, dWc, dbc, dWo, dbo`` (shapes of the parameters), ``dc0``
        ``(n_a, m)``, and ``dWy`` ``(n_y, n_a)``, ``dby`` ``(n_y, 1)``: the gradients of
        ``L`` with respect to every input and parameter.

    Raises
    ------
    KeyError, TypeError, ValueError
        For a missing parameter, mixed namespaces, dtypes or devices, or a shape that
        disagrees (the message names the argument, for instance ``labels`` or ``mask``);
        ``ValueError`` when a counted label lies outside ``[0, n_y)``, when a mask weight
        is negative, NaN or infinite, or when no position counts (an all-false mask).
        Under ``jax.jit`` the values cannot be checked: there, any of these makes the
        loss NaN instead (which :func:`xlstm.fit` reports).

    Notes
    -----
    The logits of all steps are one GEMM over ``m T_x`` columns, and the gradient of the
    output layer is one GEMM each for ``dWy`` and ``da``. The one-hot targets are built by
    comparison with ``arange(n_y)``, with no indexed writes, so JAX works too.

    Validating the labels and the mask costs one host synchronisation (a single reduction
    is read back); everything else stays on the device. Labels of any integer dtype are
    compared in the namespace's default integer dtype, so ``uint8`` labels work with any
    number of classes.
    """
    xp, n_a, _, n_y, m, T_x = _prepare(
        params, x, a0, c0, labels=labels, mask=mask,
        kinds={"labels": ("integral",), "mask": ("bool",)},
    )  # fmt: skip
    targets = _targets(xp, labels, mask, n_y, m, T_x, x.dtype, device_of(x))
    a, _, _, caches = lstm_forward(x, a0, params, c0)
    Wy, by = params["Wy"], params["by"]
    A = xp.reshape(a, (n_a, m * T_x))  # columns in (example, step) order
    Z = Wy @ A + by  # (n_y, m T_x), every step in one GEMM
    loss, dZ = _cross_entropy(xp, Z, targets)
    dWy, dby, dA = _output_grads(dZ, A, Wy, xp=xp)
    grads = lstm_backward(xp.reshape(dA, (n_a, m, T_x)), caches)
    grads["dWy"], grads["dby"] = dWy, dby
    return loss, grads


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
    """
    xp = namespace(logits=logits, labels=labels, mask=mask, optional=("mask",),
                   kinds={"labels": ("integral",), "mask": ("bool",)})
    _check_shape("logits", logits, (None, None, None), "(n_y, m, T)")
    n_y, m, T = logits.shape
    targets = _targets(xp, labels, mask, n_y, m, T, logits.dtype, device_of(logits))
    loss, dZ = _cross_entropy(xp, xp.reshape(logits, (n_y, m * T)), targets)
    return loss, xp.reshape(dZ, (n_y, m, T))


def _targets(xp, labels, mask, n_y, m, T_x, dtype, dev):
    """The checked labels and mask of a cross-entropy, for :func:`_cross_entropy`:
    ``(labels, weights, count, bad, dtype, dev)``, the labels in the default integer dtype,
    ``weights`` ``None`` (all count) or the mask as weights, ``count`` their sum and
    ``bad`` a traced flag of a bad label or weight (or ``None``)."""
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    _check_shape("labels", labels, (m, T_x), "(m, T_x)")
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
        _check_shape("mask", mask, (m, T_x), "(m, T_x)")
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
    bad = _check_targets(labels, outside, counted, count, bad_mask, n_y, xp=xp)
    return labels, weights, count, bad, dtype, dev


def _cross_entropy(xp, Z, targets):
    """Loss and ``dZ`` of the logits ``Z`` ``(n_y, m T)`` (columns in (example, step)
    order) against the :func:`_targets`: the loss a 0-d array (numpy reductions give
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


def _check_targets(labels, outside, counted, count, bad_mask, n_y, *, xp):
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


# --------------------------------------------------------------------- sequence regression
@on_input_device
def last_step_predict(x: Array, a0: Array, params: Params, *, c0: Array | None = None) -> Array:
    r"""Linear read-out of the last hidden state: ``pred = Wy a_T + by``.

    The inference path of :func:`last_step_mse`: runs :func:`xlstm.lstm.lstm_forward` with
    ``return_caches=False``, so nothing is kept for a backward pass.

    Parameters
    ----------
    x : array, shape (n_x, m, T_x)
        Inputs of every step.
    a0 : array, shape (n_a, m)
        Initial hidden state.
    params : dict
        The notebook's parameters; ``Wy`` ``(n_y, n_a)`` and ``by`` ``(n_y, 1)`` are used as a
        plain linear layer (no softmax).
    c0 : array, shape (n_a, m), optional
        Initial cell state; default zeros.

    Returns
    -------
    pred : array, shape (n_y, m)
        :math:`W_y a_{T_x} + b_y`, in the inputs' namespace, dtype and device.
    """
    a, _, _, _ = lstm_forward(x, a0, params, c0, return_caches=False)
    return params["Wy"] @ a[:, :, -1] + params["by"]


@on_input_device
def last_step_mse(
    x: Array, a0: Array, params: Params, targets: Array, *, c0: Array | None = None
) -> tuple[Array, Grads]:
    r"""Mean squared error of a linear read-out of the last hidden state, and all gradients.

    .. math::

        \hat y = W_y a_{T_x} + b_y, \qquad
        L = \frac{1}{n_y m} \sum_{k,i} (\hat y_{k,i} - y_{k,i})^2,

    with ``y`` the ``targets``. The gradients start from
    :math:`\partial L / \partial \hat y = 2 (\hat y - y) / (n_y m)`, then
    ``dWy = d\hat y \, a_{T_x}^T``, ``dby = sum_i d\hat y`` and
    ``da_{T_x} = Wy^T d\hat y``; ``da`` is zero at every earlier step, and
    :func:`xlstm.lstm.lstm_backward` carries it back through time.

    Parameters
    ----------
    x : array, shape (n_x, m, T_x)
        Inputs of every step.
    a0 : array, shape (n_a, m)
        Initial hidden state.
    params : dict
        The notebook's parameters; ``Wy`` and ``by`` are the linear output layer.
    targets : array, shape (n_y, m)
        Regression targets, of the parameters' floating dtype, namespace and device.
    c0 : array, shape (n_a, m), optional
        Initial cell state; default zeros.

    Returns
    -------
    loss : array, shape ()
        ``L``, a 0-d array of the parameters' dtype, namespace and device.
    grads : dict
        The keys of :func:`xlstm.lstm.lstm_backward` (``dx, da0, dWf, dbf, dWi, dbi, dWc,
        dbc, dWo, dbo, dc0``) plus ``dWy`` ``(n_y, n_a)`` and ``dby`` ``(n_y, 1)``.

    Raises
    ------
    KeyError, TypeError, ValueError
        For a missing parameter, mixed namespaces, dtypes or devices, or a shape that
        disagrees; the message names the argument (for instance ``targets``).
    """
    xp, n_a, _, n_y, m, T_x = _prepare(params, x, a0, c0, targets=targets)
    _check_shape("targets", targets, (n_y, m), "(n_y, m)")
    a, _, _, caches = lstm_forward(x, a0, params, c0)
    Wy = params["Wy"]
    a_last = a[:, :, -1]
    diff = Wy @ a_last + params["by"] - targets
    scale = 1.0 / (n_y * m)
    loss = xp.sum(diff * diff) * xp.asarray(scale, dtype=x.dtype, device=device_of(x))
    dWy, dby, da_last = _output_grads((2.0 * scale) * diff, a_last, Wy, xp=xp)
    if T_x > 1:
        zeros = xp.zeros((n_a, m, T_x - 1), dtype=x.dtype, device=device_of(x))
        da = xp.concat([zeros, da_last[:, :, None]], axis=2)
    else:
        da = da_last[:, :, None]
    grads = lstm_backward(da, caches)
    grads["dWy"], grads["dby"] = dWy, dby
    return xp.asarray(loss), grads
