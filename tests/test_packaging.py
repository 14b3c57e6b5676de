"""What the distributions carry.

The wheel: the package with its typing marker and CUDA sources, the licence, SPDX metadata,
a summary that names every model, and the ``xlstm`` command.
The sdist: the same, plus every test module with ``conftest.py`` and ``helpers.py``, so that
its tests run from the unpacked folder (``.ci/run`` does that). Both are built here with
setuptools' own build hooks (no network) from a copy of the project; the tests skip where
the installed setuptools is older than the floor in ``pyproject.toml`` or where they do not
sit next to the project's sources.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import xlstm
from xlstm import __main__ as cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
#: The models that the one-line summaries name.
MODELS = ("LSTM", "GRU", "RNN", "sLSTM", "mLSTM")
#: The installed command: ``xlstm ...`` is ``python -m xlstm ...``.
SCRIPT = "xlstm = xlstm.__main__:main"
COPY = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "CONTRIBUTING.md", "xlstm",
        "tests")


def _floor():
    """The setuptools version that ``[build-system] requires``, as a tuple of ints."""
    found = re.search(r'"setuptools>=([0-9.]+)"', PYPROJECT.read_text(encoding="utf-8"))
    assert found is not None, "pyproject.toml names no setuptools floor"
    return tuple(int(p) for p in found.group(1).split("."))


def _version(text):
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """``(sdist_names, sdist_pkg_info, wheel_names, wheel_metadata, wheel_entry_points)`` of
    fresh builds."""
    if not (PYPROJECT.exists() and (ROOT / "xlstm" / "__init__.py").exists()):
        pytest.skip("the tests do not sit next to the project's sources")
    try:
        have = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("setuptools is not installed")
    if _version(have) < _floor():
        pytest.skip(f"setuptools {have} is older than the floor {_floor()} of pyproject.toml")
    src = tmp_path_factory.mktemp("src")
    for name in COPY:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        elif path.exists():
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    for hook in ("build_sdist", "build_wheel"):  # one process each, as a frontend does
        code = f"import sys; from setuptools import build_meta as b; b.{hook}(sys.argv[1])"
        proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,), (wheel,) = list(out.glob("*.tar.gz")), list(out.glob("*.whl"))
    with tarfile.open(sdist) as tar:
        top = f"xlstm_array_api-{xlstm.__version__}/"
        names = {m.name[len(top):] for m in tar.getmembers() if m.name.startswith(top)}
        pkg_info = tar.extractfile(top + "PKG-INFO").read().decode("utf-8")
    with zipfile.ZipFile(wheel) as zf:
        wheel_names = set(zf.namelist())
        info = f"xlstm_array_api-{xlstm.__version__}.dist-info/"
        metadata = zf.read(info + "METADATA").decode("utf-8")
        entry_points = zf.read(info + "entry_points.txt").decode("utf-8")
    return names, pkg_info, wheel_names, metadata, entry_points


def test_wheel_carries_the_package_the_licence_and_the_typing_marker(dist):
    _, _, names, metadata, _ = dist
    info = f"xlstm_array_api-{xlstm.__version__}.dist-info/"
    for name in ("xlstm/__init__.py", "xlstm/py.typed", "xlstm/accel/cuda/lstm_pointwise.cuh",
                 "xlstm/accel/cuda/gru_pointwise.cuh", "xlstm/accel/cuda/rnn_pointwise.cuh",
                 "xlstm/accel/cuda/prelude.cuh", "xlstm/accel/cuda/persistent.cuh",
                 "xlstm/accel/cuda/kernels.py", "xlstm/cells/gru.py", info + "licenses/LICENSE"):
        assert name in names, name
    assert not any(n.startswith("tests/") for n in names)
    assert re.search(r"^License-Expression: MIT$", metadata, re.M)
    assert re.search(r"^License-File: LICENSE$", metadata, re.M)
    assert re.search(r"^Classifier: Typing :: Typed$", metadata, re.M)
    assert not re.search(r"^Classifier: License ::", metadata, re.M)  # SPDX says it
    # CuPy's ctk extra: the CUDA headers that CuPy 14.1 on needs to compile a kernel.
    for cuda in ("12", "13"):
        assert re.search(rf'^Requires-Dist: cupy-cuda{cuda}x\[ctk\]>=\S+; extra == "cuda{cuda}"$',
                         metadata, re.M), cuda


def test_sdist_carries_the_licence_and_every_test(dist):
    names, pkg_info, _, _, _ = dist
    for name in ("LICENSE", "README.md", "pyproject.toml", "xlstm/py.typed",
                 "xlstm/accel/cuda/lstm_pointwise.cuh", "tests/conftest.py", "tests/helpers.py",
                 "tests/cuda_host/grid_emulator.h"):
        assert name in names, name
    tests = {f"tests/{p.name}" for p in (ROOT / "tests").glob("*.py")}
    assert tests <= names, sorted(tests - names)
    assert not any("__pycache__" in n for n in names)
    assert re.search(r"^License-Expression: MIT$", pkg_info, re.M)


def test_licence_is_mit():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the xlstm developers\n")
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def _names_every_model(text):
    missing = [m for m in MODELS if not re.search(rf"\b{m}\b", text)]
    assert not missing, f"{text!r} does not name {missing}"
    assert "array API" in text, text


def test_wheel_installs_the_command_and_a_summary_of_every_model(dist):
    _, pkg_info, _, metadata, entry_points = dist
    scripts = re.search(r"^\[console_scripts\]\n((?:.+\n?)*)", entry_points, re.M)
    assert scripts is not None, entry_points
    assert scripts.group(1).strip().splitlines() == [SCRIPT]
    for meta in (metadata, pkg_info):
        summary = re.search(r"^Summary: (.*)$", meta, re.M)
        assert summary is not None
        _names_every_model(summary.group(1))


def test_the_summaries_name_every_model():
    """The package's summary, its docstring's first line and the command's description
    say what the package holds: every model, written once for the array API."""
    _names_every_model(xlstm.__doc__.splitlines()[0])
    _names_every_model(cli.DESCRIPTION)
    if PYPROJECT.exists():
        found = re.search(r'^description = "(.*)"$', PYPROJECT.read_text(encoding="utf-8"), re.M)
        assert found is not None
        _names_every_model(found.group(1))


def _installed_command():
    """The path of the installed ``xlstm`` command; skips where the package is not installed
    (the tests run from a checkout on ``PYTHONPATH``)."""
    try:
        dist = importlib.metadata.distribution("xlstm-array-api")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("xlstm-array-api is not installed")
    scripts = [ep for ep in dist.entry_points if ep.group == "console_scripts"]
    assert [f"{ep.name} = {ep.value}" for ep in scripts] == [SCRIPT], (
        "the installed metadata lacks the xlstm command: reinstall (pip install -e .)")
    name = "xlstm.exe" if os.name == "nt" else "xlstm"
    path = os.path.join(sysconfig.get_path("scripts"), name)
    if not os.path.exists(path):  # a --user install or another scheme
        path = shutil.which("xlstm")
    assert path is not None and os.path.exists(path), "the xlstm command is not installed"
    return path


def test_the_installed_command_is_python_m_xlstm(tmp_path):
    """``xlstm ARGS`` runs ``python -m xlstm ARGS``; its usage lines name it ``xlstm``."""
    command = _installed_command()
    env = {**os.environ, "PYTHONPATH": str(Path(xlstm.__file__).resolve().parents[1])}

    def run(*argv):
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)

    version = run(command, "--version")
    assert version.returncode == 0 and version.stdout == f"xlstm {xlstm.__version__}\n"
    mine, module = run(command, "--help"), run(sys.executable, "-m", "xlstm", "--help")
    assert mine.returncode == module.returncode == 0
    assert mine.stdout.startswith("usage: xlstm [-h]")
    assert mine.stdout.replace("usage: xlstm", "usage: python -m xlstm", 1) == module.stdout
    error = run(command, "demo")
    assert error.returncode == 2 and error.stdout == ""
    assert error.stderr.splitlines() == [
        "usage: xlstm demo [-h] NAME ...",
        "xlstm demo: error: the following arguments are required: NAME"]
    error = run(command, "demo", "adding", "--steps", "0")
    assert error.returncode == 2
    assert error.stderr.splitlines() == [
        "usage: xlstm demo adding [options]",
        "xlstm demo adding: error: argument --steps: must be an integer >= 1, got 0"]
    assert not list(tmp_path.iterdir())
