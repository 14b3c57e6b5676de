"""Two training demos: a character-level language model and the adding problem.

Run them from the command line::

    python -m xlstm demo charlm [--text FILE] [--steps N] [--backend torch] ...
    python -m xlstm demo adding [--T 50] [--hidden 32] ...

or from Python with :func:`charlm` and :func:`adding`, which take the same options as
keyword arguments and return a dict of results (losses, wall time, paths written).

* ``charlm`` learns to predict the next character of a text (by default the English
  documentation strings of ``pydoc_data.topics``, which ship with CPython) with
  :func:`xlstm.sequence_cross_entropy`, Adam and gradient clipping, and prints text it
  samples one character at a time as it learns. The vocabulary is ``sorted(set(text))``,
  so it can be rebuilt from the same text to use the saved parameters later.
* ``adding`` is experiment 4 of Hochreiter and Schmidhuber (1997): read a sequence of
  (value, marker) pairs and output the sum of the two marked values, with
  :func:`xlstm.last_step_mse`. Always answering 1.0 scores a mean squared error of 1/6;
  the problem counts as solved below 0.01.

Everything random is drawn on the host from ``numpy.random.default_rng`` streams derived
from ``seed`` and then moved to the chosen backend, so a run on the CPU is reproducible.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._compat import BACKENDS, BackendUnavailable, device_of, load_backend, namespace, to_host
from .io import save_params
from .losses import last_step_mse, last_step_predict, sequence_cross_entropy
from .lstm import lstm_forward
from .optim import Adam
from .params import init_params
from .train import fit

__all__ = [
    "charlm", "adding", "charlm_main", "adding_main", "main", "load_corpus", "sample",
    "adding_data",
]


# ----------------------------------------------------------------------------- shared
def _setup(backend, dtype):
    xp, device = load_backend(backend)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return xp, device, getattr(xp, dtype)


def _printer(verbose):
    return print if verbose else (lambda *args, **kwargs: None)


def _check_counts(**counts):
    """Raise ValueError unless every count is an int >= its minimum (given as ``(v, lo)``)."""
    for name, (value, low) in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _held_out_size(n_chars, n_distinct, seq_len):
    """Characters of the text held out for evaluation; ValueError if the text cannot serve."""
    if n_distinct < 2:
        raise ValueError("the text needs at least two distinct characters")
    n_val = max(n_chars // 10, seq_len + 1)
    if n_chars - n_val < seq_len + 1:
        raise ValueError(
            f"the text has {n_chars} characters; seq_len={seq_len} needs at least "
            f"{2 * (seq_len + 1)} (a training part and a held-out part)"
        )
    return n_val


def _streams(seed, n):
    """``n`` independent host generators derived from one seed."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _zeros(xp, shape, dtype, device):
    return xp.zeros(shape, dtype=dtype, device=device)


def _plot(path, history, evals, *, title, ylabel, eval_label, baseline=None, logy=False):
    """Write a PNG of the per-step loss and the evaluation points; None without matplotlib."""
    try:
        # The object API: no pyplot, so no global backend to choose or to disturb.
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    steps = np.arange(1, len(history) + 1)
    ax.plot(steps, history, lw=0.6, alpha=0.5, color="tab:blue", label="train (per step)")
    if len(history) >= 20:
        k = max(len(history) // 50, 5)
        smooth = np.convolve(history, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, color="tab:blue", label=f"train ({k}-step mean)")
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", ms=3, label=eval_label)
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", lw=1, label=f"baseline {baseline:.3g}")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return os.fspath(path)


def _plot_path(out, plot):
    """Where the loss curve goes: ``plot`` if given, else next to ``out``; None: no plot."""
    if plot is False:
        return None
    if plot not in (None, True):
        return os.fspath(plot)
    root, _ = os.path.splitext(os.fspath(out))
    return root + "_loss.png"


def _fmt_time(seconds):
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ------------------------------------------------------------------------ char-level LM
def load_corpus(path=None):
    """The training text: the file at ``path`` (UTF-8), or CPython's ``pydoc_data.topics``.

    ``pydoc_data.topics.topics`` is a dict of the reference documentation shown by
    ``help()`` (about 0.5 million characters of English with code); its values are joined
    in key order.
    """
    if path is not None:
        with open(path, encoding="utf-8") as f:
            return f.read()
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _encode(text):
    """``(ids, vocab)``: the text as int64 indices into ``vocab = sorted(set(text))``."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    uniq, ids = np.unique(codes, return_inverse=True)
    return ids.astype(np.int64).reshape(-1), [chr(c) for c in uniq]


def _one_hot(ids, n, dtype, *, xp):
    """``(n, *ids.shape)`` one-hot array of integer ``ids`` built on their device."""
    classes = xp.arange(n, dtype=ids.dtype, device=device_of(ids))
    return xp.astype(ids[None, ...] == xp.reshape(classes, (n, *(1,) * ids.ndim)), dtype)


def sample(params, vocab, length, *, prime="\n", temperature=1.0, rng=None):
    """Generate ``length`` characters, one at a time, from a trained character model.

    The ``prime`` text is run through :func:`xlstm.lstm_forward` in one call; then each
    new character is drawn from the softmax output raised to ``1 / temperature``, fed back
    as a one-hot input of one step, with the hidden and cell states carried over
    (``a0``/``c0``).

    Parameters
    ----------
    params : dict of arrays
        Parameters with ``n_x = n_y = len(vocab)``, in any namespace.
    vocab : sequence of str
        The characters, in the model's index order.
    length : int
        Number of characters to generate.
    prime : str, optional
        Text to start from; every character must be in ``vocab``. Default a newline (or the
        first character of ``vocab`` when there is none).
    temperature : float, optional
        Below 1 sharpens the distribution (safer text), above 1 flattens it. Default 1.
    rng : numpy.random.Generator, optional
        Source of the draws; default a fresh unseeded generator.

    Returns
    -------
    str
        The generated characters (without the prime).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    index = {ch: i for i, ch in enumerate(vocab)}
    if not prime or (prime == "\n" and "\n" not in index):
        prime = vocab[0]
    missing = sorted(set(prime) - set(index))
    if missing:
        raise ValueError(f"prime has characters outside the vocabulary: {missing!r}")
    rng = np.random.default_rng() if rng is None else rng
    Wf = params["Wf"]
    xp = namespace(**{"params['Wf']": Wf})
    dtype, device = Wf.dtype, device_of(Wf)
    V, n_a = len(vocab), Wf.shape[0]

    def step(ids_host, a, c):
        ids = xp.asarray(np.asarray(ids_host, dtype=np.int64).reshape(1, -1), device=device)
        a_seq, y, c_seq, _ = lstm_forward(
            _one_hot(ids, V, dtype, xp=xp), a, params, c, return_caches=False
        )
        return a_seq[:, :, -1], c_seq[:, :, -1], y[:, 0, -1]

    a, c, y = step([index[ch] for ch in prime], _zeros(xp, (n_a, 1), dtype, device), None)
    out = []
    for _ in range(length):
        p = np.asarray(to_host(y), dtype=np.float64)
        logits = np.log(np.maximum(p, 1e-300)) / temperature
        p = np.exp(logits - logits.max())
        k = int(rng.choice(V, p=p / p.sum()))
        out.append(vocab[k])
        a, c, y = step([k], a, c)
    return "".join(out)


def charlm(
    *,
    text=None,
    backend="numpy",
    dtype="float32",
    seed=0,
    steps=2000,
    hidden=128,
    seq_len=50,
    batch=32,
    lr=5e-3,
    clip=5.0,
    sample_every=500,
    sample_len=200,
    temperature=0.7,
    prime="The ",
    out="charlm_params.npz",
    plot=None,
    progress=None,
    verbose=True,
):
    """Train a character-level LSTM language model and sample from it.

    Parameters
    ----------
    text : str or os.PathLike, optional
        A UTF-8 text file to learn; default the ``pydoc_data.topics`` documentation.
    backend : str, optional
        ``numpy`` (default), ``torch``, ``jax``, ``cupy``, ``strict``: see
        :func:`xlstm._compat.load_backend`.
    dtype : {"float32", "float64"}, optional
        Default ``float32``.
    seed : int, optional
        Seeds the parameters, the batches and the samples. Default 0.
    steps : int, optional
        Optimizer steps. Default 2000 (about two minutes on two CPU cores with numpy).
    hidden : int, optional
        Hidden size ``n_a``. Default 128.
    seq_len : int, optional
        Length of the training windows (truncated backpropagation through time). Default 50.
    batch : int, optional
        Windows per minibatch, drawn at random positions of the training text. Default 32.
    lr : float, optional
        Adam learning rate. Default 5e-3.
    clip : float, optional
        Clip the gradients to this global norm. Default 5.
    sample_every : int, optional
        Evaluate and print a sample every this many steps (0: only at the end).
    sample_len : int, optional
        Characters per sample. Default 200.
    temperature : float, optional
        Sampling temperature. Default 0.7.
    prime : str, optional
        Text that starts every sample. Default ``"The "`` (a newline if it is not in the
        vocabulary).
    out : str or os.PathLike, optional
        Where to save the trained parameters (:func:`xlstm.save_params`). Default
        ``charlm_params.npz`` in the current folder.
    plot : str, bool or None, optional
        PNG of the loss curve: a path, ``None`` (default) for ``<out>_loss.png``, False
        for none. Needs matplotlib; skipped without it.
    progress : bool or None, optional
        Progress bar, see :func:`xlstm.train.fit`.
    verbose : bool, optional
        Print the setup, the samples and the summary. Default True.

    Returns
    -------
    dict
        ``initial_loss`` and ``final_loss`` (cross-entropy in nats per character on held
        out text, before and after training), ``baseline`` (``log(vocab_size)``, a uniform
        guess), ``train_loss_first`` and ``train_loss_last`` (mean of the first and last
        50 training steps), ``history``, ``evals`` (``(step, held-out loss)`` pairs),
        ``vocab_size``, ``steps``, ``seconds`` (training wall time), ``sample`` (the final
        sample), ``params_path`` and ``plot_path`` (None when no plot was written).
    """
    say = _printer(verbose)
    _check_counts(steps=(steps, 1), hidden=(hidden, 1), seq_len=(seq_len, 1),
                  batch=(batch, 1), sample_every=(sample_every, 0), sample_len=(sample_len, 0))
    xp, device, dt = _setup(backend, dtype)
    raw = load_corpus(text)
    ids_host, vocab = _encode(raw)
    V, N = len(vocab), ids_host.shape[0]
    n_val = _held_out_size(N, V, seq_len)
    train_ids, val_ids = ids_host[: N - n_val], ids_host[N - n_val :]
    if set(prime) - set(vocab):
        say(f"note: the prime {prime!r} has characters outside the vocabulary; using a newline")
        prime = "\n"
    init_rng, batch_rng, sample_rng = _streams(seed, 3)
    params = init_params(V, hidden, V, xp=xp, dtype=dt, device=device, seed=init_rng)
    a0 = _zeros(xp, (hidden, batch), dt, device)

    # Held-out windows: non-overlapping, at most 64 of them, fixed for the whole run.
    starts = np.arange(0, val_ids.shape[0] - seq_len, seq_len)[:64]
    val_win = xp.asarray(val_ids[starts[:, None] + np.arange(seq_len + 1)], device=device)
    val_x, val_y = _one_hot(val_win[:, :-1], V, dt, xp=xp), val_win[:, 1:]
    val_a0 = _zeros(xp, (hidden, starts.shape[0]), dt, device)

    def held_out(p):
        return float(sequence_cross_entropy(val_x, val_a0, p, val_y)[0])

    offsets = np.arange(seq_len + 1)
    high = train_ids.shape[0] - seq_len  # starts in [0, high) leave room for the labels

    def batches():
        while True:
            win = train_ids[batch_rng.integers(0, high, size=batch)[:, None] + offsets]
            w = xp.asarray(win, device=device)
            yield _one_hot(w[:, :-1], V, dt, xp=xp), w[:, 1:]

    def loss_fn(p, b):
        return sequence_cross_entropy(b[0], a0, p, b[1])

    baseline = math.log(V)
    initial = held_out(params)
    say(
        f"charlm: {N:,} characters ({'pydoc_data.topics' if text is None else text}), "
        f"vocabulary {V}; LSTM n_a={hidden}, T={seq_len}, batch {batch}, Adam lr={lr:g}, "
        f"clip {clip:g}, {steps} steps on {backend} {dtype}"
    )
    say(f"held-out loss before training: {initial:.4f} nats/char (uniform guess log V = "
        f"{baseline:.4f})")
    evals = [(0, initial)]

    def show(p, step, log):
        text_out = sample(p, vocab, sample_len, prime=prime, temperature=temperature,
                          rng=sample_rng)
        log(f"--- sample at step {step} (T={temperature:g}) ---\n{prime}{text_out}\n---")
        return text_out

    since = []  # training losses since the last report

    def callback(info):
        since.append(info.loss)
        if sample_every and info.step % sample_every == 0 and info.step < steps:
            loss = held_out(info.params)
            evals.append((info.step, loss))
            log = info.log if verbose else say
            log(f"step {info.step}: held-out loss {loss:.4f}, train loss {np.mean(since):.4f} "
                f"(mean of the last {len(since)} steps), {_fmt_time(info.seconds)}")
            since.clear()
            if verbose:
                show(info.params, info.step, log)
        return False

    res = fit(params, batches, loss_fn, Adam(lr=lr), steps=steps, clip_norm=clip,
              callback=callback, progress=progress, desc="charlm")
    params, history = res.params, res.history
    final = held_out(params)
    evals.append((len(history), final))
    final_sample = sample(params, vocab, sample_len, prime=prime, temperature=temperature,
                          rng=sample_rng)
    save_params(out, params)
    plot_path = _plot_path(out, plot)
    if plot_path is not None:
        plot_path = _plot(plot_path, history, evals, title=f"charlm: n_a={hidden}, vocab {V}",
                          ylabel="cross-entropy (nats/char)", eval_label="held out",
                          baseline=baseline)
    k = min(50, len(history))
    result = {
        "initial_loss": initial,
        "final_loss": final,
        "baseline": baseline,
        "train_loss_first": float(np.mean(history[:k])),
        "train_loss_last": float(np.mean(history[-k:])),
        "history": history,
        "evals": evals,
        "vocab_size": V,
        "steps": len(history),
        "seconds": res.seconds,
        "sample": final_sample,
        "params_path": os.fspath(out),
        "plot_path": plot_path,
    }
    say(f"--- final sample (T={temperature:g}) ---\n{prime}{final_sample}\n---")
    say(f"held-out loss: {initial:.4f} -> {final:.4f} nats/char after {len(history)} steps "
        f"(log V = {baseline:.4f}); training took {_fmt_time(res.seconds)}")
    say(f"saved parameters to {out}" + (f", loss curve to {plot_path}" if plot_path else ""))
    return result


# ------------------------------------------------------------------------ adding problem
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
    say = _printer(verbose)
    _check_counts(T=(T, 2), steps=(steps, 1), hidden=(hidden, 1), batch=(batch, 1),
                  eval_every=(eval_every, 1), test_size=(test_size, 1))
    xp, device, dt = _setup(backend, dtype)
    init_rng, data_rng, test_rng = _streams(seed, 3)
    params = init_params(2, hidden, 1, xp=xp, dtype=dt, device=device, seed=init_rng)

    def on_device(arr):
        return xp.asarray(np.asarray(arr, dtype=dtype), device=device)

    x_test, y_test = adding_data(test_size, T, test_rng)
    baseline = float(np.mean((y_test - 1.0) ** 2))
    x_test, y_test = on_device(x_test), on_device(y_test)
    a0 = _zeros(xp, (hidden, batch), dt, device)
    a0_test = _zeros(xp, (hidden, test_size), dt, device)

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
            f"({_fmt_time(info.seconds)})")
        since.clear()
        return mse < target

    res = fit(params, batches, loss_fn, Adam(lr=lr), steps=steps, clip_norm=clip,
              callback=callback, progress=progress, desc="adding")
    params, history = res.params, res.history
    final = evals[-1][1] if evals[-1][0] == len(history) else test_mse(params)
    if evals[-1][0] != len(history):
        evals.append((len(history), final))
    save_params(out, params)
    plot_path = _plot_path(out, plot)
    if plot_path is not None:
        plot_path = _plot(plot_path, history, evals, title=f"adding problem: T={T}, n_a={hidden}",
                          ylabel="mean squared error", eval_label="test", baseline=baseline,
                          logy=True)
    k = min(20, len(history))
    solved = final < target
    say(f"test MSE: {initial:.4f} -> {final:.4f} after {len(history)} steps "
        f"(baseline {baseline:.4f}); {'solved' if solved else 'NOT solved'} "
        f"(target {target:g}); training took {_fmt_time(res.seconds)}")
    say(f"saved parameters to {out}" + (f", loss curve to {plot_path}" if plot_path else ""))
    return {
        "initial_loss": initial,
        "final_loss": final,
        "baseline": baseline,
        "solved": solved,
        "train_loss_first": float(np.mean(history[:k])),
        "train_loss_last": float(np.mean(history[-k:])),
        "history": history,
        "evals": evals,
        "steps": len(history),
        "seconds": res.seconds,
        "params_path": os.fspath(out),
        "plot_path": plot_path,
    }


# ------------------------------------------------------------------------ command line
# Every bad value is an argparse error (usage, one error line, exit status 2) found before
# any training: the type= functions check single values, _check_args what needs several.
def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _output_file(text):
    """A file path that can be written: its folder exists and is writable, it is no folder."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got an empty string")
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in the folder {folder!r}")
    if os.path.exists(text) and not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot overwrite {text!r}")
    return text


def _input_file(text):
    """A file that exists and can be read."""
    if not os.path.isfile(text):
        what = "is a folder" if os.path.isdir(text) else "does not exist"
        raise argparse.ArgumentTypeError(f"the file {text!r} {what}")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"cannot read the file {text!r}")
    return text


def _check_args(parser, args):
    """The checks that need the environment or several arguments; parser.error on failure."""
    try:
        load_backend(args.backend)
    except BackendUnavailable as exc:
        parser.error(f"argument --backend: {exc}")
    if getattr(args, "text", None) is not None:
        try:
            raw = load_corpus(args.text)
        except UnicodeDecodeError as exc:
            parser.error(f"argument --text: {args.text!r} is not UTF-8 text ({exc.reason})")
        except OSError as exc:
            parser.error(f"argument --text: cannot read {args.text!r}: {exc.strerror}")
        try:
            _held_out_size(len(raw), len(set(raw)), args.seq_len)
        except ValueError as exc:
            parser.error(f"argument --text: {exc}")
    return args


def _common(parser, *, out):
    parser.add_argument("--backend", default="numpy", choices=BACKENDS,
                        help="array backend (default numpy)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="default float32")
    parser.add_argument("--seed", type=_int_at_least(0), default=0,
                        help="random seed, an integer >= 0 (default 0)")
    parser.add_argument("--out", type=_output_file, default=out,
                        help=f"parameter file to write (default {out})")
    parser.add_argument("--plot", type=_output_file, default=None,
                        help="loss-curve PNG (default: next to --out, as <out>_loss.png)")
    parser.add_argument("--no-plot", dest="plot", action="store_false",
                        help="write no loss curve")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bar (default: one when on a terminal)")
    parser.add_argument("--quiet", dest="verbose", action="store_false",
                        help="print nothing")


def _charlm_parser(parser=None):
    p = parser or argparse.ArgumentParser(prog="python -m xlstm demo charlm")
    p.usage = "%(prog)s [options]"  # the options are listed by --help
    p.description = ("Character-level LSTM language model: train on a text, print samples "
                     "as it learns, save the parameters and a loss curve.")
    p.add_argument("--text", type=_input_file, default=None,
                   help="UTF-8 text file to learn (default: Python's pydoc_data.topics)")
    p.add_argument("--steps", type=_int_at_least(1), default=2000,
                   help="optimizer steps (default 2000)")
    p.add_argument("--hidden", type=_int_at_least(1), default=128,
                   help="hidden size (default 128)")
    p.add_argument("--seq-len", type=_int_at_least(1), default=50,
                   help="training window length (default 50)")
    p.add_argument("--batch", type=_int_at_least(1), default=32,
                   help="windows per minibatch (default 32)")
    p.add_argument("--lr", type=_positive_float, default=5e-3,
                   help="Adam learning rate (default 5e-3)")
    p.add_argument("--clip", type=_positive_float, default=5.0,
                   help="global-norm clip (default 5)")
    p.add_argument("--sample-every", type=_int_at_least(0), default=500,
                   help="evaluate and print a sample every N steps (default 500, 0: never)")
    p.add_argument("--sample-len", type=_int_at_least(0), default=200,
                   help="characters per sample (default 200)")
    p.add_argument("--temperature", type=_positive_float, default=0.7,
                   help="sampling temperature (default 0.7)")
    p.add_argument("--prime", default="The ", help="text that starts each sample")
    _common(p, out="charlm_params.npz")
    return p


def _adding_parser(parser=None):
    p = parser or argparse.ArgumentParser(prog="python -m xlstm demo adding")
    p.usage = "%(prog)s [options]"  # the options are listed by --help
    p.description = ("The adding problem (Hochreiter and Schmidhuber 1997, experiment 4): "
                     "train until the test error is below --target, save the parameters.")
    p.add_argument("--T", type=_int_at_least(2), default=50,
                   help="sequence length, at least 2 (default 50)")
    p.add_argument("--steps", type=_int_at_least(1), default=5000,
                   help="most optimizer steps (default 5000)")
    p.add_argument("--hidden", type=_int_at_least(1), default=32,
                   help="hidden size (default 32)")
    p.add_argument("--batch", type=_int_at_least(1), default=64,
                   help="sequences per minibatch (default 64)")
    p.add_argument("--lr", type=_positive_float, default=1e-2,
                   help="Adam learning rate (default 1e-2)")
    p.add_argument("--clip", type=_positive_float, default=1.0,
                   help="global-norm clip (default 1)")
    p.add_argument("--eval-every", type=_int_at_least(1), default=100,
                   help="score the test set every N steps (default 100)")
    p.add_argument("--test-size", type=_int_at_least(1), default=1000,
                   help="test sequences (default 1000)")
    p.add_argument("--target", type=_positive_float, default=0.01,
                   help="stop once the test MSE is below this (default 0.01)")
    _common(p, out="adding_params.npz")
    return p


def charlm_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line of :func:`charlm`; returns its result dict."""
    parser = _charlm_parser()
    return charlm(**vars(_check_args(parser, parser.parse_args(argv))))


def adding_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line of :func:`adding`; returns its result dict."""
    parser = _adding_parser()
    return adding(**vars(_check_args(parser, parser.parse_args(argv))))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``main(["charlm", ...])`` or ``main(["adding", ...])``: run a demo by name.

    Returns the demo's result dict. Bad arguments raise ``SystemExit(2)`` after argparse
    prints the usage and the error, before any training.
    """
    parser = argparse.ArgumentParser(prog="python -m xlstm demo",
                                     description="Training demos of xlstm.")
    sub = parser.add_subparsers(dest="demo", required=True)
    parsers = {
        "charlm": _charlm_parser(sub.add_parser("charlm", help="character-level language model")),
        "adding": _adding_parser(sub.add_parser("adding", help="the adding problem")),
    }
    args = parser.parse_args(argv)
    name = args.demo
    args = vars(_check_args(parsers[name], args))
    del args["demo"]
    return (charlm if name == "charlm" else adding)(**args)


if __name__ == "__main__":
    main()
