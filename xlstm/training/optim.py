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
tree counts as a parameter's. Nothing here mutates its inputs, so
the same code runs on immutable JAX arrays, and nothing reads an array value back to the
host, so a CuPy step never synchronises.

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

from .._lib.compat import device_of, namespace, on_input_device
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


def _check_step_args(params, grads):
    """Validate ``params``/``grads`` and return the parameter keys in ``params``' order."""
    _check_mapping("params", params)
    _check_mapping("grads", grads)
    keys = tuple(params)
    if not keys:
        raise ValueError("params is empty")
    for k in keys:
        if "d" + k not in grads:
            raise KeyError(f"grads is missing 'd{k}', the gradient of params[{k!r}]")
    return keys


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


def _check_shapes(keys, params, others):
    """Each ``others`` entry ``(label, dict, prefix)`` must match ``params``' shapes."""
    for k in keys:
        want = tuple(params[k].shape)
        for label, d, prefix in others:
            got = tuple(d[prefix + k].shape)
            if got != want:
                raise ValueError(
                    f"{label}[{prefix + k!r}] has shape {got} but params[{k!r}] has shape {want}"
                )


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


def _on_trees_init(init):
    """Let ``init`` take a tree of parameters (a model's list of dicts): its buffers are
    then keyed by each leaf's path (:mod:`xlstm._lib.tree`)."""

    @functools.wraps(init)
    def wrapper(self, params):
        return init(self, flatten(params) if is_tree(params) else params)

    return wrapper


def _on_trees_step(step):
    """Let ``step`` take a tree of parameters with gradients of the same structure (what a
    model's ``backward`` returns, unprefixed): it runs on the flattened tree and returns
    the new parameters in the tree's structure."""

    @functools.wraps(step)
    def wrapper(self, params, grads, state):
        if not is_tree(params):
            return step(self, params, grads, state)
        same_structure(params, grads, "params", "grads")
        flat = flatten(params)
        grads = {"d" + k: v for k, v in flatten(grads, "grads").items()}
        new, state = step(self, flat, grads, state)
        return unflatten(params, new), state

    return wrapper


def _zeros_like(xp, p):
    return xp.zeros(p.shape, dtype=p.dtype, device=device_of(p))


def _init_buffers(params, fields):
    _check_mapping("params", params)
    if not params:
        raise ValueError("params is empty")
    xp = namespace(**{f"params[{k!r}]": v for k, v in params.items()})
    return {f: {k: _zeros_like(xp, p) for k, p in params.items()} for f in fields}


# ---------------------------------------------------------------------------------- SGD
class SGD:
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
    @_on_trees_init
    def init(self, params: Params) -> dict[str, Any]:
        """Return the initial state for ``params``.

        Parameters
        ----------
        params : dict of arrays
            The parameters to optimise (any keys; usually the seed's ``Wf, bf, ..., by``).

        Returns
        -------
        dict
            ``{"step": 0, "velocity": {key: zeros}}``; the velocity buffers have each
            parameter's shape, dtype and device. With ``momentum=0`` the velocity dict is
            empty.
        """
        if self.momentum == 0.0:
            return {"step": 0, **_init_buffers(params, ()), "velocity": {}}
        return {"step": 0, **_init_buffers(params, ("velocity",))}

    @_on_trees_step
    @on_input_device
    def step(
        self, params: Params, grads: Grads, state: Mapping[str, Any]
    ) -> tuple[dict[str, Array], dict[str, Any]]:
        """Apply one update and return ``(new_params, new_state)``.

        Parameters
        ----------
        params : dict of arrays
            Current parameters.
        grads : dict of arrays
            Gradients keyed ``"d" + key`` for every key of ``params``; other entries are
            ignored.
        state : dict
            The state from :meth:`init` or from the previous :meth:`step`. Its ``"step"``
            is a non-negative Python int or a 0-d integer array (as ``jax.jit`` returns it;
            the new count is then an array too).

        Returns
        -------
        new_params : dict of arrays
            Updated parameters (new arrays, same keys, namespace, dtype and device).
        new_state : dict
            The next state. Neither ``params``, ``grads`` nor ``state`` is modified.

        Raises
        ------
        KeyError
            If ``grads`` lacks the gradient of a parameter (the message names it) or the
            state lacks a buffer.
        TypeError, ValueError
            For mixed namespaces, dtypes or devices, or mismatched shapes.
        """
        keys = _check_step_args(params, grads)
        t = _step_count(state)
        mu = self.momentum
        arrays = {f"params[{k!r}]": params[k] for k in keys}
        arrays.update({f"grads['d{k}']": grads["d" + k] for k in keys})
        checks = [("grads", grads, "d")]
        if mu != 0.0:
            vel = _check_buffers(state, "velocity", keys)
            arrays.update({f"state['velocity'][{k!r}]": vel[k] for k in keys})
            checks.append(("state['velocity']", vel, ""))
        namespace(**arrays)
        _check_shapes(keys, params, checks)

        lr = self.lr
        new_params, new_vel = {}, {}
        for k in keys:
            g = grads["d" + k]
            if mu == 0.0:
                new_params[k] = params[k] - lr * g
                continue
            v = mu * vel[k] + g
            new_vel[k] = v
            d = g + mu * v if self.nesterov else v
            new_params[k] = params[k] - lr * d
        return new_params, {"step": t + 1, "velocity": new_vel}


# --------------------------------------------------------------------------------- Adam
class Adam:
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
    @_on_trees_init
    def init(self, params: Params) -> dict[str, Any]:
        """Return the initial state for ``params``.

        Parameters
        ----------
        params : dict of arrays
            The parameters to optimise.

        Returns
        -------
        dict
            ``{"step": 0, "m": {key: zeros}, "v": {key: zeros}}``: the step count (a
            Python int; a 0-d integer array once a compiled function returned it) and the
            first and second moment estimates, each with its parameter's shape, dtype and
            device.
        """
        return {"step": 0, **_init_buffers(params, ("m", "v"))}

    @_on_trees_step
    @on_input_device
    def step(
        self, params: Params, grads: Grads, state: Mapping[str, Any]
    ) -> tuple[dict[str, Array], dict[str, Any]]:
        """Apply one update and return ``(new_params, new_state)``.

        Parameters
        ----------
        params : dict of arrays
            Current parameters.
        grads : dict of arrays
            Gradients keyed ``"d" + key`` for every key of ``params``; other entries are
            ignored.
        state : dict
            The state from :meth:`init` or from the previous :meth:`step`. Its ``"step"``
            is a non-negative Python int or a 0-d integer array (as ``jax.jit`` returns it;
            the new count is then an array too).

        Returns
        -------
        new_params : dict of arrays
            Updated parameters (new arrays, same keys, namespace, dtype and device).
        new_state : dict
            The next state, with ``step`` increased by one. Neither ``params``, ``grads``
            nor ``state`` is modified.

        Raises
        ------
        KeyError
            If ``grads`` lacks the gradient of a parameter (the message names it) or the
            state lacks a moment buffer.
        TypeError, ValueError
            For mixed namespaces, dtypes or devices, or mismatched shapes.
        """
        keys = _check_step_args(params, grads)
        t = _step_count(state) + 1
        m_buf = _check_buffers(state, "m", keys)
        v_buf = _check_buffers(state, "v", keys)
        arrays = {f"params[{k!r}]": params[k] for k in keys}
        arrays.update({f"grads['d{k}']": grads["d" + k] for k in keys})
        arrays.update({f"state['m'][{k!r}]": m_buf[k] for k in keys})
        arrays.update({f"state['v'][{k!r}]": v_buf[k] for k in keys})
        xp = namespace(**arrays)
        _check_shapes(
            keys,
            params,
            [("grads", grads, "d"), ("state['m']", m_buf, ""), ("state['v']", v_buf, "")],
        )

        b1, b2 = self.beta1, self.beta2
        if isinstance(t, int):
            step_size = self.lr / (1.0 - b1**t)  # Python floats: no upcast, no device work
            inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - b2**t)
        else:  # a 0-d array count (under jax.jit): the same, as 0-d arrays of the params' dtype
            tf = xp.astype(t, params[keys[0]].dtype)
            step_size = self.lr / (1.0 - b1**tf)
            inv_sqrt_bc2 = 1.0 / xp.sqrt(1.0 - b2**tf)
        new_params, new_m, new_v = {}, {}, {}
        for k in keys:
            g = grads["d" + k]
            m = b1 * m_buf[k] + (1.0 - b1) * g
            v = b2 * v_buf[k] + (1.0 - b2) * (g * g)
            new_m[k], new_v[k] = m, v
            new_params[k] = params[k] - step_size * (m / (xp.sqrt(v) * inv_sqrt_bc2 + self.eps))
        return new_params, {"step": t, "m": new_m, "v": new_v}


# ----------------------------------------------------------------------------- clipping
def _param_grad_keys(grads, params=None):
    """Keys of the parameter gradients in ``grads``: ``"d" + key`` for every key of
    ``params`` (exactly what the optimizers step), or without ``params`` those that
    start with ``dW`` or ``db`` (the notebook's parameters)."""
    _check_mapping("grads", grads)
    if params is not None:
        _check_mapping("params", params)
        if not params:
            raise ValueError("params is empty")
        missing = [k for k in params if "d" + k not in grads]
        if missing:
            raise KeyError(f"grads is missing 'd{missing[0]}', the gradient of "
                           f"params[{missing[0]!r}]")
        return ["d" + k for k in params]
    keys = [k for k in grads if isinstance(k, str) and k[:2] in ("dW", "db")]
    if not keys:
        raise ValueError(
            "grads holds no parameter gradients (keys starting with 'dW' or 'db'); "
            f"got keys {sorted(map(str, grads))}"
        )
    return keys


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
    """
    bound = _real("max_value", max_value, low=0.0, low_open=True)
    if is_tree(grads):  # a model's gradients: every leaf is a parameter's
        flat = flatten(grads, "grads")
        return unflatten(grads, _clip_value(flat, list(flat), bound))
    return _clip_value(grads, _param_grad_keys(grads, params), bound)


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
    """
    bound = _real("max_norm", max_norm, low=0.0, low_open=True)
    if is_tree(grads):  # a model's gradients: every leaf is a parameter's
        flat = flatten(grads, "grads")
        out, norm = _clip_norm(flat, list(flat), bound)
        return unflatten(grads, out), norm
    return _clip_norm(grads, _param_grad_keys(grads, params), bound)


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
