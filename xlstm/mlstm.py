"""The mLSTM of xLSTM (Beck et al. 2024): a matrix memory per head, in three forms that
agree, each with a backward pass written by hand.

Per head, with ``q``, ``k`` (already divided by ``sqrt(d_qk)``), ``v`` and the gate
pre-activations ``i~``, ``f~`` of every step::

    C_t = f_t C_{t-1} + i_t v_t k_t^T,   n_t = f_t n_{t-1} + i_t k_t
    h~_t = C_t q_t / max(|n_t . q_t|, 1),  i_t = exp(i~_t),  f_t = sigmoid(f~_t)

computed only through a stabiliser ``m`` (the memory is kept divided by ``exp(m)``, and the
floor 1 becomes ``exp(-m)``). ``h~`` does not depend on ``m``, so ``m`` gets no gradient, and
every form may pick its own: the three forms agree to rounding, forward and backward.

* :func:`recurrent_forward` / :func:`recurrent_backward`: one step at a time, ``m_t =
  max(logsigmoid(f~_t) + m_{t-1}, i~_t)``; for streaming and inference with state.
* :func:`parallel_forward` / :func:`parallel_backward`: all steps at once, a ``T x T``
  matrix of decays per head (``log D_ts = F_t - F_s + i~_s``, ``F`` the cumulative
  ``logsigmoid(f~)``), each row stabilised by its own maximum; for short sequences.
* :func:`chunkwise_forward` / :func:`chunkwise_backward`: the parallel form within chunks of
  ``chunk`` steps, the state carried from chunk to chunk; memory ``T chunk`` instead of
  ``T^2`` per head.

All take arrays of one namespace in the layout ``(B, H, T, d)`` (``q``, ``k``: ``d_qk``;
``v``: ``d_v``) and ``(B, H, T)`` (``i~``, ``f~``), and a state ``(C, n, m)`` of shapes
``(B, H, d_v, d_qk)``, ``(B, H, d_qk)``, ``(B, H)``. Where ``n`` of the given state is zero
the memory is empty: its ``m`` is taken as ``-inf`` (:func:`empty_as_minus_inf`), so the
first step starts it afresh. A forward pass returns ``(h~, final state, cache)``; a backward
pass takes ``dh~``, the cache and the gradients on the final ``C`` and ``n`` (or ``None``)
and returns the gradients of ``q, k, v, i~, f~, C_0, n_0``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._compat import device_of as _device
from ._typing import Array

__all__ = ["FORMS", "MLSTM", "MLSTMCache", "recurrent_forward", "recurrent_backward",
           "parallel_forward",
           "parallel_backward", "chunkwise_forward", "chunkwise_backward", "empty_as_minus_inf",
           "logsigmoid"]

#: The forms, by name.
FORMS = ("recurrent", "parallel", "chunkwise")


def logsigmoid(xp, x):
    """``log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|))``, finite for every finite ``x``."""
    return xp.minimum(x, xp.zeros_like(x)) - xp.log1p(xp.exp(-xp.abs(x)))


def _sigmoid_neg(xp, x, lsf):
    """``sigmoid(-x) = exp(logsigmoid(x) - x)``, the slope of ``logsigmoid`` at ``x``."""
    return xp.exp(lsf - x)


def empty_as_minus_inf(xp, n, m):
    """``m`` with ``-inf`` where the memory is empty (``n`` zero over ``d_qk``)."""
    empty = xp.all(n == 0, axis=-1)
    return xp.where(empty, xp.full_like(m, -float("inf")), m)


def _floor(xp, m):
    """The floor 1 of the denominator in the stabilised scale, ``exp(-m)``, its exponent
    capped one below the largest finite one: where ``exp(-m)`` would overflow (every gate
    far below zero), ``h~`` is then ``num / ~1e38`` (float32) instead of the exact
    ``num / inf = 0``, a difference below the smallest normal number, and nothing
    overflows."""
    import math

    cap = math.log(float(xp.finfo(m.dtype).max)) - 1.0
    return xp.exp(xp.minimum(-m, xp.full_like(m, cap)))


def _outer(a, b):
    """``a b^T`` over the last axis: ``(..., p)`` and ``(..., r)`` -> ``(..., p, r)``."""
    return a[..., :, None] * b[..., None, :]


def _floor_grad(xp, dh, h, den, s, floor):
    """The gradients of ``h = num / max(|s|, floor)`` on ``num`` and on ``s`` (the floor,
    a function of the stabiliser only, held constant): ``(dnum, ds)``."""
    dnum = dh / den[..., None]
    dden = -xp.sum(dh * h, axis=-1) / den
    above = xp.abs(s) >= floor
    ds = xp.where(above, dden * xp.sign(s), xp.zeros_like(dden))
    return dnum, ds


# -------------------------------------------------------------------- recurrent form
def recurrent_forward(xp, q, k, v, ig, fg, state):
    """The recurrent form: one step at a time (see the module)."""
    C, n, m = state
    m = empty_as_minus_inf(xp, n, m)
    T = q.shape[2]
    lsf = logsigmoid(xp, fg)
    Cs, ns, gates, hs, ss, dens, floors = [C], [n], [], [], [], [], []
    for t in range(T):
        m_t = xp.maximum(lsf[..., t] + m, ig[..., t])
        ip = xp.exp(ig[..., t] - m_t)
        fp = xp.exp(lsf[..., t] + m - m_t)
        C = fp[..., None, None] * C + ip[..., None, None] * _outer(v[..., t, :], k[..., t, :])
        n = fp[..., None] * n + ip[..., None] * k[..., t, :]
        q_t = q[..., t, :]
        num = xp.sum(C * q_t[..., None, :], axis=-1)
        s = xp.sum(n * q_t, axis=-1)
        floor = _floor(xp, m_t)
        den = xp.maximum(xp.abs(s), floor)
        h = num / den[..., None]
        m = m_t
        Cs.append(C)
        ns.append(n)
        gates.append((ip, fp))
        hs.append(h)
        ss.append(s)
        dens.append(den)
        floors.append(floor)
    cache = (q, k, v, fg, lsf, Cs, ns, gates, hs, ss, dens, floors)
    return xp.stack(hs, axis=2), (C, n, m), cache


def recurrent_backward(xp, dh, cache, dC=None, dn=None):
    """The gradients of :func:`recurrent_forward`: ``(dq, dk, dv, dig, dfg, dC0, dn0)``."""
    q, k, v, fg, lsf, Cs, ns, gates, hs, ss, dens, floors = cache
    T = q.shape[2]
    dC = xp.zeros_like(Cs[0]) if dC is None else dC
    dn = xp.zeros_like(ns[0]) if dn is None else dn
    dq, dk, dv, dig, dlsf = [None] * T, [None] * T, [None] * T, [None] * T, [None] * T
    for t in range(T - 1, -1, -1):
        ip, fp = gates[t]
        q_t, k_t, v_t = q[..., t, :], k[..., t, :], v[..., t, :]
        dnum, ds = _floor_grad(xp, dh[..., t, :], hs[t], dens[t], ss[t], floors[t])
        dC = dC + _outer(dnum, q_t)
        dn = dn + ds[..., None] * q_t
        dq[t] = xp.sum(Cs[t + 1] * dnum[..., :, None], axis=-2) + ds[..., None] * ns[t + 1]
        dfp = xp.sum(dC * Cs[t], axis=(-2, -1)) + xp.sum(dn * ns[t], axis=-1)
        dCk = xp.sum(dC * k_t[..., None, :], axis=-1)  # dC k: (B, H, d_v)
        dip = xp.sum(dCk * v_t, axis=-1) + xp.sum(dn * k_t, axis=-1)
        dv[t] = ip[..., None] * dCk
        dk[t] = ip[..., None] * (xp.sum(dC * v_t[..., :, None], axis=-2) + dn)
        dig[t] = dip * ip
        dlsf[t] = dfp * fp
        dC = fp[..., None, None] * dC
        dn = fp[..., None] * dn
    dfg = xp.stack(dlsf, axis=-1) * _sigmoid_neg(xp, fg, lsf)
    return (xp.stack(dq, axis=2), xp.stack(dk, axis=2), xp.stack(dv, axis=2),
            xp.stack(dig, axis=-1), dfg, dC, dn)


# --------------------------------------------------------------------- parallel form
def parallel_forward(xp, q, k, v, ig, fg, state):
    """The parallel form: all steps of every head at once, from ``state`` (see the module)."""
    C0, n0, m0 = state
    m0 = empty_as_minus_inf(xp, n0, m0)
    T = q.shape[2]
    lsf = logsigmoid(xp, fg)
    F = xp.cumulative_sum(lsf, axis=-1)
    idx = xp.arange(T, device=_device(q))
    causal = idx[:, None] >= idx[None, :]
    logD = F[..., :, None] - F[..., None, :] + ig[..., None, :]
    logD = xp.where(causal, logD, xp.full_like(logD, -float("inf")))
    logg = F + m0[..., None]
    mrow = xp.maximum(xp.max(logD, axis=-1), logg)
    Dp = xp.exp(logD - mrow[..., None])
    g = xp.exp(logg - mrow)
    P = q @ xp.matrix_transpose(k)
    S = P * Dp
    num = S @ v + g[..., None] * (q @ xp.matrix_transpose(C0))
    s = xp.sum(S, axis=-1) + g * xp.sum(q * n0[..., None, :], axis=-1)
    floor = _floor(xp, mrow)
    den = xp.maximum(xp.abs(s), floor)
    h = num / den[..., None]
    last, g_T = Dp[..., -1, :], g[..., -1]
    C_T = xp.matrix_transpose(v * last[..., None]) @ k + g_T[..., None, None] * C0
    n_T = xp.sum(k * last[..., None], axis=-2) + g_T[..., None] * n0
    cache = (q, k, v, fg, lsf, C0, n0, causal, Dp, g, P, S, h, s, den, floor)
    return h, (C_T, n_T, mrow[..., -1]), cache


def parallel_backward(xp, dh, cache, dC=None, dn=None):
    """The gradients of :func:`parallel_forward`: ``(dq, dk, dv, dig, dfg, dC0, dn0)``."""
    q, k, v, fg, lsf, C0, n0, causal, Dp, g, P, S, h, s, den, floor = cache
    dnum, ds = _floor_grad(xp, dh, h, den, s, floor)
    # num = S v + g (q C0^T), s = S 1 + g (q . n0)
    dS = dnum @ xp.matrix_transpose(v) + ds[..., None]
    dv = xp.matrix_transpose(S) @ dnum
    qC0 = q @ xp.matrix_transpose(C0)
    qn0 = xp.sum(q * n0[..., None, :], axis=-1)
    dg = xp.sum(dnum * qC0, axis=-1) + ds * qn0
    gdnum = g[..., None] * dnum
    dq = gdnum @ C0 + (g * ds)[..., None] * n0[..., None, :]
    dC0 = xp.matrix_transpose(gdnum) @ q
    dn0 = xp.sum((g * ds)[..., None] * q, axis=-2)
    # the final state: C_T = sum_s D'_Ts v_s k_s^T + g_T C0, n_T = sum_s D'_Ts k_s + g_T n0
    last = Dp[..., -1, :]
    dk = xp.zeros_like(k)
    dDp_last = xp.zeros_like(last)
    if dC is not None:
        dCk = xp.matrix_transpose(dC @ xp.matrix_transpose(k))  # (B, H, T, d_v): rows dC k_s
        dv = dv + last[..., None] * dCk
        dk = dk + last[..., None] * (v @ dC)
        dDp_last = dDp_last + xp.sum(dCk * v, axis=-1)
        dg_T = xp.sum(dC * C0, axis=(-2, -1))
        dC0 = dC0 + g[..., -1, None, None] * dC
    else:
        dg_T = xp.zeros_like(g[..., -1])
    if dn is not None:
        dk = dk + last[..., None] * dn[..., None, :]
        dDp_last = dDp_last + xp.sum(k * dn[..., None, :], axis=-1)
        dg_T = dg_T + xp.sum(dn * n0, axis=-1)
        dn0 = dn0 + g[..., -1, None] * dn
    T = q.shape[2]
    last_row = xp.arange(T, device=_device(q)) == T - 1
    dg = dg + xp.where(last_row, dg_T[..., None], xp.zeros_like(dg))
    # S = P * D'; P = q k^T
    dP = dS * Dp
    dDp = dS * P + xp.where(last_row[:, None], dDp_last[..., None, :], xp.zeros_like(dS))
    dq = dq + dP @ k
    dk = dk + xp.matrix_transpose(dP) @ q
    # D' = exp(log D - m), g = exp(F + m0 - m), m held constant
    dlogD = xp.where(causal, dDp * Dp, xp.zeros_like(Dp))
    dlogg = dg * g
    dig = xp.sum(dlogD, axis=-2)
    dF = xp.sum(dlogD, axis=-1) - dig + dlogg
    # F = cumulative sum of lsf: dlsf_r = sum over t >= r of dF_t
    dlsf = xp.flip(xp.cumulative_sum(xp.flip(dF, axis=-1), axis=-1), axis=-1)
    dfg = dlsf * _sigmoid_neg(xp, fg, lsf)
    return dq, dk, dv, dig, dfg, dC0, dn0


# -------------------------------------------------------------------- chunkwise form
def chunkwise_forward(xp, q, k, v, ig, fg, state, chunk=64):
    """The chunkwise form: :func:`parallel_forward` over chunks of ``chunk`` steps, the
    state carried from one to the next."""
    T = q.shape[2]
    hs, caches = [], []
    for t0 in range(0, T, chunk):
        sl = slice(t0, min(T, t0 + chunk))
        h, state, cache = parallel_forward(xp, q[..., sl, :], k[..., sl, :], v[..., sl, :],
                                           ig[..., sl], fg[..., sl], state)
        hs.append(h)
        caches.append(cache)
    return xp.concat(hs, axis=2), state, caches


def chunkwise_backward(xp, dh, caches, dC=None, dn=None):
    """The gradients of :func:`chunkwise_forward`: the chunks' :func:`parallel_backward` in
    reverse, each one's gradients on its initial state those on the final state of the
    chunk before."""
    parts = []
    t1 = dh.shape[2]
    for cache in reversed(caches):
        t0 = t1 - cache[0].shape[2]
        dq, dk, dv, dig, dfg, dC, dn = parallel_backward(xp, dh[..., t0:t1, :], cache, dC, dn)
        parts.append((dq, dk, dv, dig, dfg))
        t1 = t0
    parts.reverse()
    dq, dk, dv = (xp.concat([p[j] for p in parts], axis=2) for j in range(3))
    dig, dfg = (xp.concat([p[j] for p in parts], axis=-1) for j in (3, 4))
    return dq, dk, dv, dig, dfg, dC, dn



# ------------------------------------------------------------------------ the model
class MLSTMCache:
    """What :meth:`MLSTM.forward` keeps for :meth:`MLSTM.backward`: treat it as opaque."""

    __slots__ = ("model", "form", "xs", "o", "ht", "inner", "active", "params")

    def __init__(self, model: MLSTM, form: str, xs: tuple, o: Array, ht: Array, inner: Any,
                 active: Array | None, params: list) -> None:
        self.model, self.form, self.xs, self.o, self.ht = model, form, xs, o, ht
        self.inner, self.active, self.params = inner, active, params


class MLSTM:
    """The mLSTM of xLSTM (Beck et al. 2024): per head a matrix memory ``C (d_v, d_qk)``
    written with exponential input gates and read with a query (the module's equations);
    no hidden-to-hidden recurrence, so besides the recurrent form it runs in a parallel and
    a chunkwise form, which agree with it to rounding.

    Parameters (one layer, ``params[0]``): ``Wq, Wk (H, d_qk, n_x)``, ``bq, bk (H, d_qk,
    1)``, ``Wv (H, d_v, n_x)``, ``bv (H, d_v, 1)`` with ``d_v = n_h / H``, ``wi, wf (H,
    n_x)``, ``bi, bf (H, 1)``, ``Wo (n_h, n_x)``, ``bo (n_h, 1)``; head ``k``'s output is
    rows ``k d_v:(k + 1) d_v`` of ``h = sigmoid(Wo x + bo) * h~``. State ``(C, n, m)`` of
    shapes ``(1, H, d_v, d_qk, m)``, ``(1, H, d_qk, m)``, ``(1, H, m)`` (batch last, as the
    other models' states); ``m`` is the stabiliser, which gets no gradient. Where ``n`` is
    zero (a zero state) a head's memory is empty and its first step starts it afresh.

    Parameters
    ----------
    n_x, n_h : int
        Input and hidden sizes.
    num_heads : int, optional
        Heads; ``n_h`` must be a multiple of it.
    d_qk : int, optional
        Query and key size per head (default ``n_h / num_heads``).
    form : {"auto", "recurrent", "parallel", "chunkwise"}, optional
        The default form of :meth:`forward`: ``"auto"`` is parallel up to ``chunk`` steps,
        chunkwise beyond.
    chunk : int, optional
        Steps per chunk of the chunkwise form.
    layout, xp, dtype, device, seed : optional
        As for :class:`xlstm.LSTM`. ``num_layers`` and ``bidirectional`` other than one
        layer in one direction raise ``NotImplementedError`` for now.
    """

    torch_name = None

    def __init__(self, n_x: int, n_h: int, *, num_heads: int = 1, d_qk: int | None = None,
                 form: str = "auto", chunk: int = 64, num_layers: int = 1,
                 bidirectional: bool = False, layout: str = "notebook", xp: Any = None,
                 dtype: Any = None, device: Any = None,
                 seed: int | np.random.Generator | None = 0) -> None:
        from ._checks import positive_int
        from ._compat import namespace_of_module, resolve_dtype

        self.n_x = positive_int("n_x", n_x)
        self.n_h = positive_int("n_h", n_h)
        self.num_heads = positive_int("num_heads", num_heads)
        if self.n_h % self.num_heads:
            raise ValueError(f"n_h={n_h} is not divisible by num_heads={num_heads}")
        self.d_v = self.n_h // self.num_heads
        self.d_qk = self.d_v if d_qk is None else positive_int("d_qk", d_qk)
        self.form = self._form(form)
        self.chunk = positive_int("chunk", chunk)
        if positive_int("num_layers", num_layers) != 1 or bidirectional is not False:
            raise NotImplementedError("MLSTM runs one layer in one direction for now")
        self.num_layers, self.bidirectional = 1, False
        if layout not in ("notebook", "batch_first"):
            raise ValueError(f"layout must be one of ('notebook', 'batch_first'), got {layout!r}")
        self.layout = layout
        self.xp = namespace_of_module(xp)
        self.dtype = resolve_dtype(self.xp, dtype, device=device)
        self.device = device
        rng = np.random.default_rng(seed)
        layer = {}
        for key, shape in self.param_shapes().items():
            fan = self.n_x
            layer[key] = rng.uniform(-1 / np.sqrt(fan), 1 / np.sqrt(fan), size=shape)
        with_xp = self.xp
        self.params = [{k: with_xp.asarray(v, dtype=self.dtype, device=device)
                        for k, v in layer.items()}]

    @property
    def n_a(self) -> int:
        """The hidden size (``n_h``), under the other models' name."""
        return self.n_h

    @staticmethod
    def _form(form):
        if form not in ("auto", *FORMS):
            raise ValueError(f"form must be one of {('auto', *FORMS)}, got {form!r}")
        return form

    def param_shapes(self) -> dict:
        """The parameter dict of the layer: key to shape, in order."""
        H, dqk, dv, nx, nh = self.num_heads, self.d_qk, self.d_v, self.n_x, self.n_h
        return {"Wq": (H, dqk, nx), "bq": (H, dqk, 1), "Wk": (H, dqk, nx), "bk": (H, dqk, 1),
                "Wv": (H, dv, nx), "bv": (H, dv, 1), "wi": (H, nx), "bi": (H, 1),
                "wf": (H, nx), "bf": (H, 1), "Wo": (nh, nx), "bo": (nh, 1)}

    def _check_params(self, params):
        if not isinstance(params, (list, tuple)) or len(params) != 1:
            raise ValueError("params must be a list of one dict (one layer, one direction)")
        layer = params[0]
        want = self.param_shapes()
        if not isinstance(layer, dict) or set(layer) != set(want):
            got = sorted(layer) if isinstance(layer, dict) else type(layer).__name__
            raise KeyError(f"params[0] is not an MLSTM layer: expected the keys {list(want)}, "
                           f"got {got}")
        for k, shape in want.items():
            if tuple(getattr(layer[k], "shape", ())) != shape:
                raise ValueError(f"params[0][{k!r}] must have shape {shape}, got "
                                 f"{tuple(getattr(layer[k], 'shape', ()))}")
        return {f"params[0][{k!r}]": v for k, v in layer.items()}

    def _state_shapes(self, m):
        H, dqk, dv = self.num_heads, self.d_qk, self.d_v
        return ((1, H, dv, dqk, m), (1, H, dqk, m), (1, H, m))

    def _check_state(self, state, name, m):
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            raise TypeError(f"{name} must be the tuple (C, n, m) of MLSTM, got "
                            f"{type(state).__name__}")
        for key, s, shape in zip("Cnm", state, self._state_shapes(m)):
            if s is None and name == "dstate":  # no gradient on that part
                continue
            if tuple(getattr(s, "shape", ())) != shape:
                raise ValueError(f"{name} {key} must have shape {shape}, got {tuple(s.shape)}")
        return tuple(state)

    # ------------------------------------------------------------------ running
    def forward(self, x: Array, state: tuple | None = None, *, lengths: Array | None = None,
                params: list | None = None, train: bool = False, seed: int | None = None,
                return_cache: bool = True, form: str | None = None,
                ) -> tuple[Array, tuple, MLSTMCache | None]:
        """Run the layer over a batch of sequences.

        Parameters
        ----------
        x : array, shape (n_x, m, T), or (m, T, n_x) with ``layout="batch_first"``
            Inputs, in the namespace, dtype and device of the parameters.
        state : tuple (C, n, m), optional
            The initial state (the class's shapes); default zeros (empty memories).
        lengths : integer array of shape (m,), optional
            Each sequence's length in ``[1, T]``: past it the state is frozen and the
            output is zero.
        params : list of one dict, optional
            Parameters to use instead of ``self.params``.
        train, seed : optional
            Accepted for the other models' signature (no dropout with one layer).
        return_cache : bool, optional
            False keeps nothing for a backward pass.
        form : {"auto", "recurrent", "parallel", "chunkwise"}, optional
            The form for this call (default ``self.form``).

        Returns
        -------
        y : array, shape (n_h, m, T), or (m, T, n_h)
            The outputs.
        state : tuple (C, n, m)
            The final state.
        cache : MLSTMCache or None
            What :meth:`backward` needs.
        """
        from ._compat import namespace

        params = self.params if params is None else params
        arrays = self._check_params(params)
        named = {"x": x, **arrays}
        if state is not None:
            named.update((f"state[{i}]", s) for i, s in enumerate(state))
        if lengths is not None:
            named["lengths"] = lengths
        xp = namespace(kinds={"lengths": ("integral",)}, **named)
        form = self._form(self.form if form is None else form)
        want = "(m, T, n_x)" if self.layout == "batch_first" else "(n_x, m, T)"
        if x.ndim != 3 or x.shape[2 if self.layout == "batch_first" else 0] != self.n_x:
            raise ValueError(f"x must have shape {want} with n_x={self.n_x}, got {tuple(x.shape)}")
        X = x if self.layout == "batch_first" else xp.permute_dims(x, (1, 2, 0))  # (m, T, n_x)
        m, T, _ = X.shape
        p = params[0]
        H, dqk, dv = self.num_heads, self.d_qk, self.d_v
        Xf = xp.reshape(X, (m * T, self.n_x))

        def proj(W, b, d):
            P = Xf @ xp.matrix_transpose(xp.reshape(W, (H * d, self.n_x)))
            P = P + xp.reshape(b, (1, H * d))
            return xp.permute_dims(xp.reshape(P, (m, T, H, d)), (0, 2, 1, 3))

        def gate(w, b):
            G = Xf @ xp.matrix_transpose(w) + xp.reshape(b, (1, H))
            return xp.permute_dims(xp.reshape(G, (m, T, H)), (0, 2, 1))

        q, v = proj(p["Wq"], p["bq"], dqk), proj(p["Wv"], p["bv"], dv)
        k = proj(p["Wk"], p["bk"], dqk) / (dqk ** 0.5)
        ig, fg = gate(p["wi"], p["bi"]), gate(p["wf"], p["bf"])
        active = None
        if lengths is not None:
            active = self._active(xp, lengths, m, T)  # (m, 1, T)
            inf = xp.full_like(ig, float("inf"))
            ig = xp.where(active, ig, -inf)  # a padded step writes nothing ...
            fg = xp.where(active, fg, inf)  # ... and forgets nothing
        if state is None:
            C0 = xp.zeros((m, H, dv, dqk), dtype=X.dtype, device=_device(X))
            n0 = xp.zeros((m, H, dqk), dtype=X.dtype, device=_device(X))
            m0 = xp.zeros((m, H), dtype=X.dtype, device=_device(X))
        else:
            C0, n0, m0 = self._check_state(state, "state", m)
            C0 = xp.permute_dims(C0[0, ...], (3, 0, 1, 2))
            n0 = xp.permute_dims(n0[0, ...], (2, 0, 1))
            m0 = xp.permute_dims(m0[0, ...], (1, 0))
        if form == "auto":
            form = "parallel" if T <= self.chunk else "chunkwise"
        if form == "chunkwise":
            ht, (C, n, mm), inner = chunkwise_forward(xp, q, k, v, ig, fg, (C0, n0, m0),
                                                      self.chunk)
        else:
            run = recurrent_forward if form == "recurrent" else parallel_forward
            ht, (C, n, mm), inner = run(xp, q, k, v, ig, fg, (C0, n0, m0))
        ht = xp.reshape(xp.permute_dims(ht, (0, 2, 1, 3)), (m, T, self.n_h))
        zo = Xf @ xp.matrix_transpose(p["Wo"]) + xp.reshape(p["bo"], (1, self.n_h))
        o = 0.5 * xp.tanh(0.5 * zo) + 0.5  # sigmoid
        o = xp.reshape(o, (m, T, self.n_h))
        y = o * ht
        if active is not None:
            y = xp.where(xp.permute_dims(active, (0, 2, 1)), y, xp.zeros_like(y))
        if self.layout == "notebook":
            y = xp.permute_dims(y, (2, 0, 1))
        final = (xp.permute_dims(C, (1, 2, 3, 0))[None, ...],
                 xp.permute_dims(n, (1, 2, 0))[None, ...],
                 xp.permute_dims(mm, (1, 0))[None, ...])
        cache = None
        if return_cache:
            cache = MLSTMCache(self, form, (X, Xf), o, ht, (inner, fg, q, k, v), active,
                               [dict(p)])
        return y, final, cache

    def _active(self, xp, lengths, m, T):
        from ._compat import device_of

        if tuple(lengths.shape) != (m,):
            raise ValueError(f"lengths must have shape (m,) = ({m},), got {tuple(lengths.shape)}")
        t = xp.arange(T, device=device_of(lengths))
        return (t[None, :] < lengths[:, None])[:, None, :]

    def backward(self, dy: Array, cache: MLSTMCache, dstate: tuple | None = None,
                 ) -> tuple[Array, tuple, list]:
        """Backpropagation through time for a :meth:`forward` call, in its form.

        Parameters
        ----------
        dy : array, the shape of ``y``
            Gradient on the outputs.
        cache : MLSTMCache
            What :meth:`forward` returned.
        dstate : tuple (dC, dn, dm), optional
            Gradient on the final state, any part ``None`` for zero (``dm`` is ignored:
            the stabiliser has none).

        Returns
        -------
        dx : array, the shape of ``x``
        dstate0 : tuple (dC0, dn0, dm0)
            Gradient on the initial state; ``dm0`` is zero.
        grads : list of one dict
            Gradients of the parameters, in the structure of ``params``.
        """
        from ._compat import namespace

        if not isinstance(cache, MLSTMCache) or cache.model is not self:
            raise TypeError("cache must be the MLSTMCache of this model's forward")
        xp = namespace(dy=dy, cache=cache.o)
        X, Xf = cache.xs
        m, T, _ = X.shape
        H, dqk, dv, nh = self.num_heads, self.d_qk, self.d_v, self.n_h
        want = (m, T, nh) if self.layout == "batch_first" else (nh, m, T)
        if tuple(dy.shape) != want:
            raise ValueError(f"dy must have the shape of y, {want}, got {tuple(dy.shape)}")
        dY = dy if self.layout == "batch_first" else xp.permute_dims(dy, (1, 2, 0))
        if cache.active is not None:
            dY = xp.where(xp.permute_dims(cache.active, (0, 2, 1)), dY, xp.zeros_like(dY))
        p = cache.params[0]
        o, ht = cache.o, cache.ht
        dht = dY * o
        dzo = xp.reshape(dY * ht * o * (1.0 - o), (m * T, nh))
        grads = {"dWo": xp.matrix_transpose(dzo) @ Xf,
                 "dbo": xp.reshape(xp.sum(dzo, axis=0), (nh, 1))}
        dX = dzo @ p["Wo"]
        dht = xp.permute_dims(xp.reshape(dht, (m, T, H, dv)), (0, 2, 1, 3))
        inner, fg, q, k, v = cache.inner
        dC = dn = None
        if dstate is not None:
            if not isinstance(dstate, (tuple, list)) or len(dstate) != 3:
                raise TypeError("dstate must be the tuple (dC, dn, dm) of MLSTM")
            dC, dn, _ = self._check_state(dstate, "dstate", m)
            dC = None if dC is None else xp.permute_dims(dC[0, ...], (3, 0, 1, 2))
            dn = None if dn is None else xp.permute_dims(dn[0, ...], (2, 0, 1))
        back = {"recurrent": recurrent_backward, "parallel": parallel_backward,
                "chunkwise": chunkwise_backward}[cache.form]
        dq, dk, dvv, dig, dfg, dC0, dn0 = back(xp, dht, inner, dC, dn)
        if cache.active is not None:  # the padded steps' gates were constants
            dig = xp.where(cache.active, dig, xp.zeros_like(dig))
            dfg = xp.where(cache.active, dfg, xp.zeros_like(dfg))
        dk = dk / (dqk ** 0.5)
        for key, d, n_d in (("q", dq, dqk), ("k", dk, dqk), ("v", dvv, dv)):
            df = xp.reshape(xp.permute_dims(d, (0, 2, 1, 3)), (m * T, H * n_d))
            grads["dW" + key] = xp.reshape(xp.matrix_transpose(df) @ Xf, (H, n_d, self.n_x))
            grads["db" + key] = xp.reshape(xp.sum(df, axis=0), (H, n_d, 1))
            dX = dX + df @ xp.reshape(p["W" + key], (H * n_d, self.n_x))
        for key, d in (("i", dig), ("f", dfg)):
            df = xp.reshape(xp.permute_dims(d, (0, 2, 1)), (m * T, H))
            grads["dw" + key] = xp.matrix_transpose(df) @ Xf
            grads["db" + key] = xp.reshape(xp.sum(df, axis=0), (H, 1))
            dX = dX + df @ p["w" + key]
        dX = xp.reshape(dX, (m, T, self.n_x))
        dx = dX if self.layout == "batch_first" else xp.permute_dims(dX, (2, 0, 1))
        mm = xp.zeros((1, H, m), dtype=dX.dtype, device=_device(dX))
        dstate0 = (xp.permute_dims(dC0, (1, 2, 3, 0))[None, ...],
                   xp.permute_dims(dn0, (1, 2, 0))[None, ...], mm)
        return dx, dstate0, [{k: grads["d" + k] for k in self.param_shapes()}]

    def __repr__(self):
        return (f"MLSTM(n_x={self.n_x}, n_h={self.n_h}, num_heads={self.num_heads}, "
                f"d_qk={self.d_qk}, form={self.form!r})")
