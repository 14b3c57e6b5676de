"""Conversions to and from torch: the notebook's parameter dict and ``torch.nn.LSTM``'s
weights, and the model classes and their ``torch.nn`` modules.

:func:`model_from_torch` and :func:`model_to_torch` are the bodies of ``from_torch`` and
``to_torch`` of :class:`~xlstm.LSTM`, :class:`~xlstm.GRU` and :class:`~xlstm.RNN`: they carry
the sizes, ``num_layers``, ``bidirectional``, ``dropout``, ``batch_first`` (as
``layout="batch_first"``) and every weight, and accept subclasses of the torch modules.

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


def _refuse_meta(name, value):
    """Raise ValueError if ``value`` is a tensor on torch's ``"meta"`` device."""
    if getattr(value, "is_meta", False):
        raise ValueError(
            f"{name} is a tensor on torch's 'meta' device, which has a shape but no values: "
            "give the module its weights first (module.to_empty(device='cpu'), then "
            "module.load_state_dict(...)), or build it on a real device"
        )


def _host_float(name, value):
    """``value`` (any array, torch tensors included) as a float32/float64 numpy array."""
    try:
        import torch
    except ImportError:  # pragma: no cover - numpy inputs still work without torch
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.detach().to(torch.float32)  # half/bfloat16 have no exact numpy twin
    _refuse_meta(name, value)
    arr = to_host(value)
    if arr.dtype.kind != "f" or arr.dtype.name not in ("float32", "float64"):
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {arr.dtype}")
    return arr


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


# ------------------------------------------------------------- model classes <-> torch.nn
def model_from_torch(cls: type, module: Any, *, xp: Any = None, dtype: Any = None,
                     device: Any = None) -> Any:
    """A model of class ``cls`` with the weights and configuration of a ``torch.nn`` module.

    The body of ``cls.from_torch`` (:meth:`xlstm.LSTM.from_torch` and its twins). Carried
    over: ``input_size``, ``hidden_size``, ``num_layers``, ``bidirectional``, ``dropout``,
    ``batch_first`` (as ``layout="batch_first"``, else ``"notebook"``), the RNN's
    ``nonlinearity`` and every weight; ``bias=False`` gives zero biases.

    Parameters
    ----------
    cls : type
        A model class with a torch twin (``cls.torch_name``, e.g. ``"LSTM"``).
    module : torch.nn.LSTM, torch.nn.GRU or torch.nn.RNN
        An instance of ``torch.nn.<cls.torch_name>`` or of a subclass, on any real device
        (not ``"meta"``), without projections (``proj_size=0``).
    xp, dtype, device : optional
        Target namespace (default numpy), dtype (default the module's: float64 for
        float64 weights, else float32) and device.

    Returns
    -------
    model
        A new ``cls`` whose parameters are copies of the module's weights.

    Raises
    ------
    TypeError
        If ``cls`` has no torch twin or ``module`` is not a ``torch.nn.<cls.torch_name>``.
    ValueError
        For a projected LSTM, a ``dropout`` outside ``[0, 1)``, or weights on the
        ``"meta"`` device.
    """
    import numpy as np

    cls._need_torch_module()
    import torch

    kind = getattr(torch.nn, cls.torch_name)
    if not isinstance(module, kind):
        raise TypeError(f"module must be a torch.nn.{cls.torch_name} (or a subclass), got "
                        f"{type(module).__module__}.{type(module).__name__}")
    if getattr(module, "proj_size", 0):
        raise ValueError(f"module has proj_size={module.proj_size}: projected LSTMs have no "
                         "equivalent here; convert an LSTM built with proj_size=0")
    dropout = float(module.dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"module has dropout={module.dropout!r}; models here take dropout in "
                         "[0, 1): set module.dropout below 1 before converting")
    sd = module.state_dict()
    for key, value in sd.items():  # before the model of the module's size is built
        _refuse_meta(key, value)
    if dtype is None:
        dtype = "float64" if sd["weight_ih_l0"].dtype == torch.float64 else "float32"
    model = cls(module.input_size, module.hidden_size, num_layers=module.num_layers,
                bidirectional=module.bidirectional, dropout=dropout,
                layout="batch_first" if module.batch_first else "notebook",
                xp=xp, dtype=dtype, device=device, **cls._torch_kwargs(module))

    def host(key, rows):
        if key not in sd:  # bias=False
            return np.zeros(rows)
        return _host_float(key, sd[key])

    layers = []
    for layer in range(model.num_layers):
        for d in range(model.D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = host("weight_ih" + sfx, None), host("weight_hh" + sfx, None)
            rows = w_hh.shape[0]
            layers.append(model.cell.from_torch_arrays(
                w_ih, w_hh, host("bias_ih" + sfx, rows), host("bias_hh" + sfx, rows)))
    model.params = cls._to_xp(layers, model.xp, model.dtype, device)
    return model


def model_to_torch(model: Any) -> Any:
    """The ``torch.nn`` module of the same kind as ``model``, with its weights and
    configuration.

    The body of ``model.to_torch()``. Carried over: the sizes, ``num_layers``,
    ``bidirectional``, ``dropout``, the layout (``layout="batch_first"`` gives
    ``batch_first=True``), the RNN's ``nonlinearity`` and every weight. torch warns, as it
    does for any such module, when ``dropout > 0`` with a single layer (dropout acts
    between layers only, here as in torch).

    Parameters
    ----------
    model : LSTM, GRU or RNN
        A model whose class has a torch twin.

    Returns
    -------
    torch.nn.Module
        A new module on the CPU, float64 for float64 parameters, else float32; its weights
        share no memory with the model's.

    Raises
    ------
    TypeError
        If the model's class has no torch twin.
    """
    import numpy as np

    model._need_torch_module()
    import torch

    host = [{k: to_host(v) for k, v in layer.items()} for layer in model.params]
    double = host[0][next(iter(host[0]))].dtype == np.float64
    mod = getattr(torch.nn, model.torch_name)(
        model.n_x, model.n_a, num_layers=model.num_layers, bidirectional=model.bidirectional,
        dropout=model.dropout, batch_first=model.layout == "batch_first",
        **model._torch_module_kwargs(),
    )
    mod = mod.to(torch.float64 if double else torch.float32)
    sd = {}
    for i, layer in enumerate(host):
        sfx = f"_l{i // model.D}" + ("_reverse" if i % model.D else "")
        for key, arr in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
                            model.cell.to_torch_arrays(layer)):
            sd[key + sfx] = torch.from_numpy(np.array(arr, copy=True, order="C"))
    mod.load_state_dict(sd)
    return mod
