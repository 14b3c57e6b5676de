"""The GRU cell with torch's ``nn.GRU`` semantics, for the engine.

Equations, per step, with ``a`` the hidden state::

    r  = sigmoid(W_ir x + b_ir + W_hr a_prev + b_hr)      (reset gate)
    z  = sigmoid(W_iz x + b_iz + W_hz a_prev + b_hz)      (update gate)
    hn = W_hn a_prev + b_hn                               (the candidate's recurrent term)
    n  = tanh(W_in x + b_in + r * hn)                     (candidate)
    a  = (1 - z) * n + z * a_prev

Gate layout: the input and recurrent terms are ``(m, 3 n_a)`` blocks in gate order
:data:`GATES` = ``(r, z, n)``, torch's order too (:data:`TORCH_GATES`). The rows of the two
sigmoid gates are halved (exact in binary floating point), so that one ``tanh`` gives both:
``sigmoid(v) = 0.5 tanh(v / 2) + 0.5``. The reset gate multiplies the candidate's
recurrent term only, so the engine keeps the recurrent term ``ga = a_prev WaT + ba`` apart
from the input term ``gx = x WxT + bx`` (:attr:`GRUCell.split`): ``bx`` holds the input
biases ``b*`` and ``ba`` the recurrent ones ``bh*``.

Parameters: ``W* (n_a, n_a + n_x)`` acting on ``[a_prev; x_t]`` (the first ``n_a`` columns
are torch's ``weight_hh`` rows of the gate, the rest its ``weight_ih`` rows), ``b* (n_a, 1)``
torch's ``bias_ih`` and ``bh* (n_a, 1)`` its ``bias_hh``, for ``* = r, z, n``.

State ``(a,)``. Saved per step: ``S`` the sigmoid gates ``(r, z)``, ``N`` the candidate and
``HN`` the candidate's recurrent term.

Backward, with ``da`` the total gradient reaching a step's ``a`` (the pre-activation
gradients are named after their gate, as the LSTM's ``dot``)::

    dnt = da (1 - z) (1 - n^2)             (candidate)
    dzt = da (a_prev - n) z (1 - z)        (update gate)
    drt = dnt hn r (1 - r)                 (reset gate)
    dhn = dnt r                            (the candidate's recurrent term)
    da_prev = da z + [drt, dzt, dhn] Wa    (directly, and through the recurrent term)
"""

from __future__ import annotations

from .base import TwoBiasCell, register

__all__ = ["GRUCell", "GRU_CELL", "GATES", "TORCH_GATES"]

#: Gate order of the fused blocks.
GATES = ("r", "z", "n")
#: Torch's row order of the same gates.
TORCH_GATES = ("r", "z", "n")


# ---------------------------------------------------------------- point functions
def sigmoid_from_halved_tanh(half, t):
    """``r`` and ``z``: ``sigmoid(v) = 0.5 tanh(v / 2) + 0.5``, from ``t = tanh(v / 2)``."""
    return half * t + half


def candidate_preactivation(gx_n, rt, hn):
    """``n``'s argument: ``W_in x + b_in + r * hn``, with ``hn = W_hn a_prev + b_hn``."""
    return gx_n + rt * hn


def hidden_state(one, zt, nt, a_prev):
    """``a = (1 - z) * n + z * a_prev``."""
    return (one - zt) * nt + zt * a_prev


def backward_coefficients(one, rt, zt, nt, hn, a_prev):
    """The factors of the backward step that depend on the forward pass only.

    With ``da`` the total gradient reaching a step's ``a``: ``dnt = da Pn``,
    ``dzt = da Pz`` and ``drt = dnt Pr``, where

    * ``Pn = (1 - z)(1 - n^2)``: through ``a = (1 - z) n + ...`` and ``n = tanh(.)``;
    * ``Pz = (a_prev - n) z (1 - z)``: through ``a = n + z (a_prev - n)`` and the sigmoid;
    * ``Pr = hn r (1 - r)``: through ``r * hn`` and the sigmoid.
    """
    Pn = (one - zt) * (one - nt * nt)
    Pz = (a_prev - nt) * zt * (one - zt)
    Pr = hn * rt * (one - rt)
    return Pr, Pz, Pn


def backward_step(da, da_rec, Pr, Pz, Pn, rt, zt):
    """The gate gradients ``drt, dzt, dnt``, the recurrent ones and ``da_direct``.

    ``da + da_rec`` is the total gradient reaching the step's ``a``. Returns the input
    term's gradients ``(drt, dzt, dnt)``, the recurrent term's ``(drt, dzt, dhn)`` (the
    sigmoid gates' are the same) and ``da_direct = da z``, the gradient on ``a_prev``
    through ``z * a_prev``.
    """
    d_a = da + da_rec
    dnt = d_a * Pn
    dzt = d_a * Pz
    drt = dnt * Pr
    dhn = dnt * rt
    da_direct = d_a * zt
    return drt, dzt, dnt, drt, dzt, dhn, da_direct


def backward_step_from_saved(one, da, da_rec, rt, zt, nt, hn, a_prev):
    """:func:`backward_step` with its coefficients formed on the fly
    (:func:`backward_coefficients`): the compiled loops' step, which reads the saved
    values once instead of a stack of coefficients."""
    Pr, Pz, Pn = backward_coefficients(one, rt, zt, nt, hn, a_prev)
    return backward_step(da, da_rec, Pr, Pz, Pn, rt, zt)


class GRUCell(TwoBiasCell):
    """Torch's GRU: state ``(a,)``, gates ``(r, z, n)``, the reset gate on ``W_hn a + b_hn``."""

    name = "gru"
    state_names = ("A",)
    saved = {"S": 2, "N": 1, "HN": 1}
    #: Per-step scratch of the accelerated loops, name to width.
    scratch = {"G": 2, "D": 1}
    coeffs = {"Pr": 1, "Pz": 1, "Pn": 1}
    n_gates = 3
    back_reads = ("S", "N", "HN", "A")
    inline_coeffs = True
    gates = GATES
    halved = ("r", "z")
    dict_gates = GATES
    torch_gates = TORCH_GATES

    # ------------------------------------------------------------------- one step
    def step(self, ops, gx, ga, state, out):
        """``r, z`` (one ``tanh``), ``hn``, ``n`` and ``a``."""
        (a_prev,) = state
        n = a_prev.shape[-1]
        t = ops.tanh(ops.add(ops.cols(gx, 0, 2 * n), ops.cols(ga, 0, 2 * n), out=out["G"]),
                     out=out["G"])
        s = ops.map(sigmoid_from_halved_tanh, ops.const(0.5), t, out=out["S"])
        hn = ops.copy(ops.cols(ga, 2 * n, 3 * n), out=out["HN"])
        pre = ops.map(candidate_preactivation, ops.cols(gx, 2 * n, 3 * n), ops.cols(s, 0, n), hn, out=out["N"])
        nt = ops.tanh(pre, out=out["N"])
        a = ops.map(hidden_state, ops.const(1.0), ops.cols(s, n, 2 * n), nt, a_prev, out=out["A"])
        return {"A": a, "S": s, "N": nt, "HN": hn}

    def back_coeffs(self, ops, saved, prev, out):
        S = saved["S"]
        n = S.shape[-1] // 2
        return ops.map(
            backward_coefficients, ops.const(1.0), ops.cols(S, 0, n), ops.cols(S, n, 2 * n), saved["N"],
            saved["HN"], prev["A"], out=(out["Pr"], out["Pz"], out["Pn"]),
        )  # fmt: skip

    def step_back(self, ops, da, da_rec, drest, coeffs, reads, out):
        """``dgx = (drt, dzt, dnt)``, ``dga = (drt, dzt, dhn)`` and ``da_direct = da z``."""
        S = reads["S"]
        n = S.shape[-1] // 2
        dGx, dGa = out["dGx"], out["dGa"]
        rt, zt = ops.cols(S, 0, n), ops.cols(S, n, 2 * n)
        if coeffs is None:  # formed on the fly, from what the forward pass saved
            fn = backward_step_from_saved
            args = (ops.const(1.0), da, da_rec, rt, zt, reads["N"], reads["HN"], reads["A"])
        else:
            fn, args = backward_step, (da, da_rec, *coeffs, rt, zt)
        drt, dzt, dnt, drt_a, dzt_a, dhn, direct = ops.map(
            fn, *args, out=(*ops.blocks(dGx, 3), *ops.blocks(dGa, 3), out["D"])
        )
        dgx = ops.concat((drt, dzt, dnt), out=dGx)  # gate order (r, z, n)
        dga = ops.concat((drt_a, dzt_a, dhn), out=dGa)
        return dgx, dga, direct, ()


#: The one GRU cell.
GRU_CELL = register(GRUCell())
