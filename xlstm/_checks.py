"""Argument checks shared by the public functions: sizes and counts."""

from __future__ import annotations

import operator

__all__ = ["positive_int"]


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
