"""The test suite's oracles, written once: random cases, central differences, torch autograd.

* :func:`random_case` draws an LSTM case (``x``, ``a0``, ``c0`` and the ten parameters of the
  notebook) on the host, :func:`random_rnn_case` an RNN case (``x``, ``a0`` and the RNN
  notebook's five parameters, optionally torch's second bias ``bha``);
* :func:`central_differences` differentiates any scalar function of named float64 arrays;
* :func:`torch_lstm_forward` is the notebook's forward pass written independently with torch
  operations, so that torch autograd gives every gradient;
* :func:`random_gru_case` draws a GRU case (``x``, ``a0`` and the nine parameters of the GRU
  cell) and :func:`numpy_gru_forward` runs torch's GRU equations step by step in numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
from xlstm.params import PARAM_KEYS


class Case(NamedTuple):
    """An LSTM case on the host: unpacks as ``x, a0, c0, params``."""

    x: np.ndarray
    a0: np.ndarray
    c0: np.ndarray
    params: dict[str, np.ndarray]

    def arrays(self) -> dict[str, np.ndarray]:
        """``x``, ``a0``, ``c0`` and the parameters as one flat dict (the arrays themselves)."""
        return {"x": self.x, "a0": self.a0, "c0": self.c0, **self.params}

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Case:
        """The inverse of :meth:`arrays`: keys other than the inputs and parameters are left."""
        return cls(arrays["x"], arrays["a0"], arrays["c0"], {k: arrays[k] for k in PARAM_KEYS})


def random_case(rng=0, n_x=3, n_a=4, n_y=2, m=2, T=3, *, scale=0.5, x_scale=1.0,
                state_scale=1.0, dtype=np.float64) -> Case:
    """A random case of standard normal draws, scaled.

    Parameters
    ----------
    rng : numpy.random.Generator or int
        The generator to draw from (the caller may go on drawing from it), or a seed.
    n_x, n_a, n_y, m, T : int
        Input size, hidden size, output size, batch size and number of time steps.
    scale, x_scale, state_scale : float
        Standard deviation of every parameter, of ``x`` and of ``a0`` and ``c0``.
    dtype : numpy dtype
        The dtype of every array (drawn in float64, then cast).

    The draws come in a fixed order: ``Wf, bf, Wi, bi, Wc, bc, Wo, bo, Wy, by``, then ``x``,
    ``a0`` and ``c0``.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    params = {}
    for g in "fico":
        params["W" + g] = scale * rng.standard_normal((n_a, n_a + n_x))
        params["b" + g] = scale * rng.standard_normal((n_a, 1))
    params["Wy"] = scale * rng.standard_normal((n_y, n_a))
    params["by"] = scale * rng.standard_normal((n_y, 1))
    x = x_scale * rng.standard_normal((n_x, m, T))
    a0 = state_scale * rng.standard_normal((n_a, m))
    c0 = state_scale * rng.standard_normal((n_a, m))
    dtype = np.dtype(dtype)
    if dtype != np.float64:
        x, a0, c0 = (v.astype(dtype) for v in (x, a0, c0))
        params = {k: v.astype(dtype) for k, v in params.items()}
    return Case(x, a0, c0, params)


class RNNCase(NamedTuple):
    """A case of a cell with one state on the host (the RNN's, the GRU's): unpacks as ``x,
    a0, params``."""

    x: np.ndarray
    a0: np.ndarray
    params: dict[str, np.ndarray]

    def arrays(self) -> dict[str, np.ndarray]:
        """``x``, ``a0`` and the parameters as one flat dict (the arrays themselves)."""
        return {"x": self.x, "a0": self.a0, **self.params}

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> RNNCase:
        """The inverse of :meth:`arrays`."""
        return cls(arrays["x"], arrays["a0"],
                   {k: v for k, v in arrays.items() if k not in ("x", "a0")})


def random_rnn_case(rng=0, n_x=3, n_a=4, n_y=2, m=2, T=3, *, scale=0.5, x_scale=1.0,
                    state_scale=1.0, bha=False, dtype=np.float64) -> RNNCase:
    """A random RNN case of standard normal draws, scaled (see :func:`random_case`).

    The draws come in a fixed order: ``Wax, Waa, Wya, ba, by``, then ``x``, ``a0`` and, with
    ``bha=True``, torch's second bias ``bha`` ``(n_a, 1)``.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    shapes = {"Wax": (n_a, n_x), "Waa": (n_a, n_a), "Wya": (n_y, n_a), "ba": (n_a, 1),
              "by": (n_y, 1)}
    params = {k: scale * rng.standard_normal(shape) for k, shape in shapes.items()}
    x = x_scale * rng.standard_normal((n_x, m, T))
    a0 = state_scale * rng.standard_normal((n_a, m))
    if bha:
        params["bha"] = scale * rng.standard_normal((n_a, 1))
    dtype = np.dtype(dtype)
    return RNNCase(x.astype(dtype), a0.astype(dtype),
                   {k: v.astype(dtype) for k, v in params.items()})


def central_differences(
    f: Callable[[dict[str, np.ndarray]], float], arrays: Mapping[str, np.ndarray], h=1e-6
) -> dict[str, np.ndarray]:
    """``d f / d arrays[name]`` for every entry of every array, by central differences.

    ``f`` maps a dict of named float64 numpy arrays to a float; it receives ``arrays`` with
    one array replaced by a perturbed copy, and must not keep it. The error of the
    difference is of order ``h**2`` plus the rounding of ``f`` divided by ``h``. The arrays
    of ``arrays`` are not modified. Returns ``{name: gradient}`` with the names of ``arrays``.
    """
    out = {}
    for name, arr in arrays.items():
        if not (isinstance(arr, np.ndarray) and arr.dtype == np.float64):
            raise TypeError(f"arrays[{name!r}] must be a float64 numpy array, got {arr!r:.60}")
        work = arr.copy()
        args = {**arrays, name: work}
        grad = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            work[idx] = arr[idx] + h
            up = float(f(args))
            work[idx] = arr[idx] - h
            down = float(f(args))
            work[idx] = arr[idx]
            grad[idx] = (up - down) / (2 * h)
        out[name] = grad
    return out


class TorchLSTM(NamedTuple):
    """The result of :func:`torch_lstm_forward`: the leaves and the stacked outputs."""

    leaves: dict  # name -> leaf tensor that requires grad
    a: object  # (n_a, m, T) hidden states
    c: object  # (n_a, m, T) cell states
    logits: object  # (n_y, m, T): Wy a + by
    y: object  # (n_y, m, T): softmax of the logits over n_y

    def grads(self) -> dict[str, np.ndarray]:
        """``{'d' + name: gradient}`` of every leaf that a backward pass reached."""
        return {"d" + k: v.grad.numpy() for k, v in self.leaves.items() if v.grad is not None}


def torch_lstm_forward(torch, arrays: Mapping[str, np.ndarray]) -> TorchLSTM:
    """The notebook's LSTM forward pass with plain torch operations, for torch autograd.

    ``arrays`` holds ``x``, ``a0``, ``c0`` and the ten parameters as float64 numpy arrays;
    each becomes a float64 leaf tensor that requires grad. Call ``backward`` on any scalar
    made from the outputs, then :meth:`TorchLSTM.grads`.
    """
    t = {k: torch.tensor(arrays[k], dtype=torch.float64, requires_grad=True)
         for k in ("x", "a0", "c0", *PARAM_KEYS)}
    a, c = t["a0"], t["c0"]
    outs = []
    for k in range(t["x"].shape[2]):
        z = torch.cat([a, t["x"][:, :, k]], dim=0)
        f = torch.sigmoid(t["Wf"] @ z + t["bf"])
        i = torch.sigmoid(t["Wi"] @ z + t["bi"])
        cc = torch.tanh(t["Wc"] @ z + t["bc"])
        o = torch.sigmoid(t["Wo"] @ z + t["bo"])
        c = f * c + i * cc
        a = o * torch.tanh(c)
        logits = t["Wy"] @ a + t["by"]
        outs.append((a, c, logits, torch.softmax(logits, dim=0)))
    a, c, logits, y = (torch.stack(v, dim=-1) for v in zip(*outs))
    return TorchLSTM(t, a, c, logits, y)


# --------------------------------------------------------------------------------- GRU
#: The GRU cell's parameters: ``W* (n_a, n_a + n_x)`` on ``[a_prev; x_t]``, the input biases
#: ``b*`` and the recurrent biases ``bh*`` (torch's ``bias_ih`` and ``bias_hh``).
GRU_PARAM_KEYS = ("Wr", "br", "Wz", "bz", "Wn", "bn", "bhr", "bhz", "bhn")


#: A GRU case on the host has the RNN case's fields: unpacks as ``x, a0, params``.
GRUCase = RNNCase


def random_gru_case(rng=0, n_x=3, n_a=4, m=2, T=3, *, scale=0.5, x_scale=1.0,
                    state_scale=1.0, dtype=np.float64) -> GRUCase:
    """A random GRU case of standard normal draws, scaled (as :func:`random_case`).

    The draws come in a fixed order: ``Wr, br, Wz, bz, Wn, bn, bhr, bhz, bhn``, then ``x``
    ``(n_x, m, T)`` and ``a0`` ``(n_a, m)``.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    params = {}
    for g in "rzn":
        params["W" + g] = scale * rng.standard_normal((n_a, n_a + n_x))
        params["b" + g] = scale * rng.standard_normal((n_a, 1))
    for g in "rzn":
        params["bh" + g] = scale * rng.standard_normal((n_a, 1))
    x = x_scale * rng.standard_normal((n_x, m, T))
    a0 = state_scale * rng.standard_normal((n_a, m))
    dtype = np.dtype(dtype)
    if dtype != np.float64:
        x, a0 = x.astype(dtype), a0.astype(dtype)
        params = {k: v.astype(dtype) for k, v in params.items()}
    return GRUCase(x, a0, params)


def numpy_gru_forward(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Torch's GRU equations, step by step in numpy: the hidden states ``(n_a, m, T)``.

    ``arrays`` holds ``x``, ``a0`` and the parameters (:data:`GRU_PARAM_KEYS`).
    """
    p, a, x = arrays, arrays["a0"], arrays["x"]
    n_a = a.shape[0]

    def sigmoid(v):
        return 1.0 / (1.0 + np.exp(-v))

    outs = []
    for t in range(x.shape[2]):
        xt = x[:, :, t]
        r = sigmoid(p["Wr"][:, n_a:] @ xt + p["br"] + p["Wr"][:, :n_a] @ a + p["bhr"])
        z = sigmoid(p["Wz"][:, n_a:] @ xt + p["bz"] + p["Wz"][:, :n_a] @ a + p["bhz"])
        n = np.tanh(p["Wn"][:, n_a:] @ xt + p["bn"] + r * (p["Wn"][:, :n_a] @ a + p["bhn"]))
        a = (1.0 - z) * n + z * a
        outs.append(a)
    return np.stack(outs, axis=-1)
