"""The one place that talks to array-api-compat.

Every public function resolves its namespace here, once per call, from *named* arrays, so
that a bad argument is reported by its name and not by a traceback from deep inside the math.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import array_api_compat as _aac

#: A function, which :func:`on_input_device` returns with its signature unchanged.
_F = TypeVar("_F", bound=Callable[..., Any])

__all__ = [
    "namespace",
    "device_of",
    "is_cupy",
    "is_writeable",
    "c_contiguous",
    "default_namespace",
    "to_host",
    "resolve_dtype",
    "is_concrete",
    "device_scope",
    "on_input_device",
]


def _describe(xp) -> str:
    return getattr(xp, "__name__", repr(xp)).replace("array_api_compat.", "")


def namespace(*, kinds=None, optional=(), **arrays):
    """Return the common array namespace of the named ``arrays``.

    Also checks that every array has a real floating dtype, that all share one dtype, and
    that all live on one device.

    Parameters
    ----------
    kinds : dict, optional
        Exceptions to the floating rule: ``{name: ("integral", "bool")}`` lets the array
        ``name`` have any of those array-API dtype kinds instead (labels, masks). Such an
        array must still share the namespace and device; a floating one must still share
        the common dtype.
    optional : collection of str, optional
        Names of the arguments that may be ``None`` (skipped); any other ``None`` is a
        ``TypeError`` naming the argument.
    **arrays
        The arrays of a public call, keyed by the name the user knows them by (``x``, ``a0``,
        ``Wf``, ...).

    Returns
    -------
    xp : module
        The array-api-compat namespace of the arrays.

    Raises
    ------
    TypeError
        If an argument is not an array, if the arrays come from different namespaces, or if
        a dtype is not real floating or differs between arguments.
    ValueError
        If the arrays live on different devices. An array whose device is unknown (a JAX
        tracer under ``jax.jit``, ``jax.grad`` or ``jax.vmap`` reports ``None``) is not
        compared.
    """
    named = []
    for name, arr in arrays.items():
        if arr is None:
            if name in optional:
                continue
            raise TypeError(f"{name} must be an array, got None")
        named.append((name, arr))
    if not named:
        raise TypeError("no arrays were given")
    spaces = []
    for name, arr in named:
        _refuse_subclass(name, arr)
        try:
            spaces.append(_aac.array_namespace(arr))
        except TypeError:
            raise TypeError(
                f"{name} must be an array, got {type(arr).__name__}"
            ) from None
    first_name, _ = named[0]
    xp = spaces[0]
    for (name, _), other in zip(named, spaces):
        if other is not xp:
            raise TypeError(
                f"mixed array namespaces: {first_name} is {_describe(xp)} but {name} is "
                f"{_describe(other)}; convert all arrays to one namespace first"
            )
    kinds = kinds or {}
    dtype = None
    for name, arr in named:
        if not xp.isdtype(arr.dtype, "real floating"):
            allowed = kinds.get(name, ())
            if any(xp.isdtype(arr.dtype, k) for k in allowed):
                continue
            words = " or ".join(("a real floating", *allowed)) if allowed else (
                "a real floating dtype (float32 or float64)")
            raise TypeError(f"{name} must have {words}{' dtype' if allowed else ''}, "
                            f"got {arr.dtype}")
        if dtype is None:
            dtype, dtype_name = arr.dtype, name
        elif arr.dtype != dtype:
            raise TypeError(
                f"dtype mismatch: {dtype_name} is {dtype} but {name} is {arr.dtype}; "
                "cast all arrays to one floating dtype"
            )
    # Only known devices are compared: a JAX tracer (inside jit, grad or vmap) has no
    # concrete device and reports None, which matches any device.
    dev_name, dev = None, None
    for name, arr in named:
        d = device_of(arr)
        if d is None:
            continue
        if dev is None:
            dev_name, dev = name, d
        elif d != dev:
            raise ValueError(
                f"device mismatch: {dev_name} is on {dev} but {name} is on "
                f"{d}; move all arrays to one device"
            )
    return xp


def _refuse_subclass(name, arr):
    """Raise TypeError for numpy array subclasses whose meaning the math would drop.

    A masked array's mask and a ``numpy.matrix``'s ``*`` would be silently ignored or
    misread; both are refused. Other subclasses (``numpy.memmap``) behave as arrays.
    """
    import numpy

    if isinstance(arr, numpy.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy masked array; xlstm would ignore its mask. Pass "
            f"{name}.filled(value) (and, for the losses, the mask as mask=)"
        )
    if isinstance(arr, numpy.matrix):
        raise TypeError(f"{name} is a numpy.matrix; pass numpy.asarray({name})")


def resolve_dtype(xp, dtype, *, name="dtype", device=None):
    """The real floating dtype of namespace ``xp`` that the user's ``dtype`` names.

    ``None`` gives the namespace's default floating dtype. A dtype object of ``xp``, or a
    name such as ``"float32"`` (also a numpy dtype or scalar type, by its name), is looked
    up in ``xp``.

    Raises
    ------
    TypeError
        If ``dtype`` is not a real floating dtype of ``xp`` (an integer dtype, say); the
        message names the argument.
    """
    if dtype is None:
        return xp.__array_namespace_info__().default_dtypes(device=device)["real floating"]
    label = dtype if isinstance(dtype, str) else getattr(dtype, "__name__", None)
    if label is None and type(dtype).__module__.startswith("numpy"):
        label = str(dtype)  # a numpy.dtype instance
    if isinstance(label, str) and label in ("float16", "float32", "float64", "bfloat16"):
        found = getattr(xp, label, None)
        if found is not None:
            dtype = found
    elif isinstance(dtype, str):
        raise TypeError(f"{name} must be a real floating dtype such as 'float32', got {dtype!r}")
    try:
        floating = xp.isdtype(dtype, "real floating")
    except Exception:  # noqa: BLE001 - a foreign or unknown object: not a dtype of xp
        floating = False
    if not floating:
        raise TypeError(f"{name} must be a real floating dtype such as float32, got {dtype!r}")
    return dtype


def device_scope(x=None, *, xp=None, device=None):
    """A context that makes the device of CuPy array ``x`` (or CuPy ``device``) current.

    array-api-compat does not pass ``device=`` on to CuPy's creation functions, and CuPy
    runs kernels and allocates on its *current* device. Public functions therefore run
    their CuPy work inside this context, so that every buffer and kernel lands on the
    inputs' GPU, not on GPU 0. For every other namespace it does nothing.
    """
    if x is not None and _aac.is_cupy_array(x):
        return x.device
    if device is not None and xp is not None and _aac.is_cupy_namespace(xp):
        return device
    return contextlib.nullcontext()


def _first_array(obj, depth=0):
    """The first array in ``obj``, looking into dicts, lists, tuples and caches."""
    if _aac.is_array_api_obj(obj):
        return obj
    if depth > 4:
        return None
    state = getattr(obj, "state", None)
    if state is not None and not isinstance(obj, type):
        found = _first_array(state, depth + 1)
        if found is not None:
            return found
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for v in obj:
            found = _first_array(v, depth + 1)
            if found is not None:
                return found
    return None


def on_input_device(fn: _F) -> _F:
    """Decorate a public function so that its CuPy work runs on its inputs' GPU.

    The first array among the positional and keyword arguments (looking into parameter
    dicts and caches) decides the device; see :func:`device_scope`. Without CuPy arrays the
    call runs as it is.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        first = _first_array((*args, *kwargs.values()))
        if first is None or not _aac.is_cupy_array(first):
            return fn(*args, **kwargs)
        with first.device:
            return fn(*args, **kwargs)

    wrapper.__xlstm_on_input_device__ = True  # type: ignore[attr-defined]
    return cast(_F, wrapper)


def namespace_or_none(x):
    """The array namespace of ``x``, or ``None`` when ``x`` is not an array."""
    return _aac.array_namespace(x) if _aac.is_array_api_obj(x) else None


def is_concrete(x) -> bool:
    """True when the values of array ``x`` can be read back to the host.

    False for JAX tracers (inside ``jax.jit``, ``jax.grad`` or ``jax.vmap``) and for other
    lazy arrays; checks that read values must then take another route.
    """
    if _aac.is_jax_array(x):
        import jax

        return not isinstance(x, jax.core.Tracer)
    return not _aac.is_lazy_array(x)


def device_of(x):
    """Return the device of array ``x``; ``None`` for a JAX tracer, which has none."""
    return _aac.device(x)


def is_cupy(xp) -> bool:
    """True when ``xp`` is CuPy's namespace (imports nothing)."""
    return _aac.is_cupy_namespace(xp)


def is_jax(xp) -> bool:
    """True when ``xp`` is JAX's namespace (imports nothing)."""
    return _aac.is_jax_namespace(xp)


def is_torch(xp) -> bool:
    """True when ``xp`` is torch's namespace (imports nothing)."""
    return _aac.is_torch_namespace(xp)


def is_numpy(xp) -> bool:
    """True when ``xp`` is numpy's namespace."""
    return _aac.is_numpy_namespace(xp)


def c_contiguous(x):
    """``x`` itself, or a C-ordered copy of it where the layout is the caller's to choose.

    numpy and CuPy arrays come back C-contiguous (a copy only when needed), so that the
    matrix products that read them see the same layout, and so round alike, whatever the
    order of the caller's arrays. Other namespaces choose their own layouts; ``x`` is
    returned as it is.
    """
    if _aac.is_numpy_array(x):
        import numpy

        return numpy.ascontiguousarray(x)
    if _aac.is_cupy_array(x):
        import cupy

        return cupy.ascontiguousarray(x)
    return x


def copy(x):
    """A new array equal to ``x`` that shares no memory with it (autograd kept on torch).

    torch's ``asarray(copy=True)`` warns for tensors that require grad; ``clone`` is its
    copy that stays on the autograd graph.
    """
    if _aac.is_torch_array(x):
        return x.clone()
    return _aac.array_namespace(x).asarray(x, copy=True)


def is_writeable(x) -> bool:
    """True when ``x`` supports in-place writes (not JAX, not read-only numpy views)."""
    return _aac.is_writeable_array(x)


def namespace_of_module(xp=None):
    """The array-api-compat namespace for a user's ``xp`` argument.

    ``xp`` may be a plain module (``numpy``, ``torch``, ``cupy``, ``jax.numpy``), an
    array-api-compat wrapper, or a standard namespace such as ``array_api_strict``;
    ``None`` means numpy.
    """
    if xp is None:
        return default_namespace()
    empty = getattr(xp, "empty", None)
    if empty is None:
        raise TypeError(f"xp must be an array namespace such as numpy or torch, got {xp!r}")
    return _aac.array_namespace(empty(0))


#: Version of array-api-compat, for ``python -m xlstm info``.
COMPAT_VERSION = _aac.__version__


def default_namespace():
    """The namespace used when the caller passes no array and no ``xp``: numpy."""
    import numpy

    return _aac.array_namespace(numpy.empty(0))


def to_host(x):
    """Return array ``x`` as a numpy array on the host (CPU).

    numpy arrays come back as they are (no copy); torch tensors are detached and moved to
    the CPU, CuPy arrays are copied from the GPU, JAX arrays are converted, and
    array-api-strict arrays are first moved to their CPU device. Anything else goes through
    ``numpy.asarray``. Used for I/O and interop only, never in the math.
    """
    import numpy

    if _aac.is_numpy_array(x):
        return numpy.asarray(x)
    if _aac.is_torch_array(x):
        return x.detach().cpu().numpy()
    if _aac.is_cupy_array(x):
        return x.get()
    if _aac.is_jax_array(x):
        return numpy.asarray(x)
    if _aac.is_array_api_obj(x) and _aac.is_array_api_strict_namespace(_aac.array_namespace(x)):
        import array_api_strict as strict

        return numpy.asarray(strict.asarray(x, device=strict.Device("CPU_DEVICE")))
    return numpy.asarray(x)


#: Every backend the project knows, in the order they are tried and reported.
#: ``torch-cuda`` and ``jax-gpu`` are torch's and JAX's arrays on the first GPU.
BACKENDS = ("numpy", "strict", "strict-device1", "torch", "jax", "cupy", "torch-cuda", "jax-gpu")

#: The module that each backend's arrays come from.
BACKEND_MODULES = {"numpy": "numpy", "strict": "array_api_strict",
                   "strict-device1": "array_api_strict", "torch": "torch", "jax": "jax",
                   "cupy": "cupy", "torch-cuda": "torch", "jax-gpu": "jax"}


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message says why."""


def load_backend(name):
    """Return ``(xp, device)`` for backend ``name`` from :data:`BACKENDS`.

    ``strict-device1`` is array-api-strict on its second device, which exposes any allocation
    that forgets ``device=``. JAX is switched to 64-bit mode so that float64 stays float64.
    ``cupy``, ``torch-cuda`` and ``jax-gpu`` load only where a CUDA device answers a small
    computation; their device is the first GPU.

    Raises
    ------
    BackendUnavailable
        If the package is not installed or (``cupy``, ``torch-cuda``, ``jax-gpu``) no CUDA
        device answers.
    """
    import importlib

    def need(module):
        try:
            return importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken install is as unavailable as none
            raise BackendUnavailable(f"{module} is not importable: {exc}") from None

    if name == "numpy":
        np = need("numpy")
        return _aac.array_namespace(np.empty(0)), "cpu"
    if name in ("strict", "strict-device1"):
        s = need("array_api_strict")
        return s, s.Device("device1" if name == "strict-device1" else "CPU_DEVICE")
    if name == "torch":
        torch = need("torch")
        return _aac.array_namespace(torch.empty(0)), torch.device("cpu")
    if name == "torch-cuda":
        torch = need("torch")
        if not torch.cuda.is_available():
            build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise BackendUnavailable(f"torch ({build}) sees no CUDA device")
        try:
            dev = torch.device("cuda", 0)
            torch.ones(1, device=dev).sum().item()
        except Exception as exc:  # noqa: BLE001 - any CUDA runtime error means "no GPU here"
            raise BackendUnavailable(f"torch sees a CUDA device but cannot use it: {exc}") from None
        return _aac.array_namespace(torch.empty(0)), dev
    if name in ("jax", "jax-gpu"):
        jax = need("jax")
        jax.config.update("jax_enable_x64", True)
        jnp = need("jax.numpy")
        if name == "jax":
            return _aac.array_namespace(jnp.empty(0)), jax.devices("cpu")[0]
        try:
            dev = jax.devices("gpu")[0]
            jax.device_put(jnp.ones(1), dev).sum().block_until_ready()
        except Exception as exc:  # noqa: BLE001 - no GPU platform, or one that fails
            raise BackendUnavailable(f"jax has no usable GPU: {exc}") from None
        return _aac.array_namespace(jnp.empty(0)), dev
    if name == "cupy":
        cp = need("cupy")
        try:
            if cp.cuda.runtime.getDeviceCount() < 1:
                raise BackendUnavailable("cupy is installed but no CUDA device is visible")
            cp.ones(1).sum().item()
        except BackendUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - any CUDA runtime error means "no GPU here"
            raise BackendUnavailable(f"cupy is installed but CUDA is unusable: {exc}") from None
        return _aac.array_namespace(cp.empty(0)), cp.cuda.Device(0)
    raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
