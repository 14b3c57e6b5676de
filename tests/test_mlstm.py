"""The mLSTM (``xlstm.MLSTM`` and the forms of :mod:`xlstm.mlstm`):

* the three forms against each other, forward and backward, to 1e-10 in float64;
* every gradient of every form against central differences (float64);
* a plain, unstabilised reference written here from the equations;
* the zero state per head; a NaN or inf at one step reaches no earlier output (nor a NaN
  in ``dy`` any later gradient); inputs of 1e13 and 1e30 in float32;
* inference in blocks and its memory; the parallel form's memory bound; bad arguments.

The conformance suite runs each form (its ``SPECS`` hold one model of each) like every
model: gradcheck, chunks with the state carried, padded batches, padding never read, layers
and directions, inputs of +-1e4 in float32 and every backend against numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_array, assert_close, to_numpy, to_xp
from oracles import central_differences

import xlstm
from xlstm import mlstm
from xlstm._lib import compat as _compat

NP, CPU = _compat.load_backend("numpy")
HOST = {"xp": NP, "device": CPU}

N_X, N_H, H, M, T = 3, 4, 2, 2, 7
FORMS = pytest.mark.parametrize("form", mlstm.FORMS)


def _model(**kw):
    kw = {"num_heads": H, "chunk": 3, "seed": 1, **kw}
    return xlstm.MLSTM(N_X, N_H, **{"dtype": "float64", **kw})


def _state(model, rng, m=M):
    C, n, mm = (rng.standard_normal(s) for s in model._state_shapes(m))
    return C, n, mm


def _run(model, x, state, dy, dstate, form, **kw):
    y, final, cache = model.forward(x, state, form=form, **kw)
    dx, d0, (g,) = model.backward(dy, cache, dstate)
    return y, final, dx, d0, g


def _run_all(model, x, dy, form, **kw):
    """forward then backward of a model of any depth: every result in one flat tuple,
    ``y`` first, then the final state, ``dx``, ``dstate0`` and the parameters' gradients."""
    y, final, cache = model.forward(x, form=form, **kw)
    dx, d0, grads = model.backward(dy, cache)
    return (y, *final, dx, *d0, *(a for g in grads for a in g.values()))


def _unstabilised(final):
    """``(C e^m, n e^m)``: the state without its stabiliser, the same for every form."""
    C, n, m = final
    return C * np.exp(m)[:, :, None, None, :], n * np.exp(m)[:, :, None, :]


def test_forms_agree_forward_and_backward():
    """Recurrent, parallel and chunkwise (chunks of 3 over 7 steps): outputs, the final
    state without its stabiliser, and every gradient agree to 1e-10 (float64), from a
    given state with a gradient on the final one."""
    rng = np.random.default_rng(0)
    model = _model()
    x, dy = rng.standard_normal((N_X, M, T)), rng.standard_normal((N_H, M, T))
    state = _state(model, rng)
    dC, dn, _ = _state(model, rng)
    runs = {}
    for form in mlstm.FORMS:
        y, final, cache = model.forward(x, state, form=form)
        # the same loss for every form: the final state's gradient is on C e^(m - m_rec)
        runs[form] = (y, final, cache)
    m_rec = runs["recurrent"][1][2]
    out = {}
    for form, (y, final, cache) in runs.items():
        scale = np.exp(final[2] - m_rec)
        dstate = (dC * scale[:, :, None, None, :], dn * scale[:, :, None, :], None)
        dx, d0, (g,) = model.backward(dy, cache, dstate)
        out[form] = {"y": y, "C": _unstabilised(final)[0], "n": _unstabilised(final)[1],
                     "dx": dx, "dC0": d0[0], "dn0": d0[1], **g}
        # the stabiliser: no gradient
        assert_close(d0[2], NP.zeros_like(d0[2]), **HOST, rtol=0, atol=0)
    for form in ("parallel", "chunkwise"):
        for key, want in out["recurrent"].items():
            assert_close(out[form][key], want, **HOST, rtol=1e-10, atol=1e-10,
                         err=f"{form} {key}")


def _large_qk(model, factor=8.0):
    """``model`` with its query and key weights times ``factor``: ``q`` and ``k`` of a few
    units to tens, so that most steps are brought below 2 by a scale (:func:`_unit_scale`)."""
    model.params = [{k: v * factor if k in ("Wq", "Wk") else v for k, v in layer.items()}
                    for layer in model.params]
    return model


QK = pytest.mark.parametrize("qk", ["small", "large"])


@FORMS
@QK
def test_gradients_equal_central_differences(form, qk):
    """Every gradient (x, the initial C and n, every parameter) of every form against
    float64 central differences of ``sum(y dy) + sum(C_T e^(m_T - m*) dC) + sum(n_T ...)``
    (``m*`` the unperturbed final stabiliser: the final state's gradient is the one on the
    stabilised state with the stabiliser held), with ``q`` and ``k`` small and large
    (scaled per step)."""
    rng = np.random.default_rng(1)
    model = _model() if qk == "small" else _large_qk(_model())
    x, dy = rng.standard_normal((N_X, M, T)), rng.standard_normal((N_H, M, T))
    C0, n0, m0 = _state(model, rng)
    dC, dn, _ = _state(model, rng)
    y, final, dx, d0, g = _run(model, x, (C0, n0, m0), dy, (dC, dn, None), form)
    m_ref = final[2]

    def loss(arrs):
        params = [{k: arrs[k] for k in model.params[0]}]
        y, (C, n, m), _ = model.forward(arrs["x"], (arrs["C0"], arrs["n0"], m0), params=params,
                                        form=form, return_cache=False)
        s = np.exp(m - m_ref)
        return float(np.sum(y * dy) + np.sum(C * s[:, :, None, None, :] * dC)
                     + np.sum(n * s[:, :, None, :] * dn))

    num = central_differences(loss, {"x": x, "C0": C0, "n0": n0, **model.params[0]})
    got = {"x": dx, "C0": d0[0], "n0": d0[1], **g}
    for key, want in num.items():
        assert_close(got[key], want, **HOST, dtype=NP.float64, rtol=1e-6, atol=1e-8, err=key)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def reference(params, x, d_qk):
    """The unstabilised mLSTM from the equations, float64, from the zero state."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    Hh, dv = p["Wv"].shape[:2]
    C = np.zeros((x.shape[1], Hh, dv, d_qk))
    n = np.zeros((x.shape[1], Hh, d_qk))
    ys = []
    for t in range(x.shape[2]):
        xt = x[:, :, t]  # (n_x, m)
        q = np.einsum("hdx,xm->mhd", p["Wq"], xt) + p["bq"][..., 0]
        k = (np.einsum("hdx,xm->mhd", p["Wk"], xt) + p["bk"][..., 0]) / np.sqrt(d_qk)
        v = np.einsum("hdx,xm->mhd", p["Wv"], xt) + p["bv"][..., 0]
        i = np.exp(np.einsum("hx,xm->mh", p["wi"], xt) + p["bi"][:, 0])
        f = _sigmoid(np.einsum("hx,xm->mh", p["wf"], xt) + p["bf"][:, 0])
        o = _sigmoid(p["Wo"] @ xt + p["bo"])  # (n_h, m)
        C = f[..., None, None] * C + i[..., None, None] * v[..., :, None] * k[..., None, :]
        n = f[..., None] * n + i[..., None] * k
        num = np.einsum("mhvk,mhk->mhv", C, q)
        den = np.maximum(np.abs(np.einsum("mhk,mhk->mh", n, q)), 1.0)
        ht = (num / den[..., None]).reshape(x.shape[1], -1).T  # (n_h, m)
        ys.append(o * ht)
    return np.stack(ys, axis=-1)


@FORMS
@QK
@pytest.mark.parametrize("d_qk", [None, 3])
def test_equals_the_plain_equations(form, d_qk, qk):
    """From the zero state, at small inputs, every form equals the unstabilised equations
    to rounding (with ``d_qk`` equal to ``d_v`` and not; with ``q`` and ``k`` small and
    large, scaled per step)."""
    rng = np.random.default_rng(2)
    model = _model(d_qk=d_qk) if qk == "small" else _large_qk(_model(d_qk=d_qk))
    x = rng.standard_normal((N_X, M, T))
    y, _, _ = model.forward(x, form=form, return_cache=False)
    assert_close(y, reference(model.params[0], x, model.d_qk), **HOST, dtype=NP.float64,
                 rtol=1e-12, atol=1e-13)


@FORMS
def test_zero_state_per_head(form):
    """A head whose given ``n`` is zero starts afresh, whatever its ``m``; the others carry
    on from the given state."""
    rng = np.random.default_rng(5)
    model = _model()
    x = rng.standard_normal((N_X, M, T))
    C, n, m = _state(model, rng)
    C[:, 0], n[:, 0] = 0.0, 0.0  # head 0 empty in every row
    y, _, _ = model.forward(x, (C, n, m), form=form, return_cache=False)
    y0, _, _ = model.forward(x, form=form, return_cache=False)  # every head empty
    d = N_H // H
    assert_close(y[:d], y0[:d], **HOST, rtol=1e-12, atol=1e-13)
    assert not np.allclose(y[d:], y0[d:])
    assert np.all(np.isfinite(y))


@FORMS
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_input_leaves_the_earlier_outputs_alone(form, bad):
    """A NaN or inf in ``x`` at step ``t`` of one sequence: the outputs before ``t`` are
    those of the clean run (the parallel form multiplies no later step into them), the
    other sequence's are untouched, and from ``t`` on they are NaN, not a finite guess."""
    rng = np.random.default_rng(14)
    model = _model(num_layers=2)
    x = rng.standard_normal((N_X, M, T))
    dirty = x.copy()
    dirty[1, 0, 4] = bad
    want, _, _ = model.forward(x, form=form)
    with np.errstate(invalid="ignore", over="ignore"):
        y, final, _ = model.forward(dirty, form=form)
    assert_close(y[:, 0, :4], want[:, 0, :4], **HOST, rtol=0, atol=0)
    assert_close(y[:, 1], want[:, 1], **HOST, rtol=0, atol=0)
    assert np.all(np.isnan(y[:, 0, 4:]))
    for f in final:  # the state has seen the step: not a finite guess either
        assert not np.any(np.isfinite(f[..., 0])) and np.all(np.isfinite(f[..., 1]))


@FORMS
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_output_gradient_leaves_the_later_gradients_alone(form, bad):
    """A NaN or inf in ``dy`` at step ``t``: ``dx`` of the later steps is that of the clean
    run (no step after ``t`` feeds the output at ``t``); the earlier steps' is NaN."""
    rng = np.random.default_rng(15)
    model = _model(num_layers=2)
    x, dy = rng.standard_normal((N_X, M, T)), rng.standard_normal((N_H, M, T))
    dirty = dy.copy()
    dirty[2, 0, 3] = bad
    want = _run_all(model, x, dy, form)[4]
    with np.errstate(invalid="ignore"):
        dx = _run_all(model, x, dirty, form)[4]
    assert_close(dx[:, 0, 4:], want[:, 0, 4:], **HOST, rtol=0, atol=0)
    assert_close(dx[:, 1], want[:, 1], **HOST, rtol=0, atol=0)
    assert np.all(np.isnan(dx[:, 0, :4]))


@FORMS
@pytest.mark.parametrize("scale", [1e13, 1e30])
def test_large_inputs_in_float32_equal_float64(form, scale):
    """Inputs of 1e13 and 1e30 in float32 (``v k^T q`` of 1e39 and 1e90): the outputs and
    finite and equal float64's to float32 rounding, and so is the final state, in every
    form.
    At 1e13 every gradient is finite too; at 1e30 the gates' weight gradients are not:
    their rounding noise alone (float64 gives about 1e44) does not fit in float32."""
    rng = np.random.default_rng(16)
    m32 = _model(dtype="float32", num_layers=2)
    m64 = _model(num_layers=2)
    m64.params = [{k: v.astype(np.float64) for k, v in layer.items()} for layer in m32.params]
    x = (scale * rng.standard_normal((N_X, M, T))).astype(np.float32)
    dy = rng.standard_normal((N_H, M, T)).astype(np.float32)
    y, final, cache = m32.forward(x, form=form)
    want, _, _ = m64.forward(x.astype(np.float64), form=form)
    assert_close(y, want, **HOST, dtype=NP.float32, rtol=1e-5,
                 atol=1e-5 * np.max(np.abs(want)))
    for f in final:  # in the stabilised scale (the true C e^m does not fit at all)
        assert f.dtype == np.float32 and np.all(np.isfinite(f))
    if scale == 1e13:
        dx, d0, grads = m32.backward(dy, cache)
        for v in (dx, *d0, *(a for g in grads for a in g.values())):
            assert v.dtype == np.float32 and np.all(np.isfinite(v))


@FORMS
def test_inference_in_blocks_equals_the_whole_sequence(form, xp, device, monkeypatch):
    """``return_cache=False`` runs the sequence in blocks of whole chunks (here 6 steps:
    ``CHUNK_ROWS = 12`` rows at m = 2, chunks of 3), carrying the state: the outputs and
    the final state equal the run that keeps a cache (one block), on every backend, over
    2 bidirectional layers and a padded batch."""
    from xlstm.engine import loop as _engine

    rng = np.random.default_rng(12)
    model = _model(num_layers=2, bidirectional=True, xp=xp, device=device, dtype=xp.float64)
    x = to_xp(rng.standard_normal((N_X, M, 17)), xp, device)
    lengths = to_xp(np.array([17, 9]), xp, device, xp.int64)
    y, final, _ = model.forward(x, lengths=lengths, form=form)
    monkeypatch.setattr(_engine, "CHUNK_ROWS", 12)
    yb, fb, cache = model.forward(x, lengths=lengths, form=form, return_cache=False)
    assert cache is None
    assert_close(yb, y, xp=xp, device=device, rtol=1e-12, atol=1e-13)
    for f, g in zip(fb, final):
        assert_array(f, xp=xp, device=device, shape=g.shape, dtype=xp.float64)
    for a, b in zip(_unstabilised(tuple(to_numpy(f) for f in fb)),
                    _unstabilised(tuple(to_numpy(f) for f in final))):
        assert_close(a, b, **HOST, rtol=1e-12, atol=1e-13)


@FORMS
def test_inference_holds_one_copy_of_the_output(form, monkeypatch):
    """``return_cache=False`` over many blocks: beyond the output and the final state, the
    memory is one block's (here under half the output), not a second output."""
    import tracemalloc

    from xlstm.engine import loop as _engine

    monkeypatch.setattr(_engine, "CHUNK_ROWS", 64)  # blocks of 16 steps at m = 4
    model = xlstm.MLSTM(8, 16, num_heads=2, chunk=16, seed=0, dtype="float64")
    x = np.random.default_rng(17).standard_normal((8, 4, 1024))
    model.forward(x[..., :64], form=form, return_cache=False)
    tracemalloc.start()
    y, final, _ = model.forward(x, form=form, return_cache=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    extra = peak - y.nbytes - sum(f.nbytes for f in final)
    assert extra < 0.5 * y.nbytes, (extra, y.nbytes)


def test_the_parallel_form_memory_is_bounded(monkeypatch):
    """A parallel form whose ``(m, H, L, L)`` arrays exceed ``MAX_PARALLEL_BYTES`` is refused
    before anything is computed, naming ``form`` or ``chunk`` and what fits (the default
    bound refuses T = 30000: 13.4 GiB with two heads); without a cache it runs in blocks
    that fit, with the numbers of the run that keeps one."""
    x = np.zeros((N_X, 1, 30000))
    with pytest.raises(ValueError, match=r"form='parallel' over T=30000 steps needs arrays "
                                         r"\(m, H, L, L\) = \(1, 2, 30000, 30000\) of 13.4 GiB "
                                         r"each.*form='chunkwise' with chunk <= 8192"):
        _model().forward(x, form="parallel")
    with pytest.raises(ValueError, match=r"chunk=100000 with form='auto' .*chunk <= 8192"):
        _model(chunk=100000).forward(x)
    with pytest.raises(ValueError, match=r"chunk=100000 with form='chunkwise'"):
        _model(chunk=100000).forward(x, form="chunkwise", return_cache=False)
    rng = np.random.default_rng(18)
    x = rng.standard_normal((N_X, M, 60))
    want, want_final, _ = _model().forward(x, form="parallel")
    monkeypatch.setattr(mlstm, "MAX_PARALLEL_BYTES", 2 * H * 20 * 20 * 8)  # 20 steps fit
    with pytest.raises(ValueError, match=r"form='parallel' over T=60 .*chunk <= 20"):
        _model().forward(x, form="parallel")
    y, final, _ = _model().forward(x, form="parallel", return_cache=False)
    assert_close(y, want, **HOST, rtol=1e-12, atol=1e-13)
    for a, b in zip(_unstabilised(final), _unstabilised(want_final)):
        assert_close(a, b, **HOST, rtol=1e-12, atol=1e-13)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_h=5 is not divisible by num_heads=2"):
        xlstm.MLSTM(N_X, 5, num_heads=2, dtype="float64")
    with pytest.raises(ValueError, match="d_qk must be"):
        xlstm.MLSTM(N_X, N_H, d_qk=0, dtype="float64")
    with pytest.raises(TypeError, match="d_qk must be a positive int"):
        xlstm.MLSTM(N_X, N_H, d_qk=2.5, dtype="float64")
    with pytest.raises(ValueError, match="form must be one of"):
        xlstm.MLSTM(N_X, N_H, form="fast", dtype="float64")
    model = _model()
    x = np.zeros((N_X, M, T))
    with pytest.raises(TypeError, match=r"state must be the tuple \(c, n, m\) of MLSTM"):
        model.forward(x, (np.zeros((1, H, 2, 2, M)),) * 2)
    with pytest.raises(ValueError, match=r"state n must have shape \(num_layers \* D, H, d_qk, "
                                         r"m\) = \(1, 2, 2, 2\)"):
        C, n, m = _state(model, np.random.default_rng(0))
        model.forward(x, (C, n[..., :1, :], m))
    with pytest.raises(ValueError, match=r"x must have shape \(n_x, m, T\)"):
        model.forward(x[:2])
    with pytest.raises(KeyError, match="params\\[0\\] is not a MLSTM layer"):
        model.forward(x, params=[{"W": x}])
    y, _, cache = model.forward(x)
    with pytest.raises(ValueError, match="dy must have the shape of y"):
        model.backward(y[:, :, :2], cache)
    with pytest.raises(ValueError, match="cache comes from another model"):
        _model(d_qk=3).backward(y, cache)
