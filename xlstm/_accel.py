"""Which compiled loops run a call: the registry of accelerators and the switch.

The engine (:mod:`xlstm._engine`) asks :func:`accelerated_loops` for the loops of a
namespace, dtype and cell, and imports no accelerator itself. The accelerators are

* on numpy, the buffered loops of :mod:`xlstm._cpu` (with numba installed): the cell's own
  step, its point functions compiled, bit-identical to the array path;
* on CuPy, the fused CUDA kernels of :mod:`xlstm._cuda`, for the cells they have kernels for;
* on JAX, :class:`ScanLoops`: the array path itself, with ``jax.lax.scan`` as its loop.

A loops object other than :class:`ScanLoops` has ``supports(cell)``, ``forward(cell, Gx, WaT,
ba, bufs, t0, active=None)``, ``backward(cell, da_t, carry, saved, prev, WaT, dGx, dGa,
active=None)`` and ``masks``, whether it runs padded batches (a non-``None`` ``active``;
otherwise the engine runs them on the array path); see :func:`xlstm._engine.forward` and
:func:`xlstm._engine.backward` for what they receive.

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
from collections.abc import Iterator

from ._compat import is_cupy, is_jax, is_numpy

__all__ = ["accel_enabled", "accelerators", "accelerated_loops", "cpu_loops_module",
           "ScanLoops", "BACKENDS"]

#: Accelerator modules by backend; each has ``loops(dtype)``. Imported on first use only.
BACKENDS = {"numpy": "xlstm._cpu", "cupy": "xlstm._cuda"}

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
    """``(module, reason)``: :mod:`xlstm._cpu` where numba loads, else ``None`` and why not.

    A numba that is missing, or that was built for another numpy (it refuses to import),
    leaves numpy on the array path, with the same results, rather than failing the call.
    """
    if importlib.util.find_spec("numba") is None:
        return None, "numba is not installed"
    try:
        module = importlib.import_module(BACKENDS["numpy"])
    except ImportError as exc:  # for instance "Numba needs NumPy 2.3 or less"
        return None, f"numba does not load: {exc}"
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
        """:func:`xlstm._engine.scan` with the same arguments, run by ``jax.lax.scan``."""
        return _jax_scan(step, static, reverse)(tuple(consts), tuple(carry), tuple(xs))


def accelerated_loops(xp, dtype, cell=None):
    """The compiled time loops for namespace ``xp``, ``dtype`` and ``cell``, or ``None``.

    On numpy with numba installed, :mod:`xlstm._cpu` (bit-identical to the array path); on
    CuPy, the fused CUDA kernels of :mod:`xlstm._cuda` (the same arithmetic, from the
    ``.cuh`` source that the tests also run on the CPU), for the cells they cover. Only for
    float32 and float64. On JAX (any floating dtype), :class:`ScanLoops`. ``cell=None``
    asks for the backend's loops whatever the cell. ``XLSTM_ACCEL=0`` or
    :func:`accelerators` turns them all off.
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
    if loops is None or (cell is not None and not loops.supports(cell)):
        return None
    return loops
