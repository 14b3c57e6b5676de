"""The operations of a cell's step over preallocated buffers (:class:`BufferOps`), which
record the calls they make while a step is taped, and what they take and call: column
windows and blocks of a buffer, the point loops, the compiled row helpers of padded rows and
the transposed copy of the engine's step frame.
"""

from __future__ import annotations

import functools

import numpy as np

from .codegen import map_kernel
from .native import cached_jit

__all__ = ["BufferOps", "Blocks", "Window", "copy_t", "keep_rows", "matmul_t", "maximum",
           "view", "zero_rows"]


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
        res = fn(*[view(a) for a in args])
        # an output window stands for itself (a later call reads it as the same columns)
        return args[-1] if type(args[-1]) is Window else res

    def tanh(self, x, out):
        return self._call(np.tanh, x, out)

    def relu(self, x, out):
        """``max(x, 0)``: numpy's ``maximum``, as on the array path."""
        return self._call(maximum, x, self._ftype(0), out)

    def sign(self, x, out):
        return self._call(np.sign, x, out)

    def exp(self, x, out):
        return self._call(np.exp, x, out)

    def log1p(self, x, out):
        return self._call(np.log1p, x, out)

    def maximum(self, x, y, out):
        """numpy's ``maximum``, as on the array path (NaN where either is NaN)."""
        return self._call(maximum, x, y, out)

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

    def matmul(self, a, b, out):
        """``a @ b`` into ``out``: numpy's ``matmul``, as on the array path."""
        return self._call(np.matmul, a, b, out)

    def transposed_matmul(self, a, b, out, tmp):
        """``(a @ b^T)^T`` into ``out``, as on the array path: ``a @ b^T`` into the C-ordered
        ``tmp`` by numpy's ``matmul``, then copied into ``out`` transposed."""
        self._call(matmul_t, a, b, tmp)
        self._call(copy_t, out, tmp)
        return out

    def keep_rows(self, new, old, active, out):
        """``new`` into ``out`` (which holds it already on every route but a cell's odd one),
        and ``old`` into the padded rows, where the ``(m, 1)`` booleans ``active`` are false."""
        if new is not out:
            self.copy(new, out)
        self._call(keep_rows, out, old, active)
        return out

    def zero_rows(self, x, active, out):
        """``x`` into ``out`` (see :meth:`keep_rows`), with zeros in the padded rows."""
        if x is not out:
            self.copy(x, out)
        self._call(zero_rows, out, active, self.const(0.0))
        return out

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
        return [view(v)]

    res = fn(*[a for v in args for a in spread(v)])
    targets = [t for o in outs for t in spread(o)]
    for target, value in zip(targets, (res,) if len(targets) == 1 else res):
        np.copyto(target, value)


def maximum(x, y, out):
    """``numpy.maximum`` with its output given by position, as the other calls take it."""
    return np.maximum(x, y, out=out)


def view(v):
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
    return map_kernel(fn, kinds, out_kinds), special, spread


@cached_jit
def keep_rows(dst, src, active):
    """``src`` into the rows ``r`` of ``dst`` where not ``active[r, 0]``: the array path's
    ``where(active, new, old)`` for a padded row (one compiled call; numpy's masked
    ``copyto`` costs several times as much at these sizes)."""
    for r in range(dst.shape[0]):
        if not active[r, 0]:
            for j in range(dst.shape[1]):
                dst[r, j] = src[r, j]


@cached_jit
def zero_rows(dst, active, zero):
    """``zero`` into the rows ``r`` of ``dst`` where not ``active[r, 0]``."""
    for r in range(dst.shape[0]):
        if not active[r, 0]:
            for j in range(dst.shape[1]):
                dst[r, j] = zero


@cached_jit
def copy_t(dst, src):
    """``numpy.copyto(dst, src.T)`` for 2-D arrays: the transposed copy, by the loop that
    the compiled ``copyto`` runs on the transposed view (:func:`~xlstm.accel.cpu.native.copyto`)."""
    for r in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[r, j] = src[j, r]


def _keep_rows_plain(dst, src, active):
    """:func:`keep_rows` by numpy's masked ``copyto`` (the same values: a copy)."""
    np.copyto(dst, src, where=np.logical_not(active))


def _zero_rows_plain(dst, active, zero):
    """:func:`zero_rows` by numpy's masked ``copyto``."""
    np.copyto(dst, zero, where=np.logical_not(active))


def _copy_t_plain(dst, src):
    """:func:`copy_t` by numpy's ``copyto``."""
    np.copyto(dst, src.T)


#: The plain twin of each compiled row helper, for :class:`BufferOps` with ``plain``.
_PLAIN = {keep_rows: _keep_rows_plain, zero_rows: _zero_rows_plain, copy_t: _copy_t_plain}


def matmul_t(a, b, out):
    """``a @ b.T`` into ``out``: numpy's ``matmul`` on the transposed view, as the array
    path's ``WaT @ dga^T``."""
    return np.matmul(a, b.T, out=out)
