"""The conformance suite: every model class (one per cell) against the same checks.

For each model in :data:`SPECS`, on every backend fixture, on the array path and the
accelerated one, in float32 and float64 where it matters:

* gradcheck: every gradient (``dx``, ``dstate0`` and every parameter, with a nonzero
  gradient on the final state too) against float64 central differences;
* the accelerated path equals the plain one (bit for bit on numpy);
* equality with torch autograd through ``from_torch`` (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``);
* padding is never read; a padded batch equals each sequence alone;
* chunks with the state carried (and its gradient carried back) equal one call;
* layers and directions compose: a stacked bidirectional model equals one-layer models
  composed by hand;
* inputs of +-1e4 in float32 give finite outputs and gradients;
* every backend equals numpy;
* no mutation of inputs or parameters, outputs independent of the cache, and inference
  memory that does not grow with ``T``;
* bad input raises errors that name the argument.

A new cell passes by adding its model to :data:`SPECS`; nothing else here knows the cells.
"""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import pytest
from conftest import on_backends
from helpers import assert_array, assert_close, to_numpy, to_xp
from oracles import central_differences

import xlstm
from xlstm._lib import compat as _compat
from xlstm.cells.base import Cell
from xlstm.engine import loop as _engine
from xlstm.models import MODELS, ModelCache

NP, CPU = _compat.load_backend("numpy")

#: The model classes of the registry, by name.
CLASSES = {cls.__name__: cls for cls, _ in MODELS.values()}
#: (model class name, constructor keywords): one entry per kind of layer in the registry
#: (xlstm.models.MODELS: a new cell is here with no change to this file), then the named
#: models' further sizes (heads, query size) and the mLSTM's recurrent form.
SPECS = [(cls.__name__, tuple(kw.items())) for cls, kw in MODELS.values()] + [
    ("SLSTM", (("num_heads", 2),)),
    ("MLSTM", (("num_heads", 2), ("d_qk", 3), ("form", "recurrent"))),
]
#: Further settings of a model that take another code path (the mLSTM's chunkwise form; its
#: default is parallel at these T): run by the checks that compare runs with each other, not
#: by the costly ones (gradcheck, which the model's own tests run for every setting).
VARIANTS = [
    ("MLSTM", (("num_heads", 2), ("chunk", 2), ("form", "chunkwise"))),
]
N_X, N_A, M, T = 3, 4, 2, 5
LENGTHS = (1, T)


def _spec_id(spec):
    name, kw = spec[0], dict(spec[1])
    return name + "".join(f"-{v}" for v in kw.values())


def _specs(specs=SPECS):
    for spec in specs:
        yield pytest.param(spec, id=_spec_id(spec))


SPEC = pytest.mark.parametrize("spec", list(_specs()))
#: SPECS and VARIANTS.
EVERY_SPEC = pytest.mark.parametrize("spec", list(_specs(SPECS + VARIANTS)))
#: The specs whose model has a torch.nn counterpart.
TORCH_SPEC = pytest.mark.parametrize(
    "spec", [s for s in _specs() if CLASSES[s.values[0][0]].torch_name is not None])
PATH_IDS = {True: "accelerated", False: "array-path"}
PATH = pytest.mark.parametrize("accel", list(PATH_IDS), ids=list(PATH_IDS.values()))
#: (num_layers, bidirectional, padded) of a case: one layer; two bidirectional ones; the
#: same over a padded batch (lengths LENGTHS, unsorted, with 1 and T).
CONFIG_IDS = {(1, False, False): "1", (2, True, False): "2bi", (2, True, True): "2bi-lengths"}
CONFIG = pytest.mark.parametrize("config", list(CONFIG_IDS), ids=list(CONFIG_IDS.values()))


def _model(spec, *, xp=np, dtype="float64", device=None, config=(1, False, False), **extra):
    name, kw = spec[0], dict(spec[1])
    return CLASSES[name](N_X, N_A, xp=xp, dtype=dtype, device=device, seed=3,
                                num_layers=config[0], bidirectional=config[1], **kw, **extra)


def _need_accelerated_path(spec):
    """Skip unless the model runs on the engine, whose loops have an accelerated path (the
    mLSTM has its own forms: one path)."""
    if not isinstance(getattr(_model(spec).layer, "cell", None), Cell):
        pytest.skip(f"{spec[0]} has one path (it does not run on the engine's loops)")


def _case(spec, seed=0, config=(1, False, False)):
    """Host float64 arrays of one case: x, state, dy, dstate and the parameters."""
    rng = np.random.default_rng(seed)
    model = _model(spec, config=config)
    cell = model.layer
    shapes = model._state_shapes(M)
    state = [0.5 * rng.standard_normal(shape) for shape in shapes]
    for i, k in enumerate(cell.state_names):
        if k in cell.positive:  # a normaliser: a valid state has it positive
            state[i] = 0.5 + np.abs(state[i])
    # With a stabiliser (a frozen state), the parts in its scale are defined up to a common
    # factor: only a loss on the other parts (the sLSTM's h; none of the mLSTM's) is a
    # function of the inputs alone.
    dstate = [np.zeros(shape) if k in cell.frozen or k in getattr(cell, "scaled", ())
              else rng.standard_normal(shape) for k, shape in zip(cell.state_names, shapes)]
    return {
        "x": rng.standard_normal((N_X, M, T)),
        "state": tuple(state),
        "dy": rng.standard_normal((model.D * N_A, M, T)),
        "dstate": tuple(dstate),
        "params": [{k: np.array(v) for k, v in layer.items()} for layer in model.params],
        "lengths": np.array(LENGTHS) if config[2] else None,
    }


def to_xp_params(case, xp, device, dtype="float64"):
    """The case's parameters on ``xp``."""
    return [{k: to_xp(v, xp, device, getattr(xp, dtype)) for k, v in layer.items()}
            for layer in case["params"]]


def _run(model, case, xp, device, dtype="float64"):
    """forward then backward on ``xp``; everything back on the host."""
    cast = functools.partial(to_xp, xp=xp, device=device, dtype=getattr(xp, dtype))
    params = [{k: cast(v) for k, v in layer.items()} for layer in case["params"]]
    state = None if case["state"] is None else tuple(cast(s) for s in case["state"])
    lengths = case.get("lengths")
    if lengths is not None:
        lengths = to_xp(lengths, xp, device, xp.int64)
    y, final, cache = model.forward(cast(case["x"]), state, params=params, lengths=lengths)
    dx, d0, grads = model.backward(cast(case["dy"]), cache, tuple(cast(d) for d in case["dstate"]))
    return {"y": y, **{f"state{i}": s for i, s in enumerate(final)}, "dx": dx,
            **{f"dstate0_{i}": d for i, d in enumerate(d0)},
            **{f"d{i}_{k}": v for i, layer in enumerate(grads) for k, v in layer.items()}}


@functools.cache
def _numeric_grads(spec, config=(1, False, False)):
    """Central differences of ``L = sum(y dy) + sum(state_T dstate)`` on numpy, float64."""
    case = _case(spec, config=config)
    model = _model(spec, config=config)
    keys = [list(layer) for layer in case["params"]]
    n_s = len(case["state"])

    def loss(arrs):
        params = [{k: arrs[f"{i}_{k}"] for k in ks} for i, ks in enumerate(keys)]
        state = tuple(arrs[f"state{i}"] for i in range(n_s))
        with xlstm.accelerators(False):
            y, final, _ = model.forward(arrs["x"], state, params=params, return_cache=False,
                                        lengths=case["lengths"])
        return float(np.sum(y * case["dy"]) + sum(np.sum(f * d) for f, d in zip(final, case["dstate"])))

    arrays = {"x": case["x"], **{f"state{i}": s for i, s in enumerate(case["state"])},
              **{f"{i}_{k}": v for i, layer in enumerate(case["params"]) for k, v in layer.items()}}
    num = central_differences(loss, arrays)
    return {"dx": num["x"], **{f"dstate0_{i}": num[f"state{i}"] for i in range(n_s)},
            **{f"d{i}_{k}": num[f"{i}_{k}"] for i, ks in enumerate(keys) for k in ks}}


def _gradcheck_cases(name, xp):
    """On numpy both paths, one layer and two bidirectional layers over a padded batch;
    elsewhere the latter on the array path. The rest follows from these: the accelerated
    path elsewhere equals the array path (test_accelerated_path_equals_plain_path, every
    config), every backend equals numpy (test_every_backend_equals_numpy), and two
    bidirectional layers without ``lengths`` equal each sequence of a padded batch run
    alone (test_a_padded_batch_equals_each_sequence_alone, every gradient, both paths)."""
    paths = list(PATH_IDS) if name == "numpy" else [False]
    configs = [(1, False, False), (2, True, True)] if name == "numpy" else [(2, True, True)]
    return [pytest.param(accel, config, id=f"{CONFIG_IDS[config]}-{PATH_IDS[accel]}")
            for accel in paths for config in configs]


# ------------------------------------------------------------------------------- gradients
@SPEC
@pytest.mark.parametrize("backend, accel, config", on_backends(_gradcheck_cases),
                         indirect=["backend"])
def test_gradcheck(spec, accel, config, xp, device):
    """Every gradient against float64 central differences of the forward pass."""
    if accel:
        _need_accelerated_path(spec)
    model = _model(spec, xp=xp, device=device, config=config)
    with xlstm.accelerators(accel):
        got = _run(model, _case(spec, config=config), xp, device)
    num = _numeric_grads(spec, config)
    frozen = {f"dstate0_{i}" for i, k in enumerate(model.layer.state_names)
              if k in model.layer.frozen}
    for k, want in num.items():
        if k in frozen:  # no gradient, by definition (the output does not depend on it)
            assert_close(got[k], np.zeros_like(want), xp=xp, device=device,
                         dtype=xp.float64, rtol=0, atol=0, err=k)
            continue
        assert_close(got[k], want, xp=xp, device=device, dtype=xp.float64, rtol=1e-6,
                     atol=1e-8, err=k)


@SPEC
@CONFIG
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", on_backends(
    lambda name, xp: [pytest.param(id="loops")]
    if _engine.accelerated_loops(xp, xp.float64) is not None else []), indirect=True)
def test_accelerated_path_equals_plain_path(spec, config, dtype, xp, device):
    """Bit for bit on numpy (numba runs the same point functions); to rounding elsewhere: on
    every backend with loops of its own (on the others both paths are the same code)."""
    _need_accelerated_path(spec)
    model = _model(spec, xp=xp, dtype=dtype, device=device, config=config)
    case = _case(spec, seed=1, config=config)
    with xlstm.accelerators(True):
        fast = _run(model, case, xp, device, dtype)
    with xlstm.accelerators(False):
        plain = _run(model, case, xp, device, dtype)
    exact = _compat.is_numpy(xp)
    for k in plain:
        assert_close(fast[k], plain[k], xp=xp, device=device, err=k,
                     **({"rtol": 0, "atol": 0} if exact else {}))


@TORCH_SPEC
@pytest.mark.parametrize("padded", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("layout", ["notebook", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_torch_autograd(spec, num_layers, bidirectional, layout, padded, xp, device):
    """Outputs, final state, dx, dstate0 and every parameter gradient equal torch's
    autograd through ``from_torch`` (float64), with gradients on outputs and final state,
    for stacked and bidirectional models in both layouts, and over padded batches against
    torch's PackedSequence."""
    torch = pytest.importorskip("torch")
    name, kw = spec[0], dict(spec[1])
    torch.manual_seed(0)
    mod = getattr(torch.nn, name)(N_X, N_A, num_layers=num_layers, bidirectional=bidirectional,
                                  batch_first=layout == "batch_first", **kw).double()
    model = _model(spec, xp=xp, device=device, config=(num_layers, bidirectional, padded),
                   layout=layout)
    model.params = type(model).from_torch(mod, xp=xp, device=device).params
    config = (num_layers, bidirectional, padded)
    case = _case(spec, seed=2, config=config)
    case["params"] = [{k: to_numpy(v) for k, v in layer.items()} for layer in model.params]
    # torch's layout: (T, m, n) or (m, T, n); ours: (n, m, T) or (m, T, n)
    ours = (1, 2, 0) if layout == "batch_first" else (0, 1, 2)
    theirs = (1, 2, 0) if layout == "batch_first" else (2, 1, 0)
    got = _run(model, {**case, "x": case["x"].transpose(ours), "dy": case["dy"].transpose(ours)},
               xp, device)

    tt = functools.partial(torch.tensor, dtype=torch.float64)
    x = tt(case["x"].transpose(theirs)).requires_grad_()
    st = [tt(s.transpose(0, 2, 1)).requires_grad_() for s in case["state"]]
    run = x
    if padded:
        pack = torch.nn.utils.rnn
        run = pack.pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False,
                                        batch_first=layout == "batch_first")
    y, final = mod(run, tuple(st) if len(st) > 1 else st[0])
    if padded:
        y, _ = pack.pad_packed_sequence(y, total_length=T, batch_first=layout == "batch_first")
    final = final if isinstance(final, tuple) else (final,)
    loss = (y * tt(case["dy"].transpose(theirs))).sum()
    for f, d in zip(final, case["dstate"]):
        loss = loss + (f * tt(d.transpose(0, 2, 1))).sum()
    loss.backward()

    def host(t, perm):
        return t.detach().numpy().transpose(perm)

    back = (2, 0, 1) if layout == "batch_first" else (2, 1, 0)  # torch's to ours
    want = {"y": host(y, back), "dx": host(x.grad, back)}
    want = {k: v.transpose(ours) for k, v in want.items()}
    for i, (f, s) in enumerate(zip(final, st)):
        want[f"state{i}"] = host(f, (0, 2, 1))
        want[f"dstate0_{i}"] = host(s.grad, (0, 2, 1))
    for k in want:
        assert_close(got[k], want[k], xp=xp, device=device, dtype=xp.float64, rtol=1e-10,
                     atol=1e-12, err=k)
    grads = {n: p.grad.numpy() for n, p in mod.named_parameters()}
    for i, layer in enumerate(case["params"]):
        mine = model.cell.to_torch_arrays({k: to_numpy(got[f"d{i}_{k}"]) for k in layer})
        sfx = f"_l{i // model.D}" + ("_reverse" if i % model.D else "")
        for key, arr in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), mine):
            assert_close(arr, grads[key + sfx], xp=NP, device=CPU, rtol=1e-10, atol=1e-12,
                         err=key + sfx)


@TORCH_SPEC
def test_torch_round_trip_and_torch_init(spec):
    """``to_torch(from_torch(m))`` gives back every weight exactly; a fresh model loads
    into torch and computes what it computes."""
    torch = pytest.importorskip("torch")
    name, kw = spec[0], dict(spec[1])
    mod = getattr(torch.nn, name)(N_X, N_A, **kw).double()
    back = CLASSES[name].from_torch(mod).to_torch()
    assert type(back) is type(mod)
    for (k, a), (k2, b) in zip(mod.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    model = _model(spec)
    x = np.random.default_rng(4).standard_normal((N_X, M, T))
    y, _, _ = model.forward(x, return_cache=False)
    ty, _ = model.to_torch()(torch.tensor(x.transpose(2, 1, 0)))
    assert_close(y, ty.detach().numpy().transpose(2, 1, 0), xp=NP, device=CPU, rtol=1e-12,
                 atol=1e-14)


# ------------------------------------------------------------------------------ padding
@EVERY_SPEC
@pytest.mark.parametrize("accel, layout", [(False, "notebook"), (False, "batch_first"),
                                           (True, "batch_first")],
                         ids=["array-path", "array-path-batch_first", "accelerated"])
def test_padding_is_never_read(spec, accel, layout, xp, device):
    """Whatever ``x`` and ``dy`` hold past each length (NaN, inf), the outputs, the final
    state, ``dx``, ``dstate0`` and every parameter gradient are exactly those of zero
    padding, for stacked bidirectional models, with and without a cache (torch's
    PackedSequence never reads the padding). The layouts meet the paths only at the
    model's edge: both on one path suffice."""
    if accel:
        _need_accelerated_path(spec)
    config = (2, True, True)
    model = _model(spec, xp=xp, device=device, config=config, layout=layout)
    case = _case(spec, seed=10, config=config)
    lengths = np.array([3, 1])
    pad = np.arange(T)[None, :] >= lengths[:, None]  # (m, T)
    junk = np.resize([np.nan, np.inf, -np.inf], (N_X + model.D * N_A) * M * T)
    junk = junk.reshape(N_X + model.D * N_A, M, T)
    zero = {**case, "lengths": lengths,
            "x": np.where(pad, 0.0, case["x"]), "dy": np.where(pad, 0.0, case["dy"])}
    dirty = {**zero, "x": np.where(pad, junk[:N_X], case["x"]),
             "dy": np.where(pad, junk[N_X:], case["dy"])}
    if layout == "batch_first":
        for c in (zero, dirty):
            c["x"], c["dy"] = c["x"].transpose(1, 2, 0), c["dy"].transpose(1, 2, 0)
    def lean(c):  # inference: no cache
        y, final, _ = model.forward(
            to_xp(c["x"], xp, device), tuple(to_xp(s, xp, device) for s in c["state"]),
            params=to_xp_params(c, xp, device), lengths=to_xp(lengths, xp, device, xp.int64),
            return_cache=False)
        return {"y (no cache)": y, **{f"state{i} (no cache)": s for i, s in enumerate(final)}}

    with xlstm.accelerators(accel):
        want = {**_run(model, zero, xp, device), **lean(zero)}
        got = {**_run(model, dirty, xp, device), **lean(dirty)}
    for k in want:
        assert_close(got[k], want[k], xp=xp, device=device, dtype=xp.float64, rtol=0, atol=0,
                     err=k)


#: The initial state of a case: the case's own, or the zero state (``state=None``).
START = pytest.mark.parametrize("start", ["given", "zero"])


def _on_engine(model):
    """Whether the model runs on the engine's step loops (the same steps in the same order,
    whatever the batch or the split of the sequence): then results that take the same steps
    are equal bit for bit; a model of its own forms (blocks of steps) agrees to rounding."""
    return isinstance(getattr(model.layer, "cell", None), Cell)


def _comparable_states(model, final):
    """The final states by name, as two runs of the same inputs must give them: all of them
    on the engine's steps; for a model of its own forms, the states kept in a stabiliser's
    scale times its ``exp`` (defined up to that scale: forms that take other blocks of steps
    keep other scales), without the stabiliser."""
    cell = model.layer
    named = dict(zip(cell.state_names, final))
    if _on_engine(model) or not cell.frozen:
        return named
    (stab,) = cell.frozen
    m = named.pop(stab)
    for k in cell.scaled:  # the stabiliser (L D, H, m) against (L D, H, ..., m)
        s = named[k]
        named[k] = s * np.exp(np.reshape(m, m.shape[:-1] + (1,) * (s.ndim - m.ndim)
                                         + m.shape[-1:]))
    return named


def _host(**kw):
    return {"xp": NP, "device": CPU, "dtype": NP.float64, **kw}


def _model_and_case(spec, accel, config, seed):
    """The model in ``config`` and a case of it (numpy, float64); skips the accelerated path
    of a model that has none."""
    if accel:
        _need_accelerated_path(spec)
    return _model(spec, config=config), _case(spec, seed=seed, config=config)


# ------------------------------------------------------------------ chunks, batches, stacks
@EVERY_SPEC
@PATH
@START
def test_chunks_with_the_state_carried_equal_one_call(spec, accel, start):
    """Two calls over the two parts of a sequence, the first's final state carried into the
    second and the second's ``dstate0`` carried back as the first's ``dstate`` (truncated
    backpropagation made exact), equal one call over the whole sequence: outputs, final
    state, ``dx``, ``dstate0`` and every parameter gradient (the two calls' summed), for a
    stack of two layers with a gradient on the final state. Outputs, final state and ``dx``
    bit for bit on the engine's steps."""
    model, case = _model_and_case(spec, accel, (2, False, False), seed=11)
    x, dy, dstate = case["x"], case["dy"], case["dstate"]
    state = case["state"] if start == "given" else None
    k = 2
    with xlstm.accelerators(accel):
        y, final, cache = model.forward(x, state)
        dx, d0, grads = model.backward(dy, cache, dstate)
        y1, mid, c1 = model.forward(x[..., :k], state)
        y2, final2, c2 = model.forward(x[..., k:], mid)
        dx2, dmid, g2 = model.backward(dy[..., k:], c2, dstate)
        dx1, d01, g1 = model.backward(dy[..., :k], c1, dmid)
    exact = _on_engine(model)
    same = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-12, "atol": 1e-13}
    grad = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-10, "atol": 1e-11}
    assert_close(np.concatenate([y1, y2], axis=-1), y, **_host(**same), err="y")
    want = _comparable_states(model, final)
    for key, got in _comparable_states(model, final2).items():
        assert_close(got, want[key], **_host(**same), err=f"final {key}")
    assert_close(np.concatenate([dx1, dx2], axis=-1), dx, **_host(**grad), err="dx")
    for i, (a, b) in enumerate(zip(d01, d0)):
        assert_close(a, b, **_host(**({"rtol": 1e-13, "atol": 1e-15} if exact else
                                      {"rtol": 1e-10, "atol": 1e-11})), err=f"dstate0 {i}")
    for i, (ga, gb, g) in enumerate(zip(g1, g2, grads)):
        for key in g:
            assert_close(ga[key] + gb[key], g[key], **_host(**({"rtol": 1e-12, "atol": 1e-14}
                         if exact else {"rtol": 1e-10, "atol": 1e-11})), err=f"{i} {key}")


@EVERY_SPEC
@PATH
@START
def test_a_padded_batch_equals_each_sequence_alone(spec, accel, start):
    """With ``lengths``, each sequence of the batch equals the same model run on it alone
    (its own steps, no ``lengths``), for stacked bidirectional models with a gradient on the
    final state: outputs (exactly zero past the length), final state, ``dx`` (exactly zero
    past the length), ``dstate0`` and every parameter gradient (the sequences' summed)."""
    model, case = _model_and_case(spec, accel, (2, True, True), seed=12)
    lengths = np.array([T, 3])
    case = {**case, "lengths": lengths, "state": case["state"] if start == "given" else None}
    with xlstm.accelerators(accel):
        got = _run(model, case, NP, CPU)
        alone = []
        for r, L in enumerate(lengths):
            row = slice(r, r + 1)
            alone.append(_run(model, {
                **case, "x": case["x"][:, row, :L], "dy": case["dy"][:, row, :L],
                "state": None if case["state"] is None else tuple(
                    s[..., row] for s in case["state"]),
                "dstate": tuple(d[..., row] for d in case["dstate"]), "lengths": None},
                NP, CPU))
    n_s = len(model.layer.state_names)
    for r, (L, one) in enumerate(zip(lengths, alone)):
        row = slice(r, r + 1)
        for key in ("y", "dx"):
            assert_close(got[key][:, row, L:], np.zeros_like(got[key][:, row, L:]),
                         **_host(rtol=0, atol=0), err=f"{key} past the length, row {r}")
        assert_close(got["y"][:, row, :L], one["y"], **_host(rtol=1e-12, atol=1e-13),
                     err=f"y, row {r}")
        assert_close(got["dx"][:, row, :L], one["dx"], **_host(rtol=1e-10, atol=1e-12),
                     err=f"dx, row {r}")
        mine = _comparable_states(model, [got[f"state{i}"][..., row] for i in range(n_s)])
        for key, want in _comparable_states(model, [one[f"state{i}"]
                                                    for i in range(n_s)]).items():
            assert_close(mine[key], want, **_host(rtol=1e-12, atol=1e-13),
                         err=f"final {key}, row {r}")
        for i in range(n_s):
            assert_close(got[f"dstate0_{i}"][..., row], one[f"dstate0_{i}"],
                         **_host(rtol=1e-10, atol=1e-12), err=f"dstate0 {i}, row {r}")
    for key in (k for k in got if k.startswith("d") and not k.startswith(("dx", "dstate0"))):
        assert_close(got[key], sum(one[key] for one in alone), **_host(rtol=1e-10, atol=1e-11),
                     err=key)


@EVERY_SPEC
@PATH
@START
def test_layers_and_directions_compose_one_layer_runs(spec, accel, start):
    """Two bidirectional layers over a padded batch equal one-layer models composed by hand
    on each sequence alone: layer 2 reads ``[forward; reverse]`` of layer 1, the reverse
    direction runs the sequence backwards from its own end, each layer and direction from
    its own part of the initial state; outputs (exactly zero past the length) and final
    states."""
    name, kw = spec[0], dict(spec[1])
    model, case = _model_and_case(spec, accel, (2, True, True), seed=13)
    x, lengths = case["x"], np.array([4, T])
    state = case["state"] if start == "given" else None
    with xlstm.accelerators(accel):
        y, final, _ = model.forward(x, state, lengths=lengths, return_cache=False)
        for r, L in enumerate(lengths):
            row = slice(r, r + 1)
            assert_close(y[:, row, L:], np.zeros_like(y[:, row, L:]), **_host(rtol=0, atol=0),
                         err=f"y past the length, row {r}")
            inp = x[:, row, :L]
            for layer in range(2):
                outs = []
                for d in range(2):
                    i = 2 * layer + d
                    one = CLASSES[name](inp.shape[0], N_A, xp=np, dtype="float64",
                                               seed=0, **kw)
                    one.params = [model.params[i]]
                    s0 = None if state is None else tuple(s[i : i + 1, ..., row] for s in state)
                    yd, fd, _ = one.forward(inp[..., ::-1] if d else inp, s0,
                                            return_cache=False)
                    outs.append(yd[..., ::-1] if d else yd)
                    want = _comparable_states(one, fd)
                    got = _comparable_states(model, [f[i : i + 1, ..., row] for f in final])
                    for key in want:
                        assert_close(got[key], want[key], **_host(rtol=1e-12, atol=1e-13),
                                     err=f"final {key}, layer {layer}, direction {d}, row {r}")
                inp = np.concatenate(outs, axis=0)
            assert_close(y[:, row, :L], inp, **_host(rtol=1e-12, atol=1e-13), err=f"y, row {r}")


# ---------------------------------------------------------------------------- large inputs
@EVERY_SPEC
@PATH
def test_inputs_of_1e4_give_finite_results_in_float32(spec, accel):
    """Inputs of +-1e4 in float32 (gate pre-activations in the thousands, far past where
    ``exp`` overflows float32): outputs, final state, ``dx``, ``dstate0`` and every
    parameter gradient are finite float32, and the outputs equal a float64 run of the same
    model to float32's rounding of such pre-activations (about ``N_X 1e4 eps``, turned by an
    exponential gate into a relative error of the output: the problem's own conditioning)."""
    if accel:
        _need_accelerated_path(spec)
    rng = np.random.default_rng(14)
    model = _model(spec, dtype="float32")
    wide = _model(spec)
    wide.params = [{k: v.astype(np.float64) for k, v in layer.items()} for layer in model.params]
    x = (1e4 * np.sign(rng.standard_normal((N_X, M, T)))).astype(np.float32)
    with xlstm.accelerators(accel):
        y, final, cache = model.forward(x)
        dx, d0, grads = model.backward(np.ones_like(y), cache)
        y64, _, _ = wide.forward(x.astype(np.float64), return_cache=False)
    results = {"y": y, "dx": dx, **{f"state{i}": s for i, s in enumerate(final)},
               **{f"dstate0_{i}": s for i, s in enumerate(d0)},
               **{f"d{i}_{k}": v for i, g in enumerate(grads) for k, v in g.items()}}
    for key, v in results.items():
        assert_array(v, xp=NP, device=CPU, dtype=NP.float32)
        assert np.all(np.isfinite(v)), key
    tol = N_X * 1e4 * float(np.finfo(np.float32).eps)
    assert_close(y, y64.astype(np.float32), xp=NP, device=CPU, dtype=NP.float32, rtol=tol,
                 atol=tol * max(1.0, float(np.max(np.abs(y64)))))


# ------------------------------------------------------------------------------- backends
@EVERY_SPEC
@START
def test_every_backend_equals_numpy(spec, start, xp, device):
    """The same case on the backend under test and on numpy, over two bidirectional layers
    and a padded batch: outputs, final state, ``dx``, ``dstate0`` and every parameter
    gradient keep the backend's namespace, dtype and device and equal numpy's to rounding."""
    config = (2, True, True)
    model = _model(spec, xp=xp, device=device, config=config)
    case = _case(spec, seed=15, config=config)
    if start == "zero":
        case["state"] = None
    want = _run(_model(spec, config=config), case, NP, CPU)
    got = _run(model, case, xp, device)
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], xp=xp, device=device, dtype=xp.float64, rtol=1e-12,
                     atol=1e-13, err=key)


# ------------------------------------------------------------------- references and memory
@SPEC
def test_no_mutation_and_outputs_independent_of_cache(spec, xp, device):
    """Inputs and parameters are unchanged; writing into the outputs, the parameters or the
    inputs after forward does not change what backward computes."""
    model = _model(spec, xp=xp, device=device)
    case = _case(spec, seed=5)
    cast = functools.partial(to_xp, xp=xp, device=device)
    x = cast(case["x"])
    state = tuple(cast(s) for s in case["state"])
    before = {"x": to_numpy(x), **{f"p{k}": to_numpy(v) for k, v in model.params[0].items()}}
    y, final, cache = model.forward(x, state)
    dy = cast(case["dy"])
    ref = model.backward(dy, cache)
    after = {"x": to_numpy(x), **{f"p{k}": to_numpy(v) for k, v in model.params[0].items()}}
    for k in before:
        assert_close(after[k], before[k], xp=NP, device=CPU, rtol=0, atol=0, err=k)
    if _compat.is_writeable(x):
        for arr in (y, x, *final, *model.params[0].values()):
            arr[...] = 7.0
        again = model.backward(dy, cache)
        for a, b in zip((ref[0], *ref[1], *ref[2][0].values()),
                        (again[0], *again[1], *again[2][0].values())):
            assert_close(to_numpy(b), to_numpy(a), xp=NP, device=CPU, rtol=0, atol=0)


@SPEC
def test_cache_survives_copy_and_pickle(spec):
    """A cache copied or pickled still belongs to its model: the same gradients."""
    import copy
    import pickle

    model = _model(spec)
    case = _case(spec, seed=7)
    _, _, cache = model.forward(case["x"], case["state"])
    want = model.backward(case["dy"], cache)
    for again in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        got = model.backward(case["dy"], again)
        assert_close(got[0], want[0], xp=NP, device=CPU, rtol=0, atol=0)
        for k in want[2][0]:
            assert_close(got[2][0][k], want[2][0][k], xp=NP, device=CPU, rtol=0, atol=0, err=k)


@SPEC
@PATH
def test_inference_memory_does_not_grow_with_T(spec, accel, monkeypatch):
    """``return_cache=False``: beyond the outputs, the memory is one block of steps (both
    lengths run in several blocks: one block is the output itself)."""
    import tracemalloc

    if accel:
        _need_accelerated_path(spec)

    monkeypatch.setattr(_engine, "CHUNK_ROWS", 64)  # blocks of 16 steps at m = 4
    name, kw = spec[0], dict(spec[1])
    model = CLASSES[name](8, 16, xp=np, dtype="float64", seed=0, **kw)
    rng = np.random.default_rng(6)
    extra = {}
    with xlstm.accelerators(accel):
        model.forward(rng.standard_normal((8, 4, 16)), return_cache=False)  # compile first
        for steps in (128, 512):
            x = rng.standard_normal((8, 4, steps))
            tracemalloc.start()
            y, final, cache = model.forward(x, return_cache=False)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert cache is None
            extra[steps] = peak - y.nbytes - sum(f.nbytes for f in final)
    assert extra[128] > 0
    assert extra[512] < 1.25 * extra[128], extra


# --------------------------------------------------------------------------- bad input
@SPEC
def test_bad_input_names_the_argument(spec):
    model = _model(spec)
    case = _case(spec)
    x = case["x"]
    y, final, cache = model.forward(x)
    with pytest.raises(ValueError, match=r"x must have shape \(n_x, m, T\)"):
        model.forward(x[:2])
    with pytest.raises(ValueError, match=r"state .* must have shape"):
        model.forward(x, tuple(s[..., :1] for s in final))
    with pytest.raises(TypeError, match="state must be the tuple"):
        model.forward(x, final + final)
    with pytest.raises(ValueError, match="dy must have the shape of y"):
        model.backward(y[:, :, :2], cache)
    with pytest.raises(ValueError, match=r"dstate .* must have shape \(num_layers \* D, "):
        model.backward(y, cache, tuple(s[..., :1] for s in final))
    with pytest.raises(TypeError, match="dstate must be the tuple"):
        model.backward(y, cache, final + final)
    with pytest.raises(TypeError, match="cache must be the ModelCache"):
        model.backward(y, (cache,))
    other = CLASSES[spec[0]](N_X, N_A + 2, seed=0, **dict(spec[1]))
    with pytest.raises(ValueError, match="cache comes from another model"):
        other.backward(np.zeros((N_A + 2, M, T)), cache)
    fields = {k: getattr(cache, k) for k in ModelCache.__slots__}
    for changed, match in [({"states": cache.states[:-1]}, "holds 0 saved states where"),
                           ({"states": (1,)}, "saved states are not all what forward keeps"),
                           ({"masks": (None,)}, "holds 1 dropout entries where"),
                           ({"pad": (None,)}, "padding record is not the"),
                           ({"m": M + 1}, f"batch size {M + 1} does not divide")]:
        with pytest.raises(ValueError, match=f"cache was changed after forward: .*{match}"):
            model.backward(y, ModelCache(**{**fields, **changed}))
    with pytest.raises(TypeError, match="mixed array namespaces|must be an array"):
        model.forward(x.tolist())
    with pytest.raises(TypeError, match="dtype mismatch"):
        model.forward(x.astype(np.float32))
    with pytest.raises(KeyError, match=r"params\[0\] is not a"):
        model.forward(x, params=[{**model.params[0], "extra": x}])
    bad = {k: v for k, v in model.params[0].items()}
    key = next(iter(bad))
    bad[key] = bad[key][:, :1]
    with pytest.raises(ValueError, match=rf"params\[0\]\['{key}'\] must have shape"):
        model.forward(x, params=[bad])
    with pytest.raises(ValueError, match="params has 2 entries"):
        model.forward(x, params=[model.params[0]] * 2)
    for lengths, err, match in [
        (np.array([1.0, 2.0]), TypeError, "lengths must have an integer dtype"),
        (np.array([True, True]), TypeError, "lengths must have a real floating or integral"),
        (np.array([0, T]), ValueError, r"lengths must be in \[1, T\]"),
        (np.array([1, T + 1]), ValueError, r"lengths must be in \[1, T\]"),
        (np.array([1, 2, 3]), ValueError, r"lengths must have shape \(m,\)"),
        ([1, 2], TypeError, "lengths must be an array"),
    ]:
        with pytest.raises(err, match=match):
            model.forward(x, lengths=lengths)
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="x is numpy but lengths is array_api_strict"):
        model.forward(x, lengths=strict.asarray([1, T]))
    on_cpu = _model(spec, xp=strict)
    with pytest.raises(ValueError, match="device mismatch: x is on .* but lengths is on"):
        on_cpu.forward(strict.asarray(x), lengths=strict.asarray(
            [1, T], device=strict.Device("device1")))
    with pytest.raises(ValueError, match="seed is required"):
        _model(spec, config=(2, False, False), dropout=0.5).forward(x, train=True)
    with pytest.raises(ValueError, match="layout must be one of"):
        _model(spec, layout="time_first")
    with pytest.raises(ValueError, match="dropout"):
        _model(spec, dropout=1.5)
    with pytest.raises(TypeError, match="n_[ah] must be a positive int"):
        CLASSES[spec[0]](N_X, 2.0, **dict(spec[1]))


def test_parameters_of_another_cell_are_refused():
    for a in SPECS:
        for b in SPECS:
            if a[0] != b[0]:
                with pytest.raises(KeyError, match=rf"is not a {a[0]} layer"):
                    _model(a).forward(np.zeros((N_X, M, T)), params=_model(b).params)


@SPEC
def test_torch_modules_of_another_kind_are_refused(spec):
    torch = pytest.importorskip("torch")
    cls = CLASSES[spec[0]]
    if cls.torch_name is None:
        with pytest.raises(TypeError, match=f"{spec[0]} has no torch.nn module"):
            cls.from_torch(torch.nn.LSTM(N_X, N_A))
        with pytest.raises(TypeError, match=f"{spec[0]} has no torch.nn module"):
            _model(spec).to_torch()
        return
    for other in ("LSTM", "GRU", "RNN"):
        if other != spec[0]:
            with pytest.raises(TypeError, match=f"module must be a torch.nn.{spec[0]}"):
                cls.from_torch(getattr(torch.nn, other)(N_X, N_A))


@SPEC
def test_jax_jit_of_the_pure_form(spec, backend_named):
    """``forward(x, params=...)`` and ``backward`` under ``jax.jit`` give the eager results:
    the pure form that optimizers and compiled training steps use."""
    xp, device = backend_named("jax")
    import jax

    config = (2, True, True)  # stacked, bidirectional, padded: lengths traced too
    model = _model(spec, xp=xp, device=device, config=config)
    case = _case(spec, seed=8, config=config)
    x = to_xp(case["x"], xp, device)
    state = tuple(to_xp(s, xp, device) for s in case["state"])
    dy = to_xp(case["dy"], xp, device)
    lengths = to_xp(case["lengths"], xp, device, xp.int32)

    def run(params, x, state, dy, lengths):
        y, final, cache = model.forward(x, state, params=params, lengths=lengths)
        dx, d0, grads = model.backward(dy, cache)
        return y, final, dx, d0, grads

    eager = run(model.params, x, state, dy, lengths)
    jitted = jax.jit(run)(model.params, x, state, dy, lengths)
    e_leaves, e_def = jax.tree.flatten(eager)
    j_leaves, j_def = jax.tree.flatten(jitted)
    assert e_def == j_def
    for a, b in zip(j_leaves, e_leaves):
        assert_close(a, b, xp=xp, device=device, rtol=1e-12, atol=1e-13)


@SPEC
@CONFIG
def test_compiled_loops_replay_every_step_after_the_first(spec, config):
    """The compiled loops record a cell's first step and replay it on the next steps' arrays
    (no Python of the cell per step); a cell that hands its ops an array of its own making
    would silently lose that, so every cell must be replayable, forward and backward, and
    every call of its steps must have a compiled twin, so that the whole loop runs as one
    compiled function (one kind per direction and layout of the weights: the layers'
    input widths differ)."""
    if _engine.accelerated_loops(NP, NP.float64) is None:
        pytest.skip("no compiled loops here (numba is not installed or does not load)")
    _need_accelerated_path(spec)
    model = _model(spec, config=config)
    case = _case(spec, seed=9, config=config)
    loops = _engine.accelerated_loops(NP, NP.float64, model.cell)
    loops._replays.clear()
    with xlstm.accelerators(True):  # padded batches run here too
        y, _, cache = model.forward(case["x"], case["state"], lengths=case["lengths"])
        model.backward(case["dy"], cache, case["dstate"])
    made = [r for (cell, *_), r in loops._replays.items() if cell is model.cell]
    assert len(made) >= 2 and all(r is not None for r in made), made
    assert all(r.whole is not None for r in made)
    for r in made:  # straight-line calls on the step's arrays, nothing else
        body = r.source.split("def replay(i):\n")[1].splitlines()
        assert all(re.fullmatch(r"    (s\d+ = .*|f\d+\(.*\))", line) for line in body), r.source


@SPEC
def test_config_builds_the_same_model(spec):
    """``config()`` is JSON-able and ``from_config`` builds the same model: the same class,
    configuration and (from the same seed) parameters."""
    model = _model(spec, config=(2, True, False), dropout=0.25, layout="batch_first")
    cfg = model.config()
    assert json.loads(json.dumps(cfg)) == cfg
    again = type(model).from_config(json.loads(json.dumps(cfg)), seed=3)
    assert type(again) is type(model) and again.config() == cfg
    assert again.layer.config() == model.layer.config()
    for mine, theirs in zip(model.params, again.params):
        assert list(mine) == list(theirs)
        for k in mine:
            assert_close(theirs[k], mine[k], xp=NP, device=CPU, rtol=0, atol=0)
    with pytest.raises(TypeError, match="config must be a dict"):
        type(model).from_config([cfg])
