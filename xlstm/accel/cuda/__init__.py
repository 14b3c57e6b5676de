"""Fused CUDA kernels for the time loops on CuPy, for every cell.

:func:`xlstm.engine.loop.accelerated_loops` returns this module's :class:`Loops` when the arrays
are CuPy's (float32 or float64) and ``XLSTM_ACCEL`` is not ``"0"``. They run the engine's
time loops over its preallocated stacks, for any cell with kernels in the table: a forward
step is one cuBLAS GEMM (``ga = a_prev @ WaT``) and one kernel launch that adds the input
term (and the recurrent bias, for the GRU), applies every gate's activation and writes the
new state and the saved values in place; a backward step is one kernel launch that forms
the activation derivatives on the fly and writes the step's gradients of the input and
recurrent terms (and updates the other states' gradients in place), then one GEMM
``da_rec = dga @ Wa``. The GRU's direct gradient on ``a_prev`` (``da z``) is written by its
kernel and added by the next step's kernel before anything else, as the engine adds it to
``da_rec``; the last one once after the loop. A padded batch (``lengths``) runs the same
way on each kernel's padded-batch variant, generated from the table
(:func:`xlstm.accel.cuda.kernels.masked`): a flag per row and step, with the array path's
semantics where it is false. The array path needs ~15 launches per step, a
stacking copy of every output, and in backward precomputed coefficients for every step;
none of that remains.

Source. The arithmetic is written once per cell, in a header (``lstm_pointwise.cuh``,
``gru_pointwise.cuh``, ``rnn_pointwise.cuh``), as templated host and device element
functions. Each kernel is declared once, in the table of :mod:`xlstm.accel.cuda.kernels` (cell,
step, element function, arguments in order with their widths, which are written, which may
alias an input, and which of the engine's buffers each one is); the ``extern "C"`` kernels for
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

Layout. A kernel takes each of the engine's stacks whole, C-contiguous, with its length and
base, and works on one step's slice of each (:func:`xlstm.accel.cuda.kernels.step_params`); the
upstream gradient, which may have any strides, is made contiguous once per backward call.
The loops know no cell: they pass each kernel argument the buffer its table row names
(:func:`_plan`). A per-step loop builds its launch's arguments once and then passes only
the step's index (no view of any stack per step but the product's input). Nothing here
synchronises the device; launches go to CuPy's current stream, under the device of the
arrays.

Persistent kernels. Where the recurrent weights fit in shared memory
(:func:`persistent_plan`), the estimated step is shorter than a step of the per-step path
(:data:`PERSISTENT_RULE`, desk estimates until a GPU measures them) and the device holds the
whole grid at once (its occupancy), a whole time loop is one cooperative launch instead of
two launches per step: each block keeps the weights of its units in shared memory for all
steps, makes its columns of the recurrent product (``a @ WaT`` forward, ``dGa @ Wa``
backward) from the whole state of the step and runs the cell's element function on its own
elements, and the grid synchronises once per step (``persistent.cuh``). A grid that CuPy
would shrink at launch (it only warns) is an error, never a silently partial result; nothing
that the launch writes is read through the non-coherent path (``ld.global.nc``). The kernels
are generated from the same table, so every cell and its padded-batch variant have one.
Their product sums in a fixed order of their own, so they agree with the array path (and
with cuBLAS) to the rounding of a dot product of length ``n`` (forward) or ``k n``
(backward), not bit for bit. The tests run them in the grid emulator with every block and
thread on its own host thread, grid barrier included.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import NamedTuple

import numpy as _np

from . import kernels as _table

__all__ = ["BLOCK", "GRID_REDUCED", "OPTIONS", "PERSISTENT_RULE", "PERSISTENT_WHERE_IT_FITS",
           "Loops", "PersistentPlan", "PersistentRule", "loops", "persistent_plan", "source"]

#: Threads per block.
BLOCK = 256

#: NVRTC options. No fused multiply-add, so each operation rounds as in the array path.
#: CuPy adds the target architecture, ``--std=c++17`` and ``-ftz=true`` itself (the last
#: for its own elementwise kernels too, so float32 subnormals flush alike on both paths).
OPTIONS = ("--fmad=false",)

#: Every kernel's name per (cell, step, dtype name), from the table.
KERNEL_NAMES = {
    (cell, step, dtype): _table.kernel_name(cell, step, dtype)
    for (cell, step) in _table.TABLE for dtype in _table.DTYPES
}

_kernels = {}  # (cell, step, dtype name[, "persistent"]) -> cupy.RawKernel, compiled once
_devices = {}  # device id -> (multiprocessors, shared memory per block, opt-in)


@functools.cache
def source(cell: str = "lstm") -> str:
    """The CUDA source of ``cell``'s kernels with its header inlined: what NVRTC compiles.

    Generated from the table of :mod:`xlstm.accel.cuda.kernels`.
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


def _int64(args):
    """``args`` with every Python int as numpy int64, the kernels' ``long long``
    ``index_t``, whatever CuPy's default for a Python int."""
    return tuple(_np.int64(a) if isinstance(a, int) else a for a in args)


@functools.cache
def _cupy_arguments():
    """CuPy's own wrappers of kernel arguments, ``(CScalar, CIntptr)``: what its launch makes
    of a numpy scalar and (its first eight bytes, all that a ``T*`` parameter reads) of an
    array at every launch, and passes on as they are when given. ``None`` where this CuPy
    has them not (they are internal to CuPy): the arguments then go as numpy int64 and
    arrays."""
    try:
        from cupy._core._scalar import CScalar
        from cupy.cuda.function import CIntptr
    except (ImportError, AttributeError):
        return None
    return CScalar, CIntptr


def _prepared(args):
    """``args`` converted once for many launches: Python ints as CuPy's wrapper of a numpy
    int64 (:func:`_int64` where there is none), CuPy arrays as their data pointers."""
    wrappers = _cupy_arguments()
    if wrappers is None:
        return _int64(args)
    scalar, pointer = wrappers
    out = []
    for a in _int64(args):
        if isinstance(a, _np.int64):
            a = scalar(a)
        elif hasattr(getattr(a, "data", None), "ptr"):  # a cupy.ndarray
            a = pointer(a.data.ptr)
        out.append(a)
    return tuple(out)


def _launch(cell, step, name, total, args):
    """The launches of ``cell``'s per-step kernel ``step`` (``"fwd"`` or ``"bwd"``, or its
    padded-batch variant) for ``name``'s dtype over ``total`` threads, with ``args`` the
    parameters of :func:`xlstm.accel.cuda.kernels.step_params` less ``step``: ``(m, n, array,
    len, base, ...)``, every array alive while ``run`` is. Returns ``run(step)``, which
    launches step ``step``.

    Everything but the step is converted once (:func:`_prepared`), so that a step costs
    one tuple and one launch; nothing is compiled or launched where ``total`` is 0.
    """
    if total <= 0:
        return lambda step: None
    # the compiled function of the current device (the loops run under the arrays' device),
    # looked up once rather than by the RawKernel at every launch
    kern = _kernel(cell, step, name).kernel
    grid, block = ((total + BLOCK - 1) // BLOCK,), (BLOCK,)
    head, tail = _prepared(args[:2]), _prepared(args[2:])

    def run(step):
        kern(grid, block, (*head, _np.int64(step), *tail))

    run.arrays = args  # alive as long as their pointers may be launched
    return run


def _persistent_kernel(cell, step, dtype_name):
    key = (cell, step, dtype_name, "persistent")
    kern = _kernels.get(key)
    if kern is None:
        import cupy

        name = _table.kernel(cell, step).persistent_name(dtype_name)
        # a cooperative launch: every block resident at once, which the grid barrier needs
        kern = cupy.RawKernel(source(cell), name, options=OPTIONS,
                              enable_cooperative_groups=True)
        _kernels[key] = kern
    return kern


def _allow_shared(kern, shared):
    """Raise ``kern``'s limit of dynamic shared memory (48 KiB unless opted in) to
    ``shared`` bytes where it is lower."""
    if shared > kern.max_dynamic_shared_size_bytes:
        kern.max_dynamic_shared_size_bytes = shared


def _occupancy(cell, step, name, block, shared):
    """How many blocks of ``block`` threads with ``shared`` bytes of dynamic shared memory
    one multiprocessor of CuPy's current device holds at once, of ``cell``'s persistent
    kernel ``step`` for ``name``'s dtype (the driver's occupancy calculator, as CuPy's own
    cooperative launch asks it)."""
    import cupy

    kern = _persistent_kernel(cell, step, name)
    _allow_shared(kern, shared)
    return cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kern.kernel.ptr, block,
                                                                      shared)


#: The start of the warning with which CuPy's cooperative launch shrinks a grid that is not
#: resident (and launches the smaller one: the last blocks' units would never be computed).
GRID_REDUCED = "The grid size will be reduced"


def _launch_persistent(cell, step, name, grid, block, shared, args):
    """Launch ``cell``'s persistent kernel ``step`` for ``name``'s dtype: ``grid`` blocks of
    ``block`` threads with ``shared`` bytes of dynamic shared memory, ``args`` in the order of
    :func:`xlstm.accel.cuda.kernels.persistent_params` (sizes as numpy int64).

    Raises ``RuntimeError`` instead of launching a smaller grid where CuPy would shrink it
    (:data:`GRID_REDUCED`); :meth:`Loops.persistent_plan` checks the occupancy first, so
    this is a last guard against a silently wrong result.
    """
    kern = _persistent_kernel(cell, step, name)
    _allow_shared(kern, shared)
    args = _int64(args)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=GRID_REDUCED, category=UserWarning)
        try:
            kern((grid,), (block,), args, shared_mem=shared)
        except UserWarning as exc:
            raise RuntimeError(
                f"{cell} {step}: the persistent kernel's grid of {grid} blocks of {block} "
                f"threads with {shared} bytes of shared memory is not resident on this device "
                f"({exc}); run this loop step by step (xlstm.accel.cuda.Loops.persistent = False)"
            ) from None


def _device_limits():
    """``(multiprocessors, shared memory per block with opt-in)`` of CuPy's current device."""
    import cupy

    dev = cupy.cuda.Device()
    if dev.id not in _devices:
        attrs = dev.attributes
        _devices[dev.id] = (attrs["MultiProcessorCount"], attrs["MaxSharedMemoryPerBlockOptin"])
    return _devices[dev.id]


class PersistentPlan(NamedTuple):
    """The launch of a persistent kernel: ``grid`` blocks of ``units`` units each (the last
    one may have fewer), ``tile`` rows of the product's input staged at a time, and
    ``shared`` bytes of dynamic shared memory per block."""

    grid: int
    units: int
    tile: int
    shared: int


class PersistentRule(NamedTuple):
    """When a time loop that fits (:func:`persistent_plan`) runs as one persistent launch
    rather than step by step: where its batch has at most ``max_rows`` rows and
    :meth:`step_us` estimates a step at most ``per_step_us``, the per-step path's time.

    Every figure is a desk estimate, from reading the kernels and CuPy's launch path
    (nothing had run on a GPU when they were set), to be replaced by the first GPU
    measurement; a benchmark overrides them through :data:`PERSISTENT_RULE` or
    :attr:`Loops.rule`. The estimates reproduce the figures that set them: at ``(n_a, m) =
    (1024, 64)`` on an H100 (132 multiprocessors, 227 KiB of shared memory per block) the
    LSTM's backward plan is 11 tiles of 6 rows, 48 of 256 threads busy in the product,
    about 370 us a step here (400 us estimated by hand), against about 40 us on the
    per-step path, which host dispatch bounds at 25-40 us a step. For the LSTM in float32
    on that H100 the estimates (forward, backward) are, at ``(n_a, m)`` = (256, 8): 4.9 and
    12.8 us, both persistent; (256, 64): 19.5 and 71 us; (768, 16): 18.1 and 66 us, forward
    persistent only; (1024, 64): 87 and 371 us, neither.

    Attributes
    ----------
    max_rows : int
        The largest batch; above it each step's product goes to cuBLAS.
    trip_us : float
        One round of staging, one 4-byte load per thread from L2 into shared memory: a
        dependent round trip (about 440 cycles at 1.75 GHz, loop included).
    mac_us : float
        One multiply-add of a thread's dot product: two shared-memory loads and an add
        (about 4 cycles).
    barrier_us : float
        The grid barrier that ends every step.
    per_step_us : float
        A step of the per-step path (a GEMM and a kernel launch): the low end of its
        host-dispatch bound, so that the rule errs towards that path.
    """

    max_rows: int = 256
    trip_us: float = 0.25
    mac_us: float = 0.0025
    barrier_us: float = 2.0
    per_step_us: float = 20.0

    def step_us(self, plan: PersistentPlan, m: int, inner: int, columns: int,
                block: int) -> float:
        """The estimated time of one step of ``plan`` over ``m`` rows: staging its tiles of
        the product's input (``inner`` elements a row), the product for the block's
        ``columns`` columns, one pass of the element function over its units, the barrier.

        Every block does the same work at once, so a block's time is the step's.
        """
        full, last = divmod(m, plan.tile)
        tiles = [plan.tile] * full + ([last] if last else [])
        trips = sum(-(-rows * inner // block) for rows in tiles)
        macs = sum(-(-rows * columns // block) * inner for rows in tiles)
        point = -(-m * plan.units // block)
        return (trips + point) * self.trip_us + macs * self.mac_us + self.barrier_us

    def takes(self, plan: PersistentPlan | None, m: int, inner: int, columns: int,
              block: int) -> bool:
        """Whether ``plan`` (``None``: the weights do not fit) runs rather than the per-step
        path (see :meth:`step_us`)."""
        return (plan is not None and m <= self.max_rows
                and self.step_us(plan, m, inner, columns, block) <= self.per_step_us)


def persistent_plan(n: int, gates: int, m: int, itemsize: int, multiprocessors: int,
                    shared_max: int, *, backward: bool) -> PersistentPlan | None:
    """How a persistent kernel covers ``n`` units with ``gates`` gates over a batch of ``m``
    rows, or ``None`` where the weights do not fit.

    At most one block per multiprocessor (so that the grid is resident whatever the
    kernel's registers), each owning ``units`` consecutive units. Its shared memory holds
    the weights of its columns, ``gates * units`` rows of ``n`` forward (the columns of
    ``WaT`` for its units' gates) or ``units`` rows of ``gates * n`` backward (the rows of
    ``WaT`` for its units), and a tile of rows of the product's input (``n`` forward,
    ``gates * n`` backward); every row padded by one element against bank conflicts.
    """
    if min(n, m, multiprocessors) < 1:
        return None
    inner, groups = (gates * n, 1) if backward else (n, gates)
    units = -(-n // min(multiprocessors, n))
    row = (inner + 1) * itemsize
    weights = groups * units * row
    tile = min(m, (shared_max - weights) // row)
    if tile < 1:
        return None
    return PersistentPlan(-(-n // units), units, tile, weights + tile * row)


#: The rule by which :class:`Loops` choose the persistent kernels (desk estimates; see
#: :class:`PersistentRule`). A benchmark that measures the crossover replaces it, e.g.
#: ``xlstm.accel.cuda.PERSISTENT_RULE = PERSISTENT_RULE._replace(per_step_us=12.0)``.
PERSISTENT_RULE = PersistentRule()

#: A rule that takes every plan that fits and is resident, whatever its cost: for the tests
#: and the sanitizer runs, which must run the persistent kernels at any size.
PERSISTENT_WHERE_IT_FITS = PersistentRule(max_rows=2**62, per_step_us=float("inf"))


def _plan(k, sources):
    """Row ``k``'s arrays from the step's ``sources`` (source name -> ``(array, index)``,
    see :mod:`xlstm.accel.cuda.kernels`): ``(array, index)`` per argument, in order."""
    try:
        return [sources[a.src] for a in k.args]
    except KeyError as exc:
        raise ValueError(f"{k.cell} {k.step}: the loops have no buffer {exc.args[0]!r}") from None


def _stacks(plan, bases):
    """The kernels' arguments for ``plan`` (``(array, index)`` per argument): ``array, len,
    base`` each, the base of a stack from ``bases[index]`` (an array that is no stack, index
    ``None``: one slice, length 1, base 0). Step ``s`` of a launch then reads slice ``(base
    + s) % len`` of every stack."""
    flat = []
    for arr, i in plan:
        flat += [arr, 1, 0] if i is None else [arr, arr.shape[0], bases[i]]
    return flat


class Loops:
    """The forward and backward time loops for one float dtype, over CuPy arrays, for every
    cell with rows in :data:`xlstm.accel.cuda.kernels.TABLE`.

    The loops know no cell: per step they make the recurrent GEMM and launch the cell's
    kernel with the engine's buffers that its row names (each argument's source).

    Where :meth:`persistent_plan` has a plan, a whole loop is one launch of the row's
    persistent kernel instead (:attr:`persistent` switches that off, :attr:`rule` says
    where it pays).

    ``mod``, ``launch``, ``persistent_launch``, ``device``, ``occupancy`` and ``block`` are
    for the tests: with ``mod=numpy`` and launches that call a host build of the kernels,
    the same loops run on the CPU. ``launch(cell, step, dtype_name, total, args)``
    prepares the launches of kernel ``(cell, step)`` of the table over ``total`` elements,
    with ``args`` the parameters of :func:`xlstm.accel.cuda.kernels.step_params` less the step
    (``m``, ``n``, then ``array, len, base`` per argument), and returns ``run(step)``, which
    launches one step. ``persistent_launch(cell, step,
    dtype_name, grid, block, shared, args)`` runs its persistent kernel with the arguments
    of :func:`xlstm.accel.cuda.kernels.persistent_params`. ``device`` is ``(multiprocessors,
    shared memory per block)`` (default: the current CuPy device's), ``occupancy(cell, step,
    dtype_name, block, shared)`` the blocks of a persistent kernel that one multiprocessor
    holds at once (default: the driver's answer for the current CuPy device), ``block`` the
    threads per block of the persistent kernels.
    """

    #: How reports and the benchmark name this accelerator.
    label = "fused CUDA kernels"
    #: Padded batches (the engine's ``active``) run here too, on each row's padded-batch
    #: variant (:func:`xlstm.accel.cuda.kernels.masked`).
    masks = True
    #: Whether whole loops run as one persistent launch where they fit and pay.
    persistent = True
    #: The :class:`PersistentRule` that says where they pay; ``None``: the module's
    #: :data:`PERSISTENT_RULE`, read at each plan.
    rule: PersistentRule | None = None

    def __init__(self, dtype, *, mod=None, launch=None, persistent_launch=None, device=None,
                 occupancy=None, block=BLOCK):
        self.name = _DTYPE_NAMES[_np.dtype(dtype)]
        self.itemsize = _np.dtype(dtype).itemsize
        self._mod = mod
        self.launch = _launch if launch is None else launch
        self.persistent_launch = (_launch_persistent if persistent_launch is None
                                  else persistent_launch)
        self._device = device
        self.occupancy = _occupancy if occupancy is None else occupancy
        self.block = block

    @property
    def mod(self):
        if self._mod is None:
            import cupy

            self._mod = cupy
        return self._mod

    def _on_device(self, arr):
        return arr.device if self.mod is not _np else contextlib.nullcontext()

    def persistent_plan(self, k, m, n, *, arrays=()):
        """The :class:`PersistentPlan` of row ``k``'s loop over ``m`` rows and ``n`` units
        on this device, or ``None`` (the per-step path): persistent kernels switched off, a
        stack in ``arrays`` that is not C-contiguous, weights that do not fit
        (:func:`persistent_plan`), a plan that does not pay (:attr:`rule`), or a grid that
        the device cannot hold at once (:attr:`occupancy`; a cooperative launch needs every
        block resident)."""
        if not self.persistent or not all(a.flags.c_contiguous for a in arrays):
            return None
        sms, shared_max = _device_limits() if self._device is None else self._device
        gates = _table.gates(k)
        backward = k.step == "bwd"
        plan = persistent_plan(n, gates, m, self.itemsize, sms, shared_max, backward=backward)
        if plan is None:
            return None
        inner, columns = (gates * n, plan.units) if backward else (n, gates * plan.units)
        rule = PERSISTENT_RULE if self.rule is None else self.rule
        if not rule.takes(plan, m, inner, columns, self.block):
            return None
        if self.occupancy(k.cell, k.key[1], self.name, self.block, plan.shared) * sms < plan.grid:
            return None
        return plan

    def _persistent(self, cell, step, plan, sizes, w, gemm_in, gemm_out, flat):
        """Launch the persistent kernel of ``(cell, step)``: ``flat`` holds the row's
        arguments as :func:`_stacks` gives them."""
        barrier = self.mod.zeros(1, dtype=_np.uint64)
        self.persistent_launch(
            cell.name, step, self.name, plan.grid, self.block, plan.shared,
            (*sizes, plan.units, plan.tile, barrier, self.mod.ascontiguousarray(w), *gemm_in,
             gemm_out, *flat))

    def _steps(self, k, m, n, plan, bases):
        """``run(s)``, which launches step ``s`` of row ``k``'s per-step kernel on ``plan``
        (``(array, index)`` per argument, stacks based at ``bases[index]``, see
        :func:`_stacks`): the launch's arguments are built once. A stack that is not
        C-contiguous as a whole (its slices apart) goes as its slice of the step instead, a
        stack of one, built at every step."""
        launch = functools.partial(self.launch, k.cell, k.key[1], self.name, m * n)
        if all(arr.flags.c_contiguous for arr, _ in plan):
            return launch((m, n, *_stacks(plan, bases)))

        def run(s):
            one = [(arr, i) if i is None or arr.flags.c_contiguous
                   else (arr[(bases[i] + s) % arr.shape[0]], None) for arr, i in plan]
            launch((m, n, *_stacks(one, bases)))(s)

        return run

    def supports(self, cell) -> bool:
        """The cells with kernels in the table (every cell of the package)."""
        return cell.name in _table.cells()

    def _row(self, cell, step):
        if not self.supports(cell):
            raise NotImplementedError(f"no CUDA kernels for {cell!r}")
        return _table.kernel(cell.name, step)

    def forward(self, cell, Gx, WaT, ba, bufs, t0, active=None, step=None):
        """Run steps ``t0 .. t0 + len(Gx) - 1``, reading the states at ``t``, writing ``t+1``
        (see :meth:`xlstm.accel.cpu.loops.Loops.forward`): one launch of the row's persistent kernel
        where :meth:`persistent_plan` has a plan, otherwise per step the GEMM
        ``ga = a_prev @ WaT``, then one launch of the cell's forward kernel.

        ``Gx`` is the chunk's ``(T_c, m, k n_a)`` input term, ``ba`` the ``(1, k n_a)``
        recurrent bias or ``None``. ``bufs`` holds the state stacks, indexed by absolute
        step modulo their length (a stack of two slots alternates), and the saved stacks
        with one slot per step of the chunk, or a single slot that is reused (inference).
        All are C-contiguous. ``active`` (the chunk's ``(T_c, m, 1)`` booleans, or
        ``None``): a padded row keeps its state (the kernel's padded-batch variant).
        ``step``, the engine's step frame, is not called: the kernels do its work.
        """
        k = self._row(cell, "fwd" if active is None else "fwd_masked")
        T_c, m, width = Gx.shape
        n = WaT.shape[0]
        if (ba is None) == any(a.src == "ba" for a in k.args):
            raise ValueError(f"{cell.name} fwd: the kernel's recurrent bias and ba disagree")
        first = bufs[cell.state_names[0]]
        with self._on_device(Gx):
            ga = self.mod.empty((m, width), dtype=Gx.dtype)
            sources = {"gx": (Gx, "k"), "ga": (ga, None)}
            if ba is not None:
                sources["ba"] = (self.mod.ascontiguousarray(ba), None)
            for s in cell.state_names:
                sources[s + "[t]"] = (bufs[s], "t")
                sources[s + "[t+1]"] = (bufs[s], "t+1")
            sources.update((s, (bufs[s], "k")) for s in cell.saved)  # one slot each, or one
            if active is not None:
                sources["active"] = (self.mod.ascontiguousarray(active), "k")
            plan = _plan(k, sources)
            persistent = self.persistent_plan(k, m, n, arrays=[first, *(arr for arr, _ in plan)])
            # step i of the chunk: slot i of the chunk's stacks, t0 + i of the states'
            bases = {"k": 0, "t": t0, "t+1": t0 + 1}
            if persistent is not None and T_c > 0:
                self._persistent(cell, k.key[1], persistent, (m, n, T_c), WaT,
                                 (first, first.shape[0], t0), ga, _stacks(plan, bases))
                return
            run = self._steps(k, m, n, plan, bases)
            slots = [None] * first.shape[0]  # the product's input, one view per slot
            for i in range(T_c):
                j = (t0 + i) % len(slots)
                if slots[j] is None:
                    slots[j] = first[j]
                self.mod.matmul(slots[j], WaT, out=ga)
                run(i)

    def backward(self, cell, da_t, carry, saved, prev, WaT, dGx, dGa, active=None, step=None):
        """Run the backward loop over all ``T = len(dGx)`` steps; returns the gradients on
        the initial state (see :meth:`xlstm.accel.cpu.loops.Loops.backward`): one launch of the row's
        persistent kernel where :meth:`persistent_plan` has a plan, otherwise per step one
        launch of the cell's backward kernel, then the GEMM ``da_rec = dga @ Wa``.

        ``da_t`` is the ``(T, m, n_a)`` upstream gradient (any strides), ``carry`` the
        gradients on the final state (not written); ``dGx`` (and ``dGa``, which may be
        ``dGx`` itself) receive the ``(T, m, k n_a)`` gradients of the two terms. A cell
        with a direct term (the GRU's ``da z``) gets it from its kernel, which adds the one
        of the step after it to ``da_rec`` first; the last one is added after the loop.
        ``active`` is the forward pass's: a padded row has no gate gradients and passes its
        state's gradients through, the hidden state's in a buffer ``hold`` that the next
        step adds to ``da_rec`` (:func:`xlstm.accel.cuda.kernels.masked`). ``step``, the
        engine's step frame, is not called: the kernels do its work.
        """
        k = self._row(cell, "bwd" if active is None else "bwd_masked")
        T, m, _ = dGx.shape
        n = WaT.shape[0]
        Wa = WaT.T
        with self._on_device(dGx):
            da_t = self.mod.ascontiguousarray(da_t)
            da_rec = self.mod.array(carry[0], order="C")
            drest = [self.mod.array(c, order="C") for c in carry[1:]]
            sources = {"da": (da_t, "t"), "da_rec": (da_rec, None), "dGx": (dGx, "t"),
                       "dGa": (dGa, "t")}
            direct = None
            if any(a.src == "direct" for a in k.args):
                # -0 adds nothing to any number, -0 included: the first step reads da_rec
                direct = self.mod.full((m, n), -0.0, dtype=dGx.dtype)
                sources["direct"] = (direct, None)
            for s, d in zip(cell.state_names[1:], drest):
                sources["d" + s] = (d, None)  # updated in place, step by step
            sources.update((s + "[t]", (v, "t")) for s, v in prev.items())
            sources.update((s, (v, "t")) for s, v in saved.items())
            hold = None
            if active is not None:
                sources["active"] = (self.mod.ascontiguousarray(active), "t")
                hold = self.mod.full((m, n), -0.0, dtype=dGx.dtype)  # -0: adds nothing
                sources["hold"] = (hold, None)
            plan = _plan(k, sources)
            persistent = self.persistent_plan(k, m, n, arrays=[dGa, *(arr for arr, _ in plan)])
            bases = {"t": 0}  # step t: slot t of every stack
            if persistent is not None and T > 0:
                self._persistent(cell, k.key[1], persistent, (m, n, T), WaT, (dGa, T, 0),
                                 da_rec, _stacks(plan, bases))
            else:
                run = self._steps(k, m, n, plan, bases)
                for t in range(T - 1, -1, -1):
                    run(t)
                    self.mod.matmul(dGa[t], Wa, out=da_rec)  # (19), recurrent part
            if hold is not None:
                self.mod.add(da_rec, hold, out=da_rec)
            if direct is not None:
                self.mod.add(da_rec, direct, out=da_rec)
        return (da_rec, *drest)


@functools.cache
def loops(dtype):
    """The CuPy :class:`Loops` for ``dtype``."""
    return Loops(dtype)
