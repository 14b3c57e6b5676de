"""The LSTM as a differentiable function for JAX and torch, with xlstm's own backward pass.

:func:`lstm` returns the hidden states of :func:`xlstm.lstm.lstm_forward`. Its gradient,
under ``jax.grad`` (through ``jax.custom_vjp``) or torch autograd (through a
``torch.autograd.Function``), is computed by :func:`xlstm.lstm.lstm_backward`, the
hand-written backpropagation through time, instead of by differentiating the forward
pass operation by operation::

    import jax
    from xlstm.notebook.autodiff import lstm

    def loss(params, x, a0):
        a = lstm(x, a0, params)          # (n_a, m, T_x)
        return (a[:, :, -1] ** 2).sum()

    grads = jax.jit(jax.grad(loss))(params, x, a0)

Neither JAX nor torch is imported before one of their arrays arrives.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

from .._lib.compat import device_of, is_jax, is_torch, namespace
from ..cells.lstm import LSTM_CELL
from .lstm import LSTMCaches, _check_sequence, _forward, lstm_backward, lstm_forward
from .params import PARAM_KEYS

__all__ = ["lstm"]


def lstm(x: Any, a0: Any, params: Mapping[str, Any], c0: Optional[Any] = None) -> Any:
    """Hidden states of the LSTM, differentiable through :func:`~xlstm.lstm.lstm_backward`.

    The value is ``lstm_forward(x, a0, params, c0)[0]``. On JAX the function is a
    ``jax.custom_vjp`` and on torch a ``torch.autograd.Function`` whose backward pass is
    :func:`~xlstm.lstm.lstm_backward`, so ``jax.grad`` (also under ``jax.jit`` and
    ``jax.vmap``) and ``torch.autograd`` use xlstm's hand-written backpropagation through
    time. On other namespaces (numpy, CuPy, array-api-strict), which have no autodiff, it
    simply returns the hidden states.

    Parameters
    ----------
    x, a0, params, c0
        The arguments of :func:`~xlstm.lstm.lstm_forward`: inputs ``(n_x, m, T_x)``, the
        initial hidden state ``(n_a, m)``, the notebook's parameters ``Wf, bf, Wi, bi, Wc,
        bc, Wo, bo, Wy, by`` (see :func:`xlstm.lstm.lstm_cell_forward`) and the initial cell
        state ``(n_a, m)``, default ``None`` meaning zeros.

    Returns
    -------
    a : array, shape (n_a, m, T_x)
        Hidden states, in the namespace, dtype and device of ``x``.

    Raises
    ------
    KeyError, TypeError, ValueError
        As :func:`~xlstm.lstm.lstm_forward`, naming the bad argument.

    Notes
    -----
    Gradients. The one output ``a`` carries gradients, with respect to ``x``, ``a0``,
    ``c0`` (when given) and the parameters: the gate weights and biases get the sums over
    steps of :func:`~xlstm.lstm.lstm_backward`; ``Wy`` and ``by``, which the hidden states
    do not depend on, get zeros; other entries of ``params`` are not read. The predictions
    ``y`` and the cell states ``c`` of :func:`~xlstm.lstm.lstm_forward` are not returned,
    because ``lstm_backward`` takes no gradient for them; a loss on them needs
    ``lstm_forward`` under plain autodiff.

    Higher derivatives. On torch the backward pass is not itself differentiable: a second
    backward pass through it raises. On JAX, reverse mode of any order works (JAX
    differentiates ``lstm_backward`` in turn, so ``jax.grad`` of a gradient gives
    Hessian-vector products), but forward mode (``jax.jvp``, ``jax.jacfwd``) raises, as for
    every ``custom_vjp``.

    The forward pass keeps the state that ``lstm_backward`` needs (see the memory notes of
    :func:`~xlstm.lstm.lstm_forward`) only when a gradient is to be taken: under
    ``jax.grad`` (and ``jax.vjp``), or on torch when grad mode is on and an input requires
    gradients. Otherwise it is the inference path, ``return_caches=False``.
    """
    xp, (n_a, _, _) = _check_sequence(params, x, a0, c0)
    p = {k: params[k] for k in PARAM_KEYS}  # other entries do not take part
    if is_jax(xp):
        return _jax_lstm()(x, a0, p, c0)
    if is_torch(xp) and _torch_records(x, a0, c0, *p.values()):
        return _torch_function().apply(PARAM_KEYS, x, a0, c0, *p.values())
    return _forward(x, a0, p, c0, n_a, xp=xp, keep=False)[0]


def _caches(x, state):
    """The ``caches`` of a forward pass, rebuilt from its stacked state."""
    return LSTMCaches((), x, state)


def _param_grads(params, grads, xp):
    """``grads`` keyed like ``params``; zeros for what the hidden states do not depend on."""
    return {
        k: grads["d" + k] if "d" + k in grads else
        xp.zeros(v.shape, dtype=v.dtype, device=device_of(v))
        for k, v in params.items()
    }  # fmt: skip


# ----------------------------------------------------------------------------------- JAX
@functools.cache
def _jax_lstm():
    """The ``jax.custom_vjp`` function (built once, on first use)."""
    import jax

    @jax.custom_vjp
    def f(x, a0, params, c0):
        return lstm_forward(x, a0, params, c0, return_caches=False)[0]

    def f_fwd(x, a0, params, c0):
        a, _, _, caches = lstm_forward(x, a0, params, c0)
        fields = caches.state._asdict()
        fields.pop("n_a")  # a size, not an array: rebuilt from the shapes
        return a, (fields, x, params, c0)

    def f_bwd(res, da):
        fields, x, params, c0 = res
        state = LSTM_CELL.Cache(**fields, n_a=fields["A"].shape[-1])
        grads = lstm_backward(da, _caches(x, state))
        xp = namespace(da=da)
        dc0 = None if c0 is None else grads["dc0"]
        return grads["dx"], grads["da0"], _param_grads(params, grads, xp), dc0

    f.defvjp(f_fwd, f_bwd)
    return f


# --------------------------------------------------------------------------------- torch
def _torch_records(*tensors):
    """Whether torch autograd would record a function of ``tensors`` now."""
    import torch

    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@functools.cache
def _torch_function():
    """The ``torch.autograd.Function`` (built once, on first use)."""
    import torch
    from torch.autograd.function import once_differentiable

    class LSTMFunction(torch.autograd.Function):
        """Hidden states of :func:`xlstm.lstm.lstm_forward`; backward is ``lstm_backward``."""

        @staticmethod
        def forward(ctx, keys, x, a0, c0, *values):
            params = dict(zip(keys, values))
            a, _, _, caches = lstm_forward(x, a0, params, c0)
            ctx.caches, ctx.keys, ctx.has_c0 = caches, keys, c0 is not None
            ctx.params = params
            return a

        @staticmethod
        @once_differentiable
        def backward(ctx, da):
            grads = lstm_backward(da, ctx.caches)
            xp = namespace(da=da)
            dparams = _param_grads(ctx.params, grads, xp)
            dc0 = grads["dc0"] if ctx.has_c0 else None
            return (None, grads["dx"], grads["da0"], dc0, *(dparams[k] for k in ctx.keys))

    return LSTMFunction
