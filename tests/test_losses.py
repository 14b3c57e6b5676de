"""Losses: values and every gradient against central differences, torch autograd and numpy.

The central-difference gradcheck (float64, every entry of every gradient) runs on numpy;
every backend is then compared with the numpy result, and with torch autograd.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers import assert_array, assert_close, to_numpy, to_xp
from oracles import central_differences, random_case, torch_lstm_forward
from xlstm.losses import last_step_mse, last_step_predict, sequence_cross_entropy

from xlstm import lstm_forward

N_X, N_A, N_Y, M, T = 3, 4, 5, 2, 3
PARAM_NAMES = ("Wf", "bf", "Wi", "bi", "Wc", "bc", "Wo", "bo", "Wy", "by")
GRAD_KEYS = ("dx", "da0", "dWf", "dbf", "dWi", "dbi", "dWc", "dbc", "dWo", "dbo", "dc0")
ALL_GRADS = (*GRAD_KEYS, "dWy", "dby")
#: Masks: a boolean one, 0/1/fractional weights, and none at all.
MASKS = ("bool", "weights", None)
PAD = -100  # label value at masked-out positions, out of range on purpose


@functools.lru_cache(maxsize=None)
def _host(T_x=T, seed=0):
    """Host (numpy, float64) data: arrays, params, labels, masks and targets."""
    rng = np.random.default_rng(seed)
    case = random_case(rng, N_X, N_A, N_Y, M, T_x, scale=0.6, state_scale=0.5)
    mask = np.ones((M, T_x), dtype=bool)
    mask[0, -1] = False  # padding: the end of the first example
    if T_x > 1:
        mask[1, 0] = False
    labels = rng.integers(0, N_Y, (M, T_x))
    labels[~mask] = PAD
    weights = np.where(mask, rng.choice([0.5, 1.0, 2.0], size=(M, T_x)), 0.0)
    return {
        **case._asdict(),
        "labels": labels,
        "masks": {"bool": mask, "weights": weights, None: None},
        "targets": rng.normal(0.0, 1.0, (N_Y, M)),
    }


def _move(h, xp, device, dtype=None, mask=None):
    """The arguments of both losses as ``xp`` arrays: ``(args, kwargs, labels, targets)``."""
    dtype = xp.float64 if dtype is None else dtype
    args = (to_xp(h["x"], xp, device, dtype), to_xp(h["a0"], xp, device, dtype),
            to_xp(h["params"], xp, device, dtype))  # fmt: skip
    m = h["masks"][mask]
    if m is not None:
        m = xp.asarray(m, device=device) if m.dtype == bool else to_xp(m, xp, device, dtype)
    kwargs = {"c0": to_xp(h["c0"], xp, device, dtype), "mask": m}
    labels = xp.asarray(_labels(h, mask), dtype=xp.int64, device=device)
    return args, kwargs, labels, to_xp(h["targets"], xp, device, dtype)


def _labels(h, mask):
    """The labels, with the padding replaced by a valid class where every position counts."""
    return h["labels"] if mask is not None else np.where(h["labels"] == PAD, 2, h["labels"])


def _np_ce(h, mask, arrays=None):
    """numpy reference: loss and grads of the cross-entropy on (possibly perturbed) arrays."""
    arrays = _flat(h) if arrays is None else arrays
    params = {k: arrays[k] for k in PARAM_NAMES}
    return sequence_cross_entropy(arrays["x"], arrays["a0"], params, _labels(h, mask),
                                  mask=h["masks"][mask], c0=arrays["c0"])  # fmt: skip


def _np_mse(h, arrays=None):
    arrays = _flat(h) if arrays is None else arrays
    params = {k: arrays[k] for k in PARAM_NAMES}
    return last_step_mse(arrays["x"], arrays["a0"], params, h["targets"], c0=arrays["c0"])


def _flat(h):
    return {"x": h["x"], "a0": h["a0"], "c0": h["c0"], **h["params"]}


def _grad_name(name):
    return "d" + name


# ---------------------------------------------------------------------------- gradcheck
def _gradcheck(loss_and_grads, h):
    arrays = _flat(h)
    loss, grads = loss_and_grads(arrays)
    assert set(grads) == set(ALL_GRADS)
    numeric = central_differences(lambda a: float(loss_and_grads(a)[0]), arrays)
    assert {_grad_name(k) for k in numeric} == set(ALL_GRADS)
    for name, want in numeric.items():
        key = _grad_name(name)
        np.testing.assert_allclose(grads[key], want, rtol=1e-6, atol=1e-9, err_msg=key)


@pytest.mark.parametrize("mask", ["bool", "weights"])  # no mask: see the torch test
def test_gradcheck_sequence_cross_entropy(mask):
    h = _host()
    _gradcheck(lambda arrays: _np_ce(h, mask, arrays), h)


@pytest.mark.parametrize("T_x", [1, T])
def test_gradcheck_last_step_mse(T_x):
    h = _host(T_x)
    _gradcheck(lambda arrays: _np_mse(h, arrays), h)


# ------------------------------------------------------------------- values on the host
def test_cross_entropy_value_from_softmax_predictions():
    """The loss is -mean log y[label] over counted steps, with y from lstm_forward."""
    h = _host()
    params = h["params"]
    _, y, _, _ = lstm_forward(h["x"], h["a0"], params, h["c0"])
    mask, labels = h["masks"]["bool"], h["labels"]
    picked = np.take_along_axis(y, np.where(mask, labels, 0)[None], axis=0)[0]
    expected = -np.log(picked[mask]).mean()
    loss, _ = _np_ce(h, "bool")
    assert isinstance(loss, np.ndarray) and loss.shape == () and loss.dtype == np.float64
    np.testing.assert_allclose(loss, expected, rtol=1e-12)

    # no mask is the plain mean; a bool mask equals its 0/1 float form
    full = -np.log(np.take_along_axis(y, np.where(mask, labels, 1)[None], axis=0)[0]).mean()
    unmasked = {**h, "labels": np.where(mask, labels, 1)}
    np.testing.assert_allclose(_np_ce(unmasked, None)[0], full, rtol=1e-12)
    as_float = {**h, "masks": {"bool": mask.astype(np.float64)}}
    loss_f, grads_f = _np_ce(as_float, "bool")
    _, grads_b = _np_ce(h, "bool")
    np.testing.assert_allclose(loss_f, loss, rtol=1e-14)
    for k in ALL_GRADS:
        np.testing.assert_allclose(grads_f[k], grads_b[k], rtol=1e-14, atol=1e-16)


def test_masked_labels_are_ignored():
    h = _host()
    other = {**h, "labels": np.where(h["masks"]["bool"], h["labels"], 3)}
    (l1, g1), (l2, g2) = _np_ce(h, "bool"), _np_ce(other, "bool")
    assert float(l1) == float(l2)
    for k in ALL_GRADS:
        np.testing.assert_array_equal(g1[k], g2[k])


# ------------------------------------------------------------------ every backend vs numpy
@pytest.mark.parametrize("mask", MASKS)
def test_cross_entropy_matches_numpy(xp, device, mask):
    h = _host()
    want_loss, want = _np_ce(h, mask)
    (x, a0, params), kw, labels, _ = _move(h, xp, device, mask=mask)
    loss, grads = sequence_cross_entropy(x, a0, params, labels, **kw)
    assert_close(loss, want_loss, xp=xp, device=device, dtype=xp.float64)
    assert set(grads) == set(ALL_GRADS)
    for k in ALL_GRADS:
        assert_close(grads[k], want[k], xp=xp, device=device, dtype=xp.float64, err=k)


def _check_mse(xp, device, T_x):
    h = _host(T_x)
    want_loss, want = _np_mse(h)
    (x, a0, params), kw, _, targets = _move(h, xp, device)
    loss, grads = last_step_mse(x, a0, params, targets, c0=kw["c0"])
    assert_close(loss, want_loss, xp=xp, device=device, dtype=xp.float64)
    assert set(grads) == set(ALL_GRADS)
    for k in ALL_GRADS:
        assert_close(grads[k], want[k], xp=xp, device=device, dtype=xp.float64, err=k)

    pred = last_step_predict(x, a0, params, c0=kw["c0"])
    a, _, _, _ = lstm_forward(h["x"], h["a0"], h["params"], h["c0"])
    want_pred = h["params"]["Wy"] @ a[:, :, -1] + h["params"]["by"]
    assert_close(pred, want_pred, xp=xp, device=device, dtype=xp.float64)
    np.testing.assert_allclose(np.mean((want_pred - h["targets"]) ** 2), want_loss, rtol=1e-12)


def test_last_step_mse_matches_numpy(xp, device):
    _check_mse(xp, device, T)


def test_last_step_mse_single_step():
    """T_x = 1 (no zero padding of da) on the strictest backend; numpy gradchecks it too."""
    strict = pytest.importorskip("array_api_strict")
    _check_mse(strict, strict.Device("device1"), 1)


def test_int32_labels_and_default_c0(xp, device):
    h = _host()
    (x, a0, params), kw, labels, _ = _move(h, xp, device, mask="bool")
    labels32 = xp.astype(labels, xp.int32)
    loss, grads = sequence_cross_entropy(x, a0, params, labels32, mask=kw["mask"])
    np_params = h["params"]
    want_loss, want = sequence_cross_entropy(
        h["x"], h["a0"], np_params, h["labels"], mask=h["masks"]["bool"]
    )
    assert_close(loss, want_loss, xp=xp, device=device, dtype=xp.float64)
    for k in ALL_GRADS:
        assert_close(grads[k], want[k], xp=xp, device=device, dtype=xp.float64, err=k)


# ----------------------------------------------------------------------- torch autograd
def _torch_reference(torch, h, loss_kind, mask=None):
    """Loss and gradients of the seed's equations, written with plain torch ops."""
    ref = torch_lstm_forward(torch, _flat(h))
    F = torch.nn.functional
    if loss_kind == "mse":
        loss = F.mse_loss(ref.logits[:, :, -1], torch.tensor(h["targets"]))
    else:
        flat = ref.logits.permute(1, 2, 0).reshape(-1, N_Y)
        labels = torch.tensor(_labels(h, mask)).reshape(-1)
        if mask == "bool":  # padding through ignore_index, the usual torch idiom
            loss = F.cross_entropy(flat, labels, ignore_index=PAD)
        else:
            w = np.ones(labels.shape) if mask is None else h["masks"][mask].reshape(-1)
            w = torch.tensor(w)
            nll = F.cross_entropy(flat, labels.clamp(min=0), reduction="none")
            loss = (nll * w).sum() / w.sum()
    loss.backward()
    return loss.detach().numpy(), ref.grads()


@pytest.mark.parametrize("case", [("ce", "bool"), ("ce", "weights"), ("ce", None), ("mse", None)])
def test_against_torch_autograd(xp, device, case):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    kind, mask = case
    h = _host()
    want_loss, want = _torch_reference(torch, h, kind, mask)
    (x, a0, params), kw, labels, targets = _move(h, xp, device, mask=mask)
    if kind == "mse":
        loss, grads = last_step_mse(x, a0, params, targets, c0=kw["c0"])
    else:
        loss, grads = sequence_cross_entropy(x, a0, params, labels, **kw)
    assert_close(loss, want_loss, xp=xp, device=device, dtype=xp.float64)
    assert set(want) == set(ALL_GRADS)
    for k in ALL_GRADS:
        assert_close(grads[k], want[k], xp=xp, device=device, dtype=xp.float64,
                     rtol=1e-10, atol=1e-12, err=k)  # fmt: skip


# ---------------------------------------------------------------- dtype, mutation, errors
@pytest.mark.parametrize("mask", ["bool", "weights"])
def test_float32_stays_float32(xp, device, mask):
    h = _host()
    want_ce, want_ce_g = _np_ce(h, mask)
    want_mse, want_mse_g = _np_mse(h)
    (x, a0, params), kw, labels, targets = _move(h, xp, device, xp.float32, mask=mask)
    for (loss, grads), wl, wg in (
        (sequence_cross_entropy(x, a0, params, labels, **kw), want_ce, want_ce_g),
        (last_step_mse(x, a0, params, targets, c0=kw["c0"]), want_mse, want_mse_g),
    ):
        assert_close(loss, wl, xp=xp, device=device, dtype=xp.float32, rtol=1e-5, atol=1e-6)
        for k in ALL_GRADS:
            assert_close(grads[k], wg[k], xp=xp, device=device, dtype=xp.float32,
                         rtol=1e-4, atol=1e-6, err=k)  # fmt: skip
    pred = last_step_predict(x, a0, params, c0=kw["c0"])
    assert_array(pred, xp=xp, device=device, shape=(N_Y, M), dtype=xp.float32)


def test_inputs_not_mutated(xp, device):
    h = _host()
    (x, a0, params), kw, labels, targets = _move(h, xp, device, mask="weights")
    inputs = {"x": x, "a0": a0, "labels": labels, "targets": targets, **kw, **params}

    def snapshot():
        return {k: np.array(to_numpy(v), copy=True) for k, v in inputs.items()}

    before = snapshot()
    sequence_cross_entropy(x, a0, params, labels, **kw)
    last_step_mse(x, a0, params, targets, c0=kw["c0"])
    last_step_predict(x, a0, params, c0=kw["c0"])
    after = snapshot()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_large_logits_are_stable(xp, device):
    """Logits of order 1e4: a finite loss and finite gradients, and no warning."""
    h = _host()
    big = {**h, "params": {**h["params"], "Wy": h["params"]["Wy"] * 1e4}}
    (x, a0, params), kw, labels, _ = _move(big, xp, device, mask="bool")
    loss, grads = sequence_cross_entropy(x, a0, params, labels, **kw)
    assert np.isfinite(to_numpy(loss)) and float(to_numpy(loss)) > 1.0
    for k in ALL_GRADS:
        assert np.all(np.isfinite(to_numpy(grads[k]))), k


def test_shape_and_dtype_errors_name_the_argument(xp, device):
    h = _host()
    (x, a0, params), kw, labels, targets = _move(h, xp, device, mask="bool")
    mask = kw["mask"]
    ce = functools.partial(sequence_cross_entropy, x, a0, params)
    with pytest.raises(ValueError, match="labels"):
        ce(labels[:, :-1])
    with pytest.raises(ValueError, match="labels"):
        ce(labels[None, ...])
    with pytest.raises(TypeError, match="labels.*integer"):
        ce(xp.astype(labels, xp.float64))
    with pytest.raises(ValueError, match="mask"):
        ce(labels, mask=mask[:1, :])
    with pytest.raises(TypeError, match="mask"):
        ce(labels, mask=xp.astype(labels, xp.int32))
    with pytest.raises(TypeError, match="mask"):
        ce(labels, mask=xp.astype(mask, xp.float32))  # float64 params
    with pytest.raises(ValueError, match="targets"):
        last_step_mse(x, a0, params, targets[:, :1])
    with pytest.raises(ValueError, match="targets"):
        last_step_mse(x, a0, params, xp.reshape(targets, (N_Y * M,)))
    with pytest.raises(TypeError, match="targets"):
        last_step_mse(x, a0, params, xp.astype(targets, xp.float32))
    with pytest.raises(TypeError, match="labels"):
        ce([[0] * T] * M)


def test_value_errors(xp, device):
    h = _host()
    (x, a0, params), kw, labels, _ = _move(h, xp, device, mask="bool")
    ce = functools.partial(sequence_cross_entropy, x, a0, params)
    bad = xp.asarray(np.where(h["masks"]["bool"], N_Y, PAD), dtype=xp.int64, device=device)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, n_y\)"):
        ce(bad, mask=kw["mask"])
    with pytest.raises(ValueError, match="labels"):
        ce(labels)  # the padding value counts when there is no mask
    nothing = xp.asarray(np.zeros((M, T), dtype=bool), device=device)
    with pytest.raises(ValueError, match="mask counts no position"):
        ce(labels, mask=nothing)
    with pytest.raises(ValueError, match="mask counts no position"):
        ce(labels, mask=xp.astype(nothing, xp.float64))


def test_labels_from_another_namespace(xp, device):
    h = _host()
    (x, a0, params), kw, _, _ = _move(h, xp, device)
    if xp.__name__.endswith("numpy") and "strict" not in xp.__name__:
        import array_api_strict as other

        foreign = other.asarray(h["labels"])
    else:
        foreign = h["labels"]  # plain numpy
    with pytest.raises(TypeError, match="labels"):
        sequence_cross_entropy(x, a0, params, foreign)


@pytest.mark.parametrize("int_dtype", ["uint8", "int8", "int16", "uint16", "int32", "uint64"])
def test_any_integer_label_dtype_gives_the_true_loss(xp, device, int_dtype):
    """Narrow label dtypes, even ones that cannot hold n_y (uint8 with 300 classes), give
    the loss and gradients of int64 labels."""
    native = getattr(xp, int_dtype, None)
    if native is None:
        pytest.skip(f"{xp.__name__} has no {int_dtype}")
    rng = np.random.default_rng(21)
    n_y = 300
    h = _host()
    params = {**h["params"], "Wy": rng.normal(0.0, 0.8, (n_y, N_A)),
              "by": rng.normal(0.0, 0.3, (n_y, 1))}
    hi = min(n_y, int(np.iinfo(int_dtype).max) + 1)
    labels = rng.integers(max(0, hi - 40), hi, (M, T))  # the top of the dtype's range
    args = (to_xp(h["x"], xp, device), to_xp(h["a0"], xp, device), to_xp(params, xp, device))
    want_loss, want = sequence_cross_entropy(
        *args, xp.asarray(labels, dtype=xp.int64, device=device))
    loss, grads = sequence_cross_entropy(*args, xp.asarray(labels, dtype=native, device=device))
    assert_close(loss, want_loss, xp=xp, device=device, rtol=0, atol=0)
    for k in ALL_GRADS:
        assert_close(grads[k], want[k], xp=xp, device=device, rtol=0, atol=0, err=k)
    if int_dtype == "uint8":  # the case that used to count a label twice
        logits = params["Wy"] @ to_numpy(lstm_forward(*args)[0]).reshape(N_A, -1) + params["by"]
        logp = logits - np.log(np.exp(logits - logits.max(0)).sum(0)) - logits.max(0)
        true = -np.mean(logp[labels.reshape(-1), np.arange(M * T)])
        np.testing.assert_allclose(float(to_numpy(loss)), true, rtol=1e-12)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_negative_or_non_finite_mask_weights_are_value_errors(xp, device, bad):
    h = _host()
    (x, a0, params), kw, labels, _ = _move(h, xp, device, mask="weights")
    weights = h["masks"]["weights"].copy()
    weights[1, 1] = bad
    with pytest.raises(ValueError, match="mask weights must be finite and >= 0"):
        sequence_cross_entropy(x, a0, params, labels, mask=to_xp(weights, xp, device),
                               c0=kw["c0"])


def test_bad_labels_or_weights_under_jit_give_nan(backend_named):
    """Under jax.jit nothing can be raised: a bad label or weight makes the loss NaN, and
    good inputs give the eager result."""
    backend_named("jax")  # 64-bit mode on
    import jax

    jnp = jax.numpy
    h = _host()
    x, a0 = jnp.asarray(h["x"]), jnp.asarray(h["a0"])
    params = {k: jnp.asarray(v) for k, v in h["params"].items()}
    weights = jnp.asarray(h["masks"]["weights"])
    labels = jnp.asarray(_labels(h, "weights"))

    @jax.jit
    def loss(labels, weights):
        return sequence_cross_entropy(x, a0, params, labels, mask=weights)[0]

    eager = sequence_cross_entropy(x, a0, params, labels, mask=weights)[0]
    np.testing.assert_allclose(float(loss(labels, weights)), float(eager), rtol=1e-12)
    assert np.isnan(float(loss(labels.at[1, 1].set(N_Y), weights)))
    assert np.isnan(float(loss(labels, weights.at[1, 1].set(-1.0))))
    assert np.isnan(float(loss(labels, jnp.zeros_like(weights))))


@pytest.mark.parametrize("dtype, power", [(np.float64, 1020), (np.float32, 124)])
def test_mask_weights_near_the_dtypes_maximum(dtype, power):
    """Weights whose sum overflows (1e308 in float64) gave the loss 0 and zero gradients:
    only their ratios matter, so weights scaled by a power of two give the same loss and
    gradients bit for bit, near the maximum and near the smallest normal number too."""
    from xlstm import softmax_cross_entropy

    rng = np.random.default_rng(3)
    z = rng.standard_normal((3, 4, 5)).astype(dtype)
    labels = rng.integers(0, 3, (4, 5))
    w = rng.uniform(0.25, 1.0, (4, 5)).astype(dtype)
    w[0, :2] = 0.0
    want_loss, want_dz = softmax_cross_entropy(z, labels, mask=w)
    for scale in (2.0**power, 2.0**-power):
        loss, dz = softmax_cross_entropy(z, labels, mask=w * dtype(scale))
        assert loss.dtype == dtype and dz.dtype == dtype
        np.testing.assert_array_equal(loss, want_loss)
        np.testing.assert_array_equal(dz, want_dz)
    big = np.full((4, 5), np.finfo(dtype).max, dtype)
    loss, _ = softmax_cross_entropy(z, labels, mask=big)
    np.testing.assert_allclose(loss, softmax_cross_entropy(z, labels)[0], rtol=1e-6)
