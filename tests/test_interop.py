"""Weights to and from torch.nn.LSTM: both directions give torch's numbers."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers import assert_array, assert_close, to_numpy, to_xp
from oracles import random_case
from xlstm.interop import from_torch_lstm_weights, to_torch_lstm_weights
from xlstm.lstm import lstm_forward
from xlstm.params import PARAM_KEYS

torch = pytest.importorskip("torch", reason="torch is not installed")

N_X, N_A, N_Y, M, T = 3, 5, 4, 2, 6
TORCH_KEYS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


#: ``case(seed)``: random inputs and parameters (random biases too, so that every gate's
#: bias is visible).
case = functools.partial(random_case, n_x=N_X, n_a=N_A, n_y=N_Y, m=M, T=T)


def torch_lstm(seed=0, dtype=None, **kw):
    torch.manual_seed(seed)
    return torch.nn.LSTM(N_X, N_A, dtype=torch.float64 if dtype is None else dtype, **kw)


def torch_states(lstm, x, a0, c0):
    """Run ``lstm`` step by step; return every step's (h, c) in the seed's layout.

    Also checks that one call over the whole sequence gives the same hidden states.
    """
    X = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (2, 1, 0))))  # (T, m, n_x)
    h = torch.from_numpy(np.ascontiguousarray(a0.T))[None]
    c = torch.from_numpy(np.ascontiguousarray(c0.T))[None]
    hs, cs = [], []
    with torch.no_grad():
        full, _ = lstm(X, (h, c))
        for t in range(X.shape[0]):
            _, (h, c) = lstm(X[t : t + 1], (h, c))
            hs.append(h[0].numpy().T)
            cs.append(c[0].numpy().T)
    a, c = np.stack(hs, axis=-1), np.stack(cs, axis=-1)
    np.testing.assert_allclose(np.transpose(full.numpy(), (2, 1, 0)), a, rtol=0, atol=1e-14)
    return a, c


# ----------------------------------------------------------------------------- to torch
def test_to_torch_gives_torch_our_numbers():
    x, a0, c0, p = case(1)
    sd = to_torch_lstm_weights(p)
    assert set(sd) == set(TORCH_KEYS)
    assert tuple(sd["weight_ih_l0"].shape) == (4 * N_A, N_X)
    assert tuple(sd["weight_hh_l0"].shape) == (4 * N_A, N_A)
    assert tuple(sd["bias_ih_l0"].shape) == tuple(sd["bias_hh_l0"].shape) == (4 * N_A,)
    assert all(t.dtype == torch.float64 for t in sd.values())
    assert not torch.any(sd["bias_hh_l0"])
    lstm = torch_lstm(seed=5)
    lstm.load_state_dict(sd)  # strict: exactly nn.LSTM's keys and shapes
    a_t, c_t = torch_states(lstm, x, a0, c0)
    a, _, c, _ = lstm_forward(x, a0, p, c0=c0, return_caches=False)
    np.testing.assert_allclose(a, a_t, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c, c_t, rtol=0, atol=1e-12)


def test_to_torch_gate_blocks():
    p = case(0).params
    sd = to_torch_lstm_weights(p)
    for j, g in enumerate("ifco"):  # torch's i, f, g, o
        rows = slice(j * N_A, (j + 1) * N_A)
        np.testing.assert_array_equal(sd["weight_hh_l0"][rows].numpy(), p["W" + g][:, :N_A])
        np.testing.assert_array_equal(sd["weight_ih_l0"][rows].numpy(), p["W" + g][:, N_A:])
        np.testing.assert_array_equal(sd["bias_ih_l0"][rows].numpy(), p["b" + g][:, 0])


def test_to_torch_shares_no_memory():
    p = case(0).params
    snap = {k: v.copy() for k, v in p.items()}
    sd = to_torch_lstm_weights(p)
    for t in sd.values():
        t.add_(1.0)
    for k in PARAM_KEYS:
        np.testing.assert_array_equal(p[k], snap[k])


def test_to_torch_from_every_backend(xp, device):
    host = case(0).params
    want = to_torch_lstm_weights(host)
    for dtype_name in ("float64", "float32"):
        got = to_torch_lstm_weights(to_xp(host, xp, device, dtype=getattr(xp, dtype_name)))
        for k in TORCH_KEYS:
            assert got[k].dtype == getattr(torch, dtype_name)
            assert got[k].device.type == "cpu"
            tol = 0 if dtype_name == "float64" else 1e-6
            np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=tol, atol=tol)


def test_to_torch_needs_no_output_layer():
    p = {k: v for k, v in case(0).params.items() if k not in ("Wy", "by")}
    assert set(to_torch_lstm_weights(p)) == set(TORCH_KEYS)
    with pytest.raises(KeyError, match="bo"):
        to_torch_lstm_weights({k: v for k, v in p.items() if k != "bo"})


# --------------------------------------------------------------------------- from torch
@pytest.mark.parametrize("batch_first", [False, True])
def test_from_torch_gives_our_forward_torch_numbers(batch_first):
    lstm = torch_lstm(seed=3, batch_first=batch_first)
    x, a0, c0, _ = case(2)
    if batch_first:  # same weights; torch_states feeds (T, m, n_x), so use a twin module
        twin = torch_lstm(seed=99)
        twin.load_state_dict(lstm.state_dict())
    else:
        twin = lstm
    a_t, c_t = torch_states(twin, x, a0, c0)
    p = from_torch_lstm_weights(lstm, n_y=N_Y)
    assert list(p) == list(PARAM_KEYS)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in p.values())
    assert not np.any(p["Wy"]) and not np.any(p["by"])
    assert p["Wy"].shape == (N_Y, N_A) and p["by"].shape == (N_Y, 1)
    a, y, c, _ = lstm_forward(x, a0, p, c0=c0, return_caches=False)
    np.testing.assert_allclose(a, a_t, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c, c_t, rtol=0, atol=1e-12)
    np.testing.assert_allclose(y, np.full_like(y, 1.0 / N_Y))  # a zero output layer


def test_from_torch_sums_the_two_biases():
    lstm = torch_lstm(seed=4)
    sd = lstm.state_dict()
    p = from_torch_lstm_weights(sd, n_y=1)
    b = (sd["bias_ih_l0"] + sd["bias_hh_l0"]).numpy()
    for j, g in enumerate("ifco"):
        np.testing.assert_allclose(p["b" + g][:, 0], b[j * N_A : (j + 1) * N_A], rtol=0, atol=0)


def test_round_trip_is_exact():
    p = case(0).params
    back = from_torch_lstm_weights(to_torch_lstm_weights(p), Wy=p["Wy"], by=p["by"])
    for k in PARAM_KEYS:
        np.testing.assert_array_equal(back[k], p[k])
        assert back[k] is not p[k]


def test_output_layer_from_a_linear():
    lstm, linear = torch_lstm(seed=6), torch.nn.Linear(N_A, N_Y, dtype=torch.float64)
    x, a0, c0, _ = case(3)
    p = from_torch_lstm_weights(lstm, Wy=linear.weight, by=linear.bias)
    a, y, _, _ = lstm_forward(x, a0, p, c0=c0, return_caches=False)
    with torch.no_grad():
        logits = linear(torch.from_numpy(np.ascontiguousarray(np.transpose(a, (2, 1, 0)))))
        want = torch.softmax(logits, dim=-1).numpy()
    np.testing.assert_allclose(y, np.transpose(want, (2, 1, 0)), rtol=1e-12, atol=1e-14)
    # the result shares no memory with the module
    p["Wy"][0, 0] += 1.0
    assert p["Wy"][0, 0] != linear.weight[0, 0].item()
    only_w = from_torch_lstm_weights(lstm, Wy=linear.weight)
    assert only_w["by"].shape == (N_Y, 1) and not np.any(only_w["by"])


def test_from_torch_on_every_backend(xp, device):
    lstm = torch_lstm(seed=7)
    want = from_torch_lstm_weights(lstm, n_y=N_Y)
    got = from_torch_lstm_weights(lstm, n_y=N_Y, xp=xp, device=device)
    for k in PARAM_KEYS:
        assert_close(got[k], want[k], xp=xp, device=device, dtype=xp.float64, rtol=0, atol=0)
    got32 = from_torch_lstm_weights(lstm, n_y=N_Y, xp=xp, device=device, dtype=xp.float32)
    for k in PARAM_KEYS:
        assert_close(got32[k], want[k], xp=xp, device=device, dtype=xp.float32)


def test_from_torch_dtype_names_sizes_and_integer_dtypes(xp, device):
    """A dtype may be named; numpy integer n_y works; a non-floating dtype, which would
    make every weight zero, is a TypeError naming ``dtype``."""
    lstm = torch_lstm(seed=7)
    want = from_torch_lstm_weights(lstm, n_y=N_Y, xp=xp, device=device, dtype=xp.float32)
    got = from_torch_lstm_weights(lstm, n_y=np.int64(N_Y), xp=xp, device=device,
                                  dtype="float32")
    for k in PARAM_KEYS:
        assert_close(got[k], to_numpy(want[k]), xp=xp, device=device, dtype=xp.float32,
                     rtol=0, atol=0)
    for bad in ("int32", xp.int32, xp.int64, xp.bool):
        with pytest.raises(TypeError, match="dtype must be a real floating dtype"):
            from_torch_lstm_weights(lstm, n_y=N_Y, xp=xp, device=device, dtype=bad)


def test_float32_module_keeps_float32():
    lstm = torch_lstm(seed=8, dtype=torch.float32)
    p = from_torch_lstm_weights(lstm, n_y=2)
    assert all(v.dtype == np.float32 for v in p.values())
    half = torch_lstm(seed=8, dtype=torch.float32).to(torch.bfloat16)
    ph = from_torch_lstm_weights(half, n_y=2)
    assert all(v.dtype == np.float32 for v in ph.values())
    np.testing.assert_allclose(ph["Wf"], p["Wf"], rtol=1e-2, atol=1e-2)


def test_lstm_without_bias():
    lstm = torch_lstm(seed=9, bias=False)
    x, a0, c0, _ = case(4)
    a_t, c_t = torch_states(lstm, x, a0, c0)
    p = from_torch_lstm_weights(lstm, n_y=1)
    assert all(not np.any(p[b]) for b in ("bf", "bi", "bc", "bo"))
    a, _, c, _ = lstm_forward(x, a0, p, c0=c0, return_caches=False)
    np.testing.assert_allclose(a, a_t, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c, c_t, rtol=0, atol=1e-12)


def test_from_numpy_state_dict_on_a_backend(xp, device):
    sd = {k: v.numpy() for k, v in torch_lstm(seed=10).state_dict().items()}
    p = from_torch_lstm_weights(sd, n_y=3, xp=xp, device=device)
    assert_array(p["Wc"], xp=xp, device=device, shape=(N_A, N_A + N_X), dtype=xp.float64)
    np.testing.assert_array_equal(to_numpy(p["Wc"])[:, :N_A], sd["weight_hh_l0"][2 * N_A : 3 * N_A])


# ------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.nn.LSTM(N_X, N_A, num_layers=2), "num_layers=2"),
        (lambda: torch.nn.LSTM(N_X, N_A, bidirectional=True), "bidirectional"),
        (lambda: torch.nn.LSTM(N_X, N_A, proj_size=2), "proj_size=2"),
        (lambda: torch.nn.GRU(N_X, N_A), "GRU"),
        (lambda: torch.nn.LSTM(N_X, N_A, num_layers=2).state_dict(), "multi-layer"),
        (lambda: torch.nn.LSTM(N_X, N_A, bidirectional=True).state_dict(), "bidirectional"),
        (lambda: torch.nn.LSTM(N_X, N_A, proj_size=2).state_dict(), "projections"),
        (lambda: {**torch.nn.LSTM(N_X, N_A).state_dict(), "other": torch.ones(1)}, "other"),
    ],
)
def test_unsupported_layouts_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        from_torch_lstm_weights(make(), n_y=2)


def test_bad_state_dicts_and_arguments():
    sd = torch_lstm(seed=11).state_dict()
    with pytest.raises(KeyError, match="weight_hh_l0"):
        from_torch_lstm_weights({k: v for k, v in sd.items() if k != "weight_hh_l0"}, n_y=2)
    with pytest.raises(ValueError, match="weight_hh_l0"):
        from_torch_lstm_weights(dict(sd, weight_hh_l0=torch.ones(4 * N_A, N_A + 1)), n_y=2)
    with pytest.raises(ValueError, match="weight_ih_l0"):
        from_torch_lstm_weights(dict(sd, weight_ih_l0=torch.ones(4 * N_A + 4, N_X)), n_y=2)
    with pytest.raises(ValueError, match="bias_hh_l0"):
        from_torch_lstm_weights(dict(sd, bias_hh_l0=torch.ones(4 * N_A, 1)), n_y=2)
    with pytest.raises(TypeError, match="float32 or float64"):
        from_torch_lstm_weights(dict(sd, bias_ih_l0=torch.ones(4 * N_A, dtype=torch.int64)), n_y=2)
    with pytest.raises(ValueError, match="n_y"):
        from_torch_lstm_weights(sd)
    with pytest.raises(ValueError, match="n_y"):
        from_torch_lstm_weights(sd, n_y=0)
    with pytest.raises(ValueError, match="by needs Wy"):
        from_torch_lstm_weights(sd, by=torch.zeros(2))
    with pytest.raises(ValueError, match="Wy"):
        from_torch_lstm_weights(sd, Wy=torch.zeros(2, N_A + 1))
    with pytest.raises(ValueError, match="n_y=3"):
        from_torch_lstm_weights(sd, n_y=3, Wy=torch.zeros(2, N_A))
    with pytest.raises(ValueError, match="by"):
        from_torch_lstm_weights(sd, Wy=torch.zeros(2, N_A), by=torch.zeros(3))
    with pytest.raises(TypeError, match="state dict"):
        from_torch_lstm_weights([1, 2, 3], n_y=2)


# ------------------------------------------------- model classes: configuration carried
KINDS = ("LSTM", "GRU", "RNN")


def _batch_first_input(seed=0, m=M, T=T):
    return np.random.default_rng(seed).standard_normal((m, T, N_X))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_from_torch_carries_dropout_and_batch_first(kind, batch_first):
    """``dropout`` and ``batch_first`` come over with the weights: the model reads the
    module's layout, and runs what the module runs (eval mode: dropout off)."""
    import xlstm

    torch.manual_seed(12)
    mod = getattr(torch.nn, kind)(N_X, N_A, num_layers=2, dropout=0.3,
                                  batch_first=batch_first, dtype=torch.float64)
    model = getattr(xlstm, kind).from_torch(mod)
    assert model.dropout == 0.3
    assert model.layout == ("batch_first" if batch_first else "notebook")
    xb = _batch_first_input(1)  # (m, T, n_x)
    x = xb if batch_first else np.transpose(xb, (2, 0, 1))
    y, _, _ = model.forward(x, return_cache=False)
    with torch.no_grad():
        ty, _ = mod.eval()(torch.from_numpy(xb if batch_first else xb.transpose(1, 0, 2)))
    want = ty.numpy() if batch_first else np.transpose(ty.numpy(), (2, 1, 0))
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["notebook", "batch_first"])
def test_to_torch_carries_dropout_and_layout(kind, layout):
    import xlstm

    model = getattr(xlstm, kind)(N_X, N_A, num_layers=2, dropout=0.25, layout=layout,
                                 dtype="float64", seed=3)
    mod = model.to_torch()
    assert mod.dropout == 0.25 and mod.num_layers == 2
    assert mod.batch_first is (layout == "batch_first")
    xb = _batch_first_input(2)
    x = xb if layout == "batch_first" else np.transpose(xb, (2, 0, 1))
    y, _, _ = model.forward(x, return_cache=False)
    with torch.no_grad():
        ty, _ = mod.eval()(torch.from_numpy(xb if mod.batch_first else xb.transpose(1, 0, 2)))
    want = ty.numpy() if mod.batch_first else np.transpose(ty.numpy(), (2, 1, 0))
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-13)
    # and back again: the same configuration and weights
    back = type(model).from_torch(mod)
    assert (back.dropout, back.layout, back.num_layers) == (0.25, layout, 2)
    for a, b in zip(model.params, back.params):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_to_torch_of_one_layer_with_dropout_warns_as_torch_does():
    """A single layer with dropout is legal here and in torch, where dropout acts between
    layers only; torch's own warning says so."""
    import xlstm

    with pytest.warns(UserWarning, match="dropout"):
        mod = xlstm.LSTM(N_X, N_A, dropout=0.5, dtype="float64").to_torch()
    assert mod.dropout == 0.5


def test_from_torch_refuses_dropout_one():
    import xlstm

    mod = torch.nn.LSTM(N_X, N_A, num_layers=2, dropout=1.0)
    with pytest.raises(ValueError, match=r"dropout=1\.0.*\[0, 1\)"):
        xlstm.LSTM.from_torch(mod)


@pytest.mark.parametrize("kind", KINDS)
def test_from_torch_accepts_a_subclass(kind):
    """A subclass of ``torch.nn.LSTM`` (a common way to add a method or a hook) is an
    LSTM: its weights convert."""
    import xlstm

    sub = type("My" + kind, (getattr(torch.nn, kind),), {"extra": lambda self: 1})
    torch.manual_seed(13)
    mod = sub(N_X, N_A, num_layers=2, dtype=torch.float64)
    model = getattr(xlstm, kind).from_torch(mod)
    back = model.to_torch()
    for (k, a), (k2, b) in zip(mod.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    if kind == "LSTM":
        p = from_torch_lstm_weights(sub(N_X, N_A), n_y=2)
        assert p["Wf"].shape == (N_A, N_A + N_X)


def test_a_subclass_of_another_kind_is_still_refused():
    import xlstm

    sub = type("MyGRU", (torch.nn.GRU,), {})
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.LSTM"):
        xlstm.LSTM.from_torch(sub(N_X, N_A))


@pytest.mark.parametrize("kind", KINDS)
def test_from_torch_of_a_meta_module_says_so(kind):
    """A module on torch's 'meta' device has shapes but no values: a ValueError that names
    the device and says how to give it weights, not torch's NotImplementedError."""
    import xlstm

    mod = getattr(torch.nn, kind)(N_X, N_A, device="meta")
    with pytest.raises(ValueError, match=r"'meta' device.*to_empty"):
        getattr(xlstm, kind).from_torch(mod)
    # refused before a model of the module's size is built (meta modules are often huge)
    huge = getattr(torch.nn, kind)(10**6, 10**5, device="meta")
    with pytest.raises(ValueError, match=r"weight_ih_l0 is a tensor on torch's 'meta' device"):
        getattr(xlstm, kind).from_torch(huge)
    if kind == "LSTM":
        with pytest.raises(ValueError, match=r"weight_ih_l0 .*'meta' device"):
            from_torch_lstm_weights(mod, n_y=2)
        with pytest.raises(ValueError, match=r"'meta' device"):
            from_torch_lstm_weights(mod.state_dict(), n_y=2)
