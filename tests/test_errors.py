"""Bad input fails early, with the exception type and the culprit's name in the message."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import to_xp

import xlstm

N_X, N_A, N_Y, M, T = 3, 4, 2, 5, 6


def good(rng=None):
    rng = rng or np.random.default_rng(0)
    params = {k: rng.standard_normal((N_A, N_A + N_X)) for k in ("Wf", "Wi", "Wc", "Wo")}
    params.update({k: rng.standard_normal((N_A, 1)) for k in ("bf", "bi", "bc", "bo")})
    params["Wy"], params["by"] = rng.standard_normal((N_Y, N_A)), rng.standard_normal((N_Y, 1))
    return {
        "x": rng.standard_normal((N_X, M, T)),
        "a0": rng.standard_normal((N_A, M)),
        "c0": rng.standard_normal((N_A, M)),
        "params": params,
    }


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
