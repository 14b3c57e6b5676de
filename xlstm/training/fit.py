"""A minimal training loop: minibatches, an optimizer step, clipping, validation, a
history, callbacks.

:func:`fit` is the loop that every script on top of the losses and optimizers would
otherwise write by hand::

    from xlstm import Adam, EarlyStopping, init_params, sequence_cross_entropy
    from xlstm.training.fit import fit

    def loss_fn(params, batch):
        x, labels = batch
        return sequence_cross_entropy(x, a0, params, labels)

    result = fit(params, batches, loss_fn, Adam(lr=3e-3), epochs=5, clip_norm=5.0,
                 validation=held_out, callbacks=[EarlyStopping("loss", patience=2)])
    params, history, evals = result.params, result.history, result.evals

It is functional like the optimizers: ``params`` are never modified, every step makes new
arrays, so it runs unchanged on numpy, CuPy, torch, JAX and array-api-strict. It adds no
randomness of its own: with deterministic batches and a deterministic ``loss_fn`` two runs
give the same history, bit for bit, on the CPU.

Two numbers are read back to the host per step (two device synchronisations): the loss, to
record the history, show it on the progress bar, hand it to the callbacks and stop on a
non-finite value; and whether every gradient is finite, to stop before an update with inf
or NaN (one reduction over the gradients; with ``clip_norm`` alone, their global norm,
which clipping needs anyway). A validation reads back every metric of every validation
batch.

Its messages are records of the ``logging`` logger ``"xlstm.training"`` (see
:mod:`xlstm.training.callbacks`); it prints nothing itself.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from numbers import Real
from typing import Any, NamedTuple

from .._lib.compat import on_input_device
from .._lib.tree import flatten, is_tree
from .._lib.typing import Grads, Params
from .callbacks import (
    _DISPLAY,
    BeginInfo,
    Callback,
    Checkpoint,
    EndInfo,
    EvalInfo,
    ProgressBar,
    StepInfo,
    _Display,
    _emit,
    _FunctionCallback,
    _hooks_of,
    _log,
    _positive,
    _smoothing,
    _split_state,
    _stop_requested,
)
from .optim import clip_by_global_norm, clip_by_value

__all__ = ["fit", "FitResult", "StepInfo", "StepRecord", "EvalRecord"]


class StepRecord(NamedTuple):
    """One optimizer step of a run, as ``FitResult.records`` holds it.

    Attributes
    ----------
    step : int
        Optimizer steps taken after this one (1 for the first; a resumed run counts its
        checkpoint's steps too).
    epoch : int
        Index of its epoch, from 0.
    loss : float
        Its loss, before the update (with ``comm``, the mean over the ranks).
    seconds : float
        Wall time from the start of :func:`fit` to the end of this step.
    """

    step: int
    epoch: int
    loss: float
    seconds: float


class EvalRecord(NamedTuple):
    """One validation of a run, as ``FitResult.evals`` holds it.

    Attributes
    ----------
    step : int
        Optimizer steps taken when it ran (the parameters evaluated are those after this
        step).
    epoch : int
        Index of the epoch in which it ran, from 0.
    metrics : dict of str to float
        Every metric of ``eval_fn``, in its order: the mean over the validation batches
        (with ``comm``, the mean over the ranks of each rank's mean).
    seconds : float
        Wall time from the start of :func:`fit` to the end of this validation.
    """

    step: int
    epoch: int
    metrics: dict[str, float]
    seconds: float


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes
    ----------
    params : dict of arrays, or a tree of them
        The trained parameters (new arrays; the input is not modified), or those that a
        callback's ``on_train_end`` handed back (:class:`xlstm.EarlyStopping` with
        ``restore_best=True``: the best validation's).
    history : list of float
        The loss of every step this call took, in order (with ``comm``, the mean over the
        ranks): ``[r.loss for r in records]``.
    opt_state : dict
        The final optimizer state; pass it back as ``fit(..., opt_state=...)`` to go on
        training where this run stopped.
    stopped_early : bool
        True when a callback asked to stop.
    seconds : float
        Wall time of the whole run.
    records : list of StepRecord
        Every step this call took: its step count, epoch, loss and time.
    evals : list of EvalRecord
        Every validation of the run (empty without ``validation``), in order.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> def loss_fn(params, batch):  # (w - batch)^2 and its gradient
    ...     return (params["w"] - batch) ** 2, {"dw": 2.0 * (params["w"] - batch)}
    >>> result = xlstm.fit({"w": np.array(0.0)}, [1.0, 1.0], loss_fn, xlstm.SGD(lr=0.25),
    ...                    progress=False)
    >>> result.history, float(result.params["w"]), result.stopped_early
    ([1.0, 0.25], 0.75, False)
    >>> result.opt_state["step"], [r.step for r in result.records], result.evals
    (2, [1, 2], [])
    """

    params: Params
    history: list[float]
    opt_state: dict[str, Any]
    stopped_early: bool
    seconds: float
    records: list[StepRecord]
    evals: list[EvalRecord]


# ------------------------------------------------------------------------------ metrics
@on_input_device
# ----------------------------------------------------------------------------- helpers
def _check_callables(callback, loss_fn, optimizer):
    """Refuse a ``callback``, ``loss_fn`` or ``optimizer`` that cannot be called as
    :func:`fit` calls it."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    for method in ("init", "step"):
        if not callable(getattr(optimizer, method, None)):
            raise TypeError(
                f"optimizer must have init() and step() methods (xlstm.SGD, xlstm.Adam); "
                f"{type(optimizer).__name__} has no {method}()"
            )


def _epoch_source(batches, epochs):
    """A function ``epoch -> iterable of batches`` for the three accepted forms."""
    if callable(batches):
        def fresh(_epoch):
            got = batches()
            if not isinstance(got, Iterable):
                raise TypeError(f"batches() returned {type(got).__name__}; it must return an "
                                "iterable of batches (a list, a generator) for every epoch")
            return got

        return fresh
    if not isinstance(batches, Iterable):
        raise TypeError(
            "batches must be an iterable of batches or a callable returning one per epoch, "
            f"got {type(batches).__name__}"
        )
    if epochs > 1 and iter(batches) is batches:
        raise ValueError(
            "batches is a one-shot iterator (a generator, say), which cannot be replayed for "
            f"epochs={epochs}; pass a list, or a callable that returns a fresh iterable per "
            "epoch, or use epochs=1 with steps="
        )
    return lambda _epoch: batches


def _epochs(source, epochs, start):
    """``(epoch, batches, used)`` for every epoch left to train in: the iterator over the
    epoch's batches, of which ``used`` were drawn and dropped again (those that a resumed
    run had used; the epochs before ``start`` are drawn whole and dropped, as the first
    run drew them)."""
    for epoch in range(epochs):
        if epoch < start[0]:
            _skip(source(epoch), None, epoch)
            continue
        it = iter(source(epoch))
        yield epoch, it, _skip(it, start[1], epoch) if epoch == start[0] else 0


def _skip(it, n, epoch):
    """Draw ``n`` batches of ``it`` (all of them for ``None``) and drop them; return how
    many were drawn."""
    k = 0
    if n == 0:
        return 0
    for k, _ in enumerate(it, 1):
        if n is not None and k >= n:
            return k
    if n is not None and k < n:
        raise ValueError(f"resume: the checkpoint was written after batch {n} of epoch {epoch}, "
                         f"but this batch source has {k} in that epoch")
    return k


def _expected_steps(batches, epochs, steps):
    if isinstance(batches, Sized) and not callable(batches):
        per_run = len(batches) * epochs
        return per_run if steps is None else min(per_run, steps)
    return steps



# --------------------------------------------------------------------------------- fit
def fit(
    params: Params,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    loss_fn: Callable[[Params, Any], tuple[Any, Grads]],
    optimizer: Any,
    *,
    epochs: int = 1,
    steps: int | None = None,
    clip_norm: float | None = None,
    clip_value: float | None = None,
    opt_state: dict[str, Any] | None = None,
    callback: Callable[[StepInfo], Any] | None = None,
    callbacks: Sequence[Callback] = (),
    validation: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
    eval_fn: Callable[[Params, Any], Mapping[str, Any] | Any] | None = None,
    validate_every: int | None = None,
    progress: bool | None = None,
    desc: str = "train",
    smoothing: float = 0.05,
    verbose: bool = True,
    comm: Any = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    resume: str | os.PathLike[str] | None = None,
) -> FitResult:
    """Train ``params`` on minibatches: loss and gradients, clipping, optimizer step,
    validation, callbacks.

    For every batch: ``loss, grads = loss_fn(params, batch)``; check that the loss and
    every gradient are finite; clip the gradients by value and/or by global norm;
    ``params, state = optimizer.step(params, grads, state)``; record ``float(loss)``;
    validate when due; call the callbacks. The gradients checked and clipped are exactly
    those the optimizer steps: the ``"d" + key`` entry of every key of a flat ``params``
    dict (whatever the key), or every leaf of a tree.

    Parameters
    ----------
    params : dict of arrays, or a tree of them
        Initial parameters (for example from :func:`xlstm.init_params`), or a model's
        ``params`` (a list of dicts), possibly nested with others (``{"rnn":
        model.params, "head": head}``); not modified.
    batches : iterable, or callable returning an iterable
        The minibatches of one epoch. A callable is called once per epoch with no
        arguments (a fresh shuffle per epoch, or an endless generator limited by
        ``steps``). A sequence (list, tuple) is replayed every epoch. A one-shot iterator
        (generator object) is allowed only with ``epochs=1``.
    loss_fn : callable
        ``loss_fn(params, batch) -> (loss, grads)``: a 0-d loss array (or a Python float)
        and a gradient dict keyed ``"d" + key`` for every parameter, such as
        :func:`xlstm.sequence_cross_entropy` or :func:`xlstm.last_step_mse` return
        (extra gradient entries, ``dx``, ``da0``, ``dc0``, are ignored); for a tree of
        parameters, a tree of gradients of the same structure (a model's ``backward``
        gives its part).
    optimizer : object
        Has ``init(params) -> state`` and ``step(params, grads, state) -> (params,
        state)``, as :class:`xlstm.SGD` and :class:`xlstm.Adam`.
    epochs : int, optional
        Passes over ``batches``. Default 1.
    steps : int, optional
        Stop after this many optimizer steps in all, even within an epoch. Default: no
        limit besides ``epochs``.
    clip_norm : float, optional
        Rescale all the gradients the optimizer steps jointly so that their global L2 norm
        is at most this, as torch's ``clip_grad_norm_`` (:func:`xlstm.clip_by_global_norm`
        with ``params``). Default: no norm clipping.
    clip_value : float, optional
        Clip every gradient the optimizer steps elementwise to ``[-clip_value,
        clip_value]`` (:func:`xlstm.clip_by_value` with ``params``), before any norm
        clipping. Default: none.
    opt_state : dict, optional
        Optimizer state to resume from (``FitResult.opt_state`` of an earlier run).
        Default: ``optimizer.init(params)``.
    callback : callable, optional
        ``callback(info)`` after every step, with a :class:`StepInfo`. It returns ``None``
        or a bool (a number or a 0-d array counts as its truth): a true value stops
        training after this step. It runs after the ``checkpoint`` and before
        ``callbacks``.
    callbacks : sequence of Callback, optional
        Objects with the hooks of :class:`xlstm.Callback` (``on_train_begin``,
        ``on_step_end``, ``on_eval_end``, ``on_train_end``), called in this order:
        :class:`xlstm.EarlyStopping`, :class:`xlstm.Checkpoint`,
        :class:`xlstm.ProgressBar` or your own. A true value from a step's or a
        validation's hooks stops training after it; ``on_train_end`` may hand back the
        parameters that ``fit`` returns.
    validation : iterable, or callable returning an iterable, optional
        The validation batches: a sequence, or a callable called for a fresh iterable at
        every validation (a one-shot iterator cannot be evaluated twice and is refused).
        With ``comm``, every rank passes its shard of every validation batch.
    eval_fn : callable, optional
        ``eval_fn(params, batch) -> {name: value}``: the metrics of one validation batch,
        each a Python number or a one-element array (a mean over the batch, such as
        :func:`xlstm.training.accuracy` or a loss), with no gradient; a single number is
        the metric ``"loss"``. Every batch must give the same names. Default: ``{"loss":
        loss_fn(params, batch)[0]}`` (which computes gradients only to drop them).
    validate_every : int, optional
        Validate after every ``validate_every`` optimizer steps (counted from the start
        of training, as ``StepInfo.step``). Default: at the end of every epoch (when its
        batches run out), and after the last step when ``steps`` ends the run inside an
        epoch.
    progress : bool or None, optional
        ``None`` (default) shows a tqdm progress bar with the running loss when tqdm is
        installed and both stdout and stderr are terminals; ``True`` forces it (when tqdm
        is installed), ``False`` turns it off. Ignored when ``callbacks`` hold a
        :class:`xlstm.ProgressBar`.
    desc : str, optional
        Label of the progress bar.
    smoothing : float, optional
        Weight of the newest loss in the running average shown on the bar, in (0, 1].
        Default 0.05.
    verbose : bool, optional
        ``True`` (default): show the run's log records of the ``"xlstm.training"`` logger
        (``info.log`` lines, the validation metrics, early stopping, a missing tqdm) on
        the leading rank while it runs: INFO on stdout, warnings on stderr, through the
        progress bar when one is shown. ``False``: leave them to the application's
        ``logging`` configuration alone (pass it when that configuration shows them
        already, so that they do not appear twice).
    comm : communicator, optional
        Data-parallel training (:mod:`xlstm.distributed`): every rank runs this same call
        with ``batches`` (and ``validation``) yielding its shard of every global batch
        (equal shards). The starting parameters and optimizer state are rank 0's
        (broadcast); before every step the gradients and the loss are averaged over the
        ranks, so the parameters stay identical on every rank, which is checked at the
        end; every validation metric is averaged over the ranks, so every rank records
        the same ones. Rank 0 alone shows progress, runs ``callback`` and ``callbacks``
        (whose answers stop every rank, and whose replacement parameters are broadcast)
        and writes checkpoints. When a rank fails (an exception from its batches,
        ``loss_fn`` or ``eval_fn``, or rank 0's callbacks or checkpoint), every rank
        raises :class:`xlstm.distributed.RankError` with that rank's error; batches of
        different shapes on different ranks, or sources that run out at different steps,
        raise ``ValueError`` on every rank.
    checkpoint : str or os.PathLike, optional
        Where to write a checkpoint: adds ``xlstm.Checkpoint(checkpoint,
        every=checkpoint_every)``, which writes the parameters, the optimizer state and
        the position in the batches (:func:`xlstm.io.save_checkpoint`, atomically) every
        ``checkpoint_every`` steps and at the end. Checked before the first step: its
        folder must exist and be writable, and it must not be a folder itself.
    checkpoint_every : int, optional
        Steps between checkpoints (default: only at the end).
    resume : str or os.PathLike, optional
        A checkpoint to go on from: its parameters and optimizer state replace
        ``params`` and ``opt_state`` (which give the structure, namespace and device), and
        the batches it had used are drawn again and skipped, so that with a deterministic
        batch source the run ends as the uninterrupted one would. ``steps`` counts the
        checkpoint's steps too; ``history`` holds this call's steps only.

    Returns
    -------
    FitResult
        ``(params, history, opt_state, stopped_early, seconds, records, evals)``: the
        trained parameters, the per-step losses as Python floats, the final optimizer
        state, whether a callback stopped the run, its wall time, a
        :class:`xlstm.training.StepRecord` per step and an
        :class:`xlstm.training.EvalRecord` per validation.

    Raises
    ------
    FloatingPointError
        At the first step whose loss is NaN or infinite, or one of whose gradients holds
        inf or NaN (the message names it and the step; the update is not made), or whose
        gradients' global norm exceeds their dtype's range. The parameters of the steps
        before are lost with the exception: checkpoint, lower the learning rate or clip.
        (A validation metric that is not finite is recorded, not raised.)
    TypeError, ValueError
        For an invalid argument (the message names it), before the first step: among
        them a ``checkpoint`` path that cannot be written, a ``resume`` checkpoint that
        lacks a counter or was written in an epoch past ``epochs``, an
        :class:`xlstm.EarlyStopping` without ``validation``. During the run: a
        ``loss_fn`` that does not return a pair of a one-number loss and the gradients
        (or lacks the gradient of a parameter: ``KeyError``), an ``eval_fn`` that does
        not return metrics of one number each, a validation with no batch, a
        ``callback`` that returns anything but ``None``, a bool or a number.

    Notes
    -----
    Each step reads two numbers back to the host (the loss, and whether the gradients are
    finite); clipping and the update stay on the device. Running the loop on the CPU with
    the same batches and parameters gives an identical history, and identical
    validations: the metrics are summed on the host in batch order (``math.fsum``).

    Examples
    --------
    A parameter ``w`` fitted to batches of mean 2, validated against 1 every 2 steps: the
    validation loss stops improving, and early stopping ends the run:

    >>> import numpy as np
    >>> import xlstm
    >>> def loss_fn(params, batch):                     # (w - batch)^2 and its gradient
    ...     return (params["w"] - batch) ** 2, {"dw": 2.0 * (params["w"] - batch)}
    >>> def eval_fn(params, batch):                     # no gradient
    ...     return {"loss": (params["w"] - batch) ** 2}
    >>> result = xlstm.fit({"w": np.array(0.0)}, [1.0, 3.0] * 4, loss_fn,
    ...                    xlstm.SGD(lr=0.1), validation=[1.0], eval_fn=eval_fn,
    ...                    validate_every=2, callbacks=[xlstm.EarlyStopping(patience=1)],
    ...                    progress=False, verbose=False)
    >>> [(r.step, round(r.metrics["loss"], 4)) for r in result.evals]
    [(2, 0.0576), (4, 0.0607), (6, 0.311)]
    >>> len(result.history), result.stopped_early
    (6, True)
    """
    epochs = _positive("epochs", epochs, int)
    steps = _positive("steps", steps, int)
    clip_norm = _positive("clip_norm", clip_norm, float)
    clip_value = _positive("clip_value", clip_value, float)
    smoothing = _smoothing(smoothing)
    if not isinstance(verbose, bool):
        raise TypeError(f"verbose must be True or False, got {verbose!r}")
    _check_callables(callback, loss_fn, optimizer)
    source = _epoch_source(batches, epochs)
    val = _Validation.of(validation, eval_fn, validate_every, loss_fn)
    hooks = _Hooks.of(callbacks, callback, checkpoint, checkpoint_every, progress, desc,
                      smoothing, val is not None)
    ranks = _Ranks(comm)
    state = optimizer.init(params) if opt_state is None else opt_state
    ranks.check_same_kind(params, state)  # before rank 0's values are broadcast into them
    shown = _DISPLAY.set(_Display() if verbose and ranks.lead else None)
    try:
        return _run(params, state, source, loss_fn, optimizer, epochs, steps, clip_norm,
                    clip_value, val, hooks, ranks, resume, _expected_steps(batches, epochs,
                                                                          steps))
    finally:
        if ranks.lead:
            hooks.close()
        _DISPLAY.reset(shown)


def _run(params, state, source, loss_fn, optimizer, epochs, steps, clip_norm, clip_value,
         val, hooks, ranks, resume, total):
    """The body of :func:`fit`, its arguments checked."""
    done, start = 0, (0, 0)  # steps taken before; (epoch, batches of it) to skip
    if resume is not None:
        params, state, done, start = _resume(resume, params, state, ranks)
        if start[0] >= epochs:
            raise ValueError(
                f"resume: the checkpoint {os.fspath(resume)!r} was written in epoch "
                f"{start[0]} (counting from 0), past this run's epochs={epochs}; pass "
                f"epochs > {start[0]} to go on training, or the checkpoint of this run"
            )
    params, state = ranks.broadcast_start(params, state)  # everyone starts from rank 0's
    if steps is not None and done >= steps:  # the checkpoint's run had finished
        return FitResult(params, [], state, False, 0.0, [], [])

    t0 = time.perf_counter()
    history, records, evals = [], [], []
    stopped, position = False, start
    # what the end of the run needs (a checkpoint's path), checked before its first step
    ranks.on_lead(done, lambda: hooks.begin(BeginInfo(done, total, _log)))

    def validate(epoch):
        """Validate ``params`` (on every rank); record and report it; whether a
        callback stopped training."""
        metrics = ranks.metrics(done, *val.run(params))
        record = EvalRecord(done, epoch, metrics, time.perf_counter() - t0)
        evals.append(record)
        if ranks.lead:
            _emit(logging.INFO, f"step {done} (epoch {epoch}): validation "
                                + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return record

    for epoch, it, used in _epochs(source, epochs, start):
        ran_out = False
        while True:
            batch, failed, value, grads = _next_step(it, params, loss_fn)
            value = ranks.loss(done + 1, batch, failed, value)
            if value is None:
                ran_out = True
                break  # every rank's batches of this epoch ran out
            used += 1
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"loss is {value} at step {done + 1} (epoch {epoch}); lower "
                    "the learning rate, clip the gradients (clip_norm=) or check the data"
                )
            grads, norm = _finite_and_clipped(params, ranks.mean(grads), clip_value,
                                              clip_norm, done + 1, epoch)
            params, state = optimizer.step(params, grads, state)
            history.append(value)
            done += 1
            position = (epoch, used)
            records.append(StepRecord(done, epoch, value, time.perf_counter() - t0))
            last = steps is not None and done >= steps
            record = validate(epoch) if val is not None and val.due(done, last) else None
            info = StepInfo(done, epoch, value, params, state, grads, norm,
                            time.perf_counter() - t0, _log, used)
            if ranks.lead:
                hooks.show_step(info)
            if hooks.step_due(done) or record is not None:

                def report(info=info, record=record, params=params, state=state):
                    stop = hooks.step(info)
                    if record is not None:
                        stop = hooks.evaluated(_eval_info(record, params, state)) or stop
                    return stop

                # on the leading rank; a true value stops every rank
                stopped = ranks.on_lead(done, report)
            if stopped or last:
                break  # (the last step: before drawing another batch from the source)
        if ran_out and val is not None and val.every is None:  # the end of an epoch
            record = validate(epoch)
            stopped = ranks.on_lead(done, lambda r=record, p=params, s=state: hooks.evaluated(
                _eval_info(r, p, s)))
        if stopped or (steps is not None and done >= steps):
            break
    end = EndInfo(done, position[0], position[1], params, state, stopped,
                  time.perf_counter() - t0, _log)
    final = None

    def finish():  # on the leading rank: the final checkpoint, a callback's parameters
        nonlocal final
        final = hooks.end(end)
        return final is not None

    swap = ranks.on_lead(done, finish) if hooks.has_end else False
    ranks.check_identical(params)
    if swap:  # every rank returns rank 0's replacement, identical everywhere
        params = final if ranks.comm is None else ranks.comm.broadcast(
            final if ranks.lead else params, root=0)
    return FitResult(params, history, state, stopped, time.perf_counter() - t0, records,
                     evals)


def _eval_info(record, params, state):
    return EvalInfo(record.step, record.epoch, record.metrics, params, state,
                    record.seconds, _log)


class _Hooks:
    """The callbacks of a run, which the leading rank calls: ``show`` (progress bars,
    which never stop training and need no agreement between the ranks) and ``rest``."""

    def __init__(self, show, rest):
        self.show, self.rest = show, rest
        self.has_end = any(_hook(cb, "on_train_end") is not None for cb in rest)
        self._steps = [cb for cb in rest if _hook(cb, "on_step_end") is not None]

    @classmethod
    def of(cls, callbacks, callback, checkpoint, checkpoint_every, progress, desc,
           smoothing, validates):
        """The run's callbacks, checked: fit's progress bar (unless ``callbacks`` hold
        one), its checkpoint, its ``callback`` and ``callbacks``, in this order."""
        if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable) \
                or _is_callback(callbacks):
            raise TypeError(f"callbacks must be a list of callbacks (xlstm.Callback), got "
                            f"{type(callbacks).__name__}" + (
                                "; put it in a list: callbacks=[...]"
                                if _is_callback(callbacks) else ""))
        given = list(callbacks)
        for cb in given:
            _hooks_of(cb)
            if getattr(cb, "requires_validation", False) and not validates:
                raise ValueError(f"{type(cb).__name__} reads the validation metrics: pass "
                                 "validation= (and eval_fn=) to fit, or leave it out")
        show = [cb for cb in given if isinstance(cb, ProgressBar)]
        if not show:
            show = [ProgressBar(enabled=None if progress is None else bool(progress),
                                desc=desc, smoothing=smoothing)]
        rest = [cb for cb in given if not isinstance(cb, ProgressBar)]
        saver = Checkpoint._of_fit(checkpoint, checkpoint_every)
        front = ([] if saver is None else [saver]) + (
            [] if callback is None else [_FunctionCallback(callback)])
        return cls(show, front + rest)

    def begin(self, info):
        for cb in self.show + self.rest:
            hook = _hook(cb, "on_train_begin")
            if hook is not None:
                hook(info)

    def show_step(self, info):
        for cb in self.show:
            cb.on_step_end(info)

    def step_due(self, step):
        """Whether a step hook has work after ``step`` (the same on every rank: a
        checkpoint's, only when one is due), so that the ranks meet only then."""
        return any(not isinstance(cb, Checkpoint) or
                   (cb.every is not None and step % cb.every == 0) for cb in self._steps)

    def step(self, info):
        return self._ask("on_step_end", info)

    def evaluated(self, info):
        for cb in self.show:
            cb.on_eval_end(info)
        return self._ask("on_eval_end", info)

    def _ask(self, name, info):
        """Every callback's answer to hook ``name``; whether any asks to stop."""
        stop = False
        for cb in self.rest:
            hook = _hook(cb, name)
            if hook is not None:
                stop = _stop_requested(hook(info), f"{type(cb).__name__}.{name}") or stop
        return stop

    def end(self, info):
        """Run every ``on_train_end``; the parameters the last one that answered handed
        back (checked to be like ``info.params``), or ``None``."""
        for cb in self.show:
            cb.on_train_end(info)
        final = None
        for cb in self.rest:
            hook = _hook(cb, "on_train_end")
            got = None if hook is None else hook(info)
            if got is not None:
                _check_like(got, info.params, f"{type(cb).__name__}.on_train_end")
                final = got
        return final

    def close(self):
        for cb in self.show:
            cb.close()


def _is_callback(obj):
    return isinstance(obj, Callback) or any(
        callable(getattr(obj, n, None)) for n in ("on_step_end", "on_eval_end"))


def _hook(cb, name):
    """``cb``'s hook ``name``, or ``None`` where it has none or :class:`Callback`'s."""
    hook = getattr(cb, name, None)
    if hook is None or getattr(type(cb), name, None) is getattr(Callback, name):
        return None
    return hook


def _check_like(got, params, name):
    """Refuse replacement parameters ``got`` unlike ``params`` in structure, shape or
    dtype."""
    from .._lib.tree import same_structure

    same_structure(params, got, "params", f"the parameters of {name}")
    theirs = flatten(got)
    for k, v in flatten(params).items():
        g = theirs[k]
        if tuple(getattr(g, "shape", ())) != tuple(v.shape) or getattr(g, "dtype",
                                                                       None) != v.dtype:
            raise ValueError(f"{name} returned params{k} of shape "
                             f"{tuple(getattr(g, 'shape', ()))} and dtype "
                             f"{getattr(g, 'dtype', type(g).__name__)}; the trained "
                             f"params{k} is {tuple(v.shape)} {v.dtype}")


# --------------------------------------------------------------------------- validation
class _Validation:
    """The validation of a run: its batches, its metrics function and when it runs."""

    def __init__(self, data, eval_fn, every):
        self.data, self.eval_fn, self.every = data, eval_fn, every

    @classmethod
    def of(cls, data, eval_fn, every, loss_fn):
        """The validation of ``fit``'s arguments, checked (``None`` without ``data``)."""
        every = _positive("validate_every", every, int)
        if data is None:
            for name, given in (("eval_fn", eval_fn), ("validate_every", every)):
                if given is not None:
                    raise ValueError(f"{name} needs validation= (the validation batches)")
            return None
        if eval_fn is not None and not callable(eval_fn):
            raise TypeError(f"eval_fn must be callable or None, got {type(eval_fn).__name__}")
        if not callable(data):
            if not isinstance(data, Iterable):
                raise TypeError("validation must be an iterable of batches or a callable "
                                f"returning one, got {type(data).__name__}")
            if iter(data) is data:
                raise ValueError(
                    "validation is a one-shot iterator (a generator, say), which cannot be "
                    "evaluated more than once; pass a list, or a callable that returns a "
                    "fresh iterable of the validation batches")
        if eval_fn is None:
            def eval_fn(params, batch):
                return {"loss": _loss_and_grads(loss_fn(params, batch))[0]}
        return cls(data, eval_fn, every)

    def due(self, step, last):
        """Whether to validate after step ``step`` (``last``: the run's last step)."""
        return last if self.every is None else step % self.every == 0

    def run(self, params):
        """``(metrics, count, failure)`` on this rank: the mean of every metric over the
        validation batches, their count, and the exception raised (or ``None``)."""
        try:
            data = self.data() if callable(self.data) else self.data
            if not isinstance(data, Iterable):
                raise TypeError(f"validation() returned {type(data).__name__}; it must "
                                "return an iterable of batches")
            values: dict[str, list[float]] = {}
            count = 0
            for count, batch in enumerate(data, 1):
                got = _metrics(self.eval_fn(params, batch), count)
                if count == 1:
                    values = {k: [] for k in got}
                elif list(got) != list(values):
                    raise ValueError(f"eval_fn gave the metrics {list(got)} for validation "
                                     f"batch {count} but {list(values)} for batch 1; it "
                                     "must give the same names for every batch")
                for k, v in got.items():
                    values[k].append(v)
            return {k: math.fsum(v) / count for k, v in values.items()}, count, None
        except Exception as exc:  # noqa: BLE001 - handed to every rank by the caller
            return None, 0, exc


def _metrics(out, index):
    """``eval_fn``'s result for validation batch ``index``, checked: ``{name: float}``."""
    if not isinstance(out, Mapping):
        out = {"loss": out}
    if not out:
        raise ValueError("eval_fn returned no metrics; return {name: value}, such as "
                         "{'loss': loss, 'accuracy': acc}")
    got = {}
    for k, v in out.items():
        if not isinstance(k, str):
            raise TypeError(f"eval_fn's metric names must be str, got {k!r}")
        if not (isinstance(v, Real) or hasattr(v, "shape")):
            raise TypeError(f"eval_fn's metric {k!r} must be a number or a one-element "
                            f"array, got {type(v).__name__}")
        if hasattr(v, "shape") and math.prod(v.shape) != 1:
            raise ValueError(f"eval_fn's metric {k!r} must be one number (a mean over the "
                             f"batch), got shape {tuple(v.shape)} for validation batch "
                             f"{index}")
        got[k] = _scalar(v)
    return got


def _scalar(value):
    """A number or a one-element array (of any shape) as a Python float."""
    if hasattr(value, "shape"):
        value = value[(0,) * len(value.shape)]
    return float(value)


# ---------------------------------------------------------------------------- one step
#: What :func:`_next_step` gives for a batch source that ran out.
_END = object()


def _next_step(it, params, loss_fn):
    """``(batch, failure, loss, grads)`` of the next step: the batch (``_END`` when the
    source ran out), the exception its drawing or ``loss_fn`` raised (or ``None``), the
    loss as a float and the gradients."""
    try:
        batch = next(it)
    except StopIteration:
        return _END, None, None, None
    except Exception as exc:  # noqa: BLE001 - handed to every rank by the caller
        return None, exc, None, None
    try:
        loss, grads = _loss_and_grads(loss_fn(params, batch))
        grads = _param_grads(params, grads)  # exactly what the optimizer steps
        return batch, None, _scalar(loss), grads  # the first host synchronisation of the step
    except Exception as exc:  # noqa: BLE001
        return batch, exc, None, None


def _loss_and_grads(out):
    """``loss_fn``'s result, checked: a pair of a scalar loss (a Python number or an array
    of one element) and the gradients (a dict, or a tree of lists, tuples and dicts)."""
    if not isinstance(out, tuple) or len(out) != 2:
        got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
        raise TypeError(f"loss_fn must return a pair (loss, grads), got {got}")
    loss, grads = out
    if isinstance(loss, bool) or not (isinstance(loss, Real) or hasattr(loss, "shape")):
        raise TypeError(f"loss_fn's loss must be a 0-d array or a Python float, got "
                        f"{type(loss).__name__}")
    if hasattr(loss, "shape") and math.prod(loss.shape) != 1:
        raise ValueError(f"loss_fn's loss must be a 0-d array (one number, a mean over the "
                         f"batch), got shape {tuple(loss.shape)}")
    if not isinstance(grads, (dict, list, tuple)):
        raise TypeError(f"loss_fn's grads must be a dict of gradients (a tree of them for a "
                        f"tree of parameters), got {type(grads).__name__}")
    return loss, grads


def _clipped(params, grads, clip_value, clip_norm):
    """``(grads, norm)``: the gradients the optimizer steps (every leaf of a tree, the
    ``"d" + key`` entry of every key of a flat ``params``) clipped elementwise by
    ``clip_value``, then jointly by ``clip_norm`` (either may be ``None``); ``norm`` is
    the global norm before the norm clipping (``None`` without it)."""
    keyed = None if is_tree(params) else params
    if clip_value is not None:
        grads = clip_by_value(grads, clip_value, params=keyed)
    norm = None
    if clip_norm is not None:
        grads, norm = clip_by_global_norm(grads, clip_norm, params=keyed)
    return grads, norm


def _finite_and_clipped(params, grads, clip_value, clip_norm, step, epoch):
    """``(grads, norm)`` as :func:`_clipped` gives them, once :func:`_check_finite` found
    every gradient finite (the second host synchronisation of the step). With norm
    clipping alone, the norm that clipping computes says whether all are finite."""
    if clip_norm is not None and clip_value is None:
        grads, norm = _clipped(params, grads, None, clip_norm)
        _check_finite(grads, float(norm), step, epoch)
        return grads, norm
    _check_finite(grads, None, step, epoch)  # one reduction over the gradients
    return _clipped(params, grads, clip_value, clip_norm)


def _check_finite(grads, norm, step, epoch):
    """Raise ``FloatingPointError`` naming the first gradient that holds inf or NaN.

    ``norm`` is the gradients' global norm as a float, where one was computed (it is not
    finite exactly when some gradient is not, or the norm exceeds the dtype); otherwise
    one reduction over all gradients is read back. Only when that says a gradient is not
    finite are the gradients looked at one by one, for the message.
    """
    from .._lib.compat import namespace

    flat = flatten(grads, "grads") if is_tree(grads) else grads
    if not flat:
        return  # nothing to step (the optimizer refuses empty parameters)
    # (the optimizer checks that all share one namespace; the first leaf's is enough here)
    xp = namespace(grads=next(iter(flat.values())))
    if norm is None:
        ok = None
        for g in flat.values():
            fine = xp.all(xp.isfinite(g))
            ok = fine if ok is None else ok & fine
        if ok is None or bool(ok):
            return
    elif math.isfinite(norm):
        return
    bad = next((k for k, g in flat.items() if not bool(xp.all(xp.isfinite(g)))), None)
    if bad is None:  # all finite: the norm itself is beyond the dtype's range
        raise FloatingPointError(
            f"gradient norm is {norm} at step {step} (epoch {epoch}): it exceeds the dtype's "
            "range; lower the learning rate or check the data")
    name = f"grads{bad}" if is_tree(grads) else f"grads[{bad!r}]"
    raise FloatingPointError(
        f"gradient {name} holds inf or NaN at step {step} (epoch {epoch}); the parameters "
        "were not updated with it. Lower the learning rate, clip the gradients (clip_norm=) "
        "or check the data")


def _param_grads(params, grads):
    """The gradients that the optimizer reads, and only those: the tree itself, or a flat
    dict's ``"d" + key`` entry for every key of ``params`` (a loss's ``dx``, ``da0`` and
    the like are left out), so that clipping and the finiteness check see exactly what the
    optimizer steps."""
    if is_tree(params) or not isinstance(grads, dict):
        return grads
    missing = [k for k in params if "d" + k not in grads]
    if missing:
        raise KeyError(f"loss_fn's grads lack 'd{missing[0]}', the gradient of "
                       f"params[{missing[0]!r}]; it must give 'd' + key for every key of params")
    return {"d" + k: grads["d" + k] for k in params}



# ----------------------------------------------------------------------- resume, ranks
class _Ranks:
    """The ranks of a run and the decisions they take together.

    Without ``comm`` there is one rank, which leads, and every method does what one
    process does alone. With ``comm`` every rank calls every method at the same point of
    the run, and each decision is taken alike on every rank by
    :class:`xlstm.distributed.Agreement`: all go on, or all raise.
    """

    def __init__(self, comm):
        self.comm, self.agree = comm, None
        if comm is not None:
            from ..distributed import Agreement, Comm

            if not isinstance(comm, Comm):
                raise TypeError("comm must be a communicator (xlstm.distributed.MPIComm, "
                                f"NCCLComm, or rank, size, allreduce_mean, broadcast, barrier), "
                                f"got {type(comm).__name__}")
            self.agree = Agreement(comm)
        self.lead = comm is None or comm.rank == 0  # the rank that reports and writes

    def on_lead(self, step, work):
        """Run ``work()`` on the leading rank; return on every rank whether it asked to
        stop (a true result). An exception it raises is collected and raised on every
        rank as :class:`xlstm.distributed.RankError` (alone, as it is)."""
        stop, failed = False, None
        if self.lead:
            try:
                stop = bool(work())
            except Exception as exc:
                if self.agree is None:
                    raise
                failed = exc
        if self.agree is not None:
            stop = self.agree.decide(step, failed=failed, stop=stop)
        return stop

    def loss(self, step, batch, failed, loss):
        """The loss of step ``step`` (with ``comm``, the mean over the ranks), or ``None``
        when the batch source ran out (on every rank); a rank's ``failed`` is raised on
        every rank (see :func:`_next_step` for the arguments)."""
        if self.agree is None:
            if failed is not None:
                raise failed
            return None if batch is _END else loss
        return self.agree.step(step, failed=failed, exhausted=batch is _END,
                               batch=None if batch is _END else batch, loss=loss)

    def mean(self, grads):
        """The gradients averaged over the ranks."""
        return grads if self.comm is None else self.comm.allreduce_mean(grads)

    def metrics(self, step, metrics, count, failed):
        """The validation metrics of step ``step`` (``metrics, count, failed``: this
        rank's mean of each over its ``count`` batches, and its exception or ``None``):
        with ``comm``, the mean over the ranks of each rank's mean, the same numbers on
        every rank. A rank's failure, ranks that evaluated different numbers of batches
        or metrics, and a validation without batches raise on every rank."""
        import zlib

        import numpy as np

        if self.agree is not None:
            self.agree.step(step, failed=failed, exhausted=False, batch=None, loss=None)
        elif failed is not None:
            raise failed
        if self.agree is not None:
            kind = zlib.crc32(repr((count, list(metrics))).encode()) % 1_000_003
            got = self.comm.allreduce_mean({"k": np.array([kind, float(kind) ** 2])})["k"]
            if got[1] - got[0] ** 2 != 0.0:
                raise ValueError(
                    f"the ranks' validations differ at step {step}: this rank "
                    f"({self.comm.rank}) evaluated {count} batches with the metrics "
                    f"{list(metrics)}; every rank must evaluate its shard of every "
                    "validation batch, with the same eval_fn")
        if count == 0:
            raise ValueError(f"the validation at step {step} had no batch: validation= "
                             "must give at least one batch (a callable, every time)")
        if self.agree is None:
            return metrics
        values = np.array(list(metrics.values()), dtype=np.float64)
        mean = self.comm.allreduce_mean({"m": values})["m"]
        return {k: float(v) for k, v in zip(metrics, mean)}

    def check_same_kind(self, params, state):
        """Refuse parameters and optimizer states that differ between the ranks in
        structure, shape or dtype."""
        if self.agree is not None:
            arrays = _split_state(state)[0]
            self.agree.check_same_kind({"params": params} if arrays is None else
                                       {"params": params, "opt_state": arrays},
                                       "parameters and optimizer state")

    def share(self, numbers):
        """Rank 0's integers ``numbers``, as a list of Python ints, on every rank."""
        import numpy as np

        got = self.comm.broadcast({"c": np.array([float(v) for v in numbers])}, root=0)["c"]
        return [int(v) for v in got]

    def broadcast_start(self, params, state):
        """Rank 0's parameters and optimizer state (arrays and counters) on every rank."""
        if self.comm is None:
            return params, state
        arrays, counts = _split_state(state)
        params = self.comm.broadcast(params, root=0)
        if arrays is not None:
            state = {**state, **self.comm.broadcast(arrays, root=0)}
        if counts:
            state = {**state, **dict(zip(counts, self.share(counts.values())))}
        return params, state

    def check_identical(self, params):
        """Refuse parameters that are not identical, bit for bit, on every rank."""
        if self.agree is not None:
            self.agree.check_identical(params)


def _resume(path, params, state, ranks):
    """The checkpoint's parameters, optimizer state, steps and position, read on the rank
    that leads; the other ranks get the counters here and the arrays by broadcast
    (:meth:`_Ranks.broadcast_start`)."""
    done, position = 0, (0, 0)

    def read():
        nonlocal params, state, done, position
        params, state, done, position = _read_checkpoint(path, params, state)

    ranks.on_lead(0, read)
    if ranks.comm is not None:
        done, epoch, batch = ranks.share([done, *position])
        position = (epoch, batch)
    return params, state, done, position


def _read_checkpoint(path, params, state):
    """``(params, state, done, position)`` from checkpoint ``path``, checked to fit
    ``params`` and ``state`` (its structure, shapes and dtypes, and its counters)."""
    from .._lib.compat import device_of, namespace
    from .._lib.tree import same_structure
    from ..io import load_checkpoint

    first = next(iter(flatten(params).values()))
    xp = namespace(params=first)
    tree, counters = load_checkpoint(path, xp=xp, device=device_of(first))
    arrays, counts = _split_state(state)
    same_structure(params, tree.get("params"), "params", "the checkpoint's params")
    theirs = flatten(tree["params"])
    for k, v in flatten(params).items():
        got = theirs[k]
        if tuple(got.shape) != tuple(v.shape) or got.dtype != v.dtype:
            raise ValueError(f"the checkpoint's params{k} is {tuple(got.shape)} "
                             f"{got.dtype}; params{k} is {tuple(v.shape)} {v.dtype}")
    params = tree["params"]
    if arrays is not None:
        same_structure(arrays, tree.get("opt_state"), "the optimizer state",
                       "the checkpoint's optimizer state")
        state = {**state, **tree["opt_state"]}
    wanted = ("step", "epoch", "batch", *("opt_state." + k for k in counts))
    lacking = [k for k in wanted if k not in counters]
    if lacking:
        raise ValueError(
            f"resume: the checkpoint {os.fspath(path)!r} has no {lacking[0]!r} counter "
            f"(it holds {sorted(counters)}); resume from a checkpoint that fit wrote "
            "(checkpoint=), with the optimizer it used")
    state = {**state, **{k: counters["opt_state." + k] for k in counts}}
    return params, state, counters["step"], (counters["epoch"], counters["batch"])
