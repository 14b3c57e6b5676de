"""The fused sequence engine: the notebook's equations regrouped around big matrix products.

Internal layout is time-major with the batch in rows: a step's gates are one ``(m, 4 n_a)``
block in gate order (o, f, i, c) (see :mod:`xlstm.params`), hidden and cell states are
``(m, n_a)``, and a sequence of them is ``(T, m, n_a)``.

Forward, per chunk of time steps: one GEMM for the input projections of all its steps; per
step one recurrent GEMM plus :func:`step_forward`. Backward: the activation-derivative
coefficients of all steps in a few vectorised operations, then per step
:func:`step_backward` plus one GEMM ``dG @ Wa``; after the loop ``dW``, ``db`` and ``dx`` are
single GEMMs and reductions over the stacked ``dG``.

The two ``step_*`` functions hold all pointwise math; the cell functions in
:mod:`xlstm.lstm` call the same ones, so there is one path for the arithmetic. Two optional
accelerators run the same loops over preallocated stacks and evaluate the same expressions
in compiled code (:func:`accelerated_loops`): on numpy the loops of :mod:`xlstm._cpu` (with
numba installed; bit-identical results), on CuPy the fused kernels of :mod:`xlstm._cuda`.
On JAX the array path's per-step loops are written as :func:`scan`, which runs as
``jax.lax.scan`` (:class:`ScanLoops`), so that ``jax.jit`` compiles one loop body instead
of unrolling every step. ``XLSTM_ACCEL=0`` turns all of them off.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Iterator
from collections import namedtuple

from ._compat import c_contiguous, copy, device_of, is_cupy, is_jax, is_numpy, is_writeable
from .activations import _softmax
from .params import PARAM_KEYS, fused_backward_weights, fused_forward_weights

#: Rows (time steps x batch) per input-projection GEMM. Bounds the temporary ``Gx`` block
#: so that memory beyond the outputs does not grow with ``T_x``.
CHUNK_ROWS = 4096

State = namedtuple("State", "A C S CCT TC X params n_a")
State.__doc__ = """Stacked forward state kept for the backward pass.

A, C : (T+1, m, n_a)  hidden and cell states, index 0 holds a0 / c0
S    : (T, m, 3 n_a)  sigmoid gates (o, f, i)
CCT  : (T, m, n_a)    candidate values
TC   : (T, m, n_a)    tanh(c)
X    : (T*m, n_x)     a time-major copy of the input
params               a copy of the parameter dict, taken by the forward pass
"""


# --------------------------------------------------------------------------- pointwise math
def step_forward(g, c_prev, n_a, *, xp):
    """Pointwise part of one forward step, equations (1)-(6).

    ``g`` is the ``(..., m, 4 n_a)`` pre-activation in gate order (o, f, i, c) with the
    sigmoid gates already halved, so ``tanh(g)`` gives every gate with one call.
    Returns ``(s, cct, c, tc, a)``: sigmoid gates (o, f, i), candidate, cell state,
    ``tanh(c)`` and hidden state.
    """
    t = xp.tanh(g)
    s = 0.5 * t[..., : 3 * n_a] + 0.5  # (1), (2), (5): sigmoid = 0.5 tanh(z/2) + 0.5
    cct = t[..., 3 * n_a :]  # (3)
    c = s[..., n_a : 2 * n_a] * c_prev + s[..., 2 * n_a :] * cct  # (4)
    tc = xp.tanh(c)
    a = s[..., :n_a] * tc  # (6)
    return s, cct, c, tc, a


def backward_coefficients(s, cct, tc, c_prev, n_a, *, xp):
    """Per-step factors of equations (7)-(10) that depend only on the forward pass.

    With ``da`` and ``dc`` the gradients arriving at a step, the step's pre-activation
    gradient is ``[da * Q, (dc + da * K) * P]`` (see :func:`step_backward`), where

    * ``K = o (1 - tanh^2 c)``: the path from ``a`` back into ``c`` (eq. 7-10),
    * ``Q = tanh(c) o (1 - o)``: eq. (7) without ``da``,
    * ``P = [c_prev f (1-f), cct i (1-i), i (1 - cct^2)]``: eqs. (10), (9), (8) without the
      common factor, shaped ``(..., m, 3, n_a)``.

    Works for one step or, vectorised, for a whole ``(T, m, ...)`` stack.
    """
    o = s[..., :n_a]
    f = s[..., n_a : 2 * n_a]
    i = s[..., 2 * n_a :]
    K = o * (1.0 - tc * tc)
    Q = tc * o * (1.0 - o)
    P = xp.stack([c_prev * f * (1.0 - f), cct * i * (1.0 - i), i * (1.0 - cct * cct)], axis=-2)
    return K, Q, P


def step_backward(da, dc, K, Q, P, f, *, xp):
    """Pointwise part of one backward step: equations (7)-(10) and (20).

    ``da`` and ``dc`` are the total gradients reaching this step's ``a`` and ``c``.
    Returns ``(dg, dc_prev)``: the ``(m, 4 n_a)`` pre-activation gradient in gate order
    (o, f, i, c) and the gradient flowing into ``c_prev``.
    """
    dct = dc + da * K  # dL/dc_t, through c directly and through a = o tanh(c)
    dsig = xp.reshape(dct[..., None, :] * P, (*dct.shape[:-1], 3 * dct.shape[-1]))
    dg = xp.concat([da * Q, dsig], axis=-1)  # (7), (10), (9), (8)
    return dg, dct * f  # (20)


@functools.cache
def cpu_loops_module():
    """``(module, reason)``: :mod:`xlstm._cpu` where numba loads, else ``None`` and why not.

    A numba that is missing, or that was built for another numpy (it refuses to import),
    leaves numpy on the array path, with the same results, rather than failing the call.
    """
    if importlib.util.find_spec("numba") is None:
        return None, "numba is not installed"
    try:
        from . import _cpu
    except ImportError as exc:  # for instance "Numba needs NumPy 2.3 or less"
        return None, f"numba does not load: {exc}"
    return _cpu, None


def scan(step, static, consts, carry, xs, *, reverse=False):
    """The plain time loop: ``step`` over the leading axis of every array in ``xs``.

    ``step(static, consts, carry, x_t) -> (carry, y_t)``: ``static`` is a hashable tuple of
    Python values (sizes, the namespace), ``consts`` a tuple of arrays read by every step,
    ``carry``, ``x_t`` and ``y_t`` tuples of arrays; ``x_t`` holds the ``t``-th slice of
    each array of ``xs``. Returns the last carry and the ``y_t`` stacked along a new leading
    axis (``ys[t]`` comes from ``xs[t]``, also when ``reverse`` runs the steps from last
    to first). The contract is that of ``jax.lax.scan``, which :class:`ScanLoops` puts in
    its place on JAX; ``step`` must be a module-level function so that its compiled form
    can be reused.
    """
    # Per-step tuples are built from lists: tuple() of a generator over-allocates and
    # shrinks, and the shrunk tuples pile up in CPython's free lists, so the memory
    # traced on the way would grow with the number of steps.
    xp = static[0]
    n = xs[0].shape[0]
    ys = []
    for t in range(n - 1, -1, -1) if reverse else range(n):
        carry, y = step(static, consts, carry, tuple([v[t, ...] for v in xs]))
        ys.append(y)
    if reverse:
        ys.reverse()
    return carry, tuple(xp.stack(v) for v in zip(*ys))


@functools.cache
def _jax_scan(step, static, reverse):
    """``jax.lax.scan`` of ``step``, compiled once per ``(step, static, reverse)`` and shape.

    Wrapped in ``jax.jit`` so that calls outside a compiled function reuse the compiled
    loop instead of tracing and compiling it anew on every call; inside ``jax.jit``,
    ``jax.grad`` or ``jax.vmap`` it is traced into the caller's program.
    """
    import jax

    def run(consts, carry, xs):
        body = functools.partial(step, static, consts)
        return jax.lax.scan(body, carry, xs, reverse=reverse)

    return jax.jit(run)


class ScanLoops:
    """JAX's accelerated loop: :func:`scan` as ``jax.lax.scan``.

    The array path's step functions run unchanged, as one compiled loop body, so that under
    ``jax.jit`` the compile time no longer grows with the number of steps.
    """

    #: How reports and the benchmark name this accelerator.
    label = "lax.scan"

    @staticmethod
    def scan(step, static, consts, carry, xs, *, reverse=False):
        """:func:`scan` with the same arguments, run by ``jax.lax.scan``."""
        return _jax_scan(step, static, reverse)(tuple(consts), tuple(carry), tuple(xs))


#: The innermost :func:`accelerators` switch of this thread or task (None: no switch).
_ACCEL_SWITCH: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "xlstm_accelerators", default=None
)


def accel_enabled() -> bool:
    """Whether the accelerators may run now: the innermost :func:`accelerators` switch
    where one is active, else the environment (``XLSTM_ACCEL=0`` turns them off; read at
    every call). The one reader of ``XLSTM_ACCEL``."""
    forced = _ACCEL_SWITCH.get()
    if forced is not None:
        return forced
    return os.environ.get("XLSTM_ACCEL", "1") != "0"


@contextlib.contextmanager
def accelerators(enabled: bool) -> Iterator[None]:
    """Turn the accelerated loops on or off inside a ``with`` block.

    ``with xlstm.accelerators(False):`` runs every call in the block on the plain array
    path, as ``XLSTM_ACCEL=0`` does, whatever the environment says; ``accelerators(True)``
    allows them even where ``XLSTM_ACCEL=0`` is set. The accelerators are numba's compiled
    loops on numpy, the fused CUDA kernels on CuPy and ``jax.lax.scan`` on JAX; results are
    the same either way (bit for bit on numpy, to rounding elsewhere).

    The switch is a context variable: it holds for the current thread (or asyncio task)
    only, and blocks nest, the innermost winning. Under ``jax.jit`` it takes effect when the
    function is traced.

    Parameters
    ----------
    enabled : bool
        True allows the accelerators, False turns them off.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    token = _ACCEL_SWITCH.set(enabled)
    try:
        yield
    finally:
        _ACCEL_SWITCH.reset(token)


def accelerated_loops(xp, dtype):
    """The compiled time loops for namespace ``xp`` and ``dtype``, or ``None``.

    On numpy with numba installed, :mod:`xlstm._cpu` (bit-identical to the array path); on
    CuPy, the fused CUDA kernels of :mod:`xlstm._cuda` (the same arithmetic, from the
    ``.cuh`` source that the tests also run on the CPU). Only for float32 and float64;
    ``XLSTM_ACCEL=0`` or :func:`accelerators` turns them off. Their ``forward`` and
    ``backward`` methods run the loops of :func:`forward` and :func:`backward` over
    preallocated stacks.

    On JAX (any floating dtype), :class:`ScanLoops`: the array path itself, with
    ``jax.lax.scan`` as its :func:`scan`. ``XLSTM_ACCEL=0`` gives the plain Python loop.
    """
    if not accel_enabled():
        return None
    if is_jax(xp):
        return ScanLoops()
    if dtype not in (xp.float32, xp.float64):
        return None
    if is_numpy(xp):
        cpu, _ = cpu_loops_module()
        return None if cpu is None else cpu.loops(dtype)
    if is_cupy(xp):
        from . import _cuda

        return _cuda.loops(dtype)
    return None


def _dispatch(xp, dtype):
    """``(loops, scan)``: the buffered loops (or ``None``) and the array path's loop."""
    loops = accelerated_loops(xp, dtype)
    if isinstance(loops, ScanLoops):
        return None, loops.scan
    return loops, scan


# ------------------------------------------------------------------------------ sequences
def _forward_step(static, consts, carry, inputs):
    """One forward step of the array path, for :func:`scan` over the chunk's ``Gx``.

    Returns the new ``(a, c)`` and the step's values named in ``static[2]`` (a subset of
    ``S, CCT, C, TC, A``, in that order).
    """
    xp, n_a, names = static
    (WaT,), (a, c), (gx,) = consts, carry, inputs
    s, cct, c, tc, a = step_forward(gx + a @ WaT, c, n_a, xp=xp)
    out = {"S": s, "CCT": cct, "C": c, "TC": tc, "A": a}
    return (a, c), tuple([out[k] for k in names])


def _backward_step(static, consts, carry, inputs):
    """One backward step of the array path, for a reversed :func:`scan`.

    Carries ``(da_rec, dc)``, the gradients reaching the step from the step after it,
    and returns the step's pre-activation gradient ``dg``.
    """
    (xp,), (WaT,), (da_rec, dc) = static, consts, carry
    da, K, Q, P, f = inputs
    dg, dc = step_backward(da + da_rec, dc, K, Q, P, f, xp=xp)
    da_rec = xp.matrix_transpose(WaT @ xp.matrix_transpose(dg))  # (19), recurrent part
    return (da_rec, dc), (dg,)


class _Collect:
    """Gathers blocks along a leading time axis into one array of ``length`` rows.

    A single block that covers everything is returned as it is. Otherwise, where the
    namespace allows writes, the result is preallocated and filled block by block, so peak
    memory is the result plus one block; elsewhere (JAX) the blocks are concatenated.
    """

    def __init__(self, xp, length, like):
        self.xp, self.length, self.like = xp, length, like
        self.blocks = []  # (start, block) pairs while no buffer is allocated
        self.buf = None

    def put(self, start, block):
        if self.buf is None and block.shape[0] < self.length and is_writeable(self.like):
            self.buf = self.xp.empty(
                (self.length, *block.shape[1:]), dtype=block.dtype, device=device_of(block)
            )
            for s0, b in self.blocks:
                self.buf[s0 : s0 + b.shape[0], ...] = b
            self.blocks = []
        if self.buf is not None:
            self.buf[start : start + block.shape[0], ...] = block
        else:
            self.blocks.append((start, block))

    def result(self):
        if self.buf is not None:
            return self.buf
        if len(self.blocks) == 1:
            return self.blocks[0][1]
        return self.xp.concat([b for _, b in self.blocks], axis=0)


def forward(x, a0, c0, params, n_a, *, xp, keep):
    """Run the LSTM over ``x`` (seed layout ``(n_x, m, T)``).

    Returns ``(A, C, Y, state)`` with ``A, C`` of shape ``(T+1, m, n_a)`` (index 0 holds the
    initial state), ``Y`` of shape ``(T, m, n_y)`` and ``state`` a :class:`State` when
    ``keep`` is true, else ``None``.
    """
    n_x, m, T = x.shape
    dtype, dev = x.dtype, device_of(x)
    if keep:
        # What the backward pass reads is fixed now: a later write into the caller's
        # arrays, or a key rebound in their dict, cannot change the gradients.
        params = {k: copy(params[k]) for k in PARAM_KEYS}
    WaT, WxT, b = fused_forward_weights(params, n_a, xp=xp)
    WyT = xp.matrix_transpose(params["Wy"])
    by = xp.matrix_transpose(params["by"])
    n_y = WyT.shape[1]
    a = xp.matrix_transpose(a0)
    c = xp.zeros((m, n_a), dtype=dtype, device=dev) if c0 is None else xp.matrix_transpose(c0)
    if keep:
        # A time-major copy, so that a later write into the caller's x cannot change what
        # the backward pass computes.
        X = xp.reshape(xp.permute_dims(x, (2, 1, 0)), (T * m, n_x), copy=True)

    loops, run = _dispatch(xp, dtype)
    chunk = max(1, min(T, CHUNK_ROWS // m))
    names = ("A", "C", "S", "CCT", "TC") if keep else ("A", "C")
    collected = ("Y",) if loops is not None else (*names, "Y")
    outs = {k: _Collect(xp, T + 1 if k in ("A", "C") else T, x) for k in collected}
    if loops is not None:  # preallocated stacks, written in place step by step
        slots = T if keep else 1  # inference reuses one slot of S, CCT, TC
        shapes = {"A": (T + 1, m, n_a), "C": (T + 1, m, n_a), "S": (slots, m, 3 * n_a),
                  "CCT": (slots, m, n_a), "TC": (slots, m, n_a)}  # fmt: skip
        bufs = {k: xp.empty(v, dtype=dtype, device=dev) for k, v in shapes.items()}
        bufs["A"][0, ...], bufs["C"][0, ...] = a, c
    else:
        outs["A"].put(0, a[None, ...])
        outs["C"].put(0, c[None, ...])
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        if keep:
            rows = X[t0 * m : t1 * m, :]
        else:
            # C-ordered like X above, so that both paths' input GEMMs round alike (numpy
            # < 2.3 takes another kernel for a strided operand)
            rows = c_contiguous(
                xp.reshape(xp.permute_dims(x[:, :, t0:t1], (2, 1, 0)), ((t1 - t0) * m, n_x))
            )
        Gx = xp.reshape(rows @ WxT + b, (t1 - t0, m, 4 * n_a))
        if loops is not None:
            sl = slice(t0, t1) if keep else slice(0, 1)
            scratch = (bufs[k][sl, ...] for k in ("S", "CCT", "TC"))
            loops.forward(Gx, WaT, bufs["A"], bufs["C"], *scratch, t0)
            A_new = bufs["A"][t0 + 1 : t1 + 1, ...]
        else:
            (a, c), ys = run(_forward_step, (xp, n_a, names), (WaT,), (a, c), (Gx,))
            blocks = dict(zip(names, ys))
            for k, block in blocks.items():
                outs[k].put(t0 + 1 if k in ("A", "C") else t0, block)
            A_new = blocks["A"]
        logits = xp.reshape(A_new, ((t1 - t0) * m, n_a)) @ WyT + by  # prediction
        y = _softmax(logits, -1, xp=xp)
        outs["Y"].put(t0, xp.reshape(y, (t1 - t0, m, n_y)))
    res = {k: v.result() for k, v in outs.items()}
    if loops is not None:
        res.update(bufs)
    state = None
    if keep:
        state = State(res["A"], res["C"], res["S"], res["CCT"], res["TC"], X, params, n_a)
    return res["A"], res["C"], res["Y"], state


def backward(da, state, *, xp):
    """Backward pass over the first ``T_da = da.shape[-1]`` steps of a kept forward pass.

    ``da`` is in seed layout ``(n_a, m, T_da)``. Returns ``(dX, da0, dc0, dW, db)`` with
    ``dX`` time-major ``(T_da, m, n_x)``, ``da0, dc0`` of shape ``(m, n_a)``,
    ``dW`` ``(4 n_a, n_a + n_x)`` and ``db`` ``(4 n_a, 1)``, in gate order (o, f, i, c).
    """
    n_a = state.n_a
    T = da.shape[-1]
    m = da.shape[1]
    dtype, dev = da.dtype, device_of(da)
    WaT, Wx = fused_backward_weights(state.params, n_a, xp=xp)
    S, CCT, TC = state.S[:T, ...], state.CCT[:T, ...], state.TC[:T, ...]
    da_t = xp.permute_dims(da, (2, 1, 0))
    loops, run = _dispatch(xp, dtype)
    if loops is not None:
        dG = xp.empty((T, m, 4 * n_a), dtype=dtype, device=dev)
        da_rec, dc = loops.backward(da_t, S, CCT, TC, state.C[:T, ...], WaT, dG)
    else:
        K, Q, P = backward_coefficients(S, CCT, TC, state.C[:T, ...], n_a, xp=xp)
        F = S[..., n_a : 2 * n_a]
        zeros = xp.zeros((m, n_a), dtype=dtype, device=dev)
        (da_rec, dc), (dG,) = run(_backward_step, (xp,), (WaT,), (zeros, zeros),
                                  (da_t, K, Q, P, F), reverse=True)
    dG = xp.reshape(dG, (T * m, 4 * n_a))
    dGT = xp.matrix_transpose(dG)
    A_prev = xp.reshape(state.A[:T, ...], (T * m, n_a))
    dW = xp.concat([dGT @ A_prev, dGT @ state.X[: T * m, :]], axis=1)  # (11)-(14)
    db = xp.sum(dGT, axis=1, keepdims=True)  # (15)-(18)
    dX = xp.reshape(dG @ Wx, (T, m, Wx.shape[1]))  # (21)
    return dX, da_rec, dc, dW, db
