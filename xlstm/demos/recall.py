"""Multi-query associative recall (the xLSTM paper's synthetic memory task): read
key-value pairs, then answer queries for keys with their values.

A sequence holds ``pairs`` key-value pairs (distinct keys drawn from ``keys`` symbols,
values from ``values`` other symbols), ``k1 v1 k2 v2 ...``, then ``queries`` of those keys
in random order; the label of a query step is the value that went with its key. Only query
steps count. Blind guessing scores ``1 / values``. Each step's input is its symbol and the
one before it (one-hot, side by side), what the causal convolution of an xLSTM block gives
its cells: so that a layer without a hidden-to-hidden recurrence, the mLSTM, can write a
value under the key that came one step earlier. The models are :class:`xlstm.LSTM`,
:class:`xlstm.SLSTM` and :class:`xlstm.MLSTM` with hidden sizes chosen for about the same
number of parameters, each with a linear head, trained by :func:`xlstm.train.fit` with a
masked :func:`xlstm.softmax_cross_entropy`, and scored on a held-out set.
"""

from __future__ import annotations

import numpy as np

from ..models.recurrent import LSTM
from ..training.fit import fit
from ..training.optim import Adam
from ._plot import training_curves
from ._run import (
    accuracy,
    cell_models,
    check_counts,
    check_paths,
    check_sequence_memory,
    fmt_time,
    head_training,
    hidden_for,
    init_head,
    lstm_parameters,
    parameter_count,
    printer,
    setup,
    streams,
)

__all__ = ["recall", "recall_data"]


def recall_data(m, pairs, queries, keys, values, rng):
    """``m`` sequences on the host: ``x`` (2 (keys + values), m, T), the one-hot symbol of
    each step over that of the step before; ``labels`` (m, T) and ``mask`` (m, T), true at
    the query steps; ``T = 2 pairs + queries``."""
    T = 2 * pairs + queries
    n_sym = keys + values
    seq = np.zeros((m, T), dtype=np.int64)
    labels = np.zeros((m, T), dtype=np.int64)
    mask = np.zeros((m, T), dtype=bool)
    for r in range(m):
        k = rng.choice(keys, size=pairs, replace=False)
        v = rng.integers(0, values, size=pairs)
        seq[r, 0 : 2 * pairs : 2], seq[r, 1 : 2 * pairs : 2] = k, keys + v
        ask = rng.integers(0, pairs, size=queries)
        seq[r, 2 * pairs :] = k[ask]
        labels[r, 2 * pairs :] = v[ask]
        mask[r, 2 * pairs :] = True
    now = seq[None, :, :] == np.arange(n_sym)[:, None, None]
    before = np.zeros_like(now)
    before[:, :, 1:] = now[:, :, :-1]
    return np.concatenate([now, before]).astype(np.float64), labels, mask


def recall(
    *,
    pairs=4,
    queries=4,
    keys=8,
    values=8,
    hidden=32,
    batch=32,
    steps=1000,
    lr=5e-3,
    clip=5.0,
    test_size=512,
    backend="numpy",
    dtype="float32",
    seed=0,
    plot="recall_loss.png",
    progress=None,
    verbose=True,
):
    """Train an LSTM, an sLSTM and an mLSTM of about equal size on multi-query associative
    recall; compare their held-out accuracy.

    Parameters
    ----------
    pairs, queries : int, optional
        Key-value pairs per sequence and queries after them. Defaults 4 and 4.
    keys, values : int, optional
        Key and value symbols (``keys >= pairs``). Defaults 8 and 8.
    hidden : int, optional
        The LSTM's hidden size; the others get the largest hidden size with no more
        parameters than it. Default 32.
    batch, steps, lr, clip : optional
        Minibatch size, Adam steps per model, learning rate and global-norm clip.
    test_size : int, optional
        Held-out sequences. Default 512.
    backend, dtype, seed, plot, progress, verbose : optional
        As for :func:`xlstm.demos.bidirectional`.

    Returns
    -------
    dict
        ``accuracy`` (held-out, query steps only), ``parameters``, ``hidden``, ``history``
        and ``seconds``, by model name; ``guess`` (``1 / values``) and ``plot_path``.
    """
    say = printer(verbose)
    check_counts(pairs=(pairs, 1), queries=(queries, 1),
                 keys=(keys, pairs, "a distinct key for each of the pairs"),
                 values=(values, 2), hidden=(hidden, 2), batch=(batch, 1), steps=(steps, 1),
                 test_size=(test_size, 1))
    check_paths(outputs=(("plot", plot),))
    n_x, T = 2 * (keys + values), 2 * pairs + queries
    symbols = {"keys": keys, "values": values}
    check_sequence_memory(
        f"an LSTM with hidden={hidden} on {n_x} input features", dtype,
        weights=[(lstm_parameters(0, hidden) + values * hidden, {"hidden": hidden}),
                 (lstm_parameters(n_x, hidden) - lstm_parameters(0, hidden), symbols)],
        batch=batch, test_size=test_size, length=(T, {"pairs": pairs, "queries": queries}),
        inputs=(n_x, symbols), units=12 * hidden)
    xp, device, dt = setup(backend, dtype)
    init_rng, data_rng, test_rng = streams(seed, 3)

    def on_device(x, labels, mask):
        return (xp.asarray(np.asarray(x, dtype=dtype), device=device),
                xp.asarray(labels, device=device), xp.asarray(mask, device=device), None)

    test = on_device(*recall_data(test_size, pairs, queries, keys, values, test_rng))
    budget = parameter_count(LSTM(n_x, hidden, xp=xp, dtype=dt, device=device))
    say(f"associative recall: {pairs} pairs, {queries} queries, {keys} keys, {values} values "
        f"(T={2 * pairs + queries}); about {budget} parameters per model, {steps} Adam steps "
        f"each, on {backend} {dtype}; blind guessing scores {1 / values:.2f}")
    results = {k: {} for k in ("accuracy", "parameters", "hidden", "history", "seconds")}
    for name, cls, kwargs in cell_models().values():
        n_h = hidden if cls is LSTM else hidden_for(
            lambda n, cls=cls, kwargs=kwargs: cls(n_x, n, xp=xp, dtype=dt, device=device,
                                                  **kwargs), budget)
        model = cls(n_x, n_h, xp=xp, dtype=dt, device=device, seed=init_rng, **kwargs)
        head = init_head(values, n_h, init_rng, xp=xp, dtype=dt, device=device)

        def batches():
            while True:
                yield on_device(*recall_data(batch, pairs, queries, keys, values, data_rng))

        params, loss_fn = head_training(model, head, xp=xp)
        res = fit(params, batches, loss_fn, Adam(lr=lr), steps=steps, clip_norm=clip,
                  progress=progress, desc=name)
        acc = accuracy(model, res.params, test, xp=xp)
        results["accuracy"][name] = acc
        results["parameters"][name] = parameter_count(model)
        results["hidden"][name] = n_h
        results["history"][name] = res.history
        results["seconds"][name] = res.seconds
        say(f"{name} (n_h={n_h}, {parameter_count(model)} parameters): held-out accuracy "
            f"{acc:.3f}, final training loss {np.mean(res.history[-20:]):.3f} "
            f"({fmt_time(res.seconds)})")
    plot_path = training_curves(plot, results["history"], title=f"associative recall, "
                                f"{pairs} pairs, {queries} queries",
                                ylabel="cross-entropy") if plot else None
    if plot_path:
        say(f"loss curves written to {plot_path}")
    results["guess"] = 1.0 / values
    results["plot_path"] = plot_path
    return results
