"""The RNN notebook API and the RNN cells (tanh, relu) on the engine, on every backend."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from helpers import (
    assert_array,
    assert_caches_survive,
    assert_close,
    copy_or_skip,
    spy_on_loops,
    to_numpy,
    to_xp,
)
from oracles import RNNCase, central_differences, random_rnn_case

import xlstm
from xlstm._lib import compat as _compat
from xlstm.cells.rnn import RNN_RELU, RNN_TANH, RNNCell
from xlstm.engine import loop as _engine

#: numpy as the engine sees it (the array-API namespace of numpy arrays).
NP = _compat.default_namespace()

GRAD_KEYS = ("dWax", "dWaa", "dba")
HAS_NUMBA = importlib.util.find_spec("numba") is not None
NO_NUMBA = "numba is not installed (pip install xlstm-array-api[cpu])"


# ------------------------------------------------------------- a reference from the equations
def _softmax(z):
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def ref_forward(x, a0, p):
    """``a_t = tanh(Wax x_t + Waa a_{t-1} + ba)``, ``y_t = softmax(Wya a_t + by)``, in numpy."""
    a, outs, ys = a0, [], []
    for t in range(x.shape[2]):
        a = np.tanh(p["Wax"] @ x[:, :, t] + p["Waa"] @ a + p["ba"])
        outs.append(a)
        ys.append(_softmax(p["Wya"] @ a + p["by"]))
    return np.stack(outs, axis=-1), np.stack(ys, axis=-1)


def ref_cell_backward(da_next, a_next, a_prev, xt, p):
    dtanh = (1 - a_next**2) * da_next
    return {"dxt": p["Wax"].T @ dtanh, "da_prev": p["Waa"].T @ dtanh,
            "dWax": dtanh @ xt.T, "dWaa": dtanh @ a_prev.T,
            "dba": dtanh.sum(axis=1, keepdims=True)}


def ref_backward(da, x, a0, p):
    a, _ = ref_forward(x, a0, p)
    total = {k: 0.0 for k in GRAD_KEYS}
    dx = np.zeros(x.shape)
    da_prev = np.zeros(a0.shape)
    for t in reversed(range(da.shape[2])):
        a_prev = a0 if t == 0 else a[:, :, t - 1]
        g = ref_cell_backward(da[:, :, t] + da_prev, a[:, :, t], a_prev, x[:, :, t], p)
        da_prev, dx[:, :, t] = g["da_prev"], g["dxt"]
        total = {k: total[k] + g[k] for k in GRAD_KEYS}
    return {"dx": dx, "da0": da_prev, **total}


def _on(case, xp, device, dtype=None):
    return tuple(to_xp(v, xp, device, dtype) for v in case)


# ------------------------------------------------------------------------ published shapes
def test_published_shapes(xp, device):
    n_x, n_a, n_y, m, T = 3, 5, 2, 10, 4
    x, a0, p = _on(random_rnn_case(0, n_x, n_a, n_y, m, T), xp, device)
    f64 = xp.float64
    a_next, yt, cache = xlstm.rnn_cell_forward(x[:, :, 0], a0, p)
    assert_array(a_next, xp=xp, device=device, shape=(n_a, m), dtype=f64)
    assert_array(yt, xp=xp, device=device, shape=(n_y, m), dtype=f64)
    assert type(cache) is xlstm.RNNCache and len(cache) == 4
    assert cache._fields == ("a_next", "a_prev", "xt", "parameters")
    for field, want in (("a_next", a_next), ("a_prev", a0), ("xt", x[:, :, 0])):
        assert_close(getattr(cache, field), want, xp=xp, device=device, rtol=0, atol=0)
    assert set(cache.parameters) == set(p) and cache.parameters is not p
    g = xlstm.rnn_cell_backward(a_next, cache)
    shapes = {"dxt": (n_x, m), "da_prev": (n_a, m), "dWax": (n_a, n_x), "dWaa": (n_a, n_a),
              "dba": (n_a, 1)}
    assert list(g) == list(shapes)
    for k, shape in shapes.items():
        assert_array(g[k], xp=xp, device=device, shape=shape, dtype=f64)
    a, y, caches = xlstm.rnn_forward(x, a0, p)
    assert_array(a, xp=xp, device=device, shape=(n_a, m, T), dtype=f64)
    assert_array(y, xp=xp, device=device, shape=(n_y, m, T), dtype=f64)
    assert type(caches) is xlstm.RNNCaches and len(caches) == 2 and caches[1] is x
    assert len(caches[0]) == T and all(len(c) == 4 for c in caches[0])
    g = xlstm.rnn_backward(a, caches)
    shapes = {"dx": (n_x, m, T), "da0": (n_a, m), "dWax": (n_a, n_x), "dWaa": (n_a, n_a),
              "dba": (n_a, 1)}
    assert list(g) == list(shapes)
    for k, shape in shapes.items():
        assert_array(g[k], xp=xp, device=device, shape=shape, dtype=f64)


# ------------------------------------------------------------------ against the reference
def test_forward_and_cell_backward_match_the_equations(xp, device):
    rng = np.random.default_rng(1)
    case = random_rnn_case(rng, 4, 5, 3, 6, 7, scale=0.8)
    X, A0, P = _on(case, xp, device)
    a_ref, y_ref = ref_forward(*case)
    a, y, caches = xlstm.rnn_forward(X, A0, P)
    assert_close(a, a_ref, xp=xp, device=device, dtype=xp.float64)
    assert_close(y, y_ref, xp=xp, device=device, dtype=xp.float64)
    da_next = rng.standard_normal((5, 6))
    a_next, yt, cache = xlstm.rnn_cell_forward(X[:, :, 0], A0, P)
    assert_close(a_next, a_ref[:, :, 0], xp=xp, device=device, dtype=xp.float64)
    assert_close(yt, y_ref[:, :, 0], xp=xp, device=device, dtype=xp.float64)
    g = xlstm.rnn_cell_backward(to_xp(da_next, xp, device), cache)
    want = ref_cell_backward(da_next, a_ref[:, :, 0], case.a0, case.x[:, :, 0], case.params)
    for k, v in want.items():
        assert_close(g[k], v, xp=xp, device=device, dtype=xp.float64, err=k)


@pytest.mark.parametrize("T_da", [7, 3])
def test_backward_matches_the_equations(xp, device, T_da):
    rng = np.random.default_rng(2)
    case = random_rnn_case(rng, 4, 5, 3, 6, 7, scale=0.8)
    da = rng.standard_normal((5, 6, T_da))
    *_, caches = xlstm.rnn_forward(*_on(case, xp, device))
    g = xlstm.rnn_backward(to_xp(da, xp, device), caches)
    want = ref_backward(da, *case)
    assert list(g) == list(want)
    for k, v in want.items():
        assert_close(g[k], v, xp=xp, device=device, dtype=xp.float64, err=k)
    if T_da < 7:
        assert np.all(to_numpy(g["dx"])[:, :, T_da:] == 0.0)


def test_forward_equals_cell_loop(xp, device):
    rng = np.random.default_rng(3)
    X, A0, P = _on(random_rnn_case(rng, 3, 4, 2, 5, 6), xp, device)
    a, y, caches = xlstm.rnn_forward(X, A0, P)
    a_t = A0
    for t in range(6):
        a_t, y_t, cache = xlstm.rnn_cell_forward(X[:, :, t], a_t, P)
        assert_close(a[:, :, t], a_t, xp=xp, device=device, rtol=1e-12, atol=1e-14)
        assert_close(y[:, :, t], y_t, xp=xp, device=device, rtol=1e-12, atol=1e-14)
        for field, want in zip(xlstm.RNNCache._fields[:3], cache[:3]):
            assert_close(getattr(caches[0][t], field), want, xp=xp, device=device,
                         rtol=1e-12, atol=1e-14, err=field)


@pytest.mark.parametrize("chunk_rows", [1, 4096])
@pytest.mark.parametrize("T_da", [6, 2])
def test_fused_backward_equals_per_step_backward(xp, device, monkeypatch, chunk_rows, T_da):
    """Caches from rnn_forward take the engine; a hand-built pair takes rnn_cell_backward."""
    monkeypatch.setattr(_engine, "CHUNK_ROWS", chunk_rows)
    rng = np.random.default_rng(4)
    X, A0, P = _on(random_rnn_case(rng, 3, 4, 2, 5, 6), xp, device)
    *_, caches = xlstm.rnn_forward(X, A0, P)
    plain = ([tuple(step) for step in caches[0]], caches[1])  # what a notebook user builds
    assert type(plain) is tuple
    da = to_xp(rng.standard_normal((4, 5, T_da)), xp, device)
    fused, per_step = xlstm.rnn_backward(da, caches), xlstm.rnn_backward(da, plain)
    assert list(fused) == list(per_step)
    for k in fused:
        assert_close(per_step[k], fused[k], xp=xp, device=device, rtol=1e-11, atol=1e-13, err=k)


def test_inference_path_equals_cached_path(xp, device):
    args = _on(random_rnn_case(5, 3, 4, 3, 2, 5), xp, device)
    a, y, _ = xlstm.rnn_forward(*args)
    a2, y2, none = xlstm.rnn_forward(*args, return_caches=False)
    assert none is None
    exact = _compat.is_numpy(xp) or _compat.is_cupy(xp)  # see test_engine
    for mine, ref in ((a2, a), (y2, y)):
        assert_close(mine, ref, xp=xp, device=device, rtol=0 if exact else 1e-15, atol=0)


def test_float32_matches_float64_truth(xp, device):
    rng = np.random.default_rng(6)
    case = random_rnn_case(rng, 6, 8, 3, 4, 10)
    da = rng.standard_normal((8, 4, 10))
    a, y, caches = xlstm.rnn_forward(*case)
    truth = {"a": a, "y": y, **xlstm.rnn_backward(da, caches)}
    f32 = xp.float32
    a, y, caches = xlstm.rnn_forward(*_on(case, xp, device, f32))
    got = {"a": a, "y": y, **xlstm.rnn_backward(to_xp(da, xp, device, f32), caches)}
    for k, want in truth.items():
        assert_array(got[k], xp=xp, device=device, shape=want.shape, dtype=f32)
        err = np.max(np.abs(to_numpy(got[k]) - want)) / np.max(np.abs(want))
        assert err < 1e-5, f"{k}: float32 relative error {err:.2e}"


# -------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize(
    "n_x, n_a, m, T, T_da",
    [(3, 4, 2, 3, 3), (2, 5, 1, 1, 1), (4, 3, 3, 4, 2)],
)
def test_gradcheck_every_gradient(n_x, n_a, m, T, T_da):
    """Central differences in float64 for dx, da0, dWax, dWaa and dba."""
    rng = np.random.default_rng(n_x * 100 + n_a * 10 + T)
    case = random_rnn_case(rng, n_x, n_a, 2, m, T, scale=0.8)
    G = rng.standard_normal((n_a, m, T_da))
    g = xlstm.rnn_backward(G, xlstm.rnn_forward(*case)[2])

    def objective(d):
        c = RNNCase.of({**case.arrays(), **d})
        a = xlstm.rnn_forward(*c, return_caches=False)[0]
        return float(np.sum(G * a[:, :, :T_da]))

    inputs = {k: v for k, v in case.arrays().items() if k not in ("Wya", "by")}
    numeric = central_differences(objective, inputs)
    assert set(g) == {"d" + k for k in numeric}
    for name, num in numeric.items():
        err = np.max(np.abs(num - g["d" + name])) / max(1.0, np.max(np.abs(num)))
        assert err < 1e-8, f"d{name}: relative error {err:.2e}"


def _engine_run(cell, case, G, Gh=None):
    """Outputs, final state and every gradient of ``sum(G a) (+ sum(Gh a_T))`` through the
    engine, for ``cell`` and ``case`` (numpy arrays)."""
    n_a = case.a0.shape[0]
    stacks, _, _, state = _engine.forward(cell, case.x.transpose(2, 1, 0), (case.a0.T,),
                                       case.params, n_a, xp=NP, keep=True)
    dstate = None if Gh is None else (Gh.T,)
    dX, (da0,), grads = _engine.backward(cell, G.transpose(2, 1, 0), state, xp=NP, dstate=dstate)
    a = np.transpose(stacks["A"][1:], (2, 1, 0))
    return {"a": a, "dx": np.transpose(dX, (2, 1, 0)), "da0": da0.T, **grads}


@pytest.mark.parametrize("cell", [RNN_TANH, RNN_RELU], ids=lambda c: c.name)
def test_gradcheck_through_the_engine_with_bha(cell):
    """Both cells, with torch's second bias and a gradient on the final state."""
    rng = np.random.default_rng(7)
    case = random_rnn_case(rng, 3, 4, 2, 2, 4, scale=0.8, bha=True)
    G, Gh = rng.standard_normal((4, 2, 4)), rng.standard_normal((4, 2))
    got = _engine_run(cell, case, G, Gh)

    def objective(d):
        c = RNNCase.of({**case.arrays(), **d})
        stacks, _, _, _ = _engine.forward(cell, c.x.transpose(2, 1, 0), (c.a0.T,), c.params, 4,
                                          xp=NP, keep=False)
        a = np.transpose(stacks["A"][1:], (2, 1, 0))
        return float(np.sum(G * a) + np.sum(Gh * a[:, :, -1]))

    inputs = {k: v for k, v in case.arrays().items() if k not in ("Wya", "by")}
    numeric = central_differences(objective, inputs)
    assert np.any(got["a"] == 0.0) if cell is RNN_RELU else True  # relu really cuts units
    for name, num in numeric.items():
        mine = got["dba" if name == "bha" else "d" + name]  # bha adds to ba
        err = np.max(np.abs(num - mine)) / max(1.0, np.max(np.abs(num)))
        assert err < 1e-8, f"d{name}: relative error {err:.2e}"


@pytest.mark.parametrize("cell", [RNN_TANH, RNN_RELU], ids=lambda c: c.name)
def test_cells_through_the_engine_match_the_equations(xp, device, cell):
    """Both activations, with ``bha`` and a gradient on the final state, on every backend."""
    rng = np.random.default_rng(15)
    case = random_rnn_case(rng, 3, 5, 2, 4, 6, scale=0.8, bha=True)
    G, Gh = rng.standard_normal((5, 4, 6)), rng.standard_normal((5, 4))
    p = case.params
    act, deriv = {
        "tanh": (np.tanh, lambda a: 1 - a**2),
        "relu": (lambda z: np.maximum(z, 0), lambda a: (a > 0) * 1.0),
    }[cell.nonlinearity]
    a_ref = [case.a0]
    for t in range(6):
        z = p["Wax"] @ case.x[:, :, t] + p["Waa"] @ a_ref[-1] + p["ba"] + p["bha"]
        a_ref.append(act(z))
    want = {"dx": np.zeros(case.x.shape), "dWax": 0.0, "dWaa": 0.0, "dba": 0.0}
    d_a = Gh
    for t in reversed(range(6)):
        dz = (G[:, :, t] + d_a) * deriv(a_ref[t + 1])
        want["dx"][:, :, t] = p["Wax"].T @ dz
        want["dWax"] = want["dWax"] + dz @ case.x[:, :, t].T
        want["dWaa"] = want["dWaa"] + dz @ a_ref[t].T
        want["dba"] = want["dba"] + dz.sum(axis=1, keepdims=True)
        d_a = p["Waa"].T @ dz
    want["da0"] = d_a
    if cell is RNN_RELU:  # some units are cut, some pass
        assert 0 < np.mean(np.stack(a_ref[1:]) == 0) < 1
    X, A0 = to_xp(case.x, xp, device), to_xp(case.a0, xp, device)
    P = to_xp(p, xp, device)
    tr = xp.matrix_transpose
    stacks, _, _, state = _engine.forward(cell, xp.permute_dims(X, (2, 1, 0)), (tr(A0),), P, 5,
                                          xp=xp, keep=True)
    dX, (da0,), grads = _engine.backward(cell, xp.permute_dims(to_xp(G, xp, device), (2, 1, 0)),
                                         state, xp=xp,
                                         dstate=(to_xp(Gh.T, xp, device),))
    a = xp.permute_dims(stacks["A"][1:, ...], (2, 1, 0))
    assert_close(a, np.stack(a_ref[1:], axis=-1), xp=xp, device=device, dtype=xp.float64)
    got = {"dx": xp.permute_dims(dX, (2, 1, 0)), "da0": tr(da0), **grads}
    assert list(got) == ["dx", "da0", "dWax", "dWaa", "dba"]
    for k, v in want.items():
        assert_close(got[k], v, xp=xp, device=device, dtype=xp.float64, err=k)


# -------------------------------------------------------------------- torch's nn.RNN
@pytest.mark.parametrize("accel", [True, False], ids=["accelerated", "array-path"])
@pytest.mark.parametrize("cell", [RNN_TANH, RNN_RELU], ids=lambda c: c.name)
def test_matches_torch_nn_rnn(cell, accel):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    rng = np.random.default_rng(8)
    n_x, n_a, m, T = 3, 5, 4, 6
    case = random_rnn_case(rng, n_x, n_a, 2, m, T, bha=True)
    G, Gh = rng.standard_normal((n_a, m, T)), rng.standard_normal((n_a, m))
    with xlstm.accelerators(accel):
        got = _engine_run(cell, case, G, Gh)
    rnn = torch.nn.RNN(n_x, n_a, nonlinearity=cell.nonlinearity).double()
    p = case.params
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.tensor(p["Wax"]))
        rnn.weight_hh_l0.copy_(torch.tensor(p["Waa"]))
        rnn.bias_ih_l0.copy_(torch.tensor(p["ba"][:, 0]))
        rnn.bias_hh_l0.copy_(torch.tensor(p["bha"][:, 0]))
    x = torch.tensor(np.transpose(case.x, (2, 1, 0)), requires_grad=True)  # (T, m, n_x)
    h0 = torch.tensor(case.a0.T[None], requires_grad=True)  # (1, m, n_a)
    out, h_n = rnn(x, h0)
    loss = (out * torch.tensor(np.transpose(G, (2, 1, 0)))).sum() + (
        h_n[0] * torch.tensor(Gh.T)).sum()
    loss.backward()
    tol = {"rtol": 1e-12, "atol": 1e-14}
    np.testing.assert_allclose(got["a"], np.transpose(out.detach().numpy(), (2, 1, 0)), **tol)
    np.testing.assert_allclose(got["a"][:, :, -1], h_n.detach().numpy()[0].T, **tol)
    want = {"dx": np.transpose(x.grad.numpy(), (2, 1, 0)), "da0": h0.grad.numpy()[0].T,
            "dWax": rnn.weight_ih_l0.grad.numpy(), "dWaa": rnn.weight_hh_l0.grad.numpy(),
            "dba": rnn.bias_ih_l0.grad.numpy()[:, None]}
    np.testing.assert_allclose(rnn.bias_hh_l0.grad.numpy()[:, None], got["dba"], **tol)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, err_msg=k, rtol=1e-11, atol=1e-13)


# ------------------------------------------------- accelerated path == array path, bit for bit
@pytest.mark.skipif(not HAS_NUMBA, reason=NO_NUMBA)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bha", [False, True], ids=["ba", "ba+bha"])
@pytest.mark.parametrize("cell", [RNN_TANH, RNN_RELU], ids=lambda c: c.name)
@pytest.mark.parametrize(("m", "T", "T_da", "chunk_rows"),
                         [(4, 7, 7, 4096), (3, 9, 5, 6), (1, 1, 1, 4096)])
def test_accelerated_path_is_bit_identical(monkeypatch, cell, bha, dtype, m, T, T_da, chunk_rows):
    """The numba loops run the cell's own step (relu and sign included) with the same bits."""
    from xlstm.accel.cpu import loops as _cpu

    monkeypatch.setattr(_engine, "CHUNK_ROWS", chunk_rows)
    rng = np.random.default_rng(9)
    case = random_rnn_case(rng, 4, 6, 2, m, T, bha=bha, dtype=dtype)
    G = rng.standard_normal((6, m, T_da)).astype(dtype)
    Gh = rng.standard_normal((6, m)).astype(dtype)
    calls = spy_on_loops(monkeypatch, _cpu.Loops)
    runs = {}
    for accel in (True, False):
        with xlstm.accelerators(accel):
            n_a = 6
            x, a0 = case.x.transpose(2, 1, 0), case.a0.T  # the engine's layout
            stacks, _, _, state = _engine.forward(cell, x, (a0,), case.params, n_a, xp=NP,
                                                  keep=True)
            inf, _, _, _ = _engine.forward(cell, x, (a0,), case.params, n_a, xp=NP, keep=False)
            dX, (da0,), grads = _engine.backward(cell, G.transpose(2, 1, 0), state, xp=NP,
                                                 dstate=(Gh.T,))
            runs[accel] = {"A": stacks["A"], "H": state.H, "inference A": inf["A"],
                           "dX": dX, "da0": da0, **grads}
        if accel:
            assert "forward" in calls and calls[-1] == "backward"  # one call per time chunk
    assert runs[False]["dX"].dtype == dtype
    for k, want in runs[False].items():
        np.testing.assert_array_equal(runs[True][k], want, err_msg=k, strict=True)


@pytest.mark.skipif(not HAS_NUMBA, reason=NO_NUMBA)
def test_public_api_is_bit_identical_on_both_paths():
    rng = np.random.default_rng(10)
    case = random_rnn_case(rng, 3, 4, 3, 2, 5)
    da = rng.standard_normal((4, 2, 5))
    runs = []
    for accel in (True, False):
        with xlstm.accelerators(accel):
            a, y, caches = xlstm.rnn_forward(*case)
            runs.append({"a": a, "y": y, **xlstm.rnn_backward(da, caches)})
    for k in runs[1]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k, strict=True)


# ------------------------------------------------------------------ inputs stay untouched
def test_no_input_is_mutated(xp, device):
    rng = np.random.default_rng(11)
    case = random_rnn_case(rng, 3, 4, 2, 3, 4)
    da = rng.standard_normal((4, 3, 4))
    X, A0, P = _on(case, xp, device)
    DA = to_xp(da, xp, device)
    *_, caches = xlstm.rnn_forward(X, A0, P)
    xlstm.rnn_backward(DA, caches)
    xlstm.rnn_backward(DA, ([tuple(c) for c in caches[0]], caches[1]))
    a_next, _, cache = xlstm.rnn_cell_forward(X[:, :, 0], A0, P)
    xlstm.rnn_cell_backward(A0, cache)
    for mine, orig in ((X, case.x), (A0, case.a0), (DA, da)):
        np.testing.assert_array_equal(to_numpy(mine), orig)
    for k in case.params:
        np.testing.assert_array_equal(to_numpy(P[k]), case.params[k])


def test_later_writes_do_not_change_the_gradients():
    """Writing into results, into x or into a parameter array, or rebinding a key, after
    the forward pass leaves both backward passes as they were."""
    rng = np.random.default_rng(12)
    case = random_rnn_case(rng, 3, 4, 2, 3, 4)
    da = rng.standard_normal((4, 3, 4))
    want = xlstm.rnn_backward(da, xlstm.rnn_forward(*case)[2])
    cell_want = xlstm.rnn_cell_backward(da[:, :, 0],
                                        xlstm.rnn_cell_forward(case.x[:, :, 0], case.a0,
                                                               case.params)[2])
    for change in ("write", "rebind"):
        x, a0 = case.x.copy(), case.a0.copy()
        P = {k: v.copy() for k, v in case.params.items()}
        a, y, caches = xlstm.rnn_forward(x, a0, P)
        a_next, yt, cache = xlstm.rnn_cell_forward(x[:, :, 0], a0, P)
        for arr in (a, y, a_next, yt, x, a0):
            arr[...] = 5.0
        for k in ("Wax", "Waa", "ba"):
            if change == "write":
                P[k][...] = 9.0
            else:
                P[k] = np.full_like(P[k], -9.0)
        got = xlstm.rnn_backward(da, caches)
        for v in got.values():
            v[...] = 1e3  # results of a backward pass are fresh arrays
        got = xlstm.rnn_backward(da, caches)
        cell_got = xlstm.rnn_cell_backward(da[:, :, 0], cache)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{change} {k}")
        for k in cell_want:
            np.testing.assert_array_equal(cell_got[k], cell_want[k], err_msg=f"{change} {k}")


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_caches_copy_deepcopy_and_pickle(xp, device, how):
    """The caches survive copy.copy, copy.deepcopy and a pickle round trip: the same
    per-step views and the same gradients."""
    rng = np.random.default_rng(13)
    X, A0, P = _on(random_rnn_case(rng, 3, 4, 2, 3, 4), xp, device)
    *_, caches = xlstm.rnn_forward(X, A0, P)
    da = to_xp(rng.standard_normal((4, 3, 4)), xp, device)
    again = copy_or_skip(how, xp, device)(caches)
    assert type(again) is xlstm.RNNCaches
    assert_caches_survive(again, caches, xlstm.rnn_backward, da, ("a_next", "a_prev", "xt"),
                          xp=xp, device=device)


def test_step_caches_are_views_into_one_state():
    case = random_rnn_case(14, 2, 3, 2, 2, 4)
    *_, caches = xlstm.rnn_forward(*case)
    for step in caches[0]:
        assert np.shares_memory(step.a_next, caches.state.A)
        assert step.parameters is caches.state.params and step.parameters is not case.params
    assert len(caches[0][1:3]) == 2 and caches[0][-1].a_next.shape == (3, 2)
    with pytest.raises(IndexError):
        caches[0][4]


# ------------------------------------------------------------------------------ the cells
def test_cells():
    import pickle

    assert (RNN_TANH.name, RNN_RELU.name) == ("rnn_tanh", "rnn_relu")
    assert pickle.loads(pickle.dumps(RNN_RELU)) is RNN_RELU
    assert RNN_TANH.param_keys({"Wax": 0, "Waa": 0, "ba": 0}) == ("Wax", "Waa", "ba")
    assert RNN_TANH.param_keys({"bha": 0}) == ("Wax", "Waa", "ba", "bha")
    with pytest.raises(ValueError, match="nonlinearity must be one of 'tanh', 'relu'"):
        RNNCell("sigmoid")


# ------------------------------------------------------------------------------ bad input
N_X, N_A, N_Y, M, T = 3, 4, 2, 5, 6


def _good():
    x, a0, p = random_rnn_case(0, N_X, N_A, N_Y, M, T)
    return {"x": x, "a0": a0, "p": p}


def _with(p, key, value):
    return {k: v for k, v in p.items() if k != key} if value is None else {**p, key: value}


FORWARD_CASES = {
    "missing Wax": (KeyError, "parameters is missing 'Wax'",
                    lambda d: {**d, "p": _with(d["p"], "Wax", None)}),
    "missing by": (KeyError, "parameters is missing 'by'",
                   lambda d: {**d, "p": _with(d["p"], "by", None)}),
    "Waa shape": (ValueError, "parameters['Waa'] has n_a=5",
                  lambda d: {**d, "p": _with(d["p"], "Waa", np.ones((N_A + 1, N_A)))}),
    "ba shape": (ValueError, "parameters['ba'] must be 2-D",
                 lambda d: {**d, "p": _with(d["p"], "ba", np.ones(N_A))}),
    "Wya shape": (ValueError, "parameters['Wya'] has n_a=5",
                  lambda d: {**d, "p": _with(d["p"], "Wya", np.ones((N_Y, N_A + 1)))}),
    "by shape": (ValueError, "parameters['by'] has n_y=3",
                 lambda d: {**d, "p": _with(d["p"], "by", np.ones((N_Y + 1, 1)))}),
    "x rank": (ValueError, "x must be 3-D", lambda d: {**d, "x": d["x"][:, :, 0]}),
    "x n_x": (ValueError, "x has n_x=2", lambda d: {**d, "x": d["x"][:2]}),
    "a0 n_a": (ValueError, "a0 has n_a=3", lambda d: {**d, "a0": d["a0"][:3]}),
    "a0 m": (ValueError, "a0 has m=4", lambda d: {**d, "a0": d["a0"][:, :4]}),
    "x int": (TypeError, "x must have a real floating dtype",
              lambda d: {**d, "x": d["x"].astype(np.int64)}),
    "dtype mix": (TypeError, "a0 is float32", lambda d: {**d, "a0": d["a0"].astype(np.float32)}),
    "Waa dtype": (TypeError, "parameters['Waa'] is float32",
                  lambda d: {**d, "p": _with(d["p"], "Waa", d["p"]["Waa"].astype(np.float32))}),
    "list": (TypeError, "x must be an array", lambda d: {**d, "x": d["x"].tolist()}),
    "None a0": (TypeError, "a0 must be an array, got None", lambda d: {**d, "a0": None}),
    "params type": (TypeError, "parameters must be a dict", lambda d: {**d, "p": [1, 2]}),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_errors_name_the_argument(case):
    exc, text, make = FORWARD_CASES[case]
    d = make(_good())
    with pytest.raises(exc) as info:
        xlstm.rnn_forward(d["x"], d["a0"], d["p"])
    assert text in str(info.value)
    if case not in ("x rank", "x n_x", "list"):
        xt = d["x"][:, :, 0] if getattr(d["x"], "ndim", 0) == 3 else d["x"]
        with pytest.raises(exc) as info:
            xlstm.rnn_cell_forward(xt, d["a0"], d["p"])
        assert text.replace("x ", "xt ").replace("a0", "a_prev") in str(info.value)


def test_mixed_namespaces_and_devices_are_refused(backend_named):
    strict, dev = backend_named("strict")
    d = _good()
    with pytest.raises(TypeError, match="mixed array namespaces: x is .* but a0 is"):
        xlstm.rnn_forward(d["x"], strict.asarray(d["a0"]), d["p"])
    P = {k: strict.asarray(v) for k, v in d["p"].items()}
    with pytest.raises(TypeError, match=r"parameters\['Wax'\]"):
        xlstm.rnn_forward(strict.asarray(d["x"]), strict.asarray(d["a0"]),
                          {**P, "Wax": d["p"]["Wax"]})
    _, other = backend_named("strict-device1")
    with pytest.raises(ValueError, match="a0"):
        xlstm.rnn_forward(strict.asarray(d["x"]), strict.asarray(d["a0"], device=other), P)


def test_cell_backward_errors():
    d = _good()
    *_, cache = xlstm.rnn_cell_forward(d["x"][:, :, 0], d["a0"], d["p"])
    da = np.ones((N_A, M))
    with pytest.raises(TypeError, match="cache must be the 4-tuple"):
        xlstm.rnn_cell_backward(da, tuple(cache)[:3])
    with pytest.raises(TypeError, match="cache must be the 4-tuple"):
        xlstm.rnn_cell_backward(da, list(cache))
    with pytest.raises(ValueError, match="da_next has m=4"):
        xlstm.rnn_cell_backward(da[:, :4], cache)
    with pytest.raises(ValueError, match="cache.a_prev has n_a=3"):
        xlstm.rnn_cell_backward(da, cache._replace(a_prev=cache.a_prev[:3]))
    with pytest.raises(KeyError, match="parameters is missing 'Waa'"):
        xlstm.rnn_cell_backward(da, cache._replace(parameters={"Wax": cache.parameters["Wax"]}))
    with pytest.raises(TypeError, match="da_next is float32"):
        xlstm.rnn_cell_backward(da.astype(np.float32), cache)
    g = xlstm.rnn_cell_backward(da, tuple(cache))  # a hand-built plain tuple works
    assert set(g) == {"dxt", "da_prev", "dWax", "dWaa", "dba"}


def test_backward_errors_and_forged_caches():
    d = _good()
    *_, caches = xlstm.rnn_forward(d["x"], d["a0"], d["p"])
    da = np.ones((N_A, M, T))
    with pytest.raises(TypeError, match="caches must be the pair"):
        xlstm.rnn_backward(da, caches[0])
    with pytest.raises(ValueError, match="da covers T_da=7 steps"):
        xlstm.rnn_backward(np.ones((N_A, M, T + 1)), caches)
    with pytest.raises(ValueError, match="da has m=4"):
        xlstm.rnn_backward(da[:, :4], caches)
    with pytest.raises(TypeError, match="da is float32"):
        xlstm.rnn_backward(da.astype(np.float32), caches)
    lstm_caches = xlstm.lstm_forward(d["x"], d["a0"], xlstm.init_params(N_X, N_A, N_Y))[3]
    with pytest.raises(TypeError, match="caches.state is not the forward state of rnn_forward"):
        xlstm.rnn_backward(da, xlstm.RNNCaches(caches[0], caches[1], lstm_caches.state))
    st = caches.state
    forged = {
        "H": (ValueError, r"caches.state.H has shape \(5, 5, 4\)", st._replace(H=st.H[:5])),
        "n_a": (ValueError, "caches.state.n_a must be a positive int", st._replace(n_a=0)),
        "n_a mismatch": (ValueError, "caches.state.params has n_a=4", st._replace(n_a=3)),
        "params": (TypeError, "caches.state.params must be the parameter dict",
                   st._replace(params=[1])),
        "X dtype": (TypeError, "caches.state.X is float32",
                    st._replace(X=st.X.astype(np.float32))),
    }
    for name, (exc, text, state) in forged.items():
        with pytest.raises(exc, match=text):
            xlstm.rnn_backward(da, xlstm.RNNCaches(caches[0], caches[1], state))
    with pytest.raises(ValueError, match="caches holds no steps"):
        xlstm.rnn_backward(da, ([], d["x"]))
    with pytest.raises(TypeError, match="4-field per-step caches"):
        xlstm.rnn_backward(da, ([(1, 2)], d["x"]))
