"""Optimizers and gradient clipping: hand-computed updates, torch.optim, every backend."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_array, assert_close, to_numpy, to_xp
from xlstm.optim import SGD, Adam, clip_by_global_norm, clip_by_value
from xlstm.params import PARAM_KEYS, init_params

N_X, N_A, N_Y = 3, 4, 2


def host_params(seed=0):
    return init_params(N_X, N_A, N_Y, seed=seed)


def host_grads(seed, scale=1.0):
    """Random gradients for every parameter plus the extra keys of lstm_backward."""
    rng = np.random.default_rng(seed)
    p = host_params()
    g = {"d" + k: scale * rng.standard_normal(v.shape) for k, v in p.items()}
    g["dx"] = rng.standard_normal((N_X, 5, 6))
    g["da0"] = rng.standard_normal((N_A, 5))
    g["dc0"] = rng.standard_normal((N_A, 5))
    return g


def ref_sgd(params, grads_seq, lr, momentum=0.0, nesterov=False):
    p = {k: v.copy() for k, v in params.items()}
    vel = {k: np.zeros_like(v) for k, v in p.items()}
    for grads in grads_seq:
        for k in p:
            g = grads["d" + k]
            if momentum:
                vel[k] = momentum * vel[k] + g
                g = g + momentum * vel[k] if nesterov else vel[k]
            p[k] = p[k] - lr * g
    return p


def ref_adam(params, grads_seq, lr, b1, b2, eps):
    """The course's form: bias-corrected moments, then m_hat / (sqrt(v_hat) + eps)."""
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        for k in p:
            g = grads["d" + k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g**2
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def run(opt, params, grads_seq):
    state = opt.init(params)
    for grads in grads_seq:
        params, state = opt.step(params, grads, state)
    return params, state


# --------------------------------------------------------------------------- one step by hand
def test_sgd_one_step_by_hand(xp, device):
    p0, g0 = host_params(), host_grads(1)
    new, state = SGD(lr=0.1).step(to_xp(p0, xp, device), to_xp(g0, xp, device), {"step": 0})
    assert list(new) == list(PARAM_KEYS)
    assert state["step"] == 1
    for k in PARAM_KEYS:
        assert_close(new[k], p0[k] - 0.1 * g0["d" + k], xp=xp, device=device, dtype=xp.float64)


def test_adam_one_step_by_hand(xp, device):
    # After one step the bias-corrected moments are g and g**2: p - lr * g / (|g| + eps).
    p0, g0 = host_params(), host_grads(2)
    opt = Adam(lr=0.01, eps=1e-8)
    new, state = run(opt, to_xp(p0, xp, device), [to_xp(g0, xp, device)])
    assert state["step"] == 1 and isinstance(state["step"], int)
    for k in PARAM_KEYS:
        g = g0["d" + k]
        f64 = xp.float64
        assert_close(new[k], p0[k] - 0.01 * g / (np.abs(g) + 1e-8), xp=xp, device=device,
                     dtype=f64)
        assert_close(state["m"][k], 0.1 * g, xp=xp, device=device, dtype=f64)
        assert_close(state["v"][k], 0.001 * g * g, xp=xp, device=device, dtype=f64)


# ------------------------------------------------------------------- several steps, all backends
@pytest.mark.parametrize(
    "momentum, nesterov", [(0.0, False), (0.9, False), (0.5, True)], ids=["plain", "mom", "nag"]
)
def test_sgd_steps_match_numpy_reference(xp, device, momentum, nesterov):
    p0 = host_params()
    seq = [host_grads(10 + s) for s in range(4)]
    want = ref_sgd(p0, seq, 0.05, momentum, nesterov)
    opt = SGD(0.05, momentum=momentum, nesterov=nesterov)
    got, state = run(opt, to_xp(p0, xp, device), [to_xp(g, xp, device) for g in seq])
    assert state["step"] == 4
    for k in PARAM_KEYS:
        assert_close(got[k], want[k], xp=xp, device=device, dtype=xp.float64)


def test_adam_steps_match_numpy_reference(xp, device):
    p0 = host_params()
    seq = [host_grads(20 + s) for s in range(5)]
    want = ref_adam(p0, seq, 0.02, 0.8, 0.99, 1e-6)
    got, state = run(
        Adam(0.02, beta1=0.8, beta2=0.99, eps=1e-6),
        to_xp(p0, xp, device),
        [to_xp(g, xp, device) for g in seq],
    )
    assert state["step"] == 5
    for k in PARAM_KEYS:
        assert_close(got[k], want[k], xp=xp, device=device, dtype=xp.float64)


@pytest.mark.parametrize("make", [lambda: SGD(0.1, momentum=0.9), lambda: Adam(0.01)])
def test_float32_state_and_results_follow_params(xp, device, make):
    p0, g0 = host_params(), host_grads(3)
    params = to_xp(p0, xp, device, dtype=xp.float32)
    grads = to_xp(g0, xp, device, dtype=xp.float32)
    opt = make()
    state = opt.init(params)
    buffers = [b for field, b in state.items() if field != "step"]
    assert buffers
    for buf in buffers:
        for k in PARAM_KEYS:
            assert_array(buf[k], xp=xp, device=device, shape=p0[k].shape, dtype=xp.float32)
            assert np.all(to_numpy(buf[k]) == 0.0)
    new, state = opt.step(params, grads, state)
    # float32 results against the float64 truth of the same step
    want = run(make(), p0, [g0])[0]
    for k in PARAM_KEYS:
        assert_close(new[k], want[k], xp=xp, device=device, dtype=xp.float32)
    for buf in (b for field, b in state.items() if field != "step"):
        for k in PARAM_KEYS:
            assert_array(buf[k], xp=xp, device=device, dtype=xp.float32)


@pytest.mark.parametrize(
    "make", [lambda: SGD(0.1), lambda: SGD(0.1, momentum=0.9, nesterov=True), lambda: Adam()]
)
def test_inputs_are_not_mutated(xp, device, make):
    params = to_xp(host_params(), xp, device)
    opt = make()
    state0 = opt.init(params)
    state, grads = state0, None
    for s in range(2):
        grads = to_xp(host_grads(30 + s), xp, device)
        snap_p = {k: to_numpy(v).copy() for k, v in params.items()}
        snap_g = {k: to_numpy(v).copy() for k, v in grads.items()}
        snap_s = {
            f: {k: to_numpy(v).copy() for k, v in b.items()}
            for f, b in state.items() if f != "step"
        }  # fmt: skip
        step_before = state["step"]
        new_params, new_state = opt.step(params, grads, state)
        for k, v in params.items():
            np.testing.assert_array_equal(to_numpy(v), snap_p[k])
            assert new_params[k] is not v
        for k, v in grads.items():
            np.testing.assert_array_equal(to_numpy(v), snap_g[k])
        for f, b in snap_s.items():
            for k, v in b.items():
                np.testing.assert_array_equal(to_numpy(state[f][k]), v)
        assert state["step"] == step_before and new_state is not state
        params, state = new_params, new_state


# -------------------------------------------------------------------------------- torch.optim
@pytest.mark.parametrize(
    "momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)], ids=["plain", "mom", "nag"]
)
def test_sgd_matches_torch_optim(momentum, nesterov):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    p0 = host_params()
    seq = [host_grads(40 + s) for s in range(5)]
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p0.items()}
    topt = torch.optim.SGD(list(tp.values()), lr=0.03, momentum=momentum, nesterov=nesterov)
    for grads in seq:
        for k, t in tp.items():
            t.grad = torch.tensor(grads["d" + k], dtype=torch.float64)
        topt.step()
    got, _ = run(SGD(0.03, momentum=momentum, nesterov=nesterov), p0, seq)
    for k in PARAM_KEYS:
        np.testing.assert_allclose(got[k], tp[k].detach().numpy(), rtol=1e-12, atol=1e-14)


def test_adam_matches_torch_optim():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    p0 = host_params()
    seq = [host_grads(50 + s, scale=10.0 ** (s % 3 - 1)) for s in range(6)]
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p0.items()}
    topt = torch.optim.Adam(list(tp.values()), lr=0.01, betas=(0.85, 0.995), eps=1e-7)
    for grads in seq:
        for k, t in tp.items():
            t.grad = torch.tensor(grads["d" + k], dtype=torch.float64)
        topt.step()
    got, _ = run(Adam(0.01, beta1=0.85, beta2=0.995, eps=1e-7), p0, seq)
    for k in PARAM_KEYS:
        np.testing.assert_allclose(got[k], tp[k].detach().numpy(), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: SGD(0.0), "lr"),
        (lambda: SGD(-1.0), "lr"),
        (lambda: SGD(float("nan")), "lr"),
        (lambda: SGD("0.1"), "lr"),
        (lambda: SGD(True), "lr"),
        (lambda: SGD(0.1, momentum=-0.1), "momentum"),
        (lambda: SGD(0.1, momentum=1.0), "momentum"),
        (lambda: SGD(0.1, nesterov=True), "nesterov"),
        (lambda: SGD(0.1, momentum=0.9, nesterov="yes"), "nesterov"),
        (lambda: Adam(lr=0.0), "lr"),
        (lambda: Adam(beta1=1.0), "beta1"),
        (lambda: Adam(beta1=-0.5), "beta1"),
        (lambda: Adam(beta2=1.5), "beta2"),
        (lambda: Adam(eps=-1e-8), "eps"),
        (lambda: Adam(eps=0.0), "eps must be > 0"),  # a zero gradient then gives 0 / 0
        (lambda: Adam(eps=float("inf")), "eps"),
    ],
)
def test_bad_hyperparameters_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_numpy_scalar_hyperparameters_become_python_floats():
    opt = Adam(np.float64(0.01), beta1=np.float32(0.9))
    assert type(opt.lr) is float and type(opt.beta1) is float
    assert "Adam(lr=0.01" in repr(opt) and "SGD(lr=0.1" in repr(SGD(0.1))


@pytest.mark.parametrize("make", [lambda: SGD(0.1, momentum=0.5), lambda: Adam()])
def test_missing_gradient_is_a_keyerror_naming_it(make):
    params, grads = host_params(), host_grads(0)
    del grads["dWy"]
    opt = make()
    with pytest.raises(KeyError, match="dWy"):
        opt.step(params, grads, opt.init(params))


def test_wrong_gradient_shape_and_dtype_are_refused():
    params, grads = host_params(), host_grads(0)
    opt = Adam()
    state = opt.init(params)
    bad = dict(grads, dbf=np.zeros((N_A, 2)))
    with pytest.raises(ValueError, match="dbf"):
        opt.step(params, bad, state)
    bad = dict(grads, dWc=grads["dWc"].astype(np.float32))
    with pytest.raises(TypeError, match="dWc"):
        opt.step(params, bad, state)
    with pytest.raises(KeyError, match="'m'"):
        opt.step(params, grads, {"step": 0, "m": {}, "v": {}})
    with pytest.raises(TypeError, match="state"):
        opt.step(params, grads, None)
    with pytest.raises(TypeError, match="params"):
        opt.init([1.0])


def test_optimizers_update_any_parameter_subset():
    params = {k: v for k, v in host_params().items() if k not in ("Wy", "by")}
    grads = host_grads(0)  # has dWy/dby too: ignored like dx, da0, dc0
    new, _ = run(SGD(0.5), params, [grads])
    assert set(new) == set(params)
    np.testing.assert_allclose(new["Wf"], params["Wf"] - 0.5 * grads["dWf"])


# ----------------------------------------------------------------------------------- clipping
def test_clip_by_value(xp, device):
    g0 = host_grads(4, scale=3.0)
    grads = to_xp(g0, xp, device)
    out = clip_by_value(grads, 2.5)
    assert list(out) == list(grads)
    for k in grads:
        if k[:2] in ("dW", "db"):
            assert_close(out[k], np.clip(g0[k], -2.5, 2.5), xp=xp, device=device,
                         dtype=xp.float64, rtol=0, atol=0)
        else:
            assert out[k] is grads[k]
    for k in grads:  # input untouched
        np.testing.assert_array_equal(to_numpy(grads[k]), g0[k])


def test_clip_by_value_keeps_float32(xp, device):
    grads = to_xp(host_grads(5, scale=3.0), xp, device, dtype=xp.float32)
    out = clip_by_value(grads, 1)
    for k in PARAM_KEYS:
        assert_array(out["d" + k], xp=xp, device=device, dtype=xp.float32)
        assert float(xp.max(xp.abs(out["d" + k]))) <= 1.0


def test_clip_by_global_norm_scales_to_max_norm(xp, device):
    g0 = host_grads(6, scale=2.0)
    norm0 = np.sqrt(sum(np.sum(g0[k] ** 2) for k in g0 if k[:2] in ("dW", "db")))
    assert norm0 > 5.0
    grads = to_xp(g0, xp, device)
    out, norm = clip_by_global_norm(grads, 5.0)
    assert_close(norm, np.asarray(norm0), xp=xp, device=device, dtype=xp.float64)
    assert list(out) == list(grads)
    scale = 5.0 / (norm0 + 1e-12)
    for k in grads:
        if k[:2] in ("dW", "db"):
            assert_close(out[k], g0[k] * scale, xp=xp, device=device, dtype=xp.float64)
        else:
            assert out[k] is grads[k]
    new_norm = np.sqrt(sum(np.sum(to_numpy(out["d" + k]) ** 2) for k in PARAM_KEYS))
    np.testing.assert_allclose(new_norm, 5.0, rtol=1e-12)
    for k in grads:
        np.testing.assert_array_equal(to_numpy(grads[k]), g0[k])


def test_clip_by_global_norm_below_threshold_is_identity(xp, device):
    g0 = host_grads(7, scale=1e-3)
    grads = to_xp(g0, xp, device, dtype=xp.float32)
    out, norm = clip_by_global_norm(grads, 10.0)
    assert_array(norm, xp=xp, device=device, shape=(), dtype=xp.float32)
    for k in PARAM_KEYS:
        np.testing.assert_array_equal(to_numpy(out["d" + k]), to_numpy(grads["d" + k]))
        assert_array(out["d" + k], xp=xp, device=device, dtype=xp.float32)


def test_clip_by_global_norm_zero_gradients():
    grads = {"dW": np.zeros((2, 3)), "db": np.zeros((2, 1))}
    out, norm = clip_by_global_norm(grads, 1.0)
    assert float(norm) == 0.0
    assert not np.any(np.isnan(out["dW"])) and np.all(out["db"] == 0.0)


@pytest.mark.parametrize("fn", [clip_by_value, clip_by_global_norm])
def test_clip_validation(fn):
    grads = host_grads(0)
    for bad in (0.0, -1.0, float("inf"), "1", None):
        with pytest.raises(ValueError, match="max_"):
            fn(grads, bad)
    with pytest.raises(ValueError, match="no parameter gradients"):
        fn({"dx": np.ones((2, 2))}, 1.0)
    with pytest.raises(TypeError, match="grads"):
        fn(np.ones(2), 1.0)  # a list of arrays is a tree (tests/test_trees.py)


def _exact_norm(g0):
    """The global norm of the parameter gradients, in float64 with the largest entry
    factored out (no overflow or underflow for any float32 or float16 input)."""
    leaves = [np.asarray(v, dtype=np.float64).ravel()
              for k, v in g0.items() if k[:2] in ("dW", "db")]
    top = max(np.max(np.abs(v)) for v in leaves)
    return top * np.sqrt(sum(np.sum((v / top) ** 2) for v in leaves))


@pytest.mark.parametrize("dtype_name, magnitude", [
    ("float32", 1e30), ("float32", 3e38), ("float32", 1e-30), ("float32", 1e-44),
    ("float64", 1e300), ("float64", 1e-310), ("float16", 300.0), ("float16", 6e4),
])
def test_clip_by_global_norm_is_right_for_every_finite_size(xp, device, dtype_name, magnitude):
    """Sums of squares that overflow or underflow the dtype still give the right norm and
    the right scale (they used to zero every gradient)."""
    dtype = getattr(xp, dtype_name, None)
    if dtype is None:
        pytest.skip(f"{xp.__name__} has no {dtype_name}")
    if magnitude < np.finfo(dtype_name).tiny and "jax" in xp.__name__:
        pytest.skip("XLA flushes subnormal numbers to zero")
    rng = np.random.default_rng(11)
    g0 = {k: v for k, v in host_grads(12).items() if k[:2] in ("dW", "db")}
    g0 = {k: (v / np.max(np.abs(v)) * magnitude).astype(dtype_name) for k, v in g0.items()}
    g0["dx"] = rng.standard_normal((2, 2)).astype(dtype_name)
    grads = {k: xp.asarray(v, device=device) for k, v in g0.items()}
    true = _exact_norm({k: v for k, v in g0.items()})
    norm_name = "float32" if dtype_name == "float16" else dtype_name
    info = np.finfo(norm_name)
    bound = min(0.5 * true, 0.1 * float(info.max)) if magnitude > 1 else 1.0
    out, norm = clip_by_global_norm(grads, bound)
    assert_array(norm, xp=xp, device=device, shape=(), dtype=getattr(xp, norm_name))
    got = float(to_numpy(norm))
    if true <= info.max:
        np.testing.assert_allclose(got, true, rtol=2e-3 if dtype_name == "float16" else 1e-5,
                                   atol=4 * float(info.smallest_subnormal))
    else:
        assert got == np.inf
    for k in g0:
        assert_array(out[k], xp=xp, device=device, dtype=dtype)
        v = to_numpy(out[k]).astype(np.float64)
        assert np.all(np.isfinite(v)), k
        if k == "dx":
            np.testing.assert_array_equal(to_numpy(out[k]), g0[k])
        elif bound < true:  # clipped: the direction kept, the norm brought to the bound
            np.testing.assert_allclose(v, g0[k].astype(np.float64) * (bound / true),
                                       rtol=1e-2 if dtype_name == "float16" else 1e-5)
            assert np.any(v != 0), k
        else:
            np.testing.assert_array_equal(to_numpy(out[k]), g0[k])


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_clip_by_global_norm_non_finite_gradients(xp, device, bad):
    """One inf or nan entry: the norm says so, and the gradients come back unscaled
    (not zeroed, not turned into nan)."""
    g0 = host_grads(13)
    g0["dWc"] = g0["dWc"].copy()
    g0["dWc"][1, 2] = bad
    grads = to_xp(g0, xp, device)
    out, norm = clip_by_global_norm(grads, 1.0)
    got = float(to_numpy(norm))
    assert (np.isnan(got) if np.isnan(bad) else got == np.inf)
    for k in g0:
        np.testing.assert_array_equal(to_numpy(out[k]), g0[k], err_msg=k)


def test_clipping_with_params_covers_every_parameter_as_the_optimizers_step():
    """Given the parameters, the clipping covers the 'd' + key entry of each of them,
    whatever the key, as SGD and Adam step them (by default only dW*, db* entries are
    clipped: {"emb", "Wy"} with gradients of 100 left demb as it was)."""
    params = {"emb": np.zeros((3, 4)), "Wy": np.zeros((2, 3))}
    grads = {"demb": np.full((3, 4), 100.0), "dWy": np.full((2, 3), 100.0),
             "dx": np.full(5, 1e6)}
    clipped, norm = clip_by_global_norm(grads, 1.0, params=params)
    assert float(norm) == pytest.approx(100.0 * np.sqrt(18), rel=1e-12)
    total = np.sqrt(sum(np.sum(clipped["d" + k] ** 2) for k in params))
    assert total == pytest.approx(1.0, rel=1e-12)
    assert clipped["dx"] is grads["dx"]
    new, _ = SGD(lr=1.0).step(params, clipped, SGD(lr=1.0).init(params))
    assert np.sqrt(sum(np.sum(new[k] ** 2) for k in params)) == pytest.approx(1.0, rel=1e-12)
    by_value = clip_by_value(grads, 0.5, params=params)
    for k in params:
        np.testing.assert_array_equal(by_value["d" + k], np.full(params[k].shape, 0.5))
    np.testing.assert_array_equal(by_value["dx"], grads["dx"])
    with pytest.raises(KeyError, match="grads is missing 'dscale'"):
        clip_by_global_norm(grads, 1.0, params={**params, "scale": np.zeros(())})
