"""init_params: the documented initialisation, the same numbers on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_array, to_numpy
from xlstm.params import PARAM_KEYS

import xlstm

N_X, N_A, N_Y = 5, 6, 3


def test_initialisation_follows_the_docstring():
    p = xlstm.init_params(N_X, N_A, N_Y, seed=3)
    assert list(p) == list(PARAM_KEYS)
    glorot_gate = np.sqrt(6.0 / (N_A + N_X))
    for g in "fico":
        W = p["W" + g]
        assert W.shape == (N_A, N_A + N_X) and W.dtype == np.float64
        recurrent, inputs = W[:, :N_A], W[:, N_A:]
        np.testing.assert_allclose(recurrent.T @ recurrent, np.eye(N_A), atol=1e-12)
        assert np.all(np.abs(inputs) <= glorot_gate) and np.std(inputs) > 0.1 * glorot_gate
        np.testing.assert_array_equal(p["b" + g], np.full((N_A, 1), 1.0 if g == "f" else 0.0))
    assert np.all(np.abs(p["Wy"]) <= np.sqrt(6.0 / (N_Y + N_A)))
    np.testing.assert_array_equal(p["by"], np.zeros((N_Y, 1)))
    # different gates get different draws, and the seed decides everything
    assert not np.array_equal(p["Wf"], p["Wi"])
    again = xlstm.init_params(N_X, N_A, N_Y, seed=3)
    other = xlstm.init_params(N_X, N_A, N_Y, seed=4)
    assert all(np.array_equal(p[k], again[k]) for k in p)
    assert not np.array_equal(p["Wf"], other["Wf"])


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_same_seed_same_numbers_on_every_backend(xp, device, dtype_name):
    dtype = getattr(xp, dtype_name)
    p = xlstm.init_params(N_X, N_A, N_Y, xp=xp, dtype=dtype, device=device, seed=11)
    ref = xlstm.init_params(N_X, N_A, N_Y, seed=11)
    for k, v in p.items():
        assert_array(v, xp=xp, device=device, shape=ref[k].shape, dtype=dtype)
        np.testing.assert_array_equal(to_numpy(v), ref[k].astype(dtype_name), err_msg=k)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_a must be a positive int"):
        xlstm.init_params(3, 0, 2)
    with pytest.raises(TypeError, match="n_x must be a positive int"):
        xlstm.init_params(2.5, 3, 2)
    with pytest.raises(TypeError, match="n_y must be a positive int"):
        xlstm.init_params(3, 4, True)
    with pytest.raises(TypeError, match="dtype must be a real floating dtype"):
        xlstm.init_params(3, 4, 2, dtype=np.int32)
    with pytest.raises(TypeError, match="xp must be an array namespace"):
        xlstm.init_params(3, 4, 2, xp=object())


def test_numpy_integer_sizes_and_dtype_names(xp, device):
    """numpy integer scalars are sizes; a dtype may be given by name; both give the same
    parameters as plain ints and dtype objects."""
    ref = xlstm.init_params(N_X, N_A, N_Y, xp=xp, dtype=xp.float32, device=device, seed=5)
    got = xlstm.init_params(np.int64(N_X), np.int32(N_A), np.uint8(N_Y), xp=xp,
                            dtype="float32", device=device, seed=5)
    for k, v in got.items():
        assert_array(v, xp=xp, device=device, shape=ref[k].shape, dtype=xp.float32)
        np.testing.assert_array_equal(to_numpy(v), to_numpy(ref[k]), err_msg=k)


@pytest.mark.parametrize("bad", ["int32", "float", "complex64", "int8"])
def test_non_floating_dtypes_are_type_errors(xp, device, bad):
    """Integer weights would all round to zero: every non-floating dtype is refused, by
    name or as the namespace's own dtype object."""
    with pytest.raises(TypeError, match="dtype must be a real floating dtype"):
        xlstm.init_params(3, 4, 2, xp=xp, dtype=bad, device=device)
    native = getattr(xp, bad, None)
    if native is not None and bad != "float":
        with pytest.raises(TypeError, match="dtype must be a real floating dtype"):
            xlstm.init_params(3, 4, 2, xp=xp, dtype=native, device=device)
