"""numpy's own compiled routines, callable from numba-compiled code.

The compiled whole-time loops of :mod:`xlstm.accel.cpu.loops` run a cell's recorded step inside one
numba function, so that no Python runs between steps. To give the array path's numbers bit
for bit they must make numpy's own calls, not equivalents:

* :func:`matmul` makes the BLAS call that ``numpy.matmul`` makes for 2-D operands (its
  ``gemm``, or ``gemv`` where one side is a single row or column), through the ``cblas``
  symbols of the BLAS that numpy itself is linked against, with numpy's choice of order,
  transposition and leading dimensions;
* :func:`ufunc1` and :func:`ufunc2` run a numpy ufunc's own inner loop (``tanh``, ``add``,
  ...), obtained through numpy's ``_get_strided_loop``, over the rows of 2-D operands as
  numpy's iterator hands them over.

The routines' addresses are found once per process (:func:`blas`, :func:`ufunc_loop`,
each checked bit for bit against numpy on first use; ``None`` where a symbol is missing, the
numpy build differs or a result differs, and the loops then stay in Python; a failure to
compile them propagates to the loops' guard) and travel as
plain integer arguments, called through :func:`ccall`: no compiled function holds a
process's address, so numba can cache them all on disk. Nothing here is imported unless
numba is.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import importlib
import os
import threading

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.registry import CPUDispatcher as Dispatcher
from numba.extending import intrinsic, register_jitable

# numba is imported here only: the other modules of the loops take its names from here
# (``njit``, ``register_jitable``, ``Dispatcher``, the type of a compiled function).
__all__ = ["OPTIONS", "Dispatcher", "blas", "cached_jit", "cache_off_unproven", "ccall",
           "copyto", "drop_broken_entries", "matmul", "matmul_t", "matmul_supported", "njit",
           "register_cache", "register_jitable", "ufunc1", "ufunc2", "ufunc2_scalar",
           "ufunc_loop", "ufunc_supported"]

#: numba's options for every compiled loop of the package.
OPTIONS = {"nogil": True, "error_model": "numpy"}
_ROW_MAJOR, _COL_MAJOR, _NO_TRANS, _TRANS = 101, 102, 111, 112
#: (prefix, suffix, 64-bit integers) of the cblas symbols numpy may be linked against:
#: scipy-openblas (ILP64 or LP64), OpenBLAS built with a 64-bit suffix, plain cblas.
_SYMBOLS = (("scipy_", "64_", True), ("", "64_", True), ("scipy_", "", False), ("", "", False))
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def cached_jit(fn):
    """``fn`` compiled by numba, its machine code cached on disk where numba finds a place
    for it (in memory otherwise)."""
    try:
        compiled = njit(cache=True, **OPTIONS)(fn)
    except Exception:  # noqa: BLE001 - "cannot cache function ...: no locator available",
        # or a cache folder that cannot be inspected: compiled in memory instead
        return njit(**OPTIONS)(fn)
    register_cache(compiled)
    return compiled


#: Every compiled function of the package whose machine code numba caches on disk.
_CACHED: list = []
_CACHED_LOCK = threading.Lock()


def register_cache(dispatcher) -> None:
    """Note that numba caches ``dispatcher``'s machine code on disk, for
    :func:`cache_off_unproven` to find."""
    with _CACHED_LOCK:
        if not any(d is dispatcher for d in _CACHED):
            _CACHED.append(dispatcher)


def cache_off_unproven() -> list[str]:
    """Stop every registered function that has not been compiled or loaded in this process
    from reading or writing numba's disk cache (it compiles in memory from now on), and
    return the paths of their cache indexes.

    Called when the compiled loops fail (a corrupt index, a full disk): what runs already
    keeps running; the rest compiles in memory for the rest of the process, and the next
    process writes the cache anew.
    """
    from numba.core.caching import NullCache

    indexes = []
    with _CACHED_LOCK:
        for d in _CACHED:
            if d.overloads:
                continue
            index = getattr(getattr(getattr(d, "_cache", None), "_cache_file", None),
                            "_index_path", None)
            if isinstance(index, str):
                indexes.append(index)
            d._cache = NullCache()  # what a function compiled without cache=True has
    return indexes


def drop_broken_entries(indexes) -> list[str]:
    """Remove each numba cache entry among the index files ``indexes`` that does not load,
    with its data files, and return the paths removed.

    An entry loads when its index unpickles as numba writes it (its version, then the
    source stamp and the table of overloads) and so does every data file it names; an
    index of another numba version is left alone, as numba ignores it. What is removed is
    compiled and written again by the next process that needs it.
    """
    removed = []
    for index in indexes:
        if not index.endswith(".nbi") or _entry_loads(index):
            continue
        for path in [index, *glob.glob(glob.escape(index[:-4]) + ".*.nbc")]:
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
    return removed


def _entry_loads(index) -> bool:
    """Whether the numba cache entry with the index file ``index`` loads (see
    :func:`drop_broken_entries`); a missing index counts as loading (nothing to remove)."""
    import pickle

    import numba

    # a FIFO or a device in place of a file is not waited on
    from ..._lib.files import open_regular

    folder = os.path.dirname(index)
    try:
        with open_regular(index) as f:
            version = pickle.load(f)
            rest = f.read()
        if version != numba.__version__:
            return True
        _, overloads = pickle.loads(rest)
        for name in overloads.values():
            with open_regular(os.path.join(folder, name)) as f:
                pickle.loads(f.read())
    except FileNotFoundError:
        return not os.path.exists(index)  # a data file that is gone breaks the entry
    except Exception:  # noqa: BLE001 - whatever numba's own load would raise, not a file
        return False
    return True


@intrinsic
def ccall(typingctx, address, args):
    """Call the C function at ``address`` (an integer) with the values of the tuple
    ``args``, in their numba types (``int32``, ``int64``, ``float32``, ``float64``; pointers
    as integers), and ignore what it returns."""
    if not isinstance(address, types.Integer) or not isinstance(args, types.BaseTuple):
        return None

    def codegen(context, builder, signature, llargs):
        values = cgutils.unpack_tuple(builder, llargs[1], len(args))
        fnty = ir.FunctionType(ir.VoidType(), [v.type for v in values])
        builder.call(builder.inttoptr(llargs[0], fnty.as_pointer()), values)
        return context.get_dummy_value()

    return types.void(address, args), codegen


def _same_bits(a, b) -> bool:
    return a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


# ----------------------------------------------------------------------------- matmul
@register_jitable
def is_blasable2d(s1, s2, d1, d2, size):
    """numpy's test that a 2-D operand goes to BLAS as it is (byte strides ``s1, s2``)."""
    return s2 == size and s1 % size == 0 and s1 // size >= d2


@register_jitable
def matmul_case(dm, dn, dp, is1_m, is1_n, is2_n, is2_p, os_m, os_p, size):
    """What ``numpy.matmul`` does with 2-D operands of these sizes and byte strides: 1 the
    matrix-matrix ``gemm`` with every operand as it is, 2 ``gemv`` of a row vector times a
    matrix, 3 ``gemv`` of a matrix times a column vector, 0 anything else (a dot, a loop
    without BLAS, or a copy into a temporary first), which :func:`matmul` does not make."""
    if dm == 0 or dn == 0 or dp == 0:
        return 0
    i1 = is_blasable2d(is1_m, is1_n, dm, dn, size) or is_blasable2d(is1_n, is1_m, dn, dm, size)
    i2 = is_blasable2d(is2_n, is2_p, dn, dp, size) or is_blasable2d(is2_p, is2_n, dp, dn, size)
    if dm == 1 or dn == 1 or dp == 1:
        if dn == 1:  # a dot product, or numpy's loop without BLAS
            return 0
        if dm == 1 and i2 and is_blasable2d(is1_n, size, dn, 1, size):
            return 2
        if dp == 1 and i1 and is_blasable2d(is2_n, size, dn, 1, size):
            return 3
        return 0
    o = is_blasable2d(os_m, os_p, dm, dp, size) or is_blasable2d(os_p, os_m, dp, dm, size)
    return 1 if (i1 and i2 and o) else 0


def matmul_supported(a, b, out) -> bool:
    """Whether :func:`matmul` makes numpy's call for ``numpy.matmul(a, b, out=out)``."""
    if not all(isinstance(v, np.ndarray) and v.ndim == 2 for v in (a, b, out)):
        return False
    if not a.dtype == b.dtype == out.dtype or a.dtype not in _FLOATS:
        return False
    if np.shares_memory(out, a) or np.shares_memory(out, b):  # numpy would copy first
        return False
    (dm, dn), dp = a.shape, b.shape[1]
    return matmul_case(dm, dn, dp, *a.strides, *b.strides, *out.strides, a.itemsize) > 0


@register_jitable
def _gemm(wide, address, order, ta, tb, m, n, k, one, a, lda, b, ldb, zero, c, ldc):
    if wide:
        ccall(address, (np.int32(order), np.int32(ta), np.int32(tb), np.int64(m), np.int64(n),
                        np.int64(k), one, a, np.int64(lda), b, np.int64(ldb), zero, c,
                        np.int64(ldc)))
    else:
        ccall(address, (np.int32(order), np.int32(ta), np.int32(tb), np.int32(m), np.int32(n),
                        np.int32(k), one, a, np.int32(lda), b, np.int32(ldb), zero, c,
                        np.int32(ldc)))


@register_jitable
def _gemv(wide, address, order, trans, m, n, one, a, lda, x, incx, zero, y, incy):
    if wide:
        ccall(address, (np.int32(order), np.int32(trans), np.int64(m), np.int64(n), one, a,
                        np.int64(lda), x, np.int64(incx), zero, y, np.int64(incy)))
    else:
        ccall(address, (np.int32(order), np.int32(trans), np.int32(m), np.int32(n), one, a,
                        np.int32(lda), x, np.int32(incx), zero, y, np.int32(incy)))


@cached_jit
def matmul(gemm, gemv, wide, a, b, out):
    """``numpy.matmul(a, b, out=out)`` for 2-D operands (:func:`matmul_supported`), by the
    BLAS functions at ``gemm`` and ``gemv`` (``wide``: 64-bit integers), as numpy makes it."""
    one, zero = out.dtype.type(1), out.dtype.type(0)
    dm, dn = a.shape
    dp = b.shape[1]
    size = a.itemsize
    is1_m, is1_n = a.strides
    is2_n, is2_p = b.strides
    os_m, os_p = out.strides
    case = matmul_case(dm, dn, dp, is1_m, is1_n, is2_n, is2_p, os_m, os_p, size)
    pa, pb, po = a.ctypes.data, b.ctypes.data, out.ctypes.data
    if case == 2 or case == 3:
        if case == 2:  # row @ matrix: numpy swaps the operands
            pm, pv, s_m, s_n, s_v, s_o, rows = pb, pa, is2_p, is2_n, is1_n, os_p, dp
        else:
            pm, pv, s_m, s_n, s_v, s_o, rows = pa, pb, is1_m, is1_n, is2_n, os_m, dm
        if is_blasable2d(s_m, s_n, rows, dn, size):
            order, lda = _COL_MAJOR, s_m // size
        else:
            order, lda = _ROW_MAJOR, s_n // size
        _gemv(wide, gemv, order, _TRANS, dn, rows, one, pm, lda, pv, s_v // size, zero, po,
              s_o // size)
        return
    if case != 1:
        raise ValueError("matmul: not a case that numpy sends to BLAS as it is")
    if abs(os_m) < abs(os_p):  # matmul(a, b, o) == matmul(b.T, a.T, o.T)
        pa, pb = pb, pa
        dm, dp = dp, dm
        is1_m, is1_n, is2_n, is2_p = is2_p, is2_n, is1_n, is1_m
        os_m, os_p = os_p, os_m
    if is_blasable2d(is1_m, is1_n, dm, dn, size):
        ta, lda = _NO_TRANS, is1_m // size
    else:
        ta, lda = _TRANS, is1_n // size
    if is_blasable2d(is2_n, is2_p, dn, dp, size):
        tb, ldb = _NO_TRANS, is2_n // size
    else:
        tb, ldb = _TRANS, is2_p // size
    _gemm(wide, gemm, _ROW_MAJOR, ta, tb, dm, dp, dn, one, pa, lda, pb, ldb, zero, po,
          os_m // size)


@cached_jit
def matmul_t(gemm, gemv, wide, a, b, out):
    """:func:`matmul` of ``a`` and ``b.T``: ``numpy.matmul(a, b.T, out=out)``."""
    matmul(gemm, gemv, wide, a, b.T, out)


def _umath():
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _blas_addresses(dtype):
    """``(gemm, gemv, wide)``: the addresses of numpy's BLAS routines for ``dtype`` and
    whether they take 64-bit integers; ``None`` where they cannot be found."""
    umath = _umath()
    if umath is None:
        return None
    try:
        lib = ctypes.CDLL(umath.__file__)  # its symbols and those of the libraries it needs
    except OSError:
        return None
    letter = "s" if dtype == np.float32 else "d"
    for prefix, suffix, wide in _SYMBOLS:
        try:
            gemm = getattr(lib, f"{prefix}cblas_{letter}gemm{suffix}")
            gemv = getattr(lib, f"{prefix}cblas_{letter}gemv{suffix}")
        except AttributeError:
            continue
        address = lambda f: ctypes.cast(f, ctypes.c_void_p).value
        return address(gemm), address(gemv), wide
    return None


@functools.cache
def blas(dtype):
    """The leading arguments ``(gemm, gemv, wide)`` of :func:`matmul` for ``dtype``
    (float32 or float64), or ``None`` where numpy's BLAS cannot be reached or :func:`matmul`
    does not give ``numpy.matmul``'s bits in every case and orientation."""
    dtype = np.dtype(dtype)
    found = None if dtype not in _FLOATS else _blas_addresses(dtype)
    if found is None:
        return None
    rng = np.random.default_rng(0)
    r = lambda *shape: rng.standard_normal(shape).astype(dtype)
    a, b, v = r(7, 9), r(9, 11), r(1, 9)
    cases = [(a, b), (r(9, 7).T, b), (a, r(11, 9).T), (v, b), (v, r(11, 9).T), (a, r(9, 1)),
             (r(9, 7).T, r(1, 9).T)]
    # A failure to compile or load matmul propagates: the loops' guard falls back, heals
    # numba's cache and tries again on the next call (xlstm.accel.cpu.loops.Loops._guarded).
    for x, y in cases:
        for out in (np.empty((x.shape[0], y.shape[1]), dtype),
                    np.empty((y.shape[1], x.shape[0]), dtype).T):
            if not matmul_supported(x, y, out):
                return None
            matmul(*found, x, y, out)
            if not _same_bits(out, np.matmul(x, y, out=np.empty_like(out))):
                return None
    return found


# ------------------------------------------------------------------------------ ufuncs
class _CallInfo(ctypes.Structure):
    _fields_ = [("loop", ctypes.c_void_p), ("context", ctypes.c_void_p),
                ("auxdata", ctypes.c_void_p), ("requires_pyapi", ctypes.c_bool)]


_CAPSULE = b"numpy_1.24_ufunc_call_info"
#: The call-info capsules, kept alive for as long as their loops may run.
_KEEP = []


def _strided_loop(uf, dtype):
    """``(loop, context, auxdata)`` addresses of ufunc ``uf`` on ``dtype`` operands."""
    try:
        dtypes = (dtype,) * (uf.nin + uf.nout)
        _, info = uf._resolve_dtypes_and_context(dtypes)
        uf._get_strided_loop(info)
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        c = _CallInfo.from_address(get(info, _CAPSULE))
    except Exception:  # noqa: BLE001 - a numpy without the (experimental) API
        return None
    if not c.loop or c.requires_pyapi:
        return None
    _KEEP.append(info)
    return c.loop, c.context or 0, c.auxdata or 0


@register_jitable
def _row_step(v, m):
    """The byte stride from row to row of a 2-D operand (0 for one row broadcast)."""
    return 0 if v.shape[0] == 1 and m > 1 else v.strides[0]


@register_jitable
def _run_loop(loop, context, auxdata, m, n, ptrs, rows, steps, held):
    """Call the strided loop on ``m`` rows of ``n`` elements: operand ``q`` of row ``r`` at
    ``ptrs[q] + r rows[q]``, its elements ``steps[q]`` bytes apart. Rows that follow each
    other in every operand go as one call, as numpy's iterator joins them.

    The arrays whose addresses the loop reads (``held``, the scratch arrays) are read again
    after the calls: numba frees an array after its last use, and a use of its address
    alone does not count."""
    k = len(ptrs)
    base = np.empty(k, np.intp)
    row = np.empty(k, np.intp)
    strides = np.empty(k, np.intp)
    joined = m > 1
    for q in range(k):
        base[q], row[q], strides[q] = ptrs[q], rows[q], steps[q]
        joined = joined and row[q] == n * strides[q]
    if joined:
        m, n = 1, m * n
    data = np.empty(k, np.intp)
    dims = np.full(1, n, np.intp)
    for r in range(m):
        for q in range(k):
            data[q] = base[q] + r * row[q]
        ccall(loop, (context, data.ctypes.data, dims.ctypes.data, strides.ctypes.data, auxdata))
    return data[0] + dims[0] + strides[0] + held[0]


@cached_jit
def ufunc1(loop, context, auxdata, x, out):
    """``ufunc(x, out=out)`` by its strided loop (:func:`ufunc_loop`), 2-D operands."""
    m, n = out.shape
    _run_loop(loop, context, auxdata, m, n, (x.ctypes.data, out.ctypes.data),
              (_row_step(x, m), out.strides[0]), (x.strides[1], out.strides[1]), out[0])


@cached_jit
def ufunc2(loop, context, auxdata, x, y, out):
    """``ufunc(x, y, out=out)`` by its strided loop, 2-D operands (``y`` may be one row)."""
    m, n = out.shape
    _run_loop(loop, context, auxdata, m, n, (x.ctypes.data, y.ctypes.data, out.ctypes.data),
              (_row_step(x, m), _row_step(y, m), out.strides[0]),
              (x.strides[1], y.strides[1], out.strides[1]), out[0])


@cached_jit
def ufunc2_scalar(loop, context, auxdata, x, y, out):
    """``ufunc(x, y, out=out)`` with a number ``y``, which numpy passes with stride 0."""
    m, n = out.shape
    held = np.empty(1, out.dtype)
    held[0] = y
    _run_loop(loop, context, auxdata, m, n, (x.ctypes.data, held.ctypes.data, out.ctypes.data),
              (_row_step(x, m), 0, out.strides[0]), (x.strides[1], 0, out.strides[1]), held)


def ufunc_supported(dtype, *operands, exact=False) -> bool:
    """Whether :func:`ufunc1`/:func:`ufunc2` run numpy's loop on these operands as numpy
    would: 2-D arrays of ``dtype`` with contiguous rows, of the output's shape or one
    broadcast row, and a number as the last input. With ``exact`` (a correctly rounded
    operation, such as ``add``, whose every loop gives the same bits) rows may have any
    strides."""
    out = operands[-1]
    if not (isinstance(out, np.ndarray) and out.ndim == 2 and out.dtype == dtype):
        return False
    for k, v in enumerate(operands):
        if isinstance(v, np.ndarray):
            if v.ndim != 2 or v.dtype != dtype or not (exact or v.strides[1] == v.itemsize):
                return False
            if v.shape[1] != out.shape[1] or v.shape[0] not in (1, out.shape[0]):
                return False
            if v is not out and np.shares_memory(v, out) and v.shape != out.shape:
                return False
        elif k != len(operands) - 2 or not isinstance(v, (float, np.floating)):
            return False
    return True


@functools.cache
def ufunc_loop(uf, dtype, scalar=False):
    """``(call, (loop, context, auxdata))``: the compiled call of numpy ufunc ``uf`` on
    ``dtype`` (:func:`ufunc1`, :func:`ufunc2` or, with ``scalar``, :func:`ufunc2_scalar`)
    and the leading arguments it takes; ``None`` where numpy does not give the loop out,
    or the call does not reproduce ``uf``'s bits."""
    dtype = np.dtype(dtype)
    found = _strided_loop(uf, dtype)
    if found is None:
        return None
    call = ufunc1 if uf.nin == 1 else ufunc2_scalar if scalar else ufunc2
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 37)) * 4).astype(dtype)
    y = dtype.type(0.25) if scalar else (rng.standard_normal((1, 37)) * 4).astype(dtype)
    # (log1p of numbers below -1 is NaN, on both sides: no warning); a failure to compile
    # or load the call propagates, as in blas
    with np.errstate(all="ignore"):
        same = all(_probe(call, found, uf, view, y) for view in
                   (x, np.concatenate([x, x], axis=1)[:, 3:40]))
    return (call, found) if same else None


def _probe(call, found, uf, view, y):
    """Whether ``call`` gives ``uf``'s bits on ``view`` (and ``y``, for two inputs)."""
    out = np.empty(view.shape, view.dtype)
    args = (view,) if uf.nin == 1 else (view, y)
    call(*found, *args, out)
    return _same_bits(out, uf(*args))


@cached_jit
def copyto(dst, src):
    """``numpy.copyto(dst, src)`` for 2-D arrays of one shape."""
    for r in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[r, j] = src[r, j]
