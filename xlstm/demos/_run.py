"""What the demos do alike: the backend and dtype, count checks, random streams, printing,
and the linear head that the demos put on a model class's outputs."""

from __future__ import annotations

import numpy as np

from .._compat import load_backend
from ..losses import softmax_cross_entropy


def setup(backend, dtype):
    """``(xp, device, dtype)`` of a backend name and a dtype name; ValueError on a bad dtype."""
    xp, device = load_backend(backend)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return xp, device, getattr(xp, dtype)


def printer(verbose):
    """``print``, or a function that prints nothing."""
    return print if verbose else (lambda *args, **kwargs: None)


def check_counts(**counts):
    """Raise ValueError unless every count is an int >= its minimum (given as ``(v, lo)``)."""
    for name, (value, low) in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


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


def parameter_count(model):
    """The number of parameters of ``model``."""
    return int(sum(int(np.prod(v.shape)) for layer in model.params for v in layer.values()))


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
    from ..mlstm import MLSTM
    from ..models import LSTM, SLSTM

    return {"lstm": ("LSTM", LSTM, {}), "slstm": ("sLSTM", SLSTM, {"num_heads": 2}),
            "mlstm": ("mLSTM", MLSTM, {"num_heads": 2})}

