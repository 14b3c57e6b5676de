"""The backend matrix: one ``xp`` fixture (with its ``device``) over every array namespace.

* numpy and array-api-strict always; array-api-strict again on ``Device("device1")``, which
  catches any allocation that forgets ``device=``;
* torch (CPU) and JAX when importable;
* CuPy only when a CUDA device answers.

A backend that cannot run is a skip with its reason, never a silent pass.
``XLSTM_BACKENDS=numpy,cupy`` (comma separated) narrows the list.
"""

from __future__ import annotations

import os

import pytest

ALL_BACKENDS = ("numpy", "strict", "strict-device1", "torch", "jax", "cupy")


def _load(name):
    """Return ``(xp, device)`` for a backend, or raise ``pytest.skip`` with the reason."""
    import array_api_compat

    if name == "numpy":
        import numpy as np

        return array_api_compat.array_namespace(np.empty(0)), "cpu"
    if name.startswith("strict"):
        import array_api_strict as s

        dev = s.Device("device1" if name == "strict-device1" else "CPU_DEVICE")
        return s, dev
    if name == "torch":
        torch = pytest.importorskip("torch", reason="torch is not installed")
        return array_api_compat.array_namespace(torch.empty(0)), torch.device("cpu")
    if name == "jax":
        jax = pytest.importorskip("jax", reason="jax is not installed")
        jax.config.update("jax_enable_x64", True)  # float64 tests need it
        import jax.numpy as jnp

        return array_api_compat.array_namespace(jnp.empty(0)), jax.devices("cpu")[0]
    if name == "cupy":
        cp = pytest.importorskip("cupy", reason="cupy is not installed")
        try:
            if cp.cuda.runtime.getDeviceCount() < 1:
                pytest.skip("cupy is installed but no CUDA device is visible")
            cp.ones(1).sum().item()
        except Exception as exc:  # noqa: BLE001 - any CUDA runtime failure means "no GPU here"
            pytest.skip(f"cupy is installed but CUDA is unusable: {exc}")
        return array_api_compat.array_namespace(cp.empty(0)), cp.cuda.Device(0)
    raise ValueError(name)


def _selected():
    env = os.environ.get("XLSTM_BACKENDS", "").strip()
    if not env:
        return ALL_BACKENDS
    names = tuple(n.strip() for n in env.split(",") if n.strip())
    unknown = set(names) - set(ALL_BACKENDS)
    if unknown:
        raise pytest.UsageError(
            f"XLSTM_BACKENDS has unknown names {sorted(unknown)}; choose from {ALL_BACKENDS}"
        )
    return names


@pytest.fixture(params=_selected())
def backend(request):
    """``(name, xp, device)`` for one backend of the matrix."""
    xp, device = _load(request.param)
    return request.param, xp, device


@pytest.fixture
def xp(backend):
    """The array namespace under test."""
    return backend[1]


@pytest.fixture
def device(backend):
    """The device that test arrays are created on (``None``: the namespace's default)."""
    return backend[2]
