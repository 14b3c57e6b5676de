"""The point loops: a cell's point function run over every element of a step's grid, as a
generated module compiled by numba (one per function and kinds of arguments), whose text
and name come from here and which :mod:`xlstm.accel.cpu.cache` keeps on disk.
"""

from __future__ import annotations

import functools
import inspect
import types

from .cache import compiled_module
from .native import OPTIONS as _OPTIONS
from .native import register_jitable

__all__ = ["map_kernel"]


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
def map_kernel(fn, kinds, out_kinds):
    """A compiled loop that applies point function ``fn`` to every element of a 2-D grid.

    ``kinds`` and ``out_kinds`` say how each argument is read and each output written
    (:func:`_kernel_source`).

    The loop is generated as a small module in the cache folder
    (:func:`~xlstm.accel.cpu.cache.compiled_module`), named by a hash of its text and of
    ``fn``'s source, so that numba can cache its machine code on disk and a changed point
    function never meets a stale cache. Where nothing can be written there,
    the loop is compiled in memory, once per process.
    """
    src = _kernel_source(fn, kinds, out_kinds)
    # a point function may call others: numba compiles those where it calls them
    helpers = _helpers(fn)
    for h in helpers:
        _jitable(h)
    text = src + "".join(inspect.getsource(f) for f in (fn, *helpers))
    return compiled_module("point_loop", src, "kernel", {}, depends=text)
