"""The training loop: it learns, it is deterministic, it runs on every backend."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from helpers import assert_array, to_numpy

from xlstm import SGD, Adam, init_params, sequence_cross_entropy
from xlstm._compat import default_namespace
from xlstm.train import FitResult, StepInfo, fit

N_X, N_A, M, T = 3, 6, 4, 5
NP = default_namespace()  # numpy through array-api-compat: device= works on numpy 1.26 too


def copy_task(rng, m=M, T_x=T, xp=NP, device=None, dtype=None):
    """One batch of 'label = current input symbol': one-hot ``x`` and integer labels."""
    ids = rng.integers(0, N_X, size=(m, T_x))
    x = np.eye(N_X)[ids].transpose(2, 0, 1)  # (n_x, m, T)
    dtype = xp.float64 if dtype is None else dtype
    return (
        xp.asarray(x, dtype=dtype, device=device),
        xp.asarray(ids, dtype=xp.int64, device=device),
    )


def make_loss(xp=NP, device=None, dtype=None, m=M):
    dtype = xp.float64 if dtype is None else dtype
    a0 = xp.zeros((N_A, m), dtype=dtype, device=device)

    def loss_fn(params, batch):
        return sequence_cross_entropy(batch[0], a0, params, batch[1])

    return loss_fn


def host_setup(seed=0, n_batches=8):
    rng = np.random.default_rng(seed)
    params = init_params(N_X, N_A, N_X, seed=seed)
    batches = [copy_task(rng) for _ in range(n_batches)]
    return params, batches


def test_fit_reduces_the_loss():
    params, batches = host_setup()
    res = fit(params, batches, make_loss(), Adam(lr=0.05), epochs=10, progress=False)
    assert isinstance(res, FitResult)
    assert len(res.history) == 80
    assert all(isinstance(v, float) for v in res.history)
    first, last = np.mean(res.history[:8]), np.mean(res.history[-8:])
    assert first > 0.9  # about log(3) at the start
    assert last < 0.25 * first
    assert not res.stopped_early and res.seconds > 0.0
    assert res.opt_state["step"] == 80


def test_fit_does_not_modify_params():
    params, batches = host_setup()
    before = {k: v.copy() for k, v in params.items()}
    res = fit(params, batches, make_loss(), Adam(lr=0.05), progress=False)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
        assert not np.array_equal(res.params[k], before[k])


def test_fit_is_deterministic():
    def run():
        rng = np.random.default_rng(7)
        params = init_params(N_X, N_A, N_X, seed=7)

        def batches():  # a fresh generator per epoch
            return (copy_task(rng) for _ in range(5))

        return fit(params, batches, make_loss(), Adam(lr=0.02), epochs=3, clip_norm=1.0,
                   progress=False)

    a, b = run(), run()
    assert a.history == b.history
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])


def test_resume_from_opt_state_equals_one_run():
    params, batches = host_setup(n_batches=6)
    opt = Adam(lr=0.02)
    whole = fit(params, batches, make_loss(), opt, progress=False)
    half = fit(params, batches[:3], make_loss(), opt, progress=False)
    rest = fit(half.params, batches[3:], make_loss(), opt, opt_state=half.opt_state,
               progress=False)
    assert half.history + rest.history == whole.history
    for k in params:
        np.testing.assert_array_equal(rest.params[k], whole.params[k])


def test_steps_limit_takes_no_extra_batch():
    rng = np.random.default_rng(1)
    drawn = []

    def endless():
        while True:
            drawn.append(1)
            yield copy_task(rng)

    params = init_params(N_X, N_A, N_X, seed=1)
    res = fit(params, endless(), make_loss(), SGD(lr=0.1), steps=7, progress=False)
    assert len(res.history) == 7
    assert len(drawn) == 7


def test_steps_limit_across_epochs():
    params, batches = host_setup(n_batches=4)
    res = fit(params, batches, make_loss(), SGD(lr=0.1), epochs=5, steps=10, progress=False)
    assert len(res.history) == 10


def test_callback_sees_every_step_and_can_stop():
    params, batches = host_setup()
    seen = []

    def callback(info):
        assert isinstance(info, StepInfo)
        seen.append((info.step, info.epoch, info.loss))
        assert info.params.keys() == params.keys()
        assert info.grad_norm is not None  # clip_norm is set
        return info.step == 11

    res = fit(params, batches, make_loss(), Adam(lr=0.01), epochs=3, clip_norm=10.0,
              callback=callback, progress=False)
    assert res.stopped_early
    assert len(res.history) == 11
    assert [s for s, _, _ in seen] == list(range(1, 12))
    assert [e for _, e, _ in seen] == [0] * 8 + [1] * 3
    assert [v for *_, v in seen] == res.history


def test_clip_norm_bounds_the_update():
    params, batches = host_setup(n_batches=1)
    res = fit(params, batches, make_loss(), SGD(lr=1.0), clip_norm=1e-3, progress=False)
    step = math.sqrt(sum(float(np.sum((res.params[k] - params[k]) ** 2)) for k in params))
    assert step == pytest.approx(1e-3, rel=1e-6)  # the raw gradient norm is far above 1e-3


def test_clip_value_bounds_every_entry():
    params, batches = host_setup(n_batches=1)
    res = fit(params, batches, make_loss(), SGD(lr=1.0), clip_value=1e-4, progress=False)
    for k in params:
        assert np.max(np.abs(res.params[k] - params[k])) <= 1e-4 * (1 + 1e-12)


def test_non_finite_loss_raises():
    params, batches = host_setup(n_batches=3)

    def loss_fn(p, b):
        loss, grads = make_loss()(p, b)
        return loss * float("nan"), grads

    with pytest.raises(FloatingPointError, match="step 1"):
        fit(params, batches, loss_fn, SGD(lr=0.1), progress=False)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradients_raise_with_clip_norm(bad):
    """A finite loss with an inf or NaN gradient: fit stops at that step instead of
    stepping with gradients that clipping cannot scale."""
    params, batches = host_setup(n_batches=3)
    calls = []

    def loss_fn(p, b):
        loss, grads = make_loss()(p, b)
        calls.append(1)
        if len(calls) == 2:
            grads = dict(grads, dWc=grads["dWc"] * bad)
        return loss, grads

    with pytest.raises(FloatingPointError, match="gradient norm is .* at step 2"):
        fit(params, batches, loss_fn, SGD(lr=0.1), clip_norm=1.0, progress=False)


def test_argument_errors():
    params, batches = host_setup(n_batches=2)
    loss_fn, opt = make_loss(), SGD(lr=0.1)
    with pytest.raises(ValueError, match="one-shot iterator"):
        fit(params, iter(batches), loss_fn, opt, epochs=2)
    with pytest.raises(TypeError, match="batches"):
        fit(params, 3, loss_fn, opt)
    with pytest.raises(TypeError, match="loss_fn"):
        fit(params, batches, None, opt)
    with pytest.raises(TypeError, match="optimizer"):
        fit(params, batches, loss_fn, object())
    for kw in ({"epochs": 0}, {"steps": -1}, {"clip_norm": 0.0}, {"clip_value": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            fit(params, batches, loss_fn, opt, **kw)
    with pytest.raises(TypeError, match="epochs"):
        fit(params, batches, loss_fn, opt, epochs=1.5)


def test_numpy_scalars_as_counts_and_bounds():
    """numpy integer and float scalars work wherever a Python int or float does."""
    params, batches = host_setup(n_batches=3)
    want = fit(params, batches, make_loss(), SGD(lr=0.1), epochs=2, steps=5, clip_norm=1.0,
               progress=False)
    got = fit(params, batches, make_loss(), SGD(lr=np.float64(0.1)), epochs=np.int64(2),
              steps=np.int32(5), clip_norm=np.float64(1.0), clip_value=np.float32(1e3),
              progress=False)
    assert got.history == want.history and len(got.history) == 5


# ------------------------------------------------------------------------ progress bar
def test_no_bar_when_not_a_terminal(capsys):
    params, batches = host_setup(n_batches=3)
    fit(params, batches, make_loss(), SGD(lr=0.1), desc="quietrun")  # progress=None: auto
    out, err = capsys.readouterr()
    assert "quietrun" not in out + err
    assert out == err == ""


def test_bar_can_be_forced(capsys):
    pytest.importorskip("tqdm")
    params, batches = host_setup(n_batches=3)
    fit(params, batches, make_loss(), SGD(lr=0.1), progress=True, desc="loudrun")
    _, err = capsys.readouterr()
    assert "loudrun" in err and "loss=" in err and "3/3" in err


def test_log_goes_to_stdout_with_and_without_bar(capsys):
    pytest.importorskip("tqdm")
    params, batches = host_setup(n_batches=2)
    for progress in (True, False):
        fit(params, batches, make_loss(), SGD(lr=0.1), progress=progress,
            callback=lambda info: info.log(f"hello {info.step}"))
        out, _ = capsys.readouterr()
        assert "hello 1\n" in out and "hello 2\n" in out


def test_no_bar_without_tqdm(monkeypatch, capsys):
    for name in ("tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    params, batches = host_setup(n_batches=2)
    res = fit(params, batches, make_loss(), SGD(lr=0.1), progress=True)
    assert len(res.history) == 2
    _, err = capsys.readouterr()
    assert "tqdm is not installed" in err


# ------------------------------------------------------------------------ every backend
def test_fit_on_every_backend(xp, device):
    """A few steps on tiny arrays: the result stays in the backend and matches numpy."""
    m, T_x = 2, 3
    rng = np.random.default_rng(3)
    host_batches = [copy_task(rng, m=m, T_x=T_x) for _ in range(2)]
    batches = [
        (xp.asarray(x, device=device), xp.asarray(y, dtype=xp.int64, device=device))
        for x, y in host_batches
    ]
    params = init_params(N_X, N_A, N_X, xp=xp, dtype=xp.float64, device=device, seed=3)
    res = fit(params, batches, make_loss(xp, device, m=m), Adam(lr=0.05), epochs=2,
              clip_norm=1.0, clip_value=5.0, progress=False)
    assert len(res.history) == 4 and all(math.isfinite(v) for v in res.history)
    for k, v in res.params.items():
        assert_array(v, xp=xp, device=device, shape=params[k].shape, dtype=xp.float64)

    ref = fit(init_params(N_X, N_A, N_X, seed=3), host_batches, make_loss(m=m),
              Adam(lr=0.05), epochs=2, clip_norm=1.0, clip_value=5.0, progress=False)
    np.testing.assert_allclose(res.history, ref.history, rtol=1e-9)
    for k in ref.params:
        np.testing.assert_allclose(to_numpy(res.params[k]), ref.params[k], rtol=1e-8,
                                   atol=1e-10)
