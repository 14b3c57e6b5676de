"""Every model class inside torch and JAX programs (:mod:`xlstm.autodiff`): the torch module
and the ``jax.custom_vjp`` function whose backward pass is the model's own.

For every kind of model in the registry (:data:`xlstm.models.MODELS`), one layer and two
bidirectional layers over a padded batch:

* torch: values and every gradient (x, initial state, parameters) equal the model's
  ``forward`` and ``backward``; ``torch.autograd.gradcheck`` in float64; the parameters are
  ``nn.Parameter``\\ s that an optimizer step changes; state carried across calls;
* JAX: values and every gradient under ``jax.jit`` equal ``forward`` and ``backward``;
  ``jax.test_util.check_grads`` in float64; ``jax.vmap`` over a batch of inputs.

The frozen part of the state (the xLSTM stabiliser) gets no gradient, and the parts in its
scale are checked only as inputs (their raw values as outputs are defined up to that scale),
as in the conformance suite.
"""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
from helpers import assert_close

from xlstm._lib.compat import namespace_of_module
from xlstm.autodiff import jax_function, torch_module
from xlstm.models import MODELS

N_X, N_A, M, T = 3, 4, 2, 3
LENGTHS = (2, 3)
NAMES = list(MODELS)  # every kind of model, from the registry
#: (num_layers, bidirectional, padded batch)
CONFIGS = [pytest.param((1, False, False), id="1-layer"),
           pytest.param((2, True, True), id="2-layer-bi-lengths")]


def _model(name, config=(1, False, False), **kw):
    """A float64 numpy model of registry entry ``name``."""
    cls, kwargs = MODELS[name]
    layers, bi, _ = config
    return cls(N_X, N_A, num_layers=layers, bidirectional=bi, dtype="float64", seed=0,
               **kwargs, **kw)


def _case(model, config, seed=0):
    """Host float64 arrays: x, a valid initial state, lengths (or None), dy and dstate."""
    rng = np.random.default_rng(seed)
    layer = model.layer
    state = []
    for k, shape in zip(layer.state_names, model._state_shapes(M)):
        s = 0.5 * rng.standard_normal(shape)
        state.append(0.5 + np.abs(s) if k in layer.positive else s)  # a normaliser: > 0
    y_shape = (model.D * N_A, M, T)
    return {
        "x": rng.standard_normal((N_X, M, T)),
        "state": tuple(state),
        "lengths": np.array(LENGTHS) if config[2] else None,
        "dy": rng.standard_normal(y_shape),
        "dstate": tuple(rng.standard_normal(s.shape) for s in state),
    }


def _frozen(model):
    return [k in model.layer.frozen for k in model.layer.state_names]


def _checked_outputs(model):
    """The parts of the final state whose raw values are functions of the inputs: neither
    the stabiliser (frozen) nor a part in its scale."""
    return [i for i, k in enumerate(model.layer.state_names)
            if k not in model.layer.frozen and k not in getattr(model.layer, "scaled", ())]


def _reference(model, case):
    """The model's own forward and backward on numpy: y, final state, dx, dstate0, grads
    (the frozen part gets no gradient on the final state)."""
    y, final, cache = model.forward(case["x"], case["state"], lengths=case["lengths"])
    dstate = tuple(None if f else d for d, f in zip(case["dstate"], _frozen(model)))
    dx, dstate0, grads = model.backward(case["dy"], cache, dstate)
    return y, final, dx, dstate0, grads


# ----------------------------------------------------------------------------------- torch
@pytest.fixture(scope="module")
def torch(backend_named):
    backend_named("torch")
    import torch

    return torch


def _tensors(torch, case, model):
    """The case as float64 tensors; x and every non-frozen state part require grad."""
    x = torch.tensor(case["x"], requires_grad=True)
    state = tuple(torch.tensor(s, requires_grad=not f)
                  for s, f in zip(case["state"], _frozen(model)))
    lengths = None if case["lengths"] is None else torch.tensor(case["lengths"])
    return x, state, lengths


def _close_torch(torch, actual, expected, err=""):
    assert_close(actual, expected, xp=namespace_of_module(torch), device=torch.device("cpu"),
                 dtype=actual.dtype, rtol=1e-10, atol=1e-12, err=err)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", NAMES)
def test_torch_module_equals_forward_and_backward(torch, name, config):
    """Outputs, final state and the gradients on x, on the initial state and on every
    parameter equal the model's forward and backward; the frozen part gets none."""
    model = _model(name, config)
    case = _case(model, config)
    module = torch_module(model)
    x, state, lengths = _tensors(torch, case, model)
    y, final = module(x, state, lengths=lengths)
    want_y, want_final, dx, dstate0, grads = _reference(model, case)
    _close_torch(torch, y, want_y, "y")
    assert isinstance(final, tuple) and len(final) == len(want_final)
    for k, got, want, frozen in zip(model.layer.state_names, final, want_final, _frozen(model)):
        _close_torch(torch, got, want, f"final {k}")
        assert got.requires_grad is not frozen, k  # the stabiliser is not differentiable
    loss = (y * torch.tensor(case["dy"])).sum() + sum(
        (s * torch.tensor(d)).sum() for s, d, f in zip(final, case["dstate"], _frozen(model))
        if not f)
    loss.backward()
    _close_torch(torch, x.grad, dx, "dx")
    for k, s, want, frozen in zip(model.layer.state_names, state, dstate0, _frozen(model)):
        if frozen:
            assert s.grad is None, f"the frozen {k} got a gradient"
        else:
            _close_torch(torch, s.grad, want, f"dstate0 {k}")
    for i, layer in enumerate(grads):
        assert list(module.params[i].keys()) == list(layer)  # the model's order of keys
        for k, want in layer.items():
            _close_torch(torch, module.params[i][k].grad, want, f"d{i}_{k}")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", NAMES)
def test_torch_gradcheck(torch, name, config):
    """``torch.autograd.gradcheck`` (float64) with respect to x, every non-frozen part of
    the initial state and every parameter, of y and the final state's raw parts."""
    from torch.func import functional_call

    model = _model(name, config)
    case = _case(model, config, seed=1)
    module = torch_module(model)
    x, state, lengths = _tensors(torch, case, model)
    frozen = _frozen(model)
    names = [n for n, _ in module.named_parameters()]
    values = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    diff = [s for s, f in zip(state, frozen) if not f]
    outputs = _checked_outputs(model)

    def fn(x, *arrays):
        it = iter(arrays[: len(diff)])
        s = tuple(state[i] if f else next(it) for i, f in enumerate(frozen))
        params = dict(zip(names, arrays[len(diff):]))
        y, final = functional_call(module, params, (x, s), {"lengths": lengths})
        return (y, *(final[i] for i in outputs))

    assert torch.autograd.gradcheck(fn, (x, *diff, *values), fast_mode=True, rtol=1e-6,
                                    atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_torch_parameters_train_and_state_carries(torch, name):
    """The parameters are ``nn.Parameter``\\ s in the model's structure, copies of the
    model's; an optimizer step changes them (not the model's); a state carried from one
    call into the next gives the outputs and gradients of one call over both parts."""
    model = _model(name, (2, False, False))
    before = [{k: np.array(v) for k, v in layer.items()} for layer in model.params]
    module = torch_module(model)
    params = list(module.parameters())
    assert all(isinstance(p, torch.nn.Parameter) and p.dtype == torch.float64 for p in params)
    assert [n for n, _ in module.named_parameters()] == [
        f"params.{i}.{k}" for i, layer in enumerate(model.params) for k in layer]
    assert sum(p.numel() for p in params) == sum(v.size for layer in before
                                                for v in layer.values())
    case = _case(model, (2, False, False))
    x = torch.tensor(case["x"], requires_grad=True)
    dy = torch.tensor(case["dy"])
    y, _ = module(x)  # one call from the zero state
    (y * dy).sum().backward()
    whole = x.grad.clone()
    grads = [p.grad.clone() for p in params]
    module.zero_grad()
    x.grad = None
    y1, state = module(x[..., :2])  # two calls, the state carried
    y2, _ = module(x[..., 2:], state)
    _close_torch(torch, torch.cat([y1, y2], dim=-1), y.detach(), "y")
    (torch.cat([y1, y2], dim=-1) * dy).sum().backward()
    _close_torch(torch, x.grad, whole, "dx")
    for n, p, want in zip(module.state_dict(), params, grads):
        _close_torch(torch, p.grad, want, n)
    torch.optim.SGD(params, lr=0.1).step()
    for i, layer in enumerate(module.model_params()):
        for k, v in layer.items():
            assert not np.allclose(v.numpy(), before[i][k]), f"{i} {k} did not change"
            np.testing.assert_array_equal(model.params[i][k], before[i][k])  # the model's
    back = pickle.loads(pickle.dumps(module))  # the class is found by name
    assert type(back) is type(module)
    _close_torch(torch, back(x)[0], module(x)[0].detach(), "y, unpickled")


def test_torch_dropout_inference_and_errors(torch):
    """``module.training`` is ``train``: with a seed the masks are the model's; without,
    torch's generator draws it; ``eval()`` runs without dropout; under ``no_grad`` nothing
    is recorded; bad arguments raise naming them and the fix."""
    model = _model("lstm", (2, True, False), dropout=0.5)
    case = _case(model, (2, True, False))
    module = torch_module(model)
    x = torch.tensor(case["x"], requires_grad=True)
    y, _ = module(x, seed=3)
    want, _, cache = model.forward(case["x"], train=True, seed=3)
    _close_torch(torch, y, want, "y, train")
    (y * torch.tensor(case["dy"])).sum().backward()
    _close_torch(torch, x.grad, model.backward(case["dy"], cache)[0], "dx, train")
    torch.manual_seed(0)
    first = module(x)[0]
    torch.manual_seed(0)
    _close_torch(torch, module(x)[0], first.detach(), "the same torch seed")
    module.eval()
    with torch.no_grad():
        y, _ = module(x)
    assert y.grad_fn is None
    _close_torch(torch, y, model.forward(case["x"])[0], "y, eval")
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        module(case["x"])
    with pytest.raises(TypeError, match=r"module.to\(torch.float32\)"):
        module(x.float())
    with pytest.raises(TypeError, match=r"state must be the tuple \(a, c\)"):
        module(x, torch.zeros(4, 4, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"state\[1\] must be a torch.Tensor"):
        module(x, (torch.zeros(4, 4, 2, dtype=torch.float64), case["state"][1]))
    with pytest.raises(TypeError, match="model must be an instance of a model class"):
        torch_module(torch.nn.LSTM(3, 4))
    single = torch_module(_model("gru"), dtype="float32")  # a bare array for a one-part state
    assert single.params[0]["Wr"].dtype == torch.float32
    y, (a,) = single(x.detach().float(), torch.zeros(1, N_A, M))
    assert a.shape == (1, N_A, M) and y.dtype == torch.float32
    single.double()  # the module converts like any module
    assert single(x)[0].dtype == torch.float64


# ------------------------------------------------------------------------------------- JAX
@pytest.fixture(scope="module")
def jax(backend_named):
    """JAX in 64-bit mode (restored afterwards)."""
    backend_named("jax")
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", before)


def _jax_model(jax, name, config):
    cls, kwargs = MODELS[name]
    return cls(N_X, N_A, num_layers=config[0], bidirectional=config[1], xp=jax.numpy,
               dtype="float64", seed=0, **kwargs)


def _close_jax(jax, actual, expected, err=""):
    assert_close(actual, expected, xp=namespace_of_module(jax.numpy), device=None,
                 dtype=jax.numpy.float64, rtol=1e-10, atol=1e-12, err=err)


def _jax_case(jax, case):
    """The case's x, state, lengths and cotangents (dy, dstate) as JAX arrays."""
    jnp = jax.numpy
    lengths = None if case["lengths"] is None else jnp.asarray(case["lengths"])
    ct = (jnp.asarray(case["dy"]), tuple(jnp.asarray(d) for d in case["dstate"]))
    return (jnp.asarray(case["x"]), tuple(jnp.asarray(s) for s in case["state"]), lengths,
            ct)


def _vjp(f):
    """``(y, state), (dparams, dx, dstate0)`` of ``f`` at params, x, state, lengths for
    the cotangent ``ct``."""
    import jax

    def run(params, x, state, lengths, ct):
        out, vjp = jax.vjp(lambda p, x, s: f(p, x, s, lengths), params, x, state)
        return out, vjp(ct)

    return run


def _check_against_reference(jax, model, case, out, grads, params):
    """``out`` and ``grads`` of :func:`_vjp` against the model's forward and backward."""
    (y, final), (dparams, dx, dstate0) = out, grads
    want_y, want_final, want_dx, want_dstate0, want_grads = _reference(model, case)
    _close_jax(jax, y, want_y, "y")
    assert isinstance(final, tuple) and isinstance(dstate0, tuple)
    for k, got, want in zip(model.layer.state_names, final, want_final):
        _close_jax(jax, got, want, f"final {k}")
    _close_jax(jax, dx, want_dx, "dx")
    for k, got, want, frozen in zip(model.layer.state_names, dstate0, want_dstate0,
                                    _frozen(model)):
        _close_jax(jax, got, np.zeros_like(want) if frozen else want, f"dstate0 {k}")
    assert jax.tree.structure(dparams) == jax.tree.structure(params)
    for i, layer in enumerate(want_grads):
        for k, want in layer.items():
            _close_jax(jax, dparams[i][k], want, f"d{i}_{k}")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", NAMES)
def test_jax_function_equals_forward_and_backward(jax, name, config):
    """Outputs, final state and the VJP (params, x, state) equal the model's forward and
    backward; the frozen part gets zeros and its cotangent is not used."""
    model = _model(name, config)
    case = _case(model, config)
    jmodel = _jax_model(jax, name, config)
    x, state, lengths, ct = _jax_case(jax, case)
    out, grads = _vjp(jax_function(jmodel))(jmodel.params, x, state, lengths, ct)
    _check_against_reference(jax, model, case, out, grads, jmodel.params)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", NAMES)
def test_jax_check_grads(jax, name, config):
    """``jax.test_util.check_grads`` (reverse mode, float64) with respect to the parameters,
    x and every non-frozen part of the initial state, of y and the final state's raw
    parts."""
    from jax.test_util import check_grads

    model = _jax_model(jax, name, config)
    case = _case(model, config, seed=1)
    f = jax_function(model)
    frozen = _frozen(model)
    x, state, lengths, _ = _jax_case(jax, case)
    outputs = _checked_outputs(model)

    def g(params, x, diff):
        it = iter(diff)
        s = tuple(state[i] if fr else next(it) for i, fr in enumerate(frozen))
        y, final = f(params, x, s, lengths)
        return (y, *(final[i] for i in outputs))

    diff = [s for s, fr in zip(state, frozen) if not fr]
    check_grads(g, (model.params, x, diff), order=1, modes=["rev"])


@pytest.mark.parametrize("name", NAMES)
def test_jax_function_under_jit_and_vmap(jax, name):
    """``jax.jit`` of ``jax.vmap`` over a leading batch of x and of the cotangents (two
    bidirectional layers, a padded batch): each element's outputs and VJP equal the
    model's forward and backward of that element."""
    jnp = jax.numpy
    config = (2, True, True)
    model = _model(name, config)
    cases = [_case(model, config, seed=s) for s in (2, 3)]
    for c in cases[1:]:  # one state and one set of lengths for the whole batch
        c["state"], c["lengths"] = cases[0]["state"], cases[0]["lengths"]
    jmodel = _jax_model(jax, name, config)
    _, state, lengths, _ = _jax_case(jax, cases[0])
    xs, cts = zip(*((x, ct) for x, _, _, ct in (_jax_case(jax, c) for c in cases)))
    batched = jax.jit(jax.vmap(_vjp(jax_function(jmodel)), in_axes=(None, 0, None, None, 0)))
    outs, grads = batched(jmodel.params, jnp.stack(xs), state, lengths,
                          jax.tree.map(lambda *a: jnp.stack(a), *cts))
    for b, case in enumerate(cases):
        pick = functools.partial(jax.tree.map, lambda a: a[b])
        _check_against_reference(jax, model, case, pick(outs), pick(grads), jmodel.params)


def test_jax_state_structures_dropout_and_errors(jax):
    """The state's cotangent has the structure of the ``state`` argument (tuple, list, a
    bare array for a one-part state); ``train`` and ``seed`` give the model's dropout
    masks, static under ``jax.jit``; numpy arguments are taken; a non-model is refused."""
    jnp = jax.numpy
    gru = _jax_model(jax, "gru", (1, False, False))
    f = jax_function(gru)
    x = jnp.asarray(_case(gru, (1, False, False))["x"])
    a0 = jnp.ones((1, N_A, M), dtype=jnp.float64)

    def loss(state):
        return jnp.sum(f(gru.params, x, state)[0] ** 2)

    bare = jax.grad(loss)(a0)
    assert not isinstance(bare, (tuple, list)) and bare.shape == a0.shape
    listed = jax.grad(loss)([a0])
    assert isinstance(listed, list)
    _close_jax(jax, listed[0], bare)
    _close_jax(jax, jax.grad(loss)((a0,))[0], bare)

    model = _model("lstm", (2, False, False), dropout=0.5)
    case = _case(model, (2, False, False))
    f = jax_function(model)  # a numpy model: its configuration is used, not its arrays
    want_y, _, cache = model.forward(case["x"], train=True, seed=5)
    want_dx = model.backward(case["dy"], cache)[0]
    run = jax.jit(f, static_argnames=("train", "seed"))
    y, _ = run(model.params, case["x"], train=True, seed=5)
    _close_jax(jax, y, want_y, "y, train")
    dx = jax.grad(lambda x: jnp.sum(f(model.params, x, train=True, seed=5)[0] * case["dy"]))(
        jnp.asarray(case["x"]))
    _close_jax(jax, dx, want_dx, "dx, train")
    _close_jax(jax, run(model.params, case["x"])[0], model.forward(case["x"])[0], "y, eval")
    with pytest.raises(TypeError, match="model must be an instance of a model class"):
        jax_function(lambda x: x)


def test_second_order(jax, torch):
    """JAX differentiates the backward pass in turn (a Hessian-vector product equals JAX's
    autodiff of the forward pass); torch's backward pass is not differentiable and says
    so."""
    jnp = jax.numpy
    model = _jax_model(jax, "lstm", (1, False, False))
    f = jax_function(model)
    x = jnp.asarray(_case(model, (1, False, False))["x"])
    v = jnp.cos(x)

    def hvp(loss):
        return jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))(x)

    mine = hvp(lambda x: jnp.sum(jnp.tanh(f(model.params, x)[0])))
    plain = hvp(lambda x: jnp.sum(jnp.tanh(model.forward(x, return_cache=False)[0])))
    _close_jax(jax, mine, plain, "hvp")
    module = torch_module(_model("lstm"))
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    (dx,) = torch.autograd.grad(module(xt)[0].square().sum(), xt, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        dx.sum().backward()


def test_top_level_module_keeps_the_notebook_function():
    """``xlstm.autodiff`` holds the notebook's ``lstm`` beside the model functions."""
    import xlstm.autodiff
    from xlstm.autodiff import lstm
    from xlstm.notebook import autodiff as notebook_autodiff

    assert xlstm.autodiff.lstm is lstm is notebook_autodiff.lstm
    assert xlstm.autodiff.torch_module is torch_module
    assert set(xlstm.autodiff.__all__) == {"lstm", "torch_module", "jax_function"}
