"""The mLSTM of xLSTM (Beck et al. 2024): a matrix memory per head, in three forms that
agree, each with a backward pass written by hand.

Per head, with ``q``, ``k`` (already divided by ``sqrt(d_qk)``), ``v`` and the gate
pre-activations ``i~``, ``f~`` of every step::

    C_t = f_t C_{t-1} + i_t v_t k_t^T,   n_t = f_t n_{t-1} + i_t k_t
    h~_t = C_t q_t / max(|n_t . q_t|, 1),  i_t = exp(i~_t),  f_t = sigmoid(f~_t)

computed only through a stabiliser ``m_state`` (the memory is kept divided by
``exp(m_state)``, and the floor 1 becomes ``exp(-m_state)``). ``h~`` does not depend on
``m_state``, so it gets no gradient, and
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
``v``: ``d_v``) and ``(B, H, T)`` (``i~``, ``f~``), and a state ``(C, n_state, m_state)`` of
shapes ``(B, H, d_v, d_qk)``, ``(B, H, d_qk)``, ``(B, H)``: the memory, its normaliser and
its stabiliser. Where ``n_state`` of the given state is zero the memory is empty: its
``m_state`` is taken as ``-inf`` (:func:`empty_as_minus_inf`), so the
first step starts it afresh. A forward pass returns ``(h~, final state, cache)`` (the cache
``None`` with ``keep=False``); a backward pass takes ``dh~``, the cache and the gradients on
the final ``C`` and ``n`` (or ``None``) and returns the gradients of ``q, k, v, i~, f~, C_0,
n_0``.

Every form keeps float32 finite wherever the result fits: each step's ``q`` and ``k`` are
brought below 2 by a power of two, folded back in exactly (:func:`_unit_scale`), so that
``v k^T q`` overflows only where ``v`` itself nearly does. And every form is causal
whatever the inputs hold: a NaN or inf at step ``t`` reaches no output before ``t``, and
a NaN or inf in ``dh~`` at step ``t`` no gradient of a later step (the parallel form takes
such steps out of its products, :func:`_set_aside`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np

from .._lib.compat import device_of as _device
from .._lib.typing import Array
from ..engine import loop as _engine
from .stack import ModelCache, _Model

__all__ = ["FORMS", "MAX_PARALLEL_BYTES", "MLSTM", "recurrent_forward", "recurrent_backward",
           "parallel_forward", "parallel_backward", "chunkwise_forward", "chunkwise_backward",
           "layer_forward", "layer_backward", "MLSTMLayer", "empty_as_minus_inf", "logsigmoid"]

#: The forms, by name.
FORMS = ("recurrent", "parallel", "chunkwise")

#: The largest ``(m, H, L, L)`` array that :class:`MLSTM` lets the parallel form allocate,
#: in bytes (1 GiB), ``L`` the steps it runs at once (``T`` for ``form="parallel"``, the
#: chunk for the chunkwise form); a backward pass holds about eight of them. A call that
#: would need more is refused before anything is computed, with the form or chunk that
#: fits; without a cache the parallel form runs in blocks that fit instead. Raise it
#: (``xlstm.mlstm.MAX_PARALLEL_BYTES = ...``) on a machine with the memory.
MAX_PARALLEL_BYTES = 1 << 30


def logsigmoid(xp, x):
    """``log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|))``, finite for every finite ``x``."""
    return xp.minimum(x, xp.zeros_like(x)) - xp.log1p(xp.exp(-xp.abs(x)))


def _sigmoid_neg(xp, x, lsf):
    """``sigmoid(-x) = exp(logsigmoid(x) - x)``, the slope of ``logsigmoid`` at ``x``."""
    return xp.exp(lsf - x)


def empty_as_minus_inf(xp, n_state, m_state):
    """``m_state`` with ``-inf`` where the memory is empty (``n_state`` zero over ``d_qk``)."""
    empty = xp.all(n_state == 0, axis=-1)
    return xp.where(empty, xp.full_like(m_state, -float("inf")), m_state)


def _floor(xp, m_state):
    """The floor 1 of the denominator in the stabilised scale, ``exp(-m_state)``, its exponent
    capped one below the largest finite one: where ``exp(-m_state)`` would overflow (every gate
    far below zero), ``h~`` is then ``num / ~1e38`` (float32) instead of the exact
    ``num / inf = 0``, a difference below the smallest normal number, and nothing
    overflows."""
    import math

    cap = math.log(float(xp.finfo(m_state.dtype).max)) - 1.0
    return xp.exp(xp.minimum(-m_state, xp.full_like(m_state, cap)))


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


_LN2 = 0.6931471805599453


def _unit_scale(xp, a):
    """``a (..., T, d)`` with each step divided by the power of two ``s >= 1`` that brings
    its largest magnitude below 2 (``s = 1`` where it is below 2 already): ``(a / s, log s,
    s)``, the last two ``(..., T)``.

    The forms fold these scales back in exactly: a key's into its input gate (``C`` and
    ``n`` are both linear in ``i k``, so ``k / s`` with ``i~ + log s`` is the same memory),
    a query's into the floor of its denominator (``h~ = C q' / max(|n . q'|, 1 / s)``). So
    ``v k^T q`` is formed from factors below 2 and overflows only where ``v`` does, not
    where the product of three large values would (inputs of 1e13 in float32); the
    results change by rounding alone, and not at all where no scale is needed. A scale
    depends on its step only: causality is kept.
    """
    amax = xp.max(xp.abs(a), axis=-1)
    e = xp.floor(xp.log2(xp.maximum(amax, xp.ones_like(amax))))
    scale = xp.pow(xp.full_like(e, 2.0), e)
    return a / scale[..., None], e * _LN2, scale


def _scalar(xp, value, like):
    """``value`` as a 0-d array of ``like``'s dtype and device."""
    return xp.full((), value, dtype=like.dtype, device=_device(like))


def _set_aside(xp, q, k, v, ig, fg):
    """The steps the parallel form cannot put into its products, and the inputs without
    them: ``(q, k, v, ig, fg, bad)``, ``bad (B, H, T)``.

    A product over the time axis (``S v``, ``q k^T``) multiplies a later step's values by
    the zeros of the causal mask, and ``0 * nan`` is ``nan``: a NaN or inf at step ``t``
    would reach every earlier output. So a step holding one (in ``q``, ``k`` or ``v``, a
    NaN gate, ``i~ = +inf`` or ``f~ = -inf``; ``i~ = -inf`` and ``f~ = +inf``, a step that
    writes or forgets nothing, are kept) enters the products as zeros, and :func:`_taint`
    puts NaN back where the recurrent form has it: from that step on.
    """
    inf = float("inf")
    ok = (xp.all(xp.isfinite(q), axis=-1) & xp.all(xp.isfinite(k), axis=-1)
          & xp.all(xp.isfinite(v), axis=-1) & (ig < inf) & (fg > -inf))
    zero = _scalar(xp, 0.0, q)
    keep = ok[..., None]
    return (xp.where(keep, q, zero), xp.where(keep, k, zero), xp.where(keep, v, zero),
            xp.where(ok, ig, zero), xp.where(ok, fg, zero), ~ok)


def _from_first(xp, bad, like):
    """``(B, H, T)``: true from the first true step of ``bad`` on."""
    return xp.cumulative_sum(xp.astype(bad, like.dtype), axis=-1) > 0.0


def _up_to_last(xp, bad, like):
    """``(B, H, T)``: true up to the last true step of ``bad``."""
    return xp.flip(_from_first(xp, xp.flip(bad, axis=-1), like), axis=-1)


def _taint(xp, a, where):
    """``a`` with NaN where ``where`` (broadcast from the left: ``where``'s axes are
    ``a``'s leading ones)."""
    extra = a.ndim - where.ndim
    mask = xp.reshape(where, (*where.shape, *(1,) * extra))
    return xp.where(mask, _scalar(xp, float("nan"), a), a)


# -------------------------------------------------------------------- recurrent form
def recurrent_forward(xp, q, k, v, ig, fg, state, *, keep=True):
    """The recurrent form: one step at a time (see the module). ``keep=False`` keeps
    nothing for a backward pass (the cache is ``None``)."""
    C, n_state, m_state = state
    m_state = empty_as_minus_inf(xp, n_state, m_state)
    T = q.shape[2]
    q, logb, sq = _unit_scale(xp, q)
    k, logc, sk = _unit_scale(xp, k)
    ig = ig + logc
    lsf = logsigmoid(xp, fg)
    Cs, ns, gates, hs, ss, dens, floors = [C], [n_state], [], [], [], [], []
    for t in range(T):
        m_t = xp.maximum(lsf[..., t] + m_state, ig[..., t])
        ip = xp.exp(ig[..., t] - m_t)
        fp = xp.exp(lsf[..., t] + m_state - m_t)
        C = fp[..., None, None] * C + ip[..., None, None] * _outer(v[..., t, :], k[..., t, :])
        n_state = fp[..., None] * n_state + ip[..., None] * k[..., t, :]
        q_t = q[..., t, :]
        num = xp.sum(C * q_t[..., None, :], axis=-1)
        s = xp.sum(n_state * q_t, axis=-1)
        floor = _floor(xp, m_t + logb[..., t])
        den = xp.maximum(xp.abs(s), floor)
        h = num / den[..., None]
        m_state = m_t
        hs.append(h)
        if keep:
            Cs.append(C)
            ns.append(n_state)
            gates.append((ip, fp))
            ss.append(s)
            dens.append(den)
            floors.append(floor)
    cache = (q, k, v, fg, lsf, Cs, ns, gates, hs, ss, dens, floors, sq, sk) if keep else None
    return xp.stack(hs, axis=2), (C, n_state, m_state), cache


def recurrent_backward(xp, dh, cache, dC=None, dn=None):
    """The gradients of :func:`recurrent_forward`: ``(dq, dk, dv, dig, dfg, dC0, dn0)``."""
    q, k, v, fg, lsf, Cs, ns, gates, hs, ss, dens, floors, sq, sk = cache
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
    # the scales of q and k held constant (the result does not depend on them)
    return (xp.stack(dq, axis=2) / sq[..., None], xp.stack(dk, axis=2) / sk[..., None],
            xp.stack(dv, axis=2), xp.stack(dig, axis=-1), dfg, dC, dn)


# --------------------------------------------------------------------- parallel form
def _guard(xp, q, k, v, ig, fg):
    """What the parallel and chunkwise forms run on, once per call: the inputs with the
    steps that hold a NaN or inf set aside (:func:`_set_aside`), ``q`` and ``k`` scaled
    per step (:func:`_unit_scale`, the key's scale in ``i~``), and what undoes both:
    ``(q, k, v, ig, fg, logb, (bad, sq, sk))``."""
    q, k, v, ig, fg, bad = _set_aside(xp, q, k, v, ig, fg)
    q, logb, sq = _unit_scale(xp, q)
    k, logc, sk = _unit_scale(xp, k)
    return q, k, v, ig + logc, fg, logb, (bad, sq, sk)


def _unguard_forward(xp, h, final, bad):
    """``h`` and the final state with NaN where the set-aside steps reach: the rows from
    the first on, and the final state of a head that had one."""
    tainted = _from_first(xp, bad, h)
    return _taint(xp, h, tainted), tuple(_taint(xp, a, tainted[..., -1]) for a in final)


def _unguard_backward(xp, grads, bad, guard):
    """The gradients of the scaled inputs as those of the caller's (the scales held
    constant: the result does not depend on them), with NaN where ``dh`` held a NaN or
    inf (``bad``, set aside as zeros) or the forward pass set a step aside: ``dq`` of
    those rows, ``dk``, ``dv`` and the gates' of every step up to the last of them, the
    initial state's; after a forward pass that set a step aside, all of that head's."""
    dq, dk, dv, dig, dfg, dC0, dn0 = grads
    bad_fwd, sq, sk = guard
    tainted = _from_first(xp, bad_fwd, dq)[..., -1:]  # (B, H, 1)
    upto = _up_to_last(xp, bad, dq) | tainted
    dq = _taint(xp, dq / sq[..., None], bad | tainted)
    dk = dk / sk[..., None]
    dk, dv, dig, dfg = (_taint(xp, a, upto) for a in (dk, dv, dig, dfg))
    first = upto[..., 0]  # the initial state feeds every step
    return dq, dk, dv, dig, dfg, _taint(xp, dC0, first), _taint(xp, dn0, first)


def _set_aside_rows(xp, dh):
    """``dh`` with its rows that hold a NaN or inf set to zero, and those rows ``(B, H,
    T)``: a product over the time axis would carry them to every later step."""
    bad = ~xp.all(xp.isfinite(dh), axis=-1)
    return xp.where(bad[..., None], _scalar(xp, 0.0, dh), dh), bad


def parallel_forward(xp, q, k, v, ig, fg, state, *, keep=True):
    """The parallel form: all steps of every head at once, from ``state`` (see the module);
    ``keep=False`` keeps nothing for a backward pass (the cache is ``None``).

    Causal whatever the inputs hold: a NaN or inf at step ``t`` leaves the outputs before
    ``t`` as they are (:func:`_set_aside`); from ``t`` on, and in the final state, they are
    NaN.
    """
    q, k, v, ig, fg, logb, guard = _guard(xp, q, k, v, ig, fg)
    h, final, inner = _parallel(xp, q, k, v, ig, fg, logb, state)
    h, final = _unguard_forward(xp, h, final, guard[0])
    return h, final, (inner, guard) if keep else None


def parallel_backward(xp, dh, cache, dC=None, dn=None):
    """The gradients of :func:`parallel_forward`: ``(dq, dk, dv, dig, dfg, dC0, dn0)``.

    Anti-causal whatever ``dh`` holds: a NaN or inf in ``dh`` at step ``t`` leaves the
    gradients of the later steps as they are (it enters the products as zeros), and makes
    those of step ``t`` (``dq``), of the steps up to ``t`` (``dk``, ``dv``, the gates) and
    of the initial state NaN. After a forward pass that met a NaN or inf, every gradient
    of that head is NaN.
    """
    inner, guard = cache
    dh, bad = _set_aside_rows(xp, dh)
    return _unguard_backward(xp, _parallel_back(xp, dh, inner, dC, dn), bad, guard)


def _parallel(xp, q, k, v, ig, fg, logb, state):
    """:func:`parallel_forward` on guarded inputs (:func:`_guard`): ``(h, final state,
    cache)``."""
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
    Dp = xp.exp(logD - mrow[..., None])  # zero above the diagonal
    g = xp.exp(logg - mrow)
    P = q @ xp.matrix_transpose(k)  # finite and below 4 d_qk: no nan * 0 above the diagonal
    S = P * Dp
    num = S @ v + g[..., None] * (q @ xp.matrix_transpose(C0))
    s = xp.sum(S, axis=-1) + g * xp.sum(q * n0[..., None, :], axis=-1)
    floor = _floor(xp, mrow + logb)
    den = xp.maximum(xp.abs(s), floor)
    h = num / den[..., None]
    last, g_T = Dp[..., -1, :], g[..., -1]
    C_T = xp.matrix_transpose(v * last[..., None]) @ k + g_T[..., None, None] * C0
    n_T = xp.sum(k * last[..., None], axis=-2) + g_T[..., None] * n0
    cache = (q, k, v, fg, lsf, C0, n0, causal, Dp, g, P, S, h, s, den, floor)
    return h, (C_T, n_T, mrow[..., -1]), cache


def _parallel_back(xp, dh, cache, dC=None, dn=None):
    """:func:`parallel_backward` on guarded inputs: the gradients of those inputs."""
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
def chunkwise_forward(xp, q, k, v, ig, fg, state, chunk=64, *, keep=True):
    """The chunkwise form: :func:`parallel_forward` over chunks of ``chunk`` steps, the
    state carried from one to the next (the inputs guarded once, :func:`_guard`).
    ``keep=False`` keeps nothing for a backward pass (the cache is ``None``): one chunk's
    intermediates alive at a time."""
    q, k, v, ig, fg, logb, guard = _guard(xp, q, k, v, ig, fg)
    T = q.shape[2]
    hs, caches = [], []
    for t0 in range(0, T, chunk):
        sl = slice(t0, min(T, t0 + chunk))
        h, state, cache = _parallel(xp, q[..., sl, :], k[..., sl, :], v[..., sl, :],
                                    ig[..., sl], fg[..., sl], logb[..., sl], state)
        hs.append(h)
        if keep:
            caches.append(cache)
    h, state = _unguard_forward(xp, xp.concat(hs, axis=2), state, guard[0])
    return h, state, (caches, guard) if keep else None


def chunkwise_backward(xp, dh, cache, dC=None, dn=None):
    """The gradients of :func:`chunkwise_forward`: the chunks' backward passes in reverse,
    each one's gradients on its initial state those on the final state of the chunk
    before."""
    caches, guard = cache
    dh, bad = _set_aside_rows(xp, dh)
    parts = []
    t1 = dh.shape[2]
    for inner in reversed(caches):
        t0 = t1 - inner[0].shape[2]
        dq, dk, dv, dig, dfg, dC, dn = _parallel_back(xp, dh[..., t0:t1, :], inner, dC, dn)
        parts.append((dq, dk, dv, dig, dfg))
        t1 = t0
    parts.reverse()
    dq, dk, dv = (xp.concat([p[j] for p in parts], axis=2) for j in range(3))
    dig, dfg = (xp.concat([p[j] for p in parts], axis=-1) for j in (3, 4))
    return _unguard_backward(xp, (dq, dk, dv, dig, dfg, dC, dn), bad, guard)


# ------------------------------------------------------------------------ the model
class _Kept:
    """What one mLSTM layer's forward pass keeps for its backward pass: copies of its input
    ``X (m T, n_in)`` and parameters, and its intermediates."""

    __slots__ = ("X", "params", "form", "o", "ht", "inner", "active")

    def __init__(self, X, params, form, o, ht, inner, active):
        self.X, self.params, self.form, self.o, self.ht = X, params, form, o, ht
        self.inner, self.active = inner, active

    def __reduce__(self):
        return (type(self), (self.X, self.params, self.form, self.o, self.ht, self.inner,
                             self.active))


def layer_forward(xp, p, X, state, active, form, *, H, d_qk, d_v, chunk, keep):
    """One mLSTM layer over ``X (m, T, n_in)`` from ``state`` ``(C, n_state, m_state)``
    (the forms' layout), in ``form`` (not ``"auto"``). ``active (m, 1, T)`` marks the steps within
    each sequence's length, or is ``None``. Returns ``y (m, T, n_h)``, the final state and
    what :func:`layer_backward` needs (``None`` unless ``keep``). ``X`` must be zero past
    each sequence's end (the model zeroes it once for every layer): padding is never read."""
    from .._lib.compat import copy

    m, T, n_in = X.shape
    n_h = H * d_v
    Xf = xp.reshape(X, (m * T, n_in))

    def proj(W, b, d):
        P = Xf @ xp.matrix_transpose(xp.reshape(W, (H * d, n_in))) + xp.reshape(b, (1, H * d))
        return xp.permute_dims(xp.reshape(P, (m, T, H, d)), (0, 2, 1, 3))

    def gate(w, b):
        G = Xf @ xp.matrix_transpose(w) + xp.reshape(b, (1, H))
        return xp.permute_dims(xp.reshape(G, (m, T, H)), (0, 2, 1))

    q, v = proj(p["Wq"], p["bq"], d_qk), proj(p["Wv"], p["bv"], d_v)
    k = proj(p["Wk"], p["bk"], d_qk) / (d_qk ** 0.5)
    ig, fg = gate(p["wi"], p["bi"]), gate(p["wf"], p["bf"])
    if active is not None:
        inf = xp.full_like(ig, float("inf"))
        ig = xp.where(active, ig, -inf)  # a padded step writes nothing ...
        fg = xp.where(active, fg, inf)  # ... and forgets nothing
    if form == "chunkwise":
        ht, final, inner = chunkwise_forward(xp, q, k, v, ig, fg, state, chunk, keep=keep)
    else:
        run = recurrent_forward if form == "recurrent" else parallel_forward
        ht, final, inner = run(xp, q, k, v, ig, fg, state, keep=keep)
    ht = xp.reshape(xp.permute_dims(ht, (0, 2, 1, 3)), (m, T, n_h))
    zo = Xf @ xp.matrix_transpose(p["Wo"]) + xp.reshape(p["bo"], (1, n_h))
    o = xp.reshape(0.5 * xp.tanh(0.5 * zo) + 0.5, (m, T, n_h))  # sigmoid
    y = o * ht
    if not keep:
        return y, final, None
    kept = _Kept(copy(Xf), {key: copy(a) for key, a in p.items()}, form, o, ht,
                 _c_order(inner), active)
    return y, final, kept


def _c_order(obj):
    """``obj`` (arrays in tuples, lists and dicts) with every numpy or CuPy array in C
    order: a copied or pickled cache (which numpy writes in C order) then feeds the
    backward pass's products the same layouts, so that it gives the same bits (numpy 1.26
    rounded 5 of 30 elements of ``dx`` differently after a pickle round trip)."""
    from .._lib.compat import c_contiguous

    if isinstance(obj, (tuple, list)):
        return type(obj)(_c_order(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _c_order(v) for k, v in obj.items()}
    return c_contiguous(obj) if hasattr(obj, "shape") else obj


def layer_backward(xp, dY, kept, dC, dn, *, H, d_qk, d_v):
    """The backward pass of :func:`layer_forward`: ``dY (m, T, n_h)`` and the gradients on
    the final ``C`` and ``n`` (or ``None``) to ``dX (m, T, n_in)``, the gradients on the
    initial ``C`` and ``n``, and the parameters' (keyed like them). ``dY`` must be zero past
    each sequence's end (the model zeroes it once for every layer)."""
    Xf, p = kept.X, kept.params
    m, T, n_h = dY.shape
    n_in = Xf.shape[1]
    o, ht = kept.o, kept.ht
    dzo = xp.reshape(dY * ht * o * (1.0 - o), (m * T, n_h))
    grads = {"Wo": xp.matrix_transpose(dzo) @ Xf, "bo": xp.reshape(xp.sum(dzo, axis=0), (n_h, 1))}
    dX = dzo @ p["Wo"]
    dht = xp.permute_dims(xp.reshape(dY * o, (m, T, H, d_v)), (0, 2, 1, 3))
    inner = kept.inner
    back = {"recurrent": recurrent_backward, "parallel": parallel_backward,
            "chunkwise": chunkwise_backward}[kept.form]
    dq, dk, dv, dig, dfg, dC0, dn0 = back(xp, dht, inner, dC, dn)
    if kept.active is not None:  # the padded steps' gates were constants
        dig = xp.where(kept.active, dig, xp.zeros_like(dig))
        dfg = xp.where(kept.active, dfg, xp.zeros_like(dfg))
    dk = dk / (d_qk ** 0.5)
    for key, d, n_d in (("q", dq, d_qk), ("k", dk, d_qk), ("v", dv, d_v)):
        df = xp.reshape(xp.permute_dims(d, (0, 2, 1, 3)), (m * T, H * n_d))
        grads["W" + key] = xp.reshape(xp.matrix_transpose(df) @ Xf, (H, n_d, n_in))
        grads["b" + key] = xp.reshape(xp.sum(df, axis=0), (H, n_d, 1))
        dX = dX + df @ xp.reshape(p["W" + key], (H * n_d, n_in))
    for key, d in (("i", dig), ("f", dfg)):
        df = xp.reshape(xp.permute_dims(d, (0, 2, 1)), (m * T, H))
        grads["w" + key] = xp.matrix_transpose(df) @ Xf
        grads["b" + key] = xp.reshape(xp.sum(df, axis=0), (H, 1))
        dX = dX + df @ p["w" + key]
    return xp.reshape(dX, (m, T, n_in)), dC0, dn0, {key: grads[key] for key in p}


def _gib(n):
    """``n`` bytes, for a message."""
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


class _Blocks:
    """The output ``(m, T, n)`` of a layer run in blocks of steps, gathered along ``T``.

    A single block is the output as it is. Otherwise, where the namespace allows writes,
    the output is allocated at the first block and each block written into it, so that the
    memory is the output plus one block; elsewhere (JAX: no writes) the blocks are
    concatenated at the end.
    """

    def __init__(self, xp, T, like):
        self.xp, self.T, self.like = xp, T, like
        self.buf, self.parts = None, []

    def put(self, t0, y):
        """Block ``y (m, t1 - t0, n)`` of steps ``t0:t1``."""
        from .._lib.compat import is_writeable

        if self.buf is None and y.shape[1] < self.T and is_writeable(self.like):
            self.buf = self.xp.empty((y.shape[0], self.T, y.shape[2]), dtype=y.dtype,
                                     device=_device(y))
        if self.buf is not None:
            self.buf[:, t0 : t0 + y.shape[1], :] = y
        else:
            self.parts.append(y)

    def result(self):
        """The whole output."""
        if self.buf is not None:
            return self.buf
        return self.parts[0] if len(self.parts) == 1 else self.xp.concat(self.parts, axis=1)


class MLSTMLayer:
    """The mLSTM's layer (:class:`~xlstm.models.layers.Layer`): the up-projections of ``q``,
    ``k``, ``v`` and the gates, one of the three forms (``opts["form"]``), and the output
    gate.

    Parameters
    ----------
    n_h : int
        Hidden size, ``H d_v``.
    H : int
        Heads.
    d_qk : int
        Query and key size per head.
    chunk : int
        Steps per chunk of the chunkwise form.
    """

    name = "mlstm"
    state_names = ("C", "N", "M")
    frozen = ("M",)  # the stabiliser carries no gradient ...
    positive = ()
    scaled = ("C", "N")  # ... and C and n are defined up to its scale
    state_axes = ("H, d_v, d_qk, m", "H, d_qk, m", "H, m")

    def __init__(self, n_h: int, H: int, d_qk: int, chunk: int) -> None:
        self.n_h, self.H, self.d_qk, self.d_v, self.chunk = n_h, H, d_qk, n_h // H, chunk

    def config(self) -> tuple:
        return (self.H, self.d_qk)

    def param_shapes(self, n_in: int) -> dict:
        H, dqk, dv, nh = self.H, self.d_qk, self.d_v, self.n_h
        return {"Wq": (H, dqk, n_in), "bq": (H, dqk, 1), "Wk": (H, dqk, n_in),
                "bk": (H, dqk, 1), "Wv": (H, dv, n_in), "bv": (H, dv, 1), "wi": (H, n_in),
                "bi": (H, 1), "wf": (H, n_in), "bf": (H, 1), "Wo": (nh, n_in), "bo": (nh, 1)}

    def init_params(self, rng: Any, n_in: int) -> dict:
        """Uniform in ``(-k, k)``, ``k = 1 / sqrt(n_in)``: host numpy arrays."""
        k = 1.0 / np.sqrt(n_in)
        return {key: rng.uniform(-k, k, size=shape)
                for key, shape in self.param_shapes(n_in).items()}

    def state_shapes(self, m: int) -> tuple:
        return ((self.H, self.d_v, self.d_qk, m), (self.H, self.d_qk, m), (self.H, m))

    def forward(self, x, state0, params, *, xp, keep, active, opts):
        X = xp.permute_dims(x, (1, 0, 2))  # (m, T, n_in)
        m, T, _ = X.shape
        dims = {"H": self.H, "d_qk": self.d_qk, "d_v": self.d_v, "chunk": self.chunk}
        if state0[0] is None:
            H, dqk, dv = self.H, self.d_qk, self.d_v
            zeros = {"dtype": X.dtype, "device": _device(X)}
            state = (xp.zeros((m, H, dv, dqk), **zeros), xp.zeros((m, H, dqk), **zeros),
                     xp.zeros((m, H), **zeros))
        else:
            state = tuple(state0)  # the forms' layout, batch first
        act = None if active is None else xp.permute_dims(active, (1, 2, 0))  # (m, 1, T)
        asked = opts["form"]
        form = asked
        if form == "auto":
            form = "parallel" if T <= self.chunk else "chunkwise"
        fit = self._parallel_fit(m, X.dtype, xp)
        if keep:
            block = T
        else:  # blocks of whole chunks: the memory does not grow with T
            block = max(self.chunk, _engine.CHUNK_ROWS // m // self.chunk * self.chunk)
            if form == "parallel":  # and the parallel form's blocks within the bound
                block = max(1, min(block, fit))
        side = min(T, block) if form == "parallel" else min(T, self.chunk)
        if form != "recurrent" and side > fit:
            raise ValueError(self._too_big(asked, form, side, m, T, X.dtype, xp, fit))
        out, kept = _Blocks(xp, T, X), None
        for t0 in range(0, T, block):
            t1 = min(t0 + block, T)  # the array API leaves stops past the end unspecified
            part = None if act is None else act[..., t0:t1]
            y, state, kept = layer_forward(xp, params, X[:, t0:t1, :], state, part, form,
                                           keep=keep, **dims)
            out.put(t0, y)
            del y  # one block alive at a time beside the output
        return xp.permute_dims(out.result(), (1, 0, 2)), tuple(state), kept

    def _parallel_fit(self, m, dtype, xp):
        """The most steps ``L`` whose ``(m, H, L, L)`` array of ``dtype`` fits in
        :data:`~xlstm.mlstm.MAX_PARALLEL_BYTES`."""
        import math

        itemsize = xp.finfo(dtype).bits // 8
        return math.isqrt(MAX_PARALLEL_BYTES // (m * self.H * itemsize))

    def _too_big(self, asked, form, side, m, T, dtype, xp, fit):
        """The message of a run whose parallel blocks of ``side`` steps exceed the bound."""
        itemsize = xp.finfo(dtype).bits // 8
        need = m * self.H * side * side * itemsize
        if asked == "parallel":
            what = f"form='parallel' over T={T} steps"
            fix = f"form='chunkwise' with chunk <= {fit} (memory grows as T * chunk)"
        else:
            what = (f"chunk={self.chunk} with form={asked!r} (the {form} form over "
                    f"{side} steps at once)")
            fix = f"chunk <= {fit}"
        return (f"{what} needs arrays (m, H, L, L) = ({m}, {self.H}, {side}, {side}) "
                f"of {_gib(need)} each, about eight of them in a backward pass; the bound "
                f"xlstm.mlstm.MAX_PARALLEL_BYTES is {_gib(MAX_PARALLEL_BYTES)}: pass {fix}, "
                "or raise the bound on a machine with the memory")

    def prepare(self, params, *, xp):
        return params

    def step(self, x, state, prepared, *, xp):
        """One step of the recurrent form: ``x (m, n_in)``, the state batch first."""
        y, state, _ = layer_forward(xp, prepared, x[:, None, :], state, None, "recurrent",
                                    H=self.H, d_qk=self.d_qk, d_v=self.d_v, chunk=self.chunk,
                                    keep=False)
        return y[:, 0, :], tuple(state)

    def backward(self, dy, kept, dstate, *, xp, active):
        dC, dn = (None, None) if dstate is None else dstate[:2]
        dX, dC0, dn0, grads = layer_backward(
            xp, xp.permute_dims(dy, (1, 0, 2)), kept, dC, dn, H=self.H, d_qk=self.d_qk,
            d_v=self.d_v)
        m = dX.shape[0]
        dm0 = xp.zeros((m, self.H), dtype=dX.dtype, device=_device(dX))
        return xp.permute_dims(dX, (1, 0, 2)), (dC0, dn0, dm0), grads

    def __repr__(self):
        return f"MLSTMLayer(n_h={self.n_h}, H={self.H}, d_qk={self.d_qk}, chunk={self.chunk})"


class MLSTM(_Model):
    """The mLSTM of xLSTM (Beck et al. 2024): per head a matrix memory ``C (d_v, d_qk)``
    written with exponential input gates and read with a query (the module's equations);
    no hidden-to-hidden recurrence, so besides the recurrent form it runs in a parallel and
    a chunkwise form, which agree with it to rounding.

    Each (layer, direction) holds ``Wq, Wk (H, d_qk, n_in)``, ``bq, bk (H, d_qk, 1)``,
    ``Wv (H, d_v, n_in)``, ``bv (H, d_v, 1)`` with ``d_v = n_h / H``, ``wi, wf (H, n_in)``,
    ``bi, bf (H, 1)``, ``Wo (n_h, n_in)``, ``bo (n_h, 1)`` (``n_in`` is ``n_x`` for the first
    layer, ``D n_h`` after); head ``k``'s output is rows ``k d_v:(k + 1) d_v`` of ``h =
    sigmoid(Wo x + bo) * h~``. State ``(C, n, m)`` of shapes ``(num_layers D, H, d_v, d_qk,
    m)``, ``(num_layers D, H, d_qk, m)`` and ``(num_layers D, H, m)``, batch last and
    indexed ``layer D + direction`` as the other models' states; ``m`` is the stabiliser,
    which gets no gradient. Where ``n`` is zero (a zero state) a head's memory is empty and
    its first step starts it afresh.

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
        chunkwise beyond. The parallel form's ``(m, H, L, L)`` arrays (``L`` the steps it
        runs at once) are bounded by :data:`~xlstm.mlstm.MAX_PARALLEL_BYTES`: a call past
        it is refused, naming the chunk that fits.
    chunk : int, optional
        Steps per chunk of the chunkwise form.
    **kwargs
        ``num_layers``, ``bidirectional``, ``dropout``, ``layout``, ``xp``, ``dtype``,
        ``device`` and ``seed``, as for :class:`xlstm.LSTM`.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> model = xlstm.MLSTM(3, 8, num_heads=2, dtype="float64")
    >>> x = np.random.default_rng(0).standard_normal((3, 2, 100))
    >>> y, (C, n, m) = model(x)             # T <= chunk: the parallel form
    >>> C.shape                             # (L D, H, d_v, d_qk, m)
    (1, 2, 4, 4, 2)
    >>> y2, _, _ = model.forward(x, form="recurrent", return_cache=False)
    >>> bool(np.allclose(y, y2))            # the forms agree to rounding
    True
    """

    torch_name = None
    variants = {"mlstm": {}}

    def __init__(self, n_x: int, n_h: int, *, num_heads: int = 1, d_qk: int | None = None,
                 form: str = "auto", chunk: int = 64, **kwargs: Any) -> None:
        from .._lib.checks import positive_int

        n_h = positive_int("n_h", n_h)
        self.num_heads = positive_int("num_heads", num_heads)
        if n_h % self.num_heads:
            raise ValueError(f"n_h={n_h} is not divisible by num_heads={num_heads}")
        self.d_v = n_h // self.num_heads
        self.d_qk = self.d_v if d_qk is None else positive_int("d_qk", d_qk)
        self.form = self._form(form)
        self.chunk = positive_int("chunk", chunk)
        super().__init__(n_x, n_h, **kwargs)

    @staticmethod
    def _form(form):
        if form not in ("auto", *FORMS):
            raise ValueError(f"form must be one of {('auto', *FORMS)}, got {form!r}")
        return form

    _hidden = "n_h"

    def _make_layer(self):
        return MLSTMLayer(self.n_h, self.num_heads, self.d_qk, self.chunk)

    def _extra_config(self):
        return {"num_heads": self.num_heads, "d_qk": self.d_qk, "form": self.form,
                "chunk": self.chunk}

    # ------------------------------------------------------------------ running
    @overload
    def forward(
        self, x: Array, state: Any = None, *, lengths: Array | None = None,
        params: Sequence[Mapping[str, Array]] | None = None, train: bool = False,
        seed: int | None = None,
        return_cache: Literal[True] = True, form: str | None = None,
    ) -> tuple[Array, tuple[Array, ...], ModelCache]: ...

    @overload
    def forward(
        self, x: Array, state: Any = None, *, lengths: Array | None = None,
        params: Sequence[Mapping[str, Array]] | None = None, train: bool = False,
        seed: int | None = None,
        return_cache: Literal[False], form: str | None = None,
    ) -> tuple[Array, tuple[Array, ...], None]: ...

    @overload
    def forward(
        self, x: Array, state: Any = None, *, lengths: Array | None = None,
        params: Sequence[Mapping[str, Array]] | None = None, train: bool = False,
        seed: int | None = None,
        return_cache: bool, form: str | None = None,
    ) -> tuple[Array, tuple[Array, ...], ModelCache | None]: ...

    def forward(
        self, x: Array, state: Any = None, *, lengths: Array | None = None,
        params: Sequence[Mapping[str, Array]] | None = None, train: bool = False,
        seed: int | None = None,
        return_cache: bool = True, form: str | None = None,
    ) -> tuple[Array, tuple[Array, ...], ModelCache | None]:
        """Run the model over a batch of sequences.

        Parameters
        ----------
        x : array, shape (n_x, m, T), or (m, T, n_x) with ``layout="batch_first"``
            Inputs, in the namespace, dtype and device of the parameters.
        state : tuple (C, n, m), optional
            The initial state (the class's shapes); default zeros (empty memories).
        lengths : integer array of shape (m,), optional
            Each sequence's length in ``[1, T]``: past it the state is frozen and the
            output is zero; the reverse direction starts at each sequence's own end.
        params : list of dicts, optional
            Parameters to use instead of ``self.params``.
        train : bool, optional
            Training mode: dropout between layers (none with one layer).
        seed : int, optional
            Seed of the dropout masks; required when they are drawn.
        return_cache : bool, optional
            False keeps nothing for a backward pass, and runs the sequence in blocks of
            steps, so that the memory beyond the outputs does not grow with ``T``.
        form : {"auto", "recurrent", "parallel", "chunkwise"}, optional
            The form for this call (default ``self.form``).

        Returns
        -------
        y : array, shape (D * n_h, m, T), or (m, T, D * n_h)
            The last layer's outputs, ``[forward; reverse]``.
        state : tuple (C, n, m)
            The final state.
        cache : ModelCache or None
            What :meth:`backward` needs.

        Raises
        ------
        ValueError
            If the parallel form would need arrays larger than
            :data:`~xlstm.mlstm.MAX_PARALLEL_BYTES` (``form="parallel"`` over a long
            sequence with a cache, or a large ``chunk``); the message names the form or
            chunk that fits.
        """
        form = self._form(self.form if form is None else form)
        return self._forward(x, state, lengths=lengths, params=params, train=train, seed=seed,
                             return_cache=return_cache, opts={"form": form})

    def _defaults(self):
        return {**super()._defaults(), "d_qk": self.d_v}  # None means d_v
