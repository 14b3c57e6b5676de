"""A minimal training loop: minibatches, an optimizer step, clipping, a loss history.

:func:`fit` is the loop that every script on top of the losses and optimizers would
otherwise write by hand::

    from xlstm import Adam, init_params, sequence_cross_entropy
    from xlstm.train import fit

    def loss_fn(params, batch):
        x, labels = batch
        return sequence_cross_entropy(x, a0, params, labels)

    result = fit(params, batches, loss_fn, Adam(lr=3e-3), epochs=5, clip_norm=5.0)
    params, history = result.params, result.history

It is functional like the optimizers: ``params`` are never modified, every step makes new
arrays, so it runs unchanged on numpy, CuPy, torch, JAX and array-api-strict. It adds no
randomness of its own: with deterministic batches and a deterministic ``loss_fn`` two runs
give the same history, bit for bit, on the CPU.

The loss is read back to the host once per step (one device synchronisation per step), to
record the history, show it on the progress bar, hand it to the callback and stop on a
non-finite value; with ``clip_norm`` the gradients' global norm is read back too, to stop on
non-finite gradients.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sized
from numbers import Real
from typing import Any, NamedTuple

from ._checks import positive_int
from .optim import clip_by_global_norm, clip_by_value
from ._typing import Grads, Params

__all__ = ["fit", "FitResult", "StepInfo"]


class StepInfo(NamedTuple):
    """What :func:`fit` passes to its ``callback`` after every step.

    Attributes
    ----------
    step : int
        Number of optimizer steps taken so far (1 after the first step).
    epoch : int
        Index of the current epoch, from 0.
    loss : float
        This step's loss, before the update (as returned by ``loss_fn``).
    params : dict of arrays
        The parameters *after* this step's update.
    opt_state : dict
        The optimizer state after this step's update.
    grads : dict of arrays
        The gradients used for the update (after clipping).
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
        The loss of every step, in order (``len(history)`` is the number of steps taken).
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


def _epoch_source(batches, epochs):
    """A function ``epoch -> iterable of batches`` for the three accepted forms."""
    if callable(batches):
        return lambda _epoch: batches()
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
) -> FitResult:
    """Train ``params`` on minibatches: loss and gradients, clipping, optimizer step.

    For every batch: ``loss, grads = loss_fn(params, batch)``; clip the parameter
    gradients by value and/or by global norm; ``params, state = optimizer.step(params,
    grads, state)``; record ``float(loss)``; call ``callback``.

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
        Rescale the parameter gradients jointly so that their global L2 norm is at most
        this (:func:`xlstm.clip_by_global_norm`). Default: no norm clipping.
    clip_value : float, optional
        Clip every parameter gradient elementwise to ``[-clip_value, clip_value]``
        (:func:`xlstm.clip_by_value`), before any norm clipping. Default: none.
    opt_state : dict, optional
        Optimizer state to resume from (``FitResult.opt_state`` of an earlier run).
        Default: ``optimizer.init(params)``.
    callback : callable, optional
        ``callback(info)`` after every step, with a :class:`StepInfo`. A truthy return
        value stops training after this step (early stopping).
    progress : bool or None, optional
        ``None`` (default) shows a tqdm progress bar with the running loss when tqdm is
        installed and both stdout and stderr are terminals; ``True`` forces it (when tqdm
        is installed), ``False`` turns it off.
    desc : str, optional
        Label of the progress bar.
    smoothing : float, optional
        Weight of the newest loss in the running average shown on the bar, in (0, 1].

    Returns
    -------
    FitResult
        ``(params, history, opt_state, stopped_early, seconds)``: the trained parameters,
        the per-step losses as Python floats, the final optimizer state, whether the
        callback stopped the run and its wall time.

    Raises
    ------
    FloatingPointError
        If a loss is NaN or infinite, or (with ``clip_norm``) the gradients' global norm
        is, which happens when a gradient holds inf or NaN; the message gives the step.
        The parameters of the steps before are lost with the exception, so lower the
        learning rate or clip.
    TypeError, ValueError
        For an invalid argument; the message names it.

    Notes
    -----
    Each step reads one number back to the host (the loss); clipping and the update stay
    on the device. Running the loop on the CPU with the same batches and parameters gives
    an identical history.
    """
    epochs = _positive("epochs", epochs, int)
    steps = _positive("steps", steps, int)
    clip_norm = _positive("clip_norm", clip_norm, float)
    clip_value = _positive("clip_value", clip_value, float)
    if not 0.0 < smoothing <= 1.0:
        raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    for method in ("init", "step"):
        if not callable(getattr(optimizer, method, None)):
            raise TypeError(
                f"optimizer must have init() and step() methods (xlstm.SGD, xlstm.Adam); "
                f"{type(optimizer).__name__} has no {method}()"
            )
    source = _epoch_source(batches, epochs)
    state = optimizer.init(params) if opt_state is None else opt_state

    file = sys.stderr
    bar = _make_bar(progress, _expected_steps(batches, epochs, steps), desc, file)
    if bar is None:
        log = print
    else:
        def log(message):
            bar.write(str(message), file=sys.stdout)

    history = []
    running = None
    stopped = False
    t0 = time.perf_counter()
    try:
        for epoch in range(epochs):
            for batch in source(epoch):
                loss, grads = loss_fn(params, batch)
                value = float(loss)  # the one host synchronisation of the step
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"loss is {value} at step {len(history) + 1} (epoch {epoch}); lower "
                        "the learning rate, clip the gradients (clip_norm=) or check the data"
                    )
                if clip_value is not None:
                    grads = clip_by_value(grads, clip_value)
                norm = None
                if clip_norm is not None:
                    grads, norm = clip_by_global_norm(grads, clip_norm)
                    size = float(norm)  # the step's second host synchronisation
                    if not math.isfinite(size):
                        raise FloatingPointError(
                            f"gradient norm is {size} at step {len(history) + 1} (epoch "
                            f"{epoch}): a gradient holds inf or NaN (or its norm exceeds "
                            "the dtype's range); lower the learning rate or check the data"
                        )
                params, state = optimizer.step(params, grads, state)
                history.append(value)
                running = value if running is None else running + smoothing * (value - running)
                if bar is not None:
                    bar.set_postfix(loss=f"{running:.4f}", refresh=False)
                    bar.update(1)
                if callback is not None:
                    info = StepInfo(
                        len(history), epoch, value, params, state, grads, norm,
                        time.perf_counter() - t0, log,
                    )  # fmt: skip
                    if callback(info):
                        stopped = True
                        break
                if steps is not None and len(history) >= steps:
                    break  # before drawing another batch from an endless source
            if stopped or (steps is not None and len(history) >= steps):
                break
    finally:
        if bar is not None:
            bar.close()
    return FitResult(params, history, state, stopped, time.perf_counter() - t0)
