"""The table of the fused CUDA kernels, and everything generated from it.

Each kernel is declared once, in its cell's header, right above the element function it
calls (``<cell>_<step>_elem``)::

    // kernel <cell> <step>: <arguments in order, read > written>

with the step ``fwd`` or ``bwd`` and the arguments as :func:`_args` reads them (lines
starting ``//`` and four spaces continue the list). :data:`TABLE` gathers them from every
``*.cuh`` of this folder. The
element function works on one step's C-contiguous ``(m, width * n)`` slices of the engine's
stacks (width 4 for the LSTM's gates, 3 for its sigmoid gates, 1 for one number per unit),
or a ``(1, width * n)`` row read by every row (a bias), each one read (``const``) or written.
A written argument may name the read argument that it is allowed to be (``dc_prev`` updated
in place over ``dc``); both then lose ``__restrict__``.

Both kinds of kernel take each argument the same way, as a whole C-contiguous stack of
such slices with its length and base, ``(array, len, base)``: step ``s`` works on slice
``(base + s) % len`` (a single slice is a stack of one, base 0). A per-step kernel
(:func:`step_params`) takes the sizes ``m`` and ``n`` and the step ``s``, then the stacks;
a persistent kernel (:func:`persistent_params`) runs every step of a loop itself. So a loop
builds a launch's arguments once, and from one step to the next only ``s`` changes.

Each argument also names its *source*, the engine's buffer that the loops
(:class:`xlstm.accel.cuda.Loops`) pass for it; the loops know no cell, only these names:

* forward step ``t`` (``k``-th of its chunk): ``gx`` the step's input term, ``ga`` the
  recurrent product ``a_prev @ WaT`` (without bias), ``ba`` the recurrent bias row,
  ``<State>[t]`` and ``<State>[t+1]`` a state before and after the step (``A[t]``,
  ``C[t+1]``), ``<Saved>`` the step's slot of a saved stack (``S``);
* backward step ``t``: ``da`` the upstream gradient on the step's output, ``da_rec`` the
  product ``dga @ Wa`` of the step after it (at first the gradient on the final ``a``),
  ``direct`` the gradient on ``a_prev`` other than through ``ga`` (the cell's
  ``da_direct``; from the step after it when read, this step's when written: the loops add
  the last one to the product after the loop), ``d<State>`` the gradient carried on
  another state (``dC``, updated in place), ``<State>[t]`` the state before the step,
  ``<Saved>`` the step's slices of the saved stacks, ``dGx`` and ``dGa`` the step's
  gradients of the input and recurrent terms;
* in the padded-batch variants (:func:`masked`, one per row, generated): ``active`` the
  step's ``(m, 1)`` flags of the engine's ``active``, and backward ``hold``, the gradient
  on the hidden state held over padded steps (one ``(m, n)`` buffer, updated in place).

From the table come:

* :func:`source`: the CUDA text that NVRTC compiles at run time (and nvcc in CI): the cell's
  header inlined, then per kernel and dtype one ``extern "C" __global__`` per-step kernel,
  one thread per element of the ``(m, n)`` grid, and one persistent kernel;
* :func:`host_source`: the tests' host build, the same text behind a grid emulator plus one
  ``extern "C"`` launcher per kernel taking ``(grid, block, seed, args...)``;
* :func:`check_args` and :func:`check_persistent_args`: the checks of a launch's arguments
  (count, dtype, shape, layout, overlap) that the tests make on every launch;
* :func:`write`: the files that ``.ci/compile_cuda.sh`` compiles; run this file as a
  script, ``python xlstm/accel/cuda/kernels.py --write DIR``, which needs nothing but Python;
* :func:`nc_violations`: the check of their PTX that no persistent kernel reads memory that
  its launch writes through the non-coherent path (``kernels.py --check-ptx DIR``).

Adding a cell's kernels means one header (``<cell>_pointwise.cuh``, its element functions
each under its declaration); nothing here, and nothing in the loops.

This module is pure Python and imports nothing but the standard library (nor the rest of
the package), so that it also runs as a script.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DTYPES", "GUARD", "HEADERS", "PERSISTENT", "TABLE", "Arg", "Kernel", "cells",
           "check_args", "check_persistent_args", "gates", "host_source", "kernel",
           "kernel_name", "launch_read_only", "masked", "nc_loads", "nc_violations",
           "persistent_params", "source", "step_params", "write"]

_DIR = Path(__file__).resolve().parent

#: The header of each cell, in this folder: its element functions, in namespace ``xlstm``.
#: The header every cell header includes first (inlined into the generated source).
PRELUDE = "prelude.cuh"
#: The cell-independent half of the persistent kernels (grid barrier, block GEMM).
PERSISTENT = "persistent.cuh"
_INCLUDE_PRELUDE = f'#include "{PRELUDE}"'

#: A kernel's declaration in a header (see the module's docstring), and its continuation.
_DECLARATION = re.compile(r"^// kernel (\w+) (fwd|bwd): (.*)$")
_CONTINUED = re.compile(r"^//    (\s*\S.*)$")


def _declarations():
    """``(cell, step, arguments, header)`` of every kernel declared in this folder's
    headers, in the order of the headers' names, then of their lines."""
    found = []
    for path in sorted(_DIR.glob("*.cuh")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            m = _DECLARATION.match(line)
            if m is None:
                continue
            spec = [m.group(3)]
            for more in lines[i + 1:]:
                c = _CONTINUED.match(more)
                if c is None:
                    break
                spec.append(c.group(1).strip())
            found.append((m.group(1), m.group(2), " ".join(spec), path.name))
    return found


#: The header of each cell that has kernels: where its kernels are declared.
HEADERS = {cell: header for cell, _, _, header in _declarations()}

#: dtype name -> (suffix of the kernel name, C type).
DTYPES = {"float32": ("f32", "float"), "float64": ("f64", "double")}

#: The bounds check of every kernel: threads past the last element of the grid do nothing.
GUARD = "if (e < m * n)"


@dataclass(frozen=True)
class Arg:
    """One array argument of a kernel: a ``(m, width * n)`` C-contiguous slice, with
    ``row`` a ``(1, width * n)`` one that every row reads, or with ``mask`` an ``(m, 1)``
    ``bool`` one, a flag per row (``active``).

    ``out`` marks an argument that the kernel writes; ``alias`` names the read argument that
    a written one may be the very same array as (same start, same shape); ``src`` names the
    engine's buffer that the loops pass (see the module's docstring); ``elem`` is false for
    the arguments that a padded-batch variant adds (:func:`masked`), which the element
    function does not take.
    """

    name: str
    width: int
    out: bool = False
    alias: str | None = None
    src: str = ""
    row: bool = False
    mask: bool = False
    elem: bool = True


@dataclass(frozen=True)
class Kernel:
    """One kernel: ``elem(e, n, *args)`` of the cell's header, for every element ``e``."""

    cell: str
    step: str
    elem: str
    args: tuple[Arg, ...]
    masked: bool = False

    @property
    def key(self) -> tuple[str, str]:
        """``(cell, step)`` in :data:`TABLE`: the step is ``"fwd"`` or ``"bwd"``, with
        ``"_masked"`` appended for the padded-batch variant."""
        return self.cell, self.step + ("_masked" if self.masked else "")

    def name(self, dtype_name: str) -> str:
        """The ``extern "C"`` name of this kernel for ``dtype_name``."""
        return f"xlstm_{self.cell}_{self.key[1]}_{DTYPES[dtype_name][0]}"

    def point_name(self, dtype_name: str) -> str:
        """The name of the ``__device__`` function that does this kernel's work on one
        element, for ``dtype_name``."""
        return f"xlstm_{self.cell}_{self.key[1]}_point_{DTYPES[dtype_name][0]}"

    def persistent_name(self, dtype_name: str) -> str:
        """The ``extern "C"`` name of this row's persistent kernel for ``dtype_name``."""
        return f"xlstm_{self.cell}_{self.key[1]}_persistent_{DTYPES[dtype_name][0]}"

    def elem_args(self) -> tuple[Arg, ...]:
        """The arguments passed on to the element function, in order."""
        return tuple(a for a in self.args if a.elem)

    def aliased(self) -> frozenset[str]:
        """The arguments that may share memory (no ``__restrict__`` on them)."""
        return frozenset(n for a in self.args if a.alias for n in (a.name, a.alias))


def _args(spec):
    """Arguments from ``"read ... > written ..."``, each ``name:width@source``; a width
    ending in ``r`` is a row (``ba:3r@ba``); a written one may add ``=input`` after the width,
    the read argument it may be (``"dc:1@dC > dc_prev:1=dc@dC"``)."""
    read, written = spec.split(">")
    out = []
    for words, is_out in ((read, False), (written, True)):
        for word in words.split():
            name, rest = word.split(":")
            rest, _, src = rest.partition("@")
            width, _, alias = rest.partition("=")
            row = width.endswith("r")
            out.append(Arg(name, int(width.rstrip("r")), out=is_out, alias=alias or None,
                           src=src, row=row))
    return tuple(out)


def masked(k: Kernel) -> Kernel:
    """The padded-batch variant of row ``k``: the same element function, behind a flag per
    row, ``active`` (the engine's ``active[t]``: whether the step is within the row's
    sequence), with the array path's semantics for a row where it is false.

    * Forward: every row runs the step, then a padded row's new states are its old ones.
      Where the row reads no ``<State>[t]`` for a state it writes, ``<name>_prev`` is added.
    * Backward: a padded row writes zero gate gradients (``dGx``, ``dGa``) and passes the
      gradients reaching its state on unchanged. A state's carried gradient (``dC``, updated
      in place) simply stays. The hidden state's, the sum of ``da_rec`` and the direct term,
      cannot stay in ``da_rec``, which the next GEMM overwrites (with exactly zero in this
      row, as its gate gradients are zero): it goes into ``hold`` instead, and every step
      adds ``hold`` to ``da_rec`` first (writing the sum back, ``da_rec_sum``) and then sets
      it to ``-0``, which adds nothing to any number (the loops add the last ``hold`` after
      the loop, before the direct term). An active row after an active row therefore
      computes exactly what the unmasked kernel does.
    """
    if k.masked:
        raise ValueError(f"{k.cell} {k.step} is already the masked variant")
    extra = [Arg("active", 1, src="active", mask=True, elem=False)]
    reads = {a.src: a for a in k.args if not a.out}
    if k.step == "fwd":
        for a in k.args:
            if a.out and a.src.endswith("[t+1]") and a.src[:-5] + "[t]" not in reads:
                extra.append(Arg(a.name + "_prev", a.width, src=a.src[:-5] + "[t]", elem=False))
    else:
        for a in k.args:
            if a.out and a.src not in ("dGx", "dGa", "direct") and not a.alias:
                raise ValueError(f"{k.cell} bwd: no padded-row value for output {a.name}")
        extra += [Arg("hold", 1, src="hold", elem=False),
                  Arg("da_rec_sum", 1, out=True, alias=reads["da_rec"].name, src="da_rec",
                      elem=False),
                  Arg("hold_next", 1, out=True, alias="hold", src="hold", elem=False)]
    return Kernel(k.cell, k.step, k.elem, (*k.args, *extra), masked=True)


#: Every kernel, keyed by ``(cell, step)`` (:attr:`Kernel.key`): those declared in the
#: headers and their padded-batch variants (:func:`masked`). Argument order is the contract
#: with the loops that launch them (``xlstm.accel.cuda.Loops``): after ``m`` and ``n``,
#: inputs first.
TABLE = {
    v.key: v
    for cell, step, spec, _ in _declarations()
    for k in (Kernel(cell, step, f"{cell}_{step}_elem", _args(spec)),)
    for v in (k, masked(k))
}


def _validate():
    for (cell, step), k in TABLE.items():
        if (cell, step) != k.key or cell != k.cell:
            raise ValueError(f"TABLE: {cell} {step} is filed under another key")
        if cell not in HEADERS:
            raise ValueError(f"TABLE: cell {cell!r} has no header in HEADERS")
        names = [a.name for a in k.args]
        if len(set(names)) != len(names):
            raise ValueError(f"TABLE: {cell} {step} repeats an argument name")
        for a in k.args:
            if a.alias is not None and (a.alias not in names or a.alias == a.name
                                        or k.args[names.index(a.alias)].out):
                raise ValueError(f"TABLE: {cell} {step}: {a.name} may alias only an input")
            if not a.src or ((a.row or a.mask) and a.out) or (a.mask and a.row):
                raise ValueError(f"TABLE: {cell} {step}: {a.name} needs a source and, as a "
                                 "row or a mask, must be read only")
            if not a.elem and not k.masked:
                raise ValueError(f"TABLE: {cell} {step}: {a.name} must reach the element "
                                 "function")


_validate()


def cells() -> tuple[str, ...]:
    """The cells that have kernels, in table order."""
    return tuple(dict.fromkeys(cell for cell, _ in TABLE))


def kernel(cell: str, step: str) -> Kernel:
    """The table's row for ``cell`` and ``step``."""
    try:
        return TABLE[cell, step]
    except KeyError:
        raise KeyError(f"no CUDA kernel for cell {cell!r}, step {step!r}") from None


def kernel_name(cell: str, step: str, dtype_name: str) -> str:
    """The ``extern "C"`` name of a kernel, e.g. ``xlstm_lstm_fwd_f32``."""
    return kernel(cell, step).name(dtype_name)


# ---------------------------------------------------------------------- generated C++
def _point_params(k, ctype):
    """The point function's parameters: ``e``, ``n``, then one pointer per argument (const
    where read), without ``__restrict__`` (see :func:`_point`)."""
    out = ["xlstm::index_t e", "xlstm::index_t n"]
    for a in k.args:
        const = "" if a.out else "const "
        out.append(f"{const}{'bool' if a.mask else ctype}* {a.name}")
    return out


def _point(k, dtype_name):
    """The kernel's work on one element ``e``: a ``__device__`` function that both of its
    drivers call, the per-step kernel and the persistent one.

    Its pointers carry no ``__restrict__``: each driver's own parameters say what it may
    assume. A ``const __restrict__`` pointer lets NVCC read through the non-coherent path
    (``ld.global.nc``), which the PTX memory model allows only for memory that nothing writes
    during the whole launch: true of every input of a per-step kernel, not of a state that
    a persistent kernel wrote at the step before (:func:`launch_read_only`).
    """
    ctype = DTYPES[dtype_name][1]
    params = ",\n    ".join(_point_params(k, ctype))
    call = f"xlstm::{k.elem}<{ctype}>({', '.join(['e', 'n', *(a.name for a in k.elem_args())])});"
    body = _masked_body(k, ctype, call) if k.masked else [call]
    return (f"__device__ inline void {k.point_name(dtype_name)}(\n    {params}) {{\n"
            + "".join(f"    {line}\n" for line in body) + "}\n")


def _stack_params(k, ctype, restrict):
    """Each argument of row ``k`` as a whole stack: its pointer (const where read,
    ``__restrict__`` where named in ``restrict``), its length and its base."""
    out = []
    for a in k.args:
        const = "" if a.out else "const "
        qualifier = " __restrict__" if a.name in restrict else ""
        out += [f"{const}{'bool' if a.mask else ctype}*{qualifier} {a.name}",
                f"xlstm::index_t {a.name}_len", f"xlstm::index_t {a.name}_base"]
    return out


def step_params(k: Kernel, ctype: str = "float", *, restrict: bool = True) -> list[str]:
    """The parameters of row ``k``'s per-step kernel, in order: the sizes ``m`` and ``n``,
    the step ``step``, then each argument of the row as a whole stack with its length and
    base, as for the persistent kernel (:func:`persistent_params`): the launch reads and
    writes slice ``(base + step) % len``. So the loops build a launch's arguments once and
    change only ``step`` from one step to the next.

    ``__restrict__`` on every array but the ones that may alias (:meth:`Kernel.aliased`;
    with ``restrict`` false, on none): a launch is one step, and reads nothing that it
    writes. Two arguments on one stack (``C[t]`` and ``C[t+1]``) touch different slices."""
    names = frozenset(a.name for a in k.args) - k.aliased() if restrict else frozenset()
    return ["xlstm::index_t m", "xlstm::index_t n", "xlstm::index_t step",
            *_stack_params(k, ctype, names)]


def _slices(k, indent):
    """The point function's arguments after ``e, n``: each stack's slice at ``step``."""
    return f",\n{indent}".join(
        ["e, n", *(f"xlstm::step_slice({a.name}, {a.name}_len, {a.name}_base, step, "
                   f"{_slice_size(a)})" for a in k.args)])


def _wrapper(k, dtype_name):
    """The per-step kernel: one thread per element of the ``(m, n)`` grid of step ``step``."""
    ctype = DTYPES[dtype_name][1]
    params = ",\n    ".join(step_params(k, ctype))
    return (
        f'extern "C" __global__ void {k.name(dtype_name)}(\n    {params}) {{\n'
        "    const xlstm::index_t e = (xlstm::index_t)blockIdx.x * blockDim.x + threadIdx.x;\n"
        f"    {GUARD} {{\n"
        f"        {k.point_name(dtype_name)}({_slices(k, ' ' * 12)});\n"
        "    }\n"
        "}\n"
    )


def _slice_size(a):
    """The elements of one step's slice of argument ``a``, in terms of ``m`` and ``n``."""
    return "m" if a.mask else f"{a.width} * n" if a.row else f"m * {a.width} * n"


def gates(k: Kernel) -> int:
    """The width of the recurrent term of row ``k`` (the number of gates, ``k n`` columns)."""
    return next(a.width for a in k.args if a.src in ("gx", "dGx"))


#: The names that a persistent kernel uses itself, besides its parameters.
_PERSISTENT_LOCALS = frozenset(
    ["T", "w_sh", "K", "ld_out", "ldw", "j0", "own", "cols", "tile_sh", "i", "step", "q", "e",
     "m", "n", "steps", "units", "tile", "barrier", "w", "in", "in_len", "in_base", "out"])


def _buffer(src):
    """The engine's buffer behind source ``src``: a state's stack for ``C[t]`` and
    ``C[t+1]`` alike."""
    return src.removesuffix("[t+1]").removesuffix("[t]")


def launch_read_only(k: Kernel) -> frozenset[str]:
    """The arguments of row ``k`` whose memory nothing writes during a whole persistent
    launch, so that its kernel may read them through ``const __restrict__`` pointers (and
    NVCC through the non-coherent path, ``ld.global.nc``).

    Not among them: every argument on a buffer that the row writes (a state read at step
    ``t`` is the stack that step ``t - 1`` wrote, ``C[t]`` and ``C[t+1]``), and the product's
    output (``ga`` forward, ``da_rec`` backward), which the kernel writes at every step.
    """
    written = {_buffer(a.src) for a in k.args if a.out}
    written.add("ga" if k.step == "fwd" else "da_rec")
    return frozenset(a.name for a in k.args if not a.out and _buffer(a.src) not in written)


def persistent_params(k: Kernel, ctype: str = "float") -> list[str]:
    """The parameters of row ``k``'s persistent kernel, in order: the sizes ``m``, ``n``,
    ``steps``, ``units`` (per block) and ``tile`` (rows per staged tile), the grid barrier's
    counter, the recurrent weights ``w`` (``WaT``, ``(n, k n)``), the product's input stack
    ``in`` (the state ``A`` forward, ``dGa`` backward) and its output ``out`` (``ga``
    forward, ``da_rec`` backward), then each argument of the row as a whole stack with its
    length and base: step ``s`` reads slice ``(base + s) % len``.

    ``__restrict__`` only on ``w`` and the arguments of :func:`launch_read_only`: nothing
    that the launch writes is read through the non-coherent path."""
    out = [f"xlstm::index_t {v}" for v in ("m", "n", "steps", "units", "tile")]
    out += ["unsigned long long* barrier", f"const {ctype}* __restrict__ w",
            f"const {ctype}* in", "xlstm::index_t in_len", "xlstm::index_t in_base",
            f"{ctype}* out"]
    return out + _stack_params(k, ctype, launch_read_only(k))


def _persistent(k, dtype_name):
    """Row ``k``'s persistent kernel: the whole loop of ``steps`` steps in one cooperative
    launch (``persistent.cuh``); forward ascending, backward descending."""
    ctype = DTYPES[dtype_name][1]
    params = ",\n    ".join(persistent_params(k, ctype))
    g = gates(k)
    fwd = k.step == "fwd"
    # forward: ga = A @ WaT, K = n, the block's k gate columns of each unit; backward:
    # da_rec = dGa @ Wa, K = k n, its unit columns; Wa[q, j] = WaT[j, q]
    K, groups, w_strides, ld_out = (("n", g, f"{g} * n, 1", f"{g} * n") if fwd
                                    else (f"{g} * n", 1, f"1, {g} * n", "n"))
    clash = _PERSISTENT_LOCALS.intersection(a.name for a in k.args)
    if clash:
        raise ValueError(f"{k.cell} {k.step}: argument names {sorted(clash)} are taken")
    slices = _slices(k, " " * 16)
    gemm = ("        xlstm::block_gemm<T>(xlstm::step_slice(in, in_len, in_base, step, m * K), m, "
            "K, out,\n                             ld_out, cols, w_sh, tile_sh, tile, ldw);\n")
    lines = [
        f'extern "C" __global__ void {k.persistent_name(dtype_name)}(\n    {params}) {{\n',
        f"    typedef {ctype} T;\n",
        "    XLSTM_DYNAMIC_SHARED(T, w_sh);\n",
        f"    const xlstm::index_t K = {K}, ld_out = {ld_out}, ldw = K + 1;\n",
        "    const xlstm::index_t j0 = (xlstm::index_t)blockIdx.x * units;\n",
        "    const xlstm::index_t own = j0 < n ? (n - j0 < units ? n - j0 : units) : 0;\n",
        f"    const xlstm::Columns cols = {{{groups}, own, n, j0}};\n",
        f"    T* tile_sh = w_sh + {groups} * units * ldw;\n",
        f"    xlstm::load_weights<T>(w, {w_strides}, K, cols, w_sh, ldw);\n",
        "    for (xlstm::index_t i = 0; i < steps; ++i) {\n",
        f"        const xlstm::index_t step = {'i' if fwd else 'steps - 1 - i'};\n",
        gemm if fwd else "",
        "        for (xlstm::index_t q = threadIdx.x; q < m * own; q += blockDim.x) {\n",
        "            const xlstm::index_t e = (q / own) * n + j0 + q % own;\n",
        f"            {k.point_name(dtype_name)}({slices});\n",
        "        }\n",
        "        xlstm::grid_barrier(barrier);\n",
        "" if fwd else gemm,
        "    }\n",
        "}\n",
    ]
    return "".join(lines)


def _masked_body(k, ctype, call):
    """The lines of a padded-batch kernel (:func:`masked`) for one element ``e``."""
    by_src = {a.src: a for a in k.args if not a.out}
    if k.step == "fwd":
        keep = [f"    {a.name}[e] = {by_src[a.src[:-5] + '[t]'].name}[e];"
                for a in k.args if a.out and a.src.endswith("[t+1]")]
        return [call, "if (!active[e / n]) {  // a padded row keeps its state", *keep, "}"]
    zero = f"{ctype}(-0.0)"
    carried = "g" if "direct" not in by_src else f"g + {by_src['direct'].name}[e]"
    lines = [f"const {ctype} g = {by_src['da_rec'].name}[e] + hold[e];",
             "if (active[e / n]) {",
             "    da_rec_sum[e] = g;",
             f"    hold_next[e] = {zero};",
             f"    {call}",
             "} else {  // a padded row: no gate gradients, its state's gradients pass on",
             f"    hold_next[e] = {carried};"]
    if any(a.out and a.elem and a.width > 1 for a in k.args):
        lines.append("    const xlstm::index_t r = e / n;")
    for a in k.args:
        if not a.out or not a.elem:
            continue
        if a.src == "direct":  # passed on in hold_next
            lines.append(f"    {a.name}[e] = {zero};")
            continue
        for q in range(a.width):
            at = f"r * {a.width} * n + {q} * n + (e - r * n)" if a.width > 1 else "e"
            if a.src in ("dGx", "dGa"):
                lines.append(f"    {a.name}[{at}] = {ctype}(0);")
            elif a.alias:
                lines.append(f"    {a.name}[{at}] = {a.alias}[{at}];")
    lines.append("}")
    return lines


def _rows(cell):
    rows = [k for (c, _), k in TABLE.items() if c == cell]
    if not rows:
        raise KeyError(f"no CUDA kernels for cell {cell!r}")
    return rows


def source(cell: str = "lstm") -> str:
    """The CUDA source of ``cell``'s kernels, header inlined: what NVRTC compiles.

    Self-contained (no ``#include`` of the project's files), so that it compiles the same
    from a string at run time, with nvcc in CI and, behind the grid emulator, on the host.
    """
    rows = _rows(cell)
    parts = [
        f"// Generated by xlstm.accel.cuda.kernels from its table and {HEADERS[cell]}: the fused\n"
        f"// kernels of the {cell} cell. Per-step kernels: one thread per (row, unit) element\n"
        "// of the (m, n) grid. Persistent kernels: the whole loop in one launch.\n",
        f"// ---- {PRELUDE}\n{_header(PRELUDE, prelude=False)}\n",
        f"// ---- {HEADERS[cell]}\n{_header(HEADERS[cell])}\n",
        f"// ---- {PERSISTENT}\n{_header(PERSISTENT)}\n",
        "// ---- one element\n",
    ]
    parts += [_point(k, d) for k in rows for d in DTYPES]
    parts.append("// ---- per-step kernels\n")
    parts += [_wrapper(k, d) for k in rows for d in DTYPES]
    parts.append("// ---- persistent kernels\n")
    parts += [_persistent(k, d) for k in rows for d in DTYPES]
    return "\n".join(parts)


def _header(name, prelude=True):
    """The text of header ``name`` of this folder, its ``#include`` of the prelude removed."""
    text = (_DIR / name).read_text(encoding="utf-8")
    if prelude:
        if _INCLUDE_PRELUDE not in text:
            raise RuntimeError(f"{name} does not include {PRELUDE}")
        text = text.replace(_INCLUDE_PRELUDE, "", 1)
    return text.rstrip()


def _launcher(k, dtype_name):
    params = step_params(k, DTYPES[dtype_name][1], restrict=False)
    call = ", ".join(p.split()[-1].lstrip("*") for p in params)
    params = ",\n    ".join(["unsigned grid", "unsigned block", "unsigned long long seed",
                              *params])
    name = k.name(dtype_name)
    return (f'extern "C" void {name}_host(\n    {params}) {{\n'
            f"    xlstm_emu::launch({name}, grid, block, seed, {call});\n}}\n")


def _persistent_launcher(k, dtype_name):
    params = [p.replace(" __restrict__", "") for p in persistent_params(k, DTYPES[dtype_name][1])]
    names = ", ".join(p.split()[-1].lstrip("*") for p in params)
    params = ",\n    ".join(["unsigned grid", "unsigned block", "unsigned long long shared_bytes",
                              "unsigned long long seed", *params])
    name = k.persistent_name(dtype_name)
    return (f'extern "C" void {name}_host(\n    {params}) {{\n'
            f"    xlstm_emu::launch_concurrent({name}, grid, block, shared_bytes, seed, "
            f"{names});\n}}\n")


def host_source(cell: str = "lstm", *, kernels: str | None = None,
                include: str | None = None) -> str:
    """The tests' host build of ``cell``'s kernels: ``kernels`` (default: :func:`source`,
    inlined) behind ``grid_emulator.h``, plus ``extern "C" void <kernel>_host(grid, block,
    seed, m, n, arrays...)`` per kernel, which runs every (block, thread) of the grid, and
    ``<persistent kernel>_host(grid, block, shared_bytes, seed, ...)`` (the parameters of
    :func:`persistent_params`), which runs them all at once, each on its own host thread.

    ``include`` names a file to ``#include`` instead of inlining the kernel text (the text
    written by :func:`write`), so that compiler messages point into it.
    """
    rows = _rows(cell)
    body = f'#include "{include}"\n' if include else (source(cell) if kernels is None else kernels)
    parts = [
        f"// Generated by xlstm.accel.cuda.kernels: host launchers of the {cell} kernels.\n"
        '#include "grid_emulator.h"\n',
        body,
        "// ---- host launchers\n",
    ]
    parts += [_launcher(k, d) for k in rows for d in DTYPES]
    parts += [_persistent_launcher(k, d) for k in rows for d in DTYPES]
    return "\n".join(parts)


def write(directory: str | Path) -> list[Path]:
    """Write, per cell, ``xlstm_<cell>.cu`` (:func:`source`) and ``xlstm_<cell>_host.cpp``
    (:func:`host_source`, including the first) into ``directory``; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for cell in cells():
        cu, cpp = directory / f"xlstm_{cell}.cu", directory / f"xlstm_{cell}_host.cpp"
        cu.write_text(source(cell), encoding="utf-8")
        cpp.write_text(host_source(cell, include=cu.name), encoding="utf-8")
        paths += [cu, cpp]
    return paths


# ------------------------------------------------------------------ argument checks
def _address_of(address):
    if address is not None:
        return address
    return lambda arr: arr.ctypes.data


def _stacks(k, where, dtype_name, m, n, rest):
    """The row's arguments in ``rest`` (``array, len, base`` each), checked: the lengths and
    bases Python ints, each array of its argument's dtype, a C-contiguous stack of ``len``
    slices of its shape (``(m, width * n)``, a row ``(1, width * n)``, a mask ``bool``
    ``(m, 1)``) or, with ``len`` 1 and base 0, one slice. Returns ``(arg, array, len,
    base)`` per argument."""
    _expect(len(rest) == 3 * len(k.args), f"{where}: {len(rest) // 3} stacks for {len(k.args)}")
    out = []
    for a, arr, length, base in zip(k.args, rest[::3], rest[1::3], rest[2::3]):
        _expect(type(length) is int and type(base) is int and length >= 1 and base >= 0,
                f"{where}: {a.name}'s length and base must be Python ints, >= 1 and >= 0")
        _expect(base <= 2**62, f"{where}: {a.name}'s base is out of range")
        shape = (m, 1) if a.mask else (1 if a.row else m, a.width * n)
        if arr.ndim == 2:
            _expect(length == 1 and base == 0, f"{where}: {a.name} is one slice, not a stack")
        else:
            shape = (length, *shape)
        want = "bool" if a.mask else dtype_name
        _expect(str(arr.dtype) == want, f"{where}: {a.name} is {arr.dtype}")
        _expect(tuple(arr.shape) == shape, f"{where}: {a.name} has shape {arr.shape}, not {shape}")
        _expect(arr.flags.c_contiguous, f"{where}: {a.name} is not C-contiguous")
        out.append((a, arr, length, base))
    return out


def _spans(arrays, address):
    """``(name, first byte, byte past the end)`` of each ``(name, array)``."""
    return [(name, address(arr), address(arr) + arr.size * arr.itemsize) for name, arr in arrays]


def check_args(k: Kernel, dtype_name: str, args, *, address=None) -> None:
    """Check one launch of row ``k``'s per-step kernel: ``args`` in the order of
    :func:`step_params`, ``m``, ``n`` and ``step`` Python ints, each argument a stack with its
    length and base (see :func:`_stacks`). Two arguments share memory only where they are
    the very same stack and, at this step, either different slices of it or the same slice
    of an argument and the read argument it may be (the table's ``alias``).

    ``address(arr)`` gives an array's first byte (default: numpy's ``arr.ctypes.data``).
    Raises ``AssertionError`` naming the kernel and the argument.
    """
    where = f"{k.cell} {k.step}"
    m, n, step, *rest = args
    _expect(all(type(v) is int and v >= 0 for v in (m, n, step)),
            f"{where}: m, n and step must be Python ints >= 0")
    stacks = _stacks(k, where, dtype_name, m, n, rest)
    spans = _spans([(a.name, arr) for a, arr, _, _ in stacks], _address_of(address))
    for i, ((a, _, length, base), (_, lo, hi)) in enumerate(zip(stacks, spans)):
        for (b, _, length2, base2), (_, lo2, hi2) in zip(stacks[:i], spans[:i]):
            if not (lo < hi2 and lo2 < hi):
                continue
            same = (lo, hi) == (lo2, hi2)
            slot, slot2 = (base + step) % length, (base2 + step) % length2
            allowed = a.alias == b.name or b.alias == a.name
            _expect(same and (slot != slot2 or allowed),
                    f"{where}: {a.name} and {b.name} share memory")


def check_persistent_args(k: Kernel, dtype_name: str, args, *, address=None) -> None:
    """Check one launch of row ``k``'s persistent kernel: ``args`` in the order of
    :func:`persistent_params`, the sizes Python ints, the barrier's counter one zero
    ``uint64``, ``w`` the ``(n, k n)`` weights, ``in`` a stack of the product's input
    (``(len, m, n)`` forward, ``(len, m, k n)`` backward) and ``out`` its ``(m, k n)`` or
    ``(m, n)`` output; each argument of the row a stack as for :func:`check_args`. All of
    dtype ``dtype_name`` (masks ``bool``), C-contiguous, and two arrays share memory only
    where they are the very same array (a stack read at one step and written at the next).
    Raises ``AssertionError`` naming the kernel and argument.
    """
    where = f"{k.cell} {k.step} persistent"
    m, n, steps, units, tile, barrier, w, gin, gin_len, gin_base, gout, *rest = args
    sizes = (m, n, steps, units, tile, gin_len, gin_base)
    _expect(all(type(v) is int and v >= 0 for v in sizes),
            f"{where}: sizes, lengths and bases must be Python ints >= 0")
    _expect(min(steps, units, tile) >= 1, f"{where}: steps, units and tile must be >= 1")
    _expect(str(barrier.dtype) == "uint64" and barrier.shape == (1,) and int(barrier[0]) == 0,
            f"{where}: the barrier's counter must be one zero uint64")
    stacks = _stacks(k, where, dtype_name, m, n, rest)
    _expect(all(base + steps <= 2**62 for _, _, _, base in stacks) and gin_base + steps <= 2**62,
            f"{where}: a base is out of range")
    g = gates(k)
    inner = n if k.step == "fwd" else g * n
    for name, arr, shape in (("w", w, (n, g * n)), ("in", gin, (gin_len, m, inner)),
                             ("out", gout, (m, g * n) if k.step == "fwd" else (m, n))):
        _expect(str(arr.dtype) == dtype_name, f"{where}: {name} is {arr.dtype}")
        _expect(tuple(arr.shape) == shape, f"{where}: {name} has shape {arr.shape}, not {shape}")
        _expect(arr.flags.c_contiguous, f"{where}: {name} is not C-contiguous")
    arrays = [("barrier", barrier), ("w", w), ("in", gin), ("out", gout),
              *((a.name, arr) for a, arr, _, _ in stacks)]
    spans = _spans(arrays, _address_of(address))
    for i, (name, lo, hi) in enumerate(spans):
        for other, lo2, hi2 in spans[:i]:
            _expect(not (lo < hi2 and lo2 < hi) or (lo, hi) == (lo2, hi2),
                    f"{where}: {name} and {other} share part of their memory")


# ---------------------------------------------------------------------- PTX checks
_PTX_LINE = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\s+(.*);")
_PTX_REG = re.compile(r"%\w+")


def nc_loads(ptx: str, entry: str, params: list[str]) -> list[frozenset[str]]:
    """The parameters that the address of each ``ld.global.nc`` of kernel ``entry`` derives
    from, in the PTX text ``ptx``; ``params`` names the kernel's parameters in order.

    A small data-flow pass over the kernel's virtual registers: a register loaded from
    parameter ``i`` derives from ``params[i]``, any other instruction's destination from
    every register it reads (to a fixed point, for the loops), a loaded value from nothing.
    """
    start = ptx.index(f".entry {entry}(")
    body = ptx[ptx.index("{", start): ptx.index("\n}", start)]
    lines = [m.groups() for m in map(_PTX_LINE.match, body.splitlines()) if m]
    if any(op.startswith("call") for op, _ in lines):
        raise ValueError(f"{entry}: calls a function; the pass follows one kernel body only")
    param = re.compile(rf"\[{re.escape(entry)}_param_(\d+)\]")
    taint: dict[str, frozenset[str]] = {}
    changed = True
    while changed:
        changed = False
        for op, operands in lines:
            if op.startswith(("st.", "bar.", "bra", "red.", "ret", "membar", "fence")):
                continue
            dst, _, rest = operands.partition(",")
            if op.startswith("ld.param"):
                got = frozenset([params[int(param.search(rest).group(1))]])
            elif op.startswith(("ld.", "atom.")):
                continue  # a loaded value is data, not an address
            else:
                got = frozenset().union(*(taint.get(r, frozenset())
                                          for r in _PTX_REG.findall(rest)))
            for reg in _PTX_REG.findall(dst):
                if not got <= taint.get(reg, frozenset()):
                    taint[reg] = taint.get(reg, frozenset()) | got
                    changed = True
    loads = []
    for op, operands in lines:
        if op.startswith("ld.global.nc"):
            address = operands[operands.index("["):]
            loads.append(frozenset().union(*(taint.get(r, frozenset())
                                             for r in _PTX_REG.findall(address))))
    return loads


def nc_violations(cell: str, ptx: str, *, kernels=None) -> tuple[int, list[str]]:
    """Check the PTX of ``cell``'s source (``nvcc -ptx``): no persistent kernel reads
    through the non-coherent path (``ld.global.nc``, :func:`nc_loads`) a parameter that its
    launch writes, that is any but ``w`` and :func:`launch_read_only`'s. ``kernels``:
    ``(row, dtype name)`` pairs to check (default: every persistent kernel of the cell).
    Returns the number of such loads checked and a message per load that breaks the rule.
    """
    if kernels is None:
        kernels = [(k, d) for (c, _), k in TABLE.items() if c == cell for d in DTYPES]
    checked, problems = 0, []
    for k, dtype_name in kernels:
        name = k.persistent_name(dtype_name)
        params = persistent_params(k, DTYPES[dtype_name][1])
        allowed = launch_read_only(k) | {"w"}
        pointers = {p.split()[-1] for p in params if "*" in p}
        for sources in nc_loads(ptx, name, [p.split()[-1].lstrip("*") for p in params]):
            checked += 1
            read = sources & pointers
            if not read or not read <= allowed:
                what = sorted(read - allowed) or "no parameter"
                problems.append(f"{name}: ld.global.nc of {what}, which the launch writes")
    return checked, problems


def _expect(ok, message):
    if not ok:
        raise AssertionError(message)


def main(argv: list[str] | None = None) -> int:
    """``python kernels.py --write DIR``: :func:`write`, printing one path per line.
    ``python kernels.py --check-ptx DIR``: :func:`nc_violations` on ``DIR/xlstm_<cell>.ptx``
    for every cell, printing what breaks the rule; exit status 1 if anything does."""
    parser = argparse.ArgumentParser(
        prog="kernels.py", description="Write the CUDA sources generated from the kernel table, "
                                       "or check their PTX.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", metavar="DIR",
                        help="folder to write xlstm_<cell>.cu and xlstm_<cell>_host.cpp into")
    action.add_argument("--check-ptx", metavar="DIR",
                        help="folder of xlstm_<cell>.ptx (nvcc -ptx of xlstm_<cell>.cu): no "
                             "persistent kernel may read what its launch writes via ld.global.nc")
    args = parser.parse_args(argv)
    if args.write is not None:
        for path in write(args.write):
            print(path)
        return 0
    checked, problems = 0, []
    for cell in cells():
        count, found = nc_violations(cell, (Path(args.check_ptx) / f"xlstm_{cell}.ptx")
                                     .read_text(encoding="utf-8"))
        checked, problems = checked + count, problems + found
    for line in problems:
        print(line)
    print(f"check-ptx: {checked} ld.global.nc in the persistent kernels, {len(problems)} of "
          "memory that their launch writes")
    return 1 if problems or not checked else 0


if __name__ == "__main__":
    sys.exit(main())
