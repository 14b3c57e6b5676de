"""The public API is typed (the package ships ``py.typed``): every public function and
method has annotations on all its parameters and its return, and they resolve; and the
examples of the README and of every page of ``docs/`` pass ``mypy --strict`` as written
(skipped where mypy is not installed: it is in the ``test`` extra)."""

from __future__ import annotations

import ast
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
from test_readme import PAGES, examples

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


def _bound_names(code: str) -> set[str]:
    """The names that ``code`` binds at its top level."""
    return {s.get_name() for s in symtable.symtable(code, "example", "exec").get_symbols()
            if s.is_assigned() or s.is_imported()}


class _TopLevel(ast.NodeVisitor):
    """The names a statement reads and binds in its own scope (not in a function, class,
    lambda or comprehension that it defines, whose name alone it binds)."""

    def __init__(self) -> None:
        self.read: set[str] = set()
        self.bound: set[str] = set()

    def visit_Name(self, node: ast.Name) -> None:
        (self.read if isinstance(node.ctx, ast.Load) else self.bound).add(node.id)

    def visit_alias(self, node: ast.alias) -> None:
        self.bound.add((node.asname or node.name).split(".")[0])

    def _scope(self, node: ast.AST) -> None:
        name = getattr(node, "name", None)
        if name is not None:
            self.bound.add(name)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scope
    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _scope


def _free_names(code: str) -> set[str]:
    """The names that ``code`` reads without binding them first (builtins aside): those its
    functions read and it never binds, and those a statement reads before one binds them."""
    top = symtable.symtable(code, "example", "exec")
    read: set[str] = set()

    def walk(table: symtable.SymbolTable) -> None:
        read.update(s.get_name() for s in table.get_symbols()
                    if s.is_referenced() and (table is top or s.is_global()))
        for child in table.get_children():
            walk(child)

    walk(top)
    free = read - _bound_names(code)
    bound: set[str] = set()
    for statement in ast.parse(code).body:
        names = _TopLevel()
        names.visit(statement)
        free |= names.read - bound - names.bound  # (a loop reads what it binds)
        bound |= names.bound
    return free - set(dir(builtins))


def example_modules(page: Path) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """The examples of ``page`` as the modules of a package ``examples`` that a reader
    type-checks, as ``(name, text, starts)``.

    The examples of a page run in one namespace: an example that reads a name it does not
    bind continues the module of the one before, any other starts a module; a module that
    still reads a name it does not bind imports it from the last module before it that
    binds it. ``starts`` pairs each example's first line in the module with its number,
    to name the example of a line."""
    stem = re.sub(r"\W", "_", page.stem.lower())
    chunks: list[tuple[str, list[tuple[int, int]]]] = []
    for number, code in enumerate(examples(page), start=1):
        if chunks and _free_names(code):
            text, starts = chunks[-1]
            chunks[-1] = (text + code, [*starts, (text.count("\n") + 1, number)])
        else:
            chunks.append((code, [(1, number)]))
    modules: list[tuple[str, str, list[tuple[int, int]]]] = []
    for k, (text, starts) in enumerate(chunks):
        imports: dict[int, list[str]] = {}
        for name in sorted(_free_names(text)):
            source = next((j for j in range(k - 1, -1, -1)
                           if name in _bound_names(chunks[j][0])), None)
            if source is not None:  # else mypy reports the name as undefined
                imports.setdefault(source, []).append(name)
        head = "".join(f"from examples.{stem}_{j + 1} import {', '.join(names)}\n"
                       for j, names in sorted(imports.items()))
        lines = head.count("\n")
        modules.append((f"{stem}_{k + 1}", head + text,
                        [(first + lines, number) for first, number in starts]))
    return modules


def _mypy_config(folder: Path) -> Path:
    """``mypy --strict``, xlstm found where it is imported from (its errors are the
    library's own check, not the examples'), the optional packages unfollowed."""
    lines = ["[mypy]", "strict = True", f"cache_dir = {folder / 'cache'}"]
    package_root = Path(xlstm.__file__).resolve().parents[1]
    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    if package_root not in installed:  # a checkout (an editable install's import hook
        lines.append(f"mypy_path = {package_root}")  # is invisible to mypy)
    lines += ["[mypy-examples.*]", "implicit_reexport = True",  # a page's shared names
              "[mypy-xlstm.*]", "follow_imports = silent",
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
    (folder / "examples").mkdir()
    (folder / "examples" / "__init__.py").write_text("", encoding="utf-8")
    where: dict[str, tuple[Path, list[tuple[int, int]]]] = {}
    for page in _CHECKED_PAGES:
        for name, text, starts in example_modules(page):
            (folder / "examples" / f"{name}.py").write_text(text, encoding="utf-8")
            where[f"{name}.py"] = (page, starts)
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                          str(_mypy_config(folder)), "--no-error-summary", "examples"],
                         cwd=folder, capture_output=True, text=True, timeout=300, check=False)
    errors: dict[Path, list[str]] = {page: [] for page in _CHECKED_PAGES}
    for line in run.stdout.splitlines():
        found = re.match(r"examples[/\\](\w+\.py):(\d+): (.*)", line)
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


#: The pages whose examples are type-checked: the README and every page of ``docs/``.
_CHECKED_PAGES = PAGES


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
    assert [[number for _, number in starts] for _, _, starts in modules] == [[1, 2], [3]]
    assert modules[0][2] == [(1, 1), (3, 2)]  # example 2 starts on the module's line 3
    assert modules[0][1].splitlines()[2] == "def f() -> float:"
    page.write_text(page.read_text(encoding="utf-8")
                    + "```python\nprint(x, np.pi, f())\n```\n", encoding="utf-8")
    name, text, starts = example_modules(page)[-1]  # joins 3, importing from 1
    assert name == "page_2" and starts == [(2, 3), (5, 4)]
    assert text.startswith("from examples.page_1 import f, x\nimport numpy as np\n")
    assert _free_names("import numpy as np\nx = np.ones(3)\ndef f():\n    return x, y\n") \
        == {"y"}
    assert _free_names("for i in range(3):\n    print(i, [j for j in range(i)])\n") == set()
    assert _free_names("save(params)\nparams = load()\n") == {"save", "params", "load"}
