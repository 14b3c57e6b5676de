"""The notebook's LSTM, one step at a time: the "before" baseline of ``bench_lstm.py``."""

from __future__ import annotations


class SeedLSTM:
    """The notebook's LSTM, one step at a time: the "before" baseline.

    ``xp`` is the numpy or cupy module. Everything is float64, as in the notebook: the
    parameters are converted and every buffer comes from ``xp.zeros``.
    """

    def __init__(self, params, xp):
        self.xp = xp
        self.p = {k: xp.asarray(v, dtype=xp.float64) for k, v in params.items()}

    def _sigmoid(self, z):
        return 1 / (1 + self.xp.exp(-z))

    def _softmax(self, z):
        e = self.xp.exp(z - self.xp.max(z))
        return e / e.sum(axis=0)

    def cell_forward(self, xt, a_prev, c_prev):
        np, p = self.xp, self.p
        n_a, (n_x, m) = a_prev.shape[0], xt.shape
        concat = np.zeros((n_a + n_x, m))
        concat[:n_a, :] = a_prev
        concat[n_a:, :] = xt
        ft = self._sigmoid(np.dot(p["Wf"], concat) + p["bf"])
        it = self._sigmoid(np.dot(p["Wi"], concat) + p["bi"])
        cct = np.tanh(np.dot(p["Wc"], concat) + p["bc"])
        c_next = ft * c_prev + it * cct
        ot = self._sigmoid(np.dot(p["Wo"], concat) + p["bo"])
        a_next = ot * np.tanh(c_next)
        yt_pred = self._softmax(np.dot(p["Wy"], a_next) + p["by"])
        cache = (a_next, c_next, a_prev, c_prev, ft, it, cct, ot, xt, p)
        return a_next, c_next, yt_pred, cache

    def forward(self, x, a0):
        np = self.xp
        _, m, T_x = x.shape
        n_y, n_a = self.p["Wy"].shape
        a, c, y = np.zeros((n_a, m, T_x)), np.zeros((n_a, m, T_x)), np.zeros((n_y, m, T_x))
        a_next, c_next = a0, np.zeros((n_a, m))
        caches = []
        for t in range(T_x):
            a_next, c_next, yt, cache = self.cell_forward(x[:, :, t], a_next, c_next)
            a[:, :, t], c[:, :, t], y[:, :, t] = a_next, c_next, yt
            caches.append(cache)
        return a, y, c, (caches, x)

    def cell_backward(self, da_next, dc_next, cache):
        np = self.xp
        a_next, c_next, a_prev, c_prev, ft, it, cct, ot, xt, p = cache
        n_a = a_next.shape[0]
        tc = np.tanh(c_next)
        dtc = ot * (1 - tc**2) * da_next  # into c through a = o tanh(c)
        dot = da_next * tc * ot * (1 - ot)
        dcct = (dc_next * it + dtc * it) * (1 - cct**2)
        dit = (dc_next * cct + dtc * cct) * it * (1 - it)
        dft = (dc_next * c_prev + dtc * c_prev) * ft * (1 - ft)
        concat = np.concatenate((a_prev, xt), axis=0)
        g = {}
        for gate, d in (("f", dft), ("i", dit), ("c", dcct), ("o", dot)):
            g["dW" + gate] = np.dot(d, concat.T)
            g["db" + gate] = np.sum(d, axis=1, keepdims=True)
        parts = [(p["Wf"], dft), (p["Wi"], dit), (p["Wc"], dcct), (p["Wo"], dot)]
        g["da_prev"] = sum(np.dot(W[:, :n_a].T, d) for W, d in parts)
        g["dxt"] = sum(np.dot(W[:, n_a:].T, d) for W, d in parts)
        g["dc_prev"] = dc_next * ft + dtc * ft
        return g

    def backward(self, da, caches):
        np = self.xp
        steps, _ = caches
        (n_x, m), (n_a, _, T_x) = steps[0][8].shape, da.shape
        dx = np.zeros((n_x, m, T_x))
        da_prevt, dc_prevt = np.zeros((n_a, m)), np.zeros((n_a, m))
        grads = {f"d{w}{g}": np.zeros((n_a, n_a + n_x) if w == "W" else (n_a, 1))
                 for w in "Wb" for g in "fico"}  # fmt: skip
        for t in reversed(range(T_x)):
            g = self.cell_backward(da[:, :, t] + da_prevt, dc_prevt, steps[t])
            da_prevt, dc_prevt = g["da_prev"], g["dc_prev"]
            dx[:, :, t] = g["dxt"]
            for k in grads:
                grads[k] += g[k]
        return {"dx": dx, "da0": da_prevt, **grads, "dc0": dc_prevt}
