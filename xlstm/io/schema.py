"""The metadata of a parameter file: its fields in each format version, the rules of a saved
tree, and the layout of entries, names and shapes it describes.

Nothing here reads a file: :mod:`xlstm.io.archive` reads the metadata's bytes (bounded)
and hands them to :func:`parse_meta`; :func:`layout_of` turns the checked metadata into the
entries the archive must hold.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping

from .._lib.tree import flatten
from ..notebook.params import PARAM_KEYS

#: Value of the ``format`` field of the metadata.
FORMAT_NAME = "xlstm-params"
#: Newest version of the layout; :func:`load_params` reads versions 1 to this one.
#: :func:`save_params` writes version 1 for the notebook's dict and version 2 for a tree;
#: :func:`save_checkpoint` writes version 3, a tree with named integer counters.
FORMAT_VERSION = 3

META = "__meta__"
_META_FIELDS = {
    1: ("format", "version", "n_x", "n_a", "n_y", "dtype"),
    2: ("format", "version", "dtype", "leaves"),
    3: ("format", "version", "dtype", "leaves", "counters"),
}
_MAX_COUNTERS = 32  # the named integers of a checkpoint (version 3)
_MAX_COUNTER = 1 << 53  # below this a counter is exact in every JSON reader
_LEAF_FIELDS = ("path", "shape")
MAX_LEAVES = 1024  # arrays of a tree: a 40-layer bidirectional LSTM has 960
_MAX_TREE_DEPTH = 8  # keys from a tree's root to a leaf: ["rnn", 0, "Wf"] has 3
_MAX_NDIM = 8  # dimensions of a leaf in a tree's metadata
DTYPES = ("float32", "float64")
MAX_META_BYTES = 1 << 17  # the JSON metadata: about 100 bytes, and 50 per leaf of a tree
_MAX_META_DEPTH = 4  # nesting of JSON arrays and objects; save_params writes at most 4


class Layout(collections.namedtuple("Layout", "entries tree sizes")):
    """What the metadata says the archive holds.

    ``entries`` maps each parameter's entry name (without ``.npy``) to ``(label, shape)``,
    the label naming it in messages; ``tree`` is the saved tree with entry names as
    leaves (None for the notebook's dict); ``sizes`` says where the shapes come from.
    """


def check_counters(counters, where):
    """``counters`` checked: a dict of at most 32 short names to exact integers >= 0."""
    if not isinstance(counters, Mapping) or len(counters) > _MAX_COUNTERS:
        raise ValueError(f"{where} must be a dict of at most {_MAX_COUNTERS} named integers, "
                         f"got {_short(counters)}")
    out = {}
    for k, v in counters.items():
        if not isinstance(k, str) or not 1 <= len(k) <= 64:
            raise ValueError(f"{where}: a counter's name must be a str of 1 to 64 characters, "
                             f"got {_short(k)}")
        if not isinstance(v, bool) and hasattr(v, "__index__"):
            v = v.__index__()  # a 0-d integer array (a compiled step's count) too
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < _MAX_COUNTER:
            raise ValueError(f"{where}[{k!r}] must be an integer in [0, 2**53), got {_short(v)}")
        out[k] = v
    return out


def spell(path):
    """A tree path as Python spells the indexing, as :func:`xlstm._lib.tree.flatten` keys it."""
    return "".join(f"[{c!r}]" for c in path)


def tree_leaves(tree):
    """``[(path, leaf), ...]`` of a tree to save, in depth-first order, after checking what
    version 2 can hold: ``str`` keys, no empty dict or list, the depth and the leaf count."""
    out = []

    def walk(node, path):
        if isinstance(node, (Mapping, list, tuple)):
            where = f"params{spell(path)}"
            if len(path) >= _MAX_TREE_DEPTH:
                raise ValueError(
                    f"{where} nests deeper than the {_MAX_TREE_DEPTH} levels a saved tree may have"
                )
            if not node:
                raise ValueError(f"{where} is empty; a saved tree holds no empty dict or list")
            items = node.items() if isinstance(node, Mapping) else enumerate(node)
            for k, v in items:
                if isinstance(node, Mapping) and not isinstance(k, str):
                    raise TypeError(
                        f"{where} has the key {k!r} ({type(k).__name__}); the dicts of a saved "
                        "tree have str keys"
                    )
                walk(v, (*path, k))
        else:
            if len(out) == MAX_LEAVES:
                raise ValueError(f"params holds more than the {MAX_LEAVES} arrays a saved tree "
                                 "may have")
            out.append((path, node))

    walk(tree, ())
    return out


def parse_meta(raw: bytes, where: str) -> dict:
    """The metadata from its bytes ``raw`` (read with a size cap): parsed, and its common
    fields checked (the rest is :func:`layout_of`'s)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: {META} is not valid UTF-8 JSON ({exc})") from None
    depth = _json_depth(text)
    if depth > _MAX_META_DEPTH:
        raise ValueError(
            f"{where}: {META} is nested {depth} levels deep; the metadata is a JSON object "
            f"nested {_MAX_META_DEPTH} levels at most, and deeper nesting is refused"
        )
    try:
        meta = json.loads(text, object_pairs_hook=_no_duplicate_fields)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{where}: {META} is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: {META} must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{where}: not an xlstm parameter file ({META} format is {meta.get('format')!r}, "
            f"expected {FORMAT_NAME!r})"
        )
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not (
        1 <= version <= FORMAT_VERSION
    ):
        raise ValueError(
            f"{where}: unknown format version {version!r}; this xlstm reads versions 1 to "
            f"{FORMAT_VERSION} (a newer xlstm may have written it)"
        )
    unknown = sorted(set(meta) - set(_META_FIELDS[version]))
    if unknown:
        raise ValueError(
            f"{where}: {META} has unknown fields {unknown[:8]}; version {version} has exactly "
            f"{list(_META_FIELDS[version])}"
        )
    if version == 3:
        meta["counters"] = check_counters(meta.get("counters"), f"{where}: {META} counters")
    if meta.get("dtype") not in DTYPES:
        raise ValueError(
            f"{where}: {META} field 'dtype' must be one of {DTYPES}, got {meta.get('dtype')!r}"
        )
    return meta


def _no_duplicate_fields(pairs):
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"duplicate fields {twice}")
    return dict(pairs)


def _json_depth(text):
    """How deeply JSON arrays and objects nest in ``text`` (brackets in strings ignored)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def layout_of(meta, where):
    """The parameters the metadata describes, checked: the notebook's sizes (version 1) or
    the tree's leaves (version 2)."""
    if meta["version"] == 1:
        for k in ("n_x", "n_a", "n_y"):
            v = meta.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {META} field {k!r} must be a positive int, got {v!r}")
        n_x, n_a, n_y = meta["n_x"], meta["n_a"], meta["n_y"]
        shapes = {}
        for g in "fico":
            shapes["W" + g] = (n_a, n_a + n_x)
            shapes["b" + g] = (n_a, 1)
        shapes["Wy"] = (n_y, n_a)
        shapes["by"] = (n_y, 1)
        entries = {k: (repr(k), shapes[k]) for k in PARAM_KEYS}
        return Layout(entries, None, f"n_x={n_x}, n_a={n_a}, n_y={n_y}")

    leaves = meta.get("leaves")
    if not isinstance(leaves, list) or not 1 <= len(leaves) <= MAX_LEAVES:
        got = f"a list of {len(leaves)}" if isinstance(leaves, list) else _short(leaves)
        raise ValueError(
            f"{where}: {META} field 'leaves' must be a list of 1 to {MAX_LEAVES} leaves, "
            f"got {got}"
        )
    paths, shapes = [], []
    for i, leaf in enumerate(leaves):
        what = f"{META} leaf {i}"
        if not isinstance(leaf, dict) or sorted(leaf) != sorted(_LEAF_FIELDS):
            raise ValueError(
                f"{where}: {what} must be an object with exactly the fields "
                f"{list(_LEAF_FIELDS)}, got {_short(leaf)}"
            )
        path, shape = leaf["path"], leaf["shape"]
        if not isinstance(path, list) or not 1 <= len(path) <= _MAX_TREE_DEPTH or not all(
            isinstance(c, str) or _is_count(c) for c in path
        ):
            raise ValueError(
                f"{where}: {what} has the path {_short(path)}; a path is a list of 1 to "
                f"{_MAX_TREE_DEPTH} dict keys (strings) and list indices (integers >= 0)"
            )
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(
            _is_count(n) for n in shape
        ):
            raise ValueError(
                f"{where}: {what} (params{spell(path)}) has the shape {_short(shape)}; a "
                f"shape is a list of at most {_MAX_NDIM} integers >= 0"
            )
        paths.append(tuple(path))
        shapes.append(tuple(shape))
    tree = _build_tree(paths, where)
    entries = {
        str(i): (f"'{i}' (params{spell(p)})", shape)
        for i, (p, shape) in enumerate(zip(paths, shapes))
    }
    return Layout(entries, tree, f"{len(paths)} arrays")


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _short(obj, limit=80):
    """``repr(obj)``, cut to ``limit`` characters for a message."""
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _build_tree(paths, where):
    """The tree the leaf paths describe, with entry names (``"0"``, ``"1"``, ...) as
    leaves, checked strictly: no path twice or both a leaf and a branch, each dict's keys
    strings, each list's indices ``0`` to ``n - 1``, leaves in depth-first order."""
    root = {}
    for i, path in enumerate(paths):
        node = root
        for depth, c in enumerate(path):
            child = node.get(c)
            if depth == len(path) - 1:
                if isinstance(child, str):
                    raise ValueError(
                        f"{where}: {META} leaf {i} repeats the path params{spell(path)} of "
                        f"leaf {child}; each leaf has its own path"
                    )
                if child is not None:
                    raise ValueError(
                        f"{where}: {META} leaf {i} is at params{spell(path)}, a branch of "
                        "other leaves; a path is either a leaf or a branch"
                    )
                node[c] = str(i)
            elif isinstance(child, str):
                raise ValueError(
                    f"{where}: {META} leaf {i} (params{spell(path)}) goes through "
                    f"params{spell(path[: depth + 1])}, which is leaf {child}; a path is "
                    "either a leaf or a branch"
                )
            else:
                node = node.setdefault(c, {})

    def build(node, path):
        keys = list(node)
        if all(isinstance(k, str) for k in keys):
            items = [(k, node[k]) for k in keys]
            container = dict
        elif all(isinstance(k, int) for k in keys):
            if sorted(keys) != list(range(len(keys))):
                raise ValueError(
                    f"{where}: {META} describes params{spell(path)} as a list with the "
                    f"indices {_short(sorted(keys))}; a list's indices are 0 to n - 1"
                )
            items = [(k, node[k]) for k in range(len(keys))]
            container = list
        else:
            raise ValueError(
                f"{where}: {META} gives params{spell(path)} both string keys and integer "
                "indices; a branch is a dict (string keys) or a list (indices)"
            )
        built = [(k, v if isinstance(v, str) else build(v, (*path, k))) for k, v in items]
        return dict(built) if container is dict else [v for _, v in built]

    tree = build(root, ())
    order = list(flatten(tree).values())
    if order != [str(i) for i in range(len(paths))]:
        first = next(i for i, k in enumerate(order) if k != str(i))
        raise ValueError(
            f"{where}: {META} lists the leaves out of depth-first order: place {first} of "
            f"the tree holds leaf {order[first]}; save_params lists them in that order"
        )
    return tree


def check_entry_names(infos, layout, where):
    """The entries must be exactly the metadata's and the parameters it describes."""
    missing = [k for k in layout.entries if k not in infos]
    if missing:
        label = layout.entries[missing[0]][0]
        raise KeyError(f"{where}: parameter {label} is missing from the file")
    extra = sorted(set(infos) - set(layout.entries) - {META})
    if extra:
        hint = "" if layout.tree is None else (
            f"; the metadata describes {len(layout.entries)} leaves, entries '0' to "
            f"'{len(layout.entries) - 1}'"
        )
        raise ValueError(f"{where}: unexpected entries {extra[:8]} in a parameter file{hint}")
