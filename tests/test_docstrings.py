"""Every ``Examples`` section of the package runs and prints what it says (doctest), one
test per docstring; an example that imports an optional package (torch, JAX, CuPy, ...)
is skipped, naming it, where that package is not installed."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re

import pytest

import xlstm

#: Optional packages an example may import; its docstring is skipped without them.
OPTIONAL = ("torch", "jax", "cupy", "numba", "mpi4py", "dask", "matplotlib", "tqdm",
            "array_api_strict", "safetensors")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _docstring_tests():
    finder = doctest.DocTestFinder(exclude_empty=True)
    out = []
    for info in pkgutil.walk_packages(xlstm.__path__, "xlstm."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for test in finder.find(module, info.name):
            if test.examples:
                out.append(pytest.param(test, id=test.name))
    return out


TESTS = _docstring_tests()


def test_every_public_class_and_function_has_examples():
    """Each name of ``xlstm.__all__`` that is a class or a function shows its use."""
    missing = [name for name in xlstm.__all__
               if (inspect.isclass(obj := getattr(xlstm, name)) or inspect.isfunction(obj))
               and ">>> " not in (inspect.getdoc(obj) or "")]
    assert not missing, f"public names without an Examples section: {missing}"


@pytest.mark.parametrize("test", TESTS)
def test_docstring_examples(test):
    source = "\n".join(ex.source for ex in test.examples)
    for name in OPTIONAL:
        if re.search(rf"^\s*(import|from) {name}\b", source, re.M):
            pytest.importorskip(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    fresh = doctest.DocTest(test.examples, dict(test.globs), test.name, test.filename,
                            test.lineno, test.docstring)
    runner.run(fresh, out=report.append)
    fresh.globs.clear()
    assert not runner.failures, "".join(report)
