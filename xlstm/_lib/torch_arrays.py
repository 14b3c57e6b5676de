"""Arrays from torch, as the conversions of the notebook's parameters and of the model
classes read them: host float32/float64 numpy arrays, never a tensor without values.

torch is imported only inside these functions.
"""

from __future__ import annotations

from .compat import to_host

__all__ = ["refuse_meta", "host_float"]


def refuse_meta(name, value):
    """Raise ValueError if ``value`` is a tensor on torch's ``"meta"`` device."""
    if getattr(value, "is_meta", False):
        raise ValueError(
            f"{name} is a tensor on torch's 'meta' device, which has a shape but no values: "
            "give the module its weights first (module.to_empty(device='cpu'), then "
            "module.load_state_dict(...)), or build it on a real device"
        )


def host_float(name, value):
    """``value`` (any array, torch tensors included) as a float32/float64 numpy array."""
    try:
        import torch
    except ImportError:  # pragma: no cover - numpy inputs still work without torch
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.detach().to(torch.float32)  # half/bfloat16 have no exact numpy twin
    refuse_meta(name, value)
    arr = to_host(value)
    if arr.dtype.kind != "f" or arr.dtype.name not in ("float32", "float64"):
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {arr.dtype}")
    return arr
