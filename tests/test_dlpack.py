"""The fused loops on another library's arrays through DLPack (:class:`xlstm.accel.registry.DLPackLoops`).

On a GPU, torch tensors on a CUDA device reach CuPy's fused kernels as views of their own
memory. Here the same route runs with a stand-in: torch CPU tensors handed to the CUDA loops'
host build (the real generated kernels behind the grid emulator, on numpy arrays) through
``numpy.from_dlpack``, and back through ``torch.from_dlpack``. The loops write the engine's
torch stacks in place, so the results can only equal the array path's if no copy was made.
"""

from __future__ import annotations

import array_api_compat
import cuda_emulator
import numpy as np
import pytest
from cuda_emulator import SEQ_TOL

import xlstm
from xlstm.accel import registry as _accel
from xlstm.cells import CELLS
from xlstm.engine import loop as _engine

torch = pytest.importorskip("torch", reason="torch is not installed")
TORCH = array_api_compat.array_namespace(torch.empty(0))
SIZES = (3, 5, 4, 6, 7)  # n_x, n_a, n_y, m, T
STAND_IN_CELLS = ("lstm", "gru", "slstm")


@pytest.fixture(scope="module")
def host_libs(cuda_host_builds):
    """The host builds of the cells that the stand-in runs: cell -> library path."""
    return {c: cuda_host_builds[c] for c in STAND_IN_CELLS}


def _stand_in(host_libs, dtype, shared):
    """DLPackLoops over the host build, recording every array handed over and whether it
    shares the torch tensor's memory."""
    inner = cuda_emulator.host_loops(host_libs, dtype, block=16)
    handed = []

    def to_inner(t):
        arr = np.from_dlpack(t)
        shared.append(arr.size == 0 or arr.__array_interface__["data"][0] == t.data_ptr())
        handed.append(t)
        return arr

    return _accel.DLPackLoops(inner, to_inner, torch.from_dlpack), handed


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", STAND_IN_CELLS)
def test_torch_tensors_run_the_fused_loops_in_place(host_libs, monkeypatch, name, dtype):
    """The public API on torch tensors (a model's forward with and without a cache,
    backward, a padded bidirectional batch; the notebook's functions for the LSTM) with the
    engine's loops swapped for the CUDA loops reached through DLPack: the array path's
    results, as torch tensors, with every buffer handed over without a copy."""
    with xlstm.accelerators(False):
        want = cuda_emulator.api_results(name, dtype, *SIZES, xp=TORCH, asarray=torch.asarray)
    shared = []
    loops, handed = _stand_in(host_libs, dtype, shared)
    seen = []

    def dispatch(xp, dt, cell=None, device=None):
        seen.append(device)
        return loops

    monkeypatch.setattr(_engine, "accelerated_loops", dispatch)
    got = cuda_emulator.api_results(name, dtype, *SIZES, xp=TORCH, asarray=torch.asarray)
    assert set(loops.inner.launch.calls) >= {"fwd", "bwd", "fwd_masked", "bwd_masked"}
    assert seen and all(d == torch.device("cpu") for d in seen)  # the engine names the device
    assert handed and all(shared), "an array went through DLPack as a copy"
    assert got.keys() == want.keys()
    rtol, atol = SEQ_TOL[dtype]
    for k in want:
        assert isinstance(got[k], torch.Tensor) and got[k].dtype == want[k].dtype, k
        w = want[k].numpy()
        np.testing.assert_allclose(got[k].numpy(), w, rtol=rtol,
                                   atol=atol * cuda_emulator.scale_of(w), err_msg=k)


def test_tensors_that_require_grad_are_handed_over_detached(host_libs):
    shared = []
    loops, handed = _stand_in(host_libs, "float64", shared)
    t = torch.ones(3, dtype=torch.float64, requires_grad=True)
    arr = loops.to_inner(t)
    assert isinstance(arr, np.ndarray) and all(shared) and not handed[-1].requires_grad
    assert loops.to_inner(None) is None


def test_dispatch_by_device(monkeypatch):
    """torch tensors reach the fused loops only on a CUDA device, and only where CuPy
    imports; CPU tensors stay on the array path."""
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    cell = CELLS["lstm"]
    assert _accel.accelerated_loops(TORCH, torch.float32, cell) is None
    assert _accel.accelerated_loops(TORCH, torch.float32, cell, device=torch.device("cpu")) is None
    cuda = torch.device("cuda", 0)  # a device object needs no GPU
    marker = object()
    monkeypatch.setattr(_accel, "_torch_cuda_loops", lambda name: (name, marker))
    assert _accel.accelerated_loops(TORCH, torch.float64, None, device=cuda) == ("float64",
                                                                                   marker)
    assert _accel.accelerated_loops(TORCH, torch.float16, None, device=cuda) is None
    with xlstm.accelerators(False):
        assert _accel.accelerated_loops(TORCH, torch.float32, None, device=cuda) is None


def test_without_cupy_torch_cuda_tensors_stay_on_the_array_path(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real(name, *args, **kwargs)

    _accel._torch_cuda_loops.cache_clear()
    monkeypatch.setattr(importlib, "import_module", no_cupy)
    try:
        assert _accel._torch_cuda_loops("float32") is None
        assert _accel.accelerated_loops(TORCH, torch.float32, CELLS["lstm"],
                                        device=torch.device("cuda", 0)) is None
    finally:
        _accel._torch_cuda_loops.cache_clear()
