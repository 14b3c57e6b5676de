"""Conversions to and from torch of the notebook's parameter dict and ``torch.nn.LSTM``'s
weights (the model classes' are in :mod:`xlstm.models.interop`).

The notebook's cell and ``torch.nn.LSTM`` compute the same thing; only the layout differs.

=====================  =====================================  ==============================
gate                   seed (this package)                    ``torch.nn.LSTM``
=====================  =====================================  ==============================
input gate             ``Wi``, ``bi``                         rows ``0:n_a`` (``i``)
forget gate            ``Wf``, ``bf``                         rows ``n_a:2n_a`` (``f``)
candidate              ``Wc``, ``bc`` (``cct``)               rows ``2n_a:3n_a`` (``g``)
output gate            ``Wo``, ``bo``                         rows ``3n_a:4n_a`` (``o``)
=====================  =====================================  ==============================

A seed weight ``W* : (n_a, n_a + n_x)`` acts on ``[a_prev; x_t]``, so its first ``n_a``
columns are torch's recurrent weight (``weight_hh_l0``) and the remaining ``n_x`` columns are
its input weight (``weight_ih_l0``). Torch has two biases per gate that are always added;
the seed has one. Torch's sequences are ``(T_x, m, n_x)`` (or ``(m, T_x, n_x)`` with
``batch_first=True``, which does not change the weights), the notebook's are ``(n_x, m, T_x)``;
torch's ``h0``/``c0`` are ``(1, m, n_a)``, the notebook's ``a0``/``c0`` are ``(n_a, m)``.

The notebook's output layer ``softmax(Wy a + by)`` has no counterpart inside ``nn.LSTM``; it
corresponds to an ``nn.Linear(n_a, n_y)`` with ``weight = Wy`` and ``bias = by[:, 0]``
followed by a softmax over classes.

torch is imported only inside these functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .._lib.checks import positive_int
from .._lib.compat import (
    device_scope,
    namespace,
    namespace_of_module,
    resolve_dtype,
    to_host,
)
from .._lib.torch_arrays import host_float as _host_float
from .._lib.typing import Array, Params
from ..cells.lstm import LSTM_CELL
from .params import PARAM_KEYS, check_params, param_arrays

__all__ = ["to_torch_lstm_weights", "from_torch_lstm_weights"]

_KEYS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def to_torch_lstm_weights(params: Params, *, device: Any = None) -> dict[str, Any]:
    """Convert the notebook's gate parameters into a ``torch.nn.LSTM`` state dict.

    The result loads into a single-layer, unidirectional ``torch.nn.LSTM(n_x, n_a)``
    (``bias=True``, ``proj_size=0``) with ``module.load_state_dict(...)``. Gate order: torch's
    ``i, f, g, o`` row blocks are the notebook's ``i, f, c, o``. Each seed ``W*`` is split into
    its recurrent columns ``W*[:, :n_a]`` (torch ``weight_hh_l0``) and its input columns
    ``W*[:, n_a:]`` (torch ``weight_ih_l0``). The whole seed bias goes into
    ``bias_ih_l0`` and ``bias_hh_l0`` is zero, so that their sum is the notebook's bias.
    ``Wy``/``by`` are not part of an ``nn.LSTM`` and are ignored (see the module notes).

    Parameters
    ----------
    params : dict of arrays
        ``Wf, bf, Wi, bi, Wc, bc, Wo, bo`` in any supported namespace, float32 or float64.
    device : torch.device or str, optional
        Device of the returned tensors. Default: the parameters' device when they are
        torch tensors, else the CPU.

    Returns
    -------
    dict of torch.Tensor
        ``weight_ih_l0`` ``(4 n_a, n_x)``, ``weight_hh_l0`` ``(4 n_a, n_a)``,
        ``bias_ih_l0`` ``(4 n_a,)`` and ``bias_hh_l0`` ``(4 n_a,)``, in the parameters'
        dtype. The tensors are new: they share no memory with ``params``.

    Raises
    ------
    ImportError
        If torch is not installed.
    KeyError, TypeError, ValueError
        For a missing parameter, mixed namespaces or dtypes, or inconsistent shapes.

    See Also
    --------
    from_torch_lstm_weights

    Examples
    --------
    >>> import torch
    >>> import numpy as np
    >>> import xlstm
    >>> params = xlstm.init_params(3, 5, 2, seed=0)  # n_x, n_a, n_y; float64
    >>> lstm = torch.nn.LSTM(3, 5, dtype=torch.float64)
    >>> lstm.load_state_dict(xlstm.to_torch_lstm_weights(params))
    <All keys matched successfully>
    >>> x = np.random.default_rng(0).standard_normal((3, 4, 7))  # (n_x, m, T_x)
    >>> h = lstm(torch.from_numpy(x.transpose(2, 1, 0)))[0]  # torch's (T_x, m, n_a)
    >>> a = xlstm.lstm_forward(x, np.zeros((5, 4)), params)[0]
    >>> bool(np.allclose(h.detach().numpy().transpose(2, 1, 0), a))
    True
    """
    import numpy as np
    import torch

    n_a, _, _ = check_params(params, need_output=False)
    namespace(**param_arrays(params, need_output=False))
    host = {k: to_host(params[k]) for k in PARAM_KEYS[:8]}
    host.update((k, np.zeros((n_a, 1), dtype=host["bf"].dtype)) for k in LSTM_CELL.hidden_bias_keys)
    w_ih, w_hh, b, b_hh = LSTM_CELL.to_torch_arrays(host)  # the cell's torch layout
    if device is None:
        first = params["Wf"]
        device = first.device if isinstance(first, torch.Tensor) else "cpu"

    def tensor(a):
        return torch.from_numpy(np.array(a, copy=True, order="C")).to(device)

    return {
        "weight_ih_l0": tensor(w_ih),
        "weight_hh_l0": tensor(w_hh),
        "bias_ih_l0": tensor(b),
        "bias_hh_l0": tensor(b_hh),
    }


def _state_dict_of(obj):
    """The LSTM weights of a module or a state dict; refuses layouts the seed cannot hold."""
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        mode = getattr(obj, "mode", "LSTM")
        if mode != "LSTM":
            raise ValueError(f"expected a torch.nn.LSTM, got a module of mode {mode!r}")
        if getattr(obj, "num_layers", 1) != 1:
            raise ValueError(
                f"only a single-layer LSTM converts to the notebook's parameters; this one has "
                f"num_layers={obj.num_layers} (convert each layer's weights separately)"
            )
        if getattr(obj, "bidirectional", False):
            raise ValueError("only a unidirectional LSTM converts; this one is bidirectional")
        if getattr(obj, "proj_size", 0):
            raise ValueError(
                f"an LSTM with projections (proj_size={obj.proj_size}) has no seed equivalent"
            )
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(
            "expected a torch.nn.LSTM or its state dict, got " + type(obj).__name__
        )
    for key in obj:
        if key in _KEYS:
            continue
        if re.search(r"_l[1-9]\d*", str(key)):
            raise ValueError(
                f"state dict has {key!r}: a multi-layer LSTM does not convert to the notebook's "
                "parameters (only single-layer)"
            )
        if "_reverse" in str(key):
            raise ValueError(
                f"state dict has {key!r}: a bidirectional LSTM does not convert to the notebook's "
                "parameters (only unidirectional)"
            )
        if "weight_hr" in str(key):
            raise ValueError(
                f"state dict has {key!r}: an LSTM with projections does not convert"
            )
        raise ValueError(
            f"unexpected key {key!r}; expected the state dict of a torch.nn.LSTM with keys "
            f"{', '.join(_KEYS)}"
        )
    for key in _KEYS[:2]:
        if key not in obj:
            raise KeyError(f"LSTM state dict is missing {key!r}")
    return obj


def from_torch_lstm_weights(
    state_dict_or_module: Any, *, n_y: int | None = None, Wy: Array | None = None,
    by: Array | None = None, xp: Any = None, device: Any = None, dtype: Any = None,
) -> dict[str, Array]:
    """Convert ``torch.nn.LSTM`` weights into the notebook's parameter dict.

    Gate order: torch's ``i, f, g, o`` row blocks become the notebook's ``Wi, Wf, Wc, Wo``
    (``g`` is the candidate ``c``). Each seed weight is ``[weight_hh | weight_ih]`` of its
    gate, acting on ``[a_prev; x_t]``, and each seed bias is ``bias_ih + bias_hh`` of its
    gate (a missing bias, as in ``nn.LSTM(..., bias=False)``, counts as zero).

    ``nn.LSTM`` has no output layer, so ``Wy``/``by`` come from the arguments:

    * ``Wy`` given (for example an ``nn.Linear(n_a, n_y)``'s ``weight``): it is used, and
      ``by`` too (its ``bias``, shape ``(n_y,)`` or ``(n_y, 1)``), or zeros when ``by`` is
      None;
    * else ``n_y`` given: ``Wy`` and ``by`` are zeros, so every prediction is uniform
      until they are trained;
    * else a ValueError, since ``lstm_forward`` needs an output layer.

    Parameters
    ----------
    state_dict_or_module : torch.nn.LSTM or dict
        A single-layer unidirectional ``nn.LSTM`` without projections (``batch_first``
        either way), or its state dict (``weight_ih_l0``, ``weight_hh_l0`` and optionally
        ``bias_ih_l0``, ``bias_hh_l0``; torch tensors or any other arrays).
    n_y : int, optional
        Number of output classes for a zero output layer.
    Wy : array, optional
        Output weight ``(n_y, n_a)``, any namespace.
    by : array, optional
        Output bias ``(n_y,)`` or ``(n_y, 1)``; needs ``Wy``.
    xp : namespace, optional
        Target namespace (numpy, torch, cupy, ``jax.numpy``, array_api_strict, or their
        array-api-compat wrappers). Default: numpy.
    device : device, optional
        Target device in ``xp``. Default: the namespace's default device.
    dtype : dtype or str, optional
        Target real floating dtype of ``xp``, as a dtype object or a name such as
        ``"float32"``. Default: the LSTM weights' dtype (float32 for a half-precision
        LSTM).

    Returns
    -------
    dict
        ``Wf, bf, Wi, bi, Wc, bc, Wo, bo, Wy, by`` as ``xp`` arrays on ``device``.

    Raises
    ------
    ValueError
        For a multi-layer, bidirectional or projected LSTM, a module that is not an LSTM,
        unexpected keys, inconsistent shapes, or no way to build the output layer.
    KeyError
        If a weight is missing from the state dict.
    TypeError
        For non-floating weights, a ``dtype`` that is not a real floating dtype of ``xp``
        (integer weights would all be zero), or an unsupported argument type.

    See Also
    --------
    to_torch_lstm_weights

    Examples
    --------
    >>> import torch
    >>> import xlstm
    >>> lstm = torch.nn.LSTM(3, 5)  # n_x=3, n_a=5, float32
    >>> params = xlstm.from_torch_lstm_weights(lstm, n_y=2)  # a zero output layer
    >>> params["Wf"].shape, params["Wy"].shape, params["Wf"].dtype
    ((5, 8), (2, 5), dtype('float32'))
    >>> back = xlstm.to_torch_lstm_weights(params)
    >>> bool(torch.equal(back["weight_ih_l0"], lstm.weight_ih_l0.detach()))
    True
    """
    import numpy as np

    sd = _state_dict_of(state_dict_or_module)
    w_ih = _host_float("weight_ih_l0", sd["weight_ih_l0"])
    w_hh = _host_float("weight_hh_l0", sd["weight_hh_l0"])
    if w_hh.ndim != 2 or w_hh.shape[0] != 4 * w_hh.shape[1] or w_hh.shape[1] < 1:
        raise ValueError(f"weight_hh_l0 must have shape (4 n_a, n_a), got {w_hh.shape}")
    n_a = w_hh.shape[1]
    if w_ih.ndim != 2 or w_ih.shape[0] != 4 * n_a or w_ih.shape[1] < 1:
        raise ValueError(
            f"weight_ih_l0 must have shape (4 n_a, n_x) = ({4 * n_a}, n_x), got {w_ih.shape}"
        )
    src = np.result_type(w_ih, w_hh)
    b = np.zeros(4 * n_a, dtype=src)
    for key in _KEYS[2:]:
        if key in sd:
            bk = _host_float(key, sd[key])
            if bk.shape != (4 * n_a,):
                raise ValueError(f"{key} must have shape ({4 * n_a},), got {bk.shape}")
            b = b + bk

    # output layer
    if Wy is None:
        if by is not None:
            raise ValueError("by needs Wy; pass both, or n_y alone for a zero output layer")
        if n_y is None:
            raise ValueError(
                "torch.nn.LSTM has no output layer: pass n_y for a zero (n_y, n_a) Wy and "
                "zero by, or Wy (and by), e.g. an nn.Linear(n_a, n_y)'s weight and bias"
            )
        n_y = positive_int("n_y", n_y)
        wy = np.zeros((n_y, n_a), dtype=src)
        bias_y = np.zeros((n_y, 1), dtype=src)
    else:
        wy = _host_float("Wy", Wy)
        if wy.ndim != 2 or wy.shape[1] != n_a:
            raise ValueError(f"Wy must have shape (n_y, n_a) with n_a={n_a}, got {wy.shape}")
        if n_y is not None and positive_int("n_y", n_y) != wy.shape[0]:
            raise ValueError(f"n_y={n_y!r} disagrees with Wy's shape {wy.shape}")
        n_y = wy.shape[0]
        if by is None:
            bias_y = np.zeros((n_y, 1), dtype=src)
        else:
            bias_y = _host_float("by", by)
            if bias_y.shape not in ((n_y,), (n_y, 1)):
                raise ValueError(
                    f"by must have shape ({n_y},) or ({n_y}, 1), got {bias_y.shape}"
                )
            bias_y = bias_y.reshape(n_y, 1)

    host = {}
    # the cell's torch layout, with the summed bias as the input-side one
    host = LSTM_CELL.from_torch_arrays(w_ih, w_hh, b, np.zeros_like(b))
    host["Wy"] = np.array(wy, copy=True)  # never alias the caller's (or a module's) memory
    host["by"] = np.array(bias_y, copy=True)

    target = namespace_of_module(xp)
    dtype = resolve_dtype(target, np.dtype(src).name if dtype is None else dtype)
    with device_scope(xp=target, device=device):
        return {k: target.asarray(host[k], dtype=dtype, device=device) for k in PARAM_KEYS}
