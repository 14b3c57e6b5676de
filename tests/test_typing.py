"""The public API is typed (the package ships ``py.typed``): every public function and
method has annotations on all its parameters and its return, and they resolve."""

from __future__ import annotations

import builtins
import inspect
import re
import subprocess
import symtable
import sys
import sysconfig
import typing
from pathlib import Path

import pytest
from test_readme import README, examples

import xlstm
import xlstm.autodiff


def _public_callables():
    for name in xlstm.__all__:
        obj = getattr(xlstm, name)
        if inspect.isclass(obj):
            if issubclass(obj, tuple):  # named tuples: their fields are typed or documented
                continue
            for meth in ("__init__", "init", "step"):
                fn = obj.__dict__.get(meth)
                if fn is not None:
                    yield f"{name}.{meth}", fn
        elif inspect.isfunction(obj):
            yield name, obj
    yield "autodiff.lstm", xlstm.autodiff.lstm


@pytest.mark.parametrize("name, fn", list(_public_callables()))
def test_public_callables_are_annotated(name, fn):
    fn = inspect.unwrap(fn)
    hints = typing.get_type_hints(fn)  # raises if an annotation does not resolve
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [p.name for p in params if p.name not in hints]
    assert not missing, f"{name}: parameters without a type hint: {missing}"
    assert "return" in hints, f"{name}: no return annotation"


# ---------------------------------------------------------------- the examples, type-checked
#: Optional backends and tools that xlstm imports lazily: mypy does not follow them (torch
#: alone would take it a minute) and takes them as ``Any``, and their absence is no error.
#: xlstm itself is never among them: an example that cannot find it fails.
_UNFOLLOWED = ("torch", "jax", "jaxlib", "cupy", "cupyx", "numba", "llvmlite", "dask",
               "distributed", "matplotlib", "mpi4py", "tqdm", "array_api_strict",
               "array_api_compat", "safetensors")


def _free_names(code: str) -> set[str]:
    """The names that ``code`` reads without binding them (builtins aside)."""
    top = symtable.symtable(code, "example", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    read: set[str] = set()

    def walk(table: symtable.SymbolTable) -> None:
        read.update(s.get_name() for s in table.get_symbols()
                    if s.is_referenced() and (table is top or s.is_global()))
        for child in table.get_children():
            walk(child)

    walk(top)
    return read - bound - set(dir(builtins))


def example_modules(page: Path) -> list[tuple[str, list[tuple[int, int]]]]:
    """The examples of ``page`` as the modules a reader type-checks: an example that reads a
    name it does not bind continues the module of the one before (the examples of a page run
    in one namespace), any other starts a module. Each module comes with its ``(first line,
    example number)`` pairs, to name the example of a line."""
    modules: list[tuple[str, list[tuple[int, int]]]] = []
    for number, code in enumerate(examples(page), start=1):
        if modules and _free_names(code):
            text, starts = modules[-1]
            starts.append((text.count("\n") + 1, number))
            modules[-1] = (text + code, starts)
        else:
            modules.append((code, [(1, number)]))
    return modules


def _mypy_config(folder: Path) -> Path:
    """``mypy --strict``, xlstm found where it is imported from (its errors are the
    library's own check, not the examples'), the optional packages unfollowed."""
    lines = ["[mypy]", "strict = True", f"cache_dir = {folder / 'cache'}"]
    package_root = Path(xlstm.__file__).resolve().parents[1]
    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    if package_root not in installed:  # a checkout (an editable install's import hook
        lines.append(f"mypy_path = {package_root}")  # is invisible to mypy)
    lines += ["[mypy-xlstm.*]", "follow_imports = silent",
              "[mypy-" + ",".join(f"{name}.*" for name in _UNFOLLOWED) + "]",
              "follow_imports = skip", "ignore_missing_imports = True"]
    config = folder / "mypy.ini"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory) -> dict[Path, list[str]]:
    """One ``mypy --strict`` run over the examples of every page: its errors by page, each
    naming the example and its line."""
    pytest.importorskip("mypy", reason="mypy is not installed (pip install mypy, or the "
                                       "package's test extra)")
    folder = tmp_path_factory.mktemp("mypy")
    where: dict[str, tuple[Path, list[tuple[int, int]]]] = {}
    for page in _CHECKED_PAGES:
        stem = re.sub(r"\W", "_", page.stem.lower())
        for k, (text, starts) in enumerate(example_modules(page), start=1):
            name = f"{stem}_{k}.py"
            (folder / name).write_text(text, encoding="utf-8")
            where[name] = (page, starts)
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                          str(_mypy_config(folder)), "--no-error-summary", *sorted(where)],
                         cwd=folder, capture_output=True, text=True, timeout=300, check=False)
    errors: dict[Path, list[str]] = {page: [] for page in _CHECKED_PAGES}
    for line in run.stdout.splitlines():
        found = re.match(r"(\w+\.py):(\d+): (.*)", line)
        if not found or found.group(1) not in where:
            continue
        page, starts = where[found.group(1)]
        n = int(found.group(2))
        first, number = max(s for s in starts if s[0] <= n)
        errors[page].append(f"{page.name}, example {number}, line {n - first + 1}: "
                            f"{found.group(3)}")
    assert run.returncode in (0, 1), run.stdout[-3000:] + run.stderr[-3000:]  # 2: mypy failed
    assert (run.returncode == 1) == any(errors.values()), run.stdout[-3000:]
    return errors


#: The pages whose examples are type-checked.
_CHECKED_PAGES = (README,)


@pytest.mark.parametrize("page", _CHECKED_PAGES, ids=lambda p: p.name)
def test_examples_pass_mypy_strict(page, mypy_errors):
    """A user who runs ``mypy --strict`` over the examples, as written, gets no error: the
    public API's types say what it returns (overloads where that depends on an argument)."""
    assert not mypy_errors[page], "\n".join(mypy_errors[page])


def test_example_modules_join_what_runs_together(tmp_path):
    """An example continues the one before exactly when it reads a name it does not bind."""
    page = tmp_path / "page.md"
    page.write_text("```python\nimport numpy as np\nx = np.ones(3)\n```\ntext\n"
                    "```python\ndef f() -> float:\n    return float(x.sum())\n```\n"
                    "```python\nimport numpy as np\nfor i in range(3):\n    print(i)\n```\n",
                    encoding="utf-8")
    modules = example_modules(page)
    assert [[number for _, number in starts] for _, starts in modules] == [[1, 2], [3]]
    assert modules[0][1] == [(1, 1), (3, 2)]  # example 2 starts on the module's line 3
    assert modules[0][0].splitlines()[2] == "def f() -> float:"
    assert _free_names("import numpy as np\nx = np.ones(3)\ndef f():\n    return x, y\n") \
        == {"y"}
    assert _free_names("for i in range(3):\n    print(i, [j for j in range(i)])\n") == set()
