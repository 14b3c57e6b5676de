"""CuPy work runs on the inputs' GPU, checked without a GPU through a stand-in for CuPy.

array-api-compat does not pass ``device=`` on to CuPy's creation functions, and CuPy
allocates and launches on its *current* device, so the public functions make the inputs'
device current around their work (:func:`xlstm._lib.compat.on_input_device`) and the
constructors that take ``device=`` do the same (:func:`xlstm._lib.compat.device_scope`). A fake
``cupy`` module with two fake devices records which device is current when the work runs,
as array-api-strict's ``device1`` exposes allocations that forget ``device=``.
"""

from __future__ import annotations

import inspect
import sys
import types

import numpy as np
import pytest

import xlstm
from xlstm._lib import compat as _compat

CURRENT = ["gpu0"]  # the fake CuPy's current device


class FakeDevice:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        CURRENT.append(self.name)
        return self

    def __exit__(self, *exc):
        CURRENT.pop()


@pytest.fixture
def fake_cupy(monkeypatch):
    """A module named ``cupy`` whose ``ndarray`` array-api-compat takes for CuPy's."""
    mod = types.ModuleType("cupy")

    class ndarray:  # noqa: N801 - the name array-api-compat looks for
        def __init__(self, device):
            self.device = FakeDevice(device)

    ndarray.__module__ = "cupy"
    mod.ndarray = ndarray
    mod.__name__ = "cupy"
    monkeypatch.setitem(sys.modules, "cupy", mod)
    return mod


def test_work_runs_under_the_first_array_device(fake_cupy):
    seen = []

    @_compat.on_input_device
    def work(x, params, *, extra=None):
        seen.append(CURRENT[-1])
        return "done"

    arr1 = fake_cupy.ndarray("gpu1")
    assert work(arr1, {}) == "done" and seen[-1] == "gpu1"
    assert work(None, {"Wf": fake_cupy.ndarray("gpu1")}) == "done" and seen[-1] == "gpu1"
    cache = types.SimpleNamespace(state=(fake_cupy.ndarray("gpu1"),))
    work(np.ones(2), (cache,))  # numpy first: nothing changes
    assert seen[-1] == "gpu0"
    work(None, [(cache, None)])
    assert seen[-1] == "gpu1"
    assert CURRENT == ["gpu0"]  # restored afterwards


def test_device_scope_for_constructors(fake_cupy):
    ns = types.ModuleType("cupy")
    with _compat.device_scope(xp=ns, device=FakeDevice("gpu1")):
        assert CURRENT[-1] == "gpu1"
    with _compat.device_scope(xp=np, device="cpu"):
        assert CURRENT[-1] == "gpu0"
    assert CURRENT == ["gpu0"]


def _public_array_functions():
    """Every public function and optimizer method that takes arrays."""
    takes_no_arrays = {"init_params", "load_params", "save", "load", "from_torch_lstm_weights",
                       "to_torch_lstm_weights", "save_params", "fit", "accelerators"}
    for name in xlstm.__all__:
        obj = getattr(xlstm, name)
        if inspect.isclass(obj):
            for meth in ("init", "step"):
                if inspect.isfunction(getattr(obj, meth, None)):
                    yield f"{name}.{meth}", getattr(obj, meth)
        elif inspect.isfunction(obj) and name not in takes_no_arrays:
            yield name, obj


@pytest.mark.parametrize("name, fn", list(_public_array_functions()))
def test_every_public_array_function_runs_on_the_input_device(name, fn):
    assert getattr(fn, "__xlstm_on_input_device__", False), f"{name} is not wrapped"


def test_two_gpus():
    """On a machine with two GPUs, a whole forward and backward pass on the second one
    leaves every result there and matches the first GPU's results."""
    cp = pytest.importorskip("cupy")
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no CUDA at all
        pytest.skip(f"no CUDA device: {exc}")
    if n < 2:
        pytest.skip(f"needs two GPUs, found {n}")
    host = xlstm.init_params(3, 4, 2, seed=0)
    x = np.random.default_rng(0).standard_normal((3, 5, 6))
    results = []
    for dev in (0, 1):
        with cp.cuda.Device(dev):
            P = {k: cp.asarray(v) for k, v in host.items()}
            X, a0 = cp.asarray(x), cp.zeros((4, 5))
        a, y, c, caches = xlstm.lstm_forward(X, a0, P)  # current device is 0 here
        g = xlstm.lstm_backward(cp.ones_like(a), caches)
        for v in (a, y, c, *g.values()):
            assert v.device.id == dev
        results.append({k: cp.asnumpy(v) for k, v in g.items()})
    for k in results[0]:
        np.testing.assert_allclose(results[1][k], results[0][k], rtol=1e-12, err_msg=k)


# ------------------------------------------------ torch and JAX on a GPU: the test backends
@pytest.mark.parametrize("name", ["torch-cuda", "jax-gpu"])
def test_gpu_backends_load_only_where_a_gpu_answers(name):
    """``torch-cuda`` and ``jax-gpu`` load with their first GPU, or say why they cannot."""
    module = _compat.BACKEND_MODULES[name]
    try:
        __import__(module)
    except ImportError:
        with pytest.raises(_compat.BackendUnavailable, match=f"{module} is not importable"):
            _compat.load_backend(name)
        return
    try:
        xp, device = _compat.load_backend(name)
    except _compat.BackendUnavailable as exc:
        assert str(exc)  # the reason, which the suite's header prints
        return
    x = xp.ones((2, 3), dtype=xp.float32, device=device)
    assert _compat.device_of(x) == device and "cpu" not in str(device).lower()


def test_a_run_that_names_an_unavailable_gpu_backend_stops(tmp_path):
    """``XLSTM_BACKENDS=...,torch-cuda,jax-gpu`` on a machine without a GPU for them stops
    the run with pytest's usage error (exit status 4) and the reasons, never a pass."""
    import os
    import subprocess
    from pathlib import Path

    reasons = {}
    for name in ("torch-cuda", "jax-gpu"):
        try:
            _compat.load_backend(name)
        except _compat.BackendUnavailable as exc:
            reasons[name] = str(exc)
    if not reasons:
        pytest.skip("torch and JAX both run on a GPU here")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "XLSTM_BACKENDS": "numpy," + ",".join(reasons)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
         "--rootdir", str(root), str(root / "tests" / "test_activations.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    for name, reason in reasons.items():
        assert f"{name}: {reason}" in proc.stderr
