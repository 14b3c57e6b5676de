"""The LSTM with a projection (``proj_size``, torch's LSTMP): torch's numbers and
gradients, every backend, both paths, step by step, conversions, files and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_array, to_numpy

import xlstm
from xlstm._lib import compat as _compat

NP, CPU = _compat.load_backend("numpy")
N_X, N_A, P, M, T = 3, 6, 2, 4, 5


def _nb(a):
    """torch's (T, m, n) or (L D, m, n) as xlstm's notebook layout (n, m, T) or (L D, n,
    m)."""
    return a.transpose(2, 1, 0) if a.shape[0] == T else a.transpose(0, 2, 1)


@pytest.mark.parametrize("layers, bi, batch_first, packed", [
    (1, False, False, False), (2, True, True, False), (2, True, False, True),
    (1, False, True, True)])
def test_equals_torch_autograd(layers, bi, batch_first, packed):
    """Outputs, final state, and the gradients on the input, the initial state and every
    weight equal torch's in float64, a padded batch (PackedSequence) included."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    mod = torch.nn.LSTM(N_X, N_A, num_layers=layers, bidirectional=bi, proj_size=P,
                        batch_first=batch_first).double()
    model = xlstm.LSTM.from_torch(mod)
    assert model.proj_size == P and model.layout == ("batch_first" if batch_first else
                                                     "notebook")
    D = 2 if bi else 1
    x = torch.randn((M, T, N_X) if batch_first else (T, M, N_X), dtype=torch.float64,
                    requires_grad=True)
    h0 = torch.randn(layers * D, M, P, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(layers * D, M, N_A, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([T, 2, 4, 1])
    if packed:
        packed_x = pack_padded_sequence(x, lengths, batch_first=batch_first,
                                        enforce_sorted=False)
        out, (hn, cn) = mod(packed_x, (h0, c0))
        y, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
    else:
        y, (hn, cn) = mod(x, (h0, c0))
    ((y ** 2).sum() + (hn ** 3).sum() + (cn ** 2).sum()).backward()

    def mine(a):  # torch's layout as the model's
        a = a.detach().numpy()
        return a if batch_first and a.ndim == 3 and a.shape[1] == T else _nb(a)

    xm = x.detach().numpy() if batch_first else _nb(x.detach().numpy())
    state = (_nb(h0.detach().numpy()), _nb(c0.detach().numpy()))
    kw = {"lengths": lengths.numpy()} if packed else {}
    yy, (h, c), cache = model.forward(xm, state, **kw)
    np.testing.assert_allclose(yy, mine(y), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h, _nb(hn.detach().numpy()), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(c, _nb(cn.detach().numpy()), rtol=1e-12, atol=1e-14)
    dx, (dh0, dc0), grads = model.backward(2 * yy, cache, dstate=(3 * h ** 2, 2 * c))
    want_dx = x.grad.numpy() if batch_first else _nb(x.grad.numpy())
    np.testing.assert_allclose(dx, want_dx, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(dh0, _nb(h0.grad.numpy()), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(dc0, _nb(c0.grad.numpy()), rtol=1e-11, atol=1e-13)
    as_torch = model.to()  # the gradients laid out as torch's weights
    as_torch.params = grads
    sd = as_torch.to_torch().state_dict()
    for name, p in mod.named_parameters():
        np.testing.assert_allclose(sd[name].numpy(), p.grad.numpy(), rtol=1e-11,
                                   atol=1e-13, err_msg=name)


def test_torch_round_trip_is_exact_and_carries_the_configuration():
    torch = pytest.importorskip("torch")
    for bias in (True, False):
        mod = torch.nn.LSTM(N_X, N_A, num_layers=2, bidirectional=True, proj_size=P,
                            batch_first=True, dropout=0.25, bias=bias)
        model = xlstm.LSTM.from_torch(mod)
        back = model.to_torch()
        assert back.proj_size == P and back.batch_first and back.dropout == 0.25
        for k, v in back.state_dict().items():
            want = mod.state_dict().get(k, torch.zeros_like(v))  # bias=False: zero biases
            assert torch.equal(v, want), k


def _backend_model(xp, device, **kw):
    return xlstm.LSTM(N_X, N_A, proj_size=P, num_layers=2, xp=xp, device=device,
                      dtype="float64", seed=3, **kw)


def test_every_backend_and_path_agree(backend):
    """The same numbers on every backend, with the accelerated loops and without; the
    step equals the call."""
    _, xp, device = backend
    ref = _backend_model(NP, CPU, bidirectional=True)
    model = _backend_model(xp, device, bidirectional=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N_X, M, T))
    lengths = np.array([T, 3, 1, 4])
    y_ref, st_ref, cache = ref.forward(x, lengths=lengths)
    dy = rng.standard_normal(y_ref.shape)
    g_ref = ref.backward(dy, cache)
    X = xp.asarray(x, device=device)
    L = xp.asarray(lengths, device=device)
    for accel in (True, False):
        with xlstm.accelerators(accel):
            y, st, cache = model.forward(X, lengths=L)
            dx, d0, grads = model.backward(xp.asarray(dy, device=device), cache)
        assert_array(y, xp=xp, device=device, dtype=xp.float64, shape=(2 * P, M, T))
        np.testing.assert_allclose(to_numpy(y), y_ref, rtol=1e-12, atol=1e-13)
        for a, b in zip(st, st_ref):
            np.testing.assert_allclose(to_numpy(a), b, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(to_numpy(dx), g_ref[0], rtol=1e-11, atol=1e-12)
        for a, b in zip(d0, g_ref[1]):
            np.testing.assert_allclose(to_numpy(a), b, rtol=1e-11, atol=1e-12)
        for ga, gb in zip(grads, g_ref[2]):
            assert ga.keys() == gb.keys()
            for k in ga:
                np.testing.assert_allclose(to_numpy(ga[k]), gb[k], rtol=1e-11, atol=1e-12,
                                           err_msg=k)
    one = _backend_model(xp, device, layout="batch_first")
    xb = xp.asarray(rng.standard_normal((M, T, N_X)), device=device)
    y, final = one(xb)
    state = one.initial_state(M)
    assert tuple(state[0].shape) == (2, P, M) and tuple(state[1].shape) == (2, N_A, M)
    ys = []
    for t in range(T):
        y_t, state = one.step(xb[:, t, :], state)
        ys.append(to_numpy(y_t))
    np.testing.assert_allclose(np.stack(ys, axis=1), to_numpy(y), rtol=1e-12, atol=1e-13)
    for a, b in zip(state, final):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-12, atol=1e-13)


def test_parameters_files_and_configuration(tmp_path):
    model = xlstm.LSTM(N_X, N_A, proj_size=P, num_layers=2, bidirectional=True)
    assert model.param_shapes(0)["Wf"] == (N_A, P + N_X)
    assert model.param_shapes(2)["Wf"] == (N_A, P + 2 * P)  # layer 1 reads [h_fwd; h_rev]
    assert model.params[0]["Whr"].shape == (P, N_A)
    assert "proj_size=2" in repr(model) and model.config()["proj_size"] == P
    assert xlstm.LSTM.from_config(model.config()).proj_size == P
    assert "proj_size" not in repr(xlstm.LSTM(N_X, N_A))
    xlstm.save(tmp_path / "proj.safetensors", model)
    back = xlstm.load(tmp_path / "proj.safetensors")
    assert back.proj_size == P
    x = np.ones((N_X, M, T), np.float32)
    np.testing.assert_array_equal(back(x)[0], model(x)[0])
    pytest.importorskip("torch")
    assert model.num_parameters() == sum(p.numel() for p in model.to_torch().parameters())


def test_refusals():
    with pytest.raises(ValueError, match=r"proj_size must be smaller than n_a=6 \(torch's rule\)"):
        xlstm.LSTM(N_X, N_A, proj_size=N_A)
    with pytest.raises(ValueError, match="proj_size must be an int >= 0"):
        xlstm.LSTM(N_X, N_A, proj_size=-1)
    model = xlstm.LSTM(N_X, N_A, proj_size=P)
    with pytest.raises(ValueError, match=r"state a must have shape \(num_layers \* D, "
                                         r"proj_size, m\)"):
        model(np.zeros((N_X, M, T), np.float32),
              (np.zeros((1, N_A, M), np.float32), np.zeros((1, N_A, M), np.float32)))
