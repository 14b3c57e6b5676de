"""Compiled CPU loops for every cell on numpy (optional: ``pip install xlstm-array-api[cpu]``).

:func:`xlstm._accel.accelerated_loops` returns this module's :class:`Loops` when the arrays
are numpy's, their dtype is float32 or float64, numba is installed and the accelerators are
on. Without numba nothing here is imported and the array path runs.

What it changes. On the array path every operation of a step allocates its result, and the
steps are stacked afterwards. Here the cell's own :meth:`~xlstm.cells.base.Cell.step` and
:meth:`~xlstm.cells.base.Cell.step_back` run with :class:`BufferOps`: each operation writes
into a preallocated buffer (a slot of the engine's stacks or a per-call scratch buffer),
``tanh`` and the matrix products are numpy's own calls with ``out=``, and each point
function runs as one compiled pass over the step's ``(m, n_a)`` grid (:func:`_map_kernel`).
The backward coefficients are formed per step, on the fly, instead of for all steps at once.

Same numbers. ``tanh`` and the products are the calls the array path makes; the point
functions are the same Python functions, compiled, evaluated on the same values in the
same order and in the arrays' dtype (their constants come in as arguments of that dtype;
numba does not contract into fused multiply-adds unless told to). The tests check that both
paths give bit-identical results for every cell.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

__all__ = ["BufferOps", "Loops", "loops"]

_OPTIONS = {"nogil": True, "error_model": "numpy"}


@functools.cache
def _point(fn):
    """``fn`` compiled by numba (once per function; specialised per argument types)."""
    return njit(**_OPTIONS)(fn)


@functools.cache
def _map_kernel(kinds, n_out):
    """A compiled loop that applies a point function to every element of a 2-D grid.

    ``kinds`` says for each argument whether it is a scalar (``"s"``, passed as it is) or an
    array (``"a"``, read at ``[r, j]``); the ``n_out`` outputs are written at ``[r, j]``.
    The loop takes the compiled point function as its first argument, so one loop serves
    every cell's functions of the same signature.
    """
    args = [f"a{k}" for k in range(len(kinds))]
    outs = [f"o{k}" for k in range(n_out)]
    reads = ", ".join(a if kind == "s" else f"{a}[r, j]" for a, kind in zip(args, kinds))
    if n_out == 1:
        body = f"            o0[r, j] = fn({reads})"
    else:
        body = f"            v = fn({reads})\n" + "\n".join(
            f"            {o}[r, j] = v[{k}]" for k, o in enumerate(outs)
        )
    src = (
        f"def kernel(fn, {', '.join(args + outs)}):\n"
        f"    m, n = o0.shape\n"
        f"    for r in range(m):\n"
        f"        for j in range(n):\n"
        f"{body}\n"
    )
    scope = {}
    exec(compile(src, f"<xlstm point loop {kinds} -> {n_out}>", "exec"), scope)  # noqa: S102
    return njit(**_OPTIONS)(scope["kernel"])


class BufferOps:
    """The operations of a cell's step over preallocated buffers: each writes ``out``."""

    #: Whether ``out`` buffers are written (here) or ignored (the array path).
    buffered = True

    def __init__(self, dtype):
        self._ftype = np.dtype(dtype).type

    def const(self, value: float):
        """A constant for a point function, in the arrays' dtype."""
        return self._ftype(value)

    def tanh(self, x, out):
        return np.tanh(x, out=out)

    def relu(self, x, out):
        """``max(x, 0)``: numpy's ``maximum``, as on the array path."""
        return np.maximum(x, self._ftype(0), out=out)

    def sign(self, x, out):
        return np.sign(x, out=out)

    def add(self, x, y, out):
        return np.add(x, y, out=out)

    def mul(self, x, y, out):
        return np.multiply(x, y, out=out)

    def copy(self, x, out):
        np.copyto(out, x)
        return out

    def concat(self, parts, out):
        """``out`` itself: the parts were written into its column blocks."""
        return out

    def map(self, fn, *args, out):
        """Run point function ``fn`` over the grid of ``out``, writing every output."""
        outs = out if isinstance(out, tuple) else (out,)
        kinds = tuple("a" if isinstance(a, np.ndarray) else "s" for a in args)
        _map_kernel(kinds, len(outs))(_point(fn), *args, *outs)
        return out


class Loops:
    """The forward and backward time loops for one float dtype, over numpy arrays, for any
    cell (the cell's own steps, run with :class:`BufferOps`)."""

    #: How reports and the benchmark name this accelerator.
    label = "compiled loops"

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.ops = BufferOps(dtype)

    def supports(self, cell) -> bool:
        """Every cell: the loops run the cell's own step functions."""
        return True

    def _scratch(self, cell, m, n_a):
        return {k: np.empty((m, w * n_a), dtype=self.dtype) for k, w in cell.scratch.items()}

    def forward(self, cell, Gx, WaT, ba, bufs, t0):
        """Run steps ``t0 .. t0 + len(Gx) - 1``, reading the states at ``t``, writing ``t+1``.

        ``Gx`` is the chunk's ``(T_c, m, k n_a)`` input term (only read). ``bufs`` holds the
        state stacks, indexed by absolute step, and the saved stacks with one slot per step
        of the chunk, or a single slot that is reused (inference, nothing kept).
        """
        T_c, m, width = Gx.shape
        n_a = WaT.shape[0]
        first = cell.state_names[0]
        saved = {k: bufs[k] for k in cell.saved}
        slots = next(iter(saved.values())).shape[0] if saved else 0
        out = self._scratch(cell, m, n_a)
        ga = np.empty((m, width), dtype=self.dtype)
        for k in range(T_c):
            t, j = t0 + k, (k if slots > 1 else 0)
            np.matmul(bufs[first][t], WaT, out=ga)  # the recurrent term
            if ba is not None:
                np.add(ga, ba, out=ga)
            state = tuple([bufs[s][t] for s in cell.state_names])
            for s in cell.state_names:
                out[s] = bufs[s][t + 1]
            for s, v in saved.items():
                out[s] = v[j]
            cell.step(self.ops, Gx[k], ga, state, out)

    def backward(self, cell, da_t, carry, saved, prev, WaT, dGx, dGa):
        """Run the backward loop over all ``T = len(dGx)`` steps; returns the gradients on
        the initial state.

        ``da_t`` is the ``(T, m, n_a)`` upstream gradient (any strides), ``carry`` the
        gradients on the final state; ``dGx`` (and ``dGa``, which may be ``dGx`` itself)
        receive the ``(T, m, k n_a)`` pre-activation gradients.
        """
        T, m, _ = dGx.shape
        n_a = WaT.shape[0]
        # One reordering copy: each step's gradient is then read contiguously (a time slice
        # of the seed layout has one element per cache line).
        da_t = np.ascontiguousarray(da_t)
        da_recT = np.array(carry[0].T, order="C")  # as the array path: WaT @ dg^T
        da_rec = da_recT.T
        drest = tuple(np.array(c, order="C") for c in carry[1:])
        out = self._scratch(cell, m, n_a)
        for s, d in zip(cell.state_names[1:], drest):
            out["d" + s.lower()] = d  # updated in place, step by step
        for t in range(T - 1, -1, -1):
            saved_t = {k: v[t] for k, v in saved.items()}
            prev_t = {k: v[t] for k, v in prev.items()}
            reads = {k: v for k, v in (*saved_t.items(), *prev_t.items()) if k in cell.back_reads}
            out["dGx"], out["dGa"] = dGx[t], dGa[t]
            coeffs = cell.back_coeffs(self.ops, saved_t, prev_t, out)
            _, dga, direct, _ = cell.step_back(
                self.ops, da_t[t], da_rec, drest, coeffs, reads, out
            )
            np.matmul(WaT, dga.T, out=da_recT)  # (19), recurrent part
            if direct is not None:
                np.add(direct, da_rec, out=da_rec)
        return (da_rec, *drest)


@functools.cache
def loops(dtype):
    """The :class:`Loops` for ``dtype`` (its point loops compile on first use)."""
    return Loops(dtype)
