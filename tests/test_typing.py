"""The public API is typed (the package ships ``py.typed``): every public function and
method has annotations on all its parameters and its return, and they resolve."""

from __future__ import annotations

import inspect
import typing

import pytest
import xlstm.autodiff

import xlstm


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
