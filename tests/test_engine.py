"""The fused engine equals the plain per-step path, whatever the chunking and storage route."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close, to_xp
from oracles import random_case

import xlstm
from xlstm._lib import compat as _compat
from xlstm.engine import loop as _engine


@pytest.mark.parametrize("chunk_rows", [1, 6, 4096])
@pytest.mark.parametrize("T_da", [7, 3])
def test_chunked_engine_equals_per_step_path(xp, device, monkeypatch, chunk_rows, T_da):
    """Time chunks of 1, 2 (6 rows / m=3) and all steps; hand-built caches take the cell path."""
    monkeypatch.setattr(_engine, "CHUNK_ROWS", chunk_rows)
    rng = np.random.default_rng(11)
    x, a0, c0, params = random_case(rng, n_x=4, n_a=3, n_y=2, m=3, T=7)
    X, A0, C0, P = (to_xp(v, xp, device) for v in (x, a0, c0, params))
    a, y, c, caches = xlstm.lstm_forward(X, A0, P, c0=C0)
    a_t, c_t = A0, C0
    steps = []
    for t in range(7):
        a_t, c_t, y_t, cache = xlstm.lstm_cell_forward(X[:, :, t], a_t, c_t, P)
        steps.append(cache)
        for mine, ref in ((a, a_t), (y, y_t), (c, c_t)):
            assert_close(mine[:, :, t], ref, xp=xp, device=device,
                         rtol=1e-12, atol=1e-14)
    da = to_xp(rng.standard_normal((3, 3, T_da)), xp, device)
    fused = xlstm.lstm_backward(da, caches)
    plain = xlstm.lstm_backward(da, (steps, X))
    for k in fused:
        assert_close(fused[k], plain[k], xp=xp, device=device,
                     rtol=1e-11, atol=1e-13, err=k)
    inf = xlstm.lstm_forward(X, A0, P, c0=C0, return_caches=False)
    # Bit for bit where the engine chooses the memory layout of its GEMM operands (numpy,
    # CuPy). array-api-strict leaves layouts to its numpy, and numpy < 2.3 rounds a GEMM
    # with a strided operand differently: there, within a few ulps.
    exact = _compat.is_numpy(xp) or _compat.is_cupy(xp)
    for mine, ref in zip(inf[:3], (a, y, c)):
        assert_close(mine, ref, xp=xp, device=device, rtol=0 if exact else 1e-15, atol=0)


def test_sigmoid_inside_the_engine_is_the_public_sigmoid():
    """Pre-halved weights give ``sigmoid(W z + b)`` up to the GEMM's summation order."""
    rng = np.random.default_rng(12)
    x, a0, c0, p = random_case(rng, n_x=5, n_a=6, n_y=2, m=4, T=1, scale=3.0)
    *_, cache = xlstm.lstm_cell_forward(x[:, :, 0], a0, c0, p)
    z = np.concatenate([a0, x[:, :, 0]])
    for gate, key in (("ft", "f"), ("it", "i"), ("ot", "o")):
        want = xlstm.sigmoid(p["W" + key] @ z + p["b" + key])
        np.testing.assert_allclose(getattr(cache, gate), want, rtol=1e-14, atol=1e-16)


def test_halving_the_weights_is_exact():
    """Scaling by 0.5 commutes with every rounding of a GEMM: the halved GEMM is bit-exact."""
    rng = np.random.default_rng(14)
    W, z = rng.standard_normal((64, 96)), rng.standard_normal((96, 33))
    np.testing.assert_array_equal((0.5 * W) @ z, 0.5 * (W @ z))
    W32, z32 = W.astype(np.float32), z.astype(np.float32)
    np.testing.assert_array_equal((0.5 * W32) @ z32, 0.5 * (W32 @ z32))


def test_step_caches_are_views_into_one_state():
    rng = np.random.default_rng(13)
    x, a0, c0, params = random_case(rng, n_x=2, n_a=3, n_y=2, m=2, T=4)
    *_, caches = xlstm.lstm_forward(x, a0, params, c0=c0)
    state = caches.state
    for t, step in enumerate(caches[0]):
        assert np.shares_memory(step.ft, state.S) and np.shares_memory(step.a_next, state.A)
        assert step.params is state.params and step.params is not params  # one snapshot
    assert len(caches[0][1:3]) == 2 and caches[0][-1].a_next.shape == (3, 2)
    with pytest.raises(IndexError):
        caches[0][4]


@pytest.mark.parametrize("accel", ["1", "0"], ids=["default", "array-path"])
def test_inference_memory_does_not_grow_with_T(monkeypatch, accel):
    """Without caches, the memory beyond the outputs is bounded by one block of steps, on
    the array path and on the compiled loops (the default on numpy when numba is there)."""
    import tracemalloc

    monkeypatch.setenv("XLSTM_ACCEL", accel)
    monkeypatch.setattr(_engine, "CHUNK_ROWS", 64)  # blocks of 16 steps at m = 4
    rng = np.random.default_rng(15)
    extra = {}
    for T in (64, 512):
        x, a0, c0, params = random_case(rng, n_x=8, n_a=16, n_y=4, m=4, T=T)
        tracemalloc.start()
        a, y, c, _ = xlstm.lstm_forward(x, a0, params, c0=c0, return_caches=False)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        extra[T] = peak - (a.nbytes + y.nbytes + c.nbytes)
    assert extra[64] > 0
    assert extra[512] < 1.25 * extra[64], extra  # 8x the steps, about the same extra memory


def test_accelerators_switch_beats_the_environment(monkeypatch):
    """``xlstm.accelerators(False)`` turns the loops off whatever XLSTM_ACCEL says, and
    ``accelerators(True)`` on; blocks nest; results are the same either way; the switch
    holds for its own thread only."""
    import threading

    NP = _compat.default_namespace()
    monkeypatch.setenv("XLSTM_ACCEL", "1")
    on = _engine.accelerated_loops(NP, NP.float64) is not None  # numba may be missing
    with xlstm.accelerators(False):
        assert _engine.accelerated_loops(NP, NP.float64) is None
        with xlstm.accelerators(True):
            assert (_engine.accelerated_loops(NP, NP.float64) is not None) == on
        assert not _engine.accel_enabled()
        seen = []
        worker = threading.Thread(target=lambda: seen.append(_engine.accel_enabled()))
        worker.start()
        worker.join()
        assert seen == [True]  # another thread follows the environment
    assert _engine.accel_enabled()
    monkeypatch.setenv("XLSTM_ACCEL", "0")
    assert _engine.accelerated_loops(NP, NP.float64) is None
    with xlstm.accelerators(True):
        assert (_engine.accelerated_loops(NP, NP.float64) is not None) == on
    rng = np.random.default_rng(20)
    x, a0, c0, params = random_case(rng, n_x=3, n_a=4, n_y=2, m=3, T=5)
    with xlstm.accelerators(True):
        fast = xlstm.lstm_forward(x, a0, params, c0=c0)[0]
    with xlstm.accelerators(False):
        plain = xlstm.lstm_forward(x, a0, params, c0=c0)[0]
    np.testing.assert_array_equal(fast, plain)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        with xlstm.accelerators("0"):
            pass


def test_a_padded_batch_runs_on_the_array_path_where_loops_lack_masks(monkeypatch):
    """Buffered loops that do not declare ``masks`` (CuPy's kernels, for now) are passed
    over for a padded batch: the array path runs it instead."""
    class NoMasks:
        pass

    monkeypatch.setattr(_engine, "accelerated_loops", lambda xp, dtype, cell, device=None: NoMasks())
    assert isinstance(_engine._dispatch(np, np.float64, None)[0], NoMasks)
    assert _engine._dispatch(np, np.float64, None, masked=True) == (None, _engine.scan)
