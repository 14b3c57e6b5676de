"""Parameter trees: the nested lists and dicts of arrays of the model classes.

A model's ``params`` is a list with one dict per (layer, direction), and its ``grads`` has
exactly the same structure; a training script may nest them further (``{"rnn":
model.params, "head": {...}}``). The optimizers and the clipping functions work on flat
dicts, so a tree is flattened to one, keyed by each leaf's path as Python spells the
indexing (``[0]['Wf']``), and the results are put back into the tree's structure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["is_tree", "flatten", "unflatten", "same_structure"]


def is_tree(obj: Any) -> bool:
    """Whether ``obj`` is a tree rather than a flat dict of arrays: a list or a tuple, or a
    dict holding a list, a tuple or a dict."""
    if isinstance(obj, (list, tuple)):
        return True
    return isinstance(obj, Mapping) and any(
        isinstance(v, (Mapping, list, tuple)) for v in obj.values()
    )


def flatten(tree: Any, name: str = "params") -> dict[str, Any]:
    """The leaves of ``tree`` by path, in depth-first order: ``{"[0]['Wf']": array, ...}``.

    Raises ``ValueError`` naming ``name`` for a tree with no leaf.
    """
    out: dict[str, Any] = {}

    def walk(node, path):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        else:
            out[path] = node

    walk(tree, "")
    if not out:
        raise ValueError(f"{name} holds no arrays")
    return out


def unflatten(like: Any, flat: Mapping[str, Any]) -> Any:
    """A tree of the structure of ``like`` (dicts and lists; a tuple stays a tuple) whose
    leaves are ``flat[path]``, the paths being those of :func:`flatten`."""

    def build(node, path):
        if isinstance(node, Mapping):
            return {k: build(v, f"{path}[{k!r}]") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            items = [build(v, f"{path}[{i}]") for i, v in enumerate(node)]
            return tuple(items) if isinstance(node, tuple) else items
        return flat[path]

    return build(like, "")


def same_structure(a: Any, b: Any, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless trees ``a`` and ``b`` have the same paths."""
    pa, pb = list(flatten(a, name_a)), list(flatten(b, name_b))
    if pa != pb:
        missing = [p for p in pa if p not in pb]
        extra = [p for p in pb if p not in pa]
        raise ValueError(
            f"{name_b} must have the structure of {name_a}"
            + (f"; missing {missing[:3]}" if missing else "")
            + (f"; unexpected {extra[:3]}" if extra else "")
        )
