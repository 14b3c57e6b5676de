"""Compiled CPU kernels for the time loop on numpy (optional: ``pip install xlstm-array-api[cpu]``).

:func:`xlstm._engine.accelerated_loops` returns this module's :class:`Loops` when the arrays are
numpy's, their dtype is float32 or float64, numba is installed and ``XLSTM_ACCEL`` is not
``"0"``. Without numba nothing here is imported and the array path runs.

What it changes. The array path makes ~12 array operations per forward step and ~10 per
backward step, each with its own temporary, then stacks the steps; the backward
coefficients of :func:`xlstm._engine.backward_coefficients` are another ~15 passes over the
whole state. Here each step writes straight into preallocated stacks:

* forward step ``t``: ``G = A[t] @ WaT`` (BLAS, into a reused buffer), ``G += Gx[t]``,
  ``tanh(G)`` in place, then one compiled pass for ``s``, ``cct`` and ``c``, then
  ``TC[t] = tanh(C[t+1])`` and ``A[t+1] = o * TC[t]``: six calls, no allocation;
* backward step ``t``: one compiled pass that forms the coefficients ``K``, ``Q``, ``P``
  of the step on the fly and writes ``dG[t]`` and ``dc``, then ``da_rec^T = WaT @ dG[t]^T``.

Same numbers. ``tanh`` and the matrix products are numpy's own calls, as on the array
path; the compiled passes evaluate the same expressions as :func:`step_forward`,
:func:`backward_coefficients` and :func:`step_backward`, in the same order and in the
arrays' dtype (every constant is of that dtype; numba does not contract into fused
multiply-adds unless told to). The tests check that both paths give bit-identical
results.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

__all__ = ["Loops", "loops"]


def _compile(fn):
    """``numba.njit`` with the machine code cached on disk where numba finds a writable
    place for it (next to this file, or a user cache folder), in memory otherwise."""
    options = {"nogil": True, "error_model": "numpy"}
    try:
        return njit(cache=True, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(**options)(fn)


@_compile
def _fwd(t_gates, c_prev, s, cct, c, half):
    # t_gates: (m, 4n) = tanh of the pre-activations in gate order (o, f, i, c), the sigmoid
    # rows pre-halved. Writes s (m, 3n), cct (m, n) and c (m, n). ``half`` is 0.5 in the
    # arrays' dtype, so that float32 stays float32.
    m, n = c.shape
    for r in range(m):
        for j in range(3 * n):
            s[r, j] = half * t_gates[r, j] + half  # (1), (2), (5)
        for j in range(n):
            g = t_gates[r, 3 * n + j]  # (3)
            cct[r, j] = g
            c[r, j] = s[r, n + j] * c_prev[r, j] + s[r, 2 * n + j] * g  # (4)


@_compile
def _bwd(da, da_rec, dc, s, cct, tc, c_prev, dg, dc_prev, one):
    # da + da_rec and dc reach this step's a and c; writes dg (m, 4n) and dc_prev (which may
    # be dc itself). ``one`` is 1 in the arrays' dtype.
    m, n = dc.shape
    for r in range(m):
        for j in range(n):
            o = s[r, j]
            f = s[r, n + j]
            i = s[r, 2 * n + j]
            tcj = tc[r, j]
            g = cct[r, j]
            d_a = da[r, j] + da_rec[r, j]
            dct = dc[r, j] + d_a * (o * (one - tcj * tcj))  # K
            dg[r, j] = d_a * (tcj * o * (one - o))  # (7): Q
            dg[r, n + j] = dct * (c_prev[r, j] * f * (one - f))  # (10)
            dg[r, 2 * n + j] = dct * (g * i * (one - i))  # (9)
            dg[r, 3 * n + j] = dct * (i * (one - g * g))  # (8)
            dc_prev[r, j] = dct * f  # (20)


class Loops:
    """The forward and backward time loops for one float dtype, over numpy arrays."""

    #: How reports and the benchmark name this accelerator.
    label = "compiled loops"

    def __init__(self, dtype):
        ftype = np.dtype(dtype).type
        self.half, self.one = ftype(0.5), ftype(1.0)

    def forward(self, Gx, WaT, A, C, S, CCT, TC, t0):
        """Run steps ``t0 .. t0 + len(Gx) - 1``, reading ``A[t], C[t]``, writing index ``t+1``.

        ``Gx`` is the chunk's ``(T_c, m, 4 n_a)`` input projection (only read). ``S``,
        ``CCT``, ``TC`` hold one slot per step of the chunk, or a single slot that is reused
        (inference, nothing kept); ``A`` and ``C`` are indexed by absolute step.
        """
        n_a = C.shape[-1]
        G = np.empty(Gx.shape[1:], dtype=Gx.dtype)
        for k in range(Gx.shape[0]):
            t, j = t0 + k, (k if S.shape[0] > 1 else 0)
            np.matmul(A[t], WaT, out=G)
            np.add(Gx[k], G, out=G)
            np.tanh(G, out=G)
            _fwd(G, C[t], S[j], CCT[j], C[t + 1], self.half)
            np.tanh(C[t + 1], out=TC[j])
            np.multiply(S[j, :, :n_a], TC[j], out=A[t + 1])  # (6)

    def backward(self, da_t, S, CCT, TC, C, WaT, dG):
        """Run the backward loop over all ``T = len(dG)`` steps; returns ``(da0, dc0)``.

        ``da_t`` is the ``(T, m, n_a)`` upstream gradient (any strides); ``dG`` receives the
        ``(T, m, 4 n_a)`` pre-activation gradients.
        """
        T, m, _ = dG.shape
        n_a = WaT.shape[0]
        # One reordering copy: the kernel then reads each step's gradient contiguously
        # (a time slice of the seed layout has one element per cache line).
        da_t = np.ascontiguousarray(da_t)
        da_recT = np.zeros((n_a, m), dtype=dG.dtype)  # as the array path: WaT @ dg^T
        dc = np.zeros((m, n_a), dtype=dG.dtype)
        for t in range(T - 1, -1, -1):
            _bwd(da_t[t], da_recT.T, dc, S[t], CCT[t], TC[t], C[t], dG[t], dc, self.one)
            np.matmul(WaT, dG[t].T, out=da_recT)  # (19), recurrent part
        return da_recT.T, dc


@functools.cache
def loops(dtype):
    """The :class:`Loops` for ``dtype`` (compiled on first use; see :func:`_compile`)."""
    return Loops(dtype)
