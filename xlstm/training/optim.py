"""Functional optimizers and gradient clipping for the seed's parameter dict.

An optimizer holds only its hyperparameters. Its state is a plain dict that lives in the
parameters' namespace, device and dtype, and every call returns new arrays::

    opt = Adam(lr=1e-2)
    state = opt.init(params)
    for x, y in batches:
        grads = ...                       # e.g. lstm_backward(...) plus the output layer
        grads, norm = clip_by_global_norm(grads, 5.0)
        params, state = opt.step(params, grads, state)

Gradients are keyed ``"d" + key`` for every parameter ``key`` (``dWf`` for ``Wf``, ...).
Other entries of a gradient dict (``dx``, ``da0``, ``dc0``) are ignored by the optimizers
and passed through unchanged by the clipping functions.

A model's parameters are a tree (``model.params``, a list of dicts, or any nesting of
lists and dicts such as ``{"rnn": model.params, "head": head}``) and its gradients have
exactly the same structure, without the ``"d"`` prefix (``model.backward``'s ``grads``):
the optimizers and the clipping functions take those too, and every leaf of a gradient
tree counts as a parameter's. Inside, the optimizers know only this convention: a
notebook gradient dict is brought to the structure of its parameters at the public edge
(``{"dWf": ...}`` becomes ``{"Wf": ...}``), and both are flattened alike. Nothing here
mutates its inputs, so the same code runs on immutable JAX arrays, and nothing reads an
array value back to the host, so a CuPy step never synchronises.

The steps also run inside ``jax.jit`` with the state passed as an argument::

    step = jax.jit(opt.step)
    params, state = step(params, grads, state)

``state["step"]`` is a Python int; a compiled function hands it back as a 0-d integer
array, which :meth:`SGD.step` and :meth:`Adam.step` accept and keep as an array.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

from .._lib.compat import device_of, device_scope, namespace, on_input_device
from .._lib.tree import flatten, is_tree, same_structure, unflatten
from .._lib.typing import Array, Grads, Params

__all__ = ["SGD", "Adam", "clip_by_value", "clip_by_global_norm"]


# ------------------------------------------------------------------------------ helpers
def _real(name, value, *, low=None, high=None, low_open=False, high_open=True):
    """``value`` as a Python float after checking it is a finite real in the given range.

    Converting to ``float`` matters: a numpy float64 scalar would upcast float32 arrays.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def _check_mapping(name, obj):
    if not isinstance(obj, Mapping):
        raise TypeError(f"{name} must be a dict of arrays, got {type(obj).__name__}")


def _notebook_keys(params, grads):
    """The keys of a flat ``params`` dict, each checked to have its gradient ``"d" + key``
    in ``grads`` (the notebook's convention)."""
    _check_mapping("params", params)
    if not params:
        raise ValueError("params is empty")
    missing = [k for k in params if "d" + k not in grads]
    if missing:
        raise KeyError(f"grads is missing 'd{missing[0]}', the gradient of "
                       f"params[{missing[0]!r}]")
    return list(params)


def _grads_like(params, grads):
    """``grads`` in the structure of ``params``, the one convention of the optimizers.

    A tree's gradients are checked to have the tree's structure and come back as they
    are; the notebook's flat ``{"d" + key: ...}`` dict becomes ``{key: ...}`` for every key
    of ``params`` (its other entries, ``dx``, ``da0``, ``dc0``, are left out).
    """
    if is_tree(params):
        same_structure(params, grads, "params", "grads")
        return grads
    _check_mapping("params", params)
    _check_mapping("grads", grads)
    return {k: grads["d" + k] for k in _notebook_keys(params, grads)}


def _leaves(tree, name="params"):
    """The arrays of ``tree`` in a flat dict: a tree's leaves keyed by their paths
    (:mod:`xlstm._lib.tree`), a flat dict as it is. The keys are those of the optimizers'
    buffers."""
    return flatten(tree, name) if is_tree(tree) else tree


def _check_buffers(state, field, keys):
    """The ``state[field]`` dict, checked to hold one buffer per parameter key."""
    bufs = state.get(field) if isinstance(state, Mapping) else None
    if not isinstance(bufs, Mapping):
        raise TypeError(
            f"state[{field!r}] must be a dict of arrays; pass the state returned by init() "
            "or by the previous step()"
        )
    for k in keys:
        if k not in bufs:
            raise KeyError(
                f"state[{field!r}] is missing {k!r}; was the state made by init() for "
                "these params?"
            )
    return bufs


def _step_count(state):
    """``state['step']``: a non-negative Python int, or a 0-d integer array.

    The array form is what ``jax.jit`` makes of the count when the state passes through a
    compiled function; its value is not read (no host synchronisation), so it is not
    checked for sign.
    """
    if not isinstance(state, Mapping) or "step" not in state:
        raise TypeError("state must be the dict returned by init() or by the previous step()")
    t = state["step"]
    if isinstance(t, int) and not isinstance(t, bool):
        if t < 0:
            raise ValueError(f"state['step'] must be a non-negative int, got {t!r}")
        return t
    if hasattr(t, "__array_namespace__") and getattr(t, "ndim", None) == 0:
        xp = namespace(kinds={"state['step']": ("integral", "bool")}, **{"state['step']": t})
        if xp.isdtype(t.dtype, "integral"):
            return t
    raise ValueError(
        f"state['step'] must be a non-negative int or a 0-d integer array, got {t!r}"
    )


def _step(update, params, grads, state, fields):
    """One optimizer step: the arguments checked once, in one convention, then ``update``.

    ``grads`` is brought to the structure of ``params`` (:func:`_grads_like`), both are
    flattened alike (:func:`_leaves`), and ``state`` is checked to hold its step count
    and, for every parameter, a buffer of each of ``fields``. All arrays must share one
    namespace, dtype and device, and the gradients and buffers the parameters' shapes;
    a message names an array as the caller indexes it (``grads['dWf']`` in the notebook's
    dict, ``grads[0]['Wf']`` in a tree). Then ``update(xp, t, params, grads, buffers)``,
    on flat dicts with the same keys, gives the new flat parameters and the new state;
    the parameters come back in the structure of ``params``.
    """
    tree, like = is_tree(params), params
    grads = _grads_like(params, grads)
    params, grads = _leaves(params), _leaves(grads, "grads")
    t = _step_count(state)
    buffers = [_check_buffers(state, f, params) for f in fields]

    def where(k, prefix=""):  # how the caller indexes leaf k
        return k if tree else f"[{prefix + k!r}]"

    arrays = {f"params{where(k)}": p for k, p in params.items()}
    arrays.update({f"grads{where(k, 'd')}": grads[k] for k in params})
    for f, buf in zip(fields, buffers):
        arrays.update({f"state[{f!r}][{k!r}]": buf[k] for k in params})
    xp = namespace(**arrays)
    for k, p in params.items():
        others = [(f"grads{where(k, 'd')}", grads[k])]
        others += [(f"state[{f!r}][{k!r}]", buf[k]) for f, buf in zip(fields, buffers)]
        for name, a in others:
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(f"{name} has shape {tuple(a.shape)} but params{where(k)} "
                                 f"has shape {tuple(p.shape)}")
    with device_scope(next(iter(params.values()))):
        new, state = update(xp, t, params, grads, buffers)
    return (unflatten(like, new) if tree else new), state


def _zeros_like(xp, p):
    return xp.zeros(p.shape, dtype=p.dtype, device=device_of(p))


def _init_buffers(params, fields):
    """Zero buffers for the parameters (a flat dict or a tree, keyed as :func:`_leaves`
    keys them), one dict of them for each of ``fields``."""
    params = _leaves(params)
    _check_mapping("params", params)
    if not params:
        raise ValueError("params is empty")
    xp = namespace(**{f"params[{k!r}]": v for k, v in params.items()})
    return {f: {k: _zeros_like(xp, p) for k, p in params.items()} for f in fields}


# ---------------------------------------------------------------------------- optimizers
class _Optimizer:
    """What the optimizers share: :meth:`step`, which checks its arguments once
    (:func:`_step`) and hands them, as flat dicts with the same keys, to the subclass's
    ``_update(xp, t, params, grads, buffers) -> (new_params, new_state)``; the state's
    buffers are those named by its ``_fields``."""

    @on_input_device
    def step(
        self, params: Params, grads: Grads, state: Mapping[str, Any]
    ) -> tuple[dict[str, Array], dict[str, Any]]:
        """Apply one update and return ``(new_params, new_state)``.

        Parameters
        ----------
        params : dict of arrays, or a tree of them
            Current parameters.
        grads : dict of arrays, or a tree of them
            Gradients keyed ``"d" + key`` for every key of ``params``; other entries are
            ignored. For a tree of parameters, gradients of exactly the same structure.
        state : dict
            The state from :meth:`init` or from the previous :meth:`step`. Its ``"step"``
            is a non-negative Python int or a 0-d integer array (as ``jax.jit`` returns it;
            the new count is then an array too).

        Returns
        -------
        new_params : dict of arrays, or a tree of them
            Updated parameters (new arrays, same keys or structure, namespace, dtype and
            device).
        new_state : dict
            The next state, with ``step`` increased by one. Neither ``params``, ``grads``
            nor ``state`` is modified.

        Raises
        ------
        KeyError
            If ``grads`` lacks the gradient of a parameter (the message names it) or the
            state lacks a buffer (SGD's velocity, Adam's moments).
        TypeError, ValueError
            For mixed namespaces, dtypes or devices, or mismatched shapes.
        """
        return _step(self._update, params, grads, state, self._fields)


# ---------------------------------------------------------------------------------- SGD
class SGD(_Optimizer):
    """Stochastic gradient descent, optionally with (Nesterov) momentum.

    The update is that of ``torch.optim.SGD`` without dampening or weight decay. With
    gradient ``g`` and velocity ``v`` (zero at the start)::

        v <- momentum * v + g
        p <- p - lr * (g + momentum * v)   if nesterov
        p <- p - lr * v                    otherwise

    With ``momentum=0`` this is plain ``p <- p - lr * g`` and no velocity is kept.

    Parameters
    ----------
    lr : float
        Learning rate, > 0.
    momentum : float, optional
        Momentum factor in ``[0, 1)``. Default 0.
    nesterov : bool, optional
        Use Nesterov momentum (needs ``momentum > 0``). Default False.

    Raises
    ------
    ValueError
        If a hyperparameter is out of range; the message names it.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> params = {"w": np.array([1.0, -2.0])}
    >>> opt = xlstm.SGD(lr=0.5, momentum=0.5)
    >>> state = opt.init(params)
    >>> params, state = opt.step(params, {"dw": np.array([1.0, 2.0])}, state)
    >>> params["w"], state["step"]  # p - lr * g on the first step
    (array([ 0.5, -3. ]), 1)
    >>> params, state = opt.step(params, {"dw": np.array([1.0, 2.0])}, state)
    >>> params["w"], state["velocity"]["w"]  # v = 0.5 v + g
    (array([-0.25, -4.5 ]), array([1.5, 3. ]))
    """

    def __init__(self, lr: float, momentum: float = 0.0, nesterov: bool = False) -> None:
        self.lr = _real("lr", lr, low=0.0, low_open=True)
        self.momentum = _real("momentum", momentum, low=0.0, high=1.0)
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov must be a bool, got {nesterov!r}")
        if nesterov and self.momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.nesterov = nesterov

    def __repr__(self) -> str:
        return f"SGD(lr={self.lr!r}, momentum={self.momentum!r}, nesterov={self.nesterov!r})"

    @on_input_device
    def init(self, params: Params) -> dict[str, Any]:
        """Return the initial state for ``params``.

        Parameters
        ----------
        params : dict of arrays, or a tree of them
            The parameters to optimise (any keys; usually the seed's ``Wf, bf, ..., by``).

        Returns
        -------
        dict
            ``{"step": 0, "velocity": {key: zeros}}``; the velocity buffers have each
            parameter's shape, dtype and device. With ``momentum=0`` the velocity dict is
            empty.
        """
        return {"step": 0, "velocity": {}, **_init_buffers(params, self._fields)}

    @property
    def _fields(self):  # the state's buffers: none without momentum
        return ("velocity",) if self.momentum != 0.0 else ()

    def _update(self, xp, t, params, grads, buffers):
        """:meth:`step` on checked flat dicts with the same keys (:func:`_step`)."""
        mu, lr = self.momentum, self.lr
        new_params, new_vel = {}, {}
        for k, p in params.items():
            g = grads[k]
            if mu == 0.0:
                new_params[k] = p - lr * g
                continue
            v = mu * buffers[0][k] + g
            new_vel[k] = v
            d = g + mu * v if self.nesterov else v
            new_params[k] = p - lr * d
        return new_params, {"step": t + 1, "velocity": new_vel}


# --------------------------------------------------------------------------------- Adam
class Adam(_Optimizer):
    """Adam (Kingma and Ba, 2015) with bias correction.

    With gradient ``g`` at step ``t`` (counting from 1) and moments ``m``, ``v`` (zero at
    the start)::

        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g**2
        p <- p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    which is the update of ``torch.optim.Adam`` (no weight decay, no amsgrad) and the
    course's ``m_corrected / (sqrt(v_corrected) + eps)`` form, arranged so that the bias
    corrections are Python floats.

    Parameters
    ----------
    lr : float, optional
        Learning rate, > 0. Default 1e-3.
    beta1, beta2 : float, optional
        Decay rates of the first and second moment estimates, in ``[0, 1)``.
        Defaults 0.9 and 0.999.
    eps : float, optional
        Added to the denominator, > 0 (with 0 a zero gradient gives 0 / 0 = NaN).
        Default 1e-8.

    Raises
    ------
    ValueError
        If a hyperparameter is out of range; the message names it.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> params = {"w": np.array([1.0, -2.0])}
    >>> opt = xlstm.Adam(lr=0.01)
    >>> state = opt.init(params)
    >>> params, state = opt.step(params, {"dw": np.array([0.5, -30.0])}, state)
    >>> np.round(params["w"], 6), state["step"]  # the first step: lr * sign(g)
    (array([ 0.99, -1.99]), 1)
    """

    def __init__(
        self, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8
    ) -> None:
        self.lr = _real("lr", lr, low=0.0, low_open=True)
        self.beta1 = _real("beta1", beta1, low=0.0, high=1.0)
        self.beta2 = _real("beta2", beta2, low=0.0, high=1.0)
        self.eps = _real("eps", eps, low=0.0, low_open=True)

    def __repr__(self) -> str:
        return (
            f"Adam(lr={self.lr!r}, beta1={self.beta1!r}, beta2={self.beta2!r}, "
            f"eps={self.eps!r})"
        )

    @on_input_device
    def init(self, params: Params) -> dict[str, Any]:
        """Return the initial state for ``params``.

        Parameters
        ----------
        params : dict of arrays, or a tree of them
            The parameters to optimise.

        Returns
        -------
        dict
            ``{"step": 0, "m": {key: zeros}, "v": {key: zeros}}``: the step count (a
            Python int; a 0-d integer array once a compiled function returned it) and the
            first and second moment estimates, each with its parameter's shape, dtype and
            device.
        """
        return {"step": 0, **_init_buffers(params, self._fields)}

    _fields = ("m", "v")  # the state's buffers

    def _update(self, xp, t, params, grads, buffers):
        """:meth:`step` on checked flat dicts with the same keys (:func:`_step`)."""
        t = t + 1
        m_buf, v_buf = buffers
        b1, b2 = self.beta1, self.beta2
        if isinstance(t, int):
            step_size = self.lr / (1.0 - b1**t)  # Python floats: no upcast, no device work
            inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - b2**t)
        else:  # a 0-d array count (under jax.jit): the same, as 0-d arrays of the params' dtype
            tf = xp.astype(t, next(iter(params.values())).dtype)
            step_size = self.lr / (1.0 - b1**tf)
            inv_sqrt_bc2 = 1.0 / xp.sqrt(1.0 - b2**tf)
        new_params, new_m, new_v = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            m = b1 * m_buf[k] + (1.0 - b1) * g
            v = b2 * v_buf[k] + (1.0 - b2) * (g * g)
            new_m[k], new_v[k] = m, v
            new_params[k] = p - step_size * (m / (xp.sqrt(v) * inv_sqrt_bc2 + self.eps))
        return new_params, {"step": t, "m": new_m, "v": new_v}


# ----------------------------------------------------------------------------- clipping
def _to_clip(grads, params):
    """``(flat, keys, rebuild)``: the gradients as a flat dict, the keys of those to clip,
    and the function that puts a flat result back into the structure of ``grads``.

    Every leaf of a tree is a parameter's. In the notebook's flat dict the parameters'
    gradients are the ``"d" + key`` entry of every key of ``params`` (exactly what the
    optimizers step), or without ``params`` those keyed ``dW*`` or ``db*``.
    """
    if is_tree(grads):
        flat = flatten(grads, "grads")
        return flat, list(flat), functools.partial(unflatten, grads)
    _check_mapping("grads", grads)
    if params is not None:
        keys = ["d" + k for k in _notebook_keys(params, grads)]
    else:
        keys = [k for k in grads if isinstance(k, str) and k[:2] in ("dW", "db")]
        if not keys:
            raise ValueError(
                "grads holds no parameter gradients (keys starting with 'dW' or 'db'); "
                f"got keys {sorted(map(str, grads))}"
            )
    return grads, keys, _as_it_is


def _as_it_is(out):
    return out


@on_input_device
def clip_by_value(grads: Grads, max_value: float, *, params: Params | None = None) -> Grads:
    """Clip every parameter gradient elementwise to ``[-max_value, max_value]``.

    This is the course's ``clip`` for exploding gradients in the character-level model.

    Parameters
    ----------
    grads : dict of arrays
        Gradients; the parameters' entries are clipped (see ``params``), any other entry
        (``dx``, ``da0``, ``dc0``, ...) is passed through unchanged. For a tree (a
        model's gradients) every leaf is clipped.
    max_value : float
        Positive bound.
    params : dict of arrays, optional
        The parameters the gradients are for: the ``"d" + key`` entry of each of their
        keys is clipped, exactly what :class:`SGD` and :class:`Adam` step (``{"emb",
        "Wy"}`` clips ``demb`` and ``dWy``). Default: the entries whose key starts with
        ``dW`` or ``db`` (the notebook's parameters).

    Returns
    -------
    dict
        A new dict with the same keys, in the same order; ``grads`` is not modified.

    Raises
    ------
    ValueError
        If ``max_value`` is not a positive finite number, or ``grads`` holds no parameter
        gradient.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> grads = {"dWy": np.array([[-3.0, 0.5, 7.0]]), "dx": np.array([10.0])}
    >>> clipped = xlstm.clip_by_value(grads, 1.0)
    >>> clipped["dWy"], clipped["dx"]  # dx is not a parameter's gradient
    (array([[-1. ,  0.5,  1. ]]), array([10.]))
    """
    bound = _real("max_value", max_value, low=0.0, low_open=True)
    flat, keys, rebuild = _to_clip(grads, params)
    return rebuild(_clip_value(flat, keys, bound))


def _clip_value(grads, keys, bound):
    xp = namespace(**{f"grads[{k!r}]": grads[k] for k in keys})
    clip = getattr(xp, "clip", None)
    out = dict(grads)
    for k in keys:
        g = grads[k]
        if clip is not None:
            out[k] = clip(g, -bound, bound)
        else:  # older namespaces: the same thing from minimum/maximum with 0-d bounds
            hi = xp.asarray(bound, dtype=g.dtype, device=device_of(g))
            out[k] = xp.maximum(xp.minimum(g, hi), -hi)
    return out


@on_input_device
def clip_by_global_norm(grads: Grads, max_norm: float, *, params: Params | None = None,
                        ) -> tuple[Grads, Array]:
    """Scale all parameter gradients together so that their joint L2 norm is at most ``max_norm``.

    With ``norm`` the L2 norm of every parameter gradient taken together (the ``"d" +
    key`` entries of ``params``, or by default every ``dW*``, ``db*`` entry), every
    parameter gradient is multiplied by ``min(1, max_norm / norm)``. When the norm is
    already at most ``max_norm`` the scale is exactly 1 and the gradients come back equal
    to the input.

    The norm is computed without overflow or underflow, as ``g_max * sqrt(sum((g /
    g_max)**2))`` with ``g_max`` the largest magnitude of any entry, so the scaling is
    right for every finite input, however large (float32 gradients near 1e38 included).
    Half-precision gradients are reduced in float32. Everything stays on the device: no
    value is read back to the host.

    Parameters
    ----------
    grads : dict of arrays
        Gradients; the parameters' entries are scaled (see ``params``), any other entry
        (``dx``, ``da0``, ``dc0``, ...) is passed through unchanged. For a tree (a model's
        gradients) every leaf is scaled.
    max_norm : float
        Positive bound on the global norm.
    params : dict of arrays, optional
        The parameters the gradients are for: the norm is that of the ``"d" + key``
        entries of all their keys, exactly what :class:`SGD` and :class:`Adam` step, as
        torch's ``clip_grad_norm_`` over a module's parameters. Default: the entries
        whose key starts with ``dW`` or ``db`` (the notebook's parameters).

    Returns
    -------
    clipped : dict
        A new dict with the same keys, in the same order; ``grads`` is not modified.
    norm : array
        0-d array, the global norm *before* clipping, in the gradients' namespace, dtype
        (float32 for half-precision gradients) and device. It is ``inf`` or ``nan`` when a
        gradient holds ``inf`` or ``nan`` (see Notes), and ``inf`` when the norm itself
        exceeds the largest number of its dtype.

    Raises
    ------
    ValueError
        If ``max_norm`` is not a positive finite number, or ``grads`` holds no parameter
        gradient.
    KeyError
        If ``grads`` lacks the gradient of a key of ``params``.

    Notes
    -----
    Non-finite gradients. When any parameter gradient holds ``inf`` or ``nan`` there is no
    meaningful scale: the gradients are returned unscaled (never silently zeroed or
    turned into ``nan``) and the returned ``norm`` is not finite. :func:`xlstm.fit`
    checks it and raises ``FloatingPointError`` naming the step.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> grads = {"dWy": np.array([[3.0, 0.0]]), "dby": np.array([[4.0]])}  # norm 5
    >>> clipped, norm = xlstm.clip_by_global_norm(grads, 1.0)
    >>> float(norm), np.round(clipped["dWy"], 6), np.round(clipped["dby"], 6)
    (5.0, array([[0.6, 0. ]]), array([[0.8]]))
    >>> clipped, norm = xlstm.clip_by_global_norm(grads, 10.0)  # already within the bound
    >>> bool(np.array_equal(clipped["dWy"], grads["dWy"]))
    True
    """
    bound = _real("max_norm", max_norm, low=0.0, low_open=True)
    flat, keys, rebuild = _to_clip(grads, params)
    out, norm = _clip_norm(flat, keys, bound)
    return rebuild(out), norm


def _clip_norm(grads, keys, bound):
    xp = namespace(**{f"grads[{k!r}]": grads[k] for k in keys})
    dtype = grads[keys[0]].dtype
    dev = device_of(grads[keys[0]])
    work = _widest_float(xp, dev)
    wide = [xp.astype(grads[k], work, copy=False) for k in keys]
    g_max = None
    for g in wide:
        top = xp.max(xp.abs(g)) if g.size else xp.zeros((), dtype=work, device=dev)
        g_max = top if g_max is None else xp.maximum(g_max, top)
    one = xp.ones((), dtype=work, device=dev)
    finite = xp.isfinite(g_max)
    usable = finite & (g_max > 0.0)
    unit = xp.where(usable, g_max, one)  # 1 where all are zero or some are not finite
    total = None
    for g in wide:
        r = g / unit  # |r| <= 1: no overflow, and the largest entry contributes exactly 1
        sq = xp.sum(r * r)
        total = sq if total is None else total + sq
    root = xp.where(usable, xp.sqrt(total), one)  # >= 1 wherever usable
    big = float(xp.finfo(work).max)
    inf = xp.asarray(float("inf"), dtype=work, device=dev)
    over = unit > big / root  # the norm itself is beyond the dtype's range
    norm = xp.where(over, inf, unit * xp.where(over, one, root))
    norm = xp.where(usable, norm, g_max)  # 0 when all are 0; inf or nan passes through
    # Clip iff unit * root > bound, i.e. unit > bound / root; the ratio is then < 1, and
    # the denominator is swapped for a harmless one where no clipping happens, so that
    # nothing overflows or divides by zero in either branch.
    limit = min(bound, big) / root
    clip = usable & (unit > limit)
    scale = limit / xp.where(clip, unit, limit)
    out = dict(grads)
    for k, g in zip(keys, wide):
        out[k] = grads[k] * scale if work == dtype else xp.astype(g * scale, dtype)
    norm_dtype = dtype if dtype in (xp.float32, xp.float64) else xp.float32
    if norm_dtype != work:  # beyond the range of the result's dtype: inf, with no warning
        norm = xp.astype(xp.where(norm > float(xp.finfo(norm_dtype).max), inf, norm), norm_dtype)
    return out, norm


def _widest_float(xp, device):
    """float64 where the namespace and device have it (not JAX without x64), else float32.

    The global norm is reduced in it: float32 and half-precision gradients then neither
    overflow nor underflow, and no reciprocal of a huge number is flushed to zero (XLA
    divides by multiplying with the reciprocal).
    """
    try:
        have = xp.__array_namespace_info__().dtypes(device=device, kind="real floating")
    except Exception:  # noqa: BLE001 - an older namespace without the inspection API
        return xp.float64
    return have.get("float64", xp.float32)
