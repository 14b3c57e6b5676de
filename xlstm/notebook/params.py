"""The notebook's parameter dict: validation, initialisation, and the fused gate layout.

Shape letters used throughout the package:

* ``n_x`` input features, ``n_a`` hidden units, ``n_y`` output classes,
* ``m`` batch size, ``T_x`` sequence length.

The seed keeps one weight matrix per gate, ``W* : (n_a, n_a + n_x)``, acting on the
concatenation ``[a_prev; x_t]``. The engine stacks them into one matrix of ``4 n_a`` rows in
the gate order :data:`GATES` = ``(o, f, i, c)``: the three sigmoid gates first and contiguous,
then the tanh candidate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._lib.checks import positive_int, require_mapping_keys, seed_value
from .._lib.compat import device_scope, namespace_of_module, resolve_dtype
from .._lib.typing import Array
from ..cells.lstm import GATES

__all__ = ["init_params", "check_params", "PARAM_KEYS", "GATES"]

#: Keys of the notebook's parameter dict, in the notebook's order.
PARAM_KEYS = ("Wf", "bf", "Wi", "bi", "Wc", "bc", "Wo", "bo", "Wy", "by")


def check_params(params, *, need_output=True):
    """Validate the notebook's parameter dict and return its sizes ``(n_a, n_x, n_y)``.

    ``n_y`` is ``None`` when ``need_output`` is False (the backward pass never reads
    ``Wy``/``by``). Raises ``TypeError`` for a non-mapping, ``KeyError`` for a missing key
    and ``ValueError`` naming the key for a wrongly shaped entry.
    """
    require_keys(params, need_output=need_output)
    return param_sizes(params, need_output=need_output)


def param_sizes(params, *, need_output=True):
    """:func:`check_params` of a dict whose keys :func:`require_keys` has checked: the
    shapes only."""
    Wf = params["Wf"]
    if getattr(Wf, "ndim", None) != 2:
        raise ValueError(
            f"params['Wf'] must be 2-D (n_a, n_a + n_x), got shape {getattr(Wf, 'shape', None)}"
        )
    n_a = Wf.shape[0]
    n_x = Wf.shape[1] - n_a
    if n_a < 1 or n_x < 1:
        raise ValueError(
            f"params['Wf'] has shape {tuple(Wf.shape)}; expected (n_a, n_a + n_x) "
            "with n_a >= 1 and n_x >= 1"
        )
    expected = {}
    for g in "fico":
        expected["W" + g] = (n_a, n_a + n_x)
        expected["b" + g] = (n_a, 1)
    n_y = None
    if need_output:
        Wy = params["Wy"]
        if getattr(Wy, "ndim", None) != 2 or Wy.shape[1] != n_a:
            raise ValueError(
                f"params['Wy'] must have shape (n_y, n_a) with n_a={n_a}, "
                f"got {tuple(getattr(Wy, 'shape', ()))}"
            )
        n_y = Wy.shape[0]
        expected["by"] = (n_y, 1)
    for key, shape in expected.items():
        got = getattr(params[key], "shape", None)
        if got is None or tuple(got) != shape:
            raise ValueError(
                f"params[{key!r}] must have shape {shape} (n_a={n_a}, n_x={n_x}), "
                f"got {None if got is None else tuple(got)}"
            )
    return n_a, n_x, n_y


def require_keys(params, *, need_output=True):
    """Raise ``TypeError`` unless ``params`` is a mapping, ``KeyError`` naming a missing key."""
    require_mapping_keys(params, _keys(need_output))


def param_arrays(params, *, need_output=True):
    """The parameter arrays keyed for :func:`xlstm._lib.compat.namespace` error messages."""
    return {f"params['{k}']": params[k] for k in _keys(need_output)}


def _keys(need_output):
    """The keys a pass reads: all, or the cell's without the output layer's ``Wy``, ``by``."""
    return PARAM_KEYS if need_output else PARAM_KEYS[:8]


def init_params(
    n_x: int, n_a: int, n_y: int, *, xp: Any = None, dtype: Any = None, device: Any = None,
    seed: int | np.random.Generator | None = None,
) -> dict[str, Array]:
    """Initialise the notebook's parameter dict for an LSTM with a softmax output layer.

    The input part of each gate weight, ``W*[:, n_a:]``, and ``Wy`` are Glorot-uniform; the
    recurrent part, ``W*[:, :n_a]``, is a random orthogonal matrix per gate; ``bf`` is 1
    (so the cell remembers by default) and the other biases are 0. Numbers are drawn on the
    host with ``numpy.random.default_rng(seed)`` and then moved to ``xp`` and ``device``, so
    one ``seed`` gives the same parameters on every backend.

    Parameters
    ----------
    n_x, n_a, n_y : int
        Input size, hidden size and number of output classes (all >= 1; any integer type,
        such as ``numpy.int64``).
    xp : namespace, optional
        Target array namespace (numpy, cupy, torch, ...). Default: numpy.
    dtype : dtype or str, optional
        Real floating dtype in ``xp``, as a dtype object or a name such as ``"float32"``.
        Default: the namespace's default floating dtype.
    device : device, optional
        Target device. Default: the namespace's default device.
    seed : int or numpy.random.Generator, optional
        Seed for the host random generator.

    Returns
    -------
    dict
        ``Wf, bf, Wi, bi, Wc, bc, Wo, bo`` of shapes ``(n_a, n_a + n_x)`` / ``(n_a, 1)``,
        ``Wy`` ``(n_y, n_a)`` and ``by`` ``(n_y, 1)``.

    Raises
    ------
    TypeError
        If a size is not an integer, or ``dtype`` is not a real floating dtype (integer
        weights would all be zero).
    ValueError
        If a size is smaller than 1.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> params = xlstm.init_params(3, 5, 2, seed=0)  # n_x, n_a, n_y
    >>> params["Wf"].shape, params["bf"].shape, params["Wy"].shape, params["Wf"].dtype
    ((5, 8), (5, 1), (2, 5), dtype('float64'))
    >>> U = params["Wf"][:, :5]  # the recurrent part: orthogonal
    >>> bool(np.allclose(U @ U.T, np.eye(5))), bool(np.all(params["bf"] == 1.0))
    (True, True)
    >>> xlstm.init_params(3, 5, 2, dtype="float32", seed=0)["Wo"].dtype
    dtype('float32')
    """
    n_x, n_a, n_y = (positive_int(k, v) for k, v in (("n_x", n_x), ("n_a", n_a), ("n_y", n_y)))
    xp = namespace_of_module(xp)
    dtype = resolve_dtype(xp, dtype, device=device)
    rng = np.random.default_rng(seed_value("seed", seed, generator=True))

    def glorot(rows, cols):
        lim = np.sqrt(6.0 / (rows + cols))
        return rng.uniform(-lim, lim, size=(rows, cols))

    def orthogonal(n):
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        return q * np.sign(np.diag(r))  # sign fix makes the distribution uniform (Haar)

    host = {}
    for g in "fico":
        host["W" + g] = np.concatenate([orthogonal(n_a), glorot(n_a, n_x)], axis=1)
        host["b" + g] = np.full((n_a, 1), 1.0 if g == "f" else 0.0)
    host["Wy"] = glorot(n_y, n_a)
    host["by"] = np.zeros((n_y, 1))
    out = {}
    with device_scope(xp=xp, device=device):
        for k in PARAM_KEYS:
            out[k] = xp.astype(xp.asarray(host[k], device=device), dtype)
    return out

