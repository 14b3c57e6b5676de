"""The fused CUDA kernels of :mod:`xlstm.accel.cuda`.

* Table tests: the kernels are declared once (:mod:`xlstm.accel.cuda.kernels`); the generated
  source, the names, the header's element functions and the argument checks agree with it.
* Host tests (everywhere a C++ compiler is): the generated kernel source, the very text that
  NVRTC compiles, built for the host behind ``cuda_host/grid_emulator.h`` (every block and
  thread of the grid as host loops, blocks in shuffled order, small blocks so that the last
  one is partial), one library per cell. The module's own :class:`xlstm.accel.cuda.Loops` drive
  it on numpy arrays (``mod=numpy`` and a host ``launch``), step by step and for whole
  sequences of every cell through the public API, against the array path. Under
  AddressSanitizer (in a subprocess that preloads the ASan runtime) the same whole sequences
  run clean, and a broken bounds check is reported as a heap-buffer-overflow.
* Compile tests: the generated source with nvcc for sm_90, and with NVRTC as CuPy does,
  where those are installed. The host builds and the nvcc build take every flag of
  ``.ci/compile_cuda.sh`` (warnings as errors, ``-Wpedantic`` and the host compiler's
  ``-Wall,-Wextra`` under nvcc) and make its PTX check, so CI runs that script no more.
* GPU tests (``-m gpu``, need CuPy and a CUDA device): the kernels against the CuPy array
  path, for whole sequences of every cell.
"""

from __future__ import annotations

import concurrent.futures
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

import xlstm
from xlstm.accel import cuda as _cuda
from xlstm.accel.cuda import kernels as table
from xlstm.cells import CELLS
from xlstm.cells.base import NO_OUT, array_ops
from xlstm.cells.lstm import LSTM_CELL
from xlstm.engine import loop as _engine

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
    assert set(table.cells()) == set(table.HEADERS) == set(CELLS)
    # fwd and bwd, each plain and masked (padded batches), each in two dtypes
    assert len(_cuda.KERNEL_NAMES) == 2 * 2 * 2 * len(CELLS)
    assert _cuda.KERNEL_NAMES["lstm", "fwd", "float32"] == "xlstm_lstm_fwd_f32"
    assert _cuda.KERNEL_NAMES["rnn_relu", "bwd", "float64"] == "xlstm_rnn_relu_bwd_f64"
    assert _cuda.KERNEL_NAMES["gru", "bwd_masked", "float32"] == "xlstm_gru_bwd_masked_f32"
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
    assert _elem_params(k.cell, k.elem) == [(a.name, a.out) for a in k.elem_args()]


@pytest.mark.parametrize("cell", list(CELLS))
def test_every_row_has_its_padded_batch_variant(cell):
    """The masked rows are generated from the written ones: the same arguments in the same
    order, then the mask, and what the masked body needs (forward: the state before the
    step where the row has none; backward: hold, and da_rec and hold written in place)."""
    for step in ("fwd", "bwd"):
        k, v = table.TABLE[cell, step], table.TABLE[cell, step + "_masked"]
        assert (v.masked, v.step, v.elem) == (True, step, k.elem) and not k.masked
        assert v.args[: len(k.args)] == k.args and v.elem_args() == k.args
        extra = v.args[len(k.args):]
        assert extra[0] == table.Arg("active", 1, src="active", mask=True, elem=False)
        if step == "bwd":
            assert [(a.name, a.src, a.out, a.alias) for a in extra[1:]] == [
                ("hold", "hold", False, None), ("da_rec_sum", "da_rec", True, "da_rec"),
                ("hold_next", "hold", True, "hold")]
        else:
            reads = {a.src for a in v.args if not a.out}
            assert {a.src[:-5] + "[t]" for a in k.args if a.src.endswith("[t+1]")} <= reads
        with pytest.raises(ValueError, match="already the masked variant"):
            table.masked(v)
    wrong = table.Kernel(cell, "bwd", "x", (table.Arg("da_rec", 1, src="da_rec"),
                                           table.Arg("y", 1, out=True, src="Y")))
    with pytest.raises(ValueError, match="no padded-row value for output y"):
        table.masked(wrong)


def test_generated_kernels_restrict_all_but_aliases():
    src = table.source("lstm")
    bwd = src[src.index("void xlstm_lstm_bwd_f64("):]
    bwd = bwd[: bwd.index(")")]
    assert "const double* dc," in bwd and "double* dc_prev" in bwd
    assert bwd.count("__restrict__") == len(table.kernel("lstm", "bwd").args) - 2
    assert "__restrict__" not in table.host_source("lstm", kernels="")


def _args_for(k, m, n, dtype="float64"):
    return [np.zeros((1 if a.row else m, a.width * n), dtype) for a in k.args]


def _one_slice(arrays):
    """Per-step arguments of single slices: ``array, 1, 0`` each."""
    return [v for arr in arrays for v in (arr, 1, 0)]


def test_check_args_rejects_what_a_kernel_cannot_take():
    """A per-step launch: sizes and step, then each argument as a stack with its length and
    base; two arguments share memory only as one stack at different slices, or as the very
    same slice where the table lets one be the other."""
    k = table.kernel("lstm", "bwd")
    m, n = 3, 2

    def check(arrays, sizes=(m, n, 0), tail=None):
        table.check_args(k, "float64", (*sizes, *(_one_slice(arrays) if tail is None else tail)))

    arrays = _args_for(k, m, n)
    check(arrays)
    arrays[-1] = arrays[2]  # dc_prev is dc: allowed
    check(arrays)
    bad = {
        "m, n and step must be Python ints": dict(arrays=_args_for(k, m, n),
                                                  sizes=(np.int64(m), n, 0)),
        "8 stacks for 9": dict(arrays=_args_for(k, m, n)[:-1]),
        "dg has shape": dict(arrays=[*_args_for(k, m, n)[:-2], np.zeros((m, 3 * n)),
                                     np.zeros((m, n))]),
        "s is float32": dict(arrays=[*_args_for(k, m, n)[:3], np.zeros((m, 3 * n), np.float32),
                                     *_args_for(k, m, n)[4:]]),
        "da is not C-contiguous": dict(arrays=[np.zeros((n, m)).T, *_args_for(k, m, n)[1:]]),
        "da is one slice, not a stack": dict(arrays=None, tail=[
            np.zeros((m, n)), 2, 0, *_one_slice(_args_for(k, m, n)[1:])]),
        "da's length and base must be Python ints": dict(arrays=None, tail=[
            np.zeros((2, m, n)), 2, -1, *_one_slice(_args_for(k, m, n)[1:])]),
    }
    for message, change in bad.items():
        with pytest.raises(AssertionError, match=message):
            check(**change)
    shared = _args_for(k, m, n)
    shared[1] = shared[0]  # da_rec is da: not allowed
    with pytest.raises(AssertionError, match="da_rec and da share memory"):
        check(shared)
    gru = table.kernel("gru", "fwd")
    table.check_args(gru, "float64", (m, n, 0, *_one_slice(_args_for(gru, m, n))))
    rows = _args_for(gru, m, n)
    rows[2] = np.zeros((m, 3 * n))  # ba is one row, read by every row
    with pytest.raises(AssertionError, match=r"ba has shape \(3, 6\)"):
        table.check_args(gru, "float64", (m, n, 0, *_one_slice(rows)))
    stack = np.zeros((2 * m + 1, n))
    partial = _args_for(k, m, n)
    partial[2], partial[-1] = stack[:m], stack[1 : m + 1]  # dc_prev overlaps dc, shifted
    with pytest.raises(AssertionError, match="dc_prev and dc share memory"):
        check(partial)
    # one stack, read at slice t and written at t + 1 (the forward's states): allowed at
    # every step; at the same slice only where the table lets one argument be the other
    f = table.kernel("lstm", "fwd_masked")
    T = 3
    stacks = {"gx": (T, 4), "ga": (None, 4), "c_prev": (T + 1, 1), "s": (T, 3),
              "cct": (T, 1), "c": (T + 1, 1), "tc": (T, 1), "a": (T + 1, 1),
              "active": (T, 1), "a_prev": (T + 1, 1)}
    arrays = {name: np.zeros(((length,) if length else ()) + (m, width * n))
              for name, (length, width) in stacks.items() if name not in ("c", "a_prev")}
    arrays["active"] = np.zeros((T, m, 1), bool)
    arrays["c"], arrays["a_prev"] = arrays["c_prev"], arrays["a"]
    bases = {"c_prev": 0, "c": 1, "a_prev": 0, "a": 1}

    def tail(**base):
        return [v for a in f.args for v in (arrays[a.name], arrays[a.name].shape[0]
                                            if arrays[a.name].ndim == 3 else 1,
                                            {**bases, **base}.get(a.name, 0))]

    for step in range(T):
        table.check_args(f, "float64", (m, n, step, *tail()))
    with pytest.raises(AssertionError, match="c and c_prev share memory"):
        table.check_args(f, "float64", (m, n, 0, *tail(c=0)))  # c written over c_prev


def test_table_sources_are_the_cells_buffers():
    """Every argument's source is a buffer the loops have for its cell, of the argument's
    width; each forward kernel writes every new state and every saved stack, each backward
    kernel every gradient the engine reads back (dGx, dGa where it is apart, the other
    states' carried gradients, the direct term where it reads one)."""
    for (name, _), k in table.TABLE.items():
        cell = CELLS[name]
        first, *others = cell.state_names
        if k.step == "fwd":
            widths = {"gx": cell.n_gates, "ga": cell.n_gates, "ba": cell.n_gates,
                      **{f"{s}[t]": 1 for s in cell.state_names},
                      **{f"{s}[t+1]": 1 for s in cell.state_names}, **cell.saved}
            must_write = {f"{s}[t+1]" for s in cell.state_names} | set(cell.saved)
        else:
            widths = {"da": 1, "da_rec": 1, "direct": 1, "dGx": cell.n_gates,
                      "dGa": cell.n_gates, **{f"{s}[t]": 1 for s in cell.state_names},
                      **{"d" + s: 1 for s in others}, **cell.saved}
            must_write = {"dGx", *("d" + s for s in others)} | ({"dGa"} if cell.split else set())
            if any(a.src == "direct" for a in k.args):
                must_write.add("direct")
        if k.masked:
            widths.update(active=1, hold=1)
            if k.step == "bwd":
                must_write |= {"hold", "da_rec"}
        assert all(a.mask == (a.src == "active") for a in k.args), (name, k.key)
        for a in k.args:
            assert widths.get(a.src) == a.width, (name, k.key, a)
            assert a.row == (a.src == "ba"), (name, k.key, a)
        assert must_write <= {a.src for a in k.args if a.out}, (name, k.key)
    assert all(_cuda.Loops("float64").supports(c) for c in CELLS.values())


def test_write_script(tmp_path):
    """``python xlstm/accel/cuda/kernels.py --write DIR``, with nothing but Python (not even the
    package on the path): the files that .ci/compile_cuda.sh compiles, for every cell."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-I", str(PKG_DIR / "kernels.py"), "--write", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    names = [f"xlstm_{c}{end}" for c in table.cells() for end in (".cu", "_host.cpp")]
    assert res.stdout.split() == [str(tmp_path / name) for name in names]
    for cell in CELLS:
        assert (tmp_path / f"xlstm_{cell}.cu").read_text(encoding="utf-8") == _cuda.source(cell)
        host = (tmp_path / f"xlstm_{cell}_host.cpp").read_text(encoding="utf-8")
        assert f'#include "xlstm_{cell}.cu"' in host and '#include "grid_emulator.h"' in host


# ------------------------------------------------------------------------ host build
@pytest.fixture(scope="module")
def cxx():
    path = cuda_emulator.host_compiler()
    if path is None:
        pytest.skip("no host C++ compiler ($CXX, c++, g++ or clang++) on PATH")
    return path


@pytest.fixture(scope="module")
def host_libs(cuda_host_builds):
    """Every cell's generated kernels built for the host behind the grid emulator (no
    sanitizer): cell -> library."""
    return {c: ctypes.CDLL(str(lib)) for c, lib in cuda_host_builds.items()}


def host_loops(libs, dtype, seed=1):
    return cuda_emulator.host_loops(libs, dtype, block=HOST_BLOCK, seed=seed)


def _close(actual, expected, dtype, err="", tol=STEP_TOL):
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    rtol, atol = tol[dtype]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=err)


def _same_bits(actual, expected, err=""):
    """Equal bit for bit: values, NaNs where NaNs are, and the sign of every zero."""
    np.testing.assert_array_equal(actual, expected, err_msg=err, strict=True)
    np.testing.assert_array_equal(np.signbit(actual), np.signbit(expected), err_msg=err)


def _kept_forward(cell, rng, T, m, n_x, n_a, dtype, scale=1.0):
    """A forward pass of ``cell`` through the array path: its kept ``State``."""
    params = {k: (scale * rng.standard_normal(shape)).astype(dtype)
              for k, shape in cell.param_shapes(n_x, n_a).items()}
    x = rng.standard_normal((n_x, m, T)).astype(dtype)
    state0 = tuple((2.0 * rng.standard_normal((n_a, m))).astype(dtype)
                   for _ in cell.state_names)
    with xlstm.accelerators(False):
        return _engine.forward(cell, x.transpose(2, 1, 0), tuple(s.T for s in state0), params,
                               n_a, xp=NP, keep=True)[3]


# ------------------------------------------------------------------------ host tests
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("m,n", [(1, 1), (7, 5), (33, 40)])
@pytest.mark.parametrize("name", list(CELLS))
def test_host_forward_step_matches_array_path(host_libs, name, dtype, m, n, padded):
    """One step of Loops.forward: the GEMM (plus ba), then the cell's kernel, against the
    cell's step on the array path (bit for bit where it has no tanh: relu). ``padded``:
    every third row is padding and keeps its states bit for bit (the masked kernel)."""
    cell = CELLS[name]
    rng = np.random.default_rng(0)
    width = cell.n_gates * n
    Gx = (2.0 * rng.standard_normal((1, m, width))).astype(dtype)
    WaT = np.asfortranarray(rng.standard_normal((n, width)).astype(dtype))
    ba = rng.standard_normal((1, width)).astype(dtype) if cell.split else None
    bufs = {s: np.zeros((2, m, n), dtype) for s in cell.state_names}
    for s in cell.state_names:
        bufs[s][0] = rng.standard_normal((m, n))
        if s in cell.positive:  # a normaliser: positive in a valid state
            bufs[s][0] = 0.5 + np.abs(bufs[s][0])
    bufs.update((s, np.empty((1, m, w * n), dtype)) for s, w in cell.saved.items())
    active = (np.arange(m) % 3 != 1)[None, :, None] if padded else None
    loops = host_loops(host_libs, dtype)
    loops.forward(cell, Gx, WaT, ba, bufs, 0, active)
    assert loops.launch.calls == ["fwd_masked" if padded else "fwd"]
    assert loops.launch.cells == {name}
    ga = bufs[cell.state_names[0]][0] @ WaT
    want = cell.step(array_ops(NP), Gx[0], ga if ba is None else ga + ba,
                     tuple(bufs[s][0] for s in cell.state_names), NO_OUT)
    for k, ref in want.items():
        got = bufs[k][1] if k in cell.state_names else bufs[k][0]
        if padded and k in cell.state_names:
            idle = ~active[0, :, 0]
            _same_bits(got[idle], bufs[k][0][idle], err=k)  # kept, bit for bit
            got, ref = got[~idle], ref[~idle]
        if name == "rnn_relu":
            _same_bits(got, ref, err=k)
        else:
            _close(got, ref, dtype, err=k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("scale", [1.0, 1e3], ids=["normal", "saturated"])
@pytest.mark.parametrize("name", list(CELLS))
def test_host_backward_is_bit_identical_to_array_path(host_libs, name, dtype, scale, padded):
    """Loops.backward against the cell's back_coeffs + step_back on the array path, step by
    step, with the product the loops make (``dga @ Wa``, cuBLAS on a GPU) and the direct
    term added after it, as the engine does; nonzero gradients on the final state.

    No transcendental function in the backward kernels: every bit must agree, also for
    saturated gates (exact 0 and 1) and huge states. ``padded``: rows are padding at some
    steps (the last, runs of two, the first), where the engine's backward step gives zero
    gate gradients and passes the state's gradients through (the masked kernels).
    """
    cell = CELLS[name]
    rng = np.random.default_rng(1)
    T, m, n_x, n = 5, 6, 3, 4
    active = None
    if padded:  # row r is padding at steps t with pattern[r][t] == 0
        pattern = ["11110", "11100", "10011", "11111", "01111", "10101"]
        active = np.array([[[c == "1"] for c in row] for row in pattern]).transpose(1, 0, 2)
    st = _kept_forward(cell, rng, T, m, n_x, n, dtype, scale=scale)
    WaT, _ = cell.fuse_backward(st.params, n, xp=NP)
    saved = {k: getattr(st, k)[:T] for k in cell.saved}
    prev = {k: getattr(st, k)[:T] for k in cell.state_names}
    da_seed = rng.standard_normal((n, m, T)).astype(dtype)  # the seed layout, as the engine
    da_t = np.transpose(da_seed, (2, 1, 0))  # passes it: a strided view
    carry = tuple(rng.standard_normal((n, m)).astype(dtype).T for _ in cell.state_names)
    before = [c.copy() for c in carry]
    width = cell.n_gates * n
    dGx = np.empty((T, m, width), dtype)
    dGa = np.empty((T, m, width), dtype) if cell.split else dGx
    loops = host_loops(host_libs, dtype)
    got = loops.backward(cell, da_t, carry, saved, prev, WaT, dGx, dGa, active)
    assert loops.launch.calls == ["bwd_masked" if padded else "bwd"] * T
    for c, b in zip(carry, before):
        np.testing.assert_array_equal(c, b)  # the carry is not written

    ops = array_ops(NP)
    coeffs = cell.back_coeffs(ops, saved, prev, NO_OUT)
    da_rec, *drest = carry
    for t in range(T - 1, -1, -1):
        reads = {k: v[t] for k, v in {**saved, **prev}.items() if k in cell.back_reads}
        dgx, dga, direct, drest_prev = cell.step_back(
            ops, da_t[t], da_rec, tuple(drest), tuple(c[t] for c in coeffs), reads, NO_OUT)
        if padded:  # the engine's step: no gate gradients on a padded row
            dgx = np.where(active[t], dgx, 0.0).astype(dtype)
            dga = np.where(active[t], dga, 0.0).astype(dtype) if cell.split else dgx
        _same_bits(dGx[t], dgx, err=f"dGx[{t}]")
        _same_bits(dGa[t], dga, err=f"dGa[{t}]")
        new = np.empty((m, n), dtype)
        np.matmul(dga, WaT.T, out=new)  # the product the loops make
        if direct is not None:
            new = direct + new
        if padded:  # ... and the state's gradients pass through
            new = np.where(active[t], new, da_rec)
            drest_prev = [np.where(active[t], d, k) for d, k in zip(drest_prev, drest)]
        da_rec, drest = new, drest_prev
    for g, w in zip(got, (da_rec, *drest)):
        _same_bits(g, w)
    assert all(np.all(np.isfinite(v)) for v in (dGx, dGa, *got))


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_relu_at_zero_and_nan(host_libs, dtype):
    """relu and its derivative as numpy's maximum(x, 0) and sign: -0 -> +0, NaN kept (with
    its sign), sign(+-0) = +0, infinities; bit for bit against the array path's ops."""
    cell, ops = CELLS["rnn_relu"], array_ops(NP)
    values = np.array([-0.0, 0.0, np.nan, -np.nan, -1.5, 2.0, np.inf, -np.inf, 1e-30, -1e-30])
    m, n = 2, len(values)
    gx = np.stack([values, values[::-1]]).astype(dtype)
    ga = np.full((m, n), -0.0, dtype)  # -0 + -0 = -0 reaches relu
    a, h = np.empty((m, n), dtype), np.empty((m, n), dtype)
    loops = host_loops(host_libs, dtype)
    loops.launch("rnn_relu", "fwd", dtype, m * n, (m, n, *_one_slice((gx, ga, a, h))))(0)
    want = cell.step(ops, gx, ga, (None,), NO_OUT)
    _same_bits(a, want["A"], err="a")
    _same_bits(h, want["H"], err="h")
    da = np.full((m, n), 0.75, dtype)
    da_rec = np.full((m, n), 0.5, dtype)
    H = gx  # every value, NaN and -0 among them, as a saved output
    dg = np.empty((m, n), dtype)
    loops.launch("rnn_relu", "bwd", dtype, m * n, (m, n, *_one_slice((da, da_rec, H, dg))))(0)
    (D,) = cell.back_coeffs(ops, {"H": H}, {}, NO_OUT)
    want_dg, _, _, _ = cell.step_back(ops, da, da_rec, (), (D,), {}, NO_OUT)
    _same_bits(dg, want_dg, err="dg")


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_extreme_inputs(host_libs, dtype):
    """Saturated LSTM gates give exact 0 / 1 / +-1 values and never NaN."""
    rng = np.random.default_rng(2)
    m, n = 6, 8
    levels = np.array([-1e4, -30.0, -1.0, 0.0, 1.0, 30.0, 1e4])
    Gx = rng.choice(levels, size=(1, m, 4 * n)).astype(dtype)
    A = np.zeros((2, m, n), dtype)  # ga = 0: the gates are exactly the chosen levels
    C = np.zeros((2, m, n), dtype)
    C[0] = rng.choice(np.array([-1e4, -30.0, 0.0, 30.0, 1e4]), size=(m, n))
    S, CCT, TC = np.empty((1, m, 3 * n), dtype), np.empty((1, m, n), dtype), np.empty((1, m, n), dtype)
    bufs = {"A": A, "C": C, "S": S, "CCT": CCT, "TC": TC}
    host_loops(host_libs, dtype).forward(LSTM_CELL, Gx, np.zeros((n, 4 * n), dtype), None,
                                         bufs, 0)
    want = LSTM_CELL.step(array_ops(NP), Gx[0], np.zeros_like(Gx[0]), (None, C[0]), NO_OUT)
    for got, ref in zip((S[0], CCT[0], C[1], TC[0], A[1]),
                        (want[k] for k in ("S", "CCT", "C", "TC", "A"))):
        assert np.all(np.isfinite(got))
        _close(got, ref, dtype)
    assert np.all((S >= 0) & (S <= 1)) and np.all(np.abs(TC) <= 1)
    assert set(np.unique(S[0][Gx[0][:, : 3 * n] == 1e4])) == {1.0}
    assert set(np.unique(S[0][Gx[0][:, : 3 * n] == -1e4])) == {0.0}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_rows", [4096, 12])
@pytest.mark.parametrize("name", list(CELLS))
def test_host_loops_drive_whole_sequences(host_libs, monkeypatch, name, dtype, chunk_rows):
    """The public API (the model class's forward with and without a cache, backward with a
    gradient on the final state; the notebook's functions for the LSTM and the tanh RNN)
    with the engine's accelerated loops swapped for the CUDA Loops on the host build: the
    array path's results (xlstm.accelerators(False))."""
    monkeypatch.setattr(_engine, "CHUNK_ROWS", chunk_rows)
    sizes = (3, 5, 4, 6, 7)  # n_x, n_a, n_y, m, T
    with xlstm.accelerators(False):
        want = cuda_emulator.api_results(name, dtype, *sizes)
    loops = host_loops(host_libs, dtype)
    monkeypatch.setattr(_engine, "accelerated_loops", lambda xp, dt, cell=None, **kw: loops)
    got = cuda_emulator.api_results(name, dtype, *sizes)
    calls = loops.launch.calls
    assert {k: calls.count(k) for k in set(calls)} == cuda_emulator.launches(name, sizes[-1])
    assert loops.launch.cells == {name}
    assert got.keys() == want.keys()
    rtol, atol = SEQ_TOL[dtype]
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol,
                                   atol=atol * cuda_emulator.scale_of(want[k]), err_msg=k)
        assert got[k].dtype == want[k].dtype


def test_host_sequences_in_every_block_order(host_libs):
    """The whole-sequence cases of the ASan run below, in process: every cell, grids with a
    partial last block, two block orders each, equal bit for bit to each other and to the
    array path within SEQ_TOL."""
    count = cuda_emulator.run_sequences(host_libs)
    assert count == len(CELLS) * 2 * 2 * len(cuda_emulator.SEQUENCE_CASES)


@pytest.mark.parametrize("name", list(CELLS))
def test_host_persistent_sequences(host_libs, name):
    """Every cell's persistent kernels, every block and thread on its own host thread (grid
    barrier and __syncthreads real), driven by Loops through the public API: every loop in
    one launch, the last block owning fewer units, the product's input in several tiles,
    two thread orders equal bit for bit, the array path within :func:`seq_tol`."""
    count = cuda_emulator.run_sequences({name: host_libs[name]}, persistent=True)
    assert count == 2 * 2 * len(cuda_emulator.SEQUENCE_CASES)


def test_persistent_plan():
    """Blocks, units per block, rows per tile and shared memory of the persistent kernels."""
    plan = _cuda.persistent_plan
    # LSTM forward, n = 256 on 132 multiprocessors: 2 units a block, their 8 columns of WaT
    assert plan(256, 4, 64, 4, 132, 232448, backward=False) == (128, 2, 64, 72 * 257 * 4)
    # backward: 2 rows of WaT (4 n each) and a tile of dGa rows (4 n each)
    assert plan(256, 4, 64, 4, 132, 232448, backward=True) == (128, 2, 54, 56 * 1025 * 4)
    # units that do not divide n: the last block owns fewer
    assert plan(5, 4, 6, 8, 3, 10**6, backward=False) == (3, 2, 6, (8 + 6) * 6 * 8)
    assert plan(5, 1, 6, 8, 3, 6 * 8 * 3, backward=False).tile == 1  # two rows of weights
    assert plan(5, 1, 6, 8, 3, 6 * 8 * 3 - 1, backward=False) is None  # no row of input
    assert plan(2048, 4, 64, 4, 132, 232448, backward=False) is None  # weights do not fit
    assert plan(8, 4, 0, 4, 132, 232448, backward=False) is None
    assert plan(0, 4, 8, 4, 132, 232448, backward=False) is None
    assert plan(3, 4, 8, 4, 132, 232448, backward=True).grid == 3  # no block without units


def test_loops_choose_persistent_where_it_fits(host_libs, monkeypatch):
    """One persistent launch per loop where the plan fits, pays and is resident; step by
    step where the weights do not fit, the rule refuses the plan (the module's rule unless
    the loops have their own), a multiprocessor holds no block of it (a cooperative launch
    would shrink the grid), a stack is not C-contiguous or persistent kernels are off."""
    cell, T, dtype = CELLS["lstm"], 3, "float64"

    def run(m, n, shared, persistent=True, every=1, occupancy=1,
            rule=_cuda.PERSISTENT_WHERE_IT_FITS):
        rng = np.random.default_rng(1)
        loops = cuda_emulator.host_loops(host_libs, dtype, block=HOST_BLOCK,
                                         persistent=persistent, shared=shared,
                                         occupancy=occupancy, rule=rule)
        A = np.zeros((every * (T + 1), m, n))[::every]  # every slice C-contiguous
        bufs = {"A": A, "C": np.zeros((T + 1, m, n)), "S": np.empty((T, m, 3 * n)),
                "CCT": np.empty((T, m, n)), "TC": np.empty((T, m, n))}
        loops.forward(cell, rng.standard_normal((T, m, 4 * n)), np.zeros((n, 4 * n)), None,
                      bufs, 0)
        return loops.launch.calls, loops.persistent_launch.calls

    assert run(2, 3, 100) == ([], [("fwd", T)])
    assert run(2, 3, 100, persistent=False) == (["fwd"] * T, [])
    # 3 blocks of one unit: 4 rows of 3 + 1 weights and one row of 3 + 1 input at least
    assert run(2, 3, 4 * 4 + 4) == ([], [("fwd", T)])
    assert run(2, 3, 4 * 4 + 3) == (["fwd"] * T, [])
    assert run(2, 3, 100, every=2) == (["fwd"] * T, [])
    assert run(2, 3, 100, occupancy=0) == (["fwd"] * T, [])  # not resident: step by step
    assert run(2, 3, 100, rule=_cuda.PERSISTENT_WHERE_IT_FITS._replace(max_rows=1)) == (
        ["fwd"] * T, [])
    # the module's rule, read at each plan: this tiny loop pays, until a step costs more
    assert run(2, 3, 100, rule=None) == ([], [("fwd", T)])
    monkeypatch.setattr(_cuda, "PERSISTENT_RULE", _cuda.PERSISTENT_RULE._replace(
        per_step_us=_cuda.PERSISTENT_RULE.barrier_us))
    assert run(2, 3, 100, rule=None) == (["fwd"] * T, [])


#: An H100 SXM: multiprocessors and shared memory per block with opt-in (227 KiB).
H100 = (132, 227 * 1024)


@pytest.mark.parametrize("n,m,fwd,bwd", [
    (256, 8, True, True),  # small batch: a few short trips a step, no launches
    (256, 64, True, False),  # backward: 2 tiles of up to 54 rows of 1024, 256 trips a step
    (1024, 64, False, False),  # forward 256 trips; backward 11 tiles of 6 rows, 48 busy
    (768, 16, True, False),  # FlashRNN's shape: forward 48 trips, backward 192
])
def test_persistent_rule_at_the_issue_shapes(n, m, fwd, bwd):
    """The default rule's choices for the LSTM in float32 on an H100, at the sizes
    ``(n_a, m)`` of the GPU benchmark: the persistent kernel where a step's serial chain of
    L2 round trips and multiply-adds is short, the per-step path where the product's input
    comes in many trips (the backward plan at (1024, 64) is the one the estimate was set
    from: 11 tiles of 6 rows, 48 of 256 threads busy, about 370 us a step)."""
    loops = _cuda.Loops("float32", mod=np, device=H100,
                        occupancy=lambda cell, step, name, block, shared: 1)
    got = {}
    for step in ("fwd", "bwd"):
        k = table.kernel("lstm", step)
        got[step] = loops.persistent_plan(k, m, n)
        fits = _cuda.persistent_plan(n, 4, m, 4, *H100, backward=step == "bwd")
        assert fits is not None  # every one fits; the rule decides
        assert (got[step] is not None) == (got[step] == fits)
    assert (got["fwd"] is not None, got["bwd"] is not None) == (fwd, bwd)
    if (n, m) == (1024, 64):
        plan = _cuda.persistent_plan(n, 4, m, 4, *H100, backward=True)
        assert (plan.tile, -(-m // plan.tile), plan.tile * plan.units) == (6, 11, 48)
        assert 300 < _cuda.PERSISTENT_RULE.step_us(plan, m, 4 * n, plan.units, 256) < 450
    # the rule's thresholds, not the fit: every plan where a step may cost anything
    anything = _cuda.PERSISTENT_WHERE_IT_FITS
    assert all(anything.takes(_cuda.persistent_plan(n, 4, m, 4, *H100, backward=b), m,
                              4 * n, 4, 256) for b in (False, True))
    assert not _cuda.PERSISTENT_RULE.takes(None, m, n, 4, 256)


def test_persistent_plan_needs_a_resident_grid():
    """The occupancy is asked for the very kernel, block and shared memory of the plan; a
    device whose multiprocessors hold fewer blocks than the grid needs gets no plan."""
    seen = []

    def occupancy(cell, step, name, block, shared):
        seen.append((cell, step, name, block, shared))
        return 0 if name == "float64" else 1

    k = table.kernel("gru", "bwd_masked")
    for dtype in DTYPES:
        loops = _cuda.Loops(dtype, mod=np, device=H100, occupancy=occupancy)
        plan = loops.persistent_plan(k, 8, 256)
        assert (plan is None) == (dtype == "float64")
    itemsize = {"float32": 4, "float64": 8}
    assert seen == [("gru", "bwd_masked", d, _cuda.BLOCK,
                     _cuda.persistent_plan(256, 3, 8, itemsize[d], *H100, backward=True).shared)
                    for d in DTYPES]


def test_occupancy_asks_the_driver_for_the_launch(monkeypatch):
    """_occupancy raises the kernel's shared-memory limit first (the driver counts no block
    that asks for more than it), then asks the driver for the kernel's function."""
    import types

    calls = []

    class Kernel:
        max_dynamic_shared_size_bytes = 48 * 1024
        kernel = types.SimpleNamespace(ptr=1234)

    def occupancy(ptr, block, shared):
        calls.append((ptr, block, shared, kern.max_dynamic_shared_size_bytes))
        return 1

    kern = Kernel()
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(driver=types.SimpleNamespace(
        occupancyMaxActiveBlocksPerMultiprocessor=occupancy))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(_cuda, "_persistent_kernel", lambda cell, step, name: kern)
    assert _cuda._occupancy("lstm", "fwd", "float32", 256, 100_000) == 1
    assert calls == [(1234, 256, 100_000, 100_000)]


def test_a_grid_cupy_would_shrink_is_an_error(monkeypatch):
    """CuPy's cooperative launch shrinks a grid that is not resident and only warns; the
    launch turns that warning into an error (the kernel would leave the last blocks' units
    uncomputed), and lets other warnings be."""
    import warnings

    class Kernel:
        max_dynamic_shared_size_bytes = 48 * 1024
        message = "The grid size will be reduced from 132 to 66, as the specified grid ..."

        def __call__(self, grid, block, args, shared_mem=0):
            warnings.warn(self.message, UserWarning, stacklevel=1)

    kern = Kernel()
    monkeypatch.setattr(_cuda, "_persistent_kernel", lambda cell, step, name: kern)
    with pytest.raises(RuntimeError, match="grid of 132 blocks .* not resident"):
        _cuda._launch_persistent("lstm", "fwd", "float32", 132, 256, 1024, (2,))
    kern.message = "something else"
    with pytest.warns(UserWarning, match="something else"):
        _cuda._launch_persistent("lstm", "fwd", "float32", 132, 256, 1024, (2,))


def test_check_persistent_args_rejects_what_a_kernel_cannot_take():
    k = table.kernel("rnn_tanh", "fwd")
    m, n, T = 2, 3, 4
    A, H, gx = np.zeros((T + 1, m, n)), np.zeros((T, m, n)), np.zeros((T, m, n))
    ga = np.zeros((m, n))
    w, barrier = np.zeros((n, n)), np.zeros(1, np.uint64)

    def args(**change):
        got = dict(sizes=[m, n, T, 1, 1], barrier=barrier, w=w, gin=[A, T + 1, 0], ga=ga,
                   stacks=[gx, T, 0, ga, 1, 0, A, T + 1, 1, H, T, 0])
        got.update(change)
        return (*got["sizes"], got["barrier"], got["w"], *got["gin"], got["ga"], *got["stacks"])

    table.check_persistent_args(k, "float64", args())
    rest = [T, 0, ga, 1, 0, A, T + 1, 1, H, T, 0]
    bad = {
        "must be Python ints": dict(sizes=[m, n, np.int64(T), 1, 1]),
        "one zero uint64": dict(barrier=np.ones(1, np.uint64)),
        "w has shape": dict(w=np.zeros((n, 2 * n))),
        "in has shape": dict(gin=[A, T, 0]),
        "gx is float32": dict(stacks=[gx.astype(np.float32), *rest]),
        "not C-contiguous": dict(stacks=[np.asfortranarray(gx), *rest]),
        "is one slice, not a stack": dict(stacks=[gx, T, 0, ga, 2, 0, A, T + 1, 1, H, T, 0]),
        "3 stacks for 4": dict(stacks=[gx, T, 0, ga, 1, 0, A, T + 1, 1]),
        "share part of their memory": dict(stacks=[gx, T, 0, ga, 1, 0, A, T + 1, 1, A[1:], T, 0]),
    }
    for message, change in bad.items():
        with pytest.raises(AssertionError, match=message):
            table.check_persistent_args(k, "float64", args(**change))


def test_host_launch_catches_a_kernel_that_writes_its_input(host_libs, monkeypatch):
    """The host launch compares every read argument before and after the kernel: a table
    that declares a written argument as read is caught."""
    k = table.kernel("lstm", "fwd")
    last = k.args[-1]
    wrong = table.Kernel(k.cell, k.step, k.elem,
                         (*k.args[:-1], table.Arg(last.name, last.width, src=last.src)))
    monkeypatch.setitem(table.TABLE, ("lstm", "fwd"), wrong)
    loops = host_loops(host_libs, "float64")
    m, n = 3, 2
    bufs = {"A": np.zeros((2, m, n)), "C": np.zeros((2, m, n)), "S": np.empty((1, m, 3 * n)),
            "CCT": np.empty((1, m, n)), "TC": np.empty((1, m, n))}
    with pytest.raises(AssertionError, match="the kernel wrote its input a"):
        loops.forward(LSTM_CELL, np.ones((1, m, 4 * n)), np.zeros((n, 4 * n)), None, bufs, 0)


def test_loops_reject_a_table_source_they_do_not_have(host_libs, monkeypatch):
    k = table.kernel("rnn_tanh", "fwd")
    wrong = table.Kernel(k.cell, k.step, k.elem,
                         (table.Arg("gx", 1, src="nothing"), *k.args[1:]))
    monkeypatch.setitem(table.TABLE, ("rnn_tanh", "fwd"), wrong)
    bufs = {"A": np.zeros((2, 1, 1)), "H": np.zeros((1, 1, 1))}
    with pytest.raises(ValueError, match="no buffer 'nothing'"):
        host_loops(host_libs, "float64").forward(CELLS["rnn_tanh"], np.ones((1, 1, 1)),
                                                 np.ones((1, 1)), None, bufs, 0)


def test_loops_reject_a_recurrent_bias_the_kernel_does_not_take(host_libs):
    """The GRU's kernel adds ba; the RNN's has none: a mismatch is an error, not a silent
    drop (or a read of a missing bias)."""
    m, n = 2, 3
    gru = {"A": np.zeros((2, m, n)), "S": np.empty((1, m, 2 * n)), "N": np.empty((1, m, n)),
           "HN": np.empty((1, m, n))}
    rnn = {"A": np.zeros((2, m, n)), "H": np.empty((1, m, n))}
    loops = host_loops(host_libs, "float64")
    with pytest.raises(ValueError, match="gru fwd: the kernel's recurrent bias and ba"):
        loops.forward(CELLS["gru"], np.ones((1, m, 3 * n)), np.ones((n, 3 * n)), None, gru, 0)
    with pytest.raises(ValueError, match="rnn_tanh fwd: the kernel's recurrent bias and ba"):
        loops.forward(CELLS["rnn_tanh"], np.ones((1, m, n)), np.ones((n, n)),
                      np.ones((1, n)), rnn, 0)
    assert loops.launch.calls == []


# ------------------------------------------------------------- AddressSanitizer
@pytest.fixture(scope="module")
def asan(cxx):
    """The compiler and its ASan runtime, to preload into a Python subprocess."""
    runtime = cuda_emulator.asan_runtime(cxx)
    if runtime is None:
        pytest.skip(f"{cxx} has no shared AddressSanitizer runtime (libasan.so)")
    return cxx, runtime


def _run_under_asan(runtime, directory, *extra):
    """Run cuda_emulator.py's whole sequences on the libraries in ``directory`` in a Python
    that preloads ASan."""
    root = Path(xlstm.__file__).resolve().parent.parent
    env = {
        **os.environ,
        "LD_PRELOAD": " ".join(filter(None, [runtime, os.environ.get("LD_PRELOAD")])),
        "ASAN_OPTIONS": "detect_leaks=0",  # the interpreter's own allocations are "leaks"
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), str(TESTS_DIR),
                                                    os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run([sys.executable, str(TESTS_DIR / "cuda_emulator.py"), str(directory),
                           *extra], capture_output=True, text=True, env=env, timeout=180)


BROKEN_GUARDS = {"intact": table.GUARD, "off by one": "if (e <= m * n)", "removed": "(void)m;"}
#: The persistent kernels' bound on a block's units, broken: the last block runs past n.
OWN_UNITS = "const xlstm::index_t own = j0 < n ? (n - j0 < units ? n - j0 : units) : 0;"
OWN_UNITS_BROKEN = "const xlstm::index_t own = j0 < n ? units : 0;"


@pytest.fixture(scope="module")
def asan_builds(asan, tmp_path_factory):
    """Every ASan build of the tests below, compiled at once (in parallel): folder name ->
    folder of libraries. ``every-cell``: every cell's generated kernels; ``intact``: the
    LSTM's library of those alone; one folder for each broken LSTM source."""
    cxx, _ = asan
    root = tmp_path_factory.mktemp("cuda_asan")
    src = _cuda.source("lstm")
    broken = {f"guard {name}": src.replace(table.GUARD, guard)
              for name, guard in BROKEN_GUARDS.items() if name != "intact"}
    broken["past the last unit"] = src.replace(OWN_UNITS, OWN_UNITS_BROKEN)
    with concurrent.futures.ThreadPoolExecutor() as pool:
        jobs = [pool.submit(cuda_emulator.build, cxx, root / "every-cell", c, asan=True)
                for c in table.cells()]
        jobs += [pool.submit(cuda_emulator.build, cxx, root / name, "lstm", asan=True,
                             kernels=text) for name, text in broken.items()]
        for job in jobs:
            job.result()
    (root / "intact").mkdir()
    lib = "libxlstm_lstm_asan.so"
    (root / "intact" / lib).symlink_to(root / "every-cell" / lib)
    return {p.name: p for p in root.iterdir()}


@pytest.fixture(scope="module")
def asan_intact_run(asan, asan_builds):
    """The quick run on the intact LSTM library under ASan: the control of both tests of a
    broken source below (the same library and the same run for both)."""
    return _run_under_asan(asan[1], asan_builds["intact"], "quick")


def test_asan_whole_sequences_run_clean(asan, asan_builds):
    """Every cell's generated kernels, compiled for the host with -fsanitize=address and
    driven through the public API by xlstm.accel.cuda.Loops: every case, both dtypes, one
    block order (shuffled, partial last blocks; test_host_sequences_in_every_block_order and
    test_host_persistent_sequences run two, unsanitised), no invalid access, the array path's
    results."""
    _, runtime = asan
    res = _run_under_asan(runtime, asan_builds["every-cell"])
    assert res.returncode == 0, res.stderr[-4000:]
    assert "ERROR: AddressSanitizer" not in res.stderr
    count = len(CELLS) * 2 * len(cuda_emulator.SEQUENCE_CASES)
    assert (f"cuda_emulator: {count} sequences of {len(CELLS)} cells on per-step kernels and "
            f"{count} on persistent kernels match the array path") in res.stdout


def _assert_asan(res, broken, kernel):
    """An intact run passes, its persistent kernels checked; a broken one fails with ASan's
    heap-buffer-overflow in a kernel that ``kernel`` (a regular expression) matches."""
    if not broken:
        assert res.returncode == 0, res.stderr[-4000:]
        assert "on persistent kernels match the array path" in res.stdout
    else:
        assert res.returncode != 0
        assert "ERROR: AddressSanitizer: heap-buffer-overflow" in res.stderr, res.stderr[-4000:]
        assert re.search(kernel, res.stderr), res.stderr[-4000:]


@pytest.mark.parametrize("guard", list(BROKEN_GUARDS))
def test_asan_catches_a_broken_bounds_check(asan, asan_builds, request, guard):
    """The LSTM's source with its bounds check broken (one element too far, or none): ASan
    reports a heap-buffer-overflow in the first launch and the run fails; intact, it passes.
    (The intact library is the LSTM's of the whole-sequence run: the same text and flags.)"""
    _, runtime = asan
    src = _cuda.source("lstm")
    assert src.count(table.GUARD) == sum(c == "lstm" for c, _, _ in _cuda.KERNEL_NAMES)
    res = (request.getfixturevalue("asan_intact_run") if guard == "intact" else
           _run_under_asan(runtime, asan_builds[f"guard {guard}"], "quick"))
    _assert_asan(res, guard != "intact", r"in xlstm_lstm_(fwd|bwd)_f(32|64) ")


@pytest.mark.parametrize("broken", [False, True], ids=["intact", "past the last unit"])
def test_asan_catches_a_persistent_kernel_past_its_units(asan, asan_builds, request, broken):
    """The LSTM's persistent kernels with the last block's units unbounded (it owns as many
    as the others, past the last unit where they do not divide n): ASan reports a
    heap-buffer-overflow from a thread of the concurrent grid; intact, the run passes."""
    _, runtime = asan
    src = _cuda.source("lstm")
    assert src.count(OWN_UNITS) == 2 * 2 * len(table.DTYPES)
    res = (_run_under_asan(runtime, asan_builds["past the last unit"], "quick") if broken else
           request.getfixturevalue("asan_intact_run"))
    _assert_asan(res, broken, r"in xlstm_lstm_\w+_persistent_f(32|64)")


#: A grid barrier that counts the arrivals and waits for nobody.
NO_WAIT = ("const unsigned long long target = (arrived / blocks + 1ull) * blocks;",
           "const unsigned long long target = arrived + 0ull * blocks;")


def test_persistent_kernels_need_their_grid_barrier(cxx, tmp_path):
    """With a grid barrier that does not wait, a block runs ahead into a step whose state
    other blocks have not written yet: the emulator's concurrent grid shows it as results
    far from the array path (in at least one of three thread orders)."""
    src = _cuda.source("lstm")
    assert src.count(NO_WAIT[0]) == 1
    lib, _ = cuda_emulator.build(cxx, tmp_path, "lstm", kernels=src.replace(*NO_WAIT))
    failures = []
    for seed in (1, 2, 3):
        try:
            cuda_emulator.run_sequences({"lstm": lib}, dtypes=("float64",), seeds=(seed,),
                                        cases=cuda_emulator.SEQUENCE_CASES[2:3],
                                        persistent=True)
        except AssertionError as exc:
            assert "Not equal to tolerance" in str(exc)
            failures.append(seed)
    assert failures


def test_empty_grid_launches_nothing():
    """m = 0: no kernel is compiled or launched (which would need CuPy and a GPU)."""
    _cuda._launch("lstm", "fwd", "float32", 0, ())(0)
    _cuda._launch("gru", "bwd", "float64", 0, ())(3)


def test_launch_grid_and_argument_types(monkeypatch):
    """What reaches the compiled kernel (cupy.RawKernel's function for the device):
    enough blocks to cover the grid, sizes and the step as int64, the arrays as given; the
    kernel is looked up and the arguments converted once for every step, so that a step
    only puts its index in."""
    import types

    seen, kernels = [], []

    def kernel(cell, step, name):
        kernels.append((cell, step, name))
        return types.SimpleNamespace(kernel=lambda *a: seen.append(a))

    monkeypatch.setattr(_cuda, "_kernel", kernel)
    arr = np.zeros(3, np.float32)
    run = _cuda.Loops("float32").launch("gru", "bwd", "float32", _cuda.BLOCK + 1,
                                        (2, 3, arr, 4, 1))
    run(0)
    run(5)
    assert kernels == [("gru", "bwd", "float32")]
    (grid, block, args), (grid2, block2, args2) = seen
    assert (grid, block) == (grid2, block2) == ((2,), (_cuda.BLOCK,))
    assert [type(a) for a in args] == [np.int64] * 3 + [np.ndarray, np.int64, np.int64]
    assert args[:3] == (2, 3, 0) and args2[:3] == (2, 3, 5) and args[3] is arr
    assert args[4:] == args2[4:] == (4, 1)


def test_launch_converts_with_cupys_own_wrappers_once(monkeypatch):
    """Where CuPy has its wrappers of kernel arguments, a per-step launch wraps every size,
    length and base (as a numpy int64) and every array (its data pointer) once, as CuPy's
    launch would at every step; only the step goes as a fresh int64."""
    import types

    class Wrapper:
        def __init__(self, value):
            self.value = value

    class CScalar(Wrapper):
        pass

    class CIntptr(Wrapper):
        pass

    modules = {"cupy": types.ModuleType("cupy"), "cupy._core": types.ModuleType("cupy._core"),
               "cupy._core._scalar": types.ModuleType("cupy._core._scalar"),
               "cupy.cuda": types.ModuleType("cupy.cuda"),
               "cupy.cuda.function": types.ModuleType("cupy.cuda.function")}
    modules["cupy._core._scalar"].CScalar = CScalar
    modules["cupy.cuda.function"].CIntptr = CIntptr
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    _cuda._cupy_arguments.cache_clear()
    seen = []
    monkeypatch.setattr(_cuda, "_kernel", lambda cell, step, name: types.SimpleNamespace(
        kernel=lambda *a: seen.append(a)))
    device_array = types.SimpleNamespace(data=types.SimpleNamespace(ptr=4096))
    try:
        run = _cuda._launch("lstm", "fwd", "float32", 5, (2, 3, device_array, 4, 1))
        run(7)
    finally:
        _cuda._cupy_arguments.cache_clear()
    ((_, _, args),) = seen
    assert [type(a) for a in args] == [CScalar, CScalar, np.int64, CIntptr, CScalar, CScalar]
    assert [a.value for a in args[:2]] == [2, 3] and type(args[0].value) is np.int64
    assert args[2] == 7 and args[3].value == 4096 and [a.value for a in args[4:]] == [4, 1]
    assert run.arrays[2] is device_array


def test_persistent_launch_arguments_and_shared_memory(monkeypatch):
    """What reaches the persistent cupy.RawKernel: the plan's grid and block, sizes as
    int64, and the shared memory, raising the kernel's limit (48 KiB unless opted in) only
    where the launch needs more."""
    seen = []

    class Kernel:
        max_dynamic_shared_size_bytes = 48 * 1024

        def __call__(self, grid, block, args, shared_mem=0):
            seen.append((grid, block, args, shared_mem, self.max_dynamic_shared_size_bytes))

    kern = Kernel()
    monkeypatch.setattr(_cuda, "_persistent_kernel", lambda cell, step, name: kern)
    arr = np.zeros(3, np.float32)
    _cuda._launch_persistent("lstm", "fwd", "float32", 7, 64, 1024, (2, arr, 3))
    _cuda._launch_persistent("lstm", "fwd", "float32", 7, 64, 100_000, (2, arr, 3))
    (g, b, args, shared, limit), (*_, shared2, limit2) = seen
    assert (g, b, shared, limit) == ((7,), (64,), 1024, 48 * 1024)
    assert (shared2, limit2) == (100_000, 100_000)
    assert [type(a) for a in args] == [np.int64, np.ndarray, np.int64] and args[1] is arr


def test_dispatch_without_cupy(monkeypatch):
    """numpy never gets the CUDA loops; CuPy would, unless XLSTM_ACCEL=0."""
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    assert not isinstance(_engine.accelerated_loops(NP, NP.float32), _cuda.Loops)


@pytest.mark.parametrize("cell", list(CELLS))
def test_source_inlines_the_header(cell):
    src = _cuda.source(cell)
    assert src == table.source(cell) and _cuda.source() == table.source("lstm")
    assert '#include "' not in src
    header = (PKG_DIR / table.HEADERS[cell]).read_text(encoding="utf-8")
    include = f'#include "{table.PRELUDE}"'
    assert header.count(include) == 1  # the shared prelude, included once, inlined first
    prelude = (PKG_DIR / table.PRELUDE).read_text(encoding="utf-8").rstrip()
    assert prelude in src and src.index(prelude) < src.index("namespace xlstm {\n\n")
    assert header.replace(include, "", 1).rstrip() in src
    for (c, _, _), name in _cuda.KERNEL_NAMES.items():
        assert (name in src) == (c == cell)


def test_importing_xlstm_does_not_import_cupy():
    code = (
        "import sys, numpy as np, xlstm\n"
        "p = xlstm.init_params(2, 3, 2, seed=0)\n"
        "xlstm.lstm_forward(np.ones((2, 4, 3)), np.zeros((3, 4)), p)\n"
        "import xlstm.accel.cuda\n"
        "assert 'cupy' not in sys.modules, 'cupy was imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------- compile tests
@pytest.fixture(scope="module")
def nvcc_builds(tmp_path_factory):
    """Every cell's source compiled by nvcc for sm_90 (in parallel), warnings as errors, with
    nvcc's intermediate files kept: cell -> (command, exit status, output, object, PTX). The
    kept PTX is byte for byte what ``nvcc -ptx`` with the same -arch and --fmad writes, so
    one compile serves both tests below."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    root = tmp_path_factory.mktemp("nvcc")
    jobs = {}
    for cell in table.cells():
        src, obj, keep = root / f"xlstm_{cell}.cu", root / f"xlstm_{cell}.o", root / cell
        src.write_text(_cuda.source(cell), encoding="utf-8")
        keep.mkdir()
        cmd = [nvcc, "-arch=sm_90", "--fmad=false", "-Werror", "all-warnings",
               "-Xcompiler", "-Wall,-Wextra", "-c", "-o", str(obj), "--keep", "--keep-dir", str(keep), str(src)]
        jobs[cell] = (cmd, obj, keep / f"xlstm_{cell}.ptx",
                      subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True))
    built = {}
    for cell, (cmd, obj, ptx, proc) in jobs.items():
        out, _ = proc.communicate()
        built[cell] = (cmd, proc.returncode, out, obj, ptx)
    return built


def test_nvcc_compiles_kernels(nvcc_builds):
    for cmd, returncode, out, obj, _ in nvcc_builds.values():
        assert returncode == 0, f"{' '.join(cmd)}\n{out}"
        assert obj.stat().st_size > 0


def _nvcc_ptx(nvcc_builds, cells):
    """Every cell's source compiled to PTX by nvcc (sm_90, --fmad=false): cell -> PTX text."""
    ptx = {}
    for cell in cells:
        cmd, returncode, out, _, path = nvcc_builds[cell]
        assert returncode == 0, f"{' '.join(cmd)}\n{out}"
        ptx[cell] = path.read_text(encoding="utf-8")
    return ptx


def _param_names(params):
    return [p.split()[-1].lstrip("*") for p in params]


def test_persistent_kernels_read_nothing_they_write_through_the_nc_path(nvcc_builds):
    """PTX for sm_90 by nvcc: in no persistent kernel does an ``ld.global.nc`` (the
    non-coherent path, which the PTX memory model allows only for memory that nothing writes
    during the launch) read a stack that the launch writes (:func:`~xlstm.accel.cuda.kernels.
    nc_violations`): a state written at the step before, the product's output, a gradient
    updated in place. Reads of the weights and of read-only stacks may take it, and the
    per-step kernels (one launch per step) still do. ``.ci/compile_cuda.sh`` makes the same
    check (``kernels.py --check-ptx``)."""
    ptx = _nvcc_ptx(nvcc_builds, table.cells())
    checked = 0
    for cell in table.cells():
        count, problems = table.nc_violations(cell, ptx[cell])
        assert not problems, problems
        checked += count
        for k in (k for (c, _), k in table.TABLE.items() if c == cell):
            for dtype_name, (_, ctype) in table.DTYPES.items():
                step = table.nc_loads(ptx[cell], k.name(dtype_name),
                                      _param_names(table.step_params(k, ctype)))
                assert step, f"{k.name(dtype_name)}: no ld.global.nc left"
    assert checked >= 2 * len(table.TABLE)  # the weights at least, in every kernel


def test_nc_violations_finds_a_state_read_through_the_nc_path():
    """The check itself, on a hand-made kernel: a load through a parameter that the launch
    writes is named, one through the weights is not."""
    k = table.kernel("rnn_tanh", "fwd_masked")
    names = _param_names(table.persistent_params(k))
    entry = k.persistent_name("float32")
    index = {name: i for i, name in enumerate(names)}
    ptx = (f".visible .entry {entry}(\n)\n{{\n"
           f"\tld.param.u64 \t%rd1, [{entry}_param_{index['w']}];\n"
           f"\tld.param.u64 \t%rd2, [{entry}_param_{index['a_prev']}];\n"
           f"\tld.param.u64 \t%rd3, [{entry}_param_{index['n']}];\n"
           "\tcvta.to.global.u64 \t%rd4, %rd2;\n"
           "\tmul.lo.s64 \t%rd5, %rd3, 4;\n"
           "\tadd.s64 \t%rd6, %rd4, %rd5;\n"
           "\tld.global.nc.f32 \t%f1, [%rd1];\n"
           "\tld.global.nc.f32 \t%f2, [%rd6+4];\n"
           "\tret;\n}\n")
    assert table.nc_loads(ptx, entry, names) == [frozenset({"w"}), frozenset({"a_prev", "n"})]
    count, problems = table.nc_violations("rnn_tanh", ptx, kernels=[(k, "float32")])
    assert count == 2 and len(problems) == 1 and "a_prev" in problems[0]


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
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-step"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n_a", [(7, 5), (33, 40), (64, 300)])  # one block; several
@pytest.mark.parametrize("scale", [1.0, 1e3], ids=["normal", "saturated"])
def test_gpu_sequences_with_and_without_kernels(cp, cpx, monkeypatch, dtype, m, n_a, scale,
                                                persistent):
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
    monkeypatch.setattr(_cuda.Loops, "persistent", persistent)
    monkeypatch.setattr(_cuda.Loops, "rule", _cuda.PERSISTENT_WHERE_IT_FITS)  # at any size
    fused = run()
    assert any(key[3:] == ("persistent",) for key in _cuda._kernels) or not persistent
    monkeypatch.setenv("XLSTM_ACCEL", "0")
    plain = run()
    assert fused.keys() == plain.keys()
    # the two paths' products sum in different orders (cuBLAS in two orientations, or the
    # persistent kernels' own order)
    rtol, atol = cuda_emulator.seq_tol(dtype, n_a, 4, T, reordered=True)
    for k in plain:
        assert isinstance(fused[k], cp.ndarray) and fused[k].dtype == plain[k].dtype
        assert bool(cp.all(cp.isfinite(fused[k]))), k
        want = plain[k].get()
        np.testing.assert_allclose(fused[k].get(), want, rtol=rtol,
                                   atol=atol * cuda_emulator.scale_of(want), err_msg=k)


@pytest.mark.gpu
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-step"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n_a", [(7, 5), (64, 300)])
@pytest.mark.parametrize("name", list(CELLS))
def test_gpu_every_cell_with_and_without_kernels(cp, cpx, monkeypatch, name, dtype, m, n_a,
                                                 persistent):
    """The public API of every cell on CuPy, fused kernels (persistent or per step) against
    the array path."""
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    monkeypatch.setattr(_cuda.Loops, "persistent", persistent)
    monkeypatch.setattr(_cuda.Loops, "rule", _cuda.PERSISTENT_WHERE_IT_FITS)  # at any size
    assert _engine.accelerated_loops(cpx, getattr(cpx, dtype), CELLS[name]) is not None

    def run():
        return cuda_emulator.api_results(name, dtype, 5, n_a, 6, m, 9, xp=cpx,
                                         asarray=cp.asarray)

    fused = run()
    with xlstm.accelerators(False):
        plain = run()
    assert fused.keys() == plain.keys()
    gates = table.gates(table.kernel(name, "fwd"))
    rtol, atol = cuda_emulator.seq_tol(dtype, n_a, gates, 9, reordered=True)
    for k in plain:
        assert isinstance(fused[k], cp.ndarray) and fused[k].dtype == plain[k].dtype
        want = plain[k].get()
        np.testing.assert_allclose(fused[k].get(), want, rtol=rtol,
                                   atol=atol * cuda_emulator.scale_of(want), err_msg=k)

