"""The training loop: it learns, it is deterministic, it runs on every backend."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from helpers import assert_array, to_numpy
from xlstm.train import FitResult, StepInfo, fit

from xlstm import SGD, Adam, init_params, sequence_cross_entropy
from xlstm._lib.compat import default_namespace

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
    assert [(r.step, r.epoch, r.loss) for r in res.records] == [
        (i + 1, i // 8, v) for i, v in enumerate(res.history)]
    assert res.evals == []  # no validation
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

    with pytest.raises(FloatingPointError, match=r"gradient grads\['dWc'\] holds inf or NaN at step 2"):
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


def test_log_goes_to_stdout_with_and_without_bar(capsys, caplog):
    """info.log lines are records of the "xlstm.training" logger; verbose=True (the
    default) shows them on stdout, through the bar or not, and verbose=False does not."""
    pytest.importorskip("tqdm")
    caplog.set_level("INFO", logger="xlstm.training")
    params, batches = host_setup(n_batches=2)
    for progress, verbose in ((True, True), (False, True), (True, False), (False, False)):
        caplog.clear()
        fit(params, batches, make_loss(), SGD(lr=0.1), progress=progress, verbose=verbose,
            callback=lambda info: info.log(f"hello {info.step}"))
        out, _ = capsys.readouterr()
        assert [r.getMessage() for r in caplog.records] == ["hello 1", "hello 2"]
        assert out == ("hello 1\nhello 2\n" if verbose else "")


def test_no_bar_without_tqdm(monkeypatch, capsys):
    for name in ("tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    params, batches = host_setup(n_batches=2)
    res = fit(params, batches, make_loss(), SGD(lr=0.1), progress=True)
    assert len(res.history) == 2
    _, err = capsys.readouterr()
    assert err == "progress bar unavailable: tqdm is not installed\n"
    fit(params, batches, make_loss(), SGD(lr=0.1), progress=True, verbose=False)
    assert capsys.readouterr() == ("", "")  # (a warning record of "xlstm.training" alone)


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


# ------------------------------------------------- clipping: exactly what the optimizer steps
def _constant_loss(grads):
    """A loss_fn that gives the loss 0 and the gradients ``grads`` whatever the batch."""
    return lambda params, batch: (0.0, {k: np.array(v, copy=True) for k, v in grads.items()})


def test_clip_norm_covers_every_parameter_as_torch_does():
    """Parameters whose keys do not start with W or b are clipped too: {"emb", "Wy"} with
    gradients of 100 and clip_norm=1 give an update of norm 1 (173 before), as torch's
    clip_grad_norm_ gives."""
    torch = pytest.importorskip("torch")
    params = {"emb": np.zeros((3, 4)), "Wy": np.zeros((2, 3))}
    grads = {"d" + k: np.full(v.shape, 100.0) for k, v in params.items()}
    res = fit(params, [None], _constant_loss(grads), SGD(lr=1.0), clip_norm=1.0,
              progress=False)
    update = np.sqrt(sum(np.sum(res.params[k] ** 2) for k in params))
    assert update == pytest.approx(1.0, rel=1e-12)
    tensors = [torch.zeros(v.shape, dtype=torch.float64, requires_grad=True)
               for v in params.values()]
    for t in tensors:
        t.grad = torch.full(t.shape, 100.0, dtype=torch.float64)
    torch.nn.utils.clip_grad_norm_(tensors, 1.0)
    for k, t in zip(params, tensors):
        # (torch divides by the norm + 1e-6)
        np.testing.assert_allclose(-res.params[k], t.grad.numpy(), rtol=1e-6)


def test_clip_value_covers_every_parameter():
    params = {"emb": np.zeros((3, 4)), "Wy": np.zeros((2, 3)), "scale": np.zeros(())}
    grads = {"d" + k: np.full(v.shape, 100.0) for k, v in params.items()}
    grads["dx"] = np.full((5,), 1e6)  # not a parameter's: ignored
    res = fit(params, [None], _constant_loss(grads), SGD(lr=1.0), clip_value=0.5,
              progress=False)
    for k in params:
        np.testing.assert_array_equal(res.params[k], np.full(params[k].shape, -0.5))


# ------------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
@pytest.mark.parametrize("clip", [{}, {"clip_value": 1.0}, {"clip_value": 1.0, "clip_norm": 1.0}])
def test_non_finite_gradients_stop_the_run_without_clip_norm(bad, clip):
    """Without clip_norm (and with clip_value, which would turn inf into the bound) an inf
    or NaN gradient stops fit at its step, naming it, before the update."""
    params, batches = host_setup(n_batches=3)
    seen = []

    def loss_fn(p, b):
        loss, grads = make_loss()(p, b)
        seen.append(p)
        if len(seen) == 2:
            grads = dict(grads, dbi=grads["dbi"] * 0.0 + bad)
        return loss, grads

    with pytest.raises(FloatingPointError, match=r"grads\['dbi'\] holds inf or NaN at step 2"):
        fit(params, batches, loss_fn, SGD(lr=0.1), progress=False, **clip)


def test_non_finite_gradients_of_a_tree_are_named_by_path():
    params = {"rnn": [{"W": np.zeros((2, 2))}], "head": {"w": np.zeros(3)}}

    def loss_fn(p, b):
        return 1.0, {"rnn": [{"W": np.zeros((2, 2))}], "head": {"w": np.array([0, np.nan, 0])}}

    with pytest.raises(FloatingPointError, match=r"grads\['head'\]\['w'\] holds inf or NaN"):
        fit(params, [None], loss_fn, SGD(lr=0.1), progress=False)


# ------------------------------------------------------------ errors that say the fix
def test_loss_fn_results_of_the_wrong_kind_are_named():
    params, batches = host_setup(n_batches=1)
    good = make_loss()
    cases = [
        (lambda p, b: good(p, b)[0], TypeError, r"return a pair \(loss, grads\), got ndarray"),
        (lambda p, b: (*good(p, b), 1), TypeError, "got a tuple of 3"),
        (lambda p, b: ("a", good(p, b)[1]), TypeError, "loss must be a 0-d array .* got str"),
        (lambda p, b: (np.ones(4), good(p, b)[1]), ValueError, r"got shape \(4,\)"),
        (lambda p, b: (good(p, b)[0], 3), TypeError, "grads must be a dict .* got int"),
        (lambda p, b: (good(p, b)[0], {}), KeyError, "grads lack 'dWf'"),
    ]
    for fn, kind, match in cases:
        with pytest.raises(kind, match=match):
            fit(params, batches, fn, SGD(lr=0.1), progress=False)


def test_arguments_that_were_obscure_errors():
    params, batches = host_setup(n_batches=1)
    loss_fn, opt = make_loss(), SGD(lr=0.1)
    for bad in ("a", None, float("nan"), 0.0, 1.5):
        with pytest.raises((TypeError, ValueError), match="smoothing"):
            fit(params, batches, loss_fn, opt, smoothing=bad, progress=False)
    with pytest.raises(TypeError, match=r"batches\(\) returned int; it must return an iterable"):
        fit(params, lambda: 3, loss_fn, opt, progress=False)
    with pytest.raises(TypeError, match="callback must be callable"):
        fit(params, batches, loss_fn, opt, callback=3, progress=False)
    with pytest.raises(TypeError, match=r"callback must return None or a bool .* ndarray of "
                                        r"shape \(2,\)"):
        fit(params, batches, loss_fn, opt, callback=lambda info: np.zeros(2), progress=False)
    # what stops training still does: a bool, a number, a 0-d array
    for stop in (True, 1, np.bool_(True), np.array(1.0)):
        res = fit(params, batches * 3, loss_fn, opt, callback=lambda info, s=stop: s,
                  progress=False)
        assert res.stopped_early and len(res.history) == 1


def test_a_checkpoint_path_that_cannot_be_written_is_refused_before_the_first_step(tmp_path):
    """Checked before any step: a missing folder, a directory, a path under a file. It
    failed after the whole run and lost the trained parameters."""
    params, batches = host_setup(n_batches=2)
    calls = []

    def loss_fn(p, b):
        calls.append(1)
        return make_loss()(p, b)

    (tmp_path / "file").write_text("")
    for path, match in ((tmp_path / "missing" / "c.npz", "folder .* does not exist"),
                        (tmp_path, "is a directory; give the path of a file in it"),
                        (tmp_path / "file" / "c.npz", "does not exist")):
        with pytest.raises(ValueError, match=f"checkpoint=.*{match}"):
            fit(params, batches, loss_fn, SGD(lr=0.1), checkpoint=path, progress=False)
    assert not calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no probe left behind


def test_a_checkpoint_without_its_counters_or_past_the_run_is_refused(tmp_path):
    from xlstm.io import save_checkpoint

    params, batches = host_setup(n_batches=2)
    loss_fn, opt = make_loss(), SGD(lr=0.1)
    path = tmp_path / "c.npz"
    fit(params, batches, loss_fn, opt, checkpoint=path, progress=False)
    save_checkpoint(tmp_path / "nostep.npz", {"params": params}, {"epoch": 0, "batch": 1})
    with pytest.raises(ValueError, match=r"has no 'step' counter"):
        fit(params, batches, loss_fn, opt, resume=tmp_path / "nostep.npz", progress=False)
    for epoch in (2, 2**40):
        save_checkpoint(tmp_path / "far.npz", {"params": params},
                        {"step": 2, "epoch": epoch, "batch": 1, "opt_state.step": 2})
        with pytest.raises(ValueError, match=rf"written in epoch {epoch} .* past this run's "
                                             rf"epochs=2; pass epochs > {epoch}"):
            fit(params, batches, loss_fn, opt, epochs=2, resume=tmp_path / "far.npz",
                progress=False)
    # the run's own checkpoint resumes to the end: no step left, no error
    res = fit(params, batches, loss_fn, opt, resume=path, progress=False)
    assert res.history == []
