"""Using a model as torch, Keras and Flax users do (DESIGN 4.4): float32 by default,
``model(x)``, ``model.step``, ``initial_state``, ``num_parameters``, ``repr``, ``to``,
pickling and deep copies, and torch's argument names."""

from __future__ import annotations

import copy
import functools
import pickle

import numpy as np
import pytest
from conftest import on_backends
from helpers import assert_array, assert_close, to_numpy

import xlstm
from xlstm._lib import compat as _compat
from xlstm.models import MODELS

NP, CPU = _compat.load_backend("numpy")
N_X, N_A, M, T = 3, 4, 2, 5


def _makers():
    return [pytest.param(functools.partial(cls, **kw), id=name)
            for name, (cls, kw) in MODELS.items()]


EVERY_MODEL = pytest.mark.parametrize("make", _makers())


def _heads(make):
    """Two heads where the model has them (the sLSTM's and mLSTM's recurrence)."""
    return {"num_heads": 2} if make.func in (xlstm.SLSTM, xlstm.MLSTM) else {}


@EVERY_MODEL
def test_float32_by_default_and_the_notebook_keeps_float64(make):
    model = make(N_X, N_A)
    for layer in model.params:
        for v in layer.values():
            assert v.dtype == np.float32
    assert model.config()["dtype"] == "float32"
    assert xlstm.init_params(N_X, N_A, 2, seed=0)["Wf"].dtype == np.float64


def _step_cases(name, xp):
    cases = []
    for layers in (1, 2):
        for layout in ("notebook", "batch_first"):
            # every model and configuration on numpy; elsewhere every model with two
            # layers, batch first
            if name != "numpy" and not (layers == 2 and layout == "batch_first"):
                continue
            for mk in _makers():
                cases.append(pytest.param(mk.values[0], layers, layout,
                                          id=f"{mk.id}-L{layers}-{layout}"))
    return cases


@pytest.mark.parametrize("backend, make, layers, layout", on_backends(_step_cases),
                         indirect=["backend"])
def test_step_over_a_sequence_equals_the_call(backend, make, layers, layout):
    """T calls of ``step`` give ``model(x)``'s outputs and final state to rounding, from a
    given state too, in the model's namespace, dtype and device."""
    _, xp, device = backend
    model = make(N_X, N_A, num_layers=layers, layout=layout, xp=xp, dtype="float64",
                 device=device, seed=3, **_heads(make))
    rng = np.random.default_rng(1)
    first = layout == "batch_first"
    x = xp.asarray(rng.standard_normal((M, T, N_X) if first else (N_X, M, T)), device=device)
    start = tuple(xp.asarray(0.3 * rng.standard_normal(s.shape), device=device)
                  for s in model.initial_state(M))
    if make.func is xlstm.SLSTM:  # a valid state: a positive normaliser
        start = start[:2] + (xp.abs(start[2]) + 0.5,) + start[3:]
    if make.func is xlstm.MLSTM:
        start = start[:1] + (xp.abs(start[1]) + 0.5,) + start[2:]
    for state0 in (None, start):
        y, final = model(x, state0)
        state = model.initial_state(M) if state0 is None else state0
        ys = []
        for t in range(T):
            y_t, state = model.step(x[:, t, :] if first else x[:, :, t], state)
            assert_array(y_t, xp=xp, device=device, dtype=xp.float64,
                         shape=(M, N_A) if first else (N_A, M))
            ys.append(to_numpy(y_t))
        stepped = np.stack(ys, axis=1 if first else 2)
        np.testing.assert_allclose(stepped, to_numpy(y), rtol=1e-10, atol=1e-12)
        for name, a, b in zip(model.layer.state_names, state, final):
            assert_array(a, xp=xp, device=device, dtype=xp.float64, shape=b.shape)
            # the stabiliser too: the steps take the recurrent form's, step by step
            np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-10, atol=1e-12,
                                       err_msg=name)


@EVERY_MODEL
def test_the_call_is_forward_without_a_cache(make):
    model = make(N_X, N_A, num_layers=2, bidirectional=True, seed=1, **_heads(make))
    x = np.random.default_rng(0).standard_normal((N_X, M, T)).astype(np.float32)
    lengths = np.array([T, 2])
    y, state = model(x, lengths=lengths)
    y2, state2, cache = model.forward(x, lengths=lengths, return_cache=False)
    assert cache is None
    assert_close(y, y2, xp=NP, device=CPU, rtol=0, atol=0)
    for a, b in zip(state, state2):
        assert_close(a, b, xp=NP, device=CPU, rtol=0, atol=0)


def test_step_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="bidirectional LSTM's reverse direction needs the "
                                         r"whole sequence; call the model on it, model\(x\)"):
        xlstm.LSTM(N_X, N_A, bidirectional=True).step(np.zeros((N_X, M), np.float32))
    model = xlstm.GRU(N_X, N_A, layout="batch_first")
    with pytest.raises(ValueError, match=r"x_t must have shape \(m, n_x\) with n_x=3 "
                                         r"\(layout='batch_first'\), got \(3, 2\)"):
        model.step(np.zeros((N_X, M), np.float32))
    with pytest.raises(ValueError, match=r"state a must have shape"):
        model.step(np.zeros((M, N_X), np.float32), (np.zeros((1, N_A, M + 1), np.float32),))


def test_step_sees_new_parameters():
    """The fused weights kept between steps are made again when ``params`` holds other
    arrays, or a torch tensor was written in place."""
    model = xlstm.LSTM(N_X, N_A, seed=0)
    x = np.ones((N_X, M), np.float32)
    y0, _ = model.step(x)
    model.params = [{k: v * 2 for k, v in layer.items()} for layer in model.params]
    y1, _ = model.step(x)
    assert_close(y1, model(x[:, :, None])[0][:, :, 0], xp=NP, device=CPU)
    assert not np.allclose(y0, y1)
    torch = pytest.importorskip("torch")
    tm = model.to(torch)
    xt = torch.ones((N_X, M))
    tm.step(xt)
    with torch.no_grad():
        tm.params[0]["Wf"].mul_(3.0)  # in place: the version counter moves
    y2, _ = tm.step(xt)
    np.testing.assert_allclose(y2.numpy(), tm(xt[:, :, None])[0][:, :, 0].numpy(),
                               rtol=1e-6, atol=1e-7)


@EVERY_MODEL
def test_initial_state_and_num_parameters(make):
    model = make(N_X, N_A, num_layers=2, bidirectional=True, **_heads(make))
    state = model.initial_state(M)
    _, final = model(np.zeros((N_X, M, T), np.float32))
    assert len(state) == len(final)
    for s, f in zip(state, final):
        assert_array(s, xp=NP, device=CPU, dtype=np.float32, shape=f.shape)
        assert not np.any(s)
    assert model.num_parameters() == sum(v.size for layer in model.params
                                         for v in layer.values())
    with pytest.raises(ValueError, match="m must be"):
        model.initial_state(0)


def test_num_parameters_matches_torch():
    torch = pytest.importorskip("torch")
    module = torch.nn.LSTM(3, 7, num_layers=2, bidirectional=True)
    assert xlstm.LSTM.from_torch(module).num_parameters() == \
        sum(p.numel() for p in module.parameters())


def test_repr_shows_what_differs_from_the_defaults():
    assert repr(xlstm.LSTM(3, 4)) == "LSTM(n_x=3, n_a=4, dtype='float32', xp='numpy')"
    assert repr(xlstm.MLSTM(3, 4, num_heads=2, layout="batch_first", dropout=0.25,
                            dtype="float64")) == (
        "MLSTM(n_x=3, n_h=4, num_heads=2, dropout=0.25, layout='batch_first', "
        "dtype='float64', xp='numpy')")
    assert repr(xlstm.MLSTM(3, 4, d_qk=3)).startswith("MLSTM(n_x=3, n_h=4, d_qk=3,")
    assert "nonlinearity='relu'" in repr(xlstm.RNN(3, 4, nonlinearity="relu"))
    assert "cell='mgu'" in repr(xlstm.models.Recurrent(3, 4, cell="mgu"))


@EVERY_MODEL
def test_pickle_and_deepcopy_keep_the_model(make):
    model = make(N_X, N_A, num_layers=2, layout="batch_first", dtype="float64", seed=4,
                 **_heads(make))
    x = np.random.default_rng(2).standard_normal((M, T, N_X))
    y, _ = model(x)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone) is type(model) and repr(clone) == repr(model)
        assert clone.config() == model.config()
        assert clone.xp is model.xp and clone.dtype == model.dtype
        for a, b in zip(clone.params, model.params):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k] is not b[k]
                assert_close(a[k], b[k], xp=NP, device=CPU, rtol=0, atol=0)
        assert_close(clone(x)[0], y, xp=NP, device=CPU, rtol=0, atol=0)


def test_pickle_stores_the_namespace_by_name(backend):
    name, xp, device = backend
    try:
        pickle.loads(pickle.dumps(xp.asarray([1.0], device=device)))
    except Exception as exc:  # noqa: BLE001 - array-api-strict 2.3's arrays do not unpickle
        pytest.skip(f"{name}'s arrays do not pickle: {exc}")
    model = xlstm.GRU(N_X, N_A, xp=xp, device=device, seed=1)
    clone = pickle.loads(pickle.dumps(model))
    assert clone.xp is model.xp
    assert_array(clone.params[0]["Wr"], xp=xp, device=device, dtype=xp.float32)
    x = xp.asarray(np.ones((N_X, M, T), np.float32), device=device)
    assert_close(clone(x)[0], model(x)[0], xp=xp, device=device, rtol=0, atol=0)


def test_to_converts_a_copy(backend):
    name, xp, device = backend
    model = xlstm.SLSTM(N_X, N_A, num_heads=2, num_layers=2, seed=2)
    other = model.to(xp, dtype="float64", device=device)
    assert type(other) is xlstm.SLSTM and other.num_heads == 2
    assert model.dtype == np.float32 and model.params[0]["W"].dtype == np.float32  # unchanged
    x = np.random.default_rng(0).standard_normal((N_X, M, T)).astype(np.float32)
    y, _ = other(xp.asarray(x, dtype=xp.float64, device=device))
    assert_array(y, xp=xp, device=device, dtype=xp.float64, shape=(N_A, M, T))
    np.testing.assert_allclose(to_numpy(y), model(x)[0], rtol=1e-5, atol=1e-6)
    back = other.to(np)
    assert back.params[0]["W"].dtype == np.float64
    for a, b in zip(back.params, other.params):
        for k in a:
            np.testing.assert_array_equal(a[k], to_numpy(b[k]))
    same = model.to()  # a copy that shares no memory
    same.params[0]["W"][...] = 0
    assert np.any(model.params[0]["W"])


def test_torch_names_are_aliases_and_unknown_names_are_named():
    model = xlstm.LSTM(input_size=3, hidden_size=5, batch_first=True, num_layers=2)
    assert (model.n_x, model.n_a, model.layout, model.num_layers) == (3, 5, "batch_first", 2)
    assert xlstm.SLSTM(input_size=3, hidden_size=4, num_heads=2).n_h == 4
    assert xlstm.GRU(3, 4, batch_first=False).layout == "notebook"
    with pytest.raises(TypeError, match=r"GRU\(\) has no argument 'proj_size': a projection "
                                        r"\(torch's LSTMP\) is the LSTM's"):
        xlstm.GRU(3, 4, proj_size=2)
    with pytest.raises(TypeError, match=r"GRU\(\) has no argument 'bias': .*set them to zero"):
        xlstm.GRU(3, 4, bias=False)
    with pytest.raises(TypeError, match=r"RNN\(\) got an unexpected keyword argument 'hidden'; "
                                        r"its arguments are n_x, n_a, nonlinearity, "):
        xlstm.RNN(3, hidden=4)
    with pytest.raises(TypeError, match=r"got both 'hidden_size' and 'n_a'"):
        xlstm.LSTM(3, n_a=4, hidden_size=4)
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        xlstm.LSTM(3, 4, batch_first="yes")


def test_jit_reads_lengths_closed_over(backend_named):
    """Lengths that a jitted function closes over are concrete: checked and used."""
    xp, device = backend_named("jax")
    import jax

    model = xlstm.GRU(N_X, N_A, xp=xp, device=device, seed=1)
    x = xp.asarray(np.ones((N_X, M, T), np.float32), device=device)
    lengths = xp.asarray([T, 2], device=device)
    y = jax.jit(lambda x: model(x, lengths=lengths)[0])(x)
    assert_close(y, model(x, lengths=lengths)[0], xp=xp, device=device)
    bad = xp.asarray([T + 1, 2], device=device)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, T\]"):
        jax.jit(lambda x: model(x, lengths=bad)[0])(x)
