"""What both demos do alike: the backend and dtype, count checks, random streams, printing."""

from __future__ import annotations

import numpy as np

from .._compat import load_backend


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
