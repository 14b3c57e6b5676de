"""Argument checks shared by the public functions: sizes, counts, shapes and keys."""

from __future__ import annotations

import numbers
import operator
from collections.abc import Mapping

import numpy as np

__all__ = ["positive_int", "seed_value", "check_shape", "check_da", "require_mapping_keys"]


def positive_int(name: str, value, *, low: int = 1) -> int:
    """``value`` as a Python int after checking it is an integer ``>= low``.

    Any integer type counts (``numpy.int64(4)`` as well as ``4``); ``bool`` does not, and
    neither do floats, even integral ones.

    Raises
    ------
    TypeError
        If ``value`` is not an integer; the message names the argument.
    ValueError
        If it is smaller than ``low``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {_what(low)}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {_what(low)}, got {value!r}") from None
    if v < low:
        raise ValueError(f"{name} must be {_what(low)}, got {value!r}")
    return v


def seed_value(name: str, seed, *, generator: bool):
    """``seed`` for numpy's ``default_rng``, checked: ``None``, an int ``>= 0`` of any integer
    type (not a bool), returned as a Python int, or with ``generator`` a numpy
    ``Generator``, returned as it is.

    Raises
    ------
    TypeError
        If ``seed`` is none of these (a float, a bool); the message names ``name`` and says
        the fix.
    ValueError
        If it is a negative int.
    """
    if seed is None or (generator and isinstance(seed, np.random.Generator)):
        return seed
    what = "an int >= 0" + (", a numpy Generator" if generator else "") + " or None"
    try:
        if isinstance(seed, (bool, np.bool_)):
            raise TypeError
        value = operator.index(seed)
    except TypeError:
        example = int(seed) if isinstance(seed, numbers.Real) and np.isfinite(seed) \
            and seed >= 0 else 0
        raise TypeError(f"{name} must be {what}, got {seed!r}; pass an int such as "
                        f"{name}={example}") from None
    if value < 0:
        raise ValueError(f"{name} must be {what}, got {value}: numpy's generators take no "
                         f"negative seeds; pass an int >= 0 such as {name}={-value}")
    return value


def _what(low):
    return "a positive int" if low == 1 else f"an int >= {low}"


def check_shape(name: str, arr, expected: tuple, what: str) -> None:
    """Raise ValueError naming ``name`` unless ``arr.shape`` matches ``expected``.

    ``expected`` holds ints or ``None`` (any size); ``what`` names each axis, as in
    ``"(n_a, m)"``. Every dimension must also be at least 1.
    """
    if arr.ndim != len(expected):
        raise ValueError(
            f"{name} must be {len(expected)}-D {what}, got shape {tuple(arr.shape)}"
        )
    labels = what.strip("()").split(", ")
    for axis, (want, got, label) in enumerate(zip(expected, arr.shape, labels)):
        if want is not None and got != want:
            raise ValueError(
                f"{name} has {label}={got} (axis {axis}) but {want} is expected from the "
                f"other arguments; {name}.shape is {tuple(arr.shape)}, expected {what}"
            )
        if got < 1:
            raise ValueError(f"{name} has {label}=0; every dimension must be at least 1")


def check_da(da, n_a: int, m: int, T_x: int) -> None:
    """The upstream gradient of a sequence's hidden states: ``(n_a, m, T_da)``, ``T_da <= T_x``."""
    check_shape("da", da, (n_a, m, None), "(n_a, m, T_da)")
    if da.shape[2] > T_x:
        raise ValueError(
            f"da covers T_da={da.shape[2]} steps but the forward pass ran T_x={T_x}; "
            "need T_da <= T_x"
        )


def require_mapping_keys(params, keys: tuple, *, name: str = "params") -> None:
    """Raise ``TypeError`` unless ``params`` is a mapping, ``KeyError`` naming a missing key."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{name} must be a dict of arrays, got {type(params).__name__}")
    for key in keys:
        if key not in params:
            raise KeyError(f"{name} is missing {key!r} (needs {', '.join(keys)})")
