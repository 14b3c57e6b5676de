"""Every model class inside torch and JAX programs, differentiated by its own backward pass.

:func:`torch_module` wraps a model as a ``torch.nn.Module`` whose parameters are torch
``Parameter``\\ s and whose call is a ``torch.autograd.Function``: torch autograd (and any
torch optimizer) runs the model's hand-written :meth:`~xlstm.LSTM.backward` instead of recording the
forward pass operation by operation. :func:`jax_function` gives the model as a
``jax.custom_vjp`` function of its parameters, ``f(params, x, state=None, lengths=None)``,
for ``jax.grad``, ``jax.jit`` and ``jax.vmap``::

    module = torch_module(model)            # torch.nn.Module
    y, state = module(x)                    # loss.backward() runs model.backward

    f = jax_function(model)                 # jax.custom_vjp
    y, state = f(params, x)                 # jax.grad(loss)(params, x) runs model.backward

The stabiliser of the xLSTM models (the ``m_state`` of :class:`~xlstm.SLSTM` and
:class:`~xlstm.MLSTM`; ``model.layer.frozen``) carries no gradient, as in
:meth:`~xlstm.LSTM.backward`: its part of the initial state gets none, and a gradient on its part of the
final state is not used. The parts kept in its scale (their ``c`` and ``n_state``, the
mLSTM's ``C``; ``model.layer.scaled``) take and give gradients in that scale with the
stabiliser held, as :meth:`~xlstm.LSTM.backward`'s ``dstate``: exact for state carried across calls to a
loss on the outputs (truncated backpropagation), but not the derivative of their raw values,
which are defined only up to the stabiliser's scale.

Neither torch nor JAX is imported before one of these functions is called.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable

from .._lib.compat import to_host

__all__ = ["torch_module", "jax_function"]


def _check_model(model: Any, fn: str) -> None:
    """Raise unless ``model`` is an instance of one of the model classes."""
    from .stack import _Model

    if not isinstance(model, _Model):
        raise TypeError(
            f"{fn}(model): model must be an instance of a model class (xlstm.LSTM, xlstm.GRU, "
            f"xlstm.RNN, xlstm.SLSTM, xlstm.MLSTM, xlstm.models.Recurrent), got "
            f"{type(model).__name__}"
        )


def _frozen(model: Any) -> tuple[bool, ...]:
    """For each part of the model's state, whether it is frozen (carries no gradient)."""
    return tuple(k in model.layer.frozen for k in model.layer.state_names)


# --------------------------------------------------------------------------------- torch
def torch_module(model: Any, *, dtype: Any = None, device: Any = None) -> Any:
    """The model as a ``torch.nn.Module`` whose backward pass is the model's own.

    The module holds a copy of ``model.params`` as torch ``Parameter``\\ s, one
    ``ParameterDict`` per (layer, direction) (``module.params[i]["Wf"]``, state-dict keys
    ``params.<i>.<key>``), so that torch optimizers, ``state_dict``, ``.to()``,
    ``.double()`` and ``torch.func.functional_call`` work as for any module. Its call runs
    a ``torch.autograd.Function`` whose forward is :meth:`~xlstm.LSTM.forward` and whose backward is
    :meth:`~xlstm.LSTM.backward` (xlstm's hand-written backpropagation through time).

    Parameters
    ----------
    model : LSTM, GRU, RNN, SLSTM, MLSTM or Recurrent
        The model, in any namespace; its configuration and parameters are copied (training
        the module does not change ``model.params``; ``model_params()`` gives the
        module's).
    dtype : torch.dtype or str, optional
        The parameters' dtype; default the model's (``torch.float64`` for a float64 model).
    device : torch.device or str, optional
        The parameters' device; default the model's for a torch model, else the CPU.

    Returns
    -------
    module : torch.nn.Module
        ``module(x, state=None, *, lengths=None, seed=None) -> (y, state)``, with ``x``,
        ``y`` and ``state`` as in the model's :meth:`~xlstm.LSTM.forward` (its layout, a tuple of
        ``(num_layers * D, ..., m)`` state arrays). ``module.training`` is the model's
        ``train`` (dropout between layers; torch modules start in training mode, so call
        ``module.eval()`` for inference). ``seed`` seeds the dropout masks; when they are
        drawn and no ``seed`` is given, it is drawn from torch's default generator, so that
        ``torch.manual_seed`` makes a run repeatable. ``module.model`` is the torch model
        that runs the call, and ``module.model_params()`` the parameters in the structure
        of ``model.params``.

    Raises
    ------
    TypeError
        If ``model`` is not an instance of a model class.

    Notes
    -----
    Gradients flow to ``x``, to every part of the initial state but a frozen one, and to
    every parameter, from ``y`` and from every part of the final state but a frozen one.
    The frozen part (the xLSTM stabiliser, ``m_state``; see ``model.layer.frozen``) is
    returned as a tensor that does not require grad, and a frozen part of the initial state
    gets no gradient (``None``), by the model's definition: the outputs do not depend on it.
    The parts in its scale (``model.layer.scaled``) take and give gradients in that scale
    with the stabiliser held (see :meth:`~xlstm.LSTM.backward`).

    Without grad mode, or when nothing requires grad (``torch.no_grad()``,
    ``module.requires_grad_(False)``), the call keeps nothing for a backward pass
    (:meth:`~xlstm.LSTM.forward` with ``return_cache=False``). The backward pass is not itself
    differentiable: a second-order gradient raises.

    Examples
    --------
    >>> import torch
    >>> import xlstm
    >>> from xlstm.autodiff import torch_module
    >>> model = xlstm.LSTM(3, 4, dtype="float64", seed=0)
    >>> module = torch_module(model)
    >>> [tuple(p.shape) for p in module.parameters()][:2]
    [(4, 7), (4, 1)]
    >>> x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    >>> y, (a, c) = module(x)
    >>> (y.square().sum() + c.sum()).backward()
    >>> tuple(x.grad.shape), tuple(module.params[0]["Wf"].grad.shape)
    ((3, 2, 5), (4, 7))
    >>> opt = torch.optim.SGD(module.parameters(), lr=0.1)
    >>> opt.step()
    """
    _check_model(model, "torch_module")
    import torch

    Module, _ = _torch_classes()
    return Module(_torch_runner(model, torch, dtype, device))


def _torch_runner(model, torch, dtype, device):
    """A torch model of ``model``'s configuration and parameters (copies)."""
    from .._lib.compat import namespace_of_module, resolve_dtype
    from .stack import _dtype_name

    first = next(iter(model.params[0].values()))
    on_torch = isinstance(first, torch.Tensor)
    dtype = resolve_dtype(namespace_of_module(torch),
                          _dtype_name(model.dtype) if dtype is None else dtype)
    if device is None:
        device = first.device if on_torch else "cpu"
    to = getattr(model, "to", None)
    if callable(to):
        runner = to(xp=torch, dtype=dtype, device=device)
    else:
        config = {**model.config(), "dtype": _dtype_name(dtype)}
        runner = type(model).from_config(config, xp=torch, device=device)
    # copies, so that the module's parameters share no memory with the model's
    runner.params = [
        {k: v.detach().to(dtype=dtype, device=device, copy=True) if on_torch else
         torch.asarray(to_host(v).copy(), dtype=dtype, device=device)
         for k, v in layer.items()}
        for layer in model.params
    ]
    return runner


def __getattr__(name: str) -> Any:
    """``TorchModule``, the class of :func:`torch_module`'s modules (made on first use)."""
    if name == "TorchModule":
        return _torch_classes()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _torch_classes():
    """The ``torch.nn.Module`` and ``torch.autograd.Function`` classes (built once)."""
    import torch
    from torch.autograd.function import once_differentiable

    class ModelFunction(torch.autograd.Function):
        """``(y, *final_state)`` of a model's :meth:`~xlstm.LSTM.forward`; backward is its
        :meth:`~xlstm.LSTM.backward`."""

        @staticmethod
        def forward(ctx, runner, call, keys, n_state, x, lengths, *arrays):
            state = tuple(arrays[:n_state]) if n_state else None
            # the parameters' tensors detached: the cache keeps no autograd graph
            params = _unflatten(keys, [p.detach() for p in arrays[n_state:]])
            y, final, cache = runner.forward(x, state, lengths=lengths, params=params, **call)
            frozen = _frozen(runner)
            ctx.runner, ctx.cache, ctx.frozen, ctx.n_state = runner, cache, frozen, n_state
            ctx.keys = keys
            ctx.y_like = (tuple(y.shape), y.dtype, y.device)
            ctx.mark_non_differentiable(*(s for s, f in zip(final, frozen) if f))
            ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
            return (y, *final)

        @staticmethod
        @once_differentiable
        def backward(ctx, dy, *dfinal):
            if dy is None:
                shape, dtype, device = ctx.y_like
                dy = torch.zeros(shape, dtype=dtype, device=device)
            dstate = tuple(None if f else d for d, f in zip(dfinal, ctx.frozen))
            if all(d is None for d in dstate):
                dstate = None
            dx, dstate0, grads = ctx.runner.backward(dy, ctx.cache, dstate)
            dstate0 = tuple(None if f else d for d, f in zip(dstate0, ctx.frozen)) \
                if ctx.n_state else ()
            return (None, None, None, None, dx, None, *dstate0,
                    *(layer[k] for layer, ks in zip(grads, ctx.keys) for k in ks))

    class TorchModule(torch.nn.Module):
        """A model as a ``torch.nn.Module`` (:func:`xlstm.autodiff.torch_module`)."""

        def __init__(self, runner):
            super().__init__()
            self.model = runner
            # the model's order of keys (a ParameterDict made from a dict sorts them)
            self._keys = [tuple(layer) for layer in runner.params]
            self.params = torch.nn.ModuleList(
                torch.nn.ParameterDict([(k, torch.nn.Parameter(v)) for k, v in layer.items()])
                for layer in runner.params
            )

        def model_params(self) -> list[dict[str, Any]]:
            """The parameters in the structure of ``model.params`` (detached tensors, which
            share memory with the module's)."""
            return [{k: layer[k].detach() for k in ks}
                    for layer, ks in zip(self.params, self._keys)]

        def forward(self, x: Any, state: Any = None, *, lengths: Any = None,
                    seed: int | None = None) -> tuple[Any, tuple]:
            """``(y, state)`` of the model's :meth:`~xlstm.LSTM.forward` (see :func:`torch_module`)."""
            runner = self.model
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
            first = self.params[0][self._keys[0][0]]
            if x.dtype != first.dtype:
                raise TypeError(
                    f"x is {x.dtype} but the module's parameters are {first.dtype}: cast x "
                    f"(x.to({first.dtype})) or convert the module (module.to({x.dtype}))")
            if state is not None:
                n = len(runner.layer.state_names)
                if n == 1 and isinstance(state, torch.Tensor):
                    state = (state,)
                if not isinstance(state, (tuple, list)) or len(state) != n:
                    names = ", ".join(k.lower() for k in runner.layer.state_names)
                    raise TypeError(f"state must be the tuple ({names}{',' if n == 1 else ''}) "
                                    f"of {type(runner).__name__}, or None, got "
                                    f"{type(state).__name__}")
                state = tuple(state)
                for i, s in enumerate(state):
                    if not isinstance(s, torch.Tensor):
                        raise TypeError(f"state[{i}] must be a torch.Tensor, got "
                                        f"{type(s).__name__}")
            train = self.training
            if seed is None and train and runner.dropout > 0.0 and runner.num_layers > 1:
                seed = int(torch.randint(0, 2**62, ()))  # torch's generator decides
            call = {"train": train, "seed": seed}
            keys = self._keys
            values = [layer[k] for layer, ks in zip(self.params, keys) for k in ks]
            tensors = (x, *(state or ()), *values)
            if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
                params = _unflatten(keys, values)
                y, final, _ = runner.forward(x, state, lengths=lengths, params=params,
                                             return_cache=False, **call)
                return y, final
            out = ModelFunction.apply(runner, call, keys, len(state or ()), x, lengths,
                                      *(state or ()), *values)
            return out[0], tuple(out[1:])

        def extra_repr(self) -> str:
            return f"model={self.model!r}"

    # the class is this module's TorchModule (see __getattr__), by name: it pickles
    TorchModule.__module__, TorchModule.__qualname__ = __name__, "TorchModule"
    return TorchModule, ModelFunction


def _unflatten(keys, values):
    """The parameter list of dicts from its keys per (layer, direction) and its values."""
    it = iter(values)
    return [{k: next(it) for k in layer} for layer in keys]


# ----------------------------------------------------------------------------------- JAX
def jax_function(model: Any) -> Callable:
    """The model as a ``jax.custom_vjp`` function whose backward pass is the model's own.

    ``f(params, x, state=None, lengths=None, train=False, seed=None) -> (y, state)`` is
    ``model.forward(x, state, lengths=lengths, params=params, train=train, seed=seed)``
    without the cache; reverse mode (``jax.grad``, ``jax.vjp``) runs :meth:`~xlstm.LSTM.backward`,
    xlstm's hand-written backpropagation through time, instead of differentiating the
    forward pass. It works under ``jax.jit`` and ``jax.vmap`` (over a
    leading batch of ``x``, say: each element is one call of the model).

    Parameters
    ----------
    model : LSTM, GRU, RNN, SLSTM, MLSTM or Recurrent
        The model: its configuration is used, not its parameters (``f`` takes those).

    Returns
    -------
    f : jax.custom_vjp
        ``f(params, x, state=None, lengths=None, train=False, seed=None)``. ``params`` has
        the structure of ``model.params``; ``x``, ``state`` and ``lengths`` are as in
        :meth:`~xlstm.LSTM.forward` (anything ``jax.numpy.asarray`` takes; integers for ``lengths``).
        ``train`` and ``seed`` (dropout between layers) are static: pass them as Python
        values (``jax.jit(f, static_argnames=("train", "seed"))``); under ``jax.vmap``
        every element of the batch gets the same masks. Returns ``(y, state)``, ``state``
        a tuple.

    Raises
    ------
    TypeError
        If ``model`` is not an instance of a model class.

    Notes
    -----
    Gradients flow to ``params``, ``x`` and every part of ``state`` but a frozen one, from
    ``y`` and from every part of the final state but a frozen one (``lengths`` gets none).
    The frozen part (the xLSTM stabiliser, ``m_state``; ``model.layer.frozen``) gets a zero
    gradient and its cotangent is not used; the parts in its scale
    (``model.layer.scaled``) take and give gradients in that scale with the stabiliser held
    (see :meth:`~xlstm.LSTM.backward`).

    Residuals. A model's cache is not a pytree of arrays, so the function keeps its inputs
    ``(params, x, state, lengths)`` as residuals and the backward rule runs the forward
    pass again, with its cache, before :meth:`~xlstm.LSTM.backward`: one more forward pass per
    gradient, and between the two passes no memory beyond the inputs (gradient
    checkpointing of the whole call).

    Higher derivatives: reverse mode of reverse mode works (JAX differentiates
    :meth:`~xlstm.LSTM.backward` in turn); forward mode (``jax.jvp``, ``jax.jacfwd``) raises, as for
    every ``custom_vjp``.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import xlstm
    >>> from xlstm.autodiff import jax_function
    >>> model = xlstm.GRU(3, 4, xp=jnp, dtype="float32", seed=0)
    >>> f = jax_function(model)
    >>> x = jnp.ones((3, 2, 5), dtype=jnp.float32)
    >>> y, (a,) = f(model.params, x)
    >>> y.shape, a.shape
    ((4, 2, 5), (1, 4, 2))
    >>> def loss(params, x):
    ...     y, _ = f(params, x)
    ...     return jnp.sum(y ** 2)
    >>> grads = jax.jit(jax.grad(loss))(model.params, x)
    >>> sorted(grads[0]) == sorted(model.params[0])
    True
    >>> jax.vmap(lambda x: f(model.params, x)[0])(jnp.stack([x, 2 * x])).shape
    (2, 4, 2, 5)
    """
    _check_model(model, "jax_function")
    import jax
    import jax.numpy as jnp

    frozen = _frozen(model)

    def inputs(params, x, state, lengths):
        params = jax.tree.map(jnp.asarray, params)
        x = jnp.asarray(x)
        if state is not None:
            state = jax.tree.map(jnp.asarray, state)
        if lengths is not None:
            lengths = jnp.asarray(lengths)
        return params, x, state, lengths

    def run(params, x, state, lengths, train, seed, keep):
        return model.forward(x, state, lengths=lengths, params=params, train=train,
                             seed=seed, return_cache=keep)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
    def f(params, x, state=None, lengths=None, train=False, seed=None):
        y, final, _ = run(*inputs(params, x, state, lengths), train, seed, False)
        return y, final

    def f_fwd(params, x, state, lengths, train, seed):
        args = inputs(params, x, state, lengths)
        y, final, _ = run(*args, train, seed, False)
        return (y, final), args

    def f_bwd(train, seed, res, g):
        dy, dfinal = jax.tree.map(jnp.asarray, g)  # check_grads gives numpy cotangents
        state = res[2]
        _, _, cache = run(*res, train, seed, True)
        dstate = tuple(None if fr else d for d, fr in zip(dfinal, frozen))
        dx, dstate0, grads = model.backward(dy, cache, dstate)
        return grads, dx, _like_state(state, dstate0), None

    f.defvjp(f_fwd, f_bwd)
    return f


def _like_state(state, dstate0):
    """``dstate0`` in the structure of the ``state`` argument (``None``: no state given)."""
    if state is None:
        return None
    if isinstance(state, Sequence):
        return type(state)(dstate0)
    return dstate0[0]  # a bare array for a one-part state
