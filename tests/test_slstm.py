"""The sLSTM (``xlstm.SLSTM``) beyond the conformance suite (which runs it like every cell:
gradcheck on every backend, accelerated against plain, lengths, layers, directions, chunks
with the state carried, padded batches, inputs of +-1e4 in float32, every backend against
numpy):

* a plain, unstabilised reference written here from the equations of Beck et al. (2024);
* the zero state, per element;
* bad arguments.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close

import xlstm
from xlstm._lib import compat as _compat

NP, CPU = _compat.load_backend("numpy")

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
    model = xlstm.SLSTM(N_X, N_H, num_heads=num_heads, forget_gate=forget_gate, seed=1, dtype="float64")
    x = rng.standard_normal((N_X, M, T))
    state = _state(rng)
    with xlstm.accelerators(accel):
        y, final, _ = model.forward(x, state, return_cache=False)
    assert_close(y, reference(model.params[0], x, state, forget_gate), xp=NP, device=CPU,
                 dtype=NP.float64, rtol=1e-12, atol=1e-13)
    assert_close(final[0], y[None, :, :, -1], xp=NP, device=CPU, rtol=0, atol=0)


@FORGET
def test_zero_state_per_element(forget_gate):
    """Where the initial ``n`` is zero (an empty memory) that unit starts afresh, whatever its
    ``m``; elsewhere the given state carries on. ``state=None`` is the all-zero state."""
    rng = np.random.default_rng(1)
    model = xlstm.SLSTM(N_X, N_H, forget_gate=forget_gate, seed=2, dtype="float64")
    x = rng.standard_normal((N_X, M, T))
    zero_n = rng.random((1, N_H, M)) < 0.5
    zero_n[0, 0, 0], zero_n[0, 1, 0] = True, False
    state = _state(rng, zero_n)
    y, _, cache = model.forward(x, state)
    want = reference(model.params[0], x, state, forget_gate)  # c = n = 0 there, any m
    assert_close(y, want, xp=NP, device=CPU, dtype=NP.float64, rtol=1e-12, atol=1e-13)
    assert np.all(np.isfinite(y))
    dx, d0, grads = model.backward(rng.standard_normal(y.shape), cache)
    assert all(np.all(np.isfinite(v)) for v in (dx, *d0, *grads[0].values()))
    assert_close(d0[3], NP.zeros_like(d0[3]), xp=NP, device=CPU, rtol=0, atol=0)  # stabiliser
    zeros = tuple(np.zeros((1, N_H, M)) for _ in range(4))
    assert_close(model.forward(x, return_cache=False)[0],
                 model.forward(x, zeros, return_cache=False)[0], xp=NP, device=CPU, rtol=0,
                 atol=0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_h=5 is not divisible by num_heads=2"):
        xlstm.SLSTM(N_X, 5, num_heads=2, dtype="float64")
    with pytest.raises(ValueError, match="forget_gate must be one of"):
        xlstm.SLSTM(N_X, N_H, forget_gate="tanh", dtype="float64")
    with pytest.raises(TypeError, match="num_heads must be a positive int"):
        xlstm.SLSTM(N_X, N_H, num_heads=0.5, dtype="float64")
    model = xlstm.SLSTM(N_X, N_H, num_heads=2, dtype="float64")
    x = np.zeros((N_X, M, T))
    with pytest.raises(TypeError, match=r"state must be the tuple \(h, c, n, m\)"):
        model.forward(x, (np.zeros((1, N_H, M)),) * 2)
    bad = dict(model.params[0], R=np.zeros((4, 1, N_H, N_H)))  # one head, not two
    with pytest.raises(ValueError, match=r"params\[0\]\['R'\] must have shape \(4, 2, 2, 2\)"):
        model.forward(x, params=[bad])
    assert "num_heads=2" in repr(model) and model.n_h == N_H
