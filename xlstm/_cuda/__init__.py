"""Fused CUDA kernels for the time loops on CuPy.

:func:`xlstm._engine.accelerated_loops` returns this module's :class:`Loops` when the arrays
are CuPy's (float32 or float64) and ``XLSTM_ACCEL`` is not ``"0"``. They run the engine's
time loops over its preallocated stacks: a forward step is one cuBLAS GEMM
(``A[t] @ WaT``) and one kernel launch that adds the input projection, applies every gate's
activation and writes ``s``, ``cct``, ``c``, ``tanh(c)`` and ``a`` in place; a backward
step is one kernel launch that forms the activation derivatives on the fly and writes
``dG[t]`` and ``dc``, then one GEMM ``dG[t] @ Wa``. The array path needs ~15 launches per
step, a stacking copy of every output, and in backward ``5 T m n_a`` numbers of
precomputed coefficients; none of that remains.

Source. The arithmetic is written once per cell, in a header (``lstm_pointwise.cuh``), as
templated host and device element functions. Each kernel is declared once, in the table of
:mod:`xlstm._cuda.kernels` (cell, step, element function, arguments in order with their
widths, which are written and which may alias an input); the ``extern "C"`` kernels for
float32 and float64, one thread per ``(row, unit)`` element of the ``(m, n_a)`` grid in
blocks of :data:`BLOCK` threads, are generated from it, and so are the tests' host build
and argument checks and the files that CI compiles with nvcc. The tests compile the very
text that NVRTC gets for the host, behind a small grid emulator (every block and thread as
host loops, blocks in shuffled order), under AddressSanitizer, and drive this module's own
:class:`Loops` with it on numpy arrays (``Loops(dtype, mod=numpy, launch=...)``), so the
loops, the argument order, the bounds checks and the math are all checked on machines
without a GPU.

Compilation. :func:`source` is the generated text with the header inlined, and
``cupy.RawKernel`` compiles that with NVRTC on first use, once per device, caching the
binary on disk (the cache key is the full text, so an edit of the header is never served
stale). Contraction into fused multiply-adds is off (:data:`OPTIONS`), so every operation
rounds as in the array path: backward steps are bit-identical to it, forward steps agree
to the rounding of ``tanh``. The kernels are memory bound, so this costs nothing
measurable.

Layout. Every array a kernel sees is one step's C-contiguous slice of the engine's stacks;
the upstream gradient, which may have any strides, is made contiguous once per backward
call. Nothing here synchronises the device; launches go to CuPy's current stream, under the
device of the arrays.

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

import contextlib
import functools

import numpy as _np

from . import kernels as _table

__all__ = ["BLOCK", "OPTIONS", "Loops", "loops", "source"]

#: Threads per block.
BLOCK = 256

#: NVRTC options. No fused multiply-add, so each operation rounds as in the array path.
#: CuPy adds the target architecture, ``--std=c++17`` and ``-ftz=true`` itself (the last
#: for its own elementwise kernels too, so float32 subnormals flush alike on both paths).
OPTIONS = ("--fmad=false",)

#: The LSTM's kernel names per (step, dtype name), from the table.
KERNEL_NAMES = {
    (step, dtype): _table.kernel_name("lstm", step, dtype)
    for (cell, step) in _table.TABLE if cell == "lstm" for dtype in _table.DTYPES
}

_kernels = {}  # (cell, step, dtype name) -> cupy.RawKernel; each compiles once per device


@functools.cache
def source(cell: str = "lstm") -> str:
    """The CUDA source of ``cell``'s kernels with its header inlined: what NVRTC compiles.

    Generated from the table of :mod:`xlstm._cuda.kernels`.
    """
    return _table.source(cell)


def _kernel(cell, step, dtype_name):
    kern = _kernels.get((cell, step, dtype_name))
    if kern is None:
        import cupy

        name = _table.kernel_name(cell, step, dtype_name)
        kern = cupy.RawKernel(source(cell), name, options=OPTIONS)
        _kernels[cell, step, dtype_name] = kern
    return kern


_DTYPE_NAMES = {_np.dtype(_np.float32): "float32", _np.dtype(_np.float64): "float64"}


def _launch(step, name, total, args, *, cell="lstm"):
    """Launch ``cell``'s kernel ``step`` (``"fwd"`` or ``"bwd"``) for ``name``'s dtype over
    ``total`` threads. The sizes (Python ints) go as numpy int64, the kernels' ``long long``
    ``index_t``, whatever CuPy's default for a Python int."""
    if total > 0:
        blocks = (total + BLOCK - 1) // BLOCK
        args = tuple(_np.int64(a) if isinstance(a, int) else a for a in args)
        _kernel(cell, step, name)((blocks,), (BLOCK,), args)


class Loops:
    """The forward and backward time loops for one float dtype, over CuPy arrays.

    ``mod`` and ``launch`` are for the tests: with ``mod=numpy`` and a ``launch`` that calls
    a host build of the kernels, the same loops run on the CPU. ``launch(step, dtype_name,
    total, args)`` runs kernel ``(cell, step)`` of the table over ``total`` elements, with
    ``args`` in the table's order: ``m``, ``n``, then the arrays.
    """

    #: How reports and the benchmark name this accelerator.
    label = "fused CUDA kernels"
    #: The cell whose kernels (rows of :data:`xlstm._cuda.kernels.TABLE`) these loops launch.
    cell = "lstm"

    def __init__(self, dtype, *, mod=None, launch=None):
        self.name = _DTYPE_NAMES[_np.dtype(dtype)]
        self._mod = mod
        self.launch = functools.partial(_launch, cell=self.cell) if launch is None else launch

    @property
    def mod(self):
        if self._mod is None:
            import cupy

            self._mod = cupy
        return self._mod

    def _on_device(self, arr):
        return arr.device if self.mod is not _np else contextlib.nullcontext()

    def supports(self, cell) -> bool:
        """The cells with kernels here: the LSTM."""
        return cell.name == "lstm"

    def forward(self, cell, Gx, WaT, ba, bufs, t0):
        """The engine's forward loop (see :meth:`xlstm._cpu.Loops.forward`), for the LSTM."""
        if not self.supports(cell) or ba is not None:
            raise NotImplementedError(f"no CUDA kernels for {cell!r}")
        self.lstm_forward(Gx, WaT, bufs["A"], bufs["C"], bufs["S"], bufs["CCT"], bufs["TC"], t0)

    def backward(self, cell, da_t, carry, saved, prev, WaT, dGx, dGa):
        """The engine's backward loop (see :meth:`xlstm._cpu.Loops.backward`), for the LSTM."""
        if not self.supports(cell):
            raise NotImplementedError(f"no CUDA kernels for {cell!r}")
        return self.lstm_backward(da_t, saved["S"], saved["CCT"], saved["TC"], prev["C"], WaT,
                                  dGx, *carry)

    def lstm_forward(self, Gx, WaT, A, C, S, CCT, TC, t0):
        """Run steps ``t0 .. t0 + len(Gx) - 1``, reading ``A[t], C[t]``, writing index ``t+1``.

        ``Gx`` is the chunk's ``(T_c, m, 4 n_a)`` input projection. ``S``, ``CCT``, ``TC``
        hold one slot per step of the chunk, or a single slot that is reused (inference);
        ``A`` and ``C`` are indexed by absolute step, modulo their length (a stack of two
        slots alternates). All are C-contiguous.
        """
        T_c, m, _ = Gx.shape
        n = C.shape[-1]
        nA, nC = A.shape[0], C.shape[0]
        with self._on_device(Gx):
            G = self.mod.empty(Gx.shape[1:], dtype=Gx.dtype)
            for k in range(T_c):
                t, j = t0 + k, (k if S.shape[0] > 1 else 0)
                self.mod.matmul(A[t % nA], WaT, out=G)
                self.launch("fwd", self.name, m * n,
                            (m, n, Gx[k], G, C[t % nC], S[j], CCT[j], C[(t + 1) % nC], TC[j],
                             A[(t + 1) % nA]))

    def lstm_backward(self, da_t, S, CCT, TC, C, WaT, dG, da_rec=None, dc=None):
        """Run the backward loop over all ``T = len(dG)`` steps; returns ``(da0, dc0)``.

        ``da_t`` is the ``(T, m, n_a)`` upstream gradient (any strides); ``dG`` receives the
        ``(T, m, 4 n_a)`` pre-activation gradients. ``da_rec`` and ``dc``, the gradients on
        the final state, default to zero.
        """
        T, m, _ = dG.shape
        n = WaT.shape[0]
        Wa = WaT.T
        with self._on_device(dG):
            da_t = self.mod.ascontiguousarray(da_t)
            zeros = (lambda: self.mod.zeros((m, n), dtype=dG.dtype))
            da_rec = zeros() if da_rec is None else self.mod.array(da_rec, order="C")
            dc = zeros() if dc is None else self.mod.array(dc, order="C")
            for t in range(T - 1, -1, -1):
                self.launch("bwd", self.name, m * n,
                            (m, n, da_t[t], da_rec, dc, S[t], CCT[t], TC[t], C[t], dG[t], dc))
                self.mod.matmul(dG[t], Wa, out=da_rec)  # (19), recurrent part
        return da_rec, dc


@functools.cache
def loops(dtype):
    """The CuPy :class:`Loops` for ``dtype``."""
    return Loops(dtype)
