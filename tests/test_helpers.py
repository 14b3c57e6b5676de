"""The suite's own assertion: it checks the dtype unless told why not."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_array, assert_close, to_xp


def test_assert_close_takes_the_dtype_of_an_expected_array_of_xp(xp, device):
    v = np.linspace(-1.0, 1.0, 6)
    f64, f32 = to_xp(v, xp, device), to_xp(v, xp, device, xp.float32)
    assert_close(f64, f64, xp=xp, device=device)
    assert_close(f32, f32, xp=xp, device=device)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(f32, f64, xp=xp, device=device, rtol=1e-6, atol=1e-7)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(f64, f32, xp=xp, device=device, rtol=1e-6, atol=1e-7)


def test_assert_close_needs_a_dtype_for_host_expectations(xp, device):
    v = np.linspace(-1.0, 1.0, 6)
    got = to_xp(v, xp, device, xp.float32)
    for host in ([0.0] * 6, 1.5):
        with pytest.raises(TypeError, match="dtype="):
            assert_close(got, host, xp=xp, device=device)
    if not isinstance(got, np.ndarray):  # numpy: a host array is an array of xp
        with pytest.raises(TypeError, match="dtype="):
            assert_close(got, v, xp=xp, device=device)
    assert_close(got, v, xp=xp, device=device, dtype=xp.float32)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(got, v, xp=xp, device=device, dtype=xp.float64, rtol=1e-6, atol=1e-7)
    assert_close(got, v, xp=xp, device=device, check_dtype=False)
    with pytest.raises(TypeError, match="not both"):
        assert_close(got, v, xp=xp, device=device, dtype=xp.float32, check_dtype=False)
    with pytest.raises(AssertionError):  # the values are still compared
        assert_close(got, v + 1e-3, xp=xp, device=device, dtype=xp.float32)


def test_assert_array_needs_a_dtype(xp, device):
    got = to_xp(np.ones((2, 3)), xp, device)
    assert_array(got, xp=xp, device=device, shape=(2, 3), dtype=xp.float64)
    with pytest.raises(TypeError, match="dtype="):
        assert_array(got, xp=xp, device=device, shape=(2, 3))
    with pytest.raises(AssertionError, match="dtype"):
        assert_array(got, xp=xp, device=device, dtype=xp.float32)
    assert_array(got, xp=xp, device=device, shape=(2, 3), check_dtype=False)
    with pytest.raises(AssertionError, match="shape"):
        assert_array(got, xp=xp, device=device, shape=(3, 2), check_dtype=False)
