"""The documentation's Python examples run as written: the README's and those of every page
of ``docs/``; and the README's performance figures are the committed benchmark results.

The examples of a page run in order, in one namespace (a later example may use what an
earlier one defined) and in a fresh folder of their own. What an example needs, it says by
what it imports or builds, and without it the example is skipped with the reason:

* ``import cupy`` or ``NCCLComm(``: cupy and a CUDA GPU;
* ``import torch``: torch; ``dask``: dask and distributed;
* ``MPIComm(``: the example is a script for ``mpiexec``, and runs as the page says, on two
  processes (``mpiexec -n 2 python -m mpi4py train.py``), where mpi4py and an MPI are
  installed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = (README, *sorted((ROOT / "docs").glob("*.rst")))
RESULTS = ROOT / "benchmarks" / "results" / "bench_numpy_float32_amd-epyc.json"


def examples(page: Path) -> list[str]:
    """The Python examples of a page: Markdown's ```` ```python ```` blocks, or the bodies of
    reStructuredText's ``.. code-block:: python`` directives (dedented)."""
    text = page.read_text(encoding="utf-8")
    if page.suffix == ".md":
        return re.findall(r"```python\n(.*?)```", text, flags=re.S)
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        head = re.match(r"( *)\.\. code-block:: python\s*$", line)
        if not head:
            continue
        indent, body = len(head.group(1)), []
        for follow in lines[i + 1 :]:
            if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                break
            body.append(follow)
        body = [b for b in body if not re.match(r"\s*:\w[\w-]*:", b)]  # directive options
        width = min(len(b) - len(b.lstrip()) for b in body if b.strip())
        found.append("\n".join(b[width:] for b in body).strip("\n") + "\n")
    return found


EXAMPLES = [(page, i) for page in PAGES for i in range(len(examples(page)))]


def _has_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no cupy, no driver or no device: no GPU
        return False


def missing(code: str) -> str | None:
    """Why ``code`` cannot run here, or None when it can (see the module notes)."""
    if re.search(r"^\s*import cupy|NCCLComm\(", code, flags=re.M) and not _has_gpu():
        return "needs cupy and a CUDA GPU"
    for module, what in (("torch", "torch"), ("dask", "dask"), ("dask", "distributed")):
        if re.search(rf"^\s*(import|from) {module}\b", code, flags=re.M) \
                and importlib.util.find_spec(what) is None:
            return f"needs {what}"
    return None


def _run_mpi_script(code: str, folder: Path) -> None:
    """Run ``code`` as the page says: ``mpiexec -n 2 python -m mpi4py train.py``."""
    from test_distributed import (
        _mpiexec,  # the suite's launcher lookup (skips without MPI)
    )

    (folder / "train.py").write_text(code, encoding="utf-8")
    run = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py", "train.py"],
                         cwd=folder, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]


#: Per page: the namespace its examples share, how many have run, and their folder.
_RUNS: dict[Path, dict] = {}


def _run_through(page: Path, index: int, folder_factory, monkeypatch) -> dict:
    """Run the examples of ``page`` up to ``index`` that have not run yet (those that cannot
    run here are passed over); return the page's namespace."""
    state = _RUNS.setdefault(page, {"namespace": {"__name__": "__main__"}, "done": 0,
                                    "folder": folder_factory.mktemp(page.stem)})
    monkeypatch.chdir(state["folder"])
    codes = examples(page)
    while state["done"] <= index:
        i = state["done"]
        if missing(codes[i]) is None:
            if "MPIComm(" in codes[i]:
                _run_mpi_script(codes[i], state["folder"])
            else:
                exec(compile(codes[i], f"{page.name}, example {i + 1}", "exec"),
                     state["namespace"])
        state["done"] = i + 1
    return state["namespace"]


def _beside_the_tests(path):
    """Skip unless ``path`` is there: an sdist carries the tests and the README, not the
    documentation's pages or the committed benchmark results."""
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} is not beside the tests (an sdist has none)")


def test_the_pages_have_examples():
    assert len(examples(README)) >= 3
    _beside_the_tests(ROOT / "docs")
    assert all(examples(ROOT / "docs" / name) for name in ("quickstart.rst", "training.rst",
                                                          "scale.rst"))


@pytest.mark.parametrize("page, index", EXAMPLES,
                         ids=[f"{page.name}-{index + 1}" for page, index in EXAMPLES])
def test_example_runs(page, index, tmp_path_factory, monkeypatch):
    why = missing(examples(page)[index])
    if why:
        pytest.skip(f"{page.name}, example {index + 1}: {why}")
    namespace = _run_through(page, index, tmp_path_factory, monkeypatch)
    result = namespace.get("result")
    if "result = xlstm.fit(" in examples(page)[index] and hasattr(result, "history"):
        assert result.history[-1] < 0.5 * result.history[0]  # a training example learns


@pytest.mark.parametrize("page", [p for p in PAGES if p.suffix == ".rst"], ids=lambda p: p.name)
def test_every_literal_block_says_its_language(page):
    """Literal blocks are ``.. code-block:: LANGUAGE`` directives, never a bare ``::``, so
    that every Python example is found and run above."""
    bare = [line for line in page.read_text(encoding="utf-8").splitlines()
            if line.rstrip().endswith("::") and not line.lstrip().startswith("..")]
    assert not bare, bare


# ---------------------------------------------------------------- performance figures
def test_readme_performance_table_is_the_committed_results():
    """Every figure of the README's table equals the committed JSON to the digits shown;
    the documentation's performance page includes that table rather than a copy."""
    _beside_the_tests(RESULTS)
    _beside_the_tests(ROOT / "docs")
    results = {tuple(r["size"]): r["results"] for r in
               json.loads(RESULTS.read_text(encoding="utf-8"))["results"]}
    text = README.read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+), (\d+), (\d+), (\d+) \|(.*)\|$", text, flags=re.M)
    assert {tuple(map(int, r[:4])) for r in rows} == set(results)
    for *size, rest in rows:
        res = results[tuple(map(int, size))]

        def ms(key, part):
            return res[key][part]["median_ms"]

        want = [
            [ms("xlstm-baseline", "fwd_bwd"), ms("xlstm", "fwd_bwd")],
            [ms("xlstm-model", "fwd"), ms("xlstm-model", "fwd_bwd")],
            [ms("torch", "fwd"), ms("torch", "fwd_bwd")],
            [ms("gemm", "fwd"), ms("gemm", "fwd_bwd")],
            [res["xlstm-gru"]["speedup_vs_torch"][p] for p in ("fwd", "fwd_bwd")],
            [res["xlstm-bilstm2"]["speedup_vs_torch"][p] for p in ("fwd", "fwd_bwd")],
        ]
        cells = [c.strip() for c in rest.split("|")]
        assert len(cells) == len(want), cells
        for cell, values in zip(cells, want):
            shown = re.findall(r"\d+(?:\.\d+)?", cell)
            assert len(shown) == len(values), cell
            for text_value, value in zip(shown, values):
                digits = len(text_value.partition(".")[2])
                assert float(text_value) == round(value, digits), (size, cell, value)
    page = (ROOT / "docs" / "performance.rst").read_text(encoding="utf-8")
    start, end = re.search(r":start-after: (.*)\n\s*:end-before: (.*)\n", page).groups()
    assert page.count("../README.md") == 1 and start in text and end in text
    assert not re.search(r"^\s*\d+, \d+, \d+, \d+ ", page, flags=re.M)  # no table of its own
