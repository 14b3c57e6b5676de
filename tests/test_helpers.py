"""The suite's own tools: the assertion checks the dtype unless told not to; the oracles."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_array, assert_close, to_xp
from oracles import Case, central_differences, random_case, torch_lstm_forward

import xlstm


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


# ---------------------------------------------------------------------------- oracles
def test_random_case_shapes_dtypes_and_draws():
    case = random_case(4, n_x=3, n_a=5, n_y=2, m=6, T=7)
    assert case.x.shape == (3, 6, 7) and case.a0.shape == case.c0.shape == (5, 6)
    assert list(case.params) == list(xlstm.params.PARAM_KEYS)
    assert xlstm.params.check_params(case.params) == (5, 3, 2)
    again = random_case(np.random.default_rng(4), n_x=3, n_a=5, n_y=2, m=6, T=7)
    for k, v in case.arrays().items():
        np.testing.assert_array_equal(again.arrays()[k], v, err_msg=k)
        assert v.dtype == np.float64
    f32 = random_case(4, n_x=3, n_a=5, n_y=2, m=6, T=7, scale=2.0, x_scale=3.0,
                      state_scale=0.0, dtype=np.float32)
    for k, v in f32.arrays().items():
        assert v.dtype == np.float32, k
    np.testing.assert_allclose(f32.params["Wo"], 4.0 * case.params["Wo"], rtol=1e-6)
    np.testing.assert_allclose(f32.x, 3.0 * case.x, rtol=1e-6)
    assert not np.any(f32.a0) and not np.any(f32.c0)
    assert Case.of({**case.arrays(), "extra": 1}) == tuple(case)


def test_central_differences_of_a_known_function():
    rng = np.random.default_rng(0)
    arrays = {"u": rng.standard_normal((2, 3)), "v": rng.standard_normal(3)}
    before = {k: v.copy() for k, v in arrays.items()}

    def f(d):
        return float(np.sum(np.sin(d["u"]) * d["v"]) + np.sum(d["v"] ** 3))

    got = central_differences(f, arrays)
    assert list(got) == ["u", "v"]
    np.testing.assert_allclose(got["u"], np.cos(arrays["u"]) * arrays["v"], rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(got["v"], np.sin(arrays["u"]).sum(0) + 3 * arrays["v"] ** 2,
                               rtol=1e-8, atol=1e-9)
    for k, v in before.items():
        np.testing.assert_array_equal(arrays[k], v, err_msg=k)
    with pytest.raises(TypeError, match="arrays\\['u'\\] must be a float64"):
        central_differences(f, {**arrays, "u": arrays["u"].astype(np.float32)})


def test_torch_reference_is_the_forward_pass():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    case = random_case(1, n_x=2, n_a=3, n_y=4, m=2, T=5)
    ref = torch_lstm_forward(torch, case.arrays())
    a, y, c, _ = xlstm.lstm_forward(case.x, case.a0, case.params, c0=case.c0,
                                    return_caches=False)
    for mine, theirs in ((a, ref.a), (y, ref.y), (c, ref.c)):
        np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert ref.grads() == {}  # no backward pass yet
    ref.logits[:, :, -1].sum().backward()
    assert set(ref.grads()) == {"d" + k for k in case.arrays()}
