"""The Elman RNN cell of the notebook "Building your Recurrent Neural Network - Step by Step",
with ``tanh`` (the notebook's, :data:`RNN_TANH`) or ``relu`` (:data:`RNN_RELU`), for the engine.

One step: ``a_next = act(Wax x_t + Waa a_prev + ba)``. Its input and recurrent terms are
``(m, n_a)`` blocks (one "gate"; torch's row order is the same trivial one).

Parameters: ``Wax (n_a, n_x)``, ``Waa (n_a, n_a)`` and ``ba (n_a, 1)``; the model classes add
torch's second bias ``bha (n_a, 1)`` (``bias_hh``, zero unless it came from torch), which adds
to ``ba``. Its gradient equals that of ``ba``.

State ``(a,)``. Saved per step: ``H``, the step's output ``a_next`` once more, from which the
backward pass forms the activation's derivative (``1 - a_next^2`` for ``tanh``; for ``relu``
``sign(a_next)``, 1 where the unit is active and 0 where it is not).

Backward, per step: ``da_pre = (da + da_rec) * D`` with ``D`` that derivative; the engine
does the rest (``da_prev = Waa^T da_pre``, ``dxt = Wax^T da_pre``, ``dWax = da_pre xt^T``,
``dWaa = da_pre a_prev^T``, ``dba`` the sum of ``da_pre`` over the batch).
"""

from __future__ import annotations

from .._lib.compat import c_contiguous
from .base import Cell, register

__all__ = ["RNNCell", "RNN_TANH", "RNN_RELU", "NONLINEARITIES"]

#: The activations an :class:`RNNCell` may have, as torch's ``nn.RNN`` names them.
NONLINEARITIES = ("tanh", "relu")


# ---------------------------------------------------------------- point functions
def tanh_derivative(one, a_next):
    """``1 - a_next^2``: the derivative of ``tanh`` at the step, from its output."""
    return one - a_next * a_next


def pre_activation_grad(da, da_rec, D):
    """``da_pre = (da + da_rec) * D``: the gradient on ``Wax x + Waa a_prev + ba``.

    ``da + da_rec`` is the total gradient reaching the step's output and ``D`` the
    activation's derivative there.
    """
    return (da + da_rec) * D


class RNNCell(Cell):
    """The Elman RNN: state ``(a,)``, one block, activation ``tanh`` or ``relu``."""

    state_names = ("A",)
    saved = {"H": 1}
    #: Per-step scratch of the accelerated loops, name to width.
    scratch = {}
    coeffs = {"D": 1}
    n_gates = 1
    split = False
    back_reads = ()
    gates = ("a",)
    torch_gates = ("a",)
    #: The input and the recurrent weight (torch's ``weight_ih`` and ``weight_hh``).
    weight_keys = ("Wax", "Waa")
    bias_keys = ("ba",)
    #: Torch's second bias, in the model classes' parameters.
    hidden_bias_keys = ("bha",)

    def __init__(self, nonlinearity: str = "tanh"):
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"nonlinearity must be one of {', '.join(map(repr, NONLINEARITIES))}, "
                f"got {nonlinearity!r}"
            )
        self.nonlinearity = nonlinearity
        self.name = f"rnn_{nonlinearity}"

    # ----------------------------------------------------------------- parameters
    def param_keys(self, params):
        keys = (*self.weight_keys, *self.bias_keys)
        if self.hidden_bias_keys[0] in params:
            keys += self.hidden_bias_keys
        return keys

    def param_shapes(self, n_x, n_a):
        """``Wax (n_a, n_x)``, ``Waa (n_a, n_a)``, ``ba (n_a, 1)`` and ``bha (n_a, 1)``."""
        return {"Wax": (n_a, n_x), "Waa": (n_a, n_a), "ba": (n_a, 1), "bha": (n_a, 1)}

    def from_torch_arrays(self, w_ih, w_hh, b_ih, b_hh):
        n_a = w_hh.shape[0]
        return {"Wax": w_ih.copy(), "Waa": w_hh.copy(), "ba": b_ih.reshape(n_a, 1).copy(),
                "bha": b_hh.reshape(n_a, 1).copy()}

    def to_torch_arrays(self, layer):
        return layer["Wax"], layer["Waa"], layer["ba"].reshape(-1), layer["bha"].reshape(-1)

    def fuse_forward(self, params, n_a, *, xp):
        b = params["ba"]
        if self.hidden_bias_keys[0] in params:
            b = b + params["bha"]
        WxT = xp.matrix_transpose(c_contiguous(params["Wax"]))
        WaT = xp.matrix_transpose(c_contiguous(params["Waa"]))
        return WxT, xp.reshape(b, (1, n_a)), WaT, None

    def fuse_backward(self, params, n_a, *, xp):
        return xp.matrix_transpose(c_contiguous(params["Waa"])), params["Wax"]

    def unfuse_grads(self, dWx, dWa, dbx, dba, *, xp, params=None):
        """``dWax`` ``(n_a, n_x)``, ``dWaa`` ``(n_a, n_a)`` and ``dba`` ``(n_a, 1)``."""
        return {"dWax": dWx, "dWaa": dWa, "dba": dbx}

    # ------------------------------------------------------------------- one step
    def step(self, ops, gx, ga, state, out):
        """``a_next = act(Wax x_t + ba + Waa a_prev)``."""
        z = ops.add(gx, ga, out=out["A"])
        a = ops.tanh(z, out=out["A"]) if self.nonlinearity == "tanh" else ops.relu(z, out=out["A"])
        return {"A": a, "H": ops.copy(a, out=out["H"])}

    def back_coeffs(self, ops, saved, prev, out):
        """The activation's derivative ``D`` at every step, from the saved output."""
        if self.nonlinearity == "tanh":
            return (ops.map(tanh_derivative, ops.const(1.0), saved["H"], out=out["D"]),)
        return (ops.sign(saved["H"], out=out["D"]),)  # a_next >= 0: 1 where active, else 0

    def step_back(self, ops, da, da_rec, drest, coeffs, reads, out):
        """``da_pre = (da + da_rec) * D``; ``dgx`` and ``dga`` are the same array."""
        (D,) = coeffs
        dg = ops.map(pre_activation_grad, da, da_rec, D, out=out["dGx"])
        return dg, dg, None, ()


#: The notebook's RNN cell (``tanh``).
RNN_TANH = register(RNNCell("tanh"))
#: The RNN cell with ``relu`` (torch's ``nn.RNN(nonlinearity="relu")``).
RNN_RELU = register(RNNCell("relu"))

