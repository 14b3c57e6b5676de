"""sigmoid and softmax: values, stability at the extremes, dtype/device kept."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_array, assert_close, to_numpy, to_xp

import xlstm


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_sigmoid_values_and_limits(xp, device, dtype_name):
    dtype = getattr(xp, dtype_name)
    v = np.array([-1e4, -710.0, -30.0, -1.5, 0.0, 0.25, 3.0, 30.0, 710.0, 1e4])
    out = xlstm.sigmoid(to_xp(v, xp, device, dtype))
    assert_array(out, xp=xp, device=device, shape=v.shape, dtype=dtype)
    got = to_numpy(out)
    assert got[0] == 0.0 and got[1] == 0.0 and got[-1] == 1.0 and got[-2] == 1.0
    assert got[4] == 0.5
    with np.errstate(over="ignore"):
        want = 1.0 / (1.0 + np.exp(-v))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15 if dtype_name == "float64" else 1e-7)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_softmax_stable_and_normalised(xp, device, dtype_name):
    dtype = getattr(xp, dtype_name)
    v = np.array([[1e4, -1e4, 0.0, 1.0], [-1e4, 1e4, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    out = xlstm.softmax(to_xp(v, xp, device, dtype))
    assert_array(out, xp=xp, device=device, shape=v.shape, dtype=dtype)
    got = to_numpy(out)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[:, 0], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(got[:, 1], [0.0, 1.0, 0.0])
    e = np.exp(v[:, 3] - v[:, 3].max())
    tol = 1e-15 if dtype_name == "float64" else 1e-7
    np.testing.assert_allclose(got[:, 3], e / e.sum(), rtol=0, atol=tol)
    assert_close(xp.sum(out, axis=0), np.ones(4), xp=xp, device=device, dtype=dtype)


def test_softmax_axis_and_errors():
    v = np.random.default_rng(0).standard_normal((3, 5))
    np.testing.assert_allclose(xlstm.softmax(v, axis=1), xlstm.softmax(v.T).T, rtol=1e-15)
    with pytest.raises(ValueError, match="axis 2"):
        xlstm.softmax(v, axis=2)
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        xlstm.sigmoid(np.arange(3))
