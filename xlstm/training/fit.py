"""A minimal training loop: minibatches, an optimizer step, clipping, a loss history.

:func:`fit` is the loop that every script on top of the losses and optimizers would
otherwise write by hand::

    from xlstm import Adam, init_params, sequence_cross_entropy
    from xlstm.training.fit import fit

    def loss_fn(params, batch):
        x, labels = batch
        return sequence_cross_entropy(x, a0, params, labels)

    result = fit(params, batches, loss_fn, Adam(lr=3e-3), epochs=5, clip_norm=5.0)
    params, history = result.params, result.history

It is functional like the optimizers: ``params`` are never modified, every step makes new
arrays, so it runs unchanged on numpy, CuPy, torch, JAX and array-api-strict. It adds no
randomness of its own: with deterministic batches and a deterministic ``loss_fn`` two runs
give the same history, bit for bit, on the CPU.

Two numbers are read back to the host per step (two device synchronisations): the loss, to
record the history, show it on the progress bar, hand it to the callback and stop on a
non-finite value; and whether every gradient is finite, to stop before an update with inf
or NaN (one reduction over the gradients; with ``clip_norm`` alone, their global norm,
which clipping needs anyway).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sized
from numbers import Real
from typing import Any, NamedTuple

from .._lib.checks import positive_int
from .._lib.tree import flatten, is_tree
from .._lib.typing import Grads, Params
from .optim import clip_by_global_norm, clip_by_value

__all__ = ["fit", "FitResult", "StepInfo"]


class StepInfo(NamedTuple):
    """What :func:`fit` passes to its ``callback`` after every step.

    Attributes
    ----------
    step : int
        Number of optimizer steps taken so far (1 after the first step; a resumed run
        counts its checkpoint's steps too).
    epoch : int
        Index of the current epoch, from 0.
    loss : float
        This step's loss, before the update (as returned by ``loss_fn``).
    params : dict of arrays
        The parameters *after* this step's update.
    opt_state : dict
        The optimizer state after this step's update.
    grads : dict of arrays
        The gradients used for the update (after clipping): those the optimizer steps.
    grad_norm : array or None
        Global L2 norm of the parameter gradients before clipping, a 0-d array, when
        ``clip_norm`` is set; otherwise ``None``. Not read back to the host.
    seconds : float
        Wall time since :func:`fit` started.
    log : callable
        ``log(message)`` prints a line without breaking the progress bar (plain ``print``
        when there is no bar).
    """

    step: int
    epoch: int
    loss: float
    params: dict
    opt_state: dict
    grads: dict
    grad_norm: Any
    seconds: float
    log: Callable[[str], None]


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes
    ----------
    params : dict of arrays
        The trained parameters (new arrays; the input dict is not modified).
    history : list of float
        The loss of every step this call took, in order (with ``comm``, the mean over the
        ranks).
    opt_state : dict
        The final optimizer state; pass it back as ``fit(..., opt_state=...)`` to go on
        training where this run stopped.
    stopped_early : bool
        True when the callback asked to stop.
    seconds : float
        Wall time of the whole run.
    """

    params: dict
    history: list
    opt_state: dict
    stopped_early: bool
    seconds: float


# ----------------------------------------------------------------------------- helpers
def _positive(name, value, kind):
    """``value`` checked positive (``None`` passes): an int of any integer type for
    ``kind=int``, else any finite real number, returned as a Python int or float."""
    if value is None:
        return None
    if kind is int:
        return positive_int(name, value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return value


def _smoothing(value):
    """``smoothing`` checked to be a number in (0, 1], as a Python float."""
    if value is None:
        raise TypeError("smoothing must be a number in (0, 1], got None")
    value = _positive("smoothing", value, float)
    if value > 1.0:
        raise ValueError(f"smoothing must be in (0, 1], got {value!r}")
    return value


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


def _want_bar(progress, file):
    """Whether to show a bar: forced by True/False, else only on an interactive terminal."""
    if progress is not None:
        return bool(progress)
    streams = (sys.stdout, file)
    return all(getattr(s, "isatty", None) is not None and s.isatty() for s in streams)


def _make_bar(progress, total, desc, file):
    """A tqdm bar, or None when there should be none or tqdm is not installed."""
    if not _want_bar(progress, file):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress:  # asked for explicitly: say why it is missing, once, and go on
            print("progress bar unavailable: tqdm is not installed", file=file)
        return None
    return tqdm(total=total, desc=desc, unit="step", file=file, dynamic_ncols=True, leave=True)


class _Progress:
    """The progress callback: the running mean of the loss on a tqdm bar (on the leading
    rank only), and ``log``, which prints a line without breaking the bar."""

    def __init__(self, progress, total, desc, smoothing, lead):
        self.bar = _make_bar(progress if lead else False, total, desc, sys.stderr)
        self.smoothing, self.running = smoothing, None
        if self.bar is not None:
            self.log = self._write
        else:
            self.log = print if lead else _quiet

    def _write(self, message):
        self.bar.write(str(message), file=sys.stdout)

    def update(self, loss):
        """Count one step of loss ``loss``."""
        r = self.running
        self.running = loss if r is None else r + self.smoothing * (loss - r)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.running:.4f}", refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _quiet(message):
    """The ``log`` of a rank that does not report."""


# --------------------------------------------------------------------------------- fit
def fit(
    params: Params,
    batches: Iterable | Callable[[], Iterable],
    loss_fn: Callable[[Params, Any], tuple[Any, Grads]],
    optimizer: Any,
    *,
    epochs: int = 1,
    steps: int | None = None,
    clip_norm: float | None = None,
    clip_value: float | None = None,
    opt_state: dict | None = None,
    callback: Callable[[StepInfo], Any] | None = None,
    progress: bool | None = None,
    desc: str = "train",
    smoothing: float = 0.05,
    comm: Any = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: str | os.PathLike | None = None,
) -> FitResult:
    """Train ``params`` on minibatches: loss and gradients, clipping, optimizer step.

    For every batch: ``loss, grads = loss_fn(params, batch)``; check that the loss and
    every gradient are finite; clip the gradients by value and/or by global norm;
    ``params, state = optimizer.step(params, grads, state)``; record ``float(loss)``; call
    ``callback``. The gradients checked and clipped are exactly those the optimizer
    steps: the ``"d" + key`` entry of every key of a flat ``params`` dict (whatever the
    key), or every leaf of a tree.

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
        clipping.
        Default: none.
    opt_state : dict, optional
        Optimizer state to resume from (``FitResult.opt_state`` of an earlier run).
        Default: ``optimizer.init(params)``.
    callback : callable, optional
        ``callback(info)`` after every step, with a :class:`StepInfo`. It returns ``None``
        or a bool (a number or a 0-d array counts as its truth): a true value stops
        training after this step (early stopping).
    progress : bool or None, optional
        ``None`` (default) shows a tqdm progress bar with the running loss when tqdm is
        installed and both stdout and stderr are terminals; ``True`` forces it (when tqdm
        is installed), ``False`` turns it off.
    desc : str, optional
        Label of the progress bar.
    smoothing : float, optional
        Weight of the newest loss in the running average shown on the bar, in (0, 1].
        Default 0.05.
    comm : communicator, optional
        Data-parallel training (:mod:`xlstm.distributed`): every rank runs this same call
        with ``batches`` yielding its shard of every global batch (equal shards). The
        starting parameters and optimizer state are rank 0's (broadcast); before every
        step the gradients and the loss are averaged over the ranks, so the parameters
        stay identical on every rank, which is checked at the end. Rank 0 alone shows
        progress, runs ``callback`` (whose return value stops every rank) and writes
        checkpoints. When a rank fails (an exception from its batches or ``loss_fn``, or
        rank 0's callback or checkpoint), every rank raises
        :class:`xlstm.distributed.RankError` with that rank's error; batches of different
        shapes on different ranks, or sources that run out at different steps, raise
        ``ValueError`` on every rank.
    checkpoint : str or os.PathLike, optional
        Where to write a checkpoint (:func:`xlstm.io.save_checkpoint`, atomically): the
        parameters, the optimizer state and the position in the batches, every
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
        ``(params, history, opt_state, stopped_early, seconds)``: the trained parameters,
        the per-step losses as Python floats, the final optimizer state, whether the
        callback stopped the run and its wall time.

    Raises
    ------
    FloatingPointError
        At the first step whose loss is NaN or infinite, or one of whose gradients holds
        inf or NaN (the message names it and the step; the update is not made), or whose
        gradients' global norm exceeds their dtype's range. The parameters of the steps
        before are lost with the exception: checkpoint, lower the learning rate or clip.
    TypeError, ValueError
        For an invalid argument (the message names it), before the first step: among
        them a ``checkpoint`` path that cannot be written, a ``resume`` checkpoint that
        lacks a counter or was written in an epoch past ``epochs``. During the run: a
        ``loss_fn`` that does not return a pair of a one-number loss and the gradients
        (or lacks the gradient of a parameter: ``KeyError``), a ``callback`` that returns
        anything but ``None``, a bool or a number.

    Notes
    -----
    Each step reads two numbers back to the host (the loss, and whether the gradients are
    finite); clipping and the update stay on the device. Running the loop on the CPU with
    the same batches and parameters gives an identical history.
    """
    epochs = _positive("epochs", epochs, int)
    steps = _positive("steps", steps, int)
    clip_norm = _positive("clip_norm", clip_norm, float)
    clip_value = _positive("clip_value", clip_value, float)
    smoothing = _smoothing(smoothing)
    _check_callables(callback, loss_fn, optimizer)
    source = _epoch_source(batches, epochs)
    saver = _Checkpoint.of(checkpoint, checkpoint_every)
    ranks = _Ranks(comm)
    if saver is not None:  # what the end of the run needs, checked before its start
        ranks.on_lead(0, saver.check)
    state = optimizer.init(params) if opt_state is None else opt_state
    ranks.check_same_kind(params, state)  # before rank 0's values are broadcast into them
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
        return FitResult(params, [], state, False, 0.0)

    total = _expected_steps(batches, epochs, steps)
    shown = _Progress(progress, None if total is None else total - done, desc, smoothing,
                      ranks.lead)
    history, stopped, position = [], False, start
    t0 = time.perf_counter()
    try:
        for epoch, it, used in _epochs(source, epochs, start):
            while True:
                batch, failed, value, grads = _next_step(it, params, loss_fn)
                value = ranks.loss(done + 1, batch, failed, value)
                if value is None:
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
                shown.update(value)
                last = steps is not None and done >= steps
                due = saver is not None and saver.due(done, last)
                if callback is not None or due:

                    def report():  # on the leading rank: a true value stops every rank
                        if due:
                            saver.save(params, state, done, position)
                        if callback is None:
                            return False
                        info = StepInfo(done, epoch, value, params, state, grads, norm,
                                        time.perf_counter() - t0, shown.log)
                        return _stop_requested(callback(info))

                    stopped = ranks.on_lead(done, report)
                if stopped or last:
                    break  # (the last step: before drawing another batch from the source)
            if stopped or (steps is not None and done >= steps):
                break
        if saver is not None:
            ranks.on_lead(done, lambda: saver.save(params, state, done, position))
        ranks.check_identical(params)
    finally:
        shown.close()
    return FitResult(params, history, state, stopped, time.perf_counter() - t0)


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
        return batch, None, float(loss), grads  # the first host synchronisation of the step
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


def _stop_requested(answer):
    """Whether the callback's ``answer`` asks to stop: ``None``, a bool or a number (0-d
    arrays of them included); anything else is refused."""
    if answer is None:
        return False
    if isinstance(answer, (bool, Real)) or (hasattr(answer, "shape") and answer.shape == ()):
        return bool(answer)
    raise TypeError(f"callback must return None or a bool (True stops training), got "
                    f"{type(answer).__name__}" + (f" of shape {tuple(answer.shape)}"
                                                  if hasattr(answer, "shape") else ""))


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


def _check_writable(path, name):
    """Refuse a ``path`` that cannot be written at the end of a run: its folder missing or
    not a folder, the path a folder itself, or nothing creatable there (a file is made and
    removed)."""
    import tempfile

    try:
        where = os.fspath(path)
    except TypeError:
        raise TypeError(f"{name} must be a path (str or os.PathLike), got "
                        f"{type(path).__name__}") from None
    folder = os.path.dirname(os.path.abspath(where))
    if os.path.isdir(where):
        raise ValueError(f"{name}={where!r} is a directory; give the path of a file in it, "
                         f"such as {os.path.join(where, 'checkpoint.npz')!r}")
    if not os.path.isdir(folder):
        raise ValueError(f"{name}={where!r}: the folder {folder!r} does not exist; create it "
                         "first (os.makedirs) or choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".xlstm-", suffix=".probe", dir=folder)
    except OSError as exc:
        raise ValueError(f"{name}={where!r}: nothing can be written in {folder!r} "
                         f"({exc.strerror or exc}); choose another path") from None
    os.close(fd)
    os.unlink(probe)


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


def _split_state(state):
    """An optimizer state as its arrays (a tree, or ``None``) and its integer counters;
    an empty buffer dict (SGD without momentum) is neither, and stays as it is."""
    arrays, counts = {}, {}
    for k, v in state.items():
        if isinstance(v, (dict, list, tuple)):
            if v:
                arrays[k] = v
        elif getattr(v, "ndim", 0):
            arrays[k] = v
        else:
            counts[k] = v
    return (arrays or None), counts


# ----------------------------------------------------------- checkpoints, resume, ranks
class _Checkpoint:
    """The checkpoint callback: the leading rank writes the parameters, the optimizer state
    and the position in the batches (:func:`xlstm.io.save_checkpoint`, atomically) to
    ``path`` every ``every`` steps and at the end of the run."""

    def __init__(self, path, every):
        self.path, self.every = path, every

    @classmethod
    def of(cls, path, every):
        """The callback for ``fit``'s ``checkpoint=`` and ``checkpoint_every=``, checked
        (``None`` without a path)."""
        every = _positive("checkpoint_every", every, int)
        if every is not None and path is None:
            raise ValueError("checkpoint_every needs checkpoint= (where to write)")
        return None if path is None else cls(path, every)

    def check(self):
        """Refuse, before the first step, a path that the end of the run cannot write."""
        _check_writable(self.path, "checkpoint")

    def due(self, done, last):
        """Whether to write after step ``done``: every ``every`` steps, but not after the
        last, which the end of the run writes."""
        return self.every is not None and done % self.every == 0 and not last

    def save(self, params, state, done, position):
        from ..io import save_checkpoint

        arrays, counts = _split_state(state)
        tree = {"params": params} if arrays is None else {"params": params, "opt_state": arrays}
        counters = {"step": done, "epoch": position[0], "batch": position[1],
                    **{"opt_state." + k: v for k, v in counts.items()}}
        save_checkpoint(self.path, tree, counters)


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
