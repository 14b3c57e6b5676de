"""The LSTM cell of the step-by-step notebook, equations (1)-(21), for the engine.

Gate layout: the input and recurrent terms are ``(m, 4 n_a)`` blocks in gate order
:data:`GATES` = ``(o, f, i, c)``, the three sigmoid gates first. Their weight and bias rows
are halved (exact in binary floating point), so that one ``tanh`` gives every gate:
``sigmoid(z) = 0.5 tanh(z / 2) + 0.5``. Torch's row order is ``(i, f, g, o)``
(:data:`TORCH_GATES`, ``g`` being the candidate ``c``).

Parameters: the notebook's dict, ``W* (n_a, n_a + n_x)`` acting on ``[a_prev; x_t]`` and
``b* (n_a, 1)`` for ``* = f, i, c, o``; the model classes add torch's second bias of each
gate, ``bh* (n_a, 1)`` (zero unless it came from torch), which adds to ``b*``.

State ``(a, c)``. Saved per step: ``S`` the sigmoid gates ``(o, f, i)``, ``CCT`` the
candidate and ``TC = tanh(c)``.
"""

from __future__ import annotations

from .base import Cell, register, stacked_transpose

__all__ = ["LSTMCell", "LSTM_CELL", "GATES", "TORCH_GATES"]

#: Gate order of the fused blocks.
GATES = ("o", "f", "i", "c")
#: Torch's row order of the same gates (``g`` is the candidate ``c``).
TORCH_GATES = ("i", "f", "c", "o")


# ---------------------------------------------------------------- fused weights
def fused_forward_weights(params, n_a, *, xp):
    """Stacked weights for the forward pass: ``(WaT, WxT, b)``.

    ``WaT`` is ``(n_a, 4 n_a)``, ``WxT`` is ``(n_x, 4 n_a)`` and ``b`` is ``(1, 4 n_a)``, in
    gate order (o, f, i, c); ``n_a`` splits the columns of ``W*`` (the recurrent input's
    width: a projected LSTM's ``proj_size``). The sigmoid-gate rows are pre-multiplied by 0.5, so that one
    ``tanh`` over all four gates yields ``tanh(z/2)`` for the sigmoid gates
    (``sigmoid(z) = 0.5 tanh(z/2) + 0.5``) and ``tanh(z)`` for the candidate. Scaling by a
    power of two is exact in binary floating point, so this is bit-for-bit the same as
    halving the pre-activation afterwards.
    """
    WT = stacked_transpose(
        [0.5 * params["Wo"], 0.5 * params["Wf"], 0.5 * params["Wi"], params["Wc"]], xp=xp
    )
    b = xp.concat([0.5 * params["bo"], 0.5 * params["bf"], 0.5 * params["bi"], params["bc"]])
    return WT[:n_a, :], WT[n_a:, :], xp.reshape(b, (1, b.shape[0]))


def fused_backward_weights(params, n_a, *, xp):
    """Unscaled stacked weights ``(WaT, Wx)``: ``(n_a, 4 n_a)`` and ``(4 n_a, n_x)``.

    The recurrent gradient of a step is computed as ``WaT @ dg^T`` (then transposed): BLAS
    runs that orientation of the small per-step product faster than ``dg @ Wa`` (the
    performance page has the figures).
    """
    WT = stacked_transpose([params["W" + g] for g in GATES], xp=xp)
    return WT[:n_a, :], xp.matrix_transpose(WT[n_a:, :])


def split_gates(stacked, *, prefix):
    """Split a ``(4 n_a, k)`` array in gate order (o, f, i, c) into the notebook's per-gate keys."""
    n_a = stacked.shape[0] // 4
    return {f"{prefix}{g}": stacked[j * n_a : (j + 1) * n_a, :] for j, g in enumerate(GATES)}


# ---------------------------------------------------------------- point functions
def sigmoid_from_halved_tanh(half, t):
    """(1), (2), (5): ``sigmoid(z) = 0.5 tanh(z / 2) + 0.5``, from ``t = tanh(z / 2)``."""
    return half * t + half


def candidate_and_cell_state(ft, it, tc, c_prev):
    """(3), (4): the candidate ``cct``, which is ``tc = tanh(z_c)`` itself, and ``c_next =
    ft * c_prev + it * cct``."""
    cct = tc  # (3)
    return cct, ft * c_prev + it * cct  # (4)


def gates_and_cell_state(half, to, tf, ti, tc, c_prev):
    """(1)-(5) in one pass, from the ``tanh`` of every gate's pre-activation: the compiled
    loops' step. Returns ``(ot, ft, it, cct, c_next)``."""
    ot = sigmoid_from_halved_tanh(half, to)
    ft = sigmoid_from_halved_tanh(half, tf)
    it = sigmoid_from_halved_tanh(half, ti)
    cct, c_next = candidate_and_cell_state(ft, it, tc, c_prev)
    return ot, ft, it, cct, c_next


def backward_coefficients(one, ot, ft, it, tc, cct, c_prev):
    """The factors of (7)-(10) that depend on the forward pass only.

    With ``da`` and ``dc`` the gradients reaching a step, its pre-activation gradients are
    ``dot = da Q`` and ``(dft, dit, dcct) = (dc + da K) (Pf, Pi, Pc)``:

    * ``K = ot (1 - tanh^2 c)``, the path from ``a`` back into ``c``;
    * ``Q = tanh(c) ot (1 - ot)``, eq. (7) without ``da``;
    * ``Pf, Pi, Pc``: eqs. (10), (9), (8) without the common factor.
    """
    K = ot * (one - tc * tc)
    Q = tc * ot * (one - ot)
    Pf = c_prev * ft * (one - ft)
    Pi = cct * it * (one - it)
    Pc = it * (one - cct * cct)
    return K, Q, Pf, Pi, Pc


def backward_step(da, da_rec, dc, K, Q, Pf, Pi, Pc, ft):
    """(7)-(10), (20): the gate gradients ``dot, dft, dit, dcct`` and ``dc_prev``.

    ``da + da_rec`` and ``dc`` are the total gradients reaching the step's ``a`` and ``c``.
    """
    d_a = da + da_rec
    dct = dc + d_a * K  # dL/dc_t: through c directly and through a = o tanh(c)
    dot = d_a * Q  # (7)
    dft = dct * Pf  # (10)
    dit = dct * Pi  # (9)
    dcct = dct * Pc  # (8)
    dc_prev = dct * ft  # (20)
    return dot, dft, dit, dcct, dc_prev


def backward_step_from_saved(one, da, da_rec, dc, ot, ft, it, tc, cct, c_prev):
    """:func:`backward_step` with its coefficients formed on the fly
    (:func:`backward_coefficients`): the compiled loops' step, which reads the saved
    values once instead of a stack of coefficients."""
    K, Q, Pf, Pi, Pc = backward_coefficients(one, ot, ft, it, tc, cct, c_prev)
    return backward_step(da, da_rec, dc, K, Q, Pf, Pi, Pc, ft)


class LSTMCell(Cell):
    """The notebook's LSTM: state ``(a, c)``, gates ``(o, f, i, c)``."""

    name = "lstm"
    state_names = ("A", "C")
    saved = {"S": 3, "CCT": 1, "TC": 1}
    #: Per-step scratch of the accelerated loops, name to width.
    scratch = {"G": 4}
    coeffs = {"K": 1, "Q": 1, "Pf": 1, "Pi": 1, "Pc": 1}
    n_gates = 4
    split = False
    back_reads = ("S", "TC", "CCT", "C")
    inline_coeffs = True
    gates = GATES
    dict_gates = ("f", "i", "c", "o")
    torch_gates = TORCH_GATES
    weight_keys = tuple("W" + g for g in "fico")
    bias_keys = tuple("b" + g for g in "fico")
    #: Torch's second bias of each gate, in the model classes' parameters.
    hidden_bias_keys = tuple("bh" + g for g in "fico")

    # ----------------------------------------------------------------- parameters
    def param_keys(self, params):
        keys = tuple(k for g in "fico" for k in ("W" + g, "b" + g))
        if self.hidden_bias_keys[0] in params:
            keys += self.hidden_bias_keys
        return keys

    def fuse_forward(self, params, n_a, *, xp):
        WaT, WxT, b = fused_forward_weights(params, n_a, xp=xp)
        if self.hidden_bias_keys[0] in params:
            bh = xp.concat([0.5 * params["bho"], 0.5 * params["bhf"], 0.5 * params["bhi"],
                            params["bhc"]])
            b = b + xp.reshape(bh, (1, bh.shape[0]))
        return WxT, b, WaT, None

    def fuse_backward(self, params, n_a, *, xp):
        return fused_backward_weights(params, n_a, xp=xp)

    def unfuse_grads(self, dWx, dWa, dbx, dba, *, xp, params=None):
        """``dW*`` (eqs. (11)-(14)) and ``db*`` (eqs. (15)-(18)), in the notebook's order."""
        dW = split_gates(xp.concat([dWa, dWx], axis=1), prefix="dW")
        db = split_gates(dbx, prefix="db")
        return {k: v for g in "fico" for k, v in ((f"dW{g}", dW[f"dW{g}"]), (f"db{g}", db[f"db{g}"]))}

    # ------------------------------------------------------------------- one step
    def step(self, ops, gx, ga, state, out):
        """Equations (1)-(6)."""
        _, c_prev = state
        n = c_prev.shape[-1]
        t = ops.tanh(ops.add(gx, ga, out=out["G"]), out=out["G"])  # every gate, one tanh
        if ops.buffered:  # the compiled loops: one pass over the step
            *gates, cct, c = ops.map(
                gates_and_cell_state, ops.const(0.5), *ops.blocks(t, 4), c_prev,
                out=(*ops.blocks(out["S"], 3), out["CCT"], out["C"]),
            )  # fmt: skip
            s = ops.concat(gates, out=out["S"])  # gate order (o, f, i)
        else:  # whole arrays: the three sigmoid gates as one block
            s = ops.map(sigmoid_from_halved_tanh, ops.const(0.5), ops.cols(t, 0, 3 * n))
            cct, c = ops.map(candidate_and_cell_state, ops.cols(s, n, 2 * n),
                             ops.cols(s, 2 * n, 3 * n), ops.cols(t, 3 * n, 4 * n), c_prev)
        tc = ops.tanh(c, out=out["TC"])
        a = ops.mul(ops.cols(s, 0, n), tc, out=out["A"])  # (6)
        return {"A": a, "C": c, "S": s, "CCT": cct, "TC": tc}

    def back_coeffs(self, ops, saved, prev, out):
        S = saved["S"]
        n = S.shape[-1] // 3
        return ops.map(
            backward_coefficients, ops.const(1.0), ops.cols(S, 0, n), ops.cols(S, n, 2 * n),
            ops.cols(S, 2 * n, 3 * n), saved["TC"], saved["CCT"], prev["C"],
            out=(out["K"], out["Q"], out["Pf"], out["Pi"], out["Pc"]),
        )  # fmt: skip

    def step_back(self, ops, da, da_rec, drest, coeffs, reads, out):
        """Equations (7)-(10) and (20); ``dgx`` and ``dga`` are the same ``dG``."""
        (dc,) = drest
        S = reads["S"]
        n = S.shape[-1] // 3
        ft = ops.cols(S, n, 2 * n)
        if coeffs is None:  # formed on the fly, from what the forward pass saved
            fn = backward_step_from_saved
            args = (ops.const(1.0), da, da_rec, dc, ops.cols(S, 0, n), ft, ops.cols(S, 2 * n, 3 * n),
                    reads["TC"], reads["CCT"], reads["C"])  # fmt: skip
        else:
            fn, args = backward_step, (da, da_rec, dc, *coeffs, ft)
        *gates, dc_prev = ops.map(fn, *args, out=(*ops.blocks(out["dGx"], 4), out["dc"]))
        dg = ops.concat(gates, out=out["dGx"])  # gate order (o, f, i, c)
        return dg, dg, None, (dc_prev,)


#: The one LSTM cell.
LSTM_CELL = register(LSTMCell())
