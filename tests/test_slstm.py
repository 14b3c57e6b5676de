"""The sLSTM (``xlstm.SLSTM``) beyond the conformance suite (which runs it like every cell:
gradcheck on every backend, accelerated against plain, lengths, layers, directions):

* a plain, unstabilised reference written here from the equations of Beck et al. (2024);
* the zero state, per element; chunked runs against whole sequences, forward and backward;
* pre-activations of +-1e4 in float32: nothing overflows, no NaN;
* bad arguments.
"""

from __future__ import annotations

import numpy as np
import pytest

import xlstm

N_X, N_H, M, T = 3, 4, 2, 6
FORGET = pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference(params, x, state, forget_gate):
    """The unstabilised sLSTM, float64, from the equations: ``i = exp(i~)``, ``f =
    sigmoid(f~)`` (or ``exp(f~)``), ``c = f c + i tanh(z~)``, ``n = f n + i``,
    ``h = sigmoid(o~) c / n``; the given state's ``(c, n)`` scaled by ``exp(m)``."""
    W, R, b = (np.asarray(params[k], np.float64) for k in ("W", "R", "b"))
    _, H, d, _ = R.shape
    h, c, n, m = (np.asarray(s[0], np.float64) for s in state)
    c, n = c * np.exp(m), n * np.exp(m)
    ys = []
    for t in range(x.shape[2]):
        pre = np.einsum("gux,xm->gum", W, x[:, :, t]) + b
        for g in range(4):
            for k in range(H):
                pre[g, k * d : (k + 1) * d] += R[g, k] @ h[k * d : (k + 1) * d]
        i = np.exp(pre[0])
        f = _sigmoid(pre[1]) if forget_gate == "sigmoid" else np.exp(pre[1])
        c = f * c + i * np.tanh(pre[2])
        n = f * n + i
        h = _sigmoid(pre[3]) * c / n
        ys.append(h)
    return np.stack(ys, axis=-1)


def _state(rng, zero_n=None):
    h, c, m = (0.5 * rng.standard_normal((1, N_H, M)) for _ in range(3))
    n = 0.5 + np.abs(rng.standard_normal((1, N_H, M)))
    if zero_n is not None:  # an empty memory where zero_n: c = n = 0
        c, n = np.where(zero_n, 0.0, c), np.where(zero_n, 0.0, n)
    return h, c, n, m


@FORGET
@pytest.mark.parametrize("num_heads", [1, 2, 4])
@pytest.mark.parametrize("accel", [True, False], ids=["accelerated", "array-path"])
def test_stabilised_form_equals_the_plain_equations(forget_gate, num_heads, accel):
    """At small inputs the stabilised model equals the unstabilised equations to rounding,
    for every head count (the block-diagonal recurrence) and both forget gates."""
    rng = np.random.default_rng(0)
    model = xlstm.SLSTM(N_X, N_H, num_heads=num_heads, forget_gate=forget_gate, seed=1)
    x = rng.standard_normal((N_X, M, T))
    state = _state(rng)
    with xlstm.accelerators(accel):
        y, final, _ = model.forward(x, state, return_cache=False)
    np.testing.assert_allclose(y, reference(model.params[0], x, state, forget_gate),
                               rtol=1e-12, atol=1e-13)
    assert final[0].shape == (1, N_H, M) and np.array_equal(final[0][0], y[:, :, -1])


@FORGET
def test_zero_state_per_element(forget_gate):
    """Where the initial ``n`` is zero (an empty memory) that unit starts afresh, whatever its
    ``m``; elsewhere the given state carries on. ``state=None`` is the all-zero state."""
    rng = np.random.default_rng(1)
    model = xlstm.SLSTM(N_X, N_H, forget_gate=forget_gate, seed=2)
    x = rng.standard_normal((N_X, M, T))
    zero_n = rng.random((1, N_H, M)) < 0.5
    zero_n[0, 0, 0], zero_n[0, 1, 0] = True, False
    state = _state(rng, zero_n)
    y, _, cache = model.forward(x, state)
    want = reference(model.params[0], x, state, forget_gate)  # c = n = 0 there, any m
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-13)
    assert np.all(np.isfinite(y))
    dx, d0, grads = model.backward(rng.standard_normal(y.shape), cache)
    assert all(np.all(np.isfinite(v)) for v in (dx, *d0, *grads[0].values()))
    assert np.array_equal(d0[3], np.zeros_like(d0[3]))  # the stabiliser: no gradient
    zeros = tuple(np.zeros((1, N_H, M)) for _ in range(4))
    np.testing.assert_array_equal(model.forward(x, return_cache=False)[0],
                                  model.forward(x, zeros, return_cache=False)[0])


@FORGET
@pytest.mark.parametrize("accel", [True, False], ids=["accelerated", "array-path"])
def test_chunked_runs_equal_the_whole_sequence(forget_gate, accel):
    """Forward in two chunks from the carried state equals one run; backward through the
    chunks, the second's ``dstate0`` as the first's ``dstate``, equals the whole
    sequence's gradients."""
    rng = np.random.default_rng(2)
    model = xlstm.SLSTM(N_X, N_H, num_heads=2, forget_gate=forget_gate, seed=3)
    x, dy = rng.standard_normal((N_X, M, T)), rng.standard_normal((N_H, M, T))
    state = _state(rng)
    with xlstm.accelerators(accel):
        y, final, cache = model.forward(x, state)
        dx, d0, (g,) = model.backward(dy, cache)
        y1, mid, c1 = model.forward(x[:, :, :2], state)
        y2, final2, c2 = model.forward(x[:, :, 2:], mid)
        dx2, dmid, (g2,) = model.backward(dy[:, :, 2:], c2)
        dx1, d01, (g1,) = model.backward(dy[:, :, :2], c1, dmid)
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=-1), y, rtol=1e-13, atol=1e-14)
    for a, b in zip(final2, final):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(np.concatenate([dx1, dx2], axis=-1), dx, rtol=1e-12, atol=1e-13)
    for a, b in zip(d01, d0):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    for k in g:
        np.testing.assert_allclose(g1[k] + g2[k], g[k], rtol=1e-12, atol=1e-13, err_msg=k)


@FORGET
@pytest.mark.parametrize("accel", [True, False], ids=["accelerated", "array-path"])
def test_extreme_pre_activations_in_float32(forget_gate, accel):
    """Gate pre-activations of +-1e4 in float32 (the exponential input gate at exp(1e4)):
    the stabiliser keeps every value finite, forward and backward, and ``h`` equals a
    float64 run of the same model to float32's rounding of such pre-activations."""
    rng = np.random.default_rng(3)
    model = xlstm.SLSTM(N_X, N_H, forget_gate=forget_gate, dtype="float32", seed=4)
    model.params[0]["W"] = (1e4 * np.sign(rng.standard_normal((4, N_H, N_X)))).astype(np.float32)
    x = np.sign(rng.standard_normal((N_X, M, T))).astype(np.float32)
    with xlstm.accelerators(accel):
        y, final, cache = model.forward(x)
        dx, d0, (g,) = model.backward(np.ones_like(y), cache)
    for v in (y, *final, dx, *d0, *g.values()):
        assert v.dtype == np.float32 and np.all(np.isfinite(v))
    wide = xlstm.SLSTM(N_X, N_H, forget_gate=forget_gate, dtype="float64", seed=4)
    wide.params[0] = {k: v.astype(np.float64) for k, v in model.params[0].items()}
    y64, _, _ = wide.forward(x.astype(np.float64), return_cache=False)
    # a pre-activation of N_X terms of size 1e4 is rounded to about N_X 1e4 eps in float32,
    # and exp(i~ - m) turns that absolute error into a relative one of h: the problem's own
    # conditioning, the same for any float32 implementation
    tol = N_X * 1e4 * float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(y, y64, rtol=tol, atol=tol)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_h=5 is not divisible by num_heads=2"):
        xlstm.SLSTM(N_X, 5, num_heads=2)
    with pytest.raises(ValueError, match="forget_gate must be one of"):
        xlstm.SLSTM(N_X, N_H, forget_gate="tanh")
    with pytest.raises(TypeError, match="num_heads must be a positive int"):
        xlstm.SLSTM(N_X, N_H, num_heads=0.5)
    model = xlstm.SLSTM(N_X, N_H, num_heads=2)
    x = np.zeros((N_X, M, T))
    with pytest.raises(TypeError, match=r"state must be the tuple \(h, c, n, m\)"):
        model.forward(x, (np.zeros((1, N_H, M)),) * 2)
    bad = dict(model.params[0], R=np.zeros((4, 1, N_H, N_H)))  # one head, not two
    with pytest.raises(ValueError, match=r"params\[0\]\['R'\] must have shape \(4, 2, 2, 2\)"):
        model.forward(x, params=[bad])
    assert "num_heads=2" in repr(model) and model.n_h == N_H
