"""Which compiled loops run a call: the registry of accelerators and the switch.

The engine (:mod:`xlstm.engine.loop`) asks :func:`accelerated_loops` for the loops of a
namespace, dtype and cell, and imports no accelerator itself. The accelerators are

* on numpy, the buffered loops of :mod:`xlstm.accel.cpu.loops` (with numba installed): the cell's own
  step, its point functions compiled, bit-identical to the array path;
* on CuPy, the fused CUDA kernels of :mod:`xlstm.accel.cuda`, for the cells they have kernels for;
* on torch tensors on a CUDA device, the same fused CUDA kernels through DLPack
  (:class:`DLPackLoops`): every buffer is handed to CuPy as a view of the tensor's own
  memory (no copy), and the kernels run on torch's current stream;
* on JAX, :class:`ScanLoops`: the array path itself, with ``jax.lax.scan`` as its loop. JAX's
  GPU arrays stay there: the fused loops write into preallocated stacks in place, which
  immutable (and, under ``jax.jit``, traced) arrays cannot give them; reaching them from JAX
  would take an XLA custom call, while ``lax.scan`` already compiles the whole loop into one
  program.

A loops object other than :class:`ScanLoops` has ``supports(cell)``, ``forward(cell, Gx, WaT,
ba, bufs, t0, active=None, step=None)``, ``backward(cell, da_t, carry, saved, prev, WaT, dGx,
dGa, active=None, step=None)`` (``step``: the engine's step frame, which the CPU loops record)
and ``masks``, whether it runs padded batches (a non-``None`` ``active``;
otherwise the engine runs them on the array path); see :func:`xlstm.engine.loop.forward` and
:func:`xlstm.engine.loop.backward` for what they receive.

``XLSTM_ACCEL=0`` turns them all off; :func:`accelerators` does so (or the opposite) for a
``with`` block and beats the environment. :func:`accel_enabled` is the one reader of both.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Iterator

from .._lib.compat import is_cupy, is_jax, is_numpy, is_torch

__all__ = ["accel_enabled", "accelerators", "accelerated_loops", "cpu_loops_module",
           "DLPackLoops", "ScanLoops", "BACKENDS"]

#: Accelerator modules by backend; each has ``loops(dtype)``. Imported on first use only.
BACKENDS = {"numpy": "xlstm.accel.cpu.loops", "cupy": "xlstm.accel.cuda"}

#: The innermost :func:`accelerators` switch of this thread or task (None: no switch).
_ACCEL_SWITCH: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "xlstm_accelerators", default=None
)


def accel_enabled() -> bool:
    """Whether the accelerators may run now: the innermost :func:`accelerators` switch
    where one is active, else the environment (``XLSTM_ACCEL=0`` turns them off; read at
    every call). The one reader of ``XLSTM_ACCEL``."""
    forced = _ACCEL_SWITCH.get()
    if forced is not None:
        return forced
    return os.environ.get("XLSTM_ACCEL", "1") != "0"


@contextlib.contextmanager
def accelerators(enabled: bool) -> Iterator[None]:
    """Turn the accelerated loops on or off inside a ``with`` block.

    ``with xlstm.accelerators(False):`` runs every call in the block on the plain array
    path, as ``XLSTM_ACCEL=0`` does, whatever the environment says; ``accelerators(True)``
    allows them even where ``XLSTM_ACCEL=0`` is set. The accelerators are numba's compiled
    loops on numpy, the fused CUDA kernels on CuPy and ``jax.lax.scan`` on JAX; results are
    the same either way (bit for bit on numpy, to rounding elsewhere).

    The switch is a context variable: it holds for the current thread (or asyncio task)
    only, and blocks nest, the innermost winning. Under ``jax.jit`` it takes effect when the
    function is traced.

    Parameters
    ----------
    enabled : bool
        True allows the accelerators, False turns them off.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> params = xlstm.init_params(3, 5, 2, seed=0)  # n_x, n_a, n_y
    >>> x = np.random.default_rng(0).standard_normal((3, 4, 7))  # (n_x, m, T_x)
    >>> fast = xlstm.lstm_forward(x, np.zeros((5, 4)), params, return_caches=False)[0]
    >>> with xlstm.accelerators(False):  # the plain array path in this block
    ...     plain = xlstm.lstm_forward(x, np.zeros((5, 4)), params, return_caches=False)[0]
    >>> bool(np.array_equal(fast, plain))  # bit for bit on numpy
    True
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    token = _ACCEL_SWITCH.set(enabled)
    try:
        yield
    finally:
        _ACCEL_SWITCH.reset(token)


@functools.cache
def cpu_loops_module():
    """``(module, reason)``: :mod:`xlstm.accel.cpu.loops` where numba loads, else ``None`` and why not.

    A numba that is missing, or that was built for another numpy (it refuses to import),
    leaves numpy on the array path, with the same results, rather than failing the call;
    one that is installed but does not load says so once, in a ``RuntimeWarning``.
    """
    if importlib.util.find_spec("numba") is None:
        return None, "numba is not installed"
    try:
        module = importlib.import_module(BACKENDS["numpy"])
    except ImportError as exc:  # for instance "Numba needs NumPy 2.3 or less"
        why = f"numba does not load: {exc}"
        warnings.warn(f"xlstm's compiled CPU loops are off ({why}); numpy runs the array "
                      "path, with the same results", RuntimeWarning, stacklevel=2)
        return None, why
    return module, None


@functools.cache
def _jax_scan(step, static, reverse):
    """``jax.lax.scan`` of ``step``, compiled once per ``(step, static, reverse)`` and shape.

    Wrapped in ``jax.jit`` so that calls outside a compiled function reuse the compiled
    loop instead of tracing and compiling it anew on every call; inside ``jax.jit``,
    ``jax.grad`` or ``jax.vmap`` it is traced into the caller's program.
    """
    import jax

    def run(consts, carry, xs):
        body = functools.partial(step, static, consts)
        return jax.lax.scan(body, carry, xs, reverse=reverse)

    return jax.jit(run)


class ScanLoops:
    """JAX's accelerated loop: the engine's ``scan`` as ``jax.lax.scan``.

    The array path's step functions run unchanged, as one compiled loop body, so that under
    ``jax.jit`` the compile time no longer grows with the number of steps.
    """

    #: How reports and the benchmark name this accelerator.
    label = "lax.scan"

    @staticmethod
    def supports(cell) -> bool:
        return True

    @staticmethod
    def scan(step, static, consts, carry, xs, *, reverse=False):
        """:func:`xlstm.engine.loop.scan` with the same arguments, run by ``jax.lax.scan``."""
        return _jax_scan(step, static, reverse)(tuple(consts), tuple(carry), tuple(xs))


class DLPackLoops:
    """Buffered loops of one namespace (``inner``) run on another namespace's arrays.

    Every array the engine hands over goes through ``to_inner`` (``cupy.from_dlpack``: a view
    of the same memory, no copy), so the kernels write the engine's own stacks in place; the
    arrays that ``backward`` returns come back through ``from_inner`` (``torch.from_dlpack``,
    again no copy). ``scope()`` is entered around each call (torch: CuPy on torch's current
    stream, so that the work of both libraries stays in one order). Tensors that require a
    gradient are detached first (:func:`torch.Tensor.detach` shares the memory): the engine
    writes its own gradients.
    """

    def __init__(self, inner, to_inner, from_inner, scope=contextlib.nullcontext):
        self.inner = inner
        self._to_inner = to_inner
        self.from_inner = from_inner
        self.scope = scope

    @property
    def label(self) -> str:
        return f"{self.inner.label} (through DLPack)"

    @property
    def masks(self) -> bool:
        return self.inner.masks

    def supports(self, cell) -> bool:
        return self.inner.supports(cell)

    def to_inner(self, arr):
        if arr is None:
            return None
        return self._to_inner(arr.detach() if getattr(arr, "requires_grad", False) else arr)

    def forward(self, cell, Gx, WaT, ba, bufs, t0, active=None, step=None):
        """:meth:`xlstm.accel.cuda.Loops.forward` on views of the same buffers."""
        c = self.to_inner
        with self.scope():
            self.inner.forward(cell, c(Gx), c(WaT), c(ba), {k: c(v) for k, v in bufs.items()},
                               t0, c(active), step)

    def backward(self, cell, da_t, carry, saved, prev, WaT, dGx, dGa, active=None, step=None):
        """:meth:`xlstm.accel.cuda.Loops.backward` on views of the same buffers; the gradients on
        the initial state come back as the engine's arrays."""
        c = self.to_inner
        with self.scope():
            dGx_in = c(dGx)
            out = self.inner.backward(
                cell, c(da_t), tuple(c(v) for v in carry), {k: c(v) for k, v in saved.items()},
                {k: c(v) for k, v in prev.items()}, c(WaT), dGx_in,
                dGx_in if dGa is dGx else c(dGa), c(active), step)
            return tuple(self.from_inner(v) for v in out)


@functools.cache
def _torch_cuda_loops(dtype_name):
    """:class:`DLPackLoops` of the CuPy loops for torch tensors of ``dtype_name``, or ``None``
    where CuPy does not import."""
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        return None
    import torch

    @contextlib.contextmanager
    def torch_stream():
        stream = torch.cuda.current_stream()
        with cupy.cuda.Device(stream.device.index), \
                cupy.cuda.ExternalStream(stream.cuda_stream, stream.device.index):
            yield

    inner = importlib.import_module(BACKENDS["cupy"]).loops(dtype_name)
    return DLPackLoops(inner, cupy.from_dlpack, torch.from_dlpack, torch_stream)


def _is_cuda(device) -> bool:
    return getattr(device, "type", None) == "cuda"


def accelerated_loops(xp, dtype, cell=None, device=None):
    """The compiled time loops for namespace ``xp``, ``dtype``, ``cell`` and the arrays'
    ``device``, or ``None``.

    On numpy with numba installed, :mod:`xlstm.accel.cpu.loops` (bit-identical to the array path); on
    CuPy, the fused CUDA kernels of :mod:`xlstm.accel.cuda` (the same arithmetic, from the
    ``.cuh`` source that the tests also run on the CPU), for the cells they cover; on torch
    tensors whose ``device`` is a CUDA device, the same kernels through DLPack
    (:class:`DLPackLoops`) where CuPy is installed. Only for float32 and float64. On JAX
    (any floating dtype), :class:`ScanLoops`. ``cell=None`` asks for the backend's loops
    whatever the cell. ``XLSTM_ACCEL=0`` or :func:`accelerators` turns them all off.
    """
    if not accel_enabled():
        return None
    if is_jax(xp):
        return ScanLoops()
    if dtype not in (xp.float32, xp.float64):
        return None
    loops = None
    if is_numpy(xp):
        cpu, _ = cpu_loops_module()
        loops = None if cpu is None else cpu.loops(dtype)
    elif is_cupy(xp):
        loops = importlib.import_module(BACKENDS["cupy"]).loops(dtype)
    elif is_torch(xp) and _is_cuda(device):
        loops = _torch_cuda_loops("float32" if dtype == xp.float32 else "float64")
    if loops is None or (cell is not None and not loops.supports(cell)):
        return None
    return loops
