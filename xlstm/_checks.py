"""Argument checks shared by the public functions: sizes, counts, shapes and keys."""

from __future__ import annotations

import operator
from collections.abc import Mapping

__all__ = ["positive_int", "check_shape", "check_da", "require_mapping_keys"]


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
