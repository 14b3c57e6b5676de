"""What the demos do alike: the backend and dtype, count checks, random streams, printing,
the linear head that the demos put on a model class's outputs (its loss and its accuracy),
and the end of a run (its files and its summary)."""

from __future__ import annotations

import os
import stat

import numpy as np

from .._lib.compat import load_backend
from ..io import save_params
from ..training.losses import softmax_cross_entropy
from ._plot import curve_path, loss_curve


def setup(backend, dtype):
    """``(xp, device, dtype)`` of a backend name and a dtype name; ValueError on a bad dtype."""
    xp, device = load_backend(backend)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return xp, device, getattr(xp, dtype)


def printer(verbose):
    """``print``, or a function that prints nothing."""
    return print if verbose else (lambda *args, **kwargs: None)


class ArgumentError(ValueError):
    """A bad value of one keyword argument of a demo, found before any training.

    ``str(error)`` is ``"<name> <reason>"``; the command line shows it as the argparse
    error ``argument --<name>: <reason>`` (underscores as hyphens).

    Parameters
    ----------
    name : str
        The keyword argument, e.g. ``"hidden"``.
    reason : str
        What is wrong and what to do, phrased to follow the name: ``"must be ..."``.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} {reason}")
        self.name, self.reason = name, reason

    def __reduce__(self):
        return (type(self), (self.name, self.reason))

    @property
    def option(self) -> str:
        """The command-line option of the argument: ``seq_len`` is ``--seq-len``."""
        return "--" + self.name.replace("_", "-")


def check_counts(**counts):
    """Raise :class:`ArgumentError` unless every count is an int >= its minimum, given as
    ``(value, low)`` or ``(value, low, why)`` (``why`` says where the minimum comes from)."""
    for name, (value, low, *why) in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            because = f" ({why[0]})" if why else ""
            raise ArgumentError(name, f"must be an int >= {low}{because}, got {value!r}")


def check_multiple(name, value, step, why):
    """Raise :class:`ArgumentError` unless ``value`` is a multiple of ``step``."""
    if value % step:
        raise ArgumentError(name, f"must be a multiple of {step} ({why}), got {value}; "
                                  f"try {max(step, value - value % step)}")


def memory_bytes():
    """The machine's physical memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        return None


def check_memory(what, itemsize, terms):
    """Raise :class:`ArgumentError` if a run would need more memory than the machine has.

    ``terms`` estimates the run's largest arrays (parameters, gradients and optimizer
    moments, activations, data sets) as ``(elements, factors)`` pairs: a number of array
    elements and the arguments it grows with, by name, with their values. Before anything
    is allocated, the error names the largest factor of the largest term.
    """
    limit = memory_bytes()
    need = itemsize * sum(count for count, _ in terms)
    if limit is None or need <= limit:
        return
    factors = max(terms, key=lambda term: term[0])[1]
    name = max(factors, key=factors.get)
    raise ArgumentError(
        name, f"is too large: {what} would need about {need / 2**30:,.0f} GiB of memory, "
              f"more than the {limit / 2**30:,.0f} GiB here; choose a smaller value")


def check_sequence_memory(what, dtype, *, weights, batch, test_size, length, inputs, units):
    """:func:`check_memory` of a demo that trains on ``batch`` sequences and scores
    ``test_size`` more, of ``T`` steps.

    ``weights`` are ``(parameters, factors)`` terms (each counted four times: the
    parameters, their gradients and Adam's two moments); ``length`` is ``(T, factors)``,
    the sequence length and the arguments that set it; ``inputs`` is ``(n_x, factors)``,
    the input numbers per step; ``units`` the activations kept per step for the backward
    pass.
    """
    (T, t_by), (n_x, x_by) = length, inputs
    terms = [(4 * n, by) for n, by in weights]
    for name, count in (("batch", batch), ("test_size", test_size)):
        terms.append((count * T * units, {name: count, **t_by}))
        terms.append((count * T * n_x, {name: count, **t_by, **x_by}))
    check_memory(what, 8 if dtype == "float64" else 4, terms)


def lstm_parameters(n_x, n_a, directions=1):
    """The parameters of a one-layer :class:`xlstm.LSTM`: ``4 n_a (n_a + n_x)`` weights and
    ``8 n_a`` biases per direction."""
    return directions * (4 * n_a * (n_a + n_x) + 8 * n_a)


def output_problem(path):
    """Why ``path`` cannot be written as a file (its folder missing or read-only, or it is
    a folder), or None when it can."""
    text = os.fspath(path)
    if not text:
        return "expected a file path, got an empty string"
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        return f"{text!r} is a folder, not a file"
    if not os.path.isdir(folder):
        return f"the folder {folder!r} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write in the folder {folder!r}"
    if os.path.exists(text) and not os.access(text, os.W_OK):
        return f"cannot overwrite {text!r}"
    return None


def folder_problem(path):
    """Why files cannot be written into the folder ``path``, or None when they can."""
    text = os.fspath(path)
    if not os.path.isdir(text):
        what = "is a file" if os.path.exists(text) else "does not exist"
        return f"must be an existing folder; {text!r} {what}"
    if not os.access(text, os.W_OK | os.X_OK):
        return f"cannot write in the folder {text!r}"
    return None


def input_problem(path):
    """Why ``path`` cannot be read as a file (missing, a folder, not a regular file such as
    a device or a pipe, unreadable), or None when it can."""
    text = os.fspath(path)
    try:
        mode = os.stat(text).st_mode
    except FileNotFoundError:
        return f"the file {text!r} does not exist"
    except OSError as exc:
        return f"cannot read the file {text!r}: {exc.strerror}"
    if stat.S_ISDIR(mode):
        return f"the file {text!r} is a folder"
    if not stat.S_ISREG(mode):
        return (f"{text!r} is not a regular file (a device, a pipe or a socket, which may "
                "never end); give a text file")
    if not os.access(text, os.R_OK):
        return f"cannot read the file {text!r}"
    return None


def check_paths(*, outputs=(), folders=()):
    """Raise :class:`ArgumentError` for the first output file of ``outputs`` (``(name,
    path)`` pairs; None or False paths are skipped) or folder of ``folders`` that cannot
    be written: a run checks what it needs at its end before it starts."""
    for name, path in outputs:
        if path not in (None, False, True) and (why := output_problem(path)):
            raise ArgumentError(name, f"cannot be written: {why}")
    for name, path in folders:
        if why := folder_problem(path):
            raise ArgumentError(name, why)


def streams(seed, n):
    """``n`` independent host generators derived from one seed."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def zeros(xp, shape, dtype, device):
    return xp.zeros(shape, dtype=dtype, device=device)


def fmt_time(seconds):
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def init_head(n_y, n, rng, *, xp, dtype, device):
    """A linear head ``{"Wy": (n_y, n), "by": (n_y, 1)}`` on ``n`` features: ``Wy`` uniform
    in ``(-k, k)``, ``k = 1 / sqrt(n)`` (drawn from the host generator ``rng``), ``by`` zero."""
    k = 1.0 / np.sqrt(n)
    head = {"Wy": rng.uniform(-k, k, (n_y, n)), "by": np.zeros((n_y, 1))}
    return {key: xp.asarray(v, dtype=dtype, device=device) for key, v in head.items()}


def head_logits(head, y, *, xp):
    """The head's logits ``Wy y + by``, ``(n_y, m, T)``, of a model's outputs ``y (n, m, T)``."""
    return xp.tensordot(head["Wy"], y, axes=1) + head["by"][:, :, None]


def head_loss(model, params, x, labels, *, xp, state=None, lengths=None, mask=None):
    """Softmax cross-entropy of ``model`` with a linear head, and all its gradients.

    ``params`` is ``{"rnn": <the model's params>, "head": {"Wy", "by"}}``; the model runs
    from ``state`` (None: zeros) with ``lengths``. Returns ``(loss, grads, state)``:
    ``grads`` of the structure of ``params``, and the model's final state, whose gradient
    is not carried back (truncated backpropagation when it starts the next chunk).
    """
    y, final, cache = model.forward(x, state, lengths=lengths, params=params["rnn"])
    head = params["head"]
    loss, dz = softmax_cross_entropy(head_logits(head, y, xp=xp), labels, mask=mask)
    dy = xp.tensordot(xp.matrix_transpose(head["Wy"]), dz, axes=1)
    _, _, grads = model.backward(dy, cache)
    dhead = {"Wy": xp.tensordot(dz, y, axes=([1, 2], [1, 2])),
             "by": xp.sum(dz, axis=(1, 2))[:, None]}
    return loss, {"rnn": grads, "head": dhead}, final


def head_training(model, head, *, xp):
    """What :func:`xlstm.train.fit` trains for ``model`` with a linear ``head``: the
    parameter tree ``{"rnn", "head"}`` and the loss function, the masked :func:`head_loss` of
    batches ``(x, labels, mask, lengths)`` (``lengths`` None: every sequence has all its
    steps)."""

    def loss_fn(params, batch):
        x, labels, mask, lengths = batch
        loss, grads, _ = head_loss(model, params, x, labels, xp=xp, lengths=lengths, mask=mask)
        return loss, grads

    return {"rnn": model.params, "head": head}, loss_fn


def accuracy(model, params, batch, *, xp):
    """The accuracy of ``model`` with the linear head of ``params`` (the tree of
    :func:`head_training`) on a batch of :func:`head_training`, over its counted positions."""
    x, labels, mask, lengths = batch
    y, _, _ = model.forward(x, lengths=lengths, params=params["rnn"], return_cache=False)
    logits = head_logits(params["head"], y, xp=xp)
    hit = (xp.argmax(logits, axis=0) == xp.astype(labels, xp.int64)) & mask
    dt = logits.dtype
    return float(xp.sum(xp.astype(hit, dt)) / xp.sum(xp.astype(mask, dt)))


def finish_run(res, evals, *, out, plot, baseline, mean_of, **curve):
    """The end of a demo that trains one model: save its parameters to ``out`` and its loss
    curve where :func:`curve_path` puts it (``curve``: :func:`loss_curve`'s labels), and
    return the summary that such demos share.

    ``evals`` are the ``(step, loss)`` pairs of the held-out scores, the last one that of
    the trained model; ``train_loss_first`` and ``train_loss_last`` are the means of the
    first and last ``mean_of`` training losses.
    """
    history = res.history
    save_params(out, res.params)
    plot_path = curve_path(out, plot)
    if plot_path is not None:
        plot_path = loss_curve(plot_path, history, evals, baseline=baseline, **curve)
    k = min(mean_of, len(history))
    return {
        "initial_loss": evals[0][1],
        "final_loss": evals[-1][1],
        "baseline": baseline,
        "train_loss_first": float(np.mean(history[:k])),
        "train_loss_last": float(np.mean(history[-k:])),
        "history": history,
        "evals": evals,
        "steps": len(history),
        "seconds": res.seconds,
        "params_path": os.fspath(out),
        "plot_path": plot_path,
    }


def parameter_count(model):
    """The number of parameters of ``model``."""
    return int(sum(int(np.prod(v.shape)) for layer in model.params for v in layer.values()))


def parameters_at(make, n, step=1):
    """The number of parameters of ``make(n)``, found without building it.

    A model's parameter count is a polynomial of degree at most 2 in its hidden size
    (square recurrent and deeper-layer weights, weights on the input, biases), so three
    small models, of hidden sizes ``step``, ``2 step`` and ``3 step``, give it exactly
    for any multiple ``n`` of ``step`` (the heads of the sLSTM and the mLSTM need one).
    """
    y0, y1, y2 = (parameter_count(make(k * step)) for k in (1, 2, 3))
    u = (n - step) // step
    return y0 + (y1 - y0) * u + (y2 - 2 * y1 + y0) * (u * (u - 1) // 2)


def hidden_for(make, budget, step=2, most=1024):
    """The largest hidden size, a multiple of ``step``, whose model ``make(n)`` has at most
    ``budget`` parameters (at least ``step``)."""
    best = step
    for n in range(step, most + 1, step):
        if parameter_count(make(n)) > budget:
            break
        best = n
    return best


def cell_models():
    """The models that the demos compare, by cell name: ``(label, class, keyword
    arguments)``; the sLSTM and the mLSTM with 2 heads."""
    from ..models.mlstm import MLSTM
    from ..models.recurrent import LSTM, SLSTM

    return {"lstm": ("LSTM", LSTM, {}), "slstm": ("sLSTM", SLSTM, {"num_heads": 2}),
            "mlstm": ("mLSTM", MLSTM, {"num_heads": 2})}

