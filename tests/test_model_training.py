"""Training the model classes: their parameter trees through the optimizers, the clipping
functions and ``fit`` (the same numbers as the flat dicts they flatten to), the loss on a
head's logits, padded batches and truncated backpropagation across chunks."""

from __future__ import annotations

import numpy as np
import pytest
from xlstm.train import fit

import xlstm
from xlstm._lib import tree as _tree


def _tree_and_grads(seed=0):
    model = xlstm.GRU(3, 4, num_layers=2, bidirectional=True, seed=seed, dtype="float64")
    rng = np.random.default_rng(seed)
    head = {"Wy": rng.standard_normal((2, 8)), "by": rng.standard_normal((2, 1))}
    params = {"rnn": model.params, "head": head}
    grads = _tree.unflatten(params, {k: rng.standard_normal(v.shape)
                                     for k, v in _tree.flatten(params).items()})
    return params, grads


def test_flatten_round_trip_keeps_the_structure():
    params, _ = _tree_and_grads()
    flat = _tree.flatten(params)
    assert "['rnn'][3]['Wn']" in flat and "['head']['by']" in flat
    back = _tree.unflatten(params, flat)
    assert list(back) == ["rnn", "head"] and isinstance(back["rnn"], list)
    assert all(back["rnn"][i][k] is v for i, layer in enumerate(params["rnn"])
               for k, v in layer.items())
    assert _tree.is_tree(params) and _tree.is_tree([{}]) and not _tree.is_tree(params["head"])


@pytest.mark.parametrize("opt", [xlstm.SGD(lr=0.1, momentum=0.9), xlstm.Adam(lr=0.01)],
                         ids=["sgd", "adam"])
def test_optimizers_step_a_tree_as_its_flat_dict(opt):
    params, grads = _tree_and_grads()
    flat = _tree.flatten(params)
    dflat = {"d" + k: v for k, v in _tree.flatten(grads).items()}
    state, fstate = opt.init(params), opt.init(flat)
    for _ in range(3):
        params, state = opt.step(params, grads, state)
        flat, fstate = opt.step(flat, dflat, fstate)
    assert isinstance(params["rnn"], list) and set(params["head"]) == {"Wy", "by"}
    for k, v in _tree.flatten(params).items():
        np.testing.assert_array_equal(v, flat[k])


def test_optimizers_refuse_gradients_of_another_structure():
    params, grads = _tree_and_grads()
    opt = xlstm.Adam()
    bad = {"rnn": grads["rnn"][:-1], "head": grads["head"]}
    with pytest.raises(ValueError, match="grads must have the structure of params"):
        opt.step(params, bad, opt.init(params))


def test_clipping_a_tree_counts_every_leaf():
    _, grads = _tree_and_grads()
    flat = _tree.flatten(grads)
    clipped, norm = xlstm.clip_by_global_norm(grads, 1.0)
    want = np.sqrt(sum(np.sum(v * v) for v in flat.values()))
    np.testing.assert_allclose(norm, want, rtol=1e-12)
    got = _tree.flatten(clipped)
    for k, v in flat.items():
        np.testing.assert_allclose(got[k], v / want, rtol=1e-12)
    capped = _tree.flatten(xlstm.clip_by_value(grads, 0.5))
    for k, v in flat.items():
        np.testing.assert_array_equal(capped[k], np.clip(v, -0.5, 0.5))


def test_fit_trains_a_model_with_a_head_and_truncated_backpropagation():
    """A 2-layer LSTM with a linear head outside its parameters, trained by ``fit`` on
    chunks of a long sequence with the state carried between chunks: the loss falls."""
    rng = np.random.default_rng(0)
    model = xlstm.LSTM(1, 8, num_layers=2, seed=0, dtype="float64")
    m, T, chunk = 4, 48, 12
    t = np.arange(T + 1)
    phase = rng.uniform(0, 2 * np.pi, m)
    wave = np.sin(0.3 * t[None, :] + phase[:, None])  # predict the next value
    x, target = wave[None, :, :-1], wave[None, :, 1:]
    head = {"Wy": 0.1 * rng.standard_normal((1, 8)), "by": np.zeros((1, 1))}
    carry = {"state": None}

    def batches():
        carry["state"] = None  # each epoch starts from zeros
        return [(x[..., k:k + chunk], target[..., k:k + chunk]) for k in range(0, T, chunk)]

    def loss_fn(params, batch):
        xb, yb = batch
        y, state, cache = model.forward(xb, carry["state"], params=params["rnn"])
        carry["state"] = state  # truncated: no gradient flows into the previous chunk
        pred = np.einsum("ij,jmt->imt", params["head"]["Wy"], y) + params["head"]["by"][..., None]
        err = pred - yb
        n = err.size
        loss = np.sum(err * err) / n
        dpred = 2 * err / n
        dhead = {"Wy": np.einsum("imt,jmt->ij", dpred, y), "by": np.sum(dpred, axis=(1, 2))[:, None]}
        dy = np.einsum("ij,imt->jmt", params["head"]["Wy"], dpred)
        _, _, grads = model.backward(dy, cache)
        return loss, {"rnn": grads, "head": dhead}

    result = fit({"rnn": model.params, "head": head}, batches, loss_fn, xlstm.Adam(lr=0.02),
                 epochs=40, clip_norm=5.0, progress=False)
    first, last = np.mean(result.history[:4]), np.mean(result.history[-4:])
    assert last < 0.2 * first, (first, last)
    assert isinstance(result.params["rnn"], list) and len(result.params["rnn"]) == 2


def test_softmax_cross_entropy_is_the_sequence_loss_on_logits():
    """On the notebook's logits it gives sequence_cross_entropy's loss bit for bit, and
    its gradient passes central differences (with a weighted mask)."""
    from oracles import central_differences, random_case

    x, a0, _, p = random_case(0, 3, 4, 5, 2, 6)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, (2, 6))
    mask = rng.uniform(0.0, 2.0, (2, 6))
    want, grads = xlstm.sequence_cross_entropy(x, a0, p, labels, mask=mask)
    a = xlstm.lstm_forward(x, a0, p)[0]
    logits = np.einsum("yn,nmt->ymt", p["Wy"], a) + p["by"][..., None]
    loss, dlogits = xlstm.softmax_cross_entropy(logits, labels, mask=mask)
    assert loss.shape == () and loss == want
    np.testing.assert_allclose(np.einsum("ymt,nmt->yn", dlogits, a), grads["dWy"], rtol=1e-12)
    num = central_differences(
        lambda d: xlstm.softmax_cross_entropy(d["z"], labels, mask=mask)[0], {"z": logits})
    np.testing.assert_allclose(dlogits, num["z"], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match=r"logits must be 3-D \(n_y, m, T\)"):
        xlstm.softmax_cross_entropy(logits[0], labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, n_y\)"):
        xlstm.softmax_cross_entropy(logits, labels + 5)


def test_sequence_labelling_with_lengths_through_a_bidirectional_model():
    """Loss on a head over a padded batch, masked by the lengths: dx from the model's
    backward equals central differences, and padded inputs get no gradient."""
    from oracles import central_differences

    rng = np.random.default_rng(2)
    model = xlstm.LSTM(3, 4, num_layers=2, bidirectional=True, seed=5, dtype="float64")
    m, T = 3, 5
    lengths = np.array([2, 5, 1])
    mask = np.arange(T)[None, :] < lengths[:, None]
    x = rng.standard_normal((3, m, T))
    labels = rng.integers(0, 2, (m, T))
    Wy, by = rng.standard_normal((2, 8)), rng.standard_normal((2, 1, 1))

    def loss_of(x):
        y, _, cache = model.forward(x, lengths=lengths)
        loss, dz = xlstm.softmax_cross_entropy(np.einsum("yn,nmt->ymt", Wy, y) + by, labels,
                                               mask=mask)
        return loss, cache, np.einsum("yn,ymt->nmt", Wy, dz)

    loss, cache, dy = loss_of(x)
    dx, _, _ = model.backward(dy, cache)
    num = central_differences(lambda d: loss_of(d["x"])[0], {"x": x})["x"]
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-9)
    assert np.all(dx[:, ~mask] == 0.0)


def test_regression_from_each_sequence_own_last_step():
    """A regression head on the final hidden state of a padded batch (each sequence's own
    last step): its gradient enters through ``dstate``; the parameter gradients equal
    central differences, and ``fit`` drives the loss down."""
    from oracles import central_differences

    rng = np.random.default_rng(4)
    model = xlstm.GRU(2, 5, num_layers=2, seed=6, dtype="float64")
    m, T = 6, 7
    lengths = np.array([7, 3, 1, 5, 7, 2])
    x = rng.standard_normal((2, m, T)) * (np.arange(T)[None, None, :] < lengths[None, :, None])
    target = np.sum(x[0], axis=1)  # the sum of each sequence's first feature
    head = {"w": 0.1 * rng.standard_normal((1, 5)), "b": np.zeros((1, 1))}

    def loss_fn(params, batch):
        xb, lb, tb = batch
        y, state, cache = model.forward(xb, lengths=lb, params=params["rnn"])
        last = state[0][-1]  # (n_a, m): the top layer at each sequence's own length
        err = params["head"]["w"] @ last + params["head"]["b"] - tb[None, :]
        loss = np.mean(err * err)
        derr = 2 * err / err.size
        dstate = (np.zeros_like(state[0]),)
        dstate[0][-1] = params["head"]["w"].T @ derr
        _, _, grads = model.backward(np.zeros_like(y), cache, dstate)
        return loss, {"rnn": grads, "head": {"w": derr @ last.T, "b": np.sum(derr, axis=1,
                                                                              keepdims=True)}}

    params = {"rnn": model.params, "head": head}
    _, grads = loss_fn(params, (x, lengths, target))
    flat = {f"{i}_{k}": v for i, layer in enumerate(params["rnn"]) for k, v in layer.items()}
    flat.update(("head_" + k, v) for k, v in head.items())

    def loss_of(d):
        rnn = [{k: d[f"{i}_{k}"] for k in layer} for i, layer in enumerate(params["rnn"])]
        p = {"rnn": rnn, "head": {k: d["head_" + k] for k in head}}
        return float(loss_fn(p, (x, lengths, target))[0])

    num = central_differences(loss_of, flat)
    for i, layer in enumerate(grads["rnn"]):
        for k, v in layer.items():
            np.testing.assert_allclose(v, num[f"{i}_{k}"], rtol=1e-6, atol=1e-9, err_msg=k)
    for k, v in grads["head"].items():
        np.testing.assert_allclose(v, num["head_" + k], rtol=1e-6, atol=1e-9, err_msg=k)
    result = fit(params, [(x, lengths, target)], loss_fn, xlstm.Adam(lr=0.05), epochs=60,
                 progress=False)
    assert result.history[-1] < 0.1 * result.history[0], result.history[::10]
