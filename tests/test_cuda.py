"""The fused CUDA kernels of :mod:`xlstm._cuda`.

* Host tests (everywhere a C++ compiler is): the kernels' arithmetic, ``lstm_pointwise.cuh``,
  built into a small shared library whose functions take the kernels' exact arguments; the
  module's own :class:`xlstm._cuda.Loops` drive it on numpy arrays (``mod=numpy`` and a host
  ``launch``), step by step and for whole sequences, against the array path of
  :mod:`xlstm._engine`.
* Compile tests: ``lstm_kernels.cu`` with nvcc for sm_90, and the inlined source that CuPy
  hands to NVRTC with NVRTC itself, where those are installed.
* GPU tests (``-m gpu``, need CuPy and a CUDA device): the kernels against the CuPy array
  path, for whole sequences.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import array_api_compat
import numpy as np
import pytest
from oracles import random_case

import xlstm
from xlstm import _cuda, _engine
from xlstm.cells.base import NO_OUT, array_ops
from xlstm.cells.lstm import LSTM_CELL

PKG_DIR = Path(_cuda.__file__).resolve().parent
NP = array_api_compat.array_namespace(np.empty(0))
DTYPES = ("float32", "float64")
#: (rtol, atol) between the fused forward kernel and the array path: the same operations in
#: the same order, so only tanh's last bits may differ (backward steps are bit-identical).
STEP_TOL = {"float32": (2e-6, 2e-6), "float64": (1e-14, 1e-15)}
#: The same for whole sequences, where tanh's last bits travel through the recurrence.
SEQ_TOL = {"float32": (1e-5, 1e-6), "float64": (1e-12, 1e-13)}


# ------------------------------------------------------------------------ host build
SHIM = r"""
#include "lstm_pointwise.cuh"

using xlstm::index_t;

#define FWD(NAME, T)                                                                      \
    extern "C" void NAME(index_t m, index_t n, const T* gx, const T* ga, const T* c_prev,  \
                         T* s, T* cct, T* c, T* tc, T* a) {                                \
        for (index_t e = 0; e < m * n; ++e)                                                \
            xlstm::lstm_fwd_elem<T>(e, n, gx, ga, c_prev, s, cct, c, tc, a);               \
    }

#define BWD(NAME, T)                                                                      \
    extern "C" void NAME(index_t m, index_t n, const T* da, const T* da_rec, const T* dc,  \
                         const T* s, const T* cct, const T* tc, const T* c_prev, T* dg,    \
                         T* dc_prev) {                                                     \
        for (index_t e = 0; e < m * n; ++e)                                                \
            xlstm::lstm_bwd_elem<T>(e, n, da, da_rec, dc, s, cct, tc, c_prev, dg, dc_prev); \
    }

FWD(xlstm_lstm_fwd_f32, float)
FWD(xlstm_lstm_fwd_f64, double)
BWD(xlstm_lstm_bwd_f32, float)
BWD(xlstm_lstm_bwd_f64, double)
"""

#: Kernel arguments after (m, n): how many are arrays, and the shape of each in (m, n) units
#: of width (4 = gates, 3 = sigmoid gates, 1 = one per unit).
ARG_WIDTHS = {"fwd": (4, 4, 1, 3, 1, 1, 1, 1), "bwd": (1, 1, 1, 3, 1, 1, 1, 4, 1)}


def _host_compiler():
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    """The header built for the host, with one function per kernel, same names and args."""
    cxx = _host_compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler (c++, g++ or clang++) on PATH")
    tmp = tmp_path_factory.mktemp("cuda_host")
    src, lib = tmp / "shim.cpp", tmp / "libxlstm_shim.so"
    src.write_text(SHIM, encoding="utf-8")
    cmd = [cxx, "-O2", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off",
           "-Wall", "-Wextra", "-Werror", f"-I{PKG_DIR}", "-o", str(lib), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"host build of the header failed:\n{res.stderr}"
    return ctypes.CDLL(str(lib))


def host_launch(lib):
    """A ``launch`` for :class:`xlstm._cuda.Loops` that runs the host build.

    It checks what the GPU could not: the argument count, that ``m`` and ``n`` are Python
    ints (CuPy passes those as ``long long``), and that every array has the kernel's dtype,
    the expected shape and a C-contiguous layout, which the kernels assume.
    """
    calls = []

    def launch(step, name, total, args):
        m, n, *arrays = args
        assert type(m) is int and type(n) is int and total == m * n
        widths = ARG_WIDTHS[step]
        assert len(arrays) == len(widths), f"{step}: {len(arrays)} arrays"
        for k, (arr, w) in enumerate(zip(arrays, widths)):
            assert isinstance(arr, np.ndarray) and arr.dtype == np.dtype(name), (step, k)
            assert arr.shape == (m, w * n) and arr.flags.c_contiguous, (step, k, arr.shape)
        fn = getattr(lib, _cuda.KERNEL_NAMES[step, name])
        fn.restype = None
        fn(ctypes.c_longlong(m), ctypes.c_longlong(n),
           *(ctypes.c_void_p(a.ctypes.data) for a in arrays))
        calls.append(step)

    launch.calls = calls
    return launch


def host_loops(lib, dtype):
    return _cuda.Loops(dtype, mod=np, launch=host_launch(lib))


def _close(actual, expected, dtype, err="", tol=STEP_TOL):
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    rtol, atol = tol[dtype]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=err)


def _gates(rng, m, n, dtype, scale=2.0):
    return (scale * rng.standard_normal((m, 4 * n))).astype(dtype)


def _step_forward(g, c_prev):
    """The array path's LSTM step on the whole pre-activation ``g``: ``(s, cct, c, tc, a)``."""
    out = LSTM_CELL.step(array_ops(NP), g, np.zeros_like(g), (None, c_prev), NO_OUT)
    return tuple(out[k] for k in ("S", "CCT", "C", "TC", "A"))


def _stacked_state(rng, T, m, n, dtype, levels=None):
    """A forward pass of ``T`` steps through the array path, stacked as the engine keeps it."""
    draw = (lambda shape: rng.choice(levels, size=shape).astype(dtype)) if levels is not None \
        else (lambda shape: (2.0 * rng.standard_normal(shape)).astype(dtype))
    c = draw((m, n))
    S, CCT, C, TC = [], [], [c], []
    for _ in range(T):
        s, cct, c, tc, _a = _step_forward(draw((m, 4 * n)), c)
        S.append(s), CCT.append(cct), C.append(c), TC.append(tc)
    return np.stack(S), np.stack(CCT), np.stack(C), np.stack(TC)


# ------------------------------------------------------------------------ host tests
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n", [(1, 1), (7, 5), (33, 40)])
def test_host_forward_step_matches_array_path(host_lib, dtype, m, n):
    """One step of Loops.forward: GEMM, then the kernel on gx + ga."""
    rng = np.random.default_rng(0)
    Gx = _gates(rng, m, n, dtype)[None]
    WaT = rng.standard_normal((n, 4 * n)).astype(dtype)
    A = np.zeros((2, m, n), dtype)
    C = np.zeros((2, m, n), dtype)
    A[0], C[0] = rng.standard_normal((m, n)), rng.standard_normal((m, n))
    S, CCT, TC = np.empty((1, m, 3 * n), dtype), np.empty((1, m, n), dtype), np.empty((1, m, n), dtype)
    loops = host_loops(host_lib, dtype)
    loops.lstm_forward(Gx, np.asfortranarray(WaT), A, C, S, CCT, TC, 0)
    assert loops.launch.calls == ["fwd"]
    want = _step_forward(Gx[0] + A[0] @ WaT, C[0])
    for name, got, ref in zip(("s", "cct", "c", "tc", "a"), (S[0], CCT[0], C[1], TC[0], A[1]), want):
        _close(got, ref, dtype, err=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("levels", [None, (-1e4, -30.0, -1.0, 0.0, 1.0, 30.0, 1e4)],
                         ids=["normal", "saturated"])
def test_host_backward_is_bit_identical_to_array_path(host_lib, dtype, levels):
    """Loops.backward against backward_coefficients + step_backward, step by step.

    No transcendental function in the backward kernel: every bit must agree, also for
    saturated gates (exact 0 and 1) and huge cell states.
    """
    rng = np.random.default_rng(1)
    T, m, n = 5, 6, 4
    S, CCT, C, TC = _stacked_state(rng, T, m, n, dtype, levels=levels)
    WaT = rng.standard_normal((n, 4 * n)).astype(dtype)
    da_seed = rng.standard_normal((n, m, T)).astype(dtype)  # the seed layout, as the engine
    da_t = np.transpose(da_seed, (2, 1, 0))  # passes it: a strided view
    dG = np.empty((T, m, 4 * n), dtype)
    loops = host_loops(host_lib, dtype)
    da0, dc0 = loops.lstm_backward(da_t, S, CCT, TC, C[:T], WaT, dG)
    assert loops.launch.calls == ["bwd"] * T

    ops = array_ops(NP)
    coeffs = LSTM_CELL.back_coeffs(ops, {"S": S, "CCT": CCT, "TC": TC}, {"C": C[:T]}, NO_OUT)
    da_rec, dc = np.zeros((m, n), dtype), np.zeros((m, n), dtype)
    for t in range(T - 1, -1, -1):
        dg, _, _, (dc,) = LSTM_CELL.step_back(ops, da_t[t], da_rec, (dc,),
                                              tuple(k[t] for k in coeffs), {"S": S[t]}, NO_OUT)
        np.testing.assert_array_equal(dG[t], dg, err_msg=f"dG[{t}]", strict=True)
        da_rec = dg @ WaT.T  # the product the loops make (cuBLAS on a GPU)
    np.testing.assert_array_equal(da0, da_rec, strict=True)
    np.testing.assert_array_equal(dc0, dc, strict=True)
    assert np.all(np.isfinite(dG))


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_extreme_inputs(host_lib, dtype):
    """Saturated gates give exact 0 / 1 / +-1 values and never NaN."""
    rng = np.random.default_rng(2)
    m, n = 6, 8
    levels = np.array([-1e4, -30.0, -1.0, 0.0, 1.0, 30.0, 1e4])
    Gx = rng.choice(levels, size=(1, m, 4 * n)).astype(dtype)
    A = np.zeros((2, m, n), dtype)  # ga = 0: the gates are exactly the chosen levels
    C = np.zeros((2, m, n), dtype)
    C[0] = rng.choice(np.array([-1e4, -30.0, 0.0, 30.0, 1e4]), size=(m, n))
    S, CCT, TC = np.empty((1, m, 3 * n), dtype), np.empty((1, m, n), dtype), np.empty((1, m, n), dtype)
    host_loops(host_lib, dtype).lstm_forward(Gx, np.zeros((n, 4 * n), dtype), A, C, S, CCT, TC, 0)
    want = _step_forward(Gx[0], C[0])
    for got, ref in zip((S[0], CCT[0], C[1], TC[0], A[1]), want):
        assert np.all(np.isfinite(got))
        _close(got, ref, dtype)
    assert np.all((S >= 0) & (S <= 1)) and np.all(np.abs(TC) <= 1)
    assert set(np.unique(S[0][Gx[0][:, : 3 * n] == 1e4])) == {1.0}
    assert set(np.unique(S[0][Gx[0][:, : 3 * n] == -1e4])) == {0.0}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_rows", [4096, 12])
def test_host_loops_drive_whole_sequences(host_lib, monkeypatch, dtype, chunk_rows):
    """lstm_forward / lstm_backward (and inference, and T_da < T_x) with the engine's
    accelerated loops swapped for the CUDA Loops on the host build: the array path's results."""
    monkeypatch.setattr(_engine, "CHUNK_ROWS", chunk_rows)
    n_x, n_a, n_y, m, T = 3, 5, 4, 6, 7
    rng = np.random.default_rng(3)
    x, a0, c0, params = random_case(rng, n_x, n_a, n_y, m, T, dtype=dtype)
    da = rng.standard_normal((n_a, m, T - 2)).astype(dtype)

    def run():
        a, y, c, caches = xlstm.lstm_forward(x, a0, params, c0)
        inf = xlstm.lstm_forward(x, a0, params, c0, return_caches=False)
        return {"a": a, "y": y, "c": c, "a (inference)": inf[0], "y (inference)": inf[1],
                **xlstm.lstm_backward(da, caches)}

    monkeypatch.setenv("XLSTM_ACCEL", "0")
    want = run()
    monkeypatch.delenv("XLSTM_ACCEL")
    loops = host_loops(host_lib, dtype)
    monkeypatch.setattr(_engine, "accelerated_loops", lambda xp, dt, cell=None: loops)
    got = run()
    assert loops.launch.calls.count("fwd") == 2 * T and loops.launch.calls.count("bwd") == T - 2
    assert got.keys() == want.keys()
    for k in want:
        _close(got[k], want[k], dtype, err=k, tol=SEQ_TOL)


def test_empty_grid_launches_nothing():
    """m = 0: no kernel is compiled or launched (which would need CuPy and a GPU)."""
    _cuda._launch("fwd", "float32", 0, ())
    _cuda._launch("bwd", "float64", 0, ())


def test_launch_grid_and_argument_types(monkeypatch):
    """What reaches cupy.RawKernel: enough blocks to cover the grid, sizes as int64."""
    seen = []
    monkeypatch.setattr(_cuda, "_kernel", lambda step, name: lambda *a: seen.append((step, name, a)))
    arr = np.zeros(3, np.float32)
    _cuda._launch("bwd", "float32", _cuda.BLOCK + 1, (2, 3, arr))
    ((step, name, (grid, block, args)),) = seen
    assert (step, name, grid, block) == ("bwd", "float32", (2,), (_cuda.BLOCK,))
    assert [type(a) for a in args] == [np.int64, np.int64, np.ndarray] and args[2] is arr


def test_dispatch_without_cupy(monkeypatch):
    """numpy never gets the CUDA loops; CuPy would, unless XLSTM_ACCEL=0."""
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    assert not isinstance(_engine.accelerated_loops(NP, NP.float32), _cuda.Loops)


def test_source_inlines_the_header():
    src = _cuda.source()
    assert '#include "' not in src
    assert "lstm_fwd_point" in src and "lstm_bwd_point" in src
    for name in _cuda.KERNEL_NAMES.values():
        assert name in src


def test_importing_xlstm_does_not_import_cupy():
    code = (
        "import sys, numpy as np, xlstm\n"
        "p = xlstm.init_params(2, 3, 2, seed=0)\n"
        "xlstm.lstm_forward(np.ones((2, 4, 3)), np.zeros((3, 4)), p)\n"
        "import xlstm._cuda\n"
        "assert 'cupy' not in sys.modules, 'cupy was imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------- compile tests
def test_nvcc_compiles_kernels(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    inlined = tmp_path / "inlined.cu"
    inlined.write_text(_cuda.source(), encoding="utf-8")
    for src in (PKG_DIR / _cuda.KERNELS, inlined):
        cmd = [nvcc, "-arch=sm_90", "--fmad=false", "-Werror", "all-warnings",
               f"-I{PKG_DIR}", "-c", "-o", str(tmp_path / "k.o"), str(src)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}{res.stderr}"
        assert (tmp_path / "k.o").stat().st_size > 0


def _find_nvrtc():
    """A loadable libnvrtc, from the system, CUDA_HOME / CUDA_PATH or the nvidia wheels."""
    candidates = []
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates += sorted(glob.glob(os.path.join(os.environ[var], "lib*", "libnvrtc.so*")))
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")))
    for path in candidates:
        if "builtins" in path or ".alt." in path:
            continue
        try:
            # NVRTC dlopens its builtins library by name: load a sibling one first.
            for dep in sorted(glob.glob(os.path.join(os.path.dirname(path),
                                                     "libnvrtc-builtins.so*"))):
                if ".alt." not in dep:
                    ctypes.CDLL(dep, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def test_nvrtc_compiles_inlined_source():
    """What CuPy does at run time: NVRTC (no system headers) on :func:`_cuda.source`."""
    nvrtc = _find_nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc is not installed (system CUDA or the nvidia-cuda-nvrtc wheel)")
    prog = ctypes.c_void_p()
    src = _cuda.source().encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"lstm_kernels.cu", 0,
                                    None, None) == 0
    try:
        # The loader's options plus those CuPy adds itself.
        extra = ("--std=c++17", "-ftz=true", "-arch=compute_90")
        opts = [o.encode() for o in (*_cuda.OPTIONS, *extra)]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        assert rc == 0, log.value.decode(errors="replace")
        nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetPTX(prog, ptx)
        text = ptx.value.decode()
        for name in _cuda.KERNEL_NAMES.values():
            assert f".entry {name}(" in text
        assert ".local" not in text  # nothing spilled to local memory
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


# ------------------------------------------------------------------------- GPU tests
@pytest.fixture
def cp():
    cupy = pytest.importorskip("cupy", reason="cupy is not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("cupy is installed but no CUDA device is visible")
        cupy.ones(1).sum().item()
    except Exception as exc:  # noqa: BLE001 - any CUDA runtime failure means "no GPU here"
        pytest.skip(f"cupy is installed but CUDA is unusable: {exc}")
    return cupy


@pytest.fixture
def cpx(cp):
    """The array-api-compat namespace of CuPy, as the engine gets it."""
    return array_api_compat.array_namespace(cp.empty(0))


@pytest.mark.gpu
def test_gpu_dispatch(cp, cpx, monkeypatch):
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    assert isinstance(_engine.accelerated_loops(cpx, cpx.float32), _cuda.Loops)
    assert isinstance(_engine.accelerated_loops(cpx, cpx.float64), _cuda.Loops)
    monkeypatch.setenv("XLSTM_ACCEL", "0")
    assert _engine.accelerated_loops(cpx, cpx.float32) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n_a", [(7, 5), (33, 40), (64, 300)])  # one block; several
@pytest.mark.parametrize("scale", [1.0, 1e3], ids=["normal", "saturated"])
def test_gpu_sequences_with_and_without_kernels(cp, cpx, monkeypatch, dtype, m, n_a, scale):
    n_x, n_y, T = 5, 6, 9
    rng = np.random.default_rng(8)
    params = xlstm.init_params(n_x, n_a, n_y, xp=cpx, dtype=getattr(cpx, dtype), seed=9)
    params = {k: v * scale for k, v in params.items()}
    x = cp.asarray(rng.standard_normal((n_x, m, T)).astype(dtype))
    a0 = cp.asarray(rng.standard_normal((n_a, m)).astype(dtype))
    c0 = cp.asarray(rng.standard_normal((n_a, m)).astype(dtype))
    da = cp.asarray(rng.standard_normal((n_a, m, T)).astype(dtype))[:, :, : T - 1]

    def run():
        a, y, c, caches = xlstm.lstm_forward(x, a0, params, c0)
        inf = xlstm.lstm_forward(x, a0, params, c0, return_caches=False)
        grads = xlstm.lstm_backward(da, caches)
        return {"a": a, "y": y, "c": c, "a (inference)": inf[0], **grads}

    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    fused = run()
    monkeypatch.setenv("XLSTM_ACCEL", "0")
    plain = run()
    assert fused.keys() == plain.keys()
    for k in plain:
        assert isinstance(fused[k], cp.ndarray) and fused[k].dtype == plain[k].dtype
        assert bool(cp.all(cp.isfinite(fused[k]))), k
        _close(fused[k].get(), plain[k].get(), dtype, err=k, tol=SEQ_TOL)
