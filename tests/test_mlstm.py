"""The mLSTM (``xlstm.MLSTM`` and the forms of :mod:`xlstm.mlstm`):

* the three forms against each other, forward and backward, to 1e-10 in float64;
* every gradient of every form against central differences (float64);
* a plain, unstabilised reference written here from the equations;
* chunked runs (state carried) against whole sequences; padded batches; stacked and
  bidirectional models against one-layer runs composed by hand; the zero state;
* padding never read in any form; a NaN or inf at one step reaches no earlier output (nor
  a NaN in ``dy`` any later gradient); inputs of 1e13 and 1e30 in float32;
* pre-activations of +-1e4 in float32; every backend against numpy; bad arguments.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import to_numpy, to_xp
from oracles import central_differences

import xlstm
from xlstm import mlstm

N_X, N_H, H, M, T = 3, 4, 2, 2, 7
FORMS = pytest.mark.parametrize("form", mlstm.FORMS)


def _model(**kw):
    kw = {"num_heads": H, "chunk": 3, "seed": 1, **kw}
    return xlstm.MLSTM(N_X, N_H, **kw)


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
        assert np.array_equal(d0[2], np.zeros_like(d0[2]))  # the stabiliser: no gradient
    for form in ("parallel", "chunkwise"):
        for key, want in out["recurrent"].items():
            np.testing.assert_allclose(out[form][key], want, rtol=1e-10, atol=1e-10,
                                       err_msg=f"{form} {key}")


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
        np.testing.assert_allclose(got[key], want, rtol=1e-6, atol=1e-8, err_msg=key)


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
    np.testing.assert_allclose(y, reference(model.params[0], x, model.d_qk), rtol=1e-12,
                               atol=1e-13)


@FORMS
def test_chunked_runs_equal_the_whole_sequence(form):
    """Two calls, the state carried, equal one call: outputs, final state and, through
    ``dstate``, every gradient."""
    rng = np.random.default_rng(3)
    model = _model()
    x, dy = rng.standard_normal((N_X, M, T)), rng.standard_normal((N_H, M, T))
    y, final, dx, d0, g = _run(model, x, None, dy, None, form)
    y1, mid, c1 = model.forward(x[:, :, :3], form=form)
    y2, final2, c2 = model.forward(x[:, :, 3:], mid, form=form)
    dx2, dmid, (g2,) = model.backward(dy[:, :, 3:], c2)
    dx1, d01, (g1,) = model.backward(dy[:, :, :3], c1, dmid)
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=-1), y, rtol=1e-12, atol=1e-13)
    for a, b in zip(_unstabilised(final2), _unstabilised(final)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(np.concatenate([dx1, dx2], axis=-1), dx, rtol=1e-10, atol=1e-11)
    for k in g:
        np.testing.assert_allclose(g1[k] + g2[k], g[k], rtol=1e-10, atol=1e-11, err_msg=k)


@FORMS
def test_padded_batch_equals_each_sequence_alone(form):
    """With ``lengths``, each row equals its own sequence run alone: outputs (zero past
    the length), final state and gradients."""
    rng = np.random.default_rng(4)
    model = _model()
    x, dy = rng.standard_normal((N_X, M, T)), rng.standard_normal((N_H, M, T))
    lengths = np.array([T, 3])
    y, final, dx, d0, g = _run(model, x, None, dy, None, form, lengths=lengths)
    assert np.array_equal(y[:, 1, 3:], np.zeros_like(y[:, 1, 3:]))
    assert np.array_equal(dx[:, 1, 3:], np.zeros_like(dx[:, 1, 3:]))
    total = {k: np.zeros_like(v) for k, v in g.items()}
    for r, L in enumerate(lengths):
        yr, fr, dxr, _, gr = _run(model, x[:, r : r + 1, :L], None, dy[:, r : r + 1, :L], None,
                                  form)
        np.testing.assert_allclose(y[:, r : r + 1, :L], yr, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(dx[:, r : r + 1, :L], dxr, rtol=1e-10, atol=1e-12)
        for a, b in zip(_unstabilised(final), _unstabilised(fr)):
            np.testing.assert_allclose(a[..., r : r + 1], b, rtol=1e-12, atol=1e-13)
        for k in g:
            total[k] += gr[k]
    for k in g:
        np.testing.assert_allclose(g[k], total[k], rtol=1e-10, atol=1e-11, err_msg=k)


@FORMS
def test_layers_and_directions_compose_one_layer_runs(form):
    """Two bidirectional layers over a padded batch equal one-layer models composed by hand
    on each sequence alone: layer 2 reads ``[forward; reverse]`` of layer 1, the reverse
    direction runs the sequence backwards from its own end; outputs and final states (the
    latter without the stabiliser's scale)."""
    rng = np.random.default_rng(11)
    model = _model(num_layers=2, bidirectional=True)
    x = rng.standard_normal((N_X, M, T))
    lengths = np.array([4, T])
    y, final, _ = model.forward(x, lengths=lengths, form=form)
    assert y.shape == (2 * N_H, M, T) and final[0].shape == (4, H, N_H // H, N_H // H, M)
    assert np.array_equal(y[:, 0, 4:], np.zeros_like(y[:, 0, 4:]))
    for r, L in enumerate(lengths):
        inp = x[:, r : r + 1, :L]
        for layer in range(2):
            outs = []
            for d in range(2):
                i = 2 * layer + d
                one = xlstm.MLSTM(inp.shape[0], N_H, num_heads=H, chunk=3)
                one.params = [model.params[i]]
                yd, fd, _ = one.forward(inp[..., ::-1] if d else inp, form=form)
                outs.append(yd[..., ::-1] if d else yd)
                for a, b in zip(_unstabilised(final), _unstabilised(fd)):
                    np.testing.assert_allclose(a[i : i + 1, ..., r : r + 1], b, rtol=1e-12,
                                               atol=1e-13)
            inp = np.concatenate(outs, axis=0)
        np.testing.assert_allclose(y[:, r : r + 1, :L], inp, rtol=1e-12, atol=1e-13)


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
    np.testing.assert_allclose(y[:d], y0[:d], rtol=1e-12, atol=1e-13)
    assert not np.allclose(y[d:], y0[d:])
    assert np.all(np.isfinite(y))


@FORMS
def test_extreme_pre_activations_in_float32(form):
    """Gate pre-activations of +-1e4 in float32: nothing overflows, forward or backward."""
    rng = np.random.default_rng(6)
    model = _model(dtype="float32")
    p = model.params[0]
    for key in ("wi", "wf"):
        p[key] = (1e4 * np.sign(rng.standard_normal(p[key].shape))).astype(np.float32)
    x = np.sign(rng.standard_normal((N_X, M, T))).astype(np.float32)
    y, final, dx, d0, g = _run(model, x, None, np.ones((N_H, M, T), np.float32), None, form)
    for v in (y, *final[:2], dx, *d0, *g.values()):
        assert v.dtype == np.float32 and np.all(np.isfinite(v))


@FORMS
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_padding_is_never_read(form, cache):
    """NaN and inf past each length, in ``x`` and in ``dy``, give exactly the results of
    zero padding in every form (the conformance suite covers the default forms on every
    backend), over two bidirectional layers, with and without a cache."""
    rng = np.random.default_rng(13)
    model = _model(num_layers=2, bidirectional=True)
    x, dy = rng.standard_normal((N_X, M, T)), rng.standard_normal((2 * N_H, M, T))
    lengths = np.array([2, 5])
    pad = np.arange(T)[None, :] >= lengths[:, None]
    zero = np.where(pad, 0.0, x), np.where(pad, 0.0, dy)
    dirty = np.where(pad, np.nan, x), np.where(pad, np.inf, dy)
    dirty[0][:, 1, -1] = -np.inf
    runs = []
    for xs, dys in (zero, dirty):
        if cache:
            runs.append(_run_all(model, xs, dys, form, lengths=lengths))
        else:
            y, final, _ = model.forward(xs, lengths=lengths, form=form, return_cache=False)
            runs.append((y, *final))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(b, a)


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
    np.testing.assert_array_equal(y[:, 0, :4], want[:, 0, :4])
    np.testing.assert_array_equal(y[:, 1], want[:, 1])
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
    np.testing.assert_array_equal(dx[:, 0, 4:], want[:, 0, 4:])
    np.testing.assert_array_equal(dx[:, 1], want[:, 1])
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
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))
    for f in final:  # in the stabilised scale (the true C e^m does not fit at all)
        assert f.dtype == np.float32 and np.all(np.isfinite(f))
    if scale == 1e13:
        dx, d0, grads = m32.backward(dy, cache)
        for v in (dx, *d0, *(a for g in grads for a in g.values())):
            assert v.dtype == np.float32 and np.all(np.isfinite(v))


@FORMS
def test_every_backend_equals_numpy(form, xp, device):
    """The same call on the backend under test: its namespace and device kept, numpy's
    numbers to rounding."""
    rng = np.random.default_rng(7)
    model = _model(xp=xp, device=device, dtype=xp.float64)
    host = _model()
    x, dy = rng.standard_normal((N_X, M, T)), rng.standard_normal((N_H, M, T))
    want = _run(host, x, None, dy, None, form)
    got = _run(model, to_xp(x, xp, device), None, to_xp(dy, xp, device), None, form)
    for a, b in zip((got[0], got[2], *got[4].values()), (want[0], want[2], *want[4].values())):
        np.testing.assert_allclose(to_numpy(a), b, rtol=1e-12, atol=1e-13)


@FORMS
def test_inference_in_blocks_equals_the_whole_sequence(form, xp, device, monkeypatch):
    """``return_cache=False`` runs the sequence in blocks of whole chunks (here 6 steps:
    ``CHUNK_ROWS = 12`` rows at m = 2, chunks of 3), carrying the state: the outputs and
    the final state equal the run that keeps a cache (one block), on every backend, over
    2 bidirectional layers and a padded batch."""
    from xlstm import _engine

    rng = np.random.default_rng(12)
    model = _model(num_layers=2, bidirectional=True, xp=xp, device=device, dtype=xp.float64)
    x = to_xp(rng.standard_normal((N_X, M, 17)), xp, device)
    lengths = to_xp(np.array([17, 9]), xp, device, xp.int64)
    y, final, _ = model.forward(x, lengths=lengths, form=form)
    monkeypatch.setattr(_engine, "CHUNK_ROWS", 12)
    yb, fb, cache = model.forward(x, lengths=lengths, form=form, return_cache=False)
    assert cache is None
    np.testing.assert_allclose(to_numpy(yb), to_numpy(y), rtol=1e-12, atol=1e-13)
    for a, b in zip(_unstabilised(tuple(to_numpy(f) for f in fb)),
                    _unstabilised(tuple(to_numpy(f) for f in final))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


@FORMS
def test_inference_holds_one_copy_of_the_output(form, monkeypatch):
    """``return_cache=False`` over many blocks: beyond the output and the final state, the
    memory is one block's (here under half the output), not a second output."""
    import tracemalloc

    from xlstm import _engine

    monkeypatch.setattr(_engine, "CHUNK_ROWS", 64)  # blocks of 16 steps at m = 4
    model = xlstm.MLSTM(8, 16, num_heads=2, chunk=16, seed=0)
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
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-13)
    for a, b in zip(_unstabilised(final), _unstabilised(want_final)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_h=5 is not divisible by num_heads=2"):
        xlstm.MLSTM(N_X, 5, num_heads=2)
    with pytest.raises(ValueError, match="d_qk must be"):
        xlstm.MLSTM(N_X, N_H, d_qk=0)
    with pytest.raises(TypeError, match="d_qk must be a positive int"):
        xlstm.MLSTM(N_X, N_H, d_qk=2.5)
    with pytest.raises(ValueError, match="form must be one of"):
        xlstm.MLSTM(N_X, N_H, form="fast")
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
