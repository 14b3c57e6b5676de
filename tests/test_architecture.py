"""The floor plan of the package, checked from the source: which folder may import which, no
import cycle, one importer of array-api-compat, and no optional dependency imported at the top
level of any module (importing xlstm must work with numpy and array-api-compat alone)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import xlstm

ROOT = Path(xlstm.__file__).parent

# Each part of the package, lowest first: a part imports only the parts before it (and itself).
# Every import counts, those inside functions included.
LAYERS = (
    "_lib",         # compat, checks, typing, trees, regular files
    "cells",        # one module per engine cell
    "accel",        # the registry of compiled loops; cpu/, cuda/
    "engine",       # the one time loop
    "notebook",     # the two notebooks' functional APIs
    "models",       # the model classes
    "io",           # model and parameter files
    "distributed",  # communicators, agreement across ranks, predict
    "training",     # optimisers, losses, fit (data-parallel through distributed)
    "demos",
    "",             # xlstm/__init__.py and xlstm/__main__.py: the public names and the CLI
)
#: Parts that know nothing of each other, either way: the two front ends over the engine.
SIBLINGS = (("notebook", "models"),)
OPTIONAL = ("cupy", "numba", "mpi4py", "dask", "torch", "jax", "matplotlib", "tqdm",
            "array_api_strict")


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            yield path, ("xlstm", *parts[:-1]), True
        else:
            yield path, ("xlstm", *parts), False


def _imports(path, name, is_package):
    """(module imported, line, at top level) for every import statement of a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if is_package else name[:-1]
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            named = [f"{target}.{alias.name}" for alias in node.names]
            modules = [m for m in named if m in MODULES]  # ``from . import loop`` names modules
            for module in modules or [target]:
                yield module, node.lineno, id(node) in top


def _part(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


MODULES = {".".join(name): (path, is_package) for path, name, is_package in _modules()}


def _edges():
    for name, (path, is_package) in MODULES.items():
        for target, line, top in _imports(path, tuple(name.split(".")), is_package):
            yield name, target, line, top


def test_every_part_has_a_layer():
    parts = {_part(name) for name in MODULES}
    assert parts <= set(LAYERS), f"parts without a layer: {sorted(parts - set(LAYERS))}"


def test_no_part_imports_a_part_above_it():
    upward = []
    for name, target, line, _ in _edges():
        if target in MODULES:
            have, want = _part(name), _part(target)
            if LAYERS.index(want) > LAYERS.index(have):
                upward.append(f"{name}:{line} imports {target} ({have or 'top'} -> {want or 'top'})")
    assert not upward, "\n".join(upward)


def test_siblings_import_nothing_of_each_other():
    crossing = [f"{name}:{line} imports {target}" for name, target, line, _ in _edges()
                if target in MODULES and {_part(name), _part(target)} in map(set, SIBLINGS)]
    assert not crossing, "\n".join(crossing)


def test_no_import_cycle():
    graph = {name: set() for name in MODULES}
    for name, target, _, _ in _edges():
        if target in MODULES and target != name:
            graph[name].add(target)
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_one_importer_of_array_api_compat():
    importers = {name for name, target, _, _ in _edges() if target.split(".")[0] == "array_api_compat"}
    assert importers == {"xlstm._lib.compat"}


def _imported_at_top_level():
    """The modules that ``import xlstm`` loads: the package, and every module a loaded one
    imports at its top level."""
    tops = {}
    for name, target, _, top in _edges():
        if top and target in MODULES:
            tops.setdefault(name, set()).add(target)
    for name in MODULES:  # a module's packages load before it
        parts = name.split(".")
        tops.setdefault(name, set()).update(".".join(parts[:i]) for i in range(1, len(parts)))
    loaded, todo = set(), ["xlstm"]
    while todo:
        name = todo.pop()
        if name not in loaded:
            loaded.add(name)
            todo.extend(tops.get(name, ()))
    return loaded


@pytest.mark.parametrize("optional", OPTIONAL)
def test_no_optional_dependency_at_the_top_level(optional):
    """``import xlstm`` imports no optional dependency: a module that imports one at its top
    level (numba's kernels) is itself imported only where it is used, inside a function."""
    loaded = _imported_at_top_level()
    found = [f"{name}:{line}" for name, target, line, top in _edges()
             if top and target.split(".")[0] == optional and name in loaded]
    assert not found, f"{optional} imported at the top level of: {found}"


def test_importing_xlstm_loads_no_optional_dependency():
    code = ("import sys, xlstm; print(sorted({m.split('.')[0] for m in sys.modules} & "
            f"{set(OPTIONAL)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out
