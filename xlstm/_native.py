"""numpy's own compiled routines, callable from numba-compiled code.

The compiled whole-time loops of :mod:`xlstm._cpu` run a cell's recorded step inside one
numba function, so that no Python runs between steps. To give the array path's numbers bit
for bit they must make numpy's own calls, not equivalents:

* :func:`blas` makes the BLAS call that ``numpy.matmul`` makes for 2-D operands (its
  ``gemm``, or ``gemv`` where one side is a single row or column), through the ``cblas``
  symbols of the BLAS that numpy itself is linked against, with numpy's choice of order,
  transposition and leading dimensions;
* :func:`ufunc_loop` runs a numpy ufunc's own inner loop (``tanh``, ``add``, ...), obtained
  through numpy's ``_get_strided_loop``, over the rows of 2-D operands as numpy's iterator
  would hand them over.

Each is checked against numpy on first use (:func:`blas`, :func:`ufunc_loop`); where a
symbol is missing, the numpy build differs, or a result is not bit-identical, they return
``None`` and the loops stay in Python. Nothing here is imported unless numba is.
"""

from __future__ import annotations

import ctypes
import functools
import importlib

import numpy as np
from numba import njit
from numba.extending import register_jitable

__all__ = ["blas", "copyto", "matmul_supported", "ufunc_loop", "ufunc_supported"]

_SIZE = ctypes.c_size_t  # pointers travel as integers (the same register on every ABI)
_ROW_MAJOR, _COL_MAJOR, _NO_TRANS, _TRANS = 101, 102, 111, 112
#: (prefix, suffix, integer type) of the cblas symbols numpy may be linked against:
#: scipy-openblas (ILP64 or LP64), OpenBLAS built with a 64-bit suffix, plain cblas.
_SYMBOLS = (("scipy_", "64_", ctypes.c_int64), ("", "64_", ctypes.c_int64),
            ("scipy_", "", ctypes.c_int), ("", "", ctypes.c_int))
_CTYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


def _umath():
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


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
    without BLAS, or a copy into a temporary first), which :func:`blas`'s call does not make."""
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
    """Whether :func:`blas`'s call makes numpy's call for ``numpy.matmul(a, b, out=out)``."""
    if not all(isinstance(v, np.ndarray) and v.ndim == 2 for v in (a, b, out)):
        return False
    if not a.dtype == b.dtype == out.dtype or a.dtype not in _CTYPES:
        return False
    if np.shares_memory(out, a) or np.shares_memory(out, b):  # numpy would copy first
        return False
    (dm, dn), dp = a.shape, b.shape[1]
    return matmul_case(dm, dn, dp, *a.strides, *b.strides, *out.strides, a.itemsize) > 0


def _blas_functions(dtype):
    """The ctypes ``(gemm, gemv)`` of numpy's BLAS for ``dtype``, or ``None``."""
    umath = _umath()
    if umath is None or dtype not in _CTYPES:
        return None
    try:
        lib = ctypes.CDLL(umath.__file__)  # its symbols and those of the libraries it needs
    except OSError:
        return None
    letter = "s" if dtype == np.float32 else "d"
    real = _CTYPES[dtype]
    for prefix, suffix, integer in _SYMBOLS:
        try:
            gemm = getattr(lib, f"{prefix}cblas_{letter}gemm{suffix}")
            gemv = getattr(lib, f"{prefix}cblas_{letter}gemv{suffix}")
        except AttributeError:
            continue
        enum = ctypes.c_int
        gemm_t = ctypes.CFUNCTYPE(None, enum, enum, enum, integer, integer, integer, real,
                                  _SIZE, integer, _SIZE, integer, real, _SIZE, integer)
        gemv_t = ctypes.CFUNCTYPE(None, enum, enum, integer, integer, real, _SIZE, integer,
                                  _SIZE, integer, real, _SIZE, integer)
        address = ctypes.cast(gemm, ctypes.c_void_p).value
        address_v = ctypes.cast(gemv, ctypes.c_void_p).value
        return gemm_t(address), gemv_t(address_v)
    return None


def _make_matmul(gemm, gemv, dtype):
    one, zero = dtype.type(1), dtype.type(0)

    @njit(nogil=True)
    def call(a, b, out):
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
            gemv(order, _TRANS, dn, rows, one, pm, lda, pv, s_v // size, zero, po,
                 s_o // size)
            return
        if case != 1:
            raise ValueError("matmul: not a case that numpy sends to gemm as it is")
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
        gemm(_ROW_MAJOR, ta, tb, dm, dp, dn, one, pa, lda, pb, ldb, zero, po, os_m // size)

    return call


def _probe_matmul(call, dtype) -> bool:
    """Whether ``call`` gives ``numpy.matmul``'s bits, in every case and orientation."""
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    a, b, v = r(7, 9), r(9, 11), r(1, 9)
    cases = [(a, b), (r(9, 7).T, b), (a, r(11, 9).T), (v, b), (v, r(11, 9).T), (a, r(9, 1)),
             (r(9, 7).T, r(1, 9).T)]
    for x, y in cases:
        for out in (np.empty((x.shape[0], y.shape[1]), dtype),
                    np.empty((y.shape[1], x.shape[0]), dtype).T):
            if not matmul_supported(x, y, out):
                return False
            call(x, y, out)
            if not _same_bits(out, np.matmul(x, y)):
                return False
    return True


@functools.cache
def blas(dtype):
    """``matmul(a, b, out)``, compiled, making numpy's BLAS call for ``dtype`` (float32 or
    float64) where :func:`matmul_supported`; ``None`` where numpy's BLAS cannot be reached
    or does not give numpy's results."""
    dtype = np.dtype(dtype)
    fns = _blas_functions(dtype)
    if fns is None:
        return None
    call = _make_matmul(*fns, dtype)
    try:
        ok = _probe_matmul(call, dtype)
    except Exception:  # noqa: BLE001 - any failure leaves the Python loops in charge
        return None
    return call if ok else None


# ------------------------------------------------------------------------------ ufuncs
class _CallInfo(ctypes.Structure):
    _fields_ = [("loop", ctypes.c_void_p), ("context", ctypes.c_void_p),
                ("auxdata", ctypes.c_void_p), ("requires_pyapi", ctypes.c_bool)]


_LOOP_T = ctypes.CFUNCTYPE(ctypes.c_int, _SIZE, _SIZE, _SIZE, _SIZE, _SIZE)
_CAPSULE = b"numpy_1.24_ufunc_call_info"
#: The call-info capsules, kept alive for as long as their loops may run.
_KEEP = []


def _strided_loop(uf, dtype):
    """``(loop, context, auxdata)`` of ufunc ``uf`` on ``dtype`` operands, or ``None``."""
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
    return _LOOP_T(c.loop), c.context or 0, c.auxdata or 0


@register_jitable
def _row_step(v, m):
    """The byte stride from row to row of a 2-D operand (0 for one row broadcast)."""
    return 0 if v.shape[0] == 1 and m > 1 else v.strides[0]


def _make_ufunc(loop, context, auxdata, nin, scalar):
    """The compiled call of a ufunc loop: ``call(x, out)`` or ``call(x, y, out)``; with
    ``scalar`` the last input is a number (stride 0), as numpy passes a Python scalar."""

    @njit(nogil=True)
    def call1(x, out):
        m, n = out.shape
        data = np.empty(2, np.intp)
        dims = np.empty(1, np.intp)
        steps = np.empty(2, np.intp)
        steps[0], steps[1] = x.strides[1], out.strides[1]
        rx, ro = _row_step(x, m), _row_step(out, m)
        if rx == n * x.strides[1] and ro == n * out.strides[1]:
            m, n = 1, m * n  # numpy's iterator joins adjacent rows into one call
        dims[0] = n
        for r in range(m):
            data[0], data[1] = x.ctypes.data + r * rx, out.ctypes.data + r * ro
            loop(context, data.ctypes.data, dims.ctypes.data, steps.ctypes.data, auxdata)

    @njit(nogil=True)
    def call2(x, y, out):
        m, n = out.shape
        data = np.empty(3, np.intp)
        dims = np.empty(1, np.intp)
        steps = np.empty(3, np.intp)
        rx, ro = _row_step(x, m), _row_step(out, m)
        if scalar:
            held = np.empty(1, out.dtype)
            held[0] = y
            py, ry, sy = held.ctypes.data, 0, 0
            joined = True
        else:
            py, ry, sy = y.ctypes.data, _row_step(y, m), y.strides[1]
            joined = ry == n * sy
        steps[0], steps[1], steps[2] = x.strides[1], sy, out.strides[1]
        if joined and rx == n * x.strides[1] and ro == n * out.strides[1]:
            m, n = 1, m * n
        dims[0] = n
        for r in range(m):
            data[0], data[1], data[2] = x.ctypes.data + r * rx, py + r * ry, out.ctypes.data + r * ro
            loop(context, data.ctypes.data, dims.ctypes.data, steps.ctypes.data, auxdata)

    return call1 if nin == 1 else call2


def ufunc_supported(dtype, *operands, exact=False) -> bool:
    """Whether :func:`ufunc_loop`'s call runs numpy's loop on these operands as numpy would: 2-D
    arrays of ``dtype`` with contiguous rows, of the output's shape or one broadcast row,
    and numbers (the last input only). With ``exact`` (a correctly rounded operation, such
    as ``add``, whose every path gives the same bits) rows may have any strides."""
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
    """numpy ufunc ``uf``'s own inner loop for ``dtype``, compiled into a call
    ``(x, out)`` or ``(x, y, out)`` over 2-D operands (:func:`ufunc_supported`); ``None``
    where numpy does not give it out, or it does not reproduce ``uf``'s bits."""
    dtype = np.dtype(dtype)
    found = _strided_loop(uf, dtype)
    if found is None:
        return None
    call = _make_ufunc(*found, uf.nin, scalar)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 37)) * 4).astype(dtype)
    y = dtype.type(0.25) if scalar else (rng.standard_normal((1, 37)) * 4).astype(dtype)
    try:
        for view in (x, np.concatenate([x, x], axis=1)[:, 3:40]):
            out = np.empty(view.shape, dtype)
            args = (view,) if uf.nin == 1 else (view, y)
            call(*args, out)
            if not _same_bits(out, uf(*args)):
                return None
    except Exception:  # noqa: BLE001
        return None
    return call


@njit(nogil=True)
def copyto(dst, src):
    """``numpy.copyto(dst, src)`` for 2-D arrays of one shape."""
    for r in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[r, j] = src[r, j]
