"""The seed notebook's four examples: their inputs (the same random draws) and printed outputs.

Used by ``python -m xlstm check`` and by the tests. Inputs are drawn on the host with numpy's
legacy global generator, exactly as the notebook does.
"""

from __future__ import annotations

import numpy as np

GATE_DRAWS = (("Wf", "bf"), ("Wi", "bi"), ("Wo", "bo"), ("Wc", "bc"))  # the seed's draw order


def _params(zero_output=False):
    p = {}
    for W, b in GATE_DRAWS:
        p[W] = np.random.randn(5, 5 + 3)
        p[b] = np.random.randn(5, 1)
    if zero_output:
        p["Wy"], p["by"] = np.zeros((2, 5)), np.zeros((2, 1))
    else:
        p["Wy"], p["by"] = np.random.randn(2, 5), np.random.randn(2, 1)
    return p


def cell_case():
    """Inputs of the seed's ``lstm_cell_forward`` / ``lstm_cell_backward`` examples."""
    np.random.seed(1)
    xt = np.random.randn(3, 10)
    a_prev = np.random.randn(5, 10)
    c_prev = np.random.randn(5, 10)
    params = _params()
    da_next = np.random.randn(5, 10)
    dc_next = np.random.randn(5, 10)
    return xt, a_prev, c_prev, params, da_next, dc_next


def sequence_case(zero_output=False):
    """Inputs of the seed's ``lstm_forward`` (and, with zero output weights, backward) examples."""
    np.random.seed(1)
    x = np.random.randn(3, 10, 7)
    a0 = np.random.randn(5, 10)
    params = _params(zero_output)
    da = np.random.randn(5, 10, 4)  # covers only the first 4 of 7 steps, as in the seed
    return x, a0, params, da


CELL_FORWARD = {
    "a_next[4]": [-0.66408471, 0.0036921, 0.02088357, 0.22834167, -0.85575339, 0.00138482,
                  0.76566531, 0.34631421, -0.00215674, 0.43827275],
    "c_next[2]": [0.63267805, 1.00570849, 0.35504474, 0.20690913, -1.64566718, 0.11832942,
                  0.76449811, -0.0981561, -0.74348425, -0.26810932],
    "yt[1]": [0.79913913, 0.15986619, 0.22412122, 0.15606108, 0.97057211, 0.31146381,
              0.00943007, 0.12666353, 0.39380172, 0.07828381],
    "cache[1][3]": [-0.16263996, 1.03729328, 0.72938082, -0.54101719, 0.02752074, -0.30821874,
                    0.07651101, -1.03752894, 1.41219977, -0.37647422],
}  # fmt: skip

FORWARD = {
    "a[4][3][6]": 0.172117767533,
    "y[1][4][3]": 0.95087346185,
    "caches[1][1][1]": [0.82797464, 0.23009474, 0.76201118, -0.22232814, -0.20075807,
                        0.18656139, 0.41005165],
    "c[1][2][1]": -0.855544916718,
}  # fmt: skip

CELL_BACKWARD = {
    "dxt[1][2]": 3.23055911511,
    "da_prev[2][3]": -0.0639621419711,
    "dc_prev[2][3]": 0.797522038797,
    "dWf[3][1]": -0.147954838164,
    "dWi[1][2]": 1.05749805523,
    "dWc[3][1]": 2.30456216369,
    "dWo[1][2]": 0.331311595289,
    "dbf[4]": [0.18864637],
    "dbi[4]": [-0.40142491],
    "dbc[4]": [0.25587763],
    "dbo[4]": [0.13893342],
}

BACKWARD = {
    "dx[1][2]": [0.00218254, 0.28205375, -0.48292508, -0.43281115, 0.0, 0.0, 0.0],
    "da0[2][3]": 0.312770310257,
    "dWf[3][1]": -0.0809802310938,
    "dWi[1][2]": 0.40512433093,
    "dWc[3][1]": -0.0793746735512,
    "dWo[1][2]": 0.038948775763,
    "dbf[4]": [-0.15745657],
    "dbi[4]": [-0.50848333],
    "dbc[4]": [-0.42510818],
    "dbo[4]": [-0.17958196],
}
