"""The GRU cell on the engine: torch's equations, every gradient, every route bit for bit."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers import assert_array, assert_close, spy_on_loops, to_numpy, to_xp
from oracles import (
    GRU_PARAM_KEYS,
    central_differences,
    numpy_gru_forward,
    random_gru_case,
)

import xlstm
from xlstm._lib import compat as _compat
from xlstm.cells.gru import GRU_CELL, TORCH_GATES
from xlstm.engine import loop as _engine

DTYPES = (np.float32, np.float64)


def _run(xp, device, case, da, dstate=None, *, dtype=None):
    """Forward (kept) and backward through the engine; everything by name, on the host
    layout of the engine: ``A`` and the saved stacks, ``dx`` ``(T_da, m, n_x)``, ``da0``
    ``(m, n_a)`` and the parameter gradients."""
    dtype = xp.float64 if dtype is None else dtype
    x, a0 = to_xp(case.x, xp, device, dtype), to_xp(case.a0, xp, device, dtype)
    params = to_xp(case.params, xp, device, dtype)
    n_a = case.a0.shape[0]
    stacks, _, y, state = _engine.forward(GRU_CELL, xp.permute_dims(x, (2, 1, 0)),
                                          (xp.matrix_transpose(a0),), params, n_a, xp=xp,
                                          keep=True)
    assert y is None and stacks.keys() == {"A"}
    ds = None if dstate is None else (to_xp(dstate, xp, device, dtype),)
    dX, (da0,), grads = _engine.backward(GRU_CELL, xp.permute_dims(to_xp(da, xp, device, dtype),
                                                                   (2, 1, 0)),
                                         state, xp=xp, dstate=ds)
    out = {k: getattr(state, k) for k in ("A", "S", "N", "HN")}
    out.update(dx=dX, da0=da0, **grads)
    return out


def _loss(arrays, G, Gs):
    """``sum(G * a_t) + sum(Gs * a_T_da)`` over the first ``T_da`` steps (reference forward)."""
    a = numpy_gru_forward(arrays)
    T_da = G.shape[-1]
    loss = np.sum(G * a[:, :, :T_da])
    if Gs is not None:
        loss += np.sum(Gs * a[:, :, T_da - 1].T)
    return loss


# ----------------------------------------------------------------------- the cell itself
def test_cell_declares_torch_layout_and_keys():
    assert GRU_CELL.name == "gru" and GRU_CELL.gates == TORCH_GATES == ("r", "z", "n")
    assert GRU_CELL.n_gates == 3 and GRU_CELL.split and GRU_CELL.state_names == ("A",)
    assert GRU_CELL.weight_keys == ("Wr", "Wz", "Wn")
    assert GRU_CELL.bias_keys == ("br", "bz", "bn")
    assert GRU_CELL.hidden_bias_keys == ("bhr", "bhz", "bhn")
    case = random_gru_case(0)
    assert set(GRU_CELL.param_keys(case.params)) == set(GRU_PARAM_KEYS)
    assert "gru" in repr(GRU_CELL) and GRU_CELL.Cache._fields[:4] == ("A", "S", "N", "HN")


# ------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("zero_state", [False, True], ids=["a0", "zeros"])
def test_forward_matches_the_equations(xp, device, zero_state):
    """The engine's hidden states, gates and candidate against a plain NumPy GRU."""
    case = random_gru_case(1, n_x=3, n_a=5, m=4, T=6, scale=0.8)
    if zero_state:
        case = case._replace(a0=np.zeros_like(case.a0))
    x, a0 = to_xp(case.x, xp, device), to_xp(case.a0, xp, device)
    P = to_xp(case.params, xp, device)
    state0 = (None,) if zero_state else (xp.matrix_transpose(a0),)
    stacks, _, _, state = _engine.forward(GRU_CELL, xp.permute_dims(x, (2, 1, 0)), state0, P, 5,
                                          xp=xp, keep=True)
    want = numpy_gru_forward(case.arrays())  # (n_a, m, T)
    A = stacks["A"]
    assert_array(A, xp=xp, device=device, shape=(7, 4, 5), dtype=xp.float64)
    assert_close(A[0, ...], case.a0.T, xp=xp, device=device, dtype=xp.float64, rtol=0, atol=0)
    assert_close(A[1:, ...], want.transpose(2, 1, 0), xp=xp, device=device, dtype=xp.float64,
                 rtol=1e-12, atol=1e-14)
    # the saved stacks: the gates and the candidate's recurrent term, step by step
    p, n = case.params, 5
    a_prev = np.concatenate([case.a0[:, :, None], want[:, :, :-1]], axis=2)
    for t in range(6):
        z_in = np.concatenate([a_prev[:, :, t], case.x[:, :, t]])
        hn = p["Wn"][:, :n] @ a_prev[:, :, t] + p["bhn"]
        r = 1.0 / (1.0 + np.exp(-(p["Wr"] @ z_in + p["br"] + p["bhr"])))
        z = 1.0 / (1.0 + np.exp(-(p["Wz"] @ z_in + p["bz"] + p["bhz"])))
        cand = np.tanh(p["Wn"][:, n:] @ case.x[:, :, t] + p["bn"] + r * hn)
        for got, ref in ((state.S[t, :, :n], r), (state.S[t, :, n:], z),
                         (state.HN[t, ...], hn), (state.N[t, ...], cand)):
            assert_close(got, ref.T, xp=xp, device=device, dtype=xp.float64,
                         rtol=1e-12, atol=1e-14)


def test_inference_equals_the_kept_forward(xp, device):
    case = random_gru_case(2, n_x=4, n_a=3, m=2, T=9)
    x, a0 = to_xp(case.x, xp, device), to_xp(case.a0, xp, device)
    P = to_xp(case.params, xp, device)
    x, a0 = xp.permute_dims(x, (2, 1, 0)), xp.matrix_transpose(a0)  # the engine's layout
    kept, _, _, state = _engine.forward(GRU_CELL, x, (a0,), P, 3, xp=xp, keep=True)
    inf, _, _, none = _engine.forward(GRU_CELL, x, (a0,), P, 3, xp=xp, keep=False)
    assert none is None and state is not None
    # bit for bit where the engine chooses the layout of its GEMM operands (as test_engine)
    exact = _compat.is_numpy(xp) or _compat.is_cupy(xp)
    assert_close(inf["A"], kept["A"], xp=xp, device=device, rtol=0 if exact else 1e-15, atol=0)


@pytest.mark.parametrize("chunk_rows", [1, 6, 4096])
def test_chunked_input_gemm_gives_the_same_results(xp, device, monkeypatch, chunk_rows):
    """Time chunks of 1, 2 (6 rows / m = 3) and all steps, forward and backward."""
    rng = np.random.default_rng(3)
    case = random_gru_case(rng, n_x=4, n_a=3, m=3, T=7)
    da, ds = rng.standard_normal((3, 3, 5)), rng.standard_normal((3, 3))
    whole = _run(xp, device, case, da, ds)
    monkeypatch.setattr(_engine, "CHUNK_ROWS", chunk_rows)
    chunked = _run(xp, device, case, da, ds)
    assert chunked.keys() == whole.keys()
    for k, v in whole.items():
        assert_close(chunked[k], v, xp=xp, device=device, rtol=1e-13, atol=1e-15, err=k)


# ----------------------------------------------------------------------------- backward
GRADCHECK_CASES = {
    "full": (3, 4, 2, 4, 4, False),  # n_x, n_a, m, T, T_da, with dstate
    "full+dstate": (3, 4, 2, 4, 4, True),
    "prefix+dstate": (2, 3, 3, 5, 3, True),
    "one step": (2, 5, 1, 1, 1, True),
}


@functools.cache
def _gradcheck_case(name):
    """The case, ``G``, ``Gs`` and the central-difference gradients (computed once)."""
    n_x, n_a, m, T, T_da, with_ds = GRADCHECK_CASES[name]
    rng = np.random.default_rng(sum(GRADCHECK_CASES[name][:5]))
    case = random_gru_case(rng, n_x, n_a, m, T, scale=0.8)
    G = rng.standard_normal((n_a, m, T_da))
    Gs = rng.standard_normal((m, n_a)) if with_ds else None
    full = case.arrays()
    numeric = central_differences(lambda d: _loss({**full, **d}, G, Gs), full)
    return case, G, Gs, numeric


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_every_gradient(xp, device, name):
    """float64 central differences for dx, da0 and every parameter, with and without a
    gradient on the final state, over all steps or the first few."""
    case, G, Gs, numeric = _gradcheck_case(name)
    got = _run(xp, device, case, G, Gs)
    T_da = G.shape[-1]
    got["x"], got["a0"] = got.pop("dx"), got.pop("da0")
    want = {"x": numeric["x"][:, :, :T_da].transpose(2, 1, 0), "a0": numeric["a0"].T}
    want.update((k, numeric[k]) for k in GRU_PARAM_KEYS)
    assert np.all(numeric["x"][:, :, T_da:] == 0.0)  # later steps do not reach the loss
    for k, num in want.items():
        mine = got[k] if k in ("x", "a0") else got["d" + k]
        assert_array(mine, xp=xp, device=device, shape=num.shape, dtype=xp.float64)
        err = np.max(np.abs(num - to_numpy(mine))) / max(1.0, np.max(np.abs(num)))
        assert err < 1e-8, f"d{k}: relative error {err:.2e}"
    assert set(got) - {"A", "S", "N", "HN", "x", "a0"} == {"d" + k for k in GRU_PARAM_KEYS}


def test_float32_matches_the_float64_truth(xp, device):
    rng = np.random.default_rng(4)
    case = random_gru_case(rng, n_x=6, n_a=8, m=4, T=10)
    da, ds = rng.standard_normal((8, 4, 10)), rng.standard_normal((4, 8))
    NP = _compat.default_namespace()
    truth = _run(NP, None, case, da, ds)
    got = _run(xp, device, case, da, ds, dtype=xp.float32)
    for k, want in truth.items():
        assert_array(got[k], xp=xp, device=device, shape=want.shape, dtype=xp.float32)
        err = np.max(np.abs(to_numpy(got[k]) - want)) / np.max(np.abs(want))
        assert err < 1e-5, f"{k}: float32 relative error {err:.2e}"


def test_the_forward_snapshots_the_parameters():
    """The kept state holds copies of the nine parameters: writing into the caller's arrays
    afterwards changes nothing that the backward pass computes."""
    rng = np.random.default_rng(5)
    case = random_gru_case(rng, n_x=3, n_a=4, m=2, T=5)
    da = rng.standard_normal((4, 2, 5))
    NP = _compat.default_namespace()
    params = {k: v.copy() for k, v in case.params.items()}
    _, _, _, state = _engine.forward(GRU_CELL, case.x.transpose(2, 1, 0), (case.a0.T,), params,
                                     4, xp=NP, keep=True)
    assert state.params.keys() == set(GRU_PARAM_KEYS)
    for v in params.values():
        v[...] = 7.0
    got = _engine.backward(GRU_CELL, da.transpose(2, 1, 0), state, xp=NP)
    want = _run(NP, None, case, da)
    cpu = _compat.device_of(want["dx"])
    assert_close(got[0], want["dx"], xp=NP, device=cpu, rtol=0, atol=0)
    for k, v in got[2].items():
        assert_close(v, want[k], xp=NP, device=cpu, rtol=0, atol=0, err=k)


# -------------------------------------------------------------------- compiled CPU loops
def _both_paths(monkeypatch, case, da, ds, dtype):
    """:func:`_run` on numpy with the accelerators on and off, plus the inference stack."""
    NP = _compat.default_namespace()
    n_a = case.a0.shape[0]
    res = []
    for on in (True, False):
        with xlstm.accelerators(on):
            out = _run(NP, None, case, da, ds, dtype=NP.float32 if dtype == np.float32 else None)
            inf, _, _, _ = _engine.forward(GRU_CELL, case.x.astype(dtype).transpose(2, 1, 0),
                                        (case.a0.astype(dtype).T,),
                                        {k: v.astype(dtype) for k, v in case.params.items()},
                                        n_a, xp=NP, keep=False)
            out["inference A"] = inf["A"]
        res.append(out)
    return res


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n_x", "n_a", "m", "T", "T_da", "chunk_rows", "scale"),
    [
        (3, 5, 4, 7, 7, 4096, 0.5),  # one chunk
        (4, 6, 3, 9, 5, 4096, 0.5),  # T_da < T
        (2, 3, 1, 1, 1, 4096, 0.5),  # one sample, one step
        (5, 7, 4, 11, 10, 8, 0.5),  # chunks of 2 steps, a short last chunk
        (6, 9, 2, 5, 5, 1, 0.5),  # chunks of one step
        (4, 5, 3, 6, 6, 4096, 1e3),  # saturated gates
    ],
)
def test_compiled_loops_are_bit_identical(monkeypatch, dtype, n_x, n_a, m, T, T_da,
                                          chunk_rows, scale):
    """numba's loops run the cell's own step: forward, saved stacks, inference and every
    gradient equal the array path's bit for bit (and the loops really ran)."""
    pytest.importorskip("numba", reason="numba is not installed")
    from xlstm.accel.cpu import loops as _cpu

    calls = spy_on_loops(monkeypatch, _cpu.Loops)
    monkeypatch.setattr(_engine, "CHUNK_ROWS", chunk_rows)
    rng = np.random.default_rng(T * 100 + n_a)
    case = random_gru_case(rng, n_x, n_a, m, T, scale=scale, x_scale=scale, dtype=dtype)
    da = rng.standard_normal((n_a, m, T_da)).astype(dtype)
    ds = rng.standard_normal((m, n_a)).astype(dtype)
    fast, plain = _both_paths(monkeypatch, case, da, ds, dtype)
    assert calls.count("backward") == 1 and "forward" in calls
    assert fast.keys() == plain.keys()
    for k, v in plain.items():
        assert fast[k].dtype == v.dtype == dtype, k
        assert np.all(np.isfinite(v)), k
        assert_close(fast[k], v, xp=_compat.default_namespace(), device=_compat.device_of(v),
                     rtol=0, atol=0, err=k)


# ------------------------------------------------------------------------ torch nn.GRU
def _to_torch(torch, params, n_x, n_a):
    """A float64 ``torch.nn.GRU`` holding ``params`` (rows in torch's gate order)."""
    gru = torch.nn.GRU(n_x, n_a, dtype=torch.float64)
    rows = {
        "weight_ih_l0": [params["W" + g][:, n_a:] for g in TORCH_GATES],
        "weight_hh_l0": [params["W" + g][:, :n_a] for g in TORCH_GATES],
        "bias_ih_l0": [params["b" + g][:, 0] for g in TORCH_GATES],
        "bias_hh_l0": [params["bh" + g][:, 0] for g in TORCH_GATES],
    }
    with torch.no_grad():
        for name, blocks in rows.items():
            getattr(gru, name).copy_(torch.from_numpy(np.concatenate(blocks)))
    return gru


def _from_torch_grads(gru, n_a):
    """The gradients of a ``torch.nn.GRU``'s parameters in the cell's names."""
    g = {k: v.grad.numpy() for k, v in gru.named_parameters()}
    out = {}
    for j, gate in enumerate(TORCH_GATES):
        rows = slice(j * n_a, (j + 1) * n_a)
        out["dW" + gate] = np.concatenate([g["weight_hh_l0"][rows], g["weight_ih_l0"][rows]], 1)
        out["db" + gate] = g["bias_ih_l0"][rows, None]
        out["dbh" + gate] = g["bias_hh_l0"][rows, None]
    return out


def test_matches_torch_nn_gru(xp, device):
    """Outputs, final state, dx, dh0 and every parameter gradient of ``torch.nn.GRU`` (float64
    autograd), with upstream gradients on the outputs and on the final state."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    rng = np.random.default_rng(6)
    n_x, n_a, m, T = 3, 5, 2, 6
    case = random_gru_case(rng, n_x, n_a, m, T)
    da, ds = rng.standard_normal((n_a, m, T)), rng.standard_normal((m, n_a))
    gru = _to_torch(torch, case.params, n_x, n_a)
    x = torch.tensor(case.x.transpose(2, 1, 0), requires_grad=True)  # (T, m, n_x)
    h0 = torch.tensor(case.a0.T[None], requires_grad=True)  # (1, m, n_a)
    out, h_n = gru(x, h0)
    ((out * torch.from_numpy(da.transpose(2, 1, 0))).sum()
     + (h_n[0] * torch.from_numpy(ds)).sum()).backward()
    got = _run(xp, device, case, da, ds)
    tol = {"xp": xp, "device": device, "dtype": xp.float64, "rtol": 1e-11, "atol": 1e-13}
    assert_close(got["A"][1:, ...], out.detach().numpy(), **tol, err="outputs")
    assert_close(got["A"][-1, ...], h_n[0].detach().numpy(), **tol, err="final state")
    assert_close(got["dx"], x.grad.numpy(), **tol, err="dx")
    assert_close(got["da0"], h0.grad[0].numpy(), **tol, err="dh0")
    want = _from_torch_grads(gru, n_a)
    assert want.keys() == {"d" + k for k in GRU_PARAM_KEYS}
    for k, v in want.items():
        assert_close(got[k], v, **tol, err=k)
