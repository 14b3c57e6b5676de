"""Both directions against one: label every step of variable-length sequences with the
symbol that comes next.

Each sequence is a random string of ``vocab`` symbols (one-hot inputs) of its own length,
padded to ``T``; the label of a step is the next symbol, or ``vocab`` ("end") at the last
step. A one-direction model cannot see the future: it can only guess, about ``1 / vocab``
of the time. A bidirectional model reads the next symbol from its reverse direction, which
starts at each sequence's own end (``lengths``). Both are :class:`xlstm.LSTM` models with a
linear head outside their parameters, trained by :func:`xlstm.train.fit` with
:func:`xlstm.softmax_cross_entropy` masked to each sequence's steps, and scored on a
held-out set.
"""

from __future__ import annotations

import numpy as np

from ..models.recurrent import LSTM
from ..training.fit import fit
from ..training.optim import Adam
from ._plot import training_curves
from ._run import (
    accuracy,
    check_counts,
    check_paths,
    check_sequence_memory,
    fmt_time,
    head_training,
    init_head,
    lstm_parameters,
    printer,
    setup,
    streams,
)

__all__ = ["bidirectional", "next_symbol_data"]


def next_symbol_data(m, T, vocab, rng):
    """``m`` padded sequences on the host: ``x`` (vocab, m, T) one-hot (zero past the
    end), ``labels`` (m, T) (the next symbol, ``vocab`` at the last step, 0 past the end)
    and ``lengths`` (m,), uniform in ``[T // 2, T]``."""
    lengths = rng.integers(max(1, T // 2), T + 1, size=m)
    symbols = rng.integers(0, vocab, size=(m, T))
    pos = np.arange(T)
    inside = pos < lengths[:, None]
    x = (symbols[None, :, :] == np.arange(vocab)[:, None, None]) & inside[None, :, :]
    labels = np.where(pos[None, :] < (lengths - 1)[:, None], np.roll(symbols, -1, axis=1), vocab)
    return x.astype(np.float64), np.where(inside, labels, 0), lengths


def bidirectional(
    *,
    T=16,
    vocab=4,
    hidden=16,
    batch=32,
    steps=300,
    lr=2e-2,
    clip=5.0,
    test_size=512,
    backend="numpy",
    dtype="float32",
    seed=0,
    plot="bidirectional_loss.png",
    progress=None,
    verbose=True,
):
    """Train a bidirectional LSTM and a one-direction one on the next-symbol task; compare
    their held-out accuracy.

    Parameters
    ----------
    T : int, optional
        Padded length; each sequence's length is uniform in ``[T // 2, T]``. Default 16.
    vocab : int, optional
        Symbols (at least 2). Default 4.
    hidden : int, optional
        Hidden size of each direction. Default 16.
    batch : int, optional
        Sequences per minibatch. Default 32.
    steps : int, optional
        Optimizer steps per model. Default 300.
    lr : float, optional
        Adam learning rate. Default 2e-2.
    clip : float, optional
        Global-norm clip. Default 5.
    test_size : int, optional
        Held-out sequences. Default 512.
    backend, dtype : str, optional
        ``numpy`` (default), ``torch``, ``jax``, ``cupy``, ``strict``; ``float32``
        (default) or ``float64``.
    seed : int, optional
        Seeds the parameters, the training data and the held-out set. Default 0.
    plot : str or False, optional
        PNG of both loss curves (needs matplotlib; skipped without it). Default
        ``bidirectional_loss.png``.
    progress : bool or None, optional
        Progress bars, see :func:`xlstm.train.fit`.
    verbose : bool, optional
        Print progress and the summary. Default True.

    Returns
    -------
    dict
        ``accuracy`` (held-out accuracy over every counted step, by model: ``"bidirectional"``
        and ``"one direction"``), ``guess`` (``1 / vocab``, what blind guessing scores on
        the next symbol), ``history`` (training losses by model), ``seconds`` (training
        wall time by model) and ``plot_path``.
    """
    say = printer(verbose)
    check_counts(T=(T, 2), vocab=(vocab, 2), hidden=(hidden, 1), batch=(batch, 1),
                 steps=(steps, 1), test_size=(test_size, 1))
    check_paths(outputs=(("plot", plot),))
    check_sequence_memory(
        f"a bidirectional LSTM with hidden={hidden} on {vocab} symbols", dtype,
        weights=[(lstm_parameters(0, hidden, 2), {"hidden": hidden}),
                 (lstm_parameters(vocab, hidden, 2) - lstm_parameters(0, hidden, 2)
                  + 2 * vocab * hidden, {"vocab": vocab})],
        batch=batch, test_size=test_size, length=(T, {"T": T}), inputs=(vocab, {"vocab": vocab}),
        units=24 * hidden)
    xp, device, dt = setup(backend, dtype)
    init_rng, data_rng, test_rng = streams(seed, 3)

    def on_device(x, labels, lengths):
        lengths = xp.asarray(lengths, device=device)
        mask = xp.arange(T, device=device)[None, :] < lengths[:, None]  # each sequence's steps
        return (xp.asarray(np.asarray(x, dtype=dtype), device=device),
                xp.asarray(labels, device=device), mask, lengths)

    test = on_device(*next_symbol_data(test_size, T, vocab, test_rng))
    say(f"next symbol of variable-length sequences: T={T} (lengths {max(1, T // 2)}..{T}), "
        f"{vocab} symbols, LSTM n_a={hidden} per direction, {steps} Adam steps each, on "
        f"{backend} {dtype}; blind guessing scores {1 / vocab:.2f}")
    results = {"accuracy": {}, "history": {}, "seconds": {}}
    for bi in (True, False):
        name = "bidirectional" if bi else "one direction"
        model = LSTM(vocab, hidden, bidirectional=bi, xp=xp, dtype=dt, device=device,
                     seed=init_rng)
        head = init_head(vocab + 1, model.D * hidden, init_rng, xp=xp, dtype=dt,
                         device=device)

        def batches():
            while True:
                yield on_device(*next_symbol_data(batch, T, vocab, data_rng))

        params, loss_fn = head_training(model, head, xp=xp)
        res = fit(params, batches, loss_fn, Adam(lr=lr), steps=steps, clip_norm=clip,
                  progress=progress, desc=name)
        acc = accuracy(model, res.params, test, xp=xp)
        results["accuracy"][name] = acc
        results["history"][name] = res.history
        results["seconds"][name] = res.seconds
        say(f"{name}: held-out accuracy {acc:.3f}, final training loss "
            f"{np.mean(res.history[-20:]):.3f} ({fmt_time(res.seconds)})")
    plot_path = training_curves(plot, results["history"], title=f"next symbol, T={T}, "
                                f"{vocab} symbols", ylabel="cross-entropy") if plot else None
    if plot_path:
        say(f"loss curves written to {plot_path}")
    results["guess"] = 1.0 / vocab
    results["plot_path"] = plot_path
    return results
