"""Shared test helpers: moving data between numpy and a backend, and one strict assertion.

The oracles that tests compare against (random cases, central differences, torch autograd)
are in :mod:`oracles`.
"""

from __future__ import annotations

import contextlib
import signal

import array_api_compat
import numpy as np

from xlstm._lib.compat import to_host

#: Relative / absolute tolerances per dtype name, against a float64 truth.
TOL = {"float64": (1e-10, 1e-12), "float32": (1e-5, 1e-6)}


def to_numpy(arr):
    """Copy any supported array to a numpy array on the host."""
    return to_host(arr)


def to_xp(a, xp, device, dtype=None):
    """A numpy array (or a dict of them) as ``xp`` arrays on ``device``."""
    if isinstance(a, dict):
        return {k: to_xp(v, xp, device, dtype) for k, v in a.items()}
    dtype = xp.float64 if dtype is None else dtype
    return xp.asarray(np.asarray(a, dtype=np.float64), dtype=dtype, device=device)


def dtype_name(dtype) -> str:
    return "float32" if "32" in str(dtype) else "float64"


def _check_dtype(dtype, check_dtype, expected=None, *, xp):
    """The dtype that ``actual`` must have (None: not checked), as :func:`assert_close` says."""
    if not check_dtype:
        if dtype is not None:
            raise TypeError("pass either dtype= or check_dtype=False, not both")
        return None
    if dtype is not None:
        return dtype
    if expected is not None and array_api_compat.is_array_api_obj(expected) and (
        array_api_compat.array_namespace(expected) is xp
    ):
        return expected.dtype
    raise TypeError(
        "say which dtype the result must have: dtype=..., or an expected array of the "
        f"namespace under test ({xp.__name__}); check_dtype=False (with the reason in a "
        "comment) skips the check"
    )


def assert_array(actual, *, xp, device, shape=None, dtype=None, check_dtype=True):
    """Check namespace, dtype, shape and device, so a test that fell back to numpy fails.

    ``dtype`` is required unless ``check_dtype=False`` says that the dtype does not matter.
    """
    got_xp = array_api_compat.array_namespace(actual)
    assert got_xp is xp, f"result lives in {got_xp.__name__}, expected {xp.__name__}"
    dtype = _check_dtype(dtype, check_dtype, xp=xp)
    if dtype is not None:
        assert actual.dtype == dtype, f"dtype {actual.dtype}, expected {dtype}"
    if shape is not None:
        assert tuple(actual.shape) == tuple(shape), f"shape {tuple(actual.shape)}, expected {shape}"
    if device is not None:
        got = array_api_compat.device(actual)
        assert got == device or str(got) == str(device), f"device {got}, expected {device}"


def assert_close(actual, expected, *, xp, device, dtype=None, check_dtype=True, rtol=None,
                 atol=None, err=""):
    """``assert_array`` then compare values with numpy's ``assert_allclose``.

    The dtype is checked by default: ``actual`` must have ``dtype`` when it is given, else
    the dtype of ``expected`` when that is an array of ``xp`` (a host numpy array, a Python
    number or a list says nothing about the dtype the result must have: then ``dtype`` is
    required). ``check_dtype=False`` turns the check off. Tolerances default to :data:`TOL`
    for the actual dtype.
    """
    dtype = _check_dtype(dtype, check_dtype, expected, xp=xp)
    expected = np.asarray(expected) if not hasattr(expected, "__array_namespace__") else (
        to_numpy(expected)
    )
    assert_array(actual, xp=xp, device=device, shape=expected.shape, dtype=dtype,
                 check_dtype=dtype is not None)
    r, a = TOL[dtype_name(actual.dtype)]
    np.testing.assert_allclose(
        to_numpy(actual), expected, rtol=r if rtol is None else rtol,
        atol=a if atol is None else atol, err_msg=err,
    )


def spy_on_loops(monkeypatch, loops_class):
    """Record every call of ``loops_class.forward`` and ``.backward`` (by name, in order) in
    the returned list, so that a test can assert the compiled loops really ran."""
    calls = []
    for name in ("forward", "backward"):
        real = getattr(loops_class, name)

        def spy(self, *args, _real=real, _name=name):
            calls.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(loops_class, name, spy)
    return calls


@contextlib.contextmanager
def time_limit(seconds):
    """A block in which a call that hangs (an ``open`` of a FIFO waits for a writer forever)
    raises ``TimeoutError`` after ``seconds`` (main thread, POSIX)."""

    def fire(*_):
        raise TimeoutError(f"hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def copy_or_skip(how, xp, device):
    """``copy.copy``, ``copy.deepcopy`` or a pickle round trip (``how``), as one function;
    skips the test when the namespace's own arrays do not survive it here."""
    import copy
    import pickle

    import pytest

    run = {"copy": copy.copy, "deepcopy": copy.deepcopy,
           "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}[how]
    try:
        run(to_xp(np.ones(2), xp, device))
    except Exception as exc:  # noqa: BLE001 - the namespace's own arrays cannot
        pytest.skip(f"{how} does not work on {xp.__name__} arrays here: {exc}")
    return run


def assert_caches_survive(again, caches, backward, da, fields, *, xp, device):
    """Notebook caches ``again``, copied from ``caches``: the same type, ``T = 4`` steps, the
    same step-2 views of ``fields`` and the same gradients of ``backward(da, ...)``, exactly."""
    assert type(again) is type(caches) and len(again) == 2 and len(again[0]) == 4
    want, got = backward(da, caches), backward(da, again)
    for k in want:
        assert_close(got[k], want[k], xp=xp, device=device, rtol=0, atol=0, err=k)
    for field in fields:
        assert_close(getattr(again[0][2], field), getattr(caches[0][2], field),
                     xp=xp, device=device, rtol=0, atol=0, err=field)
