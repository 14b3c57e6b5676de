"""The fused CUDA kernels of :mod:`xlstm._cuda`.

* Host tests (everywhere a C++ compiler is): the kernels' arithmetic, ``lstm_pointwise.cuh``,
  built into a small shared library whose functions take the kernels' exact arguments,
  fed by the loader's own argument builders on numpy arrays, and compared with the array
  path of :mod:`xlstm._engine`; then whole sequences run through it.
* Compile tests: ``lstm_kernels.cu`` with nvcc for sm_90, and the inlined source that CuPy
  hands to NVRTC with NVRTC itself, where those are installed.
* GPU tests (``-m gpu``, need CuPy and a CUDA device): the kernels against the CuPy array
  path, step by step and for whole sequences.
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

import xlstm
from xlstm import _cuda, _engine

PKG_DIR = Path(_cuda.__file__).resolve().parent
NP = array_api_compat.array_namespace(np.empty(0))
DTYPES = ("float32", "float64")
#: (rtol, atol) between the fused kernels and the array path: the same operations in the
#: same order, so only tanh's last bits may differ.
STEP_TOL = {"float32": (2e-6, 2e-6), "float64": (1e-14, 1e-15)}


# ------------------------------------------------------------------------ host build
SHIM = r"""
#include "lstm_pointwise.cuh"

using xlstm::index_t;

#define FWD(NAME, T)                                                                     \
    extern "C" void NAME(index_t m, index_t n, const T* g, index_t g_rs, index_t g_cs,    \
                         const T* c_prev, index_t cp_rs, index_t cp_cs, T* s, T* cct,     \
                         T* c, T* tc, T* a) {                                             \
        for (index_t e = 0; e < m * n; ++e)                                               \
            xlstm::lstm_fwd_elem<T>(e, n, g, g_rs, g_cs, c_prev, cp_rs, cp_cs, s, cct,    \
                                    c, tc, a);                                            \
    }

#define BWD(NAME, T)                                                                     \
    extern "C" void NAME(index_t m, index_t n, const T* da, index_t da_rs, index_t da_cs, \
                         const T* dc, index_t dc_rs, index_t dc_cs, const T* K,           \
                         index_t K_rs, index_t K_cs, const T* Q, index_t Q_rs,            \
                         index_t Q_cs, const T* P, index_t P_rs, index_t P_gs,            \
                         index_t P_cs, const T* f, index_t f_rs, index_t f_cs, T* dg,     \
                         T* dc_prev) {                                                    \
        for (index_t e = 0; e < m * n; ++e)                                               \
            xlstm::lstm_bwd_elem<T>(e, n, da, da_rs, da_cs, dc, dc_rs, dc_cs, K, K_rs,    \
                                    K_cs, Q, Q_rs, Q_cs, P, P_rs, P_gs, P_cs, f, f_rs,    \
                                    f_cs, dg, dc_prev);                                   \
    }

FWD(xlstm_lstm_fwd_f32, float)
FWD(xlstm_lstm_fwd_f64, double)
BWD(xlstm_lstm_bwd_f32, float)
BWD(xlstm_lstm_bwd_f64, double)
"""


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
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"host build of the header failed:\n{res.stderr}"
    return ctypes.CDLL(str(lib))


def _run_host(lib, step, plan):
    """Call the host function of ``step`` with the loader's kernel arguments ``plan``."""
    assert plan is not None, "the loader sent these inputs to the array path"
    name, total, args, outs = plan
    cargs = []
    for v in args:
        if isinstance(v, np.ndarray):
            cargs.append(ctypes.c_void_p(v.ctypes.data))
        else:
            # CuPy passes a Python int as long long, the kernels' index type.
            assert type(v) is int, f"kernel scalar of type {type(v).__name__}"
            cargs.append(ctypes.c_longlong(int(v)))
    fn = getattr(lib, _cuda.KERNEL_NAMES[step, name])
    fn.restype = None
    fn(*cargs)
    return outs


def host_step_forward(lib):
    def fwd(g, c_prev, n_a, *, xp):
        return _run_host(lib, "fwd", _cuda._forward_args(g, c_prev, n_a, np.empty))

    return fwd


def host_step_backward(lib):
    def bwd(da, dc, K, Q, P, f, *, xp):
        return _run_host(lib, "bwd", _cuda._backward_args(da, dc, K, Q, P, f, np.empty))

    return bwd


def _close(actual, expected, dtype, err=""):
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    rtol, atol = STEP_TOL[dtype]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=err)


# --------------------------------------------------------------------------- layouts
def _gates(rng, m, n, dtype, scale=2.0):
    return (scale * rng.standard_normal((m, 4 * n))).astype(dtype)


def _forward_inputs(rng, m, n, dtype, layout, mod=np):
    """``(g, c_prev)`` as the engine may pass them, in one of several memory layouts.

    The numbers are drawn on the host; ``mod`` (numpy or cupy) holds the arrays, and the
    views are taken there, so both get the same layout.
    """
    g = mod.asarray(_gates(rng, m, n, dtype))
    c_prev = mod.asarray(rng.standard_normal((m, n)).astype(dtype))
    if layout == "contiguous":
        return g, c_prev
    if layout == "transposed-c":  # the engine's matrix_transpose(c0)
        return g, mod.ascontiguousarray(c_prev.T).T
    if layout == "strided":  # every other column of a wider block, rows reversed
        wide = mod.asarray(_gates(rng, m, 2 * n, dtype))
        return wide[::-1, ::2], c_prev[::-1, :]
    if layout == "broadcast-c":  # zero row stride
        return g, mod.broadcast_to(c_prev[:1, :], (m, n))
    raise ValueError(layout)


LAYOUTS = ("contiguous", "transposed-c", "strided", "broadcast-c")


def _stacked_state(rng, T, m, n, dtype):
    """A forward pass of ``T`` steps through the array path, stacked as the engine keeps it."""
    c = rng.standard_normal((m, n)).astype(dtype)
    S, CCT, C, TC = [], [], [c], []
    for _ in range(T):
        s, cct, c, tc, _a = _engine.step_forward(_gates(rng, m, n, dtype), c, n, xp=NP)
        S.append(s), CCT.append(cct), C.append(c), TC.append(tc)
    return np.stack(S), np.stack(CCT), np.stack(C), np.stack(TC)


# ------------------------------------------------------------------------ host tests
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_host_forward_matches_array_path(host_lib, dtype, layout):
    rng = np.random.default_rng(0)
    m, n = 7, 5
    g, c_prev = _forward_inputs(rng, m, n, dtype, layout)
    got = host_step_forward(host_lib)(g, c_prev, n, xp=NP)
    want = _engine.step_forward(g, c_prev, n, xp=NP)
    shapes = [(m, 3 * n)] + [(m, n)] * 4
    for k, (a, b, shape) in enumerate(zip(got, want, shapes)):
        assert a.shape == shape and a.flags.c_contiguous
        _close(a, b, dtype, err=f"output {('s', 'cct', 'c', 'tc', 'a')[k]}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_host_backward_matches_array_path(host_lib, dtype, strided):
    rng = np.random.default_rng(1)
    T, m, n = 4, 6, 5
    S, CCT, C, TC = _stacked_state(rng, T, m, n, dtype)
    K, Q, P = _engine.backward_coefficients(S, CCT, TC, C[:T], n, xp=NP)
    F = S[..., n : 2 * n]  # a column slice, as in the engine
    da = rng.standard_normal((m, n)).astype(dtype)
    dc = rng.standard_normal((m, n)).astype(dtype)
    if strided:
        da = np.ascontiguousarray(da.T).T  # like permute_dims(da, ...)[t]
        dc = dc[::-1, :]
    t = 2
    args = (da, dc, K[t], Q[t], P[t], F[t])
    assert not F[t].flags.c_contiguous
    dg, dc_prev = host_step_backward(host_lib)(*args, xp=NP)
    dg_ref, dc_prev_ref = _engine.step_backward(*args, xp=NP)
    assert dg.shape == (m, 4 * n) and dc_prev.shape == (m, n)
    _close(dg, dg_ref, dtype, err="dg")
    _close(dc_prev, dc_prev_ref, dtype, err="dc_prev")


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_extreme_inputs(host_lib, dtype):
    """Saturated gates give exact 0 / 1 / +-1 values and never NaN."""
    rng = np.random.default_rng(2)
    m, n = 6, 8
    levels = np.array([-1e4, -30.0, -1.0, 0.0, 1.0, 30.0, 1e4])
    g = rng.choice(levels, size=(m, 4 * n)).astype(dtype)
    c_prev = rng.choice(np.array([-1e4, -30.0, 0.0, 30.0, 1e4]), size=(m, n)).astype(dtype)
    got = host_step_forward(host_lib)(g, c_prev, n, xp=NP)
    want = _engine.step_forward(g, c_prev, n, xp=NP)
    for a, b in zip(got, want):
        assert np.all(np.isfinite(a))
        _close(a, b, dtype)
    s, cct, c, tc, a = got
    assert np.all((s >= 0) & (s <= 1)) and np.all(np.abs(tc) <= 1)

    K, Q, P = _engine.backward_coefficients(s, cct, tc, c_prev, n, xp=NP)
    da = rng.choice(levels, size=(m, n)).astype(dtype)
    dc = rng.choice(levels, size=(m, n)).astype(dtype)
    f = s[:, n : 2 * n]
    got = host_step_backward(host_lib)(da, dc, K, Q, P, f, xp=NP)
    want = _engine.step_backward(da, dc, K, Q, P, f, xp=NP)
    for a, b in zip(got, want):
        assert np.all(np.isfinite(a))
        _close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_kernels_drive_whole_sequences(host_lib, monkeypatch, dtype):
    """lstm_forward / lstm_backward with the engine's pointwise steps swapped for the
    host build of the kernels: the same results as the array path."""
    n_x, n_a, n_y, m, T = 3, 5, 4, 6, 7
    rng = np.random.default_rng(3)
    params = xlstm.init_params(n_x, n_a, n_y, dtype=np.dtype(dtype), seed=4)
    x = rng.standard_normal((n_x, m, T)).astype(dtype)
    a0 = rng.standard_normal((n_a, m)).astype(dtype)
    c0 = rng.standard_normal((n_a, m)).astype(dtype)
    da = rng.standard_normal((n_a, m, T)).astype(dtype)

    def run():
        a, y, c, caches = xlstm.lstm_forward(x, a0, params, c0)
        return (a, y, c), xlstm.lstm_backward(da, caches)

    fwd_ref, bwd_ref = run()
    calls = []
    fwd, bwd = host_step_forward(host_lib), host_step_backward(host_lib)

    def pointwise(xp):
        calls.append(xp)
        return fwd, bwd

    monkeypatch.setattr(_engine, "pointwise", pointwise)
    monkeypatch.setenv("XLSTM_ACCEL", "0")  # the generic loop, not the compiled CPU loops
    fwd_got, bwd_got = run()
    assert len(calls) == 2
    rtol, atol = {"float32": (1e-5, 1e-6), "float64": (1e-13, 1e-14)}[dtype]
    for name, a, b in zip("ayc", fwd_got, fwd_ref):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)
    assert bwd_got.keys() == bwd_ref.keys()
    for k in bwd_ref:
        np.testing.assert_allclose(bwd_got[k], bwd_ref[k], rtol=rtol, atol=atol, err_msg=k)


# ------------------------------------------------------------- loader, no GPU needed
def test_loader_sends_unusual_inputs_to_the_array_path():
    n, m = 3, 4
    g = np.zeros((m, 4 * n))
    c = np.zeros((m, n))
    assert _cuda._forward_args(g, c, n, np.empty) is not None
    for bad in (
        (g.astype(np.float16), c.astype(np.float16), n),  # no float16 kernel
        (g.astype(np.float32), c, n),  # mixed dtypes
        (g[None], c[None], n),  # batched
        (g, c[:1], n),  # needs broadcasting
        (g, c, n + 1),  # width is not 4 n_a
        (np.zeros((m, 0)), np.zeros((m, 0)), 0),
    ):
        assert _cuda._forward_args(*bad, np.empty) is None
    P = np.zeros((m, 3, n))
    assert _cuda._backward_args(c, c, c, c, P, c, np.empty) is not None
    assert _cuda._backward_args(c, c, c, c, P[:, :2], c, np.empty) is None
    assert _cuda._backward_args(c, c, c, c.astype(np.float32), P, c, np.empty) is None
    assert _cuda._backward_args(c, c[:, :2], c, c, P, c, np.empty) is None


def test_loader_handles_empty_batches():
    n = 3
    plan = _cuda._forward_args(np.zeros((0, 4 * n)), np.zeros((0, n)), n, np.empty)
    assert plan[1] == 0
    assert [o.shape for o in plan[3]] == [(0, 3 * n)] + [(0, n)] * 4


def test_source_inlines_the_header():
    src = _cuda.source()
    assert '#include "' not in src
    assert "lstm_fwd_point" in src
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
    assert _engine.pointwise(cpx) == (_cuda.step_forward, _cuda.step_backward)
    monkeypatch.setenv("XLSTM_ACCEL", "0")
    assert _engine.pointwise(cpx) == (_engine.step_forward, _engine.step_backward)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,n", [(7, 5), (33, 40)])  # one block; several blocks
def test_gpu_forward_matches_array_path(cp, cpx, dtype, layout, m, n):
    rng = np.random.default_rng(5)
    g, c_prev = _forward_inputs(rng, m, n, dtype, layout, mod=cp)
    got = _cuda.step_forward(g, c_prev, n, xp=cpx)
    want = _engine.step_forward(g, c_prev, n, xp=cpx)
    for a, b in zip(got, want):
        assert isinstance(a, cp.ndarray) and a.flags.c_contiguous
        _close(a.get(), b.get(), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backward_matches_array_path(cp, cpx, dtype):
    rng = np.random.default_rng(6)
    T, m, n = 3, 33, 40
    S, CCT, C, TC = (cp.asarray(v) for v in _stacked_state(rng, T, m, n, dtype))
    K, Q, P = _engine.backward_coefficients(S, CCT, TC, C[:T], n, xp=cpx)
    F = S[..., n : 2 * n]
    da = cp.asarray(rng.standard_normal((n, m)).astype(dtype)).T
    dc = cp.asarray(rng.standard_normal((m, n)).astype(dtype))[::-1]
    args = (da, dc, K[1], Q[1], P[1], F[1])
    got = _cuda.step_backward(*args, xp=cpx)
    want = _engine.step_backward(*args, xp=cpx)
    for a, b in zip(got, want):
        assert isinstance(a, cp.ndarray) and a.flags.c_contiguous
        _close(a.get(), b.get(), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_extreme_inputs(cp, cpx, dtype):
    rng = np.random.default_rng(7)
    m, n = 9, 16
    levels = np.array([-1e4, -30.0, 0.0, 30.0, 1e4])
    g = cp.asarray(rng.choice(levels, size=(m, 4 * n)).astype(dtype))
    c_prev = cp.asarray(rng.choice(levels, size=(m, n)).astype(dtype))
    got = _cuda.step_forward(g, c_prev, n, xp=cpx)
    want = _engine.step_forward(g, c_prev, n, xp=cpx)
    for a, b in zip(got, want):
        assert bool(cp.all(cp.isfinite(a)))
        _close(a.get(), b.get(), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_sequences_with_and_without_kernels(cp, cpx, monkeypatch, dtype):
    n_x, n_a, n_y, m, T = 5, 40, 6, 33, 9
    rng = np.random.default_rng(8)
    params = xlstm.init_params(n_x, n_a, n_y, xp=cpx, dtype=getattr(cpx, dtype), seed=9)
    x = cp.asarray(rng.standard_normal((n_x, m, T)).astype(dtype))
    a0 = cp.asarray(rng.standard_normal((n_a, m)).astype(dtype))
    c0 = cp.asarray(rng.standard_normal((n_a, m)).astype(dtype))
    da = cp.asarray(rng.standard_normal((n_a, m, T)).astype(dtype))

    def run():
        a, y, c, caches = xlstm.lstm_forward(x, a0, params, c0)
        grads = xlstm.lstm_backward(da, caches)
        return {"a": a, "y": y, "c": c, **grads}

    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    fused = run()
    monkeypatch.setenv("XLSTM_ACCEL", "0")
    plain = run()
    rtol, atol = {"float32": (1e-5, 1e-6), "float64": (1e-12, 1e-13)}[dtype]
    assert fused.keys() == plain.keys()
    for k in plain:
        assert isinstance(fused[k], cp.ndarray) and fused[k].dtype == plain[k].dtype
        np.testing.assert_allclose(fused[k].get(), plain[k].get(), rtol=rtol, atol=atol,
                                   err_msg=k)

