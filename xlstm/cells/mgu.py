"""The minimal gated unit (MGU; Zhou, Wu, Zhang and Zhou, 2016), for the engine.

Equations, per step, with ``a`` the hidden state::

    f  = sigmoid(W_if x + b_if + W_hf a_prev + b_hf)      (forget gate)
    hn = W_hn a_prev + b_hn                               (the candidate's recurrent term)
    n  = tanh(W_in x + b_in + f * hn)                     (candidate)
    a  = (1 - f) * a_prev + f * n

The one gate does the work of the GRU's two: it gates the candidate's recurrent term where
the GRU's reset gate does (after the product, as torch's ``nn.GRU``), and it mixes the
previous state and the candidate where the GRU's update gate does.

Gate layout: the input and recurrent terms are ``(m, 2 n_a)`` blocks in gate order
:data:`GATES` = ``(f, n)``. The forget gate's rows are halved (exact in binary floating
point), so that ``sigmoid(v) = 0.5 tanh(v / 2) + 0.5``. The forget gate multiplies the
candidate's recurrent term only, so the engine keeps the recurrent term
``ga = a_prev WaT + ba`` apart from the input term ``gx = x WxT + bx`` (:attr:`MGUCell.split`):
``bx`` holds the input biases ``b*`` and ``ba`` the recurrent ones ``bh*``.

Parameters: ``W* (n_a, n_a + n_x)`` acting on ``[a_prev; x_t]``, ``b* (n_a, 1)`` the input
bias and ``bh* (n_a, 1)`` the recurrent one, for ``* = f, n``; laid out as torch's
recurrent layers would be (``weight_ih, weight_hh, bias_ih, bias_hh``, rows in gate order),
which torch has no module for.

State ``(a,)``. Saved per step: ``S`` the forget gate, ``N`` the candidate and ``HN`` the
candidate's recurrent term.

Backward, with ``da`` the total gradient reaching a step's ``a`` (the pre-activation
gradients are named after their gate, as the LSTM's ``dot``)::

    dnt = da f (1 - n^2)                            (candidate)
    dft = da ((n - a_prev) + f (1 - n^2) hn) f (1 - f)   (forget gate, both of its roles)
    dhn = dnt f                                     (the candidate's recurrent term)
    da_prev = da (1 - f) + [dft, dhn] Wa            (directly, and through the recurrent term)
"""

from __future__ import annotations

from .base import TwoBiasCell, register
from .gru import candidate_preactivation, sigmoid_from_halved_tanh

__all__ = ["MGUCell", "MGU_CELL", "GATES"]

#: Gate order of the fused blocks, and the rows of the torch-style layout.
GATES = ("f", "n")


# ---------------------------------------------------------------- point functions
def hidden_state(one, ft, nt, a_prev):
    """``a = (1 - f) * a_prev + f * n``."""
    return (one - ft) * a_prev + ft * nt


def backward_coefficients(one, ft, nt, hn, a_prev):
    """The factors of the backward step that depend on the forward pass only.

    With ``da`` the total gradient reaching a step's ``a``: ``dnt = da Pn`` and
    ``dft = da Pf``, where

    * ``Pn = f (1 - n^2)``: through ``a = ... + f n`` and ``n = tanh(.)``;
    * ``Pf = ((n - a_prev) + Pn hn) f (1 - f)``: through ``a = a_prev + f (n - a_prev)``,
      through ``f * hn`` in the candidate, and the sigmoid.
    """
    Pn = ft * (one - nt * nt)
    Pf = ((nt - a_prev) + Pn * hn) * ft * (one - ft)
    return Pf, Pn


def backward_step(one, da, da_rec, Pf, Pn, ft):
    """The gate gradients ``dft, dnt``, the recurrent ones and ``da_direct``.

    ``da + da_rec`` is the total gradient reaching the step's ``a``. Returns the input
    term's gradients ``(dft, dnt)``, the recurrent term's ``(dft, dhn)`` (the forget gate's
    are the same) and ``da_direct = da (1 - f)``, the gradient on ``a_prev`` through
    ``(1 - f) * a_prev``.
    """
    d_a = da + da_rec
    dnt = d_a * Pn
    dft = d_a * Pf
    dhn = dnt * ft
    da_direct = d_a * (one - ft)
    return dft, dnt, dft, dhn, da_direct


def backward_step_from_saved(one, da, da_rec, ft, nt, hn, a_prev):
    """:func:`backward_step` with its coefficients formed on the fly
    (:func:`backward_coefficients`): the compiled loops' step, which reads the saved
    values once instead of a stack of coefficients."""
    Pf, Pn = backward_coefficients(one, ft, nt, hn, a_prev)
    return backward_step(one, da, da_rec, Pf, Pn, ft)


class MGUCell(TwoBiasCell):
    """The minimal gated unit: state ``(a,)``, gates ``(f, n)``, the forget gate on
    ``W_hn a + b_hn`` and on the mix of ``a_prev`` and the candidate."""

    name = "mgu"
    state_names = ("A",)
    saved = {"S": 1, "N": 1, "HN": 1}
    #: Per-step scratch of the accelerated loops, name to width.
    scratch = {"G": 1, "D": 1}
    coeffs = {"Pf": 1, "Pn": 1}
    n_gates = 2
    back_reads = ("S", "N", "HN", "A")
    inline_coeffs = True
    gates = GATES
    halved = ("f",)
    dict_gates = GATES
    torch_gates = GATES

    # ------------------------------------------------------------------- one step
    def step(self, ops, gx, ga, state, out):
        """``f`` (one ``tanh``), ``hn``, ``n`` and ``a``."""
        (a_prev,) = state
        n = a_prev.shape[-1]
        t = ops.tanh(ops.add(ops.cols(gx, 0, n), ops.cols(ga, 0, n), out=out["G"]),
                     out=out["G"])
        ft = ops.map(sigmoid_from_halved_tanh, ops.const(0.5), t, out=out["S"])
        hn = ops.copy(ops.cols(ga, n, 2 * n), out=out["HN"])
        pre = ops.map(candidate_preactivation, ops.cols(gx, n, 2 * n), ft, hn, out=out["N"])
        nt = ops.tanh(pre, out=out["N"])
        a = ops.map(hidden_state, ops.const(1.0), ft, nt, a_prev, out=out["A"])
        return {"A": a, "S": ft, "N": nt, "HN": hn}

    def back_coeffs(self, ops, saved, prev, out):
        return ops.map(
            backward_coefficients, ops.const(1.0), saved["S"], saved["N"], saved["HN"],
            prev["A"], out=(out["Pf"], out["Pn"]),
        )  # fmt: skip

    def step_back(self, ops, da, da_rec, drest, coeffs, reads, out):
        """``dgx = (dft, dnt)``, ``dga = (dft, dhn)`` and ``da_direct = da (1 - f)``."""
        dGx, dGa = out["dGx"], out["dGa"]
        one, ft = ops.const(1.0), reads["S"]
        if coeffs is None:  # formed on the fly, from what the forward pass saved
            fn = backward_step_from_saved
            args = (one, da, da_rec, ft, reads["N"], reads["HN"], reads["A"])
        else:
            fn, args = backward_step, (one, da, da_rec, *coeffs, ft)
        dft, dnt, dft_a, dhn, direct = ops.map(
            fn, *args, out=(*ops.blocks(dGx, 2), *ops.blocks(dGa, 2), out["D"])
        )
        dgx = ops.concat((dft, dnt), out=dGx)  # gate order (f, n)
        dga = ops.concat((dft_a, dhn), out=dGa)
        return dgx, dga, direct, ()


#: The one MGU cell.
MGU_CELL = register(MGUCell())
