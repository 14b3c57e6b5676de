"""Stacked, bidirectional and batch-first models beyond the conformance suite: dropout
between layers, chunked runs against whole ones, and the layouts against each other."""

from __future__ import annotations

import numpy as np
import pytest
from oracles import central_differences

import xlstm

N_X, N_A, M, T = 3, 4, 2, 6
CLASSES = [xlstm.LSTM, xlstm.GRU, xlstm.RNN]


def _inputs(seed=0, D=1, layers=2, n_s=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_X, M, T))
    dy = rng.standard_normal((D * N_A, M, T))
    state = tuple(0.5 * rng.standard_normal((layers * D, N_A, M)) for _ in range(n_s))
    return x, dy, state


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_dropout_is_reproducible_off_without_train_and_needs_a_seed(cls):
    model = cls(N_X, N_A, num_layers=3, dropout=0.5, seed=1)
    plain = cls(N_X, N_A, num_layers=3, seed=1)
    x, _, _ = _inputs()
    y1, _, _ = model.forward(x, train=True, seed=7)
    y2, _, _ = model.forward(x, train=True, seed=7)
    y3, _, _ = model.forward(x, train=True, seed=8)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(y1, y3)
    y_eval, _, _ = model.forward(x)
    np.testing.assert_array_equal(y_eval, plain.forward(x)[0])
    assert not np.array_equal(y1, y_eval)
    with pytest.raises(ValueError, match="seed is required"):
        model.forward(x, train=True)
    # no mask is drawn where none applies: one layer, or no dropout
    np.testing.assert_array_equal(cls(N_X, N_A, dropout=0.5, seed=1).forward(x, train=True)[0],
                                  cls(N_X, N_A, seed=1).forward(x)[0])


def test_dropout_masks_keep_the_expected_fraction_scaled():
    model = xlstm.LSTM(N_X, N_A, num_layers=2, dropout=0.25, bidirectional=True)
    x = np.zeros((N_X, 50, 40))
    masks = model._masks(3, 50, 40, model.xp, x)
    (mask,) = masks
    assert mask.shape == (2 * N_A, 50, 40) and mask.dtype == x.dtype
    assert set(np.unique(mask)) == {0.0, 1 / 0.75}
    assert abs(np.mean(mask == 0) - 0.25) < 0.02  # 16000 draws: 5 sigma is 0.017


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_dropout_gradient_is_right(cls):
    """With the masks fixed by the seed, dropout is a linear map: its gradient is checked
    against central differences of the whole stacked, bidirectional model."""
    model = cls(N_X, N_A, num_layers=2, bidirectional=True, dropout=0.4, seed=2)
    n_s = len(model.cell.state_names)
    x, dy, _ = _inputs(3, D=2, n_s=n_s)
    y, _, cache = model.forward(x, train=True, seed=11)
    dx, _, grads = model.backward(dy, cache)
    keys = [list(p) for p in model.params]

    def loss(arrs):
        params = [{k: arrs[f"{i}_{k}"] for k in ks} for i, ks in enumerate(keys)]
        y, _, _ = model.forward(arrs["x"], params=params, train=True, seed=11,
                                return_cache=False)
        return float(np.sum(y * dy))

    arrays = {"x": x, **{f"{i}_{k}": np.array(v) for i, p in enumerate(model.params)
                         for k, v in p.items()}}
    num = central_differences(loss, arrays)
    np.testing.assert_allclose(dx, num["x"], rtol=1e-6, atol=1e-8)
    for i, g in enumerate(grads):
        for k, v in g.items():
            np.testing.assert_allclose(v, num[f"{i}_{k}"], rtol=1e-6, atol=1e-8, err_msg=f"{i} {k}")


@pytest.mark.parametrize("accel", [True, False], ids=["accelerated", "array-path"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_chunks_with_the_state_carried_equal_one_call(cls, accel):
    """A stacked model run over two chunks, the state carried forward and its gradient
    carried back (truncated backpropagation made exact), equals one call bit for bit."""
    model = cls(N_X, N_A, num_layers=2, seed=4)
    n_s = len(model.cell.state_names)
    x, dy, state = _inputs(5, n_s=n_s)
    with xlstm.accelerators(accel):
        y, final, cache = model.forward(x, state)
        dx, d0, grads = model.backward(dy, cache)
        k = 2
        y1, s1, c1 = model.forward(x[..., :k], state)
        y2, s2, c2 = model.forward(x[..., k:], s1)
        dx2, ds1, g2 = model.backward(dy[..., k:], c2)
        dx1, d01, g1 = model.backward(dy[..., :k], c1, ds1)
    np.testing.assert_array_equal(np.concatenate([y1, y2], axis=-1), y)
    for a, b in zip(s2, final):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.concatenate([dx1, dx2], axis=-1), dx)
    for a, b in zip(d01, d0):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    for ga, gb, g in zip(g1, g2, grads):
        for key in g:
            np.testing.assert_allclose(ga[key] + gb[key], g[key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_batch_first_is_the_notebook_layout_transposed(cls):
    nb = cls(N_X, N_A, num_layers=2, bidirectional=True, seed=6)
    bf = cls(N_X, N_A, num_layers=2, bidirectional=True, seed=6, layout="batch_first")
    n_s = len(nb.cell.state_names)
    x, dy, state = _inputs(7, D=2, n_s=n_s)
    y, s, c = nb.forward(x, state)
    yb, sb, cb = bf.forward(x.transpose(1, 2, 0), state)
    np.testing.assert_array_equal(yb, y.transpose(1, 2, 0))
    for a, b in zip(s, sb):
        np.testing.assert_array_equal(a, b)
    dx, d0, g = nb.backward(dy, c)
    dxb, d0b, gb = bf.backward(dy.transpose(1, 2, 0), cb)
    np.testing.assert_array_equal(dxb, dx.transpose(1, 2, 0))
    for la, lb in zip(g, gb):
        for k in la:
            np.testing.assert_array_equal(la[k], lb[k])
    with pytest.raises(ValueError, match=r"x must have shape \(m, T, n_x\)"):
        bf.forward(x)
    with pytest.raises(ValueError, match=r"dy must have the shape of y, \(m, T, D \* n_a\)"):
        bf.backward(dy, cb)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_the_final_state_is_each_sequence_own_last_step(cls):
    """With lengths, the last layer's forward final hidden state is its output at each
    sequence's own last step (what last-step regression reads), the outputs past the end
    are zero, and the reverse direction's output at step 0 is its final state."""
    model = cls(N_X, N_A, num_layers=2, bidirectional=True, seed=8)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((N_X, 4, T))
    lengths = np.array([3, T, 1, 4])
    y, state, _ = model.forward(x, lengths=lengths)
    a = state[0]
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(a[2, :, b], y[:N_A, b, n - 1])  # layer 1, forward
        np.testing.assert_array_equal(a[3, :, b], y[N_A:, b, 0])  # layer 1, reverse
        assert np.all(y[:, b, n:] == 0.0)


def test_narrow_integer_lengths_work_past_their_range():
    """uint8 lengths with T beyond 255 (and m T beyond it): the same as int64 lengths."""
    model = xlstm.GRU(2, 3, bidirectional=True, seed=1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 300))
    lengths = np.array([255, 7, 200])
    y, s, _ = model.forward(x, lengths=lengths)
    y8, s8, _ = model.forward(x, lengths=lengths.astype(np.uint8))
    np.testing.assert_array_equal(y8, y)
    np.testing.assert_array_equal(s8[0], s[0])
