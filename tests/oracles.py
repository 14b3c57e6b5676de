"""The test suite's oracles, written once.

* :func:`random_case` draws an LSTM case (``x``, ``a0``, ``c0`` and the ten parameters of the
  notebook) on the host.
"""

from __future__ import annotations

from collections.abc import Mapping
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
