"""The adding problem: experiment 4 of Hochreiter and Schmidhuber (1997).

Read a sequence of (value, marker) pairs and output the sum of the two marked values, with
:func:`xlstm.last_step_mse`. Always answering 1.0 scores a mean squared error of 1/6; the
problem counts as solved below 0.01.
"""

from __future__ import annotations

import numpy as np

from ..notebook.losses import last_step_mse, last_step_predict
from ..notebook.params import init_params
from ..training.fit import fit
from ..training.optim import Adam
from ._plot import curve_path
from ._run import (
    check_counts,
    check_paths,
    check_sequence_memory,
    finish_run,
    fmt_time,
    lstm_parameters,
    printer,
    setup,
    streams,
    zeros,
)

__all__ = ["adding", "adding_data"]


def adding_data(m, T, rng):
    """``m`` sequences of the adding problem on the host: ``x`` (2, m, T), ``y`` (1, m).

    Row 0 of ``x`` holds values drawn uniformly from [0, 1); row 1 holds the markers: one
    position in the first half and one in the second half of each sequence are 1, all
    others 0. The target is the sum of the two marked values.
    """
    if T < 2:
        raise ValueError(f"T must be at least 2 (two marked positions), got {T}")
    values = rng.random((m, T))
    half = T // 2
    first = rng.integers(0, half, size=m)
    second = rng.integers(half, T, size=m)
    pos = np.arange(T)
    markers = (pos == first[:, None]) | (pos == second[:, None])
    x = np.stack([values, markers.astype(np.float64)])
    y = np.sum(values * markers, axis=1)[None, :]
    return x, y


def adding(
    *,
    T=50,
    backend="numpy",
    dtype="float32",
    seed=0,
    steps=5000,
    hidden=32,
    batch=64,
    lr=1e-2,
    clip=1.0,
    eval_every=100,
    test_size=1000,
    target=0.01,
    out="adding_params.npz",
    plot=None,
    progress=None,
    verbose=True,
):
    """Train an LSTM on the adding problem until the test error is below ``target``.

    Every step draws a fresh minibatch; a fixed test set is scored every ``eval_every``
    steps with :func:`xlstm.last_step_predict`, and training stops as soon as its mean
    squared error is below ``target``.

    Parameters
    ----------
    T : int, optional
        Sequence length. Default 50.
    backend : str, optional
        ``numpy`` (default), ``torch``, ``jax``, ``cupy``, ``strict``.
    dtype : {"float32", "float64"}, optional
        Default ``float32``.
    seed : int, optional
        Seeds the parameters, the training data and the test set. Default 0.
    steps : int, optional
        Most optimizer steps. Default 5000.
    hidden : int, optional
        Hidden size. Default 32.
    batch : int, optional
        Sequences per minibatch. Default 64.
    lr : float, optional
        Adam learning rate. Default 1e-2.
    clip : float, optional
        Clip the gradients to this global norm. Default 1.
    eval_every : int, optional
        Score the test set every this many steps. Default 100.
    test_size : int, optional
        Sequences in the test set. Default 1000.
    target : float, optional
        Stop once the test MSE is below this. Default 0.01, the usual "solved" mark.
    out : str or os.PathLike, optional
        Where to save the trained parameters. Default ``adding_params.npz``.
    plot : str, bool or None, optional
        PNG of the loss curve: a path, ``None`` (default) for ``<out>_loss.png``, False
        for none. Needs matplotlib; skipped without it.
    progress : bool or None, optional
        Progress bar, see :func:`xlstm.train.fit`.
    verbose : bool, optional
        Print progress and the summary. Default True.

    Returns
    -------
    dict
        ``initial_loss`` and ``final_loss`` (test MSE before and after), ``baseline``
        (test MSE of always answering 1.0, about 1/6), ``solved`` (final test MSE below
        ``target``), ``train_loss_first`` and ``train_loss_last`` (mean of the first and
        last 20 steps' training MSE), ``history``, ``evals`` (``(step, test MSE)``
        pairs), ``steps``, ``seconds`` (training wall time), ``params_path`` and
        ``plot_path``.
    """
    say = printer(verbose)
    check_counts(T=(T, 2), steps=(steps, 1), hidden=(hidden, 1), batch=(batch, 1),
                 eval_every=(eval_every, 1), test_size=(test_size, 1))
    check_paths(outputs=(("out", out), ("plot", curve_path(out, plot))))
    check_sequence_memory(f"an LSTM with hidden={hidden}", dtype,
                          weights=[(lstm_parameters(2, hidden) + hidden, {"hidden": hidden})],
                          batch=batch, test_size=test_size, length=(T, {"T": T}),
                          inputs=(2, {}), units=12 * hidden)
    xp, device, dt = setup(backend, dtype)
    init_rng, data_rng, test_rng = streams(seed, 3)
    params = init_params(2, hidden, 1, xp=xp, dtype=dt, device=device, seed=init_rng)

    def on_device(arr):
        return xp.asarray(np.asarray(arr, dtype=dtype), device=device)

    x_test, y_test = adding_data(test_size, T, test_rng)
    baseline = float(np.mean((y_test - 1.0) ** 2))
    x_test, y_test = on_device(x_test), on_device(y_test)
    a0 = zeros(xp, (hidden, batch), dt, device)
    a0_test = zeros(xp, (hidden, test_size), dt, device)

    def test_mse(p):
        err = last_step_predict(x_test, a0_test, p) - y_test
        return float(xp.mean(err * err))

    def batches():
        while True:
            x, y = adding_data(batch, T, data_rng)
            yield on_device(x), on_device(y)

    def loss_fn(p, b):
        return last_step_mse(b[0], a0, p, b[1])

    initial = test_mse(params)
    evals = [(0, initial)]
    say(f"adding problem: T={T}, LSTM n_a={hidden}, batch {batch}, Adam lr={lr:g}, clip "
        f"{clip:g}, at most {steps} steps on {backend} {dtype}")
    say(f"test MSE before training: {initial:.4f}; always answering 1.0 scores {baseline:.4f};"
        f" solved below {target:g}")
    since = []

    def callback(info):
        since.append(info.loss)
        if info.step % eval_every and info.step != steps:
            return False
        mse = test_mse(info.params)
        evals.append((info.step, mse))
        log = info.log if verbose else say
        log(f"step {info.step:5d}: train MSE {np.mean(since):.4f}, test MSE {mse:.4f} "
            f"({fmt_time(info.seconds)})")
        since.clear()
        return mse < target

    res = fit(params, batches, loss_fn, Adam(lr=lr), steps=steps, clip_norm=clip,
              callback=callback, progress=progress, desc="adding")
    if evals[-1][0] != len(res.history):
        evals.append((len(res.history), test_mse(res.params)))
    result = finish_run(res, evals, out=out, plot=plot, baseline=baseline, mean_of=20,
                        title=f"adding problem: T={T}, n_a={hidden}",
                        ylabel="mean squared error", eval_label="test", logy=True)
    final, plot_path = result["final_loss"], result["plot_path"]
    result["solved"] = solved = final < target
    say(f"test MSE: {initial:.4f} -> {final:.4f} after {len(res.history)} steps "
        f"(baseline {baseline:.4f}); {'solved' if solved else 'NOT solved'} "
        f"(target {target:g}); training took {fmt_time(res.seconds)}")
    say(f"saved parameters to {out}" + (f", loss curve to {plot_path}" if plot_path else ""))
    return result
