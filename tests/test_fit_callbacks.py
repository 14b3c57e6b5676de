"""fit's validation, callbacks, records and logging.

* Validation: metrics at the right steps (every N steps; at every epoch's end and at a
  ``steps=`` end), equal to the metrics computed by hand on the parameters of that step;
  the default metric is loss_fn's loss; with ``comm``, the same metrics on every rank as in
  one process, and a rank's failure raised on every rank.
* EarlyStopping stops after the right validation and returns the best parameters;
  Checkpoint writes every N steps files that ``resume=`` goes on from.
* Records: a StepRecord per step and an EvalRecord per validation, typed.
* Logging: records of the "xlstm.training" logger, shown on stdout with ``verbose=True``
  and not with ``verbose=False``; nothing in fit or its callbacks calls ``print``.
"""

from __future__ import annotations

import ast
import logging
import math
import pathlib
import sys
import typing

import numpy as np
import pytest
from dp_case import case
from helpers import assert_array, to_numpy
from thread_comm import run_ranks

import xlstm
from xlstm import SGD, Adam, init_params, lstm_forward, sequence_cross_entropy
from xlstm.training import (
    Callback,
    Checkpoint,
    EarlyStopping,
    EvalRecord,
    FitResult,
    StepRecord,
    accuracy,
)

N_X, N_A, M, T = 3, 5, 4, 6


def _task(rng, n):
    """``n`` batches of 'label = current input symbol': one-hot ``x`` and labels."""
    out = []
    for _ in range(n):
        ids = rng.integers(0, N_X, size=(M, T))
        out.append((np.eye(N_X)[ids].transpose(2, 0, 1), ids))  # x (n_x, m, T), (m, T)
    return out


def _setup(n_train=4, n_val=3, seed=0):
    rng = np.random.default_rng(seed)
    return init_params(N_X, N_A, N_X, seed=seed), _task(rng, n_train), _task(rng, n_val)


A0 = np.zeros((N_A, M))


def loss_fn(params, batch):
    return sequence_cross_entropy(batch[0], A0, params, batch[1])


def eval_fn(params, batch):
    x, labels = batch
    _, y, _, _ = lstm_forward(x, A0, params)
    loss, _ = sequence_cross_entropy(x, A0, params, labels)
    return {"loss": loss, "accuracy": accuracy(y, labels)}


def by_hand(params, val):
    """The validation metrics of ``params``, computed without fit: numpy's mean over the
    batches of the cross-entropy and of the argmax hits."""
    losses, hits = [], []
    for x, labels in val:
        _, y, _, _ = lstm_forward(x, A0, params)
        p = np.take_along_axis(y, labels[None], axis=0)[0]  # (m, T)
        losses.append(-np.log(p).mean())
        hits.append((y.argmax(axis=0) == labels).mean())
    return {"loss": float(np.mean(losses)), "accuracy": float(np.mean(hits))}


class Recorder(Callback):
    """Every hook's call, and the parameters after every step."""

    def on_train_begin(self, info):
        self.calls, self.params = [("begin", info.step, info.total)], {}

    def on_step_end(self, info):
        self.calls.append(("step", info.step))
        self.params[info.step] = info.params

    def on_eval_end(self, info):
        self.calls.append(("eval", info.step, dict(info.metrics)))

    def on_train_end(self, info):
        self.calls.append(("end", info.step, info.stopped_early))


# ----------------------------------------------------------------------------- validation
def test_validation_every_n_steps_equals_a_computation_by_hand():
    params, train, val = _setup()
    rec = Recorder()
    res = fit_quiet(params, train, loss_fn, Adam(lr=0.05), epochs=3, validation=val,
                    eval_fn=eval_fn, validate_every=5, callbacks=[rec])
    assert [e.step for e in res.evals] == [5, 10]
    assert [e.epoch for e in res.evals] == [1, 2]  # 4 batches an epoch
    for e in res.evals:
        assert list(e.metrics) == ["loss", "accuracy"]
        want = by_hand(rec.params[e.step], val)
        assert e.metrics["loss"] == pytest.approx(want["loss"], rel=1e-13)
        assert e.metrics["accuracy"] == pytest.approx(want["accuracy"], rel=1e-13)
    # the hooks: the validation after the step's own hook, the end after the last step
    assert rec.calls[0] == ("begin", 0, 12)
    assert [c[:2] for c in rec.calls[1:]] == (
        [("step", s) for s in range(1, 6)] + [("eval", 5)]
        + [("step", s) for s in range(6, 11)] + [("eval", 10)]
        + [("step", 11), ("step", 12), ("end", 12)])
    assert [c[2] for c in rec.calls if c[0] == "eval"] == [e.metrics for e in res.evals]


def test_validation_at_every_epoch_end_and_at_a_steps_end():
    params, train, val = _setup()
    rec = Recorder()
    res = fit_quiet(params, train, loss_fn, SGD(lr=0.1), epochs=3, steps=10,
                    validation=lambda: iter(val), eval_fn=eval_fn, callbacks=[rec])
    assert [(e.step, e.epoch) for e in res.evals] == [(4, 0), (8, 1), (10, 2)]
    for e in res.evals:
        assert e.metrics == pytest.approx(by_hand(rec.params[e.step], val), rel=1e-13)
    # no steps= limit: one validation per epoch, the last one that of the final params
    res = fit_quiet(params, train, loss_fn, SGD(lr=0.1), epochs=2, validation=val,
                    eval_fn=eval_fn)
    assert [e.step for e in res.evals] == [4, 8]
    assert res.evals[-1].metrics == pytest.approx(by_hand(res.params, val), rel=1e-13)


def test_the_default_metric_is_the_loss_of_loss_fn():
    params, train, val = _setup()
    res = fit_quiet(params, train, loss_fn, SGD(lr=0.1), validation=val)
    (only,) = res.evals
    assert list(only.metrics) == ["loss"]
    want = math.fsum(float(loss_fn(res.params, b)[0]) for b in val) / len(val)
    assert only.metrics["loss"] == want


def test_a_number_from_eval_fn_is_the_metric_loss_and_an_array_of_one_element_counts():
    params, train, val = _setup()
    got = fit_quiet(params, train, loss_fn, SGD(lr=0.1), validation=val,
                    eval_fn=lambda p, b: loss_fn(p, b)[0].reshape(1, 1))
    want = fit_quiet(params, train, loss_fn, SGD(lr=0.1), validation=val)
    assert got.evals[0].metrics == want.evals[0].metrics


def test_validation_is_deterministic():
    params, train, val = _setup()

    def run():
        return fit_quiet(params, train, loss_fn, Adam(lr=0.05), epochs=2, validation=val,
                         eval_fn=eval_fn, validate_every=3)

    a, b = run(), run()
    assert [tuple(e[:3]) for e in a.evals] == [tuple(e[:3]) for e in b.evals]


def test_records_are_typed_and_follow_the_steps(tmp_path):
    params, train, val = _setup()
    res = fit_quiet(params, train, loss_fn, SGD(lr=0.1), epochs=2, validation=val,
                    checkpoint=tmp_path / "c.npz", checkpoint_every=3)
    assert isinstance(res, FitResult)
    assert all(isinstance(r, StepRecord) for r in res.records)
    assert [(r.step, r.epoch) for r in res.records] == [(s, (s - 1) // 4) for s in range(1, 9)]
    assert [r.loss for r in res.records] == res.history
    seconds = [r.seconds for r in res.records]
    assert seconds == sorted(seconds) and res.seconds >= seconds[-1]
    assert all(isinstance(e, EvalRecord) and isinstance(e.metrics["loss"], float)
               for e in res.evals)
    # resumed from the end (step 8, all 4 batches of epoch 1): no step, and the epoch's
    # end validates the same parameters to the same numbers
    again = fit_quiet(params, train, loss_fn, SGD(lr=0.1), epochs=2, validation=val,
                      resume=tmp_path / "c.npz")
    assert again.records == [] and [e[:3] for e in again.evals] == [res.evals[-1][:3]]
    hints = typing.get_type_hints(FitResult)
    assert hints["history"] == list[float]
    assert hints["records"] == list[StepRecord] and hints["evals"] == list[EvalRecord]
    assert typing.get_type_hints(EvalRecord)["metrics"] == dict[str, float]


def test_validation_arguments_are_checked():
    params, train, val = _setup()
    opt = SGD(lr=0.1)
    cases = [
        ({"eval_fn": eval_fn}, ValueError, r"eval_fn needs validation="),
        ({"validate_every": 2}, ValueError, r"validate_every needs validation="),
        ({"validation": 3}, TypeError, r"validation must be an iterable"),
        ({"validation": iter(val)}, ValueError, r"one-shot iterator"),
        ({"validation": val, "eval_fn": 3}, TypeError, r"eval_fn must be callable"),
        ({"validation": val, "validate_every": 0}, ValueError, r"validate_every"),
        ({"validation": []}, ValueError, r"validation at step 4 had no batch"),
        ({"validation": val, "eval_fn": lambda p, b: {}}, ValueError, "no metrics"),
        ({"validation": val, "eval_fn": lambda p, b: {"acc": np.ones(2)}}, ValueError,
         r"metric 'acc' must be one number .* shape \(2,\)"),
        ({"validation": val, "eval_fn": lambda p, b: {"acc": "high"}}, TypeError,
         r"metric 'acc' must be a number"),
        ({"validation": lambda: 3}, TypeError, r"validation\(\) returned int"),
        ({"callbacks": [EarlyStopping()]}, ValueError, r"EarlyStopping reads the "
                                                       r"validation metrics: pass validation="),
    ]
    for kw, kind, match in cases:
        with pytest.raises(kind, match=match):
            fit_quiet(params, train, loss_fn, opt, **kw)
    names = iter([{"loss": 1.0}, {"lost": 1.0}, {"loss": 1.0}])
    with pytest.raises(ValueError, match=r"\['lost'\] for validation batch 2 but \['loss'\]"):
        fit_quiet(params, train, loss_fn, opt, validation=val,
                  eval_fn=lambda p, b: next(names))


def test_a_validation_metric_that_is_not_finite_is_recorded():
    params, train, val = _setup()
    res = fit_quiet(params, train, loss_fn, SGD(lr=0.1), validation=val,
                    eval_fn=lambda p, b: {"loss": float("nan")})
    assert math.isnan(res.evals[0].metrics["loss"])


# ------------------------------------------------------------------------- early stopping
def _scripted(values, name="loss"):
    """An eval_fn giving ``values`` in turn (one validation batch per validation)."""
    it = iter(values)
    return lambda params, batch: {name: next(it)}


@pytest.mark.parametrize("patience, min_delta, stop, best", [
    (0, 0.0, 3, 2),     # 4.0 is not below 3.0
    (1, 0.0, 6, 4),     # 2.9 improves at step 4; 2.95 and 3.5 do not
    (1, 0.2, 4, 2),     # 2.9 is not 0.2 below 3.0
    (3, 0.0, None, 8),  # never three in a row: 1.0 at step 8
])
def test_early_stopping_stops_after_the_right_validation(patience, min_delta, stop, best):
    params, train, _ = _setup(n_train=8)
    values = [5.0, 3.0, 4.0, 2.9, 2.95, 3.5, 2.99, 1.0]
    rec = Recorder()
    es = EarlyStopping(patience=patience, min_delta=min_delta, restore_best=True)
    res = fit_quiet(params, train, loss_fn, SGD(lr=0.1), validation=[None],
                    eval_fn=_scripted(values), validate_every=1, callbacks=[rec, es])
    assert es.stopped_step == stop and res.stopped_early == (stop is not None)
    assert len(res.history) == (stop or 8) and [e.step for e in res.evals] == list(
        range(1, (stop or 8) + 1))
    assert es.best_step == best and es.best == values[best - 1]
    for k in params:  # the best validation's parameters, not the last ones
        np.testing.assert_array_equal(res.params[k], rec.params[best][k])
    if best != len(res.history):
        assert not all(np.array_equal(res.params[k], rec.params[len(res.history)][k])
                       for k in params)


def test_early_stopping_modes_and_no_restore():
    params, train, _ = _setup(n_train=6)
    # "accuracy" is maximised: 0.5, 0.7, 0.6, 0.6 stops at step 4 with patience 1
    rec = Recorder()
    es = EarlyStopping("accuracy", patience=1)
    assert es.mode == "max" and EarlyStopping("loss").mode == "min"
    res = fit_quiet(params, train, loss_fn, SGD(lr=0.1), validation=[None],
                    eval_fn=_scripted([0.5, 0.7, 0.6, 0.6, 0.9, 0.9], "accuracy"),
                    validate_every=1, callbacks=[rec, es])
    assert (es.stopped_step, es.best_step) == (4, 2)
    for k in params:  # restore_best=False: the last parameters
        np.testing.assert_array_equal(res.params[k], rec.params[4][k])
    # a NaN never improves, even first
    es = EarlyStopping(mode="min", patience=0)
    fit_quiet(params, train, loss_fn, SGD(lr=0.1), validation=[None],
              eval_fn=_scripted([float("nan")] * 6), validate_every=2, callbacks=[es])
    assert es.best is None and es.stopped_step == 2


def test_early_stopping_is_refused_when_misconfigured():
    params, train, _ = _setup()
    with pytest.raises(KeyError, match=r"monitor='val_loss'.* the metrics \['loss'\]"):
        fit_quiet(params, train, loss_fn, SGD(lr=0.1), validation=[None],
                  eval_fn=_scripted([1.0] * 4), validate_every=1,
                  callbacks=[EarlyStopping("val_loss")])
    for kw, kind in (({"patience": -1}, ValueError), ({"patience": 1.5}, TypeError),
                     ({"min_delta": -0.1}, ValueError), ({"mode": "up"}, ValueError),
                     ({"restore_best": 1}, TypeError)):
        with pytest.raises(kind, match=next(iter(kw))):
            EarlyStopping(**kw)


# ------------------------------------------------------------------------------ checkpoint
def test_checkpoint_every_n_steps_resumes_to_the_uninterrupted_run(tmp_path):
    params, train, val = _setup()
    kw = {"epochs": 3, "validation": val, "validate_every": 2}
    whole = fit_quiet(params, train, loss_fn, Adam(lr=0.05), **kw)
    saver = Checkpoint(tmp_path / "ck-{epoch}-{step:03d}.npz", every=5)
    first = fit_quiet(params, train, loss_fn, Adam(lr=0.05), callbacks=[saver], **kw)
    assert [pathlib.Path(p).name for p in saver.written] == [
        "ck-1-005.npz", "ck-2-010.npz", "ck-2-012.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        pathlib.Path(p).name for p in saver.written)
    assert first.history == whole.history
    _, counters = xlstm.io.load_checkpoint(saver.written[0])
    assert counters == {"step": 5, "epoch": 1, "batch": 1, "opt_state.step": 5}
    again = fit_quiet(params, train, loss_fn, Adam(lr=0.05), resume=saver.written[0], **kw)
    assert again.history == whole.history[5:]
    assert [r.step for r in again.records] == list(range(6, 13))
    assert again.evals == [e._replace(seconds=a.seconds) for e, a in
                           zip(whole.evals[2:], again.evals)]
    for k in params:
        np.testing.assert_array_equal(again.params[k], whole.params[k])


def test_checkpoint_paths_are_checked_before_the_first_step(tmp_path):
    params, train, _ = _setup()
    calls = []

    def counting(p, b):
        calls.append(1)
        return loss_fn(p, b)

    for path, kind, match in (
            (tmp_path / "no" / "c{step}.npz", ValueError, "folder .* does not exist"),
            (tmp_path / "c{nope}.npz", ValueError, r"\{step\} or \{epoch\}"),
            (3, TypeError, "must be a str or os.PathLike")):
        with pytest.raises(kind, match=match):
            fit_quiet(params, train, counting, SGD(lr=0.1), callbacks=[Checkpoint(path)])
    with pytest.raises(ValueError, match="every"):
        Checkpoint(tmp_path / "c.npz", every=0)
    assert not calls


# ---------------------------------------------------------------------------- callbacks
def test_a_callback_stops_from_a_validation_at_an_epoch_end():
    params, train, val = _setup()

    class StopAtSecond(Callback):
        def on_eval_end(self, info):
            return info.step == 8

    res = fit_quiet(params, train, loss_fn, SGD(lr=0.1), epochs=5, validation=val,
                    callbacks=[StopAtSecond()])
    assert res.stopped_early and len(res.history) == 8 and len(res.evals) == 2


def test_callbacks_are_checked():
    params, train, _ = _setup()
    opt = SGD(lr=0.1)
    with pytest.raises(TypeError, match=r"put it in a list: callbacks=\[\.\.\.\]"):
        fit_quiet(params, train, loss_fn, opt, callbacks=EarlyStopping())
    with pytest.raises(TypeError, match="callbacks must hold callbacks .* got int"):
        fit_quiet(params, train, loss_fn, opt, callbacks=[3])

    class Answers(Callback):
        def on_step_end(self, info):
            return "yes"

    with pytest.raises(TypeError, match=r"Answers.on_step_end must return None or a bool"):
        fit_quiet(params, train, loss_fn, opt, callbacks=[Answers()])

    class Shrinks(Callback):
        def on_train_end(self, info):
            return {k: v[:1] for k, v in info.params.items()}

    with pytest.raises(ValueError, match=r"Shrinks.on_train_end returned params\['Wf'\] "
                                         r"of shape \(1, 8\)"):
        fit_quiet(params, train, loss_fn, opt, callbacks=[Shrinks()])


def test_on_train_end_may_hand_back_the_parameters():
    params, train, _ = _setup()

    class Initial(Callback):
        def on_train_end(self, info):
            return params

    res = fit_quiet(params, train, loss_fn, SGD(lr=0.1), callbacks=[Initial()])
    assert res.params is params and len(res.history) == 4


# ------------------------------------------------------------------------------ logging
def test_records_go_to_the_logger_and_to_stdout_only_when_verbose(caplog, capsys):
    params, train, val = _setup()
    caplog.set_level(logging.INFO, logger="xlstm.training")
    es = EarlyStopping(patience=0, restore_best=True)
    kw = {"validation": [None], "eval_fn": _scripted([2.0, 3.0] * 2), "validate_every": 2,
          "callbacks": [es], "callback": lambda info: info.log(f"hello {info.step}"),
          "progress": False}
    for verbose in (True, False):
        caplog.clear()
        xlstm.fit(params, train, loss_fn, SGD(lr=0.1), verbose=verbose, **kw)
        messages = [r.getMessage() for r in caplog.records]
        assert all(r.name == "xlstm.training" and r.levelno == logging.INFO
                   for r in caplog.records)
        assert messages == [
            "hello 1", "step 2 (epoch 0): validation loss 2.0000", "hello 2",
            "hello 3", "step 4 (epoch 0): validation loss 3.0000", "hello 4",
            "early stopping after step 4: validation loss: it has not improved on 2 "
            "(step 2) for 1 validation",
            "restoring the parameters of step 2 (validation loss 2)"]
        out, err = capsys.readouterr()
        assert out == ("".join(m + "\n" for m in messages) if verbose else "")
        assert err == ""


def test_nothing_is_shown_when_logging_is_off_and_not_verbose(capsys):
    """With no handler configured and verbose=False, fit writes nothing: the package's
    NullHandler keeps logging's last-resort handler from printing its warnings."""
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("xlstm").handlers)
    params, train, _ = _setup()
    xlstm.fit(params, train, loss_fn, SGD(lr=0.1), verbose=False,
              callback=lambda info: info.log("hello"))
    assert capsys.readouterr() == ("", "")


def test_a_missing_tqdm_is_a_warning_record(monkeypatch, caplog, capsys):
    for name in ("tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    params, train, _ = _setup()
    xlstm.fit(params, train, loss_fn, SGD(lr=0.1), progress=True)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.name == "xlstm.training"
    assert "tqdm is not installed" in record.getMessage()
    assert "tqdm is not installed" in capsys.readouterr().err


def test_the_bar_shows_the_validation_and_log_lines_pass_through_it(capsys):
    pytest.importorskip("tqdm")
    params, train, val = _setup()
    xlstm.fit(params, train, loss_fn, SGD(lr=0.1), validation=val, progress=True,
              desc="valrun", callback=lambda info: info.log(f"hello {info.step}"))
    out, err = capsys.readouterr()
    assert "valrun" in err and "val_loss=" in err and "4/4" in err
    assert "hello 4\n" in out and "step 4 (epoch 0): validation loss" in out


@pytest.mark.parametrize("module", ["fit.py", "callbacks.py"])
def test_no_print_in_the_training_loop(module):
    path = pathlib.Path(xlstm.training.__file__).parent / module
    tree = ast.parse(path.read_text())
    calls = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name) and n.func.id == "print"]
    assert calls == [], f"{module} calls print at lines {calls}"


# ------------------------------------------------------------------------ data parallel
def _val_shards(comm, kind):
    _, _, _, shard_batch = case(kind)
    val = case(kind)[1][:2]
    return val if comm is None else [shard_batch(b, comm) for b in val]


def test_two_ranks_validate_as_one_process():
    """The metrics of every validation, averaged over 2 ranks, equal one process's on the
    global batches (to rounding), and are the same on both ranks; EarlyStopping with
    restore_best leaves both ranks with identical parameters, those of one process."""
    params, batches, case_loss, shard_batch = case("notebook")
    val = [(x[:, :, ::-1].copy(), y[:, ::-1].copy()) for x, y in batches[:2]]

    def metric(p, b):
        x, labels = b
        return {"loss": case_loss(p, b)[0],
                "accuracy": accuracy(lstm_forward(x, np.zeros((p["Wf"].shape[0],
                                                                x.shape[1])), p)[1], labels)}

    def run(comm):
        mine = batches if comm is None else [shard_batch(b, comm) for b in batches]
        v = val if comm is None else [shard_batch(b, comm) for b in val]
        es = EarlyStopping(patience=0, restore_best=True)
        return xlstm.fit(params, mine, case_loss, Adam(lr=0.05), epochs=4, comm=comm,
                         validation=v, eval_fn=metric, validate_every=3, callbacks=[es],
                         verbose=False)

    one = run(None)
    res = run_ranks(2, run)
    for r in res:
        if isinstance(r, BaseException):
            raise r
    assert one.stopped_early and len(one.evals) == 3  # stopped at step 9; step 6's params
    for r in res:
        assert [e.step for e in r.evals] == [e.step for e in one.evals]
        assert r.stopped_early == one.stopped_early and r.history == res[0].history
        assert [e.metrics for e in r.evals] == [e.metrics for e in res[0].evals]
        for e, want in zip(r.evals, one.evals):
            assert e.metrics == pytest.approx(want.metrics, rel=1e-12)
        for k in params:
            assert np.array_equal(r.params[k], res[0].params[k])
            np.testing.assert_allclose(r.params[k], one.params[k], rtol=1e-11, atol=1e-13)


def test_a_rank_that_fails_or_differs_in_validation_stops_every_rank():
    params, batches, case_loss, shard_batch = case("notebook")

    def run(comm, *, fail=False, fewer=False):
        mine = [shard_batch(b, comm) for b in batches]
        val = mine[:2] if not (fewer and comm.rank == 1) else mine[:1]

        def metric(p, b):
            if fail and comm.rank == 1:
                raise KeyError("no such metric")
            return {"loss": case_loss(p, b)[0]}

        return xlstm.fit(params, mine, case_loss, SGD(lr=0.1), comm=comm, validation=val,
                         eval_fn=metric, validate_every=2, verbose=False)

    for r in run_ranks(2, lambda comm: run(comm, fail=True)):
        assert isinstance(r, xlstm.distributed.RankError), r
        assert "rank 1 failed at step 2: KeyError" in str(r) and "no such metric" in str(r)
    for r in run_ranks(2, lambda comm: run(comm, fewer=True)):
        assert isinstance(r, ValueError) and "validations differ at step 2" in str(r), r


# --------------------------------------------------------------------------- accuracy
def test_accuracy_on_every_backend(xp, device):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((4, 3, 5))
    labels = rng.integers(0, 4, size=(3, 5))
    mask = rng.random((3, 5)) < 0.6
    weights = rng.random((3, 5))
    hits = logits.argmax(axis=0) == labels

    def on(a, dtype=None):
        return xp.asarray(a, dtype=dtype, device=device)

    got = accuracy(on(logits, xp.float64), on(labels, xp.int64))
    assert_array(got, xp=xp, device=device, shape=(), dtype=xp.float64)
    assert float(to_numpy(got)) == pytest.approx(hits.mean(), rel=1e-15)
    got = accuracy(on(logits, xp.float64), on(labels, xp.int64), mask=on(mask))
    assert float(to_numpy(got)) == pytest.approx(hits[mask].mean(), rel=1e-15)
    got = accuracy(on(logits, xp.float64), on(labels, xp.int64), mask=on(weights, xp.float64))
    assert float(to_numpy(got)) == pytest.approx((hits * weights).sum() / weights.sum(),
                                                 rel=1e-13)


def test_accuracy_refuses_bad_arguments_by_name():
    logits, labels = np.zeros((2, 3, 4)), np.zeros((3, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="labels"):
        accuracy(logits, labels[:, :2])
    with pytest.raises(TypeError, match="labels"):
        accuracy(logits, labels.astype(np.float64))
    with pytest.raises(ValueError, match="mask"):
        accuracy(logits, labels, mask=np.ones((3, 2), dtype=bool))
    with pytest.raises(ValueError, match="logits"):
        accuracy(logits[0], labels)


def fit_quiet(*args, **kw):
    """fit without a bar or log lines on the terminal."""
    return xlstm.fit(*args, progress=False, verbose=False, **kw)
