"""The seed API on every backend: the seed's numbers, internal consistency, gradients, dtypes."""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import (
    assert_array,
    assert_caches_survive,
    assert_close,
    copy_or_skip,
    to_numpy,
    to_xp,
)
from oracles import Case, central_differences, random_case, torch_lstm_forward

import xlstm
from xlstm.notebook import seed as sc


def pick(results, key):
    """``results['dWf']`` indexed as the seed prints it, for a key like ``'dWf[3][1]'``."""
    name, idx = re.fullmatch(r"(\w+)((?:\[\d+\])*)", key).groups()
    value = results[name]
    for i in re.findall(r"\d+", idx):
        value = value[int(i)] if isinstance(value, tuple) else value[int(i), ...]
    return value


def seed_check(results, expected, xp, device):
    for key, want in expected.items():
        got = pick(results, key)
        assert_close(got, np.asarray(want), xp=xp, device=device, dtype=xp.float64,
                     rtol=0, atol=1e-7, err=key)


# ------------------------------------------------------------------- the seed's four examples
def test_seed_cell_forward(xp, device):
    xt, a_prev, c_prev, params, _, _ = sc.cell_case()
    a_next, c_next, yt, cache = xlstm.lstm_cell_forward(
        to_xp(xt, xp, device), to_xp(a_prev, xp, device), to_xp(c_prev, xp, device),
        to_xp(params, xp, device),
    )
    assert len(cache) == 10
    for arr, shape in ((a_next, (5, 10)), (c_next, (5, 10)), (yt, (2, 10))):
        assert_array(arr, xp=xp, device=device, shape=shape, dtype=xp.float64)
    seed_check({"a_next": a_next, "c_next": c_next, "yt": yt, "cache": cache},
               sc.CELL_FORWARD, xp, device)


def test_seed_forward(xp, device):
    x, a0, params, _ = sc.sequence_case()
    X = to_xp(x, xp, device)
    a, y, c, caches = xlstm.lstm_forward(X, to_xp(a0, xp, device), to_xp(params, xp, device))
    assert len(caches) == 2 and caches[1] is X
    assert len(caches[0]) == 7
    assert_array(a, xp=xp, device=device, shape=(5, 10, 7), dtype=xp.float64)
    assert_array(y, xp=xp, device=device, shape=(2, 10, 7), dtype=xp.float64)
    assert_array(c, xp=xp, device=device, shape=(5, 10, 7), dtype=xp.float64)
    seed_check({"a": a, "y": y, "c": c, "caches": caches}, sc.FORWARD, xp, device)


def test_seed_cell_backward(xp, device):
    xt, a_prev, c_prev, params, da_next, dc_next = sc.cell_case()
    *_, cache = xlstm.lstm_cell_forward(
        to_xp(xt, xp, device), to_xp(a_prev, xp, device), to_xp(c_prev, xp, device),
        to_xp(params, xp, device),
    )
    g = xlstm.lstm_cell_backward(to_xp(da_next, xp, device), to_xp(dc_next, xp, device), cache)
    shapes = {"dxt": (3, 10), "da_prev": (5, 10), "dc_prev": (5, 10)}
    shapes.update({f"dW{k}": (5, 8) for k in "fico"}, **{f"db{k}": (5, 1) for k in "fico"})
    assert set(g) == set(shapes)
    for k, shape in shapes.items():
        assert_array(g[k], xp=xp, device=device, shape=shape, dtype=xp.float64)
    seed_check(g, sc.CELL_BACKWARD, xp, device)


def test_seed_backward(xp, device):
    x, a0, params, da = sc.sequence_case(zero_output=True)
    *_, caches = xlstm.lstm_forward(
        to_xp(x, xp, device), to_xp(a0, xp, device), to_xp(params, xp, device)
    )
    g = xlstm.lstm_backward(to_xp(da, xp, device), caches)
    assert list(g) == ["dx", "da0", "dWf", "dbf", "dWi", "dbi", "dWc", "dbc", "dWo", "dbo", "dc0"]
    assert_array(g["dx"], xp=xp, device=device, shape=(3, 10, 7), dtype=xp.float64)
    assert_array(g["da0"], xp=xp, device=device, shape=(5, 10), dtype=xp.float64)
    assert_array(g["dc0"], xp=xp, device=device, shape=(5, 10), dtype=xp.float64)
    seed_check(g, sc.BACKWARD, xp, device)


# ----------------------------------------------------------- sequence == loop of the cell
@pytest.mark.parametrize("with_c0", [False, True])
def test_forward_equals_cell_loop(xp, device, with_c0):
    rng = np.random.default_rng(3)
    x, a0, c0, params = random_case(rng, n_x=3, n_a=4, n_y=2, m=5, T=6)
    P = to_xp(params, xp, device)
    X = to_xp(x, xp, device)
    a_t, c_t = to_xp(a0, xp, device), to_xp(c0 if with_c0 else np.zeros_like(c0), xp, device)
    a, y, c, caches = xlstm.lstm_forward(X, to_xp(a0, xp, device), P,
                                         c0=c_t if with_c0 else None)
    for t in range(x.shape[2]):
        a_t, c_t, y_t, cache = xlstm.lstm_cell_forward(X[:, :, t], a_t, c_t, P)
        assert_close(a[:, :, t], a_t, xp=xp, device=device, rtol=1e-12, atol=1e-14)
        assert_close(c[:, :, t], c_t, xp=xp, device=device, rtol=1e-12, atol=1e-14)
        assert_close(y[:, :, t], y_t, xp=xp, device=device, rtol=1e-12, atol=1e-14)
        for field, want in zip(xlstm.LSTMCache._fields[:9], cache[:9]):
            assert_close(getattr(caches[0][t], field), want, xp=xp, device=device,
                         rtol=1e-12, atol=1e-14, err=field)
        snap = caches[0][t].params
        assert snap is not P and snap.keys() == P.keys()
        for k in P:
            assert_close(snap[k], P[k], xp=xp, device=device, rtol=0, atol=0)


@pytest.mark.parametrize("T_da", [6, 2])
def test_backward_equals_accumulated_cell_backward(xp, device, T_da):
    rng = np.random.default_rng(4)
    x, a0, c0, params = random_case(rng, n_x=3, n_a=4, n_y=2, m=5, T=6)
    *_, caches = xlstm.lstm_forward(to_xp(x, xp, device), to_xp(a0, xp, device),
                                    to_xp(params, xp, device), c0=to_xp(c0, xp, device))
    da = rng.standard_normal((4, 5, T_da))
    g = xlstm.lstm_backward(to_xp(da, xp, device), caches)
    da_next = np.zeros((4, 5))
    dc_next = np.zeros((4, 5))
    total = {k: 0.0 for k in g if k[:2] in ("dW", "db")}
    dx = np.zeros(x.shape)
    for t in reversed(range(T_da)):
        gt = xlstm.lstm_cell_backward(to_xp(da[:, :, t] + da_next, xp, device),
                                      to_xp(dc_next, xp, device), caches[0][t])
        gt = {k: to_numpy(v) for k, v in gt.items()}
        da_next, dc_next, dx[:, :, t] = gt["da_prev"], gt["dc_prev"], gt["dxt"]
        total = {k: total[k] + gt[k] for k in total}
    for k, want in {**total, "dx": dx, "da0": da_next, "dc0": dc_next}.items():
        assert_close(g[k], want, xp=xp, device=device, dtype=xp.float64, rtol=1e-11, atol=1e-13,
                     err=k)


# -------------------------------------------------------------------------------- gradcheck
def _objective(case, G):
    """L = sum(G * a[..., :T_da]): its gradient in a is exactly G."""
    a, _, _, _ = xlstm.lstm_forward(case.x, case.a0, case.params, c0=case.c0,
                                    return_caches=False)
    return float(np.sum(G * a[:, :, : G.shape[2]]))


@pytest.mark.parametrize(
    "n_x, n_a, m, T, T_da",
    [(3, 4, 2, 3, 3), (2, 5, 1, 1, 1), (4, 3, 3, 2, 2), (3, 2, 2, 4, 2)],
)
def test_gradcheck_every_gradient(n_x, n_a, m, T, T_da):
    """Central differences in float64 for dx, da0, dc0 and every dW*, db*."""
    rng = np.random.default_rng(n_x * 100 + n_a * 10 + T)
    case = random_case(rng, n_x, n_a, 2, m, T, scale=0.8)
    G = rng.standard_normal((n_a, m, T_da))
    *_, caches = xlstm.lstm_forward(case.x, case.a0, case.params, c0=case.c0)
    g = xlstm.lstm_backward(G, caches)
    full = case.arrays()
    # every input but the prediction layer, which does not touch a
    inputs = {k: v for k, v in full.items() if k not in ("Wy", "by")}
    numeric = central_differences(lambda d: _objective(Case.of({**full, **d}), G), inputs)
    assert set(g) == {"d" + k for k in numeric}
    for name, num in numeric.items():
        err = np.max(np.abs(num - g["d" + name])) / max(1.0, np.max(np.abs(num)))
        assert err < 1e-8, f"d{name}: relative error {err:.2e}"
    if T_da < T:
        assert np.all(g["dx"][:, :, T_da:] == 0.0)


# ----------------------------------------------------------------------------- float32
def test_float32_matches_float64_truth(xp, device):
    rng = np.random.default_rng(5)
    x, a0, c0, params = random_case(rng, n_x=6, n_a=8, n_y=3, m=4, T=10)
    da = rng.standard_normal((8, 4, 10))
    truth_fwd = xlstm.lstm_forward(x, a0, params, c0=c0)
    truth = dict(zip("ayc", truth_fwd[:3]), **xlstm.lstm_backward(da, truth_fwd[3]))
    f32 = xp.float32
    out = xlstm.lstm_forward(to_xp(x, xp, device, f32), to_xp(a0, xp, device, f32),
                             to_xp(params, xp, device, f32), c0=to_xp(c0, xp, device, f32))
    got = dict(zip("ayc", out[:3]), **xlstm.lstm_backward(to_xp(da, xp, device, f32), out[3]))
    for k, want in truth.items():
        assert_array(got[k], xp=xp, device=device, shape=want.shape, dtype=f32)
        err = np.max(np.abs(to_numpy(got[k]) - want)) / np.max(np.abs(want))
        assert err < 1e-5, f"{k}: float32 relative error {err:.2e}"


# ---------------------------------------------------------------------- torch autograd
def test_matches_torch_autograd():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    rng = np.random.default_rng(6)
    n_x, n_a, n_y, m, T = 3, 5, 4, 2, 6
    case = random_case(rng, n_x, n_a, n_y, m, T)
    da = rng.standard_normal((n_a, m, T))
    ref = torch_lstm_forward(torch, case.arrays())
    (ref.a * torch.tensor(da)).sum().backward()
    a, y, c, caches = xlstm.lstm_forward(case.x, case.a0, case.params, c0=case.c0)
    g = xlstm.lstm_backward(da, caches)
    for mine, theirs in ((a, ref.a), (y, ref.y), (c, ref.c)):
        np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=1e-12, atol=1e-14)
    want = ref.grads()  # the prediction layer does not touch a: no dWy, dby
    assert set(want) == set(g)
    for k, v in want.items():
        np.testing.assert_allclose(g[k], v, rtol=1e-11, atol=1e-13, err_msg=k)


# ------------------------------------------------------------------ inputs stay untouched
def test_no_input_is_mutated(xp, device):
    rng = np.random.default_rng(7)
    x, a0, c0, params = random_case(rng, n_x=3, n_a=4, n_y=2, m=3, T=4)
    da = rng.standard_normal((4, 3, 4))
    X, A0, C0, P, DA = (to_xp(v, xp, device) for v in (x, a0, c0, params, da))
    *_, caches = xlstm.lstm_forward(X, A0, P, c0=C0)
    xlstm.lstm_backward(DA, caches)
    a_n, c_n, _, cache = xlstm.lstm_cell_forward(X[:, :, 0], A0, C0, P)
    xlstm.lstm_cell_backward(A0, C0, cache)
    for mine, orig in ((X, x), (A0, a0), (C0, c0), (DA, da)):
        np.testing.assert_array_equal(to_numpy(mine), orig)
    for k in params:
        np.testing.assert_array_equal(to_numpy(P[k]), params[k])


def test_writing_into_results_does_not_change_backward():
    rng = np.random.default_rng(8)
    x, a0, c0, params = random_case(rng, n_x=3, n_a=4, n_y=2, m=3, T=4)
    da = rng.standard_normal((4, 3, 4))
    a, y, c, caches = xlstm.lstm_forward(x, a0, params, c0=c0)
    first = {k: v.copy() for k, v in xlstm.lstm_backward(da, caches).items()}
    a[...] = 7.0
    c[...] = -3.0
    y[...] = 0.0
    x[...] = 5.0  # the caller's own input, written after the forward pass
    for v in xlstm.lstm_backward(da, caches).values():
        v[...] = 1e3  # results of a backward pass are fresh arrays
    again = xlstm.lstm_backward(da, caches)
    for k, v in first.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_changing_params_after_forward_does_not_change_backward():
    """Writing into a parameter array, or rebinding a key of the dict, between the forward
    and the backward pass leaves the gradients as they were (sequence and cell caches)."""
    rng = np.random.default_rng(18)
    x, a0, c0, params = random_case(rng, n_x=3, n_a=4, n_y=2, m=3, T=4)
    da = rng.standard_normal((4, 3, 4))
    want = xlstm.lstm_backward(da, xlstm.lstm_forward(x, a0, params, c0=c0)[3])
    cell_want = xlstm.lstm_cell_backward(
        da[:, :, 0], da[:, :, 1], xlstm.lstm_cell_forward(x[:, :, 0], a0, c0, params)[3])
    for change in ("write", "rebind"):
        P = {k: v.copy() for k, v in params.items()}
        caches = xlstm.lstm_forward(x, a0, P, c0=c0)[3]
        cell_cache = xlstm.lstm_cell_forward(x[:, :, 0], a0, c0, P)[3]
        for k in ("Wf", "Wi", "Wc", "Wo", "bf", "bo"):
            if change == "write":
                P[k][...] = 9.0
            else:
                P[k] = np.full_like(P[k], -9.0)
        got = xlstm.lstm_backward(da, caches)
        cell_got = xlstm.lstm_cell_backward(da[:, :, 0], da[:, :, 1], cell_cache)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{change} {k}")
        for k in cell_want:
            np.testing.assert_array_equal(cell_got[k], cell_want[k], err_msg=f"{change} {k}")


def test_hand_built_seed_caches_use_the_per_step_path(xp, device):
    rng = np.random.default_rng(9)
    x, a0, c0, params = random_case(rng, n_x=2, n_a=3, n_y=2, m=4, T=5)
    *_, caches = xlstm.lstm_forward(to_xp(x, xp, device), to_xp(a0, xp, device),
                                    to_xp(params, xp, device), c0=to_xp(c0, xp, device))
    plain = ([tuple(step) for step in caches[0]], caches[1])  # what a seed user would build
    assert type(plain) is tuple
    da = to_xp(rng.standard_normal((3, 4, 3)), xp, device)
    fused, per_step = xlstm.lstm_backward(da, caches), xlstm.lstm_backward(da, plain)
    assert list(fused) == list(per_step)
    for k in fused:
        assert_close(per_step[k], fused[k], xp=xp, device=device,
                     rtol=1e-12, atol=1e-14, err=k)


def test_inference_path_equals_cached_path(xp, device):
    rng = np.random.default_rng(10)
    x, a0, c0, params = random_case(rng, n_x=3, n_a=4, n_y=3, m=2, T=5)
    args = (to_xp(x, xp, device), to_xp(a0, xp, device), to_xp(params, xp, device))
    a, y, c, caches = xlstm.lstm_forward(*args, c0=to_xp(c0, xp, device))
    a2, y2, c2, none = xlstm.lstm_forward(*args, c0=to_xp(c0, xp, device), return_caches=False)
    assert none is None
    for mine, ref in ((a2, a), (y2, y), (c2, c)):
        assert_close(mine, ref, xp=xp, device=device, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_caches_copy_deepcopy_and_pickle(xp, device, how):
    """The caches survive copy.copy, copy.deepcopy and a pickle round trip: the same
    per-step views and the same gradients."""
    rng = np.random.default_rng(19)
    x, a0, c0, params = random_case(rng, n_x=3, n_a=4, n_y=2, m=3, T=4)
    *_, caches = xlstm.lstm_forward(to_xp(x, xp, device), to_xp(a0, xp, device),
                                    to_xp(params, xp, device), c0=to_xp(c0, xp, device))
    da = to_xp(rng.standard_normal((4, 3, 4)), xp, device)
    again = copy_or_skip(how, xp, device)(caches)
    assert type(again) is xlstm.LSTMCaches
    assert_caches_survive(again, caches, xlstm.lstm_backward, da, ("a_next", "ft", "xt"),
                          xp=xp, device=device)
