"""Conversions between the model classes and their ``torch.nn`` modules.

:func:`model_from_torch` and :func:`model_to_torch` are the bodies of ``from_torch`` and
``to_torch`` of :class:`~xlstm.LSTM`, :class:`~xlstm.GRU` and :class:`~xlstm.RNN`: they carry
the sizes, ``num_layers``, ``bidirectional``, ``dropout``, ``batch_first`` (as
``layout="batch_first"``) and every weight, and accept subclasses of the torch modules.

torch is imported only inside these functions.
"""

from __future__ import annotations

from typing import Any

from .._lib.compat import to_host
from .._lib.torch_arrays import host_float, refuse_meta

__all__ = ["model_from_torch", "model_to_torch"]


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
        (not ``"meta"``); an LSTM's ``proj_size`` is carried over.
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
        For a ``dropout`` outside ``[0, 1)``, or weights on the
        ``"meta"`` device.
    """
    import numpy as np

    cls._need_torch_module()
    import torch

    kind = getattr(torch.nn, cls.torch_name)
    if not isinstance(module, kind):
        raise TypeError(f"module must be a torch.nn.{cls.torch_name} (or a subclass), got "
                        f"{type(module).__module__}.{type(module).__name__}")
    dropout = float(module.dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"module has dropout={module.dropout!r}; models here take dropout in "
                         "[0, 1): set module.dropout below 1 before converting")
    sd = module.state_dict()
    for key, value in sd.items():  # before the model of the module's size is built
        refuse_meta(key, value)
    if dtype is None:
        dtype = "float64" if sd["weight_ih_l0"].dtype == torch.float64 else "float32"
    model = cls(module.input_size, module.hidden_size, num_layers=module.num_layers,
                bidirectional=module.bidirectional, dropout=dropout,
                layout="batch_first" if module.batch_first else "notebook",
                xp=xp, dtype=dtype, device=device, **cls._torch_kwargs(module))

    def host(key, rows):
        if key not in sd:  # bias=False
            return np.zeros(rows)
        return host_float(key, sd[key])

    layers = []
    for layer in range(model.num_layers):
        for d in range(model.D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = host("weight_ih" + sfx, None), host("weight_hh" + sfx, None)
            rows = w_hh.shape[0]
            arrays = model.cell.from_torch_arrays(
                w_ih, w_hh, host("bias_ih" + sfx, rows), host("bias_hh" + sfx, rows))
            if getattr(module, "proj_size", 0):  # the LSTM's projection
                arrays["Whr"] = host("weight_hr" + sfx, None)
            layers.append(arrays)
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
        proj = layer.get("Whr")  # the LSTM's projection
        if proj is None:
            arrays = model.cell.to_torch_arrays(layer)
        else:
            arrays = (*model.cell.to_torch_arrays(layer, proj.shape[0]), proj)
        for key, arr in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"),
                            arrays):
            sd[key + sfx] = torch.from_numpy(np.array(arr, copy=True, order="C"))
    mod.load_state_dict(sd)
    return mod
