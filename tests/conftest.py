"""The backend matrix: one ``xp`` fixture (with its ``device``) over the array namespaces.

* numpy and array-api-strict always; array-api-strict again on ``Device("device1")``, which
  catches any allocation that forgets ``device=``;
* torch (CPU) and JAX when importable;
* CuPy, and torch and JAX arrays on the GPU (``torch-cuda``, ``jax-gpu``), only when a CUDA
  device answers (for ``jax-gpu`` also leave ``JAX_PLATFORMS`` unset or naming ``cuda``).

Without ``XLSTM_BACKENDS`` the tests run on every backend that loads here; the report header
names them, and names each backend that cannot run here with the reason.
``XLSTM_BACKENDS=numpy,cupy`` (comma separated) chooses the backends instead: a name that is
unknown, or a backend that cannot run here, stops the run with a usage error (exit status 4)
that gives the reason, so that a chosen backend never passes by being skipped.
"""

from __future__ import annotations

import os

import pytest

from xlstm._lib.compat import BACKENDS as ALL_BACKENDS
from xlstm._lib.compat import BackendUnavailable, load_backend


def _requested():
    """The names in ``XLSTM_BACKENDS`` (in order, without repeats), or None when unset."""
    env = os.environ.get("XLSTM_BACKENDS", "").strip()
    if not env:
        return None
    return tuple(dict.fromkeys(n.strip() for n in env.split(",") if n.strip()))


def _probe(names):
    """``(runnable, unavailable)``: the names that load here, ``{name: reason}`` for the rest."""
    runnable, unavailable = [], {}
    for name in names:
        if name not in ALL_BACKENDS:
            continue
        try:
            load_backend(name)
        except BackendUnavailable as exc:
            unavailable[name] = str(exc)
        else:
            runnable.append(name)
    return tuple(runnable), unavailable


REQUESTED = _requested()
#: The backends every ``xp`` test runs on, and ``{name: reason}`` for those that cannot run.
RUN, UNAVAILABLE = _probe(ALL_BACKENDS if REQUESTED is None else REQUESTED)


def pytest_configure(config):
    if REQUESTED is None:
        return
    unknown = [n for n in REQUESTED if n not in ALL_BACKENDS]
    if unknown:
        raise pytest.UsageError(
            f"XLSTM_BACKENDS has unknown names {unknown}; choose from {', '.join(ALL_BACKENDS)}"
        )
    if not REQUESTED:
        raise pytest.UsageError("XLSTM_BACKENDS names no backend; unset it to run them all")
    if UNAVAILABLE:
        why = "; ".join(f"{n}: {reason}" for n, reason in UNAVAILABLE.items())
        raise pytest.UsageError(f"XLSTM_BACKENDS names backends that cannot run here: {why}")


def pytest_report_header(config):
    source = "XLSTM_BACKENDS" if REQUESTED is not None else "every one that loads here"
    line = f"xlstm backends ({source}): {', '.join(RUN) or 'none'}"
    if UNAVAILABLE:
        line += "; not available: " + "; ".join(f"{n} ({r})" for n, r in UNAVAILABLE.items())
    return line


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.get_verbosity() < 0 and UNAVAILABLE:  # -q hides the header: say it at the end
        terminalreporter.write_line(pytest_report_header(config))


def on_backends(cases, names=RUN):
    """The backends of ``names`` (this run's, by default), each with its own cases, for
    ``@pytest.mark.parametrize("backend, ...", on_backends(cases), indirect=["backend"])``: a
    test that runs some settings on every backend and others on fewer. ``cases(name, xp)``
    gives a backend's ``pytest.param`` of the further arguments, each with its id."""
    params = []
    for name in names:
        params += [pytest.param(name, *case.values, id=f"{name}-{case.id}")
                   for case in cases(name, load_backend(name)[0])]
    return params


@pytest.fixture(params=RUN)
def backend(request):
    """``(name, xp, device)`` for one backend of the matrix."""
    xp, device = load_backend(request.param)
    return request.param, xp, device


@pytest.fixture(scope="session")
def backend_named():
    """``load(name) -> (xp, device)`` for a test that needs one backend by name: it skips,
    with the reason, when this run does not cover that backend."""

    def load(name):
        if name not in RUN:
            pytest.skip(UNAVAILABLE.get(name)
                        or f"{name} is not among this run's backends ({', '.join(RUN)})")
        return load_backend(name)

    return load


@pytest.fixture(scope="session")
def backends_run():
    """The names of the backends that this run covers (see the module docstring)."""
    return RUN


@pytest.fixture
def xp(backend):
    """The array namespace under test."""
    return backend[1]


@pytest.fixture
def device(backend):
    """The device that test arrays are created on (``None``: the namespace's default)."""
    return backend[2]


@pytest.fixture(scope="session")
def cuda_host_builds(tmp_path_factory):
    """Every cell's generated CUDA kernels built for the host behind the grid emulator (no
    sanitizer), once for the whole run (test_cuda.py, test_dlpack.py): cell -> library
    path. Skips where no host C++ compiler is on PATH."""
    import cuda_emulator

    cxx = cuda_emulator.host_compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler ($CXX, c++, g++ or clang++) on PATH")
    return cuda_emulator.build_all(cxx, tmp_path_factory.mktemp("cuda_host"))[0]
