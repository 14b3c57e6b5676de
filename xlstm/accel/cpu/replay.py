"""A recorded step replayed on every later step: as a Python function, and, where every
recorded call has a compiled twin, as one numba function over all the steps (the *whole
loop*), a generated module kept by :mod:`xlstm.accel.cpu.cache`.
"""

from __future__ import annotations

import functools
import inspect
import sys

import numpy as np

from . import cache, codegen, record
from . import native as _native
from .cache import compiled_module, digest
from .native import Dispatcher
from .record import Window, matmul_t, maximum, view

__all__ = ["Replay", "Steps", "twin"]


class Steps:
    """The per-step arrays of a time loop: slot ``q`` of step ``i`` is the Python expression
    ``exprs[q]`` of ``i``, over the arrays and numbers named in ``scope`` (not ``i`` nor a
    name that :class:`Replay` makes: ``F_`` and a role, ``s``, ``f`` or ``c`` and digits)."""

    __slots__ = ("exprs", "scope")

    def __init__(self, exprs, scope):
        self.exprs, self.scope = tuple(exprs), scope

    def views(self, i):
        """The arrays of step ``i``."""
        return [eval(e, None, {**self.scope, "i": i}) for e in self.exprs]  # noqa: S307


class Replay:
    """A recorded step, to be replayed on any step of any later call: no Python of the cell
    runs again.

    A cell's step makes the same operations on every step, on the arrays the loops give it:
    the step's slices of the stacks (:class:`Steps`), which change from step to step, and
    buffers that the loop fixes for all its steps (``fixed``, by role: the weights, the
    scratch buffers). So the calls that :class:`BufferOps` recorded for one step are every
    other step's calls with that step's arrays swapped in, and, with the fixed buffers
    swapped in too, those of every later call of the same shapes. They are written out as
    one straight-line body over the step number ``i`` (with the views of the fixed buffers
    taken once per call, before it), its numbers (the sizes, the dtype's constants, the
    columns of a window) as free names whose values are kept in :attr:`consts`, and made
    into

    * :attr:`make`: a Python function ``replay(i)`` that runs one step;
    * :attr:`whole`: where every call has a compiled twin (:func:`twin`), one
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
    (:func:`compiled_module`; its name hashes the source, the imports and the code of the
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
    return compiled_module("whole_loop", src, "loop", scope, depends=_code_digest())


@functools.cache
def _code_digest():
    """A hash of the code that the compiled loops call, and of the code that writes, names
    and loads them: the row helpers (:mod:`~xlstm.accel.cpu.record`), numpy's routines
    (:mod:`~xlstm.accel.cpu.native`), the point loops (:mod:`~xlstm.accel.cpu.codegen`), the
    whole loops (this module) and the module cache (:mod:`~xlstm.accel.cpu.cache`). numba
    does not notice when a function that a cached one calls has changed, so the generated
    loops' names change with it instead. (:mod:`~xlstm.accel.cpu.loops` holds no compiled
    code: what its steps call is recorded in each loop's text.)"""
    modules = (sys.modules[__name__], record, codegen, cache, _native)
    return digest("".join(inspect.getsource(m) for m in modules))


@functools.lru_cache(maxsize=256)
def _maker(source, name, names):
    """A factory for the function ``name`` that ``source`` defines, compiled once per text:
    it takes the values of the free ``names``, runs ``source`` and returns the function."""
    body = "\n".join("    " + line for line in source.splitlines())
    text = f"def make({', '.join(names)}):\n{body}\n    return {name}\n"
    scope = {}
    exec(compile(text, "<xlstm step>", "exec"), scope)  # noqa: S102
    return scope["make"]


#: The numpy ufunc behind each recorded function that is one.
_UFUNCS = {np.tanh: np.tanh, np.sign: np.sign, np.add: np.add, np.multiply: np.multiply,
           maximum: np.maximum, np.exp: np.exp, np.log1p: np.log1p}


#: Those of them that round correctly: every loop of numpy's gives the same bits.
_EXACT = (np.add, np.multiply)


def twin(dtype, fn, args):
    """The compiled twin of the recorded call ``fn(*args)``: ``(twin, lead)``, a compiled
    function that makes the same numpy calls (:mod:`xlstm.accel.cpu.native`) when called as
    ``twin(*lead, *args)``; ``None`` where there is none."""
    if isinstance(fn, Dispatcher):  # a point loop or a row helper: compiled already
        return fn, ()
    views = [view(a) for a in args]
    if fn is np.matmul or fn is matmul_t:
        a, b, out = views
        lead = _native.blas(dtype)
        ok = lead is not None and _native.matmul_supported(a, b.T if fn is matmul_t else b, out)
        return ((_native.matmul if fn is np.matmul else _native.matmul_t), lead) if ok else None
    if fn is np.copyto:
        dst, src = views
        ok = isinstance(src, np.ndarray) and src.shape == dst.shape and src.dtype == dst.dtype
        return (_native.copyto, ()) if ok else None
    uf = _UFUNCS.get(fn)
    if uf is None or not _native.ufunc_supported(dtype, *views, exact=uf in _EXACT):
        return None
    return _native.ufunc_loop(uf, dtype, uf.nin == 2 and not isinstance(views[1], np.ndarray))
