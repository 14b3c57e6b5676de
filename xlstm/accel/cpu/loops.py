"""Compiled CPU loops for every cell on numpy (optional: ``pip install xlstm-array-api[cpu]``).

:func:`xlstm.accel.registry.accelerated_loops` returns this module's :class:`Loops` when the arrays
are numpy's, their dtype is float32 or float64, numba is installed and the accelerators are
on. Without numba nothing here is imported and the array path runs.

What it changes. On the array path every operation of a step allocates its result, and the
steps are stacked afterwards. Here the engine's own step frame, which the engine hands to
:class:`Loops` (:func:`xlstm.engine.loop.forward_step` and ``backward_step``: the recurrent
products, the padded rows, the cell's :meth:`~xlstm.cells.base.Cell.step` and
:meth:`~xlstm.cells.base.Cell.step_back`), runs with :class:`BufferOps`: each operation
writes into a preallocated buffer (a slot of the engine's stacks or a per-call scratch
buffer), ``tanh`` and the matrix products are numpy's own calls with ``out=``, and each
point function runs as one compiled pass over the step's ``(m, n_a)`` grid (a *point
loop*). The backward coefficients are formed inside the step's pass for a cell with
``inline_coeffs`` (its point function calls the coefficients' one), else for all steps
first, in one compiled pass, as on the array path. The first step of every loop is
recorded and written out as a straight-line body over the step number (a *replay*),
which the later steps run: the frame's and the cell's Python run once per loop. That body
is compiled, with the loop over the steps around it, into one numba function (the *whole
loop*), which makes numpy's own BLAS and ufunc calls from inside
(:mod:`xlstm.accel.cpu.native`): no Python runs between steps. Where some call has no
compiled twin, the body runs from Python, step by step. The generated modules and numba's
machine code are cached on disk, so a new process loads them instead of compiling.

Never in the way. A generated module runs only if its file holds exactly the text that
its name's hash stands for (else it is written anew). Anything that fails on the compiled
route (a module that cannot be made, numba failing to compile, to load a corrupt cache
entry or to write one to a full disk) makes that call run again with nothing compiled,
with the same numbers, and one warning; the cache entries that do not load are removed,
the rest of the process compiles in memory, and a second failure turns the loops off for
the process (:meth:`Loops._guarded`, :func:`xlstm.accel.cpu.cache.failed`).

Same numbers. ``tanh`` and the products are the calls the array path makes; the point
functions are the same Python functions, compiled, evaluated on the same values in the
same order and in the arrays' dtype (their constants come in as arguments of that dtype;
numba does not contract into fused multiply-adds unless told to). The tests check that both
paths give bit-identical results for every cell.

Where it is. This module holds :class:`Loops` and :func:`loops`, what the registry calls;
:mod:`~xlstm.accel.cpu.record` the operations over buffers (:class:`BufferOps`), which
record a step; :mod:`~xlstm.accel.cpu.codegen` the point loops;
:mod:`~xlstm.accel.cpu.replay` the replay of a recorded step and the whole loop;
:mod:`~xlstm.accel.cpu.cache` the on-disk cache of the generated modules and what heals it;
:mod:`~xlstm.accel.cpu.native` numpy's routines called from compiled code.
"""

from __future__ import annotations

import functools

import numpy as np

try:
    from . import cache
    from .record import BufferOps, Window
    from .replay import Replay, Steps, twin
except ImportError:
    raise
except Exception as exc:  # a numba or llvmlite that fails to load in any other way: the
    # registry (xlstm.accel.registry.cpu_loops_module) then leaves numpy on the array path
    raise ImportError(f"numba does not load ({type(exc).__name__}: {exc})") from exc

__all__ = ["BufferOps", "Loops", "loops"]


class Loops:
    """The forward and backward time loops for one float dtype, over numpy arrays, for any
    cell (the engine's step frame and the cell's own steps, run with :class:`BufferOps`)."""

    #: How reports and the benchmark name this accelerator.
    label = "compiled loops"
    #: Padded batches (the engine's ``active``) run here too.
    masks = True
    #: Whether a loop whose calls all have compiled twins runs as one compiled function
    #: (:attr:`xlstm.accel.cpu.replay.Replay.whole`); otherwise, and where some call has
    #: none, a recorded step is replayed from Python, step by step. The same calls either
    #: way, so the same numbers.
    whole = True

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self._plans = {}
        self._replays = {}  # recorded steps by kind (see _run)

    def _guarded(self, run, *args):
        """``run(*args, plain=False)``: the compiled route; where anything in it fails (a
        generated module that cannot be made or imported, numba failing to compile, to load
        its cache or to write it: a full disk, a corrupt index), the same call again with
        ``plain=True``, which compiles nothing and gives the same numbers; then
        :func:`failed` warns once and removes the broken cache entries.

        Rerunning the whole call is safe: it reads its inputs only and writes its outputs
        anew (the backward pass's running gradients start again from ``carry``).
        """
        if cache.disabled():
            return run(*args, plain=True)
        try:
            return run(*args, plain=False)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - an optional accelerator never breaks a call
            failure = exc
        # Where this fails too, the error is the call's own (numpy's errstate set to raise,
        # say), not the accelerator's: it propagates, and nothing is blamed on the cache.
        result = run(*args, plain=True)
        cache.failed(failure)
        return result

    def supports(self, cell) -> bool:
        """Every cell: the loops run the cell's own step functions."""
        return True

    def _scratch(self, cell, m, n_a):
        return {k: np.empty((m, w * n_a), dtype=self.dtype) for k, w in cell.scratch.items()}

    def _run(self, key, steps, order, first, fixed, plain):
        """Run the steps ``order`` of a loop: ``first(ops, arrays)`` makes a step's calls
        through ``ops`` on the step's arrays (``steps.views(i)``).

        The first loop of its kind records its first step and keeps it
        (:class:`~xlstm.accel.cpu.replay.Replay`); every other step, and every later loop
        of the kind, replays it. ``key`` names the kind: everything the calls of a step
        depend on (the cell, the direction, the sizes, the expressions of the step's
        arrays). A cell that cannot be replayed runs ``first`` on every step.
        """
        if plain:  # the fallback: the cell's Python on every step, nothing compiled
            ops = BufferOps(self.dtype, plain=True)
            for i in order:
                first(ops, steps.views(i))
            return
        # the strides of the arrays decide numpy's calls (and the compiled loop's types)
        key = (*key, *[v.strides for v in (*steps.scope.values(), *fixed.values())
                       if isinstance(v, np.ndarray)])
        replay = self._replays.get(key, _MISSING)
        if replay is _MISSING:
            ops = BufferOps(self.dtype, self._plans)  # a tape of its own (threads)
            ops._tape = []
            step = steps.views(order[0])
            first(ops, step)
            replay = self._replays[key] = Replay.of(
                ops._tape, steps, step, fixed, functools.partial(twin, self.dtype))
            order = order[1:]
        if replay is None:
            ops = BufferOps(self.dtype, self._plans)
            for i in order:
                first(ops, steps.views(i))
            return
        if self.whole and replay.whole is not None and len(order):
            replay.run_whole(order, steps, fixed)
            return
        run = replay.bind(steps, fixed)
        for i in order:
            run(i)

    def forward(self, cell, Gx, WaT, ba, bufs, t0, active=None, step=None):
        """Run steps ``t0 .. t0 + len(Gx) - 1``, reading the states at ``t``, writing ``t+1``.

        ``Gx`` is the chunk's ``(T_c, m, k n_a)`` input term (only read). ``bufs`` holds the
        state stacks, indexed by absolute step (modulo their length: a stack of two slots
        alternates), and the saved stacks with one slot per step
        of the chunk, or a single slot that is reused (inference, nothing kept).
        ``active`` (the chunk's ``(T_c, m, 1)`` booleans, or ``None``): a padded row keeps
        its state. ``step`` is the engine's step frame
        (:func:`xlstm.engine.loop.forward_step`), which these loops record and replay.
        """
        self._guarded(self._forward, cell, Gx, WaT, ba, bufs, t0, active, _frame(step))

    def _forward(self, cell, Gx, WaT, ba, bufs, t0, active, frame, *, plain):
        T_c, m, width = Gx.shape
        n_a = WaT.shape[0]
        out = self._scratch(cell, m, n_a)
        out["ga"] = np.empty((m, width), dtype=self.dtype)  # the recurrent term
        scope = {"Gx": Gx, "t0": t0}
        exprs = ["Gx[i]"]
        names = (*cell.state_names, *cell.saved)
        for q, name in enumerate(cell.state_names):
            scope[f"S{q}"], scope[f"L{q}"] = bufs[name], len(bufs[name])
            exprs.append(f"S{q}[(t0 + i) % L{q}]")  # a stack of two slots alternates
        exprs += [f"S{q}[(t0 + i + 1) % L{q}]" for q in range(len(cell.state_names))]
        for q, name in enumerate(cell.saved):
            scope[f"V{q}"] = bufs[name]
            exprs.append(f"V{q}[i]" if len(bufs[name]) > 1 else f"V{q}[0]")
        n_s = len(cell.state_names)
        if active is not None:
            scope["Active"] = active
            exprs.append("Active[i]")
        fixed = {"WaT": WaT, "ba": ba, **{"out_" + k: v for k, v in out.items()}}

        def first(ops, step):
            out.update(zip(names, step[1 + n_s : 1 + n_s + len(names)]))
            frame(ops, cell, WaT, ba, step[0], tuple(step[1 : 1 + n_s]),
                  None if active is None else step[-1], out)

        key = (cell, frame, m, n_a, ba is None, *exprs)
        self._run(key, Steps(exprs, scope), range(T_c), first, fixed, plain)

    def backward(self, cell, da_t, carry, saved, prev, WaT, dGx, dGa, active=None, step=None):
        """Run the backward loop over all ``T = len(dGx)`` steps; returns the gradients on
        the initial state.

        ``da_t`` is the ``(T, m, n_a)`` upstream gradient (any strides), ``carry`` the
        gradients on the final state; ``dGx`` (and ``dGa``, which may be ``dGx`` itself)
        receive the ``(T, m, k n_a)`` pre-activation gradients. ``active`` is the forward
        pass's: a padded row has no gate gradients and passes its state's gradients through.
        ``step`` is the engine's step frame (:func:`xlstm.engine.loop.backward_step`).
        """
        return self._guarded(self._backward, cell, da_t, carry, saved, prev, WaT, dGx, dGa,
                             active, _frame(step))

    def _backward(self, cell, da_t, carry, saved, prev, WaT, dGx, dGa, active, frame, *, plain):
        T, m, _ = dGx.shape
        n_a = WaT.shape[0]
        # One reordering copy: each step's gradient is then read contiguously (a time slice
        # of the seed layout has one element per cache line).
        da_t = np.ascontiguousarray(da_t)
        out = self._scratch(cell, m, n_a)
        # The gradients reaching a step's states, updated in place step by step. The
        # recurrent product is made as on the array path, WaT @ dg^T into (n_a, m), and
        # copied into the C-ordered (m, n_a) da_prev that the point pass reads row by row:
        # the copy costs less than the strided reads it saves (the performance page has the
        # figures).
        da_rec = out["da_prev"] = np.array(carry[0], order="C")
        out["da_prevT"] = np.empty((WaT.shape[0], m), dtype=self.dtype)
        drest = tuple(np.array(c, order="C") for c in carry[1:])
        out.update(("d" + s.lower(), d) for s, d in zip(cell.state_names[1:], drest))
        if active is not None:  # the gradients reaching the step, for its padded rows
            out.update((f"kept{q}", np.empty((m, n_a), dtype=self.dtype))
                       for q in range(len(cell.state_names)))  # fmt: skip
        fixed = {"WaT": WaT, **{"out_" + k: v for k, v in out.items()}}
        scope = {"da": da_t, "dGx": dGx, "dGa": dGa}
        exprs = ["da[i]", "dGx[i]", "dGa[i]"]
        widths = list(cell.coeffs.values())
        if not cell.inline_coeffs:
            # the coefficients of all steps at once, as on the array path: one compiled
            # pass over the stacks seen as (T m, w n_a), side by side in one buffer, so
            # that a step passes them as one block argument
            rows = {k: np.reshape(v, (T * m, v.shape[-1]))
                    for k, v in (*saved.items(), *prev.items())}  # fmt: skip
            whole = np.empty((T, m, sum(widths) * n_a), dtype=self.dtype)
            flat, edges = np.reshape(whole, (T * m, -1)), np.cumsum([0, *widths]) * n_a
            bufs = {k: Window(flat, lo, hi) for k, lo, hi in zip(cell.coeffs, edges[:-1], edges[1:])}
            cell.back_coeffs(BufferOps(self.dtype, self._plans, plain=plain),
                             {k: rows[k] for k in saved},
                             {k: rows[k] for k in prev}, bufs)  # fmt: skip
            scope["W"] = whole
            if all(w == 1 for w in widths):  # one block argument
                exprs.append("W[i]")
            else:
                for q, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
                    scope[f"E{q}"], scope[f"E{q}_"] = int(lo), int(hi)
                    exprs.append(f"W[i][:, E{q}:E{q}_]")
        n_c = len(exprs) - 3
        for q, k in enumerate(cell.back_reads):
            scope[f"R{q}"] = saved[k] if k in saved else prev[k]
            exprs.append(f"R{q}[i]")
        if active is not None:
            scope["Active"] = active
            exprs.append("Active[i]")

        def first(ops, step):
            if cell.inline_coeffs:
                coeffs = None
            elif n_c == 1 and len(widths) > 1:
                coeffs = ops.blocks(step[3], len(widths))
            else:
                coeffs = tuple(step[3 : 3 + n_c])
            out["dGx"], out["dGa"] = step[1], step[2]
            reads = dict(zip(cell.back_reads, step[3 + n_c : 3 + n_c + len(cell.back_reads)]))
            frame(ops, cell, WaT, step[0], da_rec, drest, coeffs, reads,
                  None if active is None else step[-1], out)

        key = (cell, frame, m, n_a, *exprs)
        self._run(key, Steps(exprs, scope), range(T - 1, -1, -1), first, fixed, plain)
        return (da_rec, *drest)


def _frame(step):
    """The engine's step function handed to :meth:`Loops.forward` or ``backward``."""
    if step is None:
        raise TypeError("step: pass the engine's step frame (xlstm.engine.loop.forward_step "
                        "or backward_step); these loops record it and restate nothing")
    return step


_MISSING = object()


def loops(dtype):
    """The :class:`Loops` for ``dtype``, one per dtype however it is spelled (its point loops
    compile on first use, its steps are recorded once per kind); ``None`` once they failed
    twice in this process (:func:`failed`): the engine then takes the array path."""
    if cache.disabled():
        return None
    return _loops(np.dtype(dtype))


@functools.cache
def _loops(dtype):
    return Loops(dtype)
