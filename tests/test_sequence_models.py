"""Stacked, bidirectional and batch-first models beyond the conformance suite (which owns
chunked runs against whole ones, padded batches, layers and directions): dropout between
layers, and the layouts against each other."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers import assert_close
from oracles import central_differences

import xlstm
from xlstm._lib import compat as _compat
from xlstm.cells import Cell
from xlstm.models import MODELS

NP, CPU = _compat.load_backend("numpy")
EXACT = {"xp": NP, "device": CPU, "rtol": 0, "atol": 0}

N_X, N_A, M, T = 3, 4, 2, 6


def _registry(where=lambda model: True):
    """One maker per model of the registry (xlstm.models.MODELS) for which ``where`` holds."""
    return [pytest.param(functools.partial(cls, **kw), id=name)
            for name, (cls, kw) in MODELS.items() if where(cls(1, 1, **kw, dtype="float64"))]


#: Every model of the registry.
EVERY_MODEL = pytest.mark.parametrize("cls", _registry())
#: The models whose state starts with the hidden state (those on the engine's cells).
HIDDEN_FIRST = pytest.mark.parametrize(
    "cls", _registry(lambda model: isinstance(getattr(model.layer, "cell", None), Cell)))
#: A few models, for a check as costly as central differences of the whole stack.
SOME = pytest.mark.parametrize("cls", [xlstm.LSTM, xlstm.GRU, xlstm.RNN],
                               ids=lambda c: c.__name__)


def _inputs(seed=0, D=1, layers=2, n_s=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_X, M, T))
    dy = rng.standard_normal((D * N_A, M, T))
    state = tuple(0.5 * rng.standard_normal((layers * D, N_A, M)) for _ in range(n_s))
    return x, dy, state


@EVERY_MODEL
def test_dropout_is_reproducible_off_without_train_and_needs_a_seed(cls):
    model = cls(N_X, N_A, num_layers=3, dropout=0.5, seed=1, dtype="float64")
    plain = cls(N_X, N_A, num_layers=3, seed=1, dtype="float64")
    x, _, _ = _inputs()
    y1, _, _ = model.forward(x, train=True, seed=7)
    y2, _, _ = model.forward(x, train=True, seed=7)
    y3, _, _ = model.forward(x, train=True, seed=8)
    assert_close(y1, y2, **EXACT)
    assert not np.array_equal(y1, y3)
    y_eval, _, _ = model.forward(x)
    assert_close(y_eval, plain.forward(x)[0], **EXACT)
    assert not np.array_equal(y1, y_eval)
    with pytest.raises(ValueError, match="seed is required"):
        model.forward(x, train=True)
    # no mask is drawn where none applies: one layer, or no dropout
    assert_close(cls(N_X, N_A, dropout=0.5, seed=1, dtype="float64").forward(x, train=True)[0],
                 cls(N_X, N_A, seed=1, dtype="float64").forward(x)[0], **EXACT)


def test_dropout_masks_keep_the_expected_fraction_scaled():
    model = xlstm.LSTM(N_X, N_A, num_layers=2, dropout=0.25, bidirectional=True, dtype="float64")
    x = np.zeros((N_X, 50, 40))
    masks = model._masks(3, 50, 40, model.xp, x)
    (mask,) = masks
    assert mask.shape == (40, 50, 2 * N_A) and mask.dtype == x.dtype  # time-major
    assert set(np.unique(mask)) == {0.0, 1 / 0.75}
    assert abs(np.mean(mask == 0) - 0.25) < 0.02  # 16000 draws: 5 sigma is 0.017


@SOME
def test_dropout_gradient_is_right(cls):
    """With the masks fixed by the seed, dropout is a linear map: its gradient is checked
    against central differences of the whole stacked, bidirectional model."""
    model = cls(N_X, N_A, num_layers=2, bidirectional=True, dropout=0.4, seed=2, dtype="float64")
    n_s = len(model.layer.state_names)
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
    assert_close(dx, num["x"], xp=NP, device=CPU, rtol=1e-6, atol=1e-8)
    for i, g in enumerate(grads):
        for k, v in g.items():
            assert_close(v, num[f"{i}_{k}"], xp=NP, device=CPU, rtol=1e-6, atol=1e-8,
                         err=f"{i} {k}")


@EVERY_MODEL
def test_batch_first_is_the_notebook_layout_transposed(cls):
    nb = cls(N_X, N_A, num_layers=2, bidirectional=True, seed=6, dtype="float64")
    bf = cls(N_X, N_A, num_layers=2, bidirectional=True, seed=6, layout="batch_first", dtype="float64")
    x, dy, _ = _inputs(7, D=2)
    rng = np.random.default_rng(8)
    state = tuple(0.5 * rng.standard_normal(shape) for shape in nb._state_shapes(M))
    y, s, c = nb.forward(x, state)
    yb, sb, cb = bf.forward(x.transpose(1, 2, 0), state)
    assert_close(yb, y.transpose(1, 2, 0), **EXACT)
    for a, b in zip(s, sb):
        assert_close(a, b, **EXACT)
    dx, d0, g = nb.backward(dy, c)
    dxb, d0b, gb = bf.backward(dy.transpose(1, 2, 0), cb)
    assert_close(dxb, dx.transpose(1, 2, 0), **EXACT)
    for a, b in zip(d0, d0b):
        assert_close(b, a, **EXACT)
    for la, lb in zip(g, gb):
        for k in la:
            assert_close(la[k], lb[k], **EXACT)
    with pytest.raises(ValueError, match=r"x must have shape \(m, T, n_x\)"):
        bf.forward(x)
    with pytest.raises(ValueError, match=r"dy must have the shape of y, \(m, T, D \* n_[ah]\)"):
        bf.backward(dy, cb)


@HIDDEN_FIRST
def test_the_final_state_is_each_sequence_own_last_step(cls):
    """With lengths, the last layer's forward final hidden state is its output at each
    sequence's own last step (what last-step regression reads), the outputs past the end
    are zero, and the reverse direction's output at step 0 is its final state."""
    model = cls(N_X, N_A, num_layers=2, bidirectional=True, seed=8, dtype="float64")
    rng = np.random.default_rng(9)
    x = rng.standard_normal((N_X, 4, T))
    lengths = np.array([3, T, 1, 4])
    y, state, _ = model.forward(x, lengths=lengths)
    a = state[0]
    for b, n in enumerate(lengths):
        assert_close(a[2, :, b], y[:N_A, b, n - 1], **EXACT)  # layer 1, forward
        assert_close(a[3, :, b], y[N_A:, b, 0], **EXACT)  # layer 1, reverse
        assert np.all(y[:, b, n:] == 0.0)


def test_narrow_integer_lengths_work_past_their_range():
    """uint8 lengths with T beyond 255 (and m T beyond it): the same as int64 lengths."""
    model = xlstm.GRU(2, 3, bidirectional=True, seed=1, dtype="float64")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 300))
    lengths = np.array([255, 7, 200])
    y, s, _ = model.forward(x, lengths=lengths)
    y8, s8, _ = model.forward(x, lengths=lengths.astype(np.uint8))
    assert_close(y8, y, **EXACT)
    assert_close(s8[0], s[0], **EXACT)
