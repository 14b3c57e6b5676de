"""Bad input fails early, with the exception type and the culprit's name in the message."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import to_xp
from oracles import random_case

import xlstm
from xlstm.cells.lstm import LSTM_CELL

N_X, N_A, N_Y, M, T = 3, 4, 2, 5, 6


def good():
    """A valid case as a dict: ``x``, ``a0``, ``c0`` and ``params``."""
    return random_case(0, N_X, N_A, N_Y, M, T, scale=1.0)._asdict()


def forward(d):
    return xlstm.lstm_forward(d["x"], d["a0"], d["params"], c0=d["c0"])


def without(params, key):
    return {k: v for k, v in params.items() if k != key}


def with_(params, key, value):
    return {**params, key: value}


FORWARD_CASES = {
    "missing Wf": (KeyError, "'Wf'", lambda d: {**d, "params": without(d["params"], "Wf")}),
    "missing by": (KeyError, "'by'", lambda d: {**d, "params": without(d["params"], "by")}),
    "Wi shape": (ValueError, "params['Wi']",
                 lambda d: {**d, "params": with_(d["params"], "Wi", np.ones((N_A, N_A + N_X + 1)))}),
    "bo shape": (ValueError, "params['bo']",
                 lambda d: {**d, "params": with_(d["params"], "bo", np.ones((N_A,)))}),
    "Wy shape": (ValueError, "params['Wy']",
                 lambda d: {**d, "params": with_(d["params"], "Wy", np.ones((N_Y, N_A + 1)))}),
    "by shape": (ValueError, "params['by']",
                 lambda d: {**d, "params": with_(d["params"], "by", np.ones((N_Y + 1, 1)))}),
    "x rank": (ValueError, "x must be 3-D", lambda d: {**d, "x": d["x"][:, :, 0]}),
    "x n_x": (ValueError, "x has n_x=2", lambda d: {**d, "x": d["x"][:2]}),
    "a0 n_a": (ValueError, "a0 has n_a=3", lambda d: {**d, "a0": d["a0"][:3]}),
    "a0 m": (ValueError, "a0 has m=4", lambda d: {**d, "a0": d["a0"][:, :4]}),
    "c0 m": (ValueError, "c0 has m=2", lambda d: {**d, "c0": d["c0"][:, :2]}),
    "x int": (TypeError, "x must have a real floating dtype",
              lambda d: {**d, "x": d["x"].astype(np.int64)}),
    "a0 bool": (TypeError, "a0 must have a real floating dtype",
                lambda d: {**d, "a0": d["a0"] > 0}),
    "Wc int": (TypeError, "params['Wc'] must have a real floating dtype",
               lambda d: {**d, "params": with_(d["params"], "Wc", np.ones((N_A, N_A + N_X), int))}),
    "dtype mix": (TypeError, "a0 is float32",
                  lambda d: {**d, "a0": d["a0"].astype(np.float32)}),
    "list": (TypeError, "x must be an array", lambda d: {**d, "x": d["x"].tolist()}),
    "params type": (TypeError, "params must be a dict", lambda d: {**d, "params": [1, 2]}),
    "empty T": (ValueError, "x has T_x=0", lambda d: {**d, "x": d["x"][:, :, :0]}),
}


@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_forward_bad_input(case):
    exc, words, mutate = FORWARD_CASES[case]
    with pytest.raises(exc) as info:
        forward(mutate(good()))
    assert words in str(info.value)


def test_cell_bad_input():
    d = good()
    xt, a, c, p = d["x"][:, :, 0], d["a0"], d["c0"], d["params"]
    with pytest.raises(ValueError, match="xt must be 2-D"):
        xlstm.lstm_cell_forward(d["x"], a, c, p)
    with pytest.raises(ValueError, match="xt has n_x=2"):
        xlstm.lstm_cell_forward(xt[:2], a, c, p)
    with pytest.raises(ValueError, match="a_prev has n_a=3"):
        xlstm.lstm_cell_forward(xt, a[:3], c, p)
    with pytest.raises(ValueError, match="c_prev has m=1"):
        xlstm.lstm_cell_forward(xt, a, c[:, :1], p)
    *_, cache = xlstm.lstm_cell_forward(xt, a, c, p)
    with pytest.raises(ValueError, match="da_next has m=4"):
        xlstm.lstm_cell_backward(a[:, :4], c, cache)
    with pytest.raises(TypeError, match="cache must be the 10-tuple"):
        xlstm.lstm_cell_backward(a, c, cache[:9])


def test_backward_bad_input():
    d = good()
    *_, caches = forward(d)
    da = np.ones((N_A, M, T))
    with pytest.raises(ValueError, match="T_da=7") as info:
        xlstm.lstm_backward(np.ones((N_A, M, T + 1)), caches)
    assert "T_x=6" in str(info.value)
    with pytest.raises(ValueError, match="da must be 3-D"):
        xlstm.lstm_backward(da[:, :, 0], caches)
    with pytest.raises(ValueError, match="da has n_a=3"):
        xlstm.lstm_backward(da[:3], caches)
    with pytest.raises(ValueError, match="da has m=2"):
        xlstm.lstm_backward(da[:, :2], caches)
    with pytest.raises(TypeError, match="da must have a real floating dtype"):
        xlstm.lstm_backward(da.astype(int), caches)
    with pytest.raises(TypeError, match="caches must be the pair"):
        xlstm.lstm_backward(da, caches[0])
    with pytest.raises(ValueError, match="T_da=7"):  # the per-step path checks it too
        xlstm.lstm_backward(np.ones((N_A, M, T + 1)), (list(caches[0]), caches[1]))


def test_mixed_namespaces_are_named():
    s = pytest.importorskip("array_api_strict")
    d = good()
    with pytest.raises(TypeError, match="x is .*numpy.* but a0 is .*array_api_strict"):
        xlstm.lstm_forward(d["x"], s.asarray(d["a0"]), d["params"])
    P = dict(d["params"], Wo=s.asarray(d["params"]["Wo"]))
    with pytest.raises(TypeError, match=r"params\['Wo'\] is .*array_api_strict"):
        xlstm.lstm_forward(d["x"], d["a0"], P)


def test_mixed_devices_are_named():
    s = pytest.importorskip("array_api_strict")
    d = to_xp(good(), s, s.Device("CPU_DEVICE"))
    d["c0"] = s.asarray(d["c0"], device=s.Device("device1"))
    with pytest.raises(ValueError, match="device mismatch: x is on .* but c0 is on"):
        forward(d)


def test_none_and_masked_arrays_are_named():
    d = good()
    with pytest.raises(TypeError, match="a0 must be an array, got None"):
        xlstm.lstm_forward(d["x"], None, d["params"])
    with pytest.raises(TypeError, match="x must be an array, got None"):
        xlstm.lstm_forward(None, d["a0"], d["params"])
    with pytest.raises(TypeError, match=r"params\['Wc'\] must be an array, got None"):
        xlstm.lstm_forward(d["x"], d["a0"], with_(d["params"], "Wc", None))
    with pytest.raises(TypeError, match="xt must be an array, got None"):
        xlstm.lstm_cell_forward(None, d["a0"], d["c0"], d["params"])
    masked = np.ma.masked_array(d["x"], mask=d["x"] > 1.0)
    with pytest.raises(TypeError, match="x is a numpy masked array"):
        xlstm.lstm_forward(masked, d["a0"], d["params"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # numpy's own, on matrix
        matrix = np.asmatrix(d["a0"])
    with pytest.raises(TypeError, match="a0 is a numpy.matrix"):
        xlstm.lstm_forward(d["x"], matrix, d["params"])
    *_, caches = forward(d)
    with pytest.raises(TypeError, match="da must be an array, got None"):
        xlstm.lstm_backward(None, caches)
    with pytest.raises(TypeError, match=r"caches\[1\] must be an array, got None"):
        xlstm.lstm_backward(np.ones((N_A, M, T)), (list(caches[0]), None))
    # a memmap is an ndarray subclass that behaves as one: accepted
    a, *_ = xlstm.lstm_forward(d["x"].view(np.memmap), d["a0"], d["params"], c0=d["c0"])
    np.testing.assert_array_equal(a, forward(d)[0])


def test_forged_caches_are_named():
    d = good()
    *_, caches = forward(d)
    da = np.ones((N_A, M, T))
    state = caches.state
    forged = {
        "not a state": (TypeError, "caches.state is not the forward state",
                        xlstm.LSTMCaches(caches[0], caches[1], ("A", "C"))),
        "short S": (ValueError, r"caches.state.S has shape \(5, 5, 12\)",
                    xlstm.LSTMCaches(caches[0], caches[1], state._replace(S=state.S[:-1]))),
        "n_a": (ValueError, "caches.state.params has n_a=4 but caches.state.n_a is 3",
                xlstm.LSTMCaches(caches[0], caches[1], state._replace(n_a=3))),
        "float32 X": (TypeError, "caches.state.X is float32",
                      xlstm.LSTMCaches(caches[0], caches[1],
                                       state._replace(X=state.X.astype(np.float32)))),
        "list A": (TypeError, "caches.state.A must be an array",
                   xlstm.LSTMCaches(caches[0], caches[1], state._replace(A=state.A.tolist()))),
        "params": (KeyError, "'Wo'", xlstm.LSTMCaches(
            caches[0], caches[1], state._replace(params=without(state.params, "Wo")))),
    }
    assert isinstance(state, LSTM_CELL.Cache)
    for name, (exc, words, bad) in forged.items():
        with pytest.raises(exc, match=words):
            xlstm.lstm_backward(da, bad)


def test_foreign_caches_are_named():
    s = pytest.importorskip("array_api_strict")
    d = good()
    *_, caches = forward(d)
    with pytest.raises(TypeError, match="da is .*array_api_strict.* but caches is .*numpy"):
        xlstm.lstm_backward(s.asarray(np.ones((N_A, M, T))), caches)


MODELS = pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN", "SLSTM", "MLSTM"])


def test_init_params_seed_is_checked_by_name():
    """The notebook's ``init_params`` checks its seed as the models do; the numbers of a
    valid seed are unchanged."""
    for seed in (-1, np.int64(-3)):
        with pytest.raises(ValueError, match=r"seed must be an int >= 0, a numpy Generator "
                                             r"or None, got -\d+: .*such as seed=\d"):
            xlstm.init_params(N_X, N_A, 2, seed=seed)
    for seed in (1.5, "1", True):
        with pytest.raises(TypeError, match=r"seed must be an int >= 0.*such as seed=\d"):
            xlstm.init_params(N_X, N_A, 2, seed=seed)
    want = xlstm.init_params(N_X, N_A, 2, seed=np.random.default_rng(4))
    for seed in (4, np.int64(4)):
        got = xlstm.init_params(N_X, N_A, 2, seed=seed)
        assert all(np.array_equal(got[k], want[k]) for k in want)


@MODELS
def test_model_seeds_are_checked_by_name(cls):
    """A seed numpy's generators refuse (negative, not an integer) is named, with the fix;
    any integer type and a numpy Generator are accepted."""
    model = getattr(xlstm, cls)
    x = np.zeros((N_X, M, T))
    for seed in (-1, np.int64(-3)):
        with pytest.raises(ValueError, match=r"seed must be an int >= 0, a numpy Generator "
                                             r"or None, got -\d+: .*such as seed=\d"):
            model(N_X, N_A, seed=seed)
    for seed in (1.5, "1", True):
        with pytest.raises(TypeError, match=r"seed must be an int >= 0.*; pass an int such "
                                            r"as seed=\d"):
            model(N_X, N_A, seed=seed)
    ok = model(N_X, N_A, num_layers=2, dropout=0.5, seed=np.random.default_rng(0),
               dtype=np.float64)
    ok.forward(x, train=True, seed=np.int64(3))  # numpy integers are ints
    with pytest.raises(ValueError, match=r"seed must be an int >= 0 or None, got -2: .*"
                                         r"seed=2"):
        ok.forward(x, train=True, seed=-2)
    with pytest.raises(TypeError, match=r"seed must be an int >= 0 or None, got 2.5"):
        ok.forward(x, train=True, seed=2.5)


@MODELS
def test_model_dropout_takes_any_real_number(cls):
    """numpy's scalars are real numbers: ``dropout=np.float32(0.25)`` works as 0.25 does."""
    for p in (np.float32(0.25), np.float64(0.25), np.int64(0)):
        model = getattr(xlstm, cls)(N_X, N_A, num_layers=2, dropout=p)
        assert model.dropout == float(p) and type(model.dropout) is float
    for p in (np.True_, np.float32(np.nan), np.float32(1.0), "0.25"):
        with pytest.raises(ValueError, match="dropout must be a float in"):
            getattr(xlstm, cls)(N_X, N_A, dropout=p)


@MODELS
def test_model_parameters_that_are_not_arrays_are_named(cls):
    model = getattr(xlstm, cls)(N_X, N_A)
    key = next(iter(model.params[0]))
    params = [{**model.params[0], key: model.params[0][key].tolist()}]
    with pytest.raises(TypeError, match=rf"params\[0\]\['{key}'\] must be an array of shape "
                                        r"\(.*\), got list; convert it"):
        model.forward(np.zeros((N_X, M, T)), params=params)
    params = [{**model.params[0], key: None}]
    with pytest.raises(TypeError, match=rf"params\[0\]\['{key}'\] .* got NoneType"):
        model.forward(np.zeros((N_X, M, T)), params=params)


@MODELS
def test_model_input_mistakes_say_the_fix(cls):
    """A newcomer's first mistakes: the shape is checked before the dtype, and the messages
    say the fix: ``layout="batch_first"``, ``dtype=np.float32``, ``xp=...``."""
    model = getattr(xlstm, cls)(N_X, N_A, dtype=np.float64)  # notebook layout
    batch_first = np.zeros((M, T, N_X), np.float32)
    with pytest.raises(ValueError, match=r"got \(5, 6, 3\); that is the batch-first layout "
                                         r"\(m, T, n_x\): build the model with "
                                         r'layout="batch_first"'):
        model.forward(batch_first)
    with pytest.raises(ValueError, match=r'that is the notebook layout .*layout="notebook"'):
        getattr(xlstm, cls)(N_X, N_A, layout="batch_first").forward(np.zeros((N_X, M, T)))
    with pytest.raises(TypeError, match=r"dtype mismatch: x is float32 .* The model's "
                                        r"parameters are float64: build the model with "
                                        r"dtype=np.float32 to run float32 inputs"):
        model.forward(np.zeros((N_X, M, T), np.float32))
    s = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match=r"mixed array namespaces: .* build the model with "
                                        r"xp=array_api_strict"):
        model.forward(s.zeros((N_X, M, T), dtype=s.float64))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"build the model with xp=torch to run torch inputs"):
        model.forward(torch.zeros((N_X, M, T), dtype=torch.float64))
