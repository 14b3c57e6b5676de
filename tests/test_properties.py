"""Hypothesis properties on small bounded shapes: permutation, linearity, T_x = 1."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import random_case

import xlstm

shapes = st.tuples(
    st.integers(1, 4),  # n_x
    st.integers(1, 4),  # n_a
    st.integers(1, 3),  # n_y
    st.integers(1, 4),  # m
    st.integers(1, 4),  # T_x
)
SETTINGS = settings(max_examples=30, deadline=None)


def make(seed, n_x, n_a, n_y, m, T):
    """The generator (to draw more from) and a random case: ``rng, x, a0, c0, params``."""
    rng = np.random.default_rng(seed)
    return (rng, *random_case(rng, n_x, n_a, n_y, m, T, scale=0.6, x_scale=1.2,
                              state_scale=0.6))


@SETTINGS
@given(shapes, st.integers(0, 2**32 - 1))
def test_permuting_the_batch_permutes_everything(dims, seed):
    rng, x, a0, c0, p = make(seed, *dims)
    perm = rng.permutation(dims[3])
    da = rng.uniform(-1, 1, (dims[1], dims[3], dims[4]))
    a, y, c, caches = xlstm.lstm_forward(x, a0, p, c0=c0)
    g = xlstm.lstm_backward(da, caches)
    ap, yp, cp, caches_p = xlstm.lstm_forward(x[:, perm], a0[:, perm], p, c0=c0[:, perm])
    gp = xlstm.lstm_backward(da[:, perm], caches_p)
    for mine, ref in ((ap, a), (yp, y), (cp, c), (gp["dx"], g["dx"]),
                      (gp["da0"], g["da0"]), (gp["dc0"], g["dc0"])):
        np.testing.assert_allclose(mine, ref[:, perm], rtol=1e-12, atol=1e-13)
    for k in ("dWf", "dbf", "dWi", "dbi", "dWc", "dbc", "dWo", "dbo"):  # sums over the batch
        np.testing.assert_allclose(gp[k], g[k], rtol=1e-10, atol=1e-12)


@SETTINGS
@given(shapes, st.integers(0, 2**32 - 1), st.floats(-3, 3), st.floats(-3, 3))
def test_backward_is_linear_in_da(dims, seed, alpha, beta):
    rng, x, a0, c0, p = make(seed, *dims)
    T_da = int(rng.integers(1, dims[4] + 1))
    da1 = rng.uniform(-1, 1, (dims[1], dims[3], T_da))
    da2 = rng.uniform(-1, 1, (dims[1], dims[3], T_da))
    *_, caches = xlstm.lstm_forward(x, a0, p, c0=c0)
    g1, g2 = xlstm.lstm_backward(da1, caches), xlstm.lstm_backward(da2, caches)
    g = xlstm.lstm_backward(alpha * da1 + beta * da2, caches)
    for k in g:
        want = alpha * g1[k] + beta * g2[k]
        scale = max(1.0, np.max(np.abs(alpha * g1[k])), np.max(np.abs(beta * g2[k])))
        np.testing.assert_allclose(g[k], want, rtol=0, atol=1e-12 * scale, err_msg=k)


@SETTINGS
@given(shapes, st.integers(0, 2**32 - 1))
def test_one_step_sequence_equals_the_cell(dims, seed):
    dims = (*dims[:4], 1)
    rng, x, a0, c0, p = make(seed, *dims)
    a, y, c, caches = xlstm.lstm_forward(x, a0, p, c0=c0)
    a1, c1, y1, cache = xlstm.lstm_cell_forward(x[:, :, 0], a0, c0, p)
    for mine, ref in ((a[:, :, 0], a1), (y[:, :, 0], y1), (c[:, :, 0], c1)):
        np.testing.assert_allclose(mine, ref, rtol=1e-13, atol=1e-15)
    da = rng.uniform(-1, 1, (dims[1], dims[3], 1))
    g = xlstm.lstm_backward(da, caches)
    gc = xlstm.lstm_cell_backward(da[:, :, 0], np.zeros_like(c0), cache)
    pairs = {"dx": "dxt", "da0": "da_prev", "dc0": "dc_prev"}
    for k in g:
        ref = gc[pairs.get(k, k)]
        np.testing.assert_allclose(g[k], ref[..., None] if k == "dx" else ref,
                                   rtol=1e-12, atol=1e-14, err_msg=k)
