"""Compiled CPU loops for every cell on numpy (optional: ``pip install xlstm-array-api[cpu]``).

:func:`xlstm.accel.registry.accelerated_loops` returns this module's :class:`Loops` when the arrays
are numpy's, their dtype is float32 or float64, numba is installed and the accelerators are
on. Without numba nothing here is imported and the array path runs.

What it changes. On the array path every operation of a step allocates its result, and the
steps are stacked afterwards. Here the cell's own :meth:`~xlstm.cells.base.Cell.step` and
:meth:`~xlstm.cells.base.Cell.step_back` run with :class:`BufferOps`: each operation writes
into a preallocated buffer (a slot of the engine's stacks or a per-call scratch buffer),
``tanh`` and the matrix products are numpy's own calls with ``out=``, and each point
function runs as one compiled pass over the step's ``(m, n_a)`` grid (:func:`_map_kernel`).
The backward coefficients are formed inside the step's pass for a cell with
``inline_coeffs`` (its point function calls the coefficients' one), else for all steps
first, in one compiled pass, as on the array path. The first step of every loop is
recorded and written out as a straight-line body over the step number (:class:`_Replay`),
which the later steps run: the cell's Python runs once per loop. That body is compiled,
with the loop over the steps around it, into one numba function (the *whole loop*), which
makes numpy's own BLAS and ufunc calls from inside (:mod:`xlstm.accel.cpu.native`): no Python runs
between steps. Where some call has no compiled twin, the body runs from Python, step by
step. The generated modules and numba's machine code are cached on disk
(:func:`_cache_dir`), so a new process loads them instead of compiling.

Never in the way. A generated module runs only if its file holds exactly the text that
its name's hash stands for (else it is written anew). Anything that fails on the compiled
route (a module that cannot be made, numba failing to compile, to load a corrupt cache
entry or to write one to a full disk) makes that call run again with nothing compiled,
with the same numbers, and one warning; the cache entries that do not load are removed,
the rest of the process compiles in memory, and a second failure turns the loops off for
the process (:meth:`Loops._guarded`, :func:`_failed`).

Same numbers. ``tanh`` and the products are the calls the array path makes; the point
functions are the same Python functions, compiled, evaluated on the same values in the
same order and in the arrays' dtype (their constants come in as arguments of that dtype;
numba does not contract into fused multiply-adds unless told to). The tests check that both
paths give bit-identical results for every cell.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.util
import inspect
import os
import sys
import tempfile
import threading
import types
import warnings

import numpy as np

try:
    from numba import njit
    from numba.core.registry import CPUDispatcher as Dispatcher
    from numba.extending import register_jitable

    from . import native as _native
    from .native import OPTIONS as _OPTIONS
    from .native import cached_jit
except ImportError:
    raise
except Exception as exc:  # a numba or llvmlite that fails to load in any other way: the
    # registry (xlstm.accel.registry.cpu_loops_module) then leaves numpy on the array path
    raise ImportError(f"numba does not load ({type(exc).__name__}: {exc})") from exc

__all__ = ["BufferOps", "Loops", "loops"]

def _cache_dir():
    """Where the generated loop modules live (numba caches their machine code next to
    them): ``XLSTM_CACHE_DIR``, else ``$XDG_CACHE_HOME/xlstm`` or ``~/.cache/xlstm``."""
    root = os.environ.get("XLSTM_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "xlstm")
    return root


def _kernel_source(fn, kinds, out_kinds):
    """The Python source of the loop module for point function ``fn``.

    ``kinds`` and ``out_kinds`` hold one entry per argument and output: ``"s"`` a scalar,
    ``"a"`` an array read or written at ``[r, j]``, ``"w"`` a column window (the parent array
    and its first column, read or written at ``[r, start + j]``), ``"b<k>"`` an array of
    ``k`` column blocks, read or written at ``[r, q n + j]`` for ``q < k`` (``k`` arguments or
    outputs of ``fn``). Windows and blocks keep the parent's C-contiguous layout. The
    kernel takes the grid ``(m, n)`` first; per row it takes each array's columns as a
    contiguous 1-D view, which LLVM vectorises (its checks that the outputs do not overlap
    the inputs are then simple enough to make; indexing the 2-D arrays inside the loop
    made them too many, and the loop ran scalar at a third of the speed).
    """
    params, rows, cells = ["m", "n"], [], []
    for k, kind in enumerate([*kinds, *out_kinds]):
        name = f"v{k}"
        params.append(name)
        if kind == "s":
            cells.append([name])
            continue
        if kind == "a":
            spans = [(f"x{k}", f"{name}[r]")]
        elif kind == "w":
            params.append(name + "_start")
            spans = [(f"x{k}", f"{name}[r, {name}_start : {name}_start + n]")]
        else:
            spans = [(f"x{k}_{q}", f"{name}[r, {q} * n : {q + 1} * n]") for q in range(int(kind[1:]))]
        rows += [f"        {row} = {view}" for row, view in spans]
        cells.append([f"{row}[j]" for row, _ in spans])
    reads = ", ".join(c for cs in cells[: len(kinds)] for c in cs)
    targets = [c for cs in cells[len(kinds) :] for c in cs]
    if len(targets) == 1:
        body = f"            {targets[0]} = fn({reads})"
    else:
        body = f"            v = fn({reads})\n" + "\n".join(
            f"            {c} = v[{k}]" for k, c in enumerate(targets)
        )
    return (
        f"# The point loop of {fn.__module__}.{fn.__qualname__}.\n"
        f"from numba import njit\n"
        f"from {fn.__module__} import {fn.__qualname__} as _point\n\n"
        f"OPTIONS = {_OPTIONS!r}\n"
        f"fn = njit(**OPTIONS)(_point)\n\n\n"
        f"def kernel({', '.join(params)}):\n"
        f"    for r in range(m):\n"
        + "\n".join(rows) + "\n"
        f"        for j in range(n):\n"
        f"{body}\n"
    )


def _helpers(fn):
    """The Python functions that point function ``fn`` calls by a global name, and those
    that they call, in a fixed order."""
    found, todo = {}, [fn]
    while todo:
        f = todo.pop()
        for name in f.__code__.co_names:
            g = f.__globals__.get(name)
            if isinstance(g, types.FunctionType) and g is not fn and g not in found:
                found[g] = None
                todo.append(g)
    return list(found)


@functools.cache
def _jitable(fn):
    """Let compiled code call the plain Python function ``fn`` (once per function)."""
    register_jitable(**_OPTIONS)(fn)


@functools.cache
def _map_kernel(fn, kinds, out_kinds):
    """A compiled loop that applies point function ``fn`` to every element of a 2-D grid.

    ``kinds`` and ``out_kinds`` say how each argument is read and each output written
    (:func:`_kernel_source`).

    The loop is generated as a small module in :func:`_cache_dir`, named by a hash of its
    text and of ``fn``'s source, so that numba can cache its machine code on disk and a
    changed point function never meets a stale cache. Where nothing can be written there,
    the loop is compiled in memory, once per process.
    """
    src = _kernel_source(fn, kinds, out_kinds)
    # a point function may call others: numba compiles those where it calls them
    helpers = _helpers(fn)
    for h in helpers:
        _jitable(h)
    text = src + "".join(inspect.getsource(f) for f in (fn, *helpers))
    return _compiled_module("point_loop", src, "kernel", {}, depends=text)


def _digest(text):
    return hashlib.sha256(text.encode()).hexdigest()[:20]


#: Held while a generated module is written, imported and compiled (see _compiled_module).
_COMPILE_LOCK = threading.RLock()


def _compiled_module(kind, src, fn_name, scope, *, depends=""):
    """Function ``fn_name`` of the generated module source ``src``, compiled by numba.

    The module's text is a first line that holds a hash of ``depends`` (everything else
    its code depends on: the point functions' sources, this module's code) followed by
    ``src``; it is named ``xlstm_<kind>_<hash of the text>``, so that a change never meets
    a stale cache and a file can be checked against its name. It is written to
    :func:`_cache_dir` as ``<name>.py``, and what is found there is read back, bounded by
    the expected length, and compared with the expected text before anything of it runs:
    a file that is not what its name's hash says (edited, emptied, truncated, or not a
    regular file) is written anew. The text that was checked is what runs (the file is
    not read a second time); the module is registered under its name, with the file as
    its ``__file__``, so that numba caches its machine code on disk beside it. The compiled
    function takes the plain one's place in the module, as a decorated function would, for
    other generated modules to import. Where nothing can be written there, or numba finds
    no place for its cache, ``src`` runs in memory, with the globals ``scope``, and
    compiles once per process.

    One thread at a time: threads of one process share the temporary file's name and
    ``sys.modules``, where another thread would find a module still being written or run.
    Compilation itself happens at the first call (:meth:`Loops._guarded` covers it).
    """
    head = f"# Generated by xlstm.accel.cpu.loops ({kind}, depends on {_digest(depends)}); safe to delete."
    text = f"{head}\n{src}"
    name = f"xlstm_{kind}_{_digest(text)}"
    with _COMPILE_LOCK:
        return _compiled_module_locked(name, text, fn_name, scope)


def _compiled_module_locked(name, text, fn_name, scope):
    try:
        module = sys.modules.get(name)
        if module is None:
            if _IN_MEMORY:
                raise RuntimeError("the disk cache is off after a failure (see _failed)")
            module = _import_checked(name, text)
        compiled = getattr(module, fn_name)
        if not isinstance(compiled, Dispatcher):
            compiled = njit(cache=True, **_OPTIONS)(compiled)
            setattr(module, fn_name, compiled)
        _native.register_cache(compiled)
        return compiled
    except (OSError, RuntimeError, ImportError):  # read-only home, no cache locator, a
        # generated module that imports one compiled in memory, or the disk cache turned off
        scope = dict(scope)
        exec(compile(text, f"<xlstm {name}>", "exec"), scope)  # noqa: S102
        return njit(**_OPTIONS)(scope[fn_name])


def _import_checked(name, text):
    """The generated module ``name`` with the source ``text``, its file in
    :func:`_cache_dir` checked (and written anew where it is not ``text``) before the
    checked text runs; ``OSError`` where the folder cannot hold it."""
    folder = _cache_dir()
    os.makedirs(folder, exist_ok=True)
    for where in (folder, os.path.join(folder, "__pycache__")):
        _check_private(where)
    path = os.path.join(folder, name + ".py")
    data = text.encode("utf-8")
    if _read_at_most(path, len(data) + 1) != data:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic: a concurrent process sees all of it or nothing
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # numba's cache finds the module again by its name
    try:
        exec(compile(text, path, "exec"), module.__dict__)  # noqa: S102 - the checked text
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _check_private(folder):
    """Raise ``OSError`` where ``folder`` (if it exists) belongs to another user or anyone
    may write in it: numba's machine code there is loaded as it is (only the generated
    modules are checked against their names), so such a folder is not used, and the loops
    compile in memory."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return
    other = hasattr(os, "getuid") and st.st_uid != os.getuid()
    if other or st.st_mode & 0o002:
        raise PermissionError(f"the cache folder {folder} is not private to this user")


def _read_at_most(path, limit):
    """The first ``limit`` bytes of the regular file ``path``; ``None`` where it is
    missing, not a regular file (a FIFO is not waited on) or cannot be read."""
    from ..._lib.files import open_regular

    try:
        with open_regular(path) as f:
            return f.read(limit)
    except (OSError, ValueError):
        return None


class BufferOps:
    """The operations of a cell's step over preallocated buffers: each writes ``out``."""

    #: Whether ``out`` buffers are written (here) or ignored (the array path).
    buffered = True

    def __init__(self, dtype, plans=None, *, plain=False):
        self._ftype = np.dtype(dtype).type
        self._consts = {}
        self._plans = {} if plans is None else plans  # may be shared: only ever added to
        self._tape = None  # a list while a step is recorded (see Loops: replay)
        #: Nothing compiled: the point functions run on whole arrays, as on the array path,
        #: and the compiled row helpers are replaced by numpy's calls (the loops' fallback).
        self.plain = plain

    def const(self, value: float):
        """A constant for a point function, in the arrays' dtype (made once)."""
        c = self._consts.get(value)
        if c is None:
            c = self._consts[value] = self._ftype(value)
        return c

    def _call(self, fn, *args):
        """``fn(*args)``, windows as the views they stand for; recorded while taping."""
        if self._tape is not None:
            self._tape.append((fn, args))
        if self.plain:
            fn = _PLAIN.get(fn, fn)
        res = fn(*[_view(a) for a in args])
        # an output window stands for itself (a later call reads it as the same columns)
        return args[-1] if type(args[-1]) is Window else res

    def tanh(self, x, out):
        return self._call(np.tanh, x, out)

    def relu(self, x, out):
        """``max(x, 0)``: numpy's ``maximum``, as on the array path."""
        return self._call(_maximum, x, self._ftype(0), out)

    def sign(self, x, out):
        return self._call(np.sign, x, out)

    def exp(self, x, out):
        return self._call(np.exp, x, out)

    def log1p(self, x, out):
        return self._call(np.log1p, x, out)

    def maximum(self, x, y, out):
        """numpy's ``maximum``, as on the array path (NaN where either is NaN)."""
        return self._call(_maximum, x, y, out)

    def add(self, x, y, out):
        return self._call(np.add, x, y, out)

    def mul(self, x, y, out):
        return self._call(np.multiply, x, y, out)

    def copy(self, x, out):
        self._call(np.copyto, out, x)
        return out

    def concat(self, parts, out):
        """``out`` itself: the parts were written into its column blocks (by a :meth:`map`
        with ``blocks(out, k)`` among its outputs)."""
        return out

    def blocks(self, buf, k):
        """``buf``'s ``k`` column blocks as one argument (or output) of :meth:`map`, which
        reads (or writes) them as ``k`` arguments (or outputs) of the point function."""
        return (_blocks_type(k)(buf),)

    def cols(self, buf, start, stop):
        """Columns ``start:stop`` of the 2-D ``buf``, as an argument or output of :meth:`map`
        (read in place, in ``buf``'s own layout)."""
        return Window(buf, start, stop)

    def map(self, fn, *args, out):
        """Run point function ``fn`` over the grid of ``out``, writing every output.

        Returns one entry per output of ``fn``, as the array path does: ``out`` itself, a
        block output standing for each of its blocks (the cell assembles those with
        :meth:`concat`, which returns the buffer).
        """
        outs = out if type(out) is tuple else (out,)
        if self.plain:
            _plain_map(fn, args, outs)
            return out if not any(isinstance(o, Blocks) for o in outs) else tuple(
                [o for o in outs for _ in range(getattr(o, "k", 1))])
        # The types say everything the kernel depends on (a block type carries its k), so
        # they key the kernel: one dict lookup per call. Tuple displays, not tuple() of an
        # iterator: see xlstm.engine.loop.scan on free lists.
        key = (fn, *map(type, args), None, *map(type, outs))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _plan(fn, args, outs)
        kernel, special, spread = plan
        first = outs[0]
        if type(first) is np.ndarray:
            m, n = first.shape
        elif type(first) is Window:
            m, n = first.buf.shape[0], first.stop - first.start
        else:
            m, n = first.buf.shape[0], first.buf.shape[1] // first.k
        if special:
            call = [m, n]
            for v in (*args, *outs):
                t = type(v)
                if t is Window:
                    call += (v.buf, v.start)
                elif isinstance(v, Blocks):
                    call.append(v.buf)
                else:
                    call.append(v)
        else:
            call = [m, n, *args, *outs]
        if self._tape is not None:
            self._tape.append((kernel, tuple(call)))
        kernel(*call)
        if spread is None:
            return out
        return tuple([outs[i] for i in spread])


def _plain_map(fn, args, outs):
    """What a point loop computes, from Python: ``fn`` on the whole arrays (each block of a
    block argument as one argument), as the array path evaluates it, and its results
    copied into the outputs (after all are computed: an output may be an input too)."""
    def spread(v):
        if isinstance(v, Blocks):
            n = v.buf.shape[1] // v.k
            return [v.buf[:, q * n : (q + 1) * n] for q in range(v.k)]
        return [_view(v)]

    res = fn(*[a for v in args for a in spread(v)])
    targets = [t for o in outs for t in spread(o)]
    for target, value in zip(targets, (res,) if len(targets) == 1 else res):
        np.copyto(target, value)


def _maximum(x, y, out):
    """``numpy.maximum`` with its output given by position, as the other calls take it."""
    return np.maximum(x, y, out=out)


def _view(v):
    """The array a :class:`Window` stands for (anything else as it is)."""
    return v.buf[:, v.start : v.stop] if type(v) is Window else v


class Window:
    """Columns ``start:stop`` of the 2-D array ``buf``: one argument of :meth:`BufferOps.map`."""

    __slots__ = ("buf", "start", "stop")

    def __init__(self, buf, start, stop):
        self.buf, self.start, self.stop = buf, start, stop

    def __getitem__(self, index):
        """Rows or elements of the window, as the view it stands for."""
        return self.buf[:, self.start : self.stop][index]


class Blocks:
    """``k`` column blocks of the 2-D array ``buf``: one argument of :meth:`BufferOps.map`.
    One subclass per ``k`` (:func:`_blocks_type`), so that the type alone tells ``k``."""

    __slots__ = ("buf",)
    k = 0

    def __init__(self, buf):
        self.buf = buf


@functools.cache
def _blocks_type(k):
    return type(f"Blocks{k}", (Blocks,), {"__slots__": (), "k": k})


def _kind(a):
    if isinstance(a, Blocks):
        return f"b{a.k}"
    if type(a) is Window:
        return "w"
    return "a" if isinstance(a, np.ndarray) else "s"


def _plan(fn, args, outs):
    """``(kernel, special, spread)`` for a call of :meth:`BufferOps.map` with these types:
    whether some argument is a window or blocks, and where the outputs of ``fn`` are."""
    kinds, out_kinds = tuple([_kind(a) for a in args]), tuple([_kind(o) for o in outs])
    special = any(k not in ("a", "s") for k in (*kinds, *out_kinds))
    spread = None
    if any(isinstance(o, Blocks) for o in outs):
        spread = tuple([i for i, o in enumerate(outs) for _ in range(getattr(o, "k", 1))])
    return _map_kernel(fn, kinds, out_kinds), special, spread


class _Steps:
    """The per-step arrays of a time loop: slot ``q`` of step ``i`` is the Python expression
    ``exprs[q]`` of ``i``, over the arrays and numbers named in ``scope`` (not ``i`` nor a
    name that :class:`_Replay` makes: ``F_`` and a role, ``s``, ``f`` or ``c`` and digits)."""

    __slots__ = ("exprs", "scope")

    def __init__(self, exprs, scope):
        self.exprs, self.scope = tuple(exprs), scope

    def views(self, i):
        """The arrays of step ``i``."""
        return [eval(e, None, {**self.scope, "i": i}) for e in self.exprs]  # noqa: S307



class _Replay:
    """A recorded step, to be replayed on any step of any later call: no Python of the cell
    runs again.

    A cell's step makes the same operations on every step, on the arrays the loops give it:
    the step's slices of the stacks (:class:`_Steps`), which change from step to step, and
    buffers that the loop fixes for all its steps (``fixed``, by role: the weights, the
    scratch buffers). So the calls that :class:`BufferOps` recorded for one step are every
    other step's calls with that step's arrays swapped in, and, with the fixed buffers
    swapped in too, those of every later call of the same shapes. They are written out as
    one straight-line body over the step number ``i`` (with the views of the fixed buffers
    taken once per call, before it), its numbers (the sizes, the dtype's constants, the
    columns of a window) as free names whose values are kept in :attr:`consts`, and made
    into

    * :attr:`make`: a Python function ``replay(i)`` that runs one step;
    * :attr:`whole`: where every call has a compiled twin (:func:`_twin`), one
      numba function ``loop(lo, hi, stride, ...)`` that runs the steps
      ``range(lo, hi, stride)`` with no Python between them (numpy's own BLAS and ufunc
      loops, :mod:`xlstm.accel.cpu.native`, so the numbers are the same), else ``None``.
    """

    __slots__ = ("source", "consts", "names", "make", "whole", "whole_names")

    @classmethod
    def of(cls, tape, steps, step, fixed, native=None):
        """The replay of ``tape``, recorded on the arrays ``step`` (``steps.views`` of the
        recorded step) and the ``fixed`` buffers (role to array, or ``None``); ``None`` if a
        recorded call reads an array that the loop did not give (a slice the cell made
        itself): such a cell runs its Python on every step. ``native(fn, args)`` gives the
        compiled twin of a recorded call, or ``None``."""
        slot = {id(a): q for q, a in enumerate(step)}
        role = {id(a): k for k, a in fixed.items() if a is not None}
        consts, prologue, used = {}, [], set()

        def parent(a):
            if id(a) in slot:
                used.add(slot[id(a)])
                return f"s{slot[id(a)]}"
            if id(a) in role:
                return f"F_{role[id(a)]}"
            raise LookupError(a)

        def expr(a, name):
            if type(a) is Window:
                consts[name + "a"], consts[name + "b"] = a.start, a.stop
                view = f"{parent(a.buf)}[:, {name}a:{name}b]"
                if view.startswith("s"):
                    return view
                prologue.append(f"{name} = {view}")  # a fixed buffer's columns: once
                return name
            if isinstance(a, np.ndarray):
                return parent(a)
            consts[name] = a  # a number, a function, None
            return name

        try:
            calls = [[expr(a, f"c{k}_{p}") for p, a in enumerate(args)]
                     for k, (fn, args) in enumerate(tape)]
        except LookupError:
            return None
        consts.update((f"f{k}", fn) for k, (fn, _) in enumerate(tape))
        slots = [f"s{q} = {steps.exprs[q]}" for q in sorted(used)]
        body = [*slots, *(f"f{k}({', '.join(c)})" for k, c in enumerate(calls))]
        replay = cls()
        replay.source = "\n".join([*prologue, "def replay(i):", *("    " + c for c in body)])
        replay.consts = consts
        # the free names of the source, in a fixed order, and where each one's value is
        names = sorted({*consts, *steps.scope, *(f"F_{k}" for k in fixed)})
        replay.names = _where(names, consts, steps.scope)
        replay.make = _maker(replay.source, "replay", tuple(names))
        replay.whole, replay.whole_names = None, ()
        twins = None if native is None else [native(fn, args) for fn, args in tape]
        if twins is None or any(t is None for t in twins):
            return replay
        # the compiled loop: each call by its twin, which takes leading arguments of its
        # own (numpy's routines' addresses) before the recorded ones
        for k, (_, lead) in enumerate(twins):
            lead_names = [f"c{k}_L{j}" for j in range(len(lead))]
            consts.update(zip(lead_names, lead))
            calls[k] = [*lead_names, *calls[k]]
        fns = {f"f{k}" for k in range(len(tape))}  # globals of the compiled loop
        params = sorted({*consts, *steps.scope, *(f"F_{k}" for k in fixed)} - fns)
        if len(params) + 3 == 20:
            # numba 0.68 on CPython 3.11 leaves a 20-tuple in CPython's free list at every
            # call of a function of exactly 20 arguments (up to 2000 of them, 400 kB): one
            # spare argument more
            consts["spare"] = 0
            params.append("spare")
        source = "\n".join([
            f"def loop(lo, hi, stride, {', '.join(params)}):",
            *("    " + line for line in prologue),
            "    for i in range(lo, hi, stride):",
            *("        " + c for c in (*slots, *(f"f{k}({', '.join(c)})" for k, c in enumerate(calls)))),
        ])  # fmt: skip
        replay.whole = _whole_loop(source, tuple(fn for fn, _ in twins))
        replay.whole_names = _where(params, consts, steps.scope)
        return replay

    def bind(self, steps, fixed):
        """The replay function for the arrays of ``steps`` and the ``fixed`` buffers."""
        where = (self.consts, steps.scope, fixed)
        return self.make(*[where[k][n] for k, n in self.names])

    def run_whole(self, order, steps, fixed):
        """Run the steps ``order`` (a ``range``) in the compiled :attr:`whole` loop."""
        where = (self.consts, steps.scope, fixed)
        self.whole(order.start, order.stop, order.step,
                   *[where[k][n] for k, n in self.whole_names])


def _where(names, consts, scope):
    """Where each free name's value is: ``(0, name)`` a constant, ``(1, name)`` the steps'
    scope, ``(2, role)`` a fixed buffer."""
    return tuple((0, n) if n in consts else (1, n) if n in scope else (2, n[2:]) for n in names)


@functools.lru_cache(maxsize=256)
def _whole_loop(source, twins):
    """The compiled loop that ``source`` defines, its calls ``f<k>`` made by the compiled
    functions ``twins``: a generated module that imports them by name, cached on disk
    (:func:`_compiled_module`; its name hashes the source, the imports and the code of the
    modules that the twins come from), or compiled in memory where a twin has no name to be
    imported by."""
    imports, scope = [], {}
    for k, fn in enumerate(twins):
        scope[f"f{k}"] = fn
        module, name = fn.py_func.__module__, fn.py_func.__name__
        if getattr(sys.modules.get(module), name, None) is not fn:
            module = None  # compiled in memory: cannot be imported
        imports.append(f"from {module} import {name} as f{k}")
    src = "\n".join(imports) + "\n\n\n" + source + "\n"
    if any(line.startswith("from None ") for line in imports):
        src = source  # runs in memory only, with the twins in its scope
    return _compiled_module("whole_loop", src, "loop", scope, depends=_code_digest())


@functools.cache
def _code_digest():
    """A hash of the code that the compiled loops call (this module and
    :mod:`xlstm.accel.cpu.native`): numba does not notice when a function that a cached one calls
    has changed, so the generated loops' names change with it instead."""
    return _digest(inspect.getsource(sys.modules[__name__]) + inspect.getsource(_native))


@functools.lru_cache(maxsize=256)
def _maker(source, name, names):
    """A factory for the function ``name`` that ``source`` defines, compiled once per text:
    it takes the values of the free ``names``, runs ``source`` and returns the function."""
    body = "\n".join("    " + line for line in source.splitlines())
    text = f"def make({', '.join(names)}):\n{body}\n    return {name}\n"
    scope = {}
    exec(compile(text, "<xlstm step>", "exec"), scope)  # noqa: S102
    return scope["make"]


class Loops:
    """The forward and backward time loops for one float dtype, over numpy arrays, for any
    cell (the cell's own steps, run with :class:`BufferOps`)."""

    #: How reports and the benchmark name this accelerator.
    label = "compiled loops"
    #: Padded batches (the engine's ``active``) run here too.
    masks = True
    #: Whether a loop whose calls all have compiled twins runs as one compiled function
    #: (:attr:`_Replay.whole`); otherwise, and where some call has none, a recorded step is
    #: replayed from Python, step by step. The same calls either way, so the same numbers.
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
        :func:`_failed` warns once and removes the broken cache entries.

        Rerunning the whole call is safe: it reads its inputs only and writes its outputs
        anew (the backward pass's running gradients start again from ``carry``).
        """
        if _DISABLED:
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
        _failed(failure)
        return result

    def supports(self, cell) -> bool:
        """Every cell: the loops run the cell's own step functions."""
        return True

    def _scratch(self, cell, m, n_a):
        return {k: np.empty((m, w * n_a), dtype=self.dtype) for k, w in cell.scratch.items()}

    def _run(self, key, steps, order, first, fixed, plain):
        """Run the steps ``order`` of a loop: ``first(ops, arrays)`` makes a step's calls
        through ``ops`` on the step's arrays (``steps.views(i)``).

        The first loop of its kind records its first step and keeps it (:class:`_Replay`);
        every other step, and every later loop of the kind, replays it. ``key`` names the
        kind: everything the calls of a step depend on (the cell, the direction, the sizes,
        the expressions of the step's arrays). A cell that cannot be replayed runs
        ``first`` on every step.
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
            replay = self._replays[key] = _Replay.of(
                ops._tape, steps, step, fixed, functools.partial(_twin, self.dtype))
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

    def forward(self, cell, Gx, WaT, ba, bufs, t0, active=None):
        """Run steps ``t0 .. t0 + len(Gx) - 1``, reading the states at ``t``, writing ``t+1``.

        ``Gx`` is the chunk's ``(T_c, m, k n_a)`` input term (only read). ``bufs`` holds the
        state stacks, indexed by absolute step (modulo their length: a stack of two slots
        alternates), and the saved stacks with one slot per step
        of the chunk, or a single slot that is reused (inference, nothing kept).
        ``active`` (the chunk's ``(T_c, m, 1)`` booleans, or ``None``): a padded row keeps
        its state.
        """
        self._guarded(self._forward, cell, Gx, WaT, ba, bufs, t0, active)

    def _forward(self, cell, Gx, WaT, ba, bufs, t0, active, *, plain):
        T_c, m, width = Gx.shape
        n_a = WaT.shape[0]
        out = self._scratch(cell, m, n_a)
        ga = np.empty((m, width), dtype=self.dtype)
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
            scope["Idle"] = np.logical_not(active)
            exprs.append("Idle[i]")

        def first(ops, step):
            state = tuple(step[1 : 1 + n_s])
            ops._call(np.matmul, state[0], WaT, ga)  # the recurrent term
            if ba is not None:
                ops._call(np.add, ga, ba, ga)
            new = step[1 + n_s : 1 + 2 * n_s]
            out.update(zip(names, step[1 + n_s : 1 + n_s + len(names)]))
            cell.step(ops, step[0], ga, state, out)
            if active is not None:  # a padded row keeps its state
                for s_new, s_old in zip(new, state):
                    ops._call(_keep_rows, s_new, s_old, step[-1])

        fixed = {"WaT": WaT, "ba": ba, "ga": ga, **{"out_" + k: v for k, v in out.items()}}
        key = (cell, m, n_a, ba is None, *exprs)
        self._run(key, _Steps(exprs, scope), range(T_c), first, fixed, plain)

    def backward(self, cell, da_t, carry, saved, prev, WaT, dGx, dGa, active=None):
        """Run the backward loop over all ``T = len(dGx)`` steps; returns the gradients on
        the initial state.

        ``da_t`` is the ``(T, m, n_a)`` upstream gradient (any strides), ``carry`` the
        gradients on the final state; ``dGx`` (and ``dGa``, which may be ``dGx`` itself)
        receive the ``(T, m, k n_a)`` pre-activation gradients. ``active`` is the forward
        pass's: a padded row has no gate gradients and passes its state's gradients through.
        """
        return self._guarded(self._backward, cell, da_t, carry, saved, prev, WaT, dGx, dGa,
                             active)

    def _backward(self, cell, da_t, carry, saved, prev, WaT, dGx, dGa, active, *, plain):
        T, m, _ = dGx.shape
        n_a = WaT.shape[0]
        # One reordering copy: each step's gradient is then read contiguously (a time slice
        # of the seed layout has one element per cache line).
        da_t = np.ascontiguousarray(da_t)
        # The recurrent product is made as on the array path, WaT @ dg^T into (n_a, m), and
        # copied into a C-ordered (m, n_a) buffer that the point pass reads row by row: at
        # (m, n_a) = (64, 256) its pass took 128 us reading the transposed view, 96 us
        # reading C order, and the copy about 10 us.
        da_recT = np.empty((WaT.shape[0], m), dtype=self.dtype)
        da_rec = np.array(carry[0], order="C")
        drest = tuple(np.array(c, order="C") for c in carry[1:])
        out = self._scratch(cell, m, n_a)
        for s, d in zip(cell.state_names[1:], drest):
            out["d" + s.lower()] = d  # updated in place, step by step
        fixed = {"WaT": WaT, "da_rec": da_rec, "da_recT": da_recT, "da_recT_T": da_recT.T,
                 **{"out_" + k: v for k, v in out.items()}}  # fmt: skip
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
            scope["Idle"] = np.logical_not(active)
            exprs.append("Idle[i]")
            # the gradients reaching the step, for its padded rows to pass on
            kept = [np.empty((m, n_a), dtype=self.dtype) for _ in range(1 + len(drest))]
            fixed.update((f"kept{q}", v) for q, v in enumerate(kept))

        def first(ops, step):
            if cell.inline_coeffs:
                coeffs = None
            elif n_c == 1 and len(widths) > 1:
                coeffs = ops.blocks(step[3], len(widths))
            else:
                coeffs = tuple(step[3 : 3 + n_c])
            out["dGx"], out["dGa"] = step[1], step[2]
            reads = dict(zip(cell.back_reads, step[3 + n_c : 3 + n_c + len(cell.back_reads)]))
            if active is not None:
                for k, d in zip(kept, (da_rec, *drest)):
                    ops._call(np.copyto, k, d)
            _, dga, direct, _ = cell.step_back(ops, step[0], da_rec, drest, coeffs, reads, out)
            if active is not None:  # a padded row: no gate gradients
                for dg in (step[1], step[2]) if cell.split else (step[1],):
                    ops._call(_zero_rows, dg, step[-1], self.dtype.type(0))
            ops._call(_matmul_t, WaT, dga, da_recT)  # (19), recurrent part
            ops._call(np.copyto, da_rec, fixed["da_recT_T"])
            if direct is not None:
                ops._call(np.add, direct, da_rec, da_rec)
            if active is not None:  # ... and its state's gradients pass through
                for k, d in zip(kept, (da_rec, *drest)):
                    ops._call(_keep_rows, d, k, step[-1])

        key = (cell, m, n_a, *exprs)
        self._run(key, _Steps(exprs, scope), range(T - 1, -1, -1), first, fixed, plain)
        return (da_rec, *drest)


_MISSING = object()


@cached_jit
def _keep_rows(dst, src, idle):
    """``src`` into the rows ``r`` of ``dst`` where ``idle[r, 0]``: the array path's
    ``where(active, new, old)`` for a padded row (one compiled call; numpy's masked
    ``copyto`` costs several times as much at these sizes)."""
    for r in range(dst.shape[0]):
        if idle[r, 0]:
            for j in range(dst.shape[1]):
                dst[r, j] = src[r, j]


@cached_jit
def _zero_rows(dst, idle, zero):
    """``zero`` into the rows ``r`` of ``dst`` where ``idle[r, 0]``."""
    for r in range(dst.shape[0]):
        if idle[r, 0]:
            for j in range(dst.shape[1]):
                dst[r, j] = zero


def _keep_rows_plain(dst, src, idle):
    """:func:`_keep_rows` by numpy's masked ``copyto`` (the same values: a copy)."""
    np.copyto(dst, src, where=idle)


def _zero_rows_plain(dst, idle, zero):
    """:func:`_zero_rows` by numpy's masked ``copyto``."""
    np.copyto(dst, zero, where=idle)


#: The plain twin of each compiled row helper, for :class:`BufferOps` with ``plain``.
_PLAIN = {_keep_rows: _keep_rows_plain, _zero_rows: _zero_rows_plain}


def _matmul_t(a, b, out):
    """``a @ b.T`` into ``out``: numpy's ``matmul`` on the transposed view, as the array
    path's ``WaT @ dga^T``."""
    return np.matmul(a, b.T, out=out)


#: The numpy ufunc behind each recorded function that is one.
_UFUNCS = {np.tanh: np.tanh, np.sign: np.sign, np.add: np.add, np.multiply: np.multiply,
           _maximum: np.maximum, np.exp: np.exp, np.log1p: np.log1p}


#: Those of them that round correctly: every loop of numpy's gives the same bits.
_EXACT = (np.add, np.multiply)


def _twin(dtype, fn, args):
    """The compiled twin of the recorded call ``fn(*args)``: ``(twin, lead)``, a compiled
    function that makes the same numpy calls (:mod:`xlstm.accel.cpu.native`) when called as
    ``twin(*lead, *args)``; ``None`` where there is none."""
    if isinstance(fn, Dispatcher):  # a point loop or a row helper: compiled already
        return fn, ()
    views = [_view(a) for a in args]
    if fn is np.matmul or fn is _matmul_t:
        a, b, out = views
        lead = _native.blas(dtype)
        ok = lead is not None and _native.matmul_supported(a, b.T if fn is _matmul_t else b, out)
        return ((_native.matmul if fn is np.matmul else _native.matmul_t), lead) if ok else None
    if fn is np.copyto:
        dst, src = views
        ok = isinstance(src, np.ndarray) and src.shape == dst.shape and src.dtype == dst.dtype
        return (_native.copyto, ()) if ok else None
    uf = _UFUNCS.get(fn)
    if uf is None or not _native.ufunc_supported(dtype, *views, exact=uf in _EXACT):
        return None
    return _native.ufunc_loop(uf, dtype, uf.nin == 2 and not isinstance(views[1], np.ndarray))


#: Set after the compiled loops failed in this process: they compile in memory from then on.
_IN_MEMORY = False
#: Set after the compiled loops failed twice in this process: they stay off (see _failed).
_DISABLED = False
_FAILURES = []  # the failures so far (their reprs), under _COMPILE_LOCK


def _failed(exc):
    """A failure of the compiled route (:meth:`Loops._guarded`): one warning; the cache
    entries that do not load removed (those of the generated loops, and those of the
    package's compiled functions that have not run yet) and the disk cache left alone for
    the rest of the process (the next call compiles in memory what it lacks, and the next
    process writes the cache anew); at the second failure in a process, the compiled loops
    turned off for the rest of it."""
    global _DISABLED, _IN_MEMORY
    with _COMPILE_LOCK:
        indexes = _native.cache_off_unproven()
        indexes += glob.glob(os.path.join(glob.escape(_cache_dir()), "__pycache__", "xlstm_*.nbi"))
        removed = _native.drop_broken_entries(sorted(set(indexes)))
        _IN_MEMORY = True
        _FAILURES.append(f"{type(exc).__name__}: {exc}")
        if len(_FAILURES) >= 2:
            _DISABLED = True
    folders = sorted({os.path.dirname(p) for p in removed})
    what = (f"removed {len(removed)} broken cache file{'' if len(removed) == 1 else 's'} "
            f"from {', '.join(folders)}; " if removed else "")
    then = ("the compiled loops are off for the rest of this process (set XLSTM_ACCEL=0 to "
            "skip them from the start)" if _DISABLED else
            "the next call compiles them again, in memory")
    warnings.warn(
        f"xlstm's compiled CPU loops failed ({type(exc).__name__}: {_short(exc)}); this call "
        f"ran on the array path, with the same results; {what}{then}. Their cache folder is "
        f"{_cache_dir()} (XLSTM_CACHE_DIR); deleting it is always safe.",
        RuntimeWarning, stacklevel=4)


def _short(exc, limit=300):
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def loops(dtype):
    """The :class:`Loops` for ``dtype``, one per dtype however it is spelled (its point loops
    compile on first use, its steps are recorded once per kind); ``None`` once they failed
    twice in this process (:func:`_failed`): the engine then takes the array path."""
    if _DISABLED:
        return None
    return _loops(np.dtype(dtype))


@functools.cache
def _loops(dtype):
    return Loops(dtype)
