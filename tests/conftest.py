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

from xlstm._compat import BACKENDS as ALL_BACKENDS
from xlstm._compat import BackendUnavailable, load_backend


def _load(name):
    """Return ``(xp, device)`` for a backend, or skip the test with the reason."""
    try:
        return load_backend(name)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


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
