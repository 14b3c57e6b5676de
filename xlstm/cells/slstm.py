"""The sLSTM cell of xLSTM (Beck et al. 2024), for the engine: exponential gating with a
normaliser and a stabiliser, and a block-diagonal recurrence (one dense block per head).

Parameters of one (layer, direction): ``W (4, n_h, n_x)``, ``R (4, H, d, d)`` with
``d = n_h / H`` heads, ``b (4, n_h, 1)``, gate order :data:`GATES` = ``(i, f, z, o)``; the
recurrent term of gate ``g`` for head ``k`` is ``R[g, k] @ h_prev[k d:(k + 1) d]``.

One step, per unit (``pre = W x + R h_prev + b``; ``lf = logsigmoid(f~)``, or ``f~`` itself
for the exponential forget gate)::

    m   = max(lf + m_prev, i~)              the stabiliser
    i'  = exp(i~ - m),  f' = exp(lf + m_prev - m)
    c   = f' c_prev + i' tanh(z~),  n = f' n_prev + i'
    h   = sigmoid(o~) c / n

State ``(h, c, n, m)``. ``h`` does not depend on ``m`` (scaling ``i'`` and ``f'`` by a common
factor scales ``c`` and ``n`` alike), so ``m`` gets no gradient (:attr:`Cell.frozen`) and the
stabilised form equals the plain one, ``i' = exp(i~)``, ``f' = sigmoid(f~)``, to rounding.
Where ``n`` of the initial state is zero (an empty memory, as in a zero state) the step
takes ``m = i~`` and forgets ``c``: :meth:`SLSTMCell.start` sets that ``m`` to ``-inf``, so
``max`` picks ``i~`` and ``f' = 0`` without a branch. Then ``n >= min(1, n_0) > 0`` at every
later step (``i'`` or ``f'`` is 1), so ``h`` is finite for pre-activations of any size:
``i'`` and ``f'`` never exceed 1, and ``logsigmoid`` is formed as
``min(f, 0) - log1p(exp(-|f|))``.

Layout for the engine: the input and recurrent terms are ``(m, 4 n_h)`` blocks in gate
order ``(i, f, z, o)``; the block-diagonal ``R`` is fused into a dense ``(n_h, 4 n_h)``
``WaT`` with zero blocks off the diagonal. The output gate's rows are halved (exact), so
that ``sigmoid(o~) = 0.5 tanh(o~ / 2) + 0.5`` comes from the same ``tanh`` call as
``tanh(z~)``; :meth:`SLSTMCell.unfuse_grads` halves their gradients back.
"""

from __future__ import annotations

from .._lib.compat import device_of as _device
from .base import Cell, register

__all__ = ["SLSTMCell", "SLSTMExpCell", "SLSTM_CELL", "SLSTM_EXP_CELL", "GATES", "FORGET_GATES"]

#: Gate order of ``W``, ``R`` and ``b``, and of the fused blocks.
GATES = ("i", "f", "z", "o")
#: The forget gates: ``logsigmoid(f~)`` or ``f~`` itself in the exponent.
FORGET_GATES = ("sigmoid", "exp")


# ---------------------------------------------------------------- point functions
def neg_abs(f):
    """``-|f|``, the argument of ``exp`` in :func:`logsigmoid_and_slope`."""
    return -abs(f)


def logsigmoid_and_slope(half, one, f, s, e, l1p):
    """``logsigmoid(f) = min(f, 0) - log1p(exp(-|f|))`` and its derivative
    ``sigmoid(-f)``, from ``s = sign(f)``, ``e = exp(-|f|)`` and ``l1p = log1p(e)``:
    ``sigmoid(-f)`` is ``e / (1 + e)`` for ``f > 0`` and ``1 / (1 + e)`` for ``f < 0``."""
    lf = half * (f - abs(f)) - l1p
    slope = (half * (one - s) + half * (one + s) * e) / (one + e)
    return lf, slope


def exponents(i, lf, m_prev, m):
    """The exponents of the stabilised gates: ``i~ - m`` and ``lf + m_prev - m``."""
    return i - m, lf + m_prev - m


def cell_update(half, ip, fp, zt, to, c_prev, n_prev):
    """``c``, ``n`` and ``h = sigmoid(o~) c / n`` (``to = tanh(o~ / 2)``); ``c`` and ``n``
    twice, as states and as what the backward pass reads."""
    c = fp * c_prev + ip * zt
    n = fp * n_prev + ip
    h = (half * to + half) * c / n
    return c, n, h, c, n


def backward_step(one, half, da, da_rec, dc, dn, ip, fp, lfd, zt, to, c, n, c_prev, n_prev):
    """The gradients of the four pre-activations (the output gate's halved one) and those
    reaching ``c_prev`` and ``n_prev``, from the gradients reaching the step's ``h``, ``c``
    and ``n``; ``m`` is held constant (``h`` does not depend on it)."""
    dh = da + da_rec
    og = half * to + half
    q = c / n
    dct = dc + dh * og / n
    dnt = dn - dh * og * q / n
    dgi = (dct * zt + dnt) * ip
    dgf = (dct * c_prev + dnt * n_prev) * fp * lfd
    dgz = dct * ip * (one - zt * zt)
    dgo = dh * q * (half * (one - to * to))
    return dgi, dgf, dgz, dgo, dct * fp, dnt * fp


def backward_step_exp(one, half, da, da_rec, dc, dn, ip, fp, zt, to, c, n, c_prev, n_prev):
    """:func:`backward_step` for the exponential forget gate (``lf = f~``, slope 1)."""
    return backward_step(one, half, da, da_rec, dc, dn, ip, fp, one, zt, to, c, n, c_prev,
                         n_prev)


def times(x, y):
    return x * y


class SLSTMCell(Cell):
    """The sLSTM with the sigmoid forget gate (``lf = logsigmoid(f~)``): state
    ``(h, c, n, m)``. Saved per step: ``X2`` the stabilised gates ``(i', f')``, ``ZO``
    ``(tanh(z~), tanh(o~ / 2))``, ``CN`` ``(c, n)`` and ``D`` the forget gate's slope
    ``sigmoid(-f~)``."""

    name = "slstm"
    forget_gate = "sigmoid"
    state_names = ("H", "C", "N", "M")
    saved = {"X2": 2, "ZO": 2, "CN": 2, "D": 1}
    frozen = ("M",)
    positive = ("N",)
    scaled = ("C", "N")
    scratch = {"G": 4, "E0": 1, "E1": 1, "E2": 1, "E3": 1}
    n_gates = 4
    split = False
    back_reads = ("X2", "ZO", "CN", "D", "C", "N")
    gates = GATES

    # ----------------------------------------------------------------- parameters
    def param_keys(self, params):
        return ("W", "R", "b")

    def param_shapes(self, n_x, n_a, num_heads=1):
        """``W (4, n_h, n_x)``, ``R (4, H, d, d)`` and ``b (4, n_h, 1)``, ``d = n_h / H``."""
        d = n_a // num_heads
        return {"W": (4, n_a, n_x), "R": (4, num_heads, d, d), "b": (4, n_a, 1)}

    def init_params(self, rng, n_x, n_a, num_heads=1):
        """Uniform in ``(-k, k)``: ``k = 1 / sqrt(n_h)`` for ``W`` and ``b``, ``1 / sqrt(d)``
        for the heads' ``R``; host numpy arrays drawn from ``rng``."""
        import numpy as np

        shapes = self.param_shapes(n_x, n_a, num_heads)
        d = shapes["R"][-1]
        layer = {}
        for key, shape in shapes.items():
            k = 1.0 / np.sqrt(d if key == "R" else n_a)
            layer[key] = rng.uniform(-k, k, size=shape)
        return layer

    @staticmethod
    def _halve_o(parts):
        """The four gate blocks of ``parts`` (a sequence), the output gate's halved."""
        return [*parts[:3], 0.5 * parts[3]]

    def _fused(self, params, xp):
        """``(Wx (4 n, n_x), Wa (4 n, n), b (4 n, 1))``, the output gate's rows halved;
        ``Wa`` block-diagonal per gate."""
        W, R, b = params["W"], params["R"], params["b"]
        _, H, d, _ = R.shape
        n = H * d
        dtype = R.dtype
        Wx = xp.concat(self._halve_o([W[g, ...] for g in range(4)]), axis=0)
        bx = xp.concat(self._halve_o([b[g, ...] for g in range(4)]), axis=0)
        rows = []
        for g in range(4):
            for k in range(H):
                parts = []
                if k:
                    parts.append(xp.zeros((d, k * d), dtype=dtype, device=_device(R)))
                parts.append(R[g, k, ...])
                if k < H - 1:
                    parts.append(xp.zeros((d, (H - 1 - k) * d), dtype=dtype, device=_device(R)))
                rows.append(xp.concat(parts, axis=1) if len(parts) > 1 else parts[0])
        Wa = xp.concat(rows, axis=0)  # (4 n, n)
        Wa = xp.concat(self._halve_o([Wa[g * n : (g + 1) * n, :] for g in range(4)]), axis=0)
        return Wx, Wa, bx

    def fuse_forward(self, params, n_a, *, xp):
        Wx, Wa, bx = self._fused(params, xp)
        return (xp.matrix_transpose(Wx), xp.reshape(bx, (1, 4 * n_a)),
                xp.matrix_transpose(Wa), None)

    def fuse_backward(self, params, n_a, *, xp):
        Wx, Wa, _ = self._fused(params, xp)
        return xp.matrix_transpose(Wa), Wx

    def unfuse_grads(self, dWx, dWa, dbx, dba, *, xp, params=None):
        """``dW``, ``dR`` (the diagonal blocks of the dense recurrent gradient) and ``db``,
        the output gate's halved back."""
        _, H, d, _ = params["R"].shape
        n = H * d
        gate = lambda a, g: a[g * n : (g + 1) * n, ...]  # noqa: E731
        dW = xp.stack(self._halve_o([gate(dWx, g) for g in range(4)]))
        db = xp.stack(self._halve_o([gate(dbx, g) for g in range(4)]))
        dR = xp.stack(self._halve_o([
            xp.stack([gate(dWa, g)[k * d : (k + 1) * d, k * d : (k + 1) * d] for k in range(H)])
            for g in range(4)]))
        return {"dW": dW, "dR": dR, "db": db}

    def start(self, state, *, xp):
        """``m = -inf`` where ``n = 0``: an empty memory, whose first step takes ``m = i~``."""
        h, c, n, m = state
        inf = xp.asarray(float("inf"), dtype=m.dtype, device=_device(m))
        return h, c, n, xp.where(n == 0, -inf, m)

    # ------------------------------------------------------------------- one step
    def _forget(self, ops, f, out):
        """``(lf, slope)`` of the forget gate's pre-activation ``f`` (columns of ``G``).

        ``exp`` and ``log1p`` run on whole ``(m, n)`` buffers, as on the array path: some
        numpy versions round a strided window's rows differently (SIMD or not)."""
        half, one = ops.const(0.5), ops.const(1.0)
        e = ops.exp(ops.map(neg_abs, f, out=out["E0"]), out=out["E0"])
        l1p = ops.log1p(e, out=out["E1"])
        s = ops.sign(f, out=out["E2"])
        return ops.map(logsigmoid_and_slope, half, one, f, s, e, l1p, out=(out["E3"], out["D"]))

    def step(self, ops, gx, ga, state, out):
        """One step of the module's equations."""
        _, c_prev, n_prev, m_prev = state
        n = c_prev.shape[-1]
        g = ops.add(gx, ga, out=out["G"])
        i, f = ops.cols(g, 0, n), ops.cols(g, n, 2 * n)
        if self.forget_gate == "sigmoid":
            lf, slope = self._forget(ops, f, out)
        else:
            lf, slope = f, None
        m = ops.maximum(ops.add(lf, m_prev, out=out["M"]), i, out=out["M"])
        xs = ops.map(exponents, i, lf, m_prev, m, out=ops.blocks(out["X2"], 2))
        x2 = ops.exp(ops.concat(xs, out=out["X2"]), out=out["X2"])
        zo = ops.tanh(ops.cols(g, 2 * n, 4 * n), out=out["ZO"])
        c, nn, h, *cn = ops.map(
            cell_update, ops.const(0.5), ops.cols(x2, 0, n), ops.cols(x2, n, 2 * n),
            ops.cols(zo, 0, n), ops.cols(zo, n, 2 * n), c_prev, n_prev,
            out=(out["C"], out["N"], out["H"], *ops.blocks(out["CN"], 2)),
        )  # fmt: skip
        res = {"H": h, "C": c, "N": nn, "M": m, "X2": x2, "ZO": zo,
               "CN": ops.concat(cn, out=out["CN"])}
        if slope is not None:
            res["D"] = slope
        return res

    def step_back(self, ops, da, da_rec, drest, coeffs, reads, out):
        """The gate gradients (``dgx`` and ``dga`` the same ``dG``) and those on ``c``,
        ``n``; ``m``'s stays zero."""
        dc, dn, dm = drest
        X2, ZO, CN = reads["X2"], reads["ZO"], reads["CN"]
        n = dc.shape[-1]
        one, half = ops.const(1.0), ops.const(0.5)
        cols = lambda a, q: ops.cols(a, q * n, (q + 1) * n)  # noqa: E731
        lead = (one, half, da, da_rec, dc, dn, cols(X2, 0), cols(X2, 1))
        tail = (cols(ZO, 0), cols(ZO, 1), cols(CN, 0), cols(CN, 1), reads["C"], reads["N"])
        if self.forget_gate == "sigmoid":
            fn, args = backward_step, (*lead, reads["D"], *tail)
        else:
            fn, args = backward_step_exp, (*lead, *tail)
        *gates, dc_prev, dn_prev = ops.map(
            fn, *args, out=(*ops.blocks(out["dGx"], 4), out["dc"], out["dn"]))
        dg = ops.concat(gates, out=out["dGx"])
        dm_prev = ops.map(times, dm, ops.const(0.0), out=out["dm"])
        return dg, dg, None, (dc_prev, dn_prev, dm_prev)


class SLSTMExpCell(SLSTMCell):
    """The sLSTM with the exponential forget gate (``lf = f~``): as :class:`SLSTMCell`,
    without the slope ``D``."""

    name = "slstm_exp"
    forget_gate = "exp"
    saved = {"X2": 2, "ZO": 2, "CN": 2}
    scratch = {"G": 4}
    back_reads = ("X2", "ZO", "CN", "C", "N")



#: The sLSTM cell with the sigmoid forget gate.
SLSTM_CELL = register(SLSTMCell())
#: The sLSTM cell with the exponential forget gate.
SLSTM_EXP_CELL = register(SLSTMExpCell())
