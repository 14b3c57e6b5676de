"""``python -m xlstm check`` and ``info``: the pass/fail table and the environment report."""

from __future__ import annotations

import importlib.util

import pytest

from xlstm import __main__ as cli


def test_check_passes_on_numpy_and_its_array_path(capsys, monkeypatch):
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    assert cli.main(["check", "--backends", "numpy,strict"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "pass" in rows["numpy"] and "pass" in rows["strict"]
    if importlib.util.find_spec("numba") is not None:  # the compiled loops are the default
        assert "pass" in rows["numpy (XLSTM_ACCEL=0)"]
    assert "FAILED" not in out


def test_check_fails_when_a_tolerance_is_missed(capsys, monkeypatch):
    monkeypatch.setattr(cli, "SEED_TOL", 0.0)  # the seed examples match to ~5e-9, not 0
    assert cli.main(["check", "--backends", "numpy"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_with_no_backend_available_fails(capsys):
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("cupy is installed")
    assert cli.main(["check", "--backends", "cupy"]) == 1
    assert "skip" in capsys.readouterr().out


def test_info_reports_the_compiled_loops(capsys, monkeypatch):
    monkeypatch.setenv("XLSTM_ACCEL", "0")
    assert cli.main(["info"]) == 0
    assert "compiled CPU loops: off (XLSTM_ACCEL=0)" in capsys.readouterr().out
