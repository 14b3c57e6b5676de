"""JAX transforms and the autodiff wrappers.

* every public function under ``jax.jit``, ``jax.grad`` and ``jax.vmap`` with arrays closed
  over (a tracer has no device; the device check must not compare it);
* the array path's time loops as ``jax.lax.scan``: equal to the plain Python loop, and a
  traced program whose size does not grow with ``T``;
* :mod:`xlstm.autodiff`: ``jax.custom_vjp`` and ``torch.autograd.Function`` whose backward
  pass is ``lstm_backward``, against autodiff through the plain forward pass.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from helpers import assert_close
from oracles import random_case

import xlstm
from xlstm import autodiff
from xlstm._lib import compat as _compat
from xlstm.engine import loop as _engine

N_X, N_A, N_Y, M, T = 3, 4, 2, 2, 5


@pytest.fixture(scope="module")
def J(backend_named):
    """JAX (64-bit) with its namespace and device, and one float64 LSTM case on it."""
    xp, device = backend_named("jax")
    import jax

    rng = np.random.default_rng(11)
    x, a0, c0, params = random_case(rng, N_X, N_A, N_Y, M, T)
    host = {"p": params, "x": x, "a0": a0, "c0": c0, "da": rng.standard_normal((N_A, M, T)),
            "targets": rng.standard_normal((N_Y, M))}
    arr = {k: xp.asarray(v, device=device) for k, v in host.items() if k != "p"}
    p = {k: xp.asarray(v, device=device) for k, v in host["p"].items()}
    labels = xp.asarray(rng.integers(0, N_Y, (M, T)), device=device)
    return SimpleNamespace(jax=jax, xp=xp, device=device, p=p, labels=labels, host=host, **arr)


@pytest.fixture(scope="module")
def torch(backend_named):
    backend_named("torch")
    import torch

    return torch


def close(J, actual, expected, rtol=1e-12, atol=1e-13, err=""):
    assert_close(actual, expected, xp=J.xp, device=J.device, rtol=rtol, atol=atol, err=err)


def close_tree(J, actual, expected, **kw):
    """Leaf by leaf equality of two pytrees (same structure)."""
    a_leaves, a_def = J.jax.tree.flatten(actual)
    e_leaves, e_def = J.jax.tree.flatten(expected)
    assert a_def == e_def
    for a, e in zip(a_leaves, e_leaves):
        close(J, a, e, **kw)


def _weights(J):
    """A fixed cotangent for ``a``: the loss ``sum(a * W)``."""
    return J.da


# ------------------------------------------------------------------------- device check
def test_tracers_are_not_compared_but_real_devices_are(J):
    """A tracer has no device (None), which must not clash with a concrete one."""
    seen = {}

    def f(p):
        seen["device"] = _compat.device_of(p["Wf"])
        return xlstm.lstm_forward(J.x, J.a0, p)[0]

    close(J, J.jax.jit(f)(J.p), xlstm.lstm_forward(J.x, J.a0, J.p)[0])
    assert seen["device"] is None  # the case the check must let through
    strict = pytest.importorskip("array_api_strict")
    a = strict.ones(2, dtype=strict.float64)
    b = strict.ones(2, dtype=strict.float64, device=strict.Device("device1"))
    with pytest.raises(ValueError, match="device mismatch: x is on .* but a0 is on"):
        _compat.namespace(x=a, a0=b)


def test_two_torch_devices_still_raise(torch):
    a = torch.ones(2, dtype=torch.float64)
    b = torch.ones(2, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="device mismatch: x is on cpu but c0 is on meta"):
        _compat.namespace(x=a, c0=b)


# -------------------------------------------------------- public functions under transforms
def test_lstm_forward_jit_grad_vmap(J):
    jax = J.jax
    a, y, c, caches = xlstm.lstm_forward(J.x, J.a0, J.p, J.c0)
    ja, jy, jc = jax.jit(lambda p: xlstm.lstm_forward(J.x, J.a0, p, J.c0)[:3])(J.p)
    for got, want in ((ja, a), (jy, y), (jc, c)):
        close(J, got, want)
    # grad through the forward pass equals the hand-written backward pass
    g = xlstm.lstm_backward(_weights(J), caches)

    def loss(p, x, a0, c0):
        return J.xp.sum(xlstm.lstm_forward(x, a0, p, c0)[0] * _weights(J))

    dp, dx, da0, dc0 = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(J.p, J.x, J.a0, J.c0)
    for k in ("Wf", "bf", "Wi", "bi", "Wc", "bc", "Wo", "bo"):
        close(J, dp[k], g["d" + k], rtol=1e-10, err=k)
    for got, k in ((dx, "dx"), (da0, "da0"), (dc0, "dc0")):
        close(J, got, g[k], rtol=1e-10, err=k)
    # vmap over a batch of sequences, parameters closed over
    xs = J.xp.stack([J.x, 2.0 * J.x, -J.x])
    batched = jax.vmap(lambda x: xlstm.lstm_forward(x, J.a0, J.p, J.c0)[0])(xs)
    for i in range(3):
        close(J, batched[i], xlstm.lstm_forward(xs[i], J.a0, J.p, J.c0)[0])


def test_lstm_backward_jit_vmap(J):
    jax = J.jax
    caches = xlstm.lstm_forward(J.x, J.a0, J.p, J.c0)[3]
    want = xlstm.lstm_backward(J.da, caches)
    close_tree(J, jax.jit(lambda da: xlstm.lstm_backward(da, caches))(J.da), want)

    def fwd_bwd(p):  # both inside one compiled function, x and a0 closed over
        return xlstm.lstm_backward(J.da, xlstm.lstm_forward(J.x, J.a0, p, J.c0)[3])

    close_tree(J, jax.jit(fwd_bwd)(J.p), want)
    das = J.xp.stack([J.da, -0.5 * J.da])
    batched = jax.vmap(lambda da: xlstm.lstm_backward(da, caches))(das)
    close_tree(J, jax.tree.map(lambda v: v[1], batched), xlstm.lstm_backward(das[1], caches))


def test_cell_forward_and_backward_jit_grad_vmap(J):
    jax, xp = J.jax, J.xp
    xt = J.x[:, :, 0]
    a_next, c_next, yt, cache = xlstm.lstm_cell_forward(xt, J.a0, J.c0, J.p)
    got = jax.jit(lambda p: xlstm.lstm_cell_forward(xt, J.a0, J.c0, p)[:3])(J.p)
    close_tree(J, got, (a_next, c_next, yt))
    g = xlstm.lstm_cell_backward(J.a0, J.c0, cache)  # da_next = a0, dc_next = c0

    def loss(xt, p):  # only the path through a_next: dc_next = 0
        return xp.sum(xlstm.lstm_cell_forward(xt, J.a0, J.c0, p)[0] * J.a0)

    g_a = xlstm.lstm_cell_backward(J.a0, xp.zeros_like(J.c0), cache)
    dxt, dp = jax.grad(loss, argnums=(0, 1))(xt, J.p)
    close(J, dxt, g_a["dxt"], rtol=1e-10)
    close(J, dp["Wo"], g_a["dWo"], rtol=1e-10)
    got = jax.jit(lambda da, dc: xlstm.lstm_cell_backward(da, dc, cache))(J.a0, J.c0)
    close_tree(J, got, g)
    got = jax.jit(lambda p: xlstm.lstm_cell_backward(
        J.a0, J.c0, xlstm.lstm_cell_forward(xt, J.a0, J.c0, p)[3]))(J.p)
    close_tree(J, got, g)
    das = xp.stack([J.a0, 3.0 * J.a0])
    batched = jax.vmap(lambda da: xlstm.lstm_cell_backward(da, J.c0, cache))(das)
    close_tree(J, jax.tree.map(lambda v: v[1], batched),
               xlstm.lstm_cell_backward(das[1], J.c0, cache))
    batched = jax.vmap(lambda a: xlstm.lstm_cell_forward(xt, a, J.c0, J.p)[0])(das)
    close(J, batched[1], xlstm.lstm_cell_forward(xt, das[1], J.c0, J.p)[0])


def test_activations_jit_grad_vmap(J):
    jax, xp = J.jax, J.xp
    z = J.x
    close(J, jax.jit(lambda u: xlstm.sigmoid(u + z))(z), xlstm.sigmoid(2.0 * z))
    close(J, jax.jit(lambda u: xlstm.softmax(u * z, axis=0))(z), xlstm.softmax(z * z, axis=0))
    s = xlstm.sigmoid(z)
    close(J, jax.grad(lambda u: xp.sum(xlstm.sigmoid(u)))(z), s * (1.0 - s))
    # d/du sum(softmax(u) * w) = p * (w - sum(p * w))
    w = J.x[::-1, ...]
    p = xlstm.softmax(z, axis=0)
    want = p * (w - xp.sum(p * w, axis=0, keepdims=True))
    close(J, jax.grad(lambda u: xp.sum(xlstm.softmax(u, axis=0) * w))(z), want)
    close(J, jax.vmap(lambda u: xlstm.softmax(u + w[0], axis=0))(z),
          xp.stack([xlstm.softmax(z[i] + w[0], axis=0) for i in range(N_X)]))
    close(J, jax.vmap(lambda u: xlstm.sigmoid(u * w[1]))(z),
          xp.stack([xlstm.sigmoid(z[i] * w[1]) for i in range(N_X)]))


def test_last_step_losses_jit_grad_vmap(J):
    jax, xp = J.jax, J.xp
    loss, g = xlstm.last_step_mse(J.x, J.a0, J.p, J.targets, c0=J.c0)
    jl, jg = jax.jit(lambda p: xlstm.last_step_mse(J.x, J.a0, p, J.targets, c0=J.c0))(J.p)
    close(J, jl, loss)
    close_tree(J, jg, g)
    dp = jax.grad(lambda p: xlstm.last_step_mse(J.x, J.a0, p, J.targets, c0=J.c0)[0])(J.p)
    for k, v in dp.items():
        close(J, v, g["d" + k], rtol=1e-10, err=k)
    pred = xlstm.last_step_predict(J.x, J.a0, J.p, c0=J.c0)
    close(J, jax.jit(lambda p: xlstm.last_step_predict(J.x, J.a0, p, c0=J.c0))(J.p), pred)
    xs = xp.stack([J.x, -J.x])
    batched = jax.vmap(lambda x: xlstm.last_step_mse(x, J.a0, J.p, J.targets)[0])(xs)
    close(J, batched[1], xlstm.last_step_mse(xs[1], J.a0, J.p, J.targets)[0])


def test_sequence_cross_entropy_jit(J):
    jax = J.jax
    mask = J.xp.asarray(np.array([[1.0, 0.5, 0.0, 2.0, 1.0], [0.0, 1.0, 1.0, 1.0, 0.25]]))
    loss, g = xlstm.sequence_cross_entropy(J.x, J.a0, J.p, J.labels, mask=mask)
    f = jax.jit(lambda p: xlstm.sequence_cross_entropy(J.x, J.a0, p, J.labels, mask=mask))
    jl, jg = f(J.p)
    close(J, jl, loss)
    close_tree(J, jg, g)


@pytest.mark.parametrize("make", [
    lambda: xlstm.SGD(lr=0.1),
    lambda: xlstm.SGD(lr=0.1, momentum=0.9, nesterov=True),
    lambda: xlstm.Adam(lr=0.01),
], ids=["sgd", "sgd-nesterov", "adam"])
def test_optimizers_under_jit(J, make):
    """jit'd init and step, state passed in and out, equal the Python-int steps."""
    jax = J.jax
    opt = make()
    grads = {"d" + k: 0.3 * v + 0.01 for k, v in J.p.items()}  # any gradients, closed over
    step = jax.jit(lambda p, s: opt.step(p, grads, s))
    p_e, s_e = J.p, opt.init(J.p)
    p_j, s_j = J.p, jax.jit(opt.init)(J.p)
    assert not isinstance(s_j["step"], int) and s_j["step"].ndim == 0
    for _ in range(3):
        p_e, s_e = opt.step(p_e, grads, s_e)
        p_j, s_j = step(p_j, s_j)
    assert s_e["step"] == 3 and isinstance(s_e["step"], int)  # the Python int stays one
    assert int(s_j["step"]) == 3
    close_tree(J, p_j, p_e)
    # an array count also works outside jit, and a non-integer one is refused
    p_a, s_a = opt.step(J.p, grads, {**opt.init(J.p), "step": J.xp.asarray(0)})
    close_tree(J, p_a, opt.step(J.p, grads, opt.init(J.p))[0])
    assert int(s_a["step"]) == 1
    for bad in (J.xp.asarray(1.0), J.xp.asarray([1, 2]), J.xp.asarray(True), -1, 1.0):
        with pytest.raises(ValueError, match="state\\['step'\\] must be"):
            opt.step(J.p, grads, {**opt.init(J.p), "step": bad})


# ---------------------------------------------------------------------- lax.scan vs loop
def test_dispatch_gives_jax_the_scan(J, monkeypatch):
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    loops = _engine.accelerated_loops(J.xp, J.xp.float64)
    assert isinstance(loops, _engine.ScanLoops) and loops.label == "lax.scan"
    assert isinstance(_engine.accelerated_loops(J.xp, J.xp.float32), _engine.ScanLoops)
    monkeypatch.setenv("XLSTM_ACCEL", "0")
    assert _engine.accelerated_loops(J.xp, J.xp.float64) is None


def test_plain_scan_contract():
    """The Python scan: ys[t] from xs[t], in either direction, carry threaded through."""
    import array_api_compat

    npx = array_api_compat.array_namespace(np.zeros(1))

    def step(static, consts, carry, x_t):
        (k,), (total,), (v,) = consts, carry, x_t
        return (total * 10.0 + v,), (total + k * v,)

    xs = (np.arange(1.0, 4.0),)
    for reverse, last, ys in ((False, 123.0, [2.0, 5.0, 18.0]), (True, 321.0, [34.0, 7.0, 6.0])):
        carry, (out,) = _engine.scan(step, (npx,), (np.float64(2.0),), (np.float64(0.0),), xs,
                                     reverse=reverse)
        assert carry[0] == last
        np.testing.assert_array_equal(out, ys)


def _everything(J, x, a0, p, c0, da):
    """Forward outputs, inference outputs, the stacked state and every gradient."""
    a, y, c, caches = xlstm.lstm_forward(x, a0, p, c0)
    ai, yi, ci, _ = xlstm.lstm_forward(x, a0, p, c0, return_caches=False)
    st = caches.state
    out = {"a": a, "y": y, "c": c, "a_inf": ai, "y_inf": yi, "c_inf": ci,
           **{f"state.{k}": getattr(st, k) for k in ("A", "C", "S", "CCT", "TC", "X")},
           "cache[2].ft": caches[0][2].ft}  # fmt: skip
    out.update({f"grad.{k}": v for k, v in xlstm.lstm_backward(da, caches).items()})
    part = xlstm.lstm_backward(da[:, :, :3], caches)  # backward over the first steps only
    out.update({f"grad3.{k}": v for k, v in part.items()})
    return out


@pytest.mark.parametrize("chunk_rows", [4096, 6], ids=["one-chunk", "chunks-of-3"])
def test_scan_equals_plain_loop(J, monkeypatch, chunk_rows):
    """float64: lax.scan and the Python loop give the same forward, caches and gradients.

    Not bit for bit: XLA compiles the scan's loop body as one fused computation and rounds
    a few results differently from the operation-by-operation loop (differences of a few
    ulps, 4e-16 relative at most here), so the assertion allows 1e-14.
    """
    rng = np.random.default_rng(5)
    T_ = 7
    x = J.xp.asarray(rng.standard_normal((N_X, M, T_)))
    da = J.xp.asarray(rng.standard_normal((N_A, M, T_)))
    monkeypatch.setattr(_engine, "CHUNK_ROWS", chunk_rows)
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    scanned = _everything(J, x, J.a0, J.p, J.c0, da)
    monkeypatch.setenv("XLSTM_ACCEL", "0")
    plain = _everything(J, x, J.a0, J.p, J.c0, da)
    for k, v in plain.items():
        close(J, scanned[k], v, rtol=1e-14, atol=1e-15, err=k)


def test_traced_program_does_not_grow_with_T(J, monkeypatch):
    """With lax.scan the jaxpr of forward+backward has the same size for T=5 and T=40."""
    jax = J.jax
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)

    def size(T_, accel):
        monkeypatch.setenv("XLSTM_ACCEL", accel)
        x = J.xp.ones((N_X, M, T_), dtype=J.xp.float64)
        da = J.xp.ones((N_A, M, T_), dtype=J.xp.float64)

        def f(p):
            return xlstm.lstm_backward(da, xlstm.lstm_forward(x, J.a0, p)[3])

        jaxpr = jax.make_jaxpr(f)(J.p)
        return sum(1 for _ in _walk(jaxpr.jaxpr))

    assert size(5, "1") == size(40, "1")
    assert size(40, "0") > size(5, "0")  # the plain loop unrolls, as the check expects


def _walk(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _walk(getattr(inner, "jaxpr", inner))


# ---------------------------------------------------------------------- autodiff wrappers
def _count_backward(monkeypatch):
    from xlstm.notebook import autodiff as notebook_autodiff  # where lstm is defined

    calls = []
    real = notebook_autodiff.lstm_backward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(notebook_autodiff, "lstm_backward", counted)
    return calls


@pytest.mark.parametrize("with_c0", [True, False], ids=["c0", "no-c0"])
def test_custom_vjp_equals_jax_grad_of_forward(J, monkeypatch, with_c0):
    jax, xp = J.jax, J.xp
    c0 = J.c0 if with_c0 else None
    w = _weights(J)
    params = {**J.p, "extra": xp.ones(3, dtype=xp.float64)}  # not read: zero gradient

    def mine(p, x, a0, c0):
        return xp.sum(xp.tanh(autodiff.lstm(x, a0, p, c0)) * w)

    def plain(p, x, a0, c0):
        return xp.sum(xp.tanh(xlstm.lstm_forward(x, a0, p, c0)[0]) * w)

    close(J, autodiff.lstm(J.x, J.a0, J.p, c0), xlstm.lstm_forward(J.x, J.a0, J.p, c0)[0])
    argnums = (0, 1, 2, 3) if with_c0 else (0, 1, 2)
    want = jax.grad(plain, argnums=argnums)(params, J.x, J.a0, c0)
    calls = _count_backward(monkeypatch)
    for transform in (lambda f: f, jax.jit):
        got = transform(jax.grad(mine, argnums=argnums))(params, J.x, J.a0, c0)
        close_tree(J, got, want, rtol=1e-10, atol=1e-12)
    assert len(calls) == 2  # the hand-written backward ran (eager, then traced by jit)
    close(J, got[0]["Wy"], xp.zeros_like(J.p["Wy"]))
    close(J, got[0]["extra"], xp.zeros(3, dtype=xp.float64))
    # vmap of the gradient over a batch of sequences
    xs = xp.stack([J.x, 0.5 * J.x])
    batched = jax.vmap(lambda x: jax.grad(mine)(J.p, x, J.a0, c0))(xs)
    close_tree(J, jax.tree.map(lambda v: v[1], batched),
               jax.grad(plain)(J.p, xs[1], J.a0, c0), rtol=1e-10, atol=1e-12)


def test_autodiff_on_numpy_is_the_forward():
    x, a0, _, p = random_case(2, N_X, N_A, N_Y, M, T)
    np.testing.assert_array_equal(autodiff.lstm(x, a0, p), xlstm.lstm_forward(x, a0, p)[0])
    with pytest.raises(KeyError, match="'Wo'"):
        autodiff.lstm(x, a0, {k: v for k, v in p.items() if k != "Wo"})
    with pytest.raises(TypeError, match="a0 must be an array"):
        autodiff.lstm(x, [[0.0]], p)


@pytest.mark.parametrize("with_c0", [True, False], ids=["c0", "no-c0"])
def test_torch_function_equals_autograd_of_forward(torch, monkeypatch, with_c0):
    rng = np.random.default_rng(4)
    x, a0, c0, host = random_case(rng, N_X, N_A, N_Y, M, T)
    tw = torch.tensor(rng.standard_normal((N_A, M, T)))

    def leaves():
        p = {k: torch.tensor(v, requires_grad=True) for k, v in host.items()}
        tx, ta0 = torch.tensor(x, requires_grad=True), torch.tensor(a0, requires_grad=True)
        tc0 = torch.tensor(c0, requires_grad=True) if with_c0 else None
        return p, tx, ta0, tc0

    def grads(fn):
        p, tx, ta0, tc0 = leaves()
        a = fn(tx, ta0, p, tc0)
        (torch.tanh(a) * tw).sum().backward()
        got = {"x": tx.grad, "a0": ta0.grad, **{k: v.grad for k, v in p.items()}}
        if with_c0:
            got["c0"] = tc0.grad
        return a.detach(), got

    calls = _count_backward(monkeypatch)
    a_mine, mine = grads(autodiff.lstm)
    assert len(calls) == 1
    a_plain, plain = grads(lambda *args: xlstm.lstm_forward(*args, return_caches=False)[0])
    np.testing.assert_allclose(a_mine.numpy(), a_plain.numpy(), rtol=1e-13, atol=1e-14)
    for k, v in plain.items():
        if v is None:  # Wy, by: unused by the plain forward's a; zero here
            np.testing.assert_array_equal(mine[k].numpy(), 0.0, err_msg=k)
        else:
            np.testing.assert_allclose(mine[k].numpy(), v.numpy(), rtol=1e-10, atol=1e-12,
                                       err_msg=k)


def test_torch_function_gradcheck_and_first_order_only(torch):
    case = random_case(9, n_x=2, n_a=3, n_y=2, m=2, T=3)
    p = {k: torch.tensor(v, requires_grad=k in ("Wf", "bc")) for k, v in case.params.items()}
    x, a0, c0 = (torch.tensor(v, requires_grad=True) for v in case[:3])

    def f(x, a0, c0, Wf, bc):
        return autodiff.lstm(x, a0, {**p, "Wf": Wf, "bc": bc}, c0)

    assert torch.autograd.gradcheck(f, (x, a0, c0, p["Wf"], p["bc"]))
    (g,) = torch.autograd.grad(f(x, a0, c0, p["Wf"], p["bc"]).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


def test_torch_without_gradients_is_the_inference_path(torch, monkeypatch):
    host, _, _, params = random_case(12, N_X, N_A, N_Y, M, T)
    p = {k: torch.tensor(v) for k, v in params.items()}
    x, a0 = torch.tensor(host), torch.zeros(N_A, M, dtype=torch.float64)
    want = xlstm.lstm_forward(x, a0, p)[0]
    calls = _count_backward(monkeypatch)
    a = autodiff.lstm(x, a0, p)  # nothing requires grad: no graph
    assert a.grad_fn is None
    np.testing.assert_array_equal(a.numpy(), want.numpy())
    x.requires_grad_(True)
    with torch.no_grad():
        assert autodiff.lstm(x, a0, p).grad_fn is None
    assert autodiff.lstm(x, a0, p).grad_fn is not None
    assert not calls


def test_custom_vjp_second_order(J):
    """Reverse over reverse: Hessian-vector products equal those of the plain forward."""
    jax, xp = J.jax, J.xp
    v = xp.ones_like(J.x)

    def hvp(forward):
        def f(x):
            return xp.sum(xp.sin(forward(x)))

        return jax.grad(lambda x: xp.sum(jax.grad(f)(x) * v))(J.x)

    got = hvp(lambda x: autodiff.lstm(x, J.a0, J.p, J.c0))
    want = hvp(lambda x: xlstm.lstm_forward(x, J.a0, J.p, J.c0)[0])
    close(J, got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: autodiff.lstm(x, J.a0, J.p), (J.x,), (v,))
