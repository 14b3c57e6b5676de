"""The character-level language model: the text, its encoding, sampling and training.

``charlm`` learns to predict the next character of a text (by default the English
documentation strings of ``pydoc_data.topics``, which ship with CPython) with
:func:`xlstm.sequence_cross_entropy`, Adam and gradient clipping, and prints text it
samples one character at a time as it learns. The vocabulary is ``sorted(set(text))``,
so it can be rebuilt from the same text to use the saved parameters later.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .._compat import device_of, namespace, to_host
from ..io import save_params
from ..losses import sequence_cross_entropy
from ..lstm import lstm_forward
from ..optim import Adam
from ..params import init_params
from ..train import fit
from ._plot import curve_path, loss_curve
from ._run import check_counts, fmt_time, printer, setup, streams, zeros

__all__ = ["charlm", "load_corpus", "sample"]


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



def held_out_size(n_chars, n_distinct, seq_len):
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

    a, c, y = step([index[ch] for ch in prime], zeros(xp, (n_a, 1), dtype, device), None)
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
    say = printer(verbose)
    check_counts(steps=(steps, 1), hidden=(hidden, 1), seq_len=(seq_len, 1),
                 batch=(batch, 1), sample_every=(sample_every, 0), sample_len=(sample_len, 0))
    xp, device, dt = setup(backend, dtype)
    raw = load_corpus(text)
    ids_host, vocab = _encode(raw)
    V, N = len(vocab), ids_host.shape[0]
    n_val = held_out_size(N, V, seq_len)
    train_ids, val_ids = ids_host[: N - n_val], ids_host[N - n_val :]
    if set(prime) - set(vocab):
        say(f"note: the prime {prime!r} has characters outside the vocabulary; using a newline")
        prime = "\n"
    init_rng, batch_rng, sample_rng = streams(seed, 3)
    params = init_params(V, hidden, V, xp=xp, dtype=dt, device=device, seed=init_rng)
    a0 = zeros(xp, (hidden, batch), dt, device)

    # Held-out windows: non-overlapping, at most 64 of them, fixed for the whole run.
    starts = np.arange(0, val_ids.shape[0] - seq_len, seq_len)[:64]
    val_win = xp.asarray(val_ids[starts[:, None] + np.arange(seq_len + 1)], device=device)
    val_x, val_y = _one_hot(val_win[:, :-1], V, dt, xp=xp), val_win[:, 1:]
    val_a0 = zeros(xp, (hidden, starts.shape[0]), dt, device)

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
                f"(mean of the last {len(since)} steps), {fmt_time(info.seconds)}")
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
    plot_path = curve_path(out, plot)
    if plot_path is not None:
        plot_path = loss_curve(plot_path, history, evals,
                               title=f"charlm: n_a={hidden}, vocab {V}",
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
        f"(log V = {baseline:.4f}); training took {fmt_time(res.seconds)}")
    say(f"saved parameters to {out}" + (f", loss curve to {plot_path}" if plot_path else ""))
    return result
