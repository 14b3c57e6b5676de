"""The compiled CPU loops (numba, optional) give bit-for-bit the array path's results."""

from __future__ import annotations

import os
import subprocess
import sys

import array_api_compat
import numpy as np
import pytest
from helpers import spy_on_loops, time_limit
from oracles import random_case

import xlstm
from xlstm.engine import loop as _engine

pytest.importorskip("numba", reason="numba is not installed (pip install xlstm-array-api[cpu])")
from xlstm.accel.cpu import cache as _cache  # needs numba
from xlstm.accel.cpu import loops as _cpu
from xlstm.accel.cpu import replay as _replay

NP = array_api_compat.array_namespace(np.zeros(1))
DTYPES = (np.float32, np.float64)


def _run(monkeypatch, accel, x, a0, p, c0, da):
    """Everything the sequence API computes, on the compiled loops or the array path."""
    monkeypatch.setenv("XLSTM_ACCEL", accel)
    a, y, c, caches = xlstm.lstm_forward(x, a0, p, c0)
    out = {"a": a, "y": y, "c": c}
    out.update({f"state.{k}": getattr(caches.state, k) for k in ("A", "C", "S", "CCT", "TC")})
    out.update(xlstm.lstm_backward(da, caches))
    for k, v in zip("ayc", xlstm.lstm_forward(x, a0, p, c0, return_caches=False)[:3]):
        out["inference " + k] = v
    return out


def _assert_identical(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k, strict=True)


def test_dispatch(monkeypatch):
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    assert isinstance(_engine.accelerated_loops(NP, NP.float32), _cpu.Loops)
    assert isinstance(_engine.accelerated_loops(NP, NP.float64), _cpu.Loops)
    monkeypatch.setenv("XLSTM_ACCEL", "0")
    assert _engine.accelerated_loops(NP, NP.float64) is None
    monkeypatch.delenv("XLSTM_ACCEL")
    strict = pytest.importorskip("array_api_strict")
    assert _engine.accelerated_loops(strict, strict.float64) is None


def test_sequence_calls_run_the_compiled_loops(monkeypatch):
    """A spy on both loops: lstm_forward and lstm_backward on numpy really take them."""
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    calls = spy_on_loops(monkeypatch, _cpu.Loops)
    x, a0, _, p = random_case(0, 3, 4, 3, 2, 5)
    _, _, _, caches = xlstm.lstm_forward(x, a0, p)
    xlstm.lstm_backward(np.ones((4, 2, 5)), caches)
    assert calls == ["forward", "backward"]


@pytest.mark.parametrize("whole", [True, False], ids=["whole-loop", "python-replay"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n_x", "n_a", "m", "T", "T_da", "chunk_rows"),
    [
        (3, 5, 4, 7, 7, 4096),  # one chunk
        (4, 6, 3, 9, 5, 4096),  # T_da < T_x
        (2, 3, 1, 1, 1, 4096),  # one sample, one step
        (5, 7, 4, 11, 10, 8),  # chunks of 2 steps, a short last chunk
        (6, 9, 2, 5, 5, 1),  # chunks of one step
    ],
)
def test_bit_identical_to_the_array_path(monkeypatch, dtype, n_x, n_a, m, T, T_da, chunk_rows,
                                        whole):
    """Both ways of running a recorded step: the compiled whole-time loop, and the Python
    replay, which runs where some call of a step has no compiled twin."""
    monkeypatch.setattr(_engine, "CHUNK_ROWS", chunk_rows)
    monkeypatch.setattr(_cpu.Loops, "whole", whole)
    rng = np.random.default_rng(T * 100 + n_a)
    x, a0, c0, p = random_case(rng, n_x, n_a, 3, m, T, dtype=dtype)
    da = rng.standard_normal((n_a, m, T_da)).astype(dtype)
    _assert_identical(_run(monkeypatch, "1", x, a0, p, c0, da),
                      _run(monkeypatch, "0", x, a0, p, c0, da))


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_gates_bit_identical(monkeypatch, dtype):
    """Pre-activations of order 1e6 (gates exactly 0 or 1) and a cell state that grows: the
    first two units have f = i = 1 and cct = 1, so their c gains 1 at every step."""
    rng = np.random.default_rng(5)
    x, a0, c0, p = random_case(rng, 4, 5, 3, 3, 6, scale=1e3, x_scale=1e3, dtype=dtype)
    for k in ("bf", "bi", "bc"):
        p[k] = p[k].copy()
        p[k][:2] = 1e9  # beyond what the large weighted inputs (~1e7) can pull back
    da = rng.standard_normal((5, 3, 6)).astype(dtype)
    got = _run(monkeypatch, "1", x, a0, p, c0, da)
    assert all(np.all(np.isfinite(v)) for v in got.values())
    grown = c0[:2]
    for t in range(6):  # c_t = 1 * c_{t-1} + 1 * 1, rounded in the dtype at every step
        grown = grown + dtype(1)
        np.testing.assert_array_equal(got["c"][:2, :, t], grown)
    _assert_identical(got, _run(monkeypatch, "0", x, a0, p, c0, da))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(monkeypatch, dtype):
    """Views with odd strides (reversed, every other step, Fortran order) read correctly."""
    rng = np.random.default_rng(6)
    x, a0, c0, p = random_case(rng, 3, 4, 3, 5, 12, dtype=dtype)
    big_da = rng.standard_normal((4, 5, 12)).astype(dtype)
    views = {"x": x[:, ::-1, ::2], "a0": np.asfortranarray(a0), "c0": c0[:, ::-1],
             "da": big_da[:, ::-1, ::2]}
    copies = {k: np.ascontiguousarray(v) for k, v in views.items()}
    p_f = {k: np.asfortranarray(v) for k, v in p.items()}
    got = _run(monkeypatch, "1", views["x"], views["a0"], p_f, views["c0"], views["da"])
    _assert_identical(got, _run(monkeypatch, "0", copies["x"], copies["a0"], p,
                                copies["c0"], copies["da"]))


def test_inputs_are_not_modified(monkeypatch):
    rng = np.random.default_rng(7)
    x, a0, c0, p = random_case(rng, 3, 4, 3, 2, 6, dtype=np.float32)
    da = rng.standard_normal((4, 2, 6)).astype(np.float32)
    before = {k: v.copy() for k, v in {**p, "x": x, "a0": a0, "c0": c0, "da": da}.items()}
    _run(monkeypatch, "1", x, a0, p, c0, da)
    for k, v in {**p, "x": x, "a0": a0, "c0": c0, "da": da}.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_importing_xlstm_does_not_import_numba():
    code = "import sys, xlstm; assert 'numba' not in sys.modules, 'numba imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_works_where_no_cache_folder_is_writable():
    """numba refuses ``cache=True`` when it finds no writable folder; the loops then compile
    in memory instead of failing the import."""
    code = (
        "import numba.core.caching as c\n"
        "def deny(self):\n"
        "    raise PermissionError('read-only')\n"
        "for cls in c.CacheImpl._locator_classes:\n"
        "    cls.ensure_cache_path = deny\n"
        "import os, numpy as np, xlstm\n"
        "from xlstm.accel.cpu import loops as _cpu\n"
        "p = xlstm.init_params(2, 3, 2, seed=0)\n"
        "x, a0 = np.ones((2, 4, 3)), np.zeros((3, 4))\n"
        "a = xlstm.lstm_forward(x, a0, p)[0]\n"
        "os.environ['XLSTM_ACCEL'] = '0'\n"
        "assert (a == xlstm.lstm_forward(x, a0, p)[0]).all()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_numba_that_does_not_load_leaves_the_array_path(tmp_path):
    """A numba built for another numpy refuses to import ("Numba needs NumPy 2.3 or
    less"); the calls then run on the array path with the same results, and ``xlstm
    info`` says why the loops are off."""
    fake = tmp_path / "numba"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('Numba needs NumPy 0.1 or less')\n")
    code = (
        "import os, sys, warnings, numpy as np, xlstm\n"
        "from xlstm.engine import loop as _engine\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    assert _engine.accelerated_loops(xlstm._lib.compat.default_namespace(),\n"
        "                                     np.float64) is None\n"
        "    _engine.accelerated_loops(xlstm._lib.compat.default_namespace(), np.float64)\n"
        "assert [str(w.message) for w in seen] == [\n"
        "    \"xlstm's compiled CPU loops are off (numba does not load: Numba needs NumPy 0.1\"\n"
        "    ' or less); numpy runs the array path, with the same results'], seen\n"
        "assert 'numba does not load: Numba needs NumPy 0.1' in _engine.cpu_loops_module()[1]\n"
        "p = xlstm.init_params(2, 3, 2, seed=0)\n"
        "x, a0 = np.ones((2, 4, 3)), np.zeros((3, 4))\n"
        "a = xlstm.lstm_forward(x, a0, p)[0]\n"
        "assert 'xlstm.accel.cpu.loops' not in sys.modules\n"
        "os.environ['XLSTM_ACCEL'] = '0'\n"
        "assert (a == xlstm.lstm_forward(x, a0, p)[0]).all()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLSTM_ACCEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *sys.path])
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    info = subprocess.run([sys.executable, "-m", "xlstm", "info"], env=env, text=True,
                          capture_output=True, check=True).stdout
    assert "compiled CPU loops: off (numba does not load" in info


# -------------------------------------------------------------- the compiled whole loop
def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_matmul_makes_numpys_calls(dtype):
    """Every orientation numpy sends to BLAS as it is (gemm with either operand or the
    output transposed, gemv for a single row or column) gives ``numpy.matmul``'s bits;
    the cases it does not make (a dot, a copy first) are refused, not approximated."""
    from xlstm.accel.cpu import native as _native

    lead = _native.blas(dtype)
    if lead is None:
        pytest.skip("numpy's BLAS is not reachable here (the loops stay in Python)")
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    cases = [(r(6, 40), r(40, 33)), (r(40, 6).T, r(40, 33)), (r(6, 40), r(33, 40).T),
             (r(1, 40), r(40, 33)), (r(6, 40), r(40, 1)), (r(64, 64), r(64, 256)),
             (r(6, 80)[:, ::2], r(40, 33))]  # the last: strided rows, numpy copies
    ran = 0
    for a, b in cases:
        for out in (np.empty((a.shape[0], b.shape[1]), dtype),
                    np.empty((b.shape[1], a.shape[0]), dtype).T):
            if not _native.matmul_supported(a, b, out):
                assert a.strides[1] != a.itemsize  # only the copying case is refused
                continue
            _native.matmul(*lead, a, b, out)
            want = np.matmul(a, b, out=np.empty_like(out))  # the same layout
            np.testing.assert_array_equal(_bits(out), _bits(want))
            ran += 1
    assert ran == 12
    assert not _native.matmul_supported(r(6, 1), r(1, 5), np.empty((6, 5), dtype))  # a dot
    shared = np.empty((8, 8), dtype)
    assert not _native.matmul_supported(shared, shared, shared)  # numpy copies first


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_ufuncs_are_numpys_loops(dtype):
    """tanh, sign, add, multiply and maximum by their numpy inner loops: on whole arrays,
    column windows, one broadcast row and a number, bit for bit, non-finite values too;
    add also on transposed operands (correctly rounded: every loop gives the same bits)."""
    from xlstm.accel.cpu import native as _native

    rng = np.random.default_rng(1)
    wide = (rng.standard_normal((7, 90)) * 30).astype(dtype)
    wide[0, :4] = [np.inf, -np.inf, np.nan, -0.0]
    x, win, row = wide[:, :45], wide[:, 17:62], wide[:1, 45:]
    for uf in (np.tanh, np.sign):
        call, lead = _native.ufunc_loop(uf, dtype)
        for v in (x, win):
            assert _native.ufunc_supported(np.dtype(dtype), v, np.empty_like(x))
            out = np.empty(v.shape, dtype)
            call(*lead, v, out)
            np.testing.assert_array_equal(_bits(out), _bits(uf(v)))
    for uf in (np.add, np.multiply, np.maximum):
        for y in (win, row, dtype(0.5)):
            scalar = not isinstance(y, np.ndarray)
            call, lead = _native.ufunc_loop(uf, dtype, scalar)
            out = np.empty(x.shape, dtype)
            call(*lead, x, y, out)
            np.testing.assert_array_equal(_bits(out), _bits(uf(x, y)))
    call, lead = _native.ufunc_loop(np.add, dtype)
    xt = np.asfortranarray(x)
    assert not _native.ufunc_supported(np.dtype(dtype), xt, x, x.copy())
    assert _native.ufunc_supported(np.dtype(dtype), xt, x, x.copy(), exact=True)
    out = np.empty(x.shape, dtype)
    call(*lead, xt, x, out)
    np.testing.assert_array_equal(_bits(out), _bits(xt + x))


def test_whole_loops_run_and_are_cached_on_disk(tmp_path):
    """The recorded steps of every cell run as compiled whole loops, whose generated
    modules land in XLSTM_CACHE_DIR; a second process loads them instead of compiling."""
    from pathlib import Path

    script = (
        "import time, numpy as np, xlstm\n"
        "from xlstm.accel.cpu import loops as _cpu\n"
        "t = time.perf_counter()\n"
        "for cls in (xlstm.LSTM, xlstm.GRU, xlstm.RNN):\n"
        "    model = cls(3, 4, dtype='float32', seed=0)\n"
        "    y, _, cache = model.forward(np.ones((3, 2, 5), np.float32))\n"
        "    model.backward(np.ones_like(y), cache)\n"
        "reps = list(_cpu.loops(np.float32)._replays.values())\n"
        "assert len(reps) == 6 and all(r.whole is not None for r in reps), reps\n"
        "print(time.perf_counter() - t)\n"
    )
    env = {**os.environ, "XLSTM_CACHE_DIR": str(tmp_path), "XLSTM_ACCEL": "1"}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, check=False) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    assert len(list(Path(tmp_path).glob("xlstm_whole_loop_*.py"))) == 6
    assert list((Path(tmp_path) / "__pycache__").glob("xlstm_whole_loop_*.nbi"))


def test_threads_compile_the_loops_one_at_a_time(tmp_path):
    """Four threads of a fresh process run a model at once (as Dask's threaded scheduler
    does), each compiling the same generated modules: every result equals the same model
    run alone. Before the modules were compiled under a lock, threads met a module half
    written or half imported (numba: "name 'f0' is not defined", or no attribute
    'kernel') in 4 of 6 fresh processes."""
    script = (
        "import numpy as np, xlstm\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "model = xlstm.LSTM(3, 5, num_layers=2, bidirectional=True, seed=1, dtype='float64')\n"
        "x = np.random.default_rng(0).standard_normal((3, 12, 7))\n"
        "def run(i):\n"
        "    return model.forward(x[:, i:i + 3], return_cache=False)[0]\n"
        "with ThreadPoolExecutor(4) as ex:\n"
        "    got = list(ex.map(run, range(0, 12, 3)))\n"
        "assert all(np.array_equal(g, run(i)) for g, i in zip(got, range(0, 12, 3)))\n"
    )
    env = {**os.environ, "XLSTM_CACHE_DIR": str(tmp_path), "XLSTM_ACCEL": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=False, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


_CACHE_SCRIPT = """
import numpy as np, xlstm
from helpers import spy_on_loops
from oracles import random_case
x, a0, _, p = random_case(0, 3, 4, 3, 2, 5)
_, _, _, caches = xlstm.lstm_forward(x, a0, p)
fast = xlstm.lstm_backward(np.ones((4, 2, 5)), caches)
with xlstm.accelerators(False):
    _, _, _, caches = xlstm.lstm_forward(x, a0, p)
    plain = xlstm.lstm_backward(np.ones((4, 2, 5)), caches)
assert all(np.array_equal(fast[k], plain[k]) for k in plain)
from xlstm.accel.cpu import codegen
print(codegen.map_kernel.cache_info().currsize)
"""


@pytest.mark.parametrize("where", ["folder", "unwritable"])
def test_point_loops_are_cached_on_disk_or_compiled_in_memory(tmp_path, where):
    """The generated point loops land in XLSTM_CACHE_DIR with numba's cache beside them;
    where that cannot be written (here: the path is a file), they compile in memory and the
    results are the same."""
    from pathlib import Path

    cache = tmp_path / "cache"
    if where == "unwritable":
        cache.write_text("not a folder")
    env = {**os.environ, "XLSTM_CACHE_DIR": str(cache), "XLSTM_ACCEL": "1"}
    tests = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join([tests, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], env=env, capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[-1]) >= 2  # the LSTM's forward and backward point loops
    if where == "folder":
        modules = sorted(cache.glob("xlstm_point_loop_*.py"))
        assert len(modules) >= 2
        assert list((cache / "__pycache__").glob("xlstm_point_loop_*.nbi"))
    else:
        assert cache.read_text() == "not a folder"


def test_point_loops_compile_the_point_functions_they_call():
    """A point function may call others of its module; the loop's cache name hashes their
    sources too, so that editing a called function cannot meet a stale cache."""
    pytest.importorskip("numba")
    from xlstm.accel.cpu import codegen
    from xlstm.cells import lstm

    assert codegen._helpers(lstm.backward_step_from_saved) == [
        lstm.backward_coefficients, lstm.backward_step]
    assert codegen._helpers(lstm.backward_step) == []


# ------------------------------------------------------- a broken cache never breaks a call
def _fresh_loops(monkeypatch):
    """New loops objects and a process that has seen no failure, for the rest of a test."""
    import functools

    monkeypatch.setattr(_cpu, "_loops", functools.cache(_cpu.Loops))
    monkeypatch.setattr(_cache, "_FAILURES", [])
    monkeypatch.setattr(_cache, "_IN_MEMORY", False)
    monkeypatch.setattr(_cache, "_DISABLED", False)


def test_a_generated_module_runs_only_as_its_name_says(tmp_path, monkeypatch):
    """A generated module is named by the hash of its text; what is found under that name
    runs only if it is that text: an edited, emptied, garbled or undecodable file, or a
    FIFO in its place, is written anew (without hanging), and the right code runs."""
    monkeypatch.setenv("XLSTM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_cache, "_IN_MEMORY", False)
    src = "def f(x):\n    return x + 1\n"

    def load():
        for name in [k for k in sys.modules if k.startswith("xlstm_probe_")]:
            monkeypatch.delitem(sys.modules, name)
        with time_limit(60):
            return _cache.compiled_module("probe", src, "f", {})

    assert load()(1) == 2
    (path,) = tmp_path.glob("xlstm_probe_*.py")
    good = path.read_bytes()
    assert path.stem == "xlstm_probe_" + _cache.digest(good.decode())
    for bad in (b"", b"def f(x):\n    return x + 2\n", b"def f(x:\n", b"\xff\xfe\x00junk",
                good[:-3]):
        path.write_bytes(bad)
        assert load()(1) == 2, bad
        assert path.read_bytes() == good, bad
    path.unlink()
    os.mkfifo(path)
    assert load()(1) == 2
    assert path.read_bytes() == good


def _flaky_whole_loops(monkeypatch, exc, times):
    """Make the first ``times`` calls of compiled whole loops raise ``exc``, as numba does
    when it cannot load, compile or write a loop's cache at its first call; returns the
    list of the calls that did run."""
    real, ran, failed = _replay._whole_loop, [], []

    def flaky(source, twins):
        fn = real(source, twins)

        def call(*args):
            if len(failed) < times:
                failed.append(exc)
                raise exc
            ran.append(source)
            return fn(*args)

        return call

    monkeypatch.setattr(_replay, "_whole_loop", flaky)
    return ran


@pytest.mark.parametrize("exc", [
    OSError(28, "No space left on device"),  # numba's cache writer on a full disk
    AttributeError("module 'xlstm_whole_loop_0' has no attribute 'loop'"),
    SyntaxError("invalid syntax"),
    __import__("pickle").UnpicklingError("invalid load key, 'g'."),  # a corrupt index
], ids=["ENOSPC", "AttributeError", "SyntaxError", "UnpicklingError"])
def test_a_failing_compiled_loop_falls_back_with_one_warning(monkeypatch, exc):
    """Whatever fails in the compiled route at a loop's first call, the call gives the
    array path's results with one warning, and the next call runs compiled again."""
    _fresh_loops(monkeypatch)
    ran = _flaky_whole_loops(monkeypatch, exc, times=1)
    x, a0, _, p = random_case(0, 3, 4, 3, 2, 5)
    c0, da = np.zeros((4, 2)), np.ones((4, 2, 5))
    want = _run(monkeypatch, "0", x, a0, p, c0, da)
    with pytest.warns(RuntimeWarning, match="compiled CPU loops failed") as rec:
        got = _run(monkeypatch, "1", x, a0, p, c0, da)
    assert len(rec) == 1, [str(r.message) for r in rec]
    assert type(exc).__name__ in str(rec[0].message)
    _assert_identical(got, want)
    assert _cache._IN_MEMORY and not _cache._DISABLED
    ran.clear()
    _assert_identical(_run(monkeypatch, "1", x, a0, p, c0, da), want)  # no warning
    assert ran  # the compiled whole loops ran


def test_loops_that_fail_twice_stay_off(monkeypatch):
    """A second failure in a process turns the compiled loops off for the rest of it (one
    more warning that says so); the array path then runs, with no warning."""
    _fresh_loops(monkeypatch)
    _flaky_whole_loops(monkeypatch, OSError(28, "No space left on device"), times=10**9)
    x, a0, _, p = random_case(1, 3, 4, 3, 2, 5)
    c0, da = np.zeros((4, 2)), np.ones((4, 2, 5))
    want = _run(monkeypatch, "0", x, a0, p, c0, da)
    with pytest.warns(RuntimeWarning, match="compiles them again") as first:
        monkeypatch.setenv("XLSTM_ACCEL", "1")
        xlstm.lstm_forward(x, a0, p, c0)
    with pytest.warns(RuntimeWarning, match="off for the rest of this process") as second:
        xlstm.lstm_forward(x, a0, p, c0)
    assert len(first) == len(second) == 1
    assert _cpu.loops(np.float64) is None
    assert _engine.accelerated_loops(NP, NP.float64) is None
    _assert_identical(_run(monkeypatch, "1", x, a0, p, c0, da), want)  # no warning


_FAULT_SCRIPT = """
import json, sys, warnings
import numpy as np, xlstm
if sys.argv[1] == "full":  # numba's cache writer on a full disk
    import errno
    from numba.core import caching
    def full(self, name, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    caching.IndexDataCacheFile._save_data = full
model = xlstm.RNN(3, 4, dtype="float32", seed=0)  # the cell that compiles fastest
x = np.random.default_rng(0).standard_normal((3, 2, 5)).astype(np.float32)
def run():
    y, state, cache = model.forward(x)
    return [y, *state, *model.backward(np.ones_like(y), cache)[:2]]
with xlstm.accelerators(False):
    want = run()
calls = []
for _ in range(2):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = run()
    calls.append({"warnings": [str(w.message) for w in rec],
                  "same": all(np.array_equal(a, b) for a, b in zip(got, want))})
print(json.dumps(calls))
"""


def _run_faulty(cache, mode="plain"):
    import json

    env = {**os.environ, "XLSTM_CACHE_DIR": str(cache), "XLSTM_ACCEL": "1"}
    res = subprocess.run([sys.executable, "-c", _FAULT_SCRIPT, mode], env=env,
                         capture_output=True, text=True, check=False, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


def test_a_broken_cache_on_disk_heals_itself(tmp_path):
    """numba's index and data files garbled, generated modules emptied, edited and
    garbled: the next process gives the array path's results with one warning (the index)
    and removes what is broken; the process after it runs with no warning and writes the
    cache anew, its modules back to what their names say."""
    cache = tmp_path / "cache"
    assert all(c["same"] and not c["warnings"] for c in _run_faulty(cache))
    modules = {p: p.read_bytes() for p in cache.glob("xlstm_*.py")}
    indexes = sorted((cache / "__pycache__").glob("xlstm_*.nbi"))
    assert len(modules) >= 4 and len(indexes) == len(modules)
    for p in indexes:
        p.write_bytes(b"garbage")
    for p in (cache / "__pycache__").glob("xlstm_*.nbc"):
        p.write_bytes(b"\x80\x04garbage")
    for p, text in zip(sorted(modules), [b"", b"def loop(:\n", b"kernel = None\n"]):
        p.write_bytes(text)
    first, second = _run_faulty(cache)
    assert first["same"] and len(first["warnings"]) == 1, first
    assert "broken cache file" in first["warnings"][0]
    assert second == {"warnings": [], "same": True}
    assert all(c["same"] and not c["warnings"] for c in _run_faulty(cache))
    assert {p: p.read_bytes() for p in cache.glob("xlstm_*.py")} == modules
    assert len(list((cache / "__pycache__").glob("xlstm_*.nbi"))) == len(indexes)


def test_a_full_disk_falls_back_with_one_warning(tmp_path):
    """numba cannot write its cache (errno 28): one warning, the array path's results,
    and the next call of the process runs compiled in memory with no warning."""
    first, second = _run_faulty(tmp_path / "cache", "full")
    assert first["same"] and len(first["warnings"]) == 1, first
    assert "No space left on device" in first["warnings"][0]
    assert second == {"warnings": [], "same": True}


def test_an_error_of_the_call_itself_is_not_blamed_on_the_compiled_loops(monkeypatch):
    """An error that the route with nothing compiled raises too is the call's own (numpy
    set to raise, say): it propagates as it is, with no warning, and nothing counts as a
    failure of the loops (their cache is left alone)."""
    _fresh_loops(monkeypatch)
    monkeypatch.setenv("XLSTM_ACCEL", "1")

    def tanh(self, x, out):
        raise FloatingPointError("overflow encountered in tanh")

    monkeypatch.setattr(_cpu.BufferOps, "tanh", tanh)
    x, a0, _, p = random_case(2, 3, 4, 3, 2, 5)
    with pytest.raises(FloatingPointError, match="overflow encountered in tanh"):
        xlstm.lstm_forward(x, a0, p)
    assert _cache._FAILURES == [] and not _cache._IN_MEMORY


def test_a_cache_folder_that_anyone_may_write_is_not_used(tmp_path, monkeypatch):
    """numba's machine code in the cache is loaded as it is: a folder that anyone may write
    in is not used (the loop compiles in memory, with the same results)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("XLSTM_CACHE_DIR", str(shared))
    monkeypatch.setattr(_cache, "_IN_MEMORY", False)
    f = _cache.compiled_module("probe_shared", "def f(x):\n    return x * 3\n", "f", {})
    assert f(2) == 6
    assert list(shared.iterdir()) == []


def test_a_numba_that_fails_to_load_in_any_way_leaves_the_array_path(tmp_path):
    """Not only ImportError: a numba whose import raises anything (a broken llvmlite, an
    OSError) makes xlstm.accel.cpu.loops raise ImportError, which the registry takes as "no compiled
    loops": results come from the array path."""
    (tmp_path / "numba").mkdir()
    (tmp_path / "numba" / "__init__.py").write_text("raise OSError('libllvmlite.so: bad ELF')\n")
    code = ("import numpy as np, xlstm\n"
            "from xlstm.accel import registry as _accel\n"
            "module, why = _accel.cpu_loops_module()\n"
            "assert module is None and 'bad ELF' in why, why\n"
            "m = xlstm.LSTM(3, 4, seed=0, dtype='float64')\n"
            "print(m.forward(np.ones((3, 2, 5)))[0].shape)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path),
                                                        os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=False, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
