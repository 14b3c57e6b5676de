"""The character-level language model: the text, its encoding, sampling and training.

``charlm`` learns to predict the next character of a text (by default the English
documentation strings of ``pydoc_data.topics``, which ship with CPython) with a 2-layer
:class:`xlstm.LSTM` and a linear head, :func:`xlstm.softmax_cross_entropy`, Adam and
gradient clipping, by truncated backpropagation through time: the text is cut into
``batch`` contiguous streams that are read ``seq_len`` characters at a time, each chunk
starting from the state in which the previous one ended. It prints text it samples one
character at a time as it learns. The vocabulary is ``sorted(set(text))``, so it can be
rebuilt from the same text to use the saved parameters later.
"""

from __future__ import annotations

import inspect
import math
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .._lib.compat import device_of, namespace, to_host
from ..models.mlstm import MLSTM
from ..models.recurrent import LSTM, SLSTM
from ..training.fit import fit
from ..training.losses import softmax_cross_entropy
from ..training.optim import Adam
from ._plot import curve_path, eval_curves
from ._run import (
    ArgumentError,
    cell_models,
    check_counts,
    check_memory,
    check_multiple,
    check_paths,
    finish_run,
    fmt_time,
    head_logits,
    head_loss,
    hidden_for,
    init_head,
    input_problem,
    parameter_count,
    parameters_at,
    printer,
    setup,
    streams,
)

__all__ = ["charlm", "load_corpus", "sample"]

#: Most chunks of each held-out stream that are scored.
EVAL_CHUNKS = 64


def load_corpus(path=None):
    """The training text: the file at ``path`` (UTF-8), or CPython's ``pydoc_data.topics``.

    ``pydoc_data.topics.topics`` is a dict of the reference documentation shown by
    ``help()`` (about 0.5 million characters of English with code); its values are joined
    in key order.
    """
    if path is not None:
        return read_text(path)
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(path):
    """The UTF-8 text of the regular file ``path``, read in one bounded read of its size.

    Anything but a regular file (a device such as ``/dev/zero``, which never ends, or a
    pipe, whose opening can wait forever) is refused before it is opened, as an
    :class:`ArgumentError` of ``text``; so is a file that changes its kind between the
    check and the opening. Line ends are read as Python's text mode reads them (``\\r\\n``
    and ``\\r`` become ``\\n``).

    Raises
    ------
    ArgumentError
        If ``path`` is not a readable regular file.
    UnicodeDecodeError
        If the file is not UTF-8.
    OSError
        If the reading fails.
    """
    why = input_problem(path)
    if why:
        raise ArgumentError("text", why)
    # O_NONBLOCK: a pipe swapped in after the check cannot block the opening
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ArgumentError("text", f"{os.fspath(path)!r} is not a regular file")
        data = f.read(info.st_size)
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def held_out_size(n_chars, n_distinct, seq_len, batch=1):
    """Characters of the text held out for evaluation (the last tenth, at least ``seq_len +
    1``).

    Raises :class:`ArgumentError` if the text cannot serve: of ``text`` with fewer than two
    distinct characters; else, when the rest cannot fill ``batch`` streams of at least
    ``seq_len + 1`` characters, of ``seq_len`` if even one stream is too long, or of
    ``batch``.
    """
    if n_distinct < 2:
        raise ArgumentError("text", "needs at least two distinct characters")
    n_val = max(n_chars // 10, seq_len + 1)
    need = batch * (seq_len + 1)
    left = max(n_chars - n_val, 0)
    if left < need:
        raise ArgumentError(
            "seq_len" if left < seq_len + 1 else "batch",
            f"does not fit the text: it has {n_chars} characters; after the {n_val} held "
            f"out, {left} are left to train on, fewer than batch={batch} streams of seq_len "
            f"+ 1 = {seq_len + 1} characters need ({need}); choose a smaller batch or "
            "seq_len, or a longer text"
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


def _chunks(ids, n_streams, seq_len, V, dtype, *, xp, device):
    """The text ``ids`` (host) cut into ``n_streams`` contiguous streams, read in chunks.

    Returns ``(n_chunks, chunk)``: ``chunk(k)`` holds characters ``k seq_len`` to ``(k + 1)
    seq_len`` of every stream as one-hot inputs ``(V, n_streams, seq_len)`` and the
    character after each as labels ``(n_streams, seq_len)``, on ``device``; chunk ``k + 1``
    of a stream goes on where chunk ``k`` ended. Each chunk's one-hot inputs are built
    when it is asked for.
    """
    length = ids.shape[0] // n_streams
    rows = xp.asarray(ids[: n_streams * length].reshape(n_streams, length), device=device)

    def chunk(k):
        win = rows[:, k * seq_len : (k + 1) * seq_len + 1]
        return _one_hot(win[:, :-1], V, dtype, xp=xp), win[:, 1:]

    return (length - 1) // seq_len, chunk


def _model_of(params, V):
    """The :class:`xlstm.LSTM` that runs the ``params`` tree of :func:`charlm`, with its
    sizes read from the tree; ValueError or TypeError naming what does not fit."""
    if not isinstance(params, Mapping) or set(params) != {"rnn", "head"}:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise TypeError(
            f"params must be the dict {{'rnn': <LSTM params>, 'head': {{'Wy', 'by'}}}} that "
            f"charlm trains, got {got}"
        )
    rnn, head = params["rnn"], params["head"]
    first = rnn[0] if isinstance(rnn, Sequence) and rnn and isinstance(rnn[0], Mapping) else {}
    if not ({"Wf", "W", "Wq"} & set(first)):
        raise TypeError("params['rnn'] must be an LSTM's, an SLSTM's or an MLSTM's params: a "
                        "list of one dict of arrays (Wf, bf, ... / W, R, b / Wq, ...) per layer")
    if not isinstance(head, Mapping) or set(head) != {"Wy", "by"}:
        raise TypeError("params['head'] must be the dict {'Wy', 'by'} of the linear head")
    if "Wf" not in first:  # an sLSTM (sigmoid forget gate) or an mLSTM, sizes from the arrays
        W = first["W" if "W" in first else "Wq"]
        xp = namespace(**{"params['rnn'][0]": W, "params['head']['Wy']": head["Wy"]})
        kw = {"xp": xp, "dtype": W.dtype, "device": device_of(W)}
        if "W" in first:
            model = SLSTM(V, W.shape[1], num_heads=first["R"].shape[1], num_layers=len(rnn),
                          **kw)
        else:
            model = MLSTM(V, first["Wo"].shape[0], num_heads=W.shape[0], d_qk=W.shape[1],
                          num_layers=len(rnn), **kw)
        model._check_params(rnn)
        return model
    Wf = first["Wf"]
    xp = namespace(**{"params['rnn'][0]['Wf']": Wf, "params['head']['Wy']": head["Wy"],
                      "params['head']['by']": head["by"]})
    n_a = Wf.shape[0]
    if Wf.ndim != 2 or Wf.shape[1] != n_a + V:
        raise ValueError(
            f"params['rnn'][0]['Wf'] must have shape (n_a, n_a + {V}) for a vocabulary of "
            f"{V} characters, got {tuple(Wf.shape)}"
        )
    for k, shape in (("Wy", (V, n_a)), ("by", (V, 1))):
        if tuple(head[k].shape) != shape:
            raise ValueError(f"params['head'][{k!r}] must have shape {shape} (vocabulary "
                             f"{V}, n_a={n_a}), got {tuple(head[k].shape)}")
    return LSTM(V, n_a, num_layers=len(rnn), xp=xp, dtype=Wf.dtype, device=device_of(Wf))


def sample(
    params: Mapping[str, Any], vocab: Sequence[str], length: int, *, prime: str = "\n",
    temperature: float = 1.0, rng: np.random.Generator | None = None,
) -> str:
    """Generate ``length`` characters, one at a time, from a trained character model.

    The ``prime`` text is run through the model in one call; then each new character is
    drawn from the softmax of the head's logits divided by ``temperature``, and fed back as
    a one-hot input of one step, with the model's state carried over from call to call.

    Parameters
    ----------
    params : dict
        ``{"rnn": <an LSTM's params>, "head": {"Wy", "by"}}`` as :func:`charlm` trains
        and saves them (:func:`xlstm.load_params` reads them back), in any namespace: the
        LSTM's layers (one dict per layer), ``Wy (len(vocab), n_a)`` and ``by (len(vocab),
        1)``. The number of layers and the sizes are read from it.
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

    Raises
    ------
    TypeError, ValueError
        For a non-positive ``temperature``, a ``prime`` with characters outside ``vocab``,
        or ``params`` that are not such a tree or do not fit ``vocab``; the message names
        the argument.
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
    V = len(vocab)
    model = _model_of(params, V)
    xp, dtype, device = model.xp, model.dtype, model.device

    def step(ids_host, state):
        ids = xp.asarray(np.asarray(ids_host, dtype=np.int64).reshape(1, -1), device=device)
        y, state, _ = model.forward(_one_hot(ids, V, dtype, xp=xp), state,
                                    params=params["rnn"], return_cache=False)
        return head_logits(params["head"], y[:, :, -1:], xp=xp)[:, 0, 0], state

    logits, state = step([index[ch] for ch in prime], None)
    out = []
    for _ in range(length):
        z = np.asarray(to_host(logits), dtype=np.float64) / temperature
        p = np.exp(z - z.max())
        k = int(rng.choice(V, p=p / p.sum()))
        out.append(vocab[k])
        logits, state = step([k], state)
    return "".join(out)


def _check_run(*, cell, hidden, layers, V, N, seq_len, batch, dtype, out, plot):
    """The checks of a :func:`charlm` run that need the text (``V`` distinct characters of
    ``N``) or several arguments, all before anything is allocated or trained.

    Returns ``(cls, kwargs, n_val)``: the model class and its keyword arguments, and the
    held-out size. Raises :class:`ArgumentError` naming the argument at fault: a cell
    that does not exist, a hidden size that its heads do not divide, an output path that
    cannot be written, a text that cannot serve, a model too large for the machine.
    """
    models = cell_models()
    if cell not in models:
        raise ArgumentError("cell", f"must be one of {sorted(models)}, got {cell!r}")
    label, cls, kwargs = models[cell]
    heads = kwargs.get("num_heads", 1)
    check_multiple("hidden", hidden, heads, f"the {label} splits it among {heads} heads")
    check_paths(outputs=(("out", out), ("plot", curve_path(out, plot))))
    n_val = held_out_size(N, V, seq_len, batch)
    n_params = parameters_at(lambda n: cls(V, n, num_layers=layers, **kwargs), hidden,
                             heads) + V * hidden + V
    # the parameters, their gradients and Adam's two moments; the activations that the
    # backward pass keeps (about a dozen numbers per unit, layer and step) and the
    # one-hot inputs, logits and their gradients
    per_step = batch * seq_len * (12 * hidden * layers + 3 * V)
    check_memory(f"a {layers}-layer {label} with hidden={hidden} (and batch={batch}, "
                 f"seq_len={seq_len})", 8 if dtype == "float64" else 4,
                 [(4 * n_params, {"hidden": hidden}),
                  (per_step, {"batch": batch, "seq_len": seq_len})])
    return cls, kwargs, n_val


def charlm(
    *,
    text: str | os.PathLike | None = None,
    backend: str = "numpy",
    dtype: str = "float32",
    seed: int = 0,
    steps: int = 2000,
    hidden: int = 128,
    layers: int = 2,
    cell: str = "lstm",
    seq_len: int = 50,
    batch: int = 32,
    lr: float = 5e-3,
    clip: float = 5.0,
    sample_every: int = 500,
    sample_len: int = 200,
    temperature: float = 0.7,
    prime: str = "The ",
    out: str | os.PathLike = "charlm_params.npz",
    plot: str | os.PathLike | bool | None = None,
    progress: bool | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train a character-level language model, a stacked LSTM with a linear head, by
    truncated backpropagation through time, and sample from it.

    The training text (all but its last tenth) is cut into ``batch`` contiguous streams of
    equal length. Step ``k`` reads the next ``seq_len`` characters of every stream (the
    labels are the characters after them), starting from the model's final state of step
    ``k - 1``; that state's gradient is not carried back (truncated backpropagation). When
    the streams run out, they start over from their beginnings with a zero state. The
    held-out text (the last tenth) is scored the same way: cut into at most ``batch``
    contiguous streams, read in chunks of ``seq_len`` with the state carried, the first
    ``EVAL_CHUNKS`` (64) chunks of each stream.

    Parameters
    ----------
    text : str or os.PathLike, optional
        A UTF-8 text file to learn; default the ``pydoc_data.topics`` documentation.
    backend : str, optional
        ``numpy`` (default), ``torch``, ``jax``, ``cupy``, ``strict``: see
        :func:`xlstm._lib.compat.load_backend`.
    dtype : {"float32", "float64"}, optional
        Default ``float32``.
    seed : int, optional
        Seeds the parameters and the samples. Default 0.
    steps : int, optional
        Optimizer steps. Default 1000.
    hidden : int, optional
        Hidden size ``n_a`` of every layer. Default 128.
    layers : int, optional
        Stacked layers. Default 2 (the mLSTM runs one).
    cell : {"lstm", "slstm", "mlstm"}, optional
        The model: :class:`xlstm.LSTM` (default), :class:`xlstm.SLSTM` or
        :class:`xlstm.MLSTM`, the last two with 2 heads.
    seq_len : int, optional
        Characters per chunk: the span of truncated backpropagation. Default 50.
    batch : int, optional
        Contiguous streams of the training text, read side by side. Default 32.
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
        Where to save the trained parameters, the tree ``{"rnn": <the LSTM's params>,
        "head": {"Wy", "by"}}`` (:func:`xlstm.save_params`; :func:`xlstm.load_params`
        reads it back for :func:`sample`). Default ``charlm_params.npz`` in the current
        folder.
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

    Raises
    ------
    ArgumentError
        A ValueError naming the argument, before any training: a count below its
        minimum, an unknown ``cell``, a ``hidden`` that the cell's heads do not divide, a
        model too large for the machine's memory, an ``out`` or ``plot`` that cannot be
        written, a ``text`` that is not a regular file, or one too short for ``seq_len``
        and ``batch`` (or with fewer than two distinct characters).
    ValueError
        For an unknown dtype.
    """
    say = printer(verbose)
    check_counts(steps=(steps, 1), hidden=(hidden, 1), layers=(layers, 1),
                 seq_len=(seq_len, 1), batch=(batch, 1), sample_every=(sample_every, 0),
                 sample_len=(sample_len, 0))
    xp, device, dt = setup(backend, dtype)
    raw = load_corpus(text)
    ids_host, vocab = _encode(raw)
    V, N = len(vocab), ids_host.shape[0]
    cls, kwargs, n_val = _check_run(cell=cell, hidden=hidden, layers=layers, V=V, N=N,
                                    seq_len=seq_len, batch=batch, dtype=dtype, out=out,
                                    plot=plot)
    if set(prime) - set(vocab):
        say(f"note: the prime {prime!r} has characters outside the vocabulary; using a newline")
        prime = "\n"
    init_rng, sample_rng = streams(seed, 2)
    model = cls(V, hidden, num_layers=layers, xp=xp, dtype=dt, device=device, seed=init_rng,
                **kwargs)
    params = {"rnn": model.params,
              "head": init_head(V, hidden, init_rng, xp=xp, dtype=dt, device=device)}

    n_train, train_chunk = _chunks(ids_host[: N - n_val], batch, seq_len, V, dt, xp=xp,
                                   device=device)
    val_streams = min(batch, n_val // (seq_len + 1))
    n_val_chunks, val_chunk = _chunks(ids_host[N - n_val :], val_streams, seq_len, V, dt,
                                      xp=xp, device=device)
    n_val_chunks = min(n_val_chunks, EVAL_CHUNKS)

    def held_out(p):
        total, state = 0.0, None
        for k in range(n_val_chunks):
            x, labels = val_chunk(k)
            y, state, _ = model.forward(x, state, params=p["rnn"], return_cache=False)
            total = total + softmax_cross_entropy(head_logits(p["head"], y, xp=xp), labels)[0]
        return float(total) / n_val_chunks

    def batches() -> Iterator[tuple[Any, Any, bool]]:
        while True:  # every pass over the streams starts from a zero state
            for k in range(n_train):
                yield (*train_chunk(k), k == 0)

    carried = [None]  # the final state of the previous chunk

    def loss_fn(p, b):
        x, labels, first = b
        loss, grads, carried[0] = head_loss(model, p, x, labels, xp=xp,
                                            state=None if first else carried[0])
        return loss, grads

    baseline = math.log(V)
    initial = held_out(params)
    say(
        f"charlm: {N:,} characters ({'pydoc_data.topics' if text is None else text}), "
        f"vocabulary {V}; {layers}-layer {cls.__name__} n_h={hidden} "
        f"({parameter_count(model):,} parameters), {batch} streams read "
        f"{seq_len} characters per step ({n_train} steps per pass), Adam lr={lr:g}, "
        f"clip {clip:g}, {steps} steps on {backend} {dtype}"
    )
    say(f"held-out loss before training: {initial:.4f} nats/char (uniform guess log V = "
        f"{baseline:.4f}; {n_val_chunks * seq_len * val_streams:,} held-out characters scored)")
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
    final = held_out(res.params)
    evals.append((len(res.history), final))
    final_sample = sample(res.params, vocab, sample_len, prime=prime, temperature=temperature,
                          rng=sample_rng)
    result = finish_run(res, evals, out=out, plot=plot, baseline=baseline, mean_of=50,
                        title=f"charlm: {layers}-layer {cls.__name__}, n_h={hidden}, vocab {V}",
                        ylabel="cross-entropy (nats/char)", eval_label="held out")
    result.update(vocab_size=V, sample=final_sample, parameters=parameter_count(model))
    plot_path = result["plot_path"]
    say(f"--- final sample (T={temperature:g}) ---\n{prime}{final_sample}\n---")
    say(f"held-out loss: {initial:.4f} -> {final:.4f} nats/char after {len(res.history)} steps "
        f"(log V = {baseline:.4f}); training took {fmt_time(res.seconds)}")
    say(f"saved parameters to {out}" + (f", loss curve to {plot_path}" if plot_path else ""))
    return result


def charlm_cells(
    *,
    cells: Sequence[str] = ("lstm", "slstm", "mlstm"),
    text: str | None = None,
    hidden: int = 64,
    steps: int = 500,
    sample_every: int = 100,
    out_dir: str = ".",
    plot: str | bool | None = "charlm_cells.png",
    verbose: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`charlm` once per cell, one layer each, at about the same number of parameters:
    the LSTM's with ``hidden`` units, the others the largest hidden size that has no more.
    The held-out losses of the three runs are drawn in one plot.

    Parameters
    ----------
    cells : sequence of str, optional
        The cells to compare: ``"lstm"``, ``"slstm"``, ``"mlstm"``. Default all three.
    text, steps, sample_every : optional
        As for :func:`charlm` (``sample_every`` also sets how often the held-out loss is
        measured).
    hidden : int, optional
        The LSTM's hidden size, which sets the parameter budget. Default 64.
    out_dir : str, optional
        Folder for each run's parameters, ``charlm_<cell>.npz``. Default the current one.
    plot : str or False, optional
        PNG of the held-out curves (needs matplotlib). Default ``charlm_cells.png``.
    verbose : bool, optional
        Print the runs' progress.
    **kwargs
        Any other option of :func:`charlm` (``backend``, ``dtype``, ``seed``, ...).

    Returns
    -------
    dict
        ``runs`` (each cell's :func:`charlm` result), ``hidden`` and ``parameters`` by
        cell, and ``plot_path``.
    """
    say = printer(verbose)
    models = cell_models()
    for cell in cells:
        if cell not in models:
            raise ArgumentError("cells", f"must name cells of {sorted(models)}, got {cell!r}")
    check_counts(hidden=(hidden, 1), steps=(steps, 1), sample_every=(sample_every, 0))
    check_paths(outputs=(("plot", plot),), folders=(("out_dir", out_dir),))
    ids, vocab = _encode(load_corpus(text))
    V, N = len(vocab), ids.shape[0]
    budget = parameters_at(lambda n: LSTM(V, n), hidden)
    # every run is checked before the first one trains, with charlm's defaults
    opts = {name: arg.default for name, arg in inspect.signature(charlm).parameters.items()}
    opts.update(kwargs)
    sizes = {}
    for cell in cells:
        _, cls, kw = models[cell]
        sizes[cell] = hidden if cls is LSTM else hidden_for(
            lambda n, cls=cls, kw=kw: cls(V, n, **kw), budget)
        _check_run(cell=cell, hidden=sizes[cell], layers=1, V=V, N=N,
                   seq_len=opts["seq_len"], batch=opts["batch"], dtype=opts["dtype"], plot=False,
                   out=os.path.join(out_dir, f"charlm_{cell}.npz"))
    runs, counts = {}, {}
    for cell in cells:
        n = sizes[cell]
        say(f"=== {cell}: n_h={n}")
        runs[cell] = charlm(cell=cell, text=text, hidden=n, layers=1, steps=steps,
                            sample_every=sample_every, plot=False, verbose=verbose,
                            out=os.path.join(out_dir, f"charlm_{cell}.npz"), **kwargs)
        counts[cell] = runs[cell]["parameters"]
    plot_path = None
    if plot:
        first = runs[cells[0]]
        plot_path = eval_curves(plot, {f"{c} ({counts[c]:,} parameters)": runs[c]["evals"]
                                       for c in cells},
                                title=f"charlm, held-out loss, vocabulary {V}",
                                ylabel="cross-entropy (nats/char)", baseline=first["baseline"])
    for cell in cells:
        say(f"{cell}: n_h={sizes[cell]}, {counts[cell]:,} parameters, held-out loss "
            f"{runs[cell]['initial_loss']:.4f} -> {runs[cell]['final_loss']:.4f} "
            f"({fmt_time(runs[cell]['seconds'])})")
    return {"runs": runs, "hidden": sizes, "parameters": counts, "plot_path": plot_path}
