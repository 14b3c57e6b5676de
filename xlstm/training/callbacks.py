"""Callbacks of :func:`xlstm.fit`: progress bar, checkpoints, early stopping, and the
records they read.

A callback is an object with four hooks, each optional (:class:`Callback` has them all,
doing nothing)::

    on_train_begin(info: BeginInfo) -> None
    on_step_end(info: StepInfo) -> bool | None      # a true value stops training
    on_eval_end(info: EvalInfo) -> bool | None      # likewise, after a validation
    on_train_end(info: EndInfo) -> params | None    # parameters that fit returns instead

:func:`xlstm.fit` calls them on the leading rank only (rank 0 of a data-parallel run; the
one process otherwise), in the order of its ``callbacks`` list, every hook of a step
before it looks at their answers: a stop asked for by any of them stops every rank after
that step. Three are ready-made:

* :class:`ProgressBar`: the tqdm bar with the running loss (and the last validation
  metrics) that ``fit(progress=...)`` shows;
* :class:`Checkpoint`: :func:`xlstm.io.save_checkpoint` every ``every`` steps and at the
  end, files that ``fit(resume=...)`` goes on from (``checkpoint=`` does the same);
* :class:`EarlyStopping`: stop when a validation metric stops improving, and optionally
  return the parameters of its best validation.

Messages go to the ``logging`` logger ``"xlstm.training"``, which has no handler of its
own (the package attaches a ``NullHandler`` to ``"xlstm"``): an application that configures
logging gets them there. ``fit(verbose=True)``, the default, also shows the run's records
of level INFO and above on the terminal while it runs (on the leading rank: stdout,
warnings on stderr, through the progress bar when one is shown), which is where
``info.log`` lines have always appeared.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any, NamedTuple

from .._lib.checks import positive_int
from .._lib.typing import Array, Grads, Params

__all__ = [
    "Callback",
    "ProgressBar",
    "Checkpoint",
    "EarlyStopping",
    "BeginInfo",
    "StepInfo",
    "EvalInfo",
    "EndInfo",
]

#: The logger of the training loop and its callbacks.
logger = logging.getLogger("xlstm.training")


# ------------------------------------------------------------------------------ records
class BeginInfo(NamedTuple):
    """What a callback's ``on_train_begin`` receives, before the first step.

    Attributes
    ----------
    step : int
        Optimizer steps taken before this run (those of a ``resume`` checkpoint; else 0).
    total : int or None
        The step count at which the run will end when its batches last (``steps``, or the
        batches of a sized source times ``epochs``), or ``None`` when unknown.
    log : callable
        ``log(message)``: an INFO record of the ``"xlstm.training"`` logger (shown as
        :func:`xlstm.fit`'s ``verbose`` says).
    """

    step: int
    total: int | None
    log: Callable[[str], None]


class StepInfo(NamedTuple):
    """What :func:`xlstm.fit` passes to its ``callback`` and to every callback's
    ``on_step_end`` after every step.

    Attributes
    ----------
    step : int
        Number of optimizer steps taken so far (1 after the first step; a resumed run
        counts its checkpoint's steps too).
    epoch : int
        Index of the current epoch, from 0.
    loss : float
        This step's loss, before the update (as returned by ``loss_fn``; with ``comm``,
        the mean over the ranks).
    params : dict of arrays, or a tree of them
        The parameters *after* this step's update.
    opt_state : dict
        The optimizer state after this step's update.
    grads : dict of arrays, or a tree of them
        The gradients used for the update (after clipping): those the optimizer steps.
    grad_norm : array or None
        Global L2 norm of the parameter gradients before clipping, a 0-d array, when
        ``clip_norm`` is set; otherwise ``None``. Not read back to the host.
    seconds : float
        Wall time since :func:`xlstm.fit` started.
    log : callable
        ``log(message)``: an INFO record of the ``"xlstm.training"`` logger, shown on
        stdout without breaking the progress bar while ``fit(verbose=True)`` runs.
    batch : int
        Batches of this epoch used so far, this step's included (the position that a
        checkpoint records for ``resume``).

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> def loss_fn(params, batch):  # (w - batch)^2 and its gradient
    ...     return (params["w"] - batch) ** 2, {"dw": 2.0 * (params["w"] - batch)}
    >>> seen = []
    >>> def callback(info):
    ...     seen.append((info.step, info.epoch, info.batch, info.loss, float(info.params["w"])))
    >>> _ = xlstm.fit({"w": np.array(0.0)}, [1.0, 1.0], loss_fn, xlstm.SGD(lr=0.25),
    ...               epochs=2, callback=callback, progress=False)
    >>> seen  # the loss before each step's update, the parameters after it
    [(1, 0, 1, 1.0, 0.5), (2, 0, 2, 0.25, 0.75),
     (3, 1, 1, 0.0625, 0.875), (4, 1, 2, 0.015625, 0.9375)]
    """

    step: int
    epoch: int
    loss: float
    params: Params
    opt_state: dict[str, Any]
    grads: Grads
    grad_norm: Array | None
    seconds: float
    log: Callable[[str], None]
    batch: int


class EvalInfo(NamedTuple):
    """What every callback's ``on_eval_end`` receives after a validation.

    Attributes
    ----------
    step : int
        Optimizer steps taken when the validation ran (the parameters are those after
        this step).
    epoch : int
        Index of the epoch in which it ran, from 0.
    metrics : dict of str to float
        Every metric of ``eval_fn``, the mean over the validation batches (with ``comm``,
        over the ranks too): the same numbers on every rank.
    params : dict of arrays, or a tree of them
        The parameters that were evaluated.
    opt_state : dict
        The optimizer state that goes with them.
    seconds : float
        Wall time since :func:`xlstm.fit` started, the validation included.
    log : callable
        As ``StepInfo.log``.
    """

    step: int
    epoch: int
    metrics: dict[str, float]
    params: Params
    opt_state: dict[str, Any]
    seconds: float
    log: Callable[[str], None]


class EndInfo(NamedTuple):
    """What every callback's ``on_train_end`` receives when a run ends normally.

    Attributes
    ----------
    step : int
        Optimizer steps taken in all (those of a ``resume`` checkpoint included).
    epoch : int
        Index of the epoch of the last step, from 0.
    batch : int
        Batches of that epoch used by then.
    params : dict of arrays, or a tree of them
        The parameters after the last step.
    opt_state : dict
        The optimizer state after the last step.
    stopped_early : bool
        Whether a callback stopped the run.
    seconds : float
        Wall time since :func:`xlstm.fit` started.
    log : callable
        As ``StepInfo.log``.
    """

    step: int
    epoch: int
    batch: int
    params: Params
    opt_state: dict[str, Any]
    stopped_early: bool
    seconds: float
    log: Callable[[str], None]


# ------------------------------------------------------------------------------ logging
class _Display(logging.Handler):
    """Shows the records of one run on the terminal while it runs: INFO records on stdout,
    warnings and errors on stderr, through the progress bar (``tqdm.write``) while one
    is open. It is attached to no logger: :func:`_emit` hands it the run's records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(message)s"))
        self.bar: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            if self.bar is not None:
                self.bar.write(message, file=stream)
            else:
                stream.write(message + "\n")
                stream.flush()
        except Exception:  # noqa: BLE001 - logging's rule: a broken stream never raises
            self.handleError(record)


#: The display of the run under way in this thread (or context), if it shows its records.
_DISPLAY: contextvars.ContextVar[_Display | None] = contextvars.ContextVar(
    "xlstm_training_display", default=None)


def _emit(level: int, message: str) -> None:
    """One record of the ``"xlstm.training"`` logger: to the logging configuration as
    every record goes, and to the display of the run under way, if any."""
    if logger.isEnabledFor(level):
        logger.log(level, message, stacklevel=2)
    display = _DISPLAY.get()
    if display is not None and level >= display.level:
        display.handle(logger.makeRecord(logger.name, level, __file__, 0, message, (),
                                         None))


def _log(message: object) -> None:
    """The ``log`` of the infos: an INFO record of ``str(message)``."""
    _emit(logging.INFO, str(message))


# ------------------------------------------------------------------------------ checks
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


def _stop_requested(answer, hook="callback"):
    """Whether a hook's ``answer`` asks to stop: ``None``, a bool or a number (0-d
    arrays of them included); anything else is refused."""
    if answer is None:
        return False
    if isinstance(answer, (bool, Real)) or (hasattr(answer, "shape") and answer.shape == ()):
        return bool(answer)
    raise TypeError(f"{hook} must return None or a bool (True stops training), got "
                    f"{type(answer).__name__}" + (f" of shape {tuple(answer.shape)}"
                                                  if hasattr(answer, "shape") else ""))


# --------------------------------------------------------------------------- callbacks
class Callback:
    """The base of :func:`xlstm.fit`'s callbacks: every hook, doing nothing.

    Subclass it and override the hooks you need. :func:`xlstm.fit` calls them on the
    leading rank only, in the order of its ``callbacks`` list.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> class Losses(xlstm.Callback):
    ...     def on_train_begin(self, info):
    ...         self.seen = []
    ...     def on_step_end(self, info):
    ...         self.seen.append(round(info.loss, 3))
    ...         return info.step == 2                    # stop after the second step
    >>> def loss_fn(params, batch):                    # (w - batch)^2 and its gradient
    ...     return (params["w"] - batch) ** 2, {"dw": 2.0 * (params["w"] - batch)}
    >>> losses = Losses()
    >>> result = xlstm.fit({"w": np.array(0.0)}, [1.0, 1.0, 1.0], loss_fn,
    ...                    xlstm.SGD(lr=0.25), callbacks=[losses], progress=False)
    >>> losses.seen, result.stopped_early
    ([1.0, 0.25], True)
    """

    def on_train_begin(self, info: BeginInfo) -> None:
        """Called once before the first step."""

    def on_step_end(self, info: StepInfo) -> bool | None:
        """Called after every step; a true value stops training after it."""
        return None

    def on_eval_end(self, info: EvalInfo) -> bool | None:
        """Called after every validation; a true value stops training after it."""
        return None

    def on_train_end(self, info: EndInfo) -> Params | None:
        """Called once when the run ends without an error; parameters returned here (of
        the structure, shapes and dtypes of ``info.params``) are those that
        :func:`xlstm.fit` returns."""
        return None


class _FunctionCallback(Callback):
    """``fit``'s ``callback=`` function as a callback: its ``on_step_end``."""

    def __init__(self, fn: Callable[[StepInfo], Any]) -> None:
        self.fn = fn

    def on_step_end(self, info: StepInfo) -> bool | None:
        return _stop_requested(self.fn(info))


def _want_bar(enabled):
    """Whether to show a bar: forced by True/False, else only on an interactive terminal."""
    if enabled is not None:
        return bool(enabled)
    streams = (sys.stdout, sys.stderr)
    return all(getattr(s, "isatty", None) is not None and s.isatty() for s in streams)


class ProgressBar(Callback):
    """A tqdm progress bar with the running mean of the loss and the last validation's
    metrics, on stderr.

    :func:`xlstm.fit` adds one made from its ``progress``, ``desc`` and ``smoothing``
    unless its ``callbacks`` hold one already. While the bar is open, the run's log lines
    are written through it, so that they do not break it.

    Parameters
    ----------
    enabled : bool or None, optional
        ``None`` (default) shows the bar when tqdm is installed and both stdout and stderr
        are terminals; ``True`` forces it (when tqdm is installed: otherwise a warning of
        the ``"xlstm.training"`` logger says why there is none), ``False`` turns it off.
    desc : str, optional
        The bar's label. Default ``"train"``.
    smoothing : float, optional
        Weight of the newest loss in the running average shown on the bar, in (0, 1].
        Default 0.05.

    Attributes
    ----------
    running_loss : float or None
        The running average after the last step (``None`` before the first).

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> def loss_fn(params, batch):
    ...     return (params["w"] - batch) ** 2, {"dw": 2.0 * (params["w"] - batch)}
    >>> bar = xlstm.ProgressBar(enabled=False, smoothing=0.5)   # no bar; the mean is kept
    >>> result = xlstm.fit({"w": np.array(0.0)}, [1.0, 1.0], loss_fn, xlstm.SGD(lr=0.25),
    ...                    callbacks=[bar])
    >>> bar.running_loss                               # 1.0, then 1.0 + 0.5 (0.25 - 1.0)
    0.625
    """

    def __init__(self, *, enabled: bool | None = None, desc: str = "train",
                 smoothing: float = 0.05) -> None:
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
        if not isinstance(desc, str):
            raise TypeError(f"desc must be a str, got {type(desc).__name__}")
        self.enabled, self.desc, self.smoothing = enabled, desc, _smoothing(smoothing)
        self.running_loss: float | None = None
        self._bar: Any = None
        self._display: _Display | None = None

    def on_train_begin(self, info: BeginInfo) -> None:
        self.close()
        self.running_loss = None
        if not _want_bar(self.enabled):
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            if self.enabled:  # asked for explicitly: say why it is missing, and go on
                _emit(logging.WARNING, "progress bar unavailable: tqdm is not installed")
            return
        total = None if info.total is None else max(info.total - info.step, 0)
        self._bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr,
                         dynamic_ncols=True, leave=True)
        self._display = _DISPLAY.get()
        if self._display is not None:
            self._display.bar = self._bar

    def on_step_end(self, info: StepInfo) -> None:
        r = self.running_loss
        loss = info.loss
        self.running_loss = loss if r is None else r + self.smoothing * (loss - r)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{self.running_loss:.4f}", refresh=False)
            self._bar.update(1)

    def on_eval_end(self, info: EvalInfo) -> None:
        if self._bar is not None:
            shown = {"loss": f"{self.running_loss:.4f}"} if self.running_loss is not None else {}
            shown.update({"val_" + k: f"{v:.4f}" for k, v in info.metrics.items()})
            self._bar.set_postfix(shown, refresh=True)

    def on_train_end(self, info: EndInfo) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar, if one is open (:func:`xlstm.fit` does so however it ends)."""
        if self._display is not None and self._display.bar is self._bar:
            self._display.bar = None
        self._display = None
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.close()


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


def _save_state(path, params, state, step, epoch, batch):
    """Write what ``fit(resume=path)`` reads: the parameters, the optimizer state (its
    arrays as a tree, its counters as ``"opt_state." + name``) and the position (``step``,
    ``epoch``, ``batch``), with :func:`xlstm.io.save_checkpoint` (atomically)."""
    from ..io import save_checkpoint

    arrays, counts = _split_state(state)
    tree = {"params": params} if arrays is None else {"params": params, "opt_state": arrays}
    counters = {"step": step, "epoch": epoch, "batch": batch,
                **{"opt_state." + k: v for k, v in counts.items()}}
    save_checkpoint(path, tree, counters)


class Checkpoint(Callback):
    """Write a checkpoint every ``every`` steps and at the end of the run.

    Each checkpoint holds the parameters, the optimizer state and the position in the
    batches (:func:`xlstm.io.save_checkpoint`, written atomically), which is what
    ``fit(..., resume=path)`` goes on from: with a deterministic batch source the resumed
    run ends as the uninterrupted one would. ``fit(checkpoint=path,
    checkpoint_every=every)`` adds this callback. The path is checked before the first
    step: its folder must exist and be writable, and it must not be a folder itself.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write. It may name the step and the epoch as ``str.format`` fields
        (``"ckpt/step{step:06d}.npz"``) to keep one file per checkpoint; otherwise each
        checkpoint replaces the last.
    every : int, optional
        Steps between checkpoints, counted from the start of training (a resumed run
        counts its checkpoint's steps). Default: only at the end.

    Attributes
    ----------
    written : list of str
        The paths written by the last run, in order.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import xlstm
    >>> def loss_fn(params, batch):
    ...     return (params["w"] - batch) ** 2, {"dw": 2.0 * (params["w"] - batch)}
    >>> folder = tempfile.mkdtemp()
    >>> saver = xlstm.Checkpoint(os.path.join(folder, "step{step}.npz"), every=2)
    >>> result = xlstm.fit({"w": np.zeros(1)}, [1.0] * 5, loss_fn, xlstm.SGD(lr=0.25),
    ...                    callbacks=[saver], progress=False)
    >>> [os.path.basename(p) for p in saver.written]   # every 2 steps, and the end
    ['step2.npz', 'step4.npz', 'step5.npz']
    >>> again = xlstm.fit({"w": np.zeros(1)}, [1.0] * 5, loss_fn, xlstm.SGD(lr=0.25),
    ...                   resume=saver.written[1], progress=False)   # step 5 only
    >>> again.history == result.history[4:]
    True
    """

    def __init__(self, path: str | os.PathLike[str], *, every: int | None = None) -> None:
        self._name = "Checkpoint path"
        self._setup(path, every, "every")

    @classmethod
    def _of_fit(cls, path, every):
        """The callback of ``fit``'s ``checkpoint=`` and ``checkpoint_every=`` (``None``
        without a path), its errors naming those arguments."""
        every = _positive("checkpoint_every", every, int)
        if every is not None and path is None:
            raise ValueError("checkpoint_every needs checkpoint= (where to write)")
        if path is None:
            return None
        self = cls.__new__(cls)
        self._name = "checkpoint"
        self._setup(path, every, "checkpoint_every")
        return self

    def _setup(self, path, every, every_name):
        try:
            self.path = os.fspath(path)
        except TypeError:
            raise TypeError(f"{self._name} must be a str or os.PathLike, got "
                            f"{type(path).__name__}") from None
        if not isinstance(self.path, str):
            raise TypeError(f"{self._name} must be a str or os.PathLike of a str, not bytes")
        self.every = _positive(every_name, every, int)
        self._formatted = self.path != self._path_of(0, 0)
        self.written: list[str] = []
        self._last: int | None = None

    def _path_of(self, step, epoch):
        try:
            return self.path.format(step=step, epoch=epoch)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"{self._name}={self.path!r}: its braces must be the fields {{step}} or {{epoch}} "
                f"(with an optional format, {{step:06d}}); write a literal brace twice "
                f"({{{{ or }}}}): {type(exc).__name__}: {exc}") from None

    def on_train_begin(self, info: BeginInfo) -> None:
        self.written, self._last = [], None
        _check_writable(self._path_of(info.step, 0), self._name)

    def on_step_end(self, info: StepInfo) -> None:
        if self.every is not None and info.step % self.every == 0:
            self._save(info.params, info.opt_state, info.step, info.epoch, info.batch)

    def on_train_end(self, info: EndInfo) -> None:
        if self._last != info.step:  # the last step's checkpoint, unless written already
            self._save(info.params, info.opt_state, info.step, info.epoch, info.batch)

    def _save(self, params, state, step, epoch, batch):
        path = self._path_of(step, epoch)
        _save_state(path, params, state, step, epoch, batch)
        self.written.append(path)
        self._last = step
        _emit(logging.DEBUG, f"checkpoint of step {step} written to {path}")


class EarlyStopping(Callback):
    """Stop training when a validation metric has stopped improving.

    After every validation of :func:`xlstm.fit` (``validation=``), the metric ``monitor``
    improves when it is below the best so far by more than ``min_delta`` (above, for
    ``mode="max"``); after ``patience`` validations in a row without improvement, training
    stops. A NaN never improves. Every rank of a data-parallel run sees the same metrics,
    so the decision is the same on every rank.

    Parameters
    ----------
    monitor : str, optional
        The name of the metric, a key of ``eval_fn``'s result. Default ``"loss"``.
    patience : int, optional
        Validations without improvement that are tolerated (0: stop at the first one).
        Default 0.
    min_delta : float, optional
        The least change that counts as an improvement, >= 0. Default 0.
    mode : {"auto", "min", "max"}, optional
        Whether smaller or larger is better; ``"auto"`` (default) takes ``"max"`` for a
        name that contains ``"acc"`` (accuracy) and ``"min"`` otherwise.
    restore_best : bool, optional
        When true, the run returns the parameters of the best validation instead of the
        last ones (whether it stopped early or not). They are kept by reference: fit's
        parameters are new arrays at every step, never modified. Default False.

    Attributes
    ----------
    best : float or None
        The best value of the last run (``None`` before a validation).
    best_step : int or None
        The step of that validation.
    stopped_step : int or None
        The step after which the last run stopped, or ``None`` if it did not.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> def loss_fn(params, batch):
    ...     return (params["w"] - batch) ** 2, {"dw": 2.0 * (params["w"] - batch)}
    >>> def eval_fn(params, batch):                    # how far w is from 0.5
    ...     return {"loss": float(abs(params["w"] - batch))}
    >>> stop = xlstm.EarlyStopping("loss", patience=1, restore_best=True)
    >>> result = xlstm.fit({"w": np.array(0.0)}, [1.0] * 10, loss_fn, xlstm.SGD(lr=0.25),
    ...                    validation=[0.5], eval_fn=eval_fn, validate_every=1,
    ...                    callbacks=[stop], progress=False, verbose=False)
    >>> stop.best_step, stop.stopped_step, float(result.params["w"])
    (1, 3, 0.5)
    """

    def __init__(self, monitor: str = "loss", *, patience: int = 0, min_delta: float = 0.0,
                 mode: str = "auto", restore_best: bool = False) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must be the name of a metric (a non-empty str), got "
                            f"{monitor!r}")
        self.monitor: str = monitor
        self.patience: int = positive_int("patience", patience, low=0)
        if isinstance(min_delta, bool) or not isinstance(min_delta, Real):
            raise TypeError(f"min_delta must be a number, got {min_delta!r}")
        if not (math.isfinite(float(min_delta)) and float(min_delta) >= 0.0):
            raise ValueError(f"min_delta must be finite and >= 0, got {min_delta!r}")
        self.min_delta: float = float(min_delta)
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        if mode == "auto":
            mode = "max" if "acc" in monitor.lower() else "min"
        self.mode: str = mode
        if not isinstance(restore_best, bool):
            raise TypeError(f"restore_best must be a bool, got {restore_best!r}")
        self.restore_best: bool = restore_best
        self._reset()

    #: :func:`xlstm.fit` refuses this callback without ``validation=``.
    requires_validation = True

    def _reset(self) -> None:
        self.best: float | None = None
        self.best_step: int | None = None
        self.stopped_step: int | None = None
        self._best_params: Params | None = None
        self._wait = 0

    def on_train_begin(self, info: BeginInfo) -> None:
        self._reset()

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return not math.isnan(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_eval_end(self, info: EvalInfo) -> bool:
        if self.monitor not in info.metrics:
            raise KeyError(f"EarlyStopping(monitor={self.monitor!r}): the validation gives "
                           f"the metrics {sorted(info.metrics)}; monitor one of them")
        value = info.metrics[self.monitor]
        if self._improves(value):
            self.best, self.best_step, self._wait = value, info.step, 0
            if self.restore_best:
                self._best_params = info.params
            return False
        self._wait += 1
        if self._wait > self.patience:
            self.stopped_step = info.step
            since = ("no validation gave a number" if self.best is None else
                     f"it has not improved on {self.best:.6g} (step {self.best_step})")
            _emit(logging.INFO,
                  f"early stopping after step {info.step}: validation {self.monitor}: {since} "
                  f"for {self._wait} validation{'s' if self._wait > 1 else ''}")
            return True
        return False

    def on_train_end(self, info: EndInfo) -> Params | None:
        if self._best_params is None or self.best_step == info.step:
            return None
        _emit(logging.INFO, f"restoring the parameters of step {self.best_step} (validation "
                            f"{self.monitor} {self.best:.6g})")
        return self._best_params


def _hooks_of(obj: Any) -> Mapping[str, Callable[..., Any] | None]:
    """The hooks that ``obj`` has (any of the four), checked callable."""
    names = ("on_train_begin", "on_step_end", "on_eval_end", "on_train_end")
    hooks = {n: getattr(obj, n, None) for n in names}
    if all(h is None for h in hooks.values()):
        raise TypeError(f"callbacks must hold callbacks (xlstm.Callback, or objects with "
                        f"on_step_end and the like), got {type(obj).__name__}; pass a "
                        "function of a StepInfo as callback=")
    bad = [n for n, h in hooks.items() if h is not None and not callable(h)]
    if bad:
        raise TypeError(f"{type(obj).__name__}.{bad[0]} must be callable")
    return hooks
