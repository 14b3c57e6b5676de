"""The fused CUDA kernels of :mod:`xlstm._cuda`.

* Table tests: the kernels are declared once (:mod:`xlstm._cuda.kernels`); the generated
  source, the names, the header's element functions and the argument checks agree with it.
* Host tests (everywhere a C++ compiler is): the generated kernel source, the very text that
  NVRTC compiles, built for the host behind ``cuda_host/grid_emulator.h`` (every block and
  thread of the grid as host loops, blocks in shuffled order, small blocks so that the last
  one is partial). The module's own :class:`xlstm._cuda.Loops` drive it on numpy arrays
  (``mod=numpy`` and a host ``launch``), step by step and for whole sequences, against the
  array path of :mod:`xlstm._engine`. Under AddressSanitizer (in a subprocess that preloads
  the ASan runtime) the same whole sequences run clean, and a broken bounds check is
  reported as a heap-buffer-overflow.
* Compile tests: the generated source with nvcc for sm_90, and with NVRTC as CuPy does,
  where those are installed.
* GPU tests (``-m gpu``, need CuPy and a CUDA device): the kernels against the CuPy array
  path, for whole sequences.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import array_api_compat
import cuda_emulator
import numpy as np
import pytest
from cuda_emulator import SEQ_TOL
from oracles import random_case

import xlstm
from xlstm import _cuda, _engine
from xlstm._cuda import kernels as table
from xlstm.cells.base import NO_OUT, array_ops
from xlstm.cells.lstm import LSTM_CELL

PKG_DIR = Path(_cuda.__file__).resolve().parent
TESTS_DIR = Path(__file__).resolve().parent
NP = array_api_compat.array_namespace(np.empty(0))
DTYPES = ("float32", "float64")
#: (rtol, atol) between the fused forward kernel and the array path: the same operations in
#: the same order, so only tanh's last bits may differ (backward steps are bit-identical).
STEP_TOL = {"float32": (2e-6, 2e-6), "float64": (1e-14, 1e-15)}
#: Threads per block in the emulated host tests: small, so that grids have several blocks
#: and a partial last one.
HOST_BLOCK = 16


# ------------------------------------------------------------------------- the table
def test_table_names_every_kernel_once():
    """KERNEL_NAMES (what Loops launches) come from the table; every kernel of a cell is in
    its source exactly once, behind the bounds check."""
    assert set(table.cells()) == set(table.HEADERS) and "lstm" in table.cells()
    assert _cuda.KERNEL_NAMES == {
        ("fwd", "float32"): "xlstm_lstm_fwd_f32", ("fwd", "float64"): "xlstm_lstm_fwd_f64",
        ("bwd", "float32"): "xlstm_lstm_bwd_f32", ("bwd", "float64"): "xlstm_lstm_bwd_f64",
    }
    for cell in table.cells():
        src = table.source(cell)
        rows = [k for (c, _), k in table.TABLE.items() if c == cell]
        assert src.count(table.GUARD) == len(rows) * len(table.DTYPES)
        for k in rows:
            for d in table.DTYPES:
                assert len(re.findall(rf'extern "C" __global__ void {k.name(d)}\(', src)) == 1
    with pytest.raises(KeyError, match="no CUDA kernel for cell 'nocell'"):
        table.kernel("nocell", "fwd")


def _elem_params(cell, elem):
    """The array parameters of ``elem`` in ``cell``'s header: [(name, written), ...]."""
    header = (PKG_DIR / table.HEADERS[cell]).read_text(encoding="utf-8")
    (params,) = re.findall(rf"\b{elem}\(([^)]*)\)\s*{{", header)
    out = []
    for p in params.split(",")[2:]:  # after (e, n)
        *words, name = p.replace("*", " * ").split()
        assert "*" in words, (elem, p)
        out.append((name, "const" not in words))
    return out


@pytest.mark.parametrize("key", sorted(table.TABLE))
def test_table_matches_the_element_functions(key):
    """The table's arguments are the element function's, by name, order and constness, so
    that a swapped pair of same-typed arguments cannot hide from the compiler."""
    k = table.TABLE[key]
    assert _elem_params(k.cell, k.elem) == [(a.name, a.out) for a in k.args]


def test_generated_kernels_restrict_all_but_aliases():
    src = table.source("lstm")
    bwd = src[src.index("void xlstm_lstm_bwd_f64("):]
    bwd = bwd[: bwd.index(")")]
    assert "const double* dc," in bwd and "double* dc_prev" in bwd
    assert bwd.count("__restrict__") == len(table.kernel("lstm", "bwd").args) - 2
    assert "__restrict__" not in table.host_source("lstm", kernels="")


def _args_for(k, m, n, dtype="float64"):
    return [np.zeros((m, a.width * n), dtype) for a in k.args]


def test_check_args_rejects_what_a_kernel_cannot_take():
    k = table.kernel("lstm", "bwd")
    m, n = 3, 2
    arrays = _args_for(k, m, n)
    table.check_args(k, "float64", m, n, arrays)
    arrays[-1] = arrays[2]  # dc_prev is dc: allowed
    table.check_args(k, "float64", m, n, arrays)
    bad = {
        "m and n must be Python ints": (np.int64(m), n, _args_for(k, m, n)),
        "8 arrays for 9": (m, n, _args_for(k, m, n)[:-1]),
        "dg has shape": (m, n, [*_args_for(k, m, n)[:-2], np.zeros((m, 3 * n)), np.zeros((m, n))]),
        "s is float32": (m, n, [*_args_for(k, m, n)[:3], np.zeros((m, 3 * n), np.float32),
                                *_args_for(k, m, n)[4:]]),
        "da is not C-contiguous": (m, n, [np.zeros((n, m)).T, *_args_for(k, m, n)[1:]]),
    }
    for message, (mm, nn, arrs) in bad.items():
        with pytest.raises(AssertionError, match=message):
            table.check_args(k, "float64", mm, nn, arrs)
    shared = _args_for(k, m, n)
    shared[1] = shared[0]  # da_rec is da: not allowed
    with pytest.raises(AssertionError, match="da_rec and da share memory"):
        table.check_args(k, "float64", m, n, shared)
    stack = np.zeros((2 * m + 1, n))
    partial = _args_for(k, m, n)
    partial[2], partial[-1] = stack[:m], stack[1 : m + 1]  # dc_prev overlaps dc, shifted
    with pytest.raises(AssertionError, match="dc_prev and dc share memory"):
        table.check_args(k, "float64", m, n, partial)


def test_write_script(tmp_path):
    """``python xlstm/_cuda/kernels.py --write DIR``, with nothing but Python (not even the
    package on the path): the files that .ci/compile_cuda.sh compiles."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-I", str(PKG_DIR / "kernels.py"), "--write", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    names = ("xlstm_lstm.cu", "xlstm_lstm_host.cpp")
    assert res.stdout.split() == [str(tmp_path / name) for name in names]
    assert (tmp_path / "xlstm_lstm.cu").read_text(encoding="utf-8") == _cuda.source()
    host = (tmp_path / "xlstm_lstm_host.cpp").read_text(encoding="utf-8")
    assert '#include "xlstm_lstm.cu"' in host and '#include "grid_emulator.h"' in host


# ------------------------------------------------------------------------ host build
@pytest.fixture(scope="module")
def cxx():
    path = cuda_emulator.host_compiler()
    if path is None:
        pytest.skip("no host C++ compiler ($CXX, c++, g++ or clang++) on PATH")
    return path


@pytest.fixture(scope="module")
def host_lib(cxx, tmp_path_factory):
    """The generated kernels built for the host behind the grid emulator (no sanitizer)."""
    lib, _ = cuda_emulator.build(cxx, tmp_path_factory.mktemp("cuda_host"))
    return ctypes.CDLL(str(lib))


def host_loops(lib, dtype, seed=1):
    return cuda_emulator.host_loops(lib, dtype, block=HOST_BLOCK, seed=seed)


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

    model = xlstm.LSTM(n_x, n_a, dtype=dtype, seed=0)
    state = (a0[None], c0[None])

    def run():
        a, y, c, caches = xlstm.lstm_forward(x, a0, params, c0)
        inf = xlstm.lstm_forward(x, a0, params, c0, return_caches=False)
        # the model's inference keeps only the last two cell states (alternating slots)
        y_m, (a_T, c_T), _ = model.forward(x, state, return_cache=False)
        return {"a": a, "y": y, "c": c, "a (inference)": inf[0], "y (inference)": inf[1],
                "model y": y_m, "model a_T": a_T, "model c_T": c_T,
                **xlstm.lstm_backward(da, caches)}

    monkeypatch.setenv("XLSTM_ACCEL", "0")
    want = run()
    monkeypatch.delenv("XLSTM_ACCEL")
    loops = host_loops(host_lib, dtype)
    monkeypatch.setattr(_engine, "accelerated_loops", lambda xp, dt, cell=None: loops)
    got = run()
    assert loops.launch.calls.count("fwd") == 3 * T and loops.launch.calls.count("bwd") == T - 2
    assert got.keys() == want.keys()
    for k in want:
        _close(got[k], want[k], dtype, err=k, tol=SEQ_TOL)


def test_host_sequences_in_every_block_order(host_lib):
    """The whole-sequence cases of the ASan run below, in process: grids with a partial last
    block, two block orders each, equal bit for bit to each other and to the array path
    within SEQ_TOL."""
    assert cuda_emulator.run_sequences(host_lib) == 2 * 2 * len(cuda_emulator.SEQUENCE_CASES)


def test_host_launch_catches_a_kernel_that_writes_its_input(host_lib, monkeypatch):
    """The host launch compares every read argument before and after the kernel: a table
    that declares a written argument as read is caught."""
    k = table.kernel("lstm", "fwd")
    wrong = table.Kernel(k.cell, k.step, k.elem,
                         (*k.args[:-1], table.Arg(k.args[-1].name, k.args[-1].width)))
    monkeypatch.setitem(table.TABLE, ("lstm", "fwd"), wrong)
    loops = host_loops(host_lib, "float64")
    m, n = 3, 2
    A, C = np.zeros((2, m, n)), np.zeros((2, m, n))
    S, CCT, TC = np.empty((1, m, 3 * n)), np.empty((1, m, n)), np.empty((1, m, n))
    with pytest.raises(AssertionError, match="the kernel wrote its input a"):
        loops.lstm_forward(np.ones((1, m, 4 * n)), np.zeros((n, 4 * n)), A, C, S, CCT, TC, 0)


# ------------------------------------------------------------- AddressSanitizer
@pytest.fixture(scope="module")
def asan(cxx):
    """The compiler and its ASan runtime, to preload into a Python subprocess."""
    runtime = cuda_emulator.asan_runtime(cxx)
    if runtime is None:
        pytest.skip(f"{cxx} has no shared AddressSanitizer runtime (libasan.so)")
    return cxx, runtime


def _run_under_asan(runtime, lib, *extra):
    """Run cuda_emulator.py's whole sequences on ``lib`` in a Python that preloads ASan."""
    root = Path(xlstm.__file__).resolve().parent.parent
    env = {
        **os.environ,
        "LD_PRELOAD": " ".join(filter(None, [runtime, os.environ.get("LD_PRELOAD")])),
        "ASAN_OPTIONS": "detect_leaks=0",  # the interpreter's own allocations are "leaks"
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), str(TESTS_DIR),
                                                    os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run([sys.executable, str(TESTS_DIR / "cuda_emulator.py"), str(lib), *extra],
                          capture_output=True, text=True, env=env, timeout=120)


def test_asan_whole_sequences_run_clean(asan, tmp_path):
    """The generated kernels, compiled for the host with -fsanitize=address and driven
    through lstm_forward / lstm_backward by xlstm._cuda.Loops: every case, both dtypes, two
    block orders, no invalid access, the array path's results."""
    cxx, runtime = asan
    lib, _ = cuda_emulator.build(cxx, tmp_path, asan=True)
    res = _run_under_asan(runtime, lib)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "ERROR: AddressSanitizer" not in res.stderr
    count = 2 * 2 * len(cuda_emulator.SEQUENCE_CASES)
    assert f"cuda_emulator: {count} sequences match the array path" in res.stdout


BROKEN_GUARDS = {"intact": table.GUARD, "off by one": "if (e <= m * n)", "removed": "(void)m;"}


@pytest.mark.parametrize("guard", list(BROKEN_GUARDS))
def test_asan_catches_a_broken_bounds_check(asan, tmp_path, guard):
    """The same source with its bounds check broken (one element too far, or none): ASan
    reports a heap-buffer-overflow in the first launch and the run fails; intact, it passes."""
    cxx, runtime = asan
    src = _cuda.source()
    assert src.count(table.GUARD) == len(_cuda.KERNEL_NAMES)
    lib, _ = cuda_emulator.build(cxx, tmp_path, asan=True,
                                 kernels=src.replace(table.GUARD, BROKEN_GUARDS[guard]))
    res = _run_under_asan(runtime, lib, "quick")
    if guard == "intact":
        assert res.returncode == 0, res.stderr[-4000:]
        assert "sequences match the array path" in res.stdout
    else:
        assert res.returncode != 0
        assert "ERROR: AddressSanitizer: heap-buffer-overflow" in res.stderr, res.stderr[-4000:]
        assert re.search(r"in xlstm_lstm_(fwd|bwd)_f(32|64) ", res.stderr), res.stderr[-4000:]


def test_empty_grid_launches_nothing():
    """m = 0: no kernel is compiled or launched (which would need CuPy and a GPU)."""
    _cuda._launch("fwd", "float32", 0, ())
    _cuda._launch("bwd", "float64", 0, ())


def test_launch_grid_and_argument_types(monkeypatch):
    """What reaches cupy.RawKernel: enough blocks to cover the grid, sizes as int64."""
    seen = []
    monkeypatch.setattr(_cuda, "_kernel",
                        lambda cell, step, name: lambda *a: seen.append((cell, step, name, a)))
    arr = np.zeros(3, np.float32)
    _cuda.Loops("float32").launch("bwd", "float32", _cuda.BLOCK + 1, (2, 3, arr))
    ((cell, step, name, (grid, block, args)),) = seen
    assert (cell, step, name, grid, block) == ("lstm", "bwd", "float32", (2,), (_cuda.BLOCK,))
    assert [type(a) for a in args] == [np.int64, np.int64, np.ndarray] and args[2] is arr


def test_dispatch_without_cupy(monkeypatch):
    """numpy never gets the CUDA loops; CuPy would, unless XLSTM_ACCEL=0."""
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    assert not isinstance(_engine.accelerated_loops(NP, NP.float32), _cuda.Loops)


def test_source_inlines_the_header():
    src = _cuda.source()
    assert src == _cuda.source("lstm") == table.source("lstm")
    assert '#include "' not in src
    assert (PKG_DIR / table.HEADERS["lstm"]).read_text(encoding="utf-8").rstrip() in src
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
    for cell in table.cells():
        src = tmp_path / f"xlstm_{cell}.cu"
        src.write_text(_cuda.source(cell), encoding="utf-8")
        cmd = [nvcc, "-arch=sm_90", "--fmad=false", "-Werror", "all-warnings",
               "-c", "-o", str(tmp_path / "k.o"), str(src)]
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


@pytest.mark.parametrize("cell", table.cells())
def test_nvrtc_compiles_inlined_source(cell):
    """What CuPy does at run time: NVRTC (no system headers) on :func:`_cuda.source`."""
    nvrtc = _find_nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc is not installed (system CUDA or the nvidia-cuda-nvrtc wheel)")
    prog = ctypes.c_void_p()
    src = _cuda.source(cell).encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, f"xlstm_{cell}.cu".encode(), 0,
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
        rows = [k for (c, _), k in table.TABLE.items() if c == cell]
        for name in (k.name(d) for k in rows for d in table.DTYPES):
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
