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

from .._lib.checks import check_shape
from .._lib.compat import device_of, on_input_device
from .._lib.cross_entropy import check_targets, cross_entropy, softmax_cross_entropy
from .._lib.typing import Array, Grads, Params
from .lstm import _backward, _check_sequence, _forward, lstm_forward

__all__ = ["sequence_cross_entropy", "softmax_cross_entropy", "last_step_mse",
           "last_step_predict"]


# ----------------------------------------------------------------------------- validation
def _prepare(params, x, a0, c0, **extra):
    """Check the arguments of a loss call once (``extra``: its other arrays and their
    ``kinds``): ``(xp, n_a, n_x, n_y, m, T_x)``."""
    xp, (n_a, n_x, n_y) = _check_sequence(params, x, a0, c0, **extra)
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
    x, a0, params, c0
        The arguments of :func:`xlstm.lstm.lstm_forward` (``c0`` by keyword here): inputs
        ``(n_x, m, T_x)``, the initial hidden and cell states ``(n_a, m)`` (``c0`` optional,
        default zeros) and the notebook's parameters ``Wf, bf, Wi, bi, Wc, bc, Wo, bo, Wy,
        by``, whose ``Wy`` ``(n_y, n_a)`` and ``by`` ``(n_y, 1)`` are the softmax layer.
    labels : array of integers, shape (m, T_x)
        The class index in ``[0, n_y)`` of every example and step; same namespace and
        device as ``x``, any integer dtype. Values at masked-out positions are ignored and
        may be anything (for example a padding value such as -100).
    mask : array, shape (m, T_x), optional
        Which positions count. A boolean mask keeps the ``True`` positions. A floating mask
        (of the parameters' dtype) weighs each position by its value, so a 0/1 mask keeps
        the ones; the loss is then the weighted mean. Weights must be finite and
        non-negative. Default: every position counts.

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

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> params = xlstm.init_params(3, 5, 2, seed=0)  # n_x, n_a, n_y
    >>> x = np.random.default_rng(0).standard_normal((3, 4, 7))  # (n_x, m, T_x)
    >>> labels = np.zeros((4, 7), dtype=np.int64)  # (m, T_x), classes in [0, n_y)
    >>> loss, grads = xlstm.sequence_cross_entropy(x, np.zeros((5, 4)), params, labels)
    >>> loss.shape, loss.dtype, grads["dWy"].shape, grads["dx"].shape
    ((), dtype('float64'), (2, 5), (3, 4, 7))
    >>> mask = np.arange(7) < np.array([7, 5, 3, 1])[:, None]  # each sequence's length
    >>> _, grads = xlstm.sequence_cross_entropy(x, np.zeros((5, 4)), params, labels, mask=mask)
    >>> bool(np.all(grads["dx"][:, 3, 1:] == 0.0))  # no gradient from past the end
    True
    """
    xp, n_a, _, n_y, m, T_x = _prepare(
        params, x, a0, c0, labels=labels, mask=mask,
        kinds={"labels": ("integral",), "mask": ("bool",)},
    )  # fmt: skip
    targets = check_targets(xp, labels, mask, n_y, m, T_x, x.dtype, device_of(x))
    a, _, _, caches = _forward(x, a0, params, c0, n_a, xp=xp, keep=True)
    Wy, by = params["Wy"], params["by"]
    A = xp.reshape(a, (n_a, m * T_x))  # columns in (example, step) order
    Z = Wy @ A + by  # (n_y, m T_x), every step in one GEMM
    loss, dZ = cross_entropy(xp, Z, targets)
    dWy, dby, dA = _output_grads(dZ, A, Wy, xp=xp)
    grads = _backward(xp.reshape(dA, (n_a, m, T_x)), caches, xp=xp)
    grads["dWy"], grads["dby"] = dWy, dby
    return loss, grads


# --------------------------------------------------------------------- sequence regression
@on_input_device
def last_step_predict(x: Array, a0: Array, params: Params, *, c0: Array | None = None) -> Array:
    r"""Linear read-out of the last hidden state: ``pred = Wy a_T + by``.

    The inference path of :func:`last_step_mse`: runs :func:`xlstm.lstm.lstm_forward` with
    ``return_caches=False``, so nothing is kept for a backward pass.

    Parameters
    ----------
    x, a0, params, c0
        As for :func:`sequence_cross_entropy`, but ``Wy`` ``(n_y, n_a)`` and ``by`` ``(n_y,
        1)`` are used as a plain linear layer (no softmax).

    Returns
    -------
    pred : array, shape (n_y, m)
        :math:`W_y a_{T_x} + b_y`, in the inputs' namespace, dtype and device.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> params = xlstm.init_params(3, 5, 2, seed=0)  # n_x, n_a, n_y
    >>> x = np.random.default_rng(0).standard_normal((3, 4, 7))  # (n_x, m, T_x)
    >>> pred = xlstm.last_step_predict(x, np.zeros((5, 4)), params)
    >>> pred.shape, pred.dtype
    ((2, 4), dtype('float64'))
    >>> a = xlstm.lstm_forward(x, np.zeros((5, 4)), params)[0]
    >>> bool(np.allclose(pred, params["Wy"] @ a[:, :, -1] + params["by"]))
    True
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
    x, a0, params, c0
        As for :func:`last_step_predict`: ``Wy`` and ``by`` are the linear output layer.
    targets : array, shape (n_y, m)
        Regression targets, of the parameters' floating dtype, namespace and device.

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

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> params = xlstm.init_params(3, 5, 2, seed=0)  # n_x, n_a, n_y
    >>> x = np.random.default_rng(0).standard_normal((3, 4, 7))  # (n_x, m, T_x)
    >>> targets = np.ones((2, 4))  # (n_y, m)
    >>> loss, grads = xlstm.last_step_mse(x, np.zeros((5, 4)), params, targets)
    >>> pred = xlstm.last_step_predict(x, np.zeros((5, 4)), params)
    >>> bool(np.isclose(loss, np.mean((pred - targets) ** 2)))
    True
    >>> grads["dWy"].shape, grads["dby"].shape, grads["da0"].shape
    ((2, 5), (2, 1), (5, 4))
    """
    xp, n_a, _, n_y, m, T_x = _prepare(params, x, a0, c0, targets=targets)
    check_shape("targets", targets, (n_y, m), "(n_y, m)")
    a, _, _, caches = _forward(x, a0, params, c0, n_a, xp=xp, keep=True)
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
    grads = _backward(da, caches, xp=xp)
    grads["dWy"], grads["dby"] = dWy, dby
    return xp.asarray(loss), grads
