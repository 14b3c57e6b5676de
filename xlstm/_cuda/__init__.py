"""Fused CUDA kernels for the pointwise part of each LSTM step (CuPy only).

:func:`xlstm._engine.pointwise` imports this module only when the arrays are CuPy's and
``XLSTM_ACCEL`` is not ``"0"``. Its :func:`step_forward` and :func:`step_backward` have the
signatures and results of :func:`xlstm._engine.step_forward` and
:func:`xlstm._engine.step_backward` (same shapes and dtype, fresh C-contiguous arrays), but
each replaces the ~10 array operations of a step with one kernel launch.

Source. The arithmetic is written once, in ``lstm_pointwise.cuh``, as templated host and
device functions; ``lstm_kernels.cu`` wraps them in ``extern "C"`` kernels for float32 and
float64, one thread per ``(row, unit)`` element of the ``(m, n_a)`` grid, in blocks of
:data:`BLOCK` threads. The tests compile the same header with the host C++ compiler and
compare it with the array path, so the math is checked on machines without a GPU.

Compilation. :func:`source` inlines the header into the ``.cu`` text, and
``cupy.RawKernel`` compiles that with NVRTC on first use, once per device, caching the
binary on disk (the cache key is the full text, so an edit of the header is never served
stale). Contraction into fused multiply-adds is off (:data:`OPTIONS`), so every operation
rounds as in the array path; the kernels are memory bound, so this costs nothing
measurable.

Strides. Inputs are passed as a pointer plus row and unit strides in elements (zero and
negative strides work), so views such as the forget-gate slice of the stacked sigmoid
gates, a transposed initial cell state or the per-step slices of ``K``, ``Q`` and ``P``
are read in place, without copies. Inputs whose layout the kernels don't cover (other
ranks, shapes that need broadcasting, mixed or non-float32/float64 dtypes) take the array
path of :mod:`xlstm._engine`, so results never depend on which path ran. No call
synchronises the device; launches go to CuPy's current stream.

Next step: a persistent kernel. The per-step cost is now one GEMM launch plus one
pointwise launch, and at small batch sizes both are latency bound. A persistent kernel
(as in "persistent RNN" work) would run the whole time loop in one cooperative launch:
each block keeps its slice of the recurrent weights ``Wa`` in registers (or shared
memory) for all steps, computes its rows of ``a @ Wa^T`` and the pointwise update in
place, and the grid synchronises once per step (``grid.sync()``) so that the next step
sees the whole new ``a``. Its limits: ``Wa`` is ``4 n_a^2`` numbers, and it must fit in
the register files of all co-resident blocks, about 33 MB on an H100 (132 SMs x 256 KB),
less the working registers: roughly ``n_a <= 1400`` in float32 and ``n_a <= 1000`` in
float64 (shared memory adds some room at the cost of bandwidth). A cooperative grid can
be no larger than what fits on the device at once, the per-step grid barrier costs a few
microseconds, so the gain shrinks as ``m`` grows and GEMMs become efficient again; the
backward pass needs its own kernel holding ``Wa`` for ``dG @ Wa``; and its reduction
order differs from cuBLAS, so results match the array path to rounding, not bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as _np

__all__ = ["step_forward", "step_backward", "source", "BLOCK", "OPTIONS"]

#: Threads per block.
BLOCK = 256

#: NVRTC options. No fused multiply-add, so each operation rounds as in the array path.
#: CuPy adds the target architecture, ``--std=c++17`` and ``-ftz=true`` itself (the last
#: for its own elementwise kernels too, so float32 subnormals flush alike on both paths).
OPTIONS = ("--fmad=false",)

HEADER = "lstm_pointwise.cuh"
KERNELS = "lstm_kernels.cu"
_DIR = Path(__file__).resolve().parent
_INCLUDE = f'#include "{HEADER}"'

#: Kernel names per (step, dtype name).
KERNEL_NAMES = {
    ("fwd", "float32"): "xlstm_lstm_fwd_f32",
    ("fwd", "float64"): "xlstm_lstm_fwd_f64",
    ("bwd", "float32"): "xlstm_lstm_bwd_f32",
    ("bwd", "float64"): "xlstm_lstm_bwd_f64",
}

_source_text = None
_kernels = {}  # (step, dtype name) -> cupy.RawKernel; each compiles once per device


def source() -> str:
    """The kernels' CUDA source with the header inlined: what NVRTC compiles."""
    global _source_text
    if _source_text is None:
        cu = (_DIR / KERNELS).read_text(encoding="utf-8")
        if _INCLUDE not in cu:
            raise RuntimeError(f"{KERNELS} does not include {HEADER}")
        header = (_DIR / HEADER).read_text(encoding="utf-8")
        _source_text = cu.replace(_INCLUDE, header, 1)
    return _source_text


def _kernel(step, dtype_name):
    kern = _kernels.get((step, dtype_name))
    if kern is None:
        import cupy

        kern = cupy.RawKernel(source(), KERNEL_NAMES[step, dtype_name], options=OPTIONS)
        _kernels[step, dtype_name] = kern
    return kern


# ------------------------------------------------------------------- kernel arguments
# These build the argument tuples in the kernels' order. They only read shapes, dtypes and
# strides and allocate through ``empty``, so the tests run them on numpy arrays against
# the host build of the same header. Sizes and strides are Python ints, which CuPy passes
# as ``long long``.

_DTYPE_NAMES = {_np.dtype(_np.float32): "float32", _np.dtype(_np.float64): "float64"}


def _strides(arr):
    """Strides of ``arr`` in elements, or ``None`` if one is not a whole number of them."""
    size = arr.itemsize
    out = []
    for s in arr.strides:
        if s % size:
            return None
        out.append(s // size)
    return out


def _dtype_name(*arrays):
    """``"float32"`` or ``"float64"`` when all arrays share that dtype, else ``None``."""
    dt = arrays[0].dtype
    for a in arrays[1:]:
        if a.dtype != dt:
            return None
    return _DTYPE_NAMES.get(dt)


def _forward_args(g, c_prev, n_a, empty):
    """``(dtype name, m * n_a, args, outputs)`` for the forward kernel, or ``None`` where
    the array path must run. ``empty(shape, dtype)`` allocates the outputs."""
    n = int(n_a)
    if n < 1 or g.ndim != 2 or c_prev.ndim != 2:
        return None
    m = g.shape[0]
    if g.shape[1] != 4 * n or tuple(c_prev.shape) != (m, n):
        return None
    name = _dtype_name(g, c_prev)
    if name is None:
        return None
    g_st, cp_st = _strides(g), _strides(c_prev)
    if g_st is None or cp_st is None:
        return None
    dt = g.dtype
    outs = (empty((m, 3 * n), dt), *(empty((m, n), dt) for _ in range(4)))
    args = (m, n, g, *g_st, c_prev, *cp_st, *outs)
    return name, m * n, args, outs


def _backward_args(da, dc, K, Q, P, f, empty):
    """``(dtype name, m * n_a, args, outputs)`` for the backward kernel, or ``None`` where
    the array path must run."""
    if da.ndim != 2:
        return None
    m, n = da.shape
    if n < 1 or any(tuple(v.shape) != (m, n) for v in (dc, K, Q, f)):
        return None
    if tuple(P.shape) != (m, 3, n):
        return None
    name = _dtype_name(da, dc, K, Q, P, f)
    if name is None:
        return None
    args = (m, n)
    for v in (da, dc, K, Q, P, f):
        st = _strides(v)
        if st is None:
            return None
        args += (v, *st)
    dt = da.dtype
    outs = (empty((m, 4 * n), dt), empty((m, n), dt))
    return name, m * n, args + outs, outs


def _launch(step, name, total, args):
    if total > 0:
        blocks = (total + BLOCK - 1) // BLOCK
        _kernel(step, name)((blocks,), (BLOCK,), args)


# -------------------------------------------------------------------------- public
def step_forward(g, c_prev, n_a, *, xp):
    """Fused :func:`xlstm._engine.step_forward` for CuPy arrays: one kernel launch.

    Returns ``(s, cct, c, tc, a)``: ``s`` is ``(m, 3 n_a)``, the others ``(m, n_a)``.
    """
    import cupy

    with g.device:
        plan = _forward_args(g, c_prev, n_a, cupy.empty)
        if plan is None:
            from .._engine import step_forward as reference

            return reference(g, c_prev, n_a, xp=xp)
        name, total, args, outs = plan
        _launch("fwd", name, total, args)
    return outs


def step_backward(da, dc, K, Q, P, f, *, xp):
    """Fused :func:`xlstm._engine.step_backward` for CuPy arrays: one kernel launch.

    Returns ``(dg, dc_prev)``: ``dg`` is ``(m, 4 n_a)`` in gate order (o, f, i, c).
    """
    import cupy

    with da.device:
        plan = _backward_args(da, dc, K, Q, P, f, cupy.empty)
        if plan is None:
            from .._engine import step_backward as reference

            return reference(da, dc, K, Q, P, f, xp=xp)
        name, total, args, outs = plan
        _launch("bwd", name, total, args)
    return outs
