"""Saving and loading parameters as a plain ``.npz`` archive: the notebook's dict, or a
tree of arrays such as a model's ``params``.

An archive holds one float array per parameter (all float32 or all float64) and a
``__meta__`` entry: a UTF-8 JSON object stored as a ``uint8`` byte array, with the format
name, the format version, the dtype and what the arrays are. Two layouts exist, and
:func:`load_params` reads both:

* version 1, the notebook's dict ``Wf, bf, ..., Wy, by``: one entry per key (``Wf.npy``),
  and the sizes ``n_x``, ``n_a``, ``n_y`` in the metadata, from which every shape follows.
  :func:`save_params` still writes this layout for that dict, so the files it writes for
  the notebook's parameters are those of earlier versions, and load there too.
* version 2, a tree: nested dicts with ``str`` keys and lists (or tuples) whose leaves are
  arrays, such as ``model.params`` or ``{"rnn": model.params, "head": {"Wy": ..., "by":
  ...}}``. Leaf ``i``, in depth-first order, is the entry ``i.npy``, and the metadata lists
  every leaf's path from the root (dict keys and list indices) and its shape, in that order:
  ``"leaves": [{"path": ["rnn", 0, "Wf"], "shape": [128, 231]}, ...]``. The JSON nests four
  levels at most whatever the tree; a path is at most 8 keys long and a tree has at
  most 1024 leaves.

No pickles and no object arrays are written, and none are read. :func:`load_params` reads
the archive itself instead of through ``numpy.load``: it checks the metadata (and the tree
it describes), the entry names against it, then every entry's ``.npy`` header (dtype and
shape against the metadata, byte counts against the zip directory), all before reading any
array data, and then reads exactly the bytes the headers declare. A file from an untrusted
source can neither run code nor make :func:`load_params` allocate much more memory than the
parameters it declares, which ``xlstm.io.MAX_LOAD_BYTES`` caps. A file written on one
backend loads on any other.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO

from .._lib.compat import device_scope, namespace, namespace_of_module, to_host
from .._lib.tree import flatten, is_tree, unflatten
from .._lib.typing import Array, Params
from ..notebook.params import PARAM_KEYS, check_params, param_arrays

__all__ = ["save_params", "load_params", "save_checkpoint", "load_checkpoint", "FORMAT_NAME",
           "FORMAT_VERSION", "MAX_LOAD_BYTES"]

#: Value of the ``format`` field of the metadata.
FORMAT_NAME = "xlstm-params"
#: Newest version of the layout; :func:`load_params` reads versions 1 to this one.
#: :func:`save_params` writes version 1 for the notebook's dict and version 2 for a tree;
#: :func:`save_checkpoint` writes version 3, a tree with named integer counters.
FORMAT_VERSION = 3
#: Largest total size in bytes of the parameters that :func:`load_params` accepts to read
#: (4 GiB); a file whose metadata declares more is refused before any array is read. Raise
#: it (``xlstm.io.MAX_LOAD_BYTES = ...``) to load a larger model from a trusted file.
MAX_LOAD_BYTES = 1 << 32

_META = "__meta__"
_META_FIELDS = {
    1: ("format", "version", "n_x", "n_a", "n_y", "dtype"),
    2: ("format", "version", "dtype", "leaves"),
    3: ("format", "version", "dtype", "leaves", "counters"),
}
_MAX_COUNTERS = 32  # the named integers of a checkpoint (version 3)
_MAX_COUNTER = 1 << 53  # below this a counter is exact in every JSON reader
_LEAF_FIELDS = ("path", "shape")
_MAX_LEAVES = 1024  # arrays of a tree: a 40-layer bidirectional LSTM has 960
_MAX_TREE_DEPTH = 8  # keys from a tree's root to a leaf: ["rnn", 0, "Wf"] has 3
_MAX_NDIM = 8  # dimensions of a leaf in a tree's metadata
_DTYPES = ("float32", "float64")
_MAX_META_BYTES = 1 << 17  # the JSON metadata: about 100 bytes, and 50 per leaf of a tree
_MAX_META_DEPTH = 4  # nesting of JSON arrays and objects; save_params writes at most 4
_MAX_HEADER_BYTES = 1024  # an .npy header; numpy writes 128 bytes for these arrays
_MAX_DIRECTORY_BYTES = 1 << 16  # the zip central directory; 1025 entries need about 55 KiB
_CHUNK = 1 << 20  # array data is read in pieces of at most this many bytes
_MAX_DEFLATE_RATIO = 1032  # deflate expands a stored byte into at most this many
_PROC_STATUS = "/proc/self/status"  # where Linux shows the umask without changing it
_PICKLE_WHY = "which load_params refuses: unpickling a file can run arbitrary code"
# What a damaged archive or entry can raise while it is read.
_READ_ERRORS = (
    ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, struct.error, SyntaxError,
    RecursionError, NotImplementedError,  # zipfile: a zip version or flag it does not support
)


def _name(path):
    """How error messages refer to ``path`` (a path or an open file)."""
    if isinstance(path, (str, bytes, os.PathLike)):
        return repr(os.fsdecode(path))
    return repr(getattr(path, "name", path))


def save_params(path: str | os.PathLike | BinaryIO, params: Params | list | tuple) -> None:
    """Save the notebook's parameter dict, or a tree of parameter arrays, to an ``.npz``
    archive.

    A flat dict is the notebook's dict and is written in the layout of version 1, which
    every xlstm reads: one entry per key and the sizes ``n_x``, ``n_a``, ``n_y`` in the
    metadata. Anything nested (a list, a tuple, or a dict holding one of those or a dict)
    is a tree, written in the layout of version 2: array ``i`` in depth-first order is the
    entry ``i.npy``, and the metadata lists each array's path from the root (dict keys and
    list indices, ``["rnn", 0, "Wf"]``) and shape.

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        Where to write. A path is used exactly as given (no ``.npz`` is appended) and is
        written atomically: the archive goes to a temporary file in the same folder that
        then replaces ``path``, so a crash never leaves a half-written file behind. The
        file gets the permissions ``open`` would give it: those of the file it replaces,
        or ``0o666`` less the umask for a new file.
    params : dict of arrays, or a tree of arrays
        The notebook's ``Wf, bf, Wi, bi, Wc, bc, Wo, bo, Wy, by`` (extra keys are not
        saved), or a tree: dicts with ``str`` keys and lists or tuples, none of them
        empty, nested at most 8 deep, with at most 1024 arrays, such as a model's ``params``
        or ``{"rnn": model.params, "head": {"Wy": Wy, "by": by}}``. The arrays may be in
        any supported namespace (numpy, CuPy, torch, JAX, array-api-strict), all float32
        or all float64, on one device. A tuple is loaded back as a list.

    Raises
    ------
    KeyError
        If a parameter of the notebook's dict is missing.
    TypeError, ValueError
        If the parameters are not arrays of one floating dtype, namespace and device, a
        shape of the notebook's dict is inconsistent, or a tree has a key that is not a
        ``str``, an empty dict or list, or is nested too deep or holds too many arrays;
        the message names the parameter by its path (``params['rnn'][0]['Wf']``).

    See Also
    --------
    load_params
    """
    _save(path, params, None)


def save_checkpoint(path: str | os.PathLike | BinaryIO, tree: Params | list | tuple,
                    counters: Mapping[str, int]) -> None:
    """Save a tree of arrays with named integer counters (a training run's step and
    position, say), in version 3 of the layout: :func:`~xlstm.save_params`' tree and rules, and
    the counters in the metadata.

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        Where to write, atomically for a path (see :func:`~xlstm.save_params`).
    tree : tree of arrays
        Nested dicts, lists and tuples of arrays of one floating dtype, as for
        :func:`~xlstm.save_params`.
    counters : dict of str to int
        At most 32 names of at most 64 characters, each an integer in ``[0, 2**53)``.

    See Also
    --------
    load_checkpoint
    """
    if not is_tree(tree):
        raise TypeError("tree must be nested (a dict or list holding dicts or lists of "
                        f"arrays, such as {{'params': params}}), got {type(tree).__name__}")
    _save(path, tree, counters)


def _check_counters(counters, where):
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


def _save(path, params, counters):
    """:func:`save_params`, with the counters of :func:`save_checkpoint` (or ``None``)."""
    import numpy as np

    tree = is_tree(params)
    if tree:
        leaves = _tree_leaves(params)
        arrays = {f"params{_spell(p)}": leaf for p, leaf in leaves}
    else:
        n_a, n_x, n_y = check_params(params)
        arrays = param_arrays(params)
    namespace(**arrays)
    host = [np.ascontiguousarray(to_host(a)) for a in arrays.values()]
    dtype = host[0].dtype.name
    if dtype not in _DTYPES:
        raise TypeError(f"params must be float32 or float64 to be saved, got {dtype}")
    if tree:
        meta = {
            "format": FORMAT_NAME,
            "version": 2,
            "dtype": dtype,
            "leaves": [{"path": list(p), "shape": list(a.shape)} for (p, _), a in
                       zip(leaves, host)],
        }
        if counters is not None:
            meta.update(version=3, counters=_check_counters(counters, "counters"))
        entries = {str(i): a for i, a in enumerate(host)}
    else:
        meta = {"format": FORMAT_NAME, "version": 1, "n_x": n_x, "n_a": n_a, "n_y": n_y,
                "dtype": dtype}
        entries = dict(zip(PARAM_KEYS, host))
    text = json.dumps(meta, sort_keys=True).encode("utf-8")
    if len(text) > _MAX_META_BYTES:
        raise ValueError(
            f"the description of the tree (its keys and shapes) takes {len(text)} bytes, over "
            f"the {_MAX_META_BYTES} that load_params reads; use shorter keys"
        )
    entries[_META] = np.frombuffer(text, dtype=np.uint8)

    if not isinstance(path, (str, bytes, os.PathLike)):
        np.savez(path, **entries)
        return
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=".xlstm-", suffix=".npz.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **entries)
            if os.chmod in os.supports_fd:
                os.chmod(f.fileno(), mode)
        if os.chmod not in os.supports_fd:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _spell(path):
    """A tree path as Python spells the indexing, as :func:`xlstm._lib.tree.flatten` keys it."""
    return "".join(f"[{c!r}]" for c in path)


def _tree_leaves(tree):
    """``[(path, leaf), ...]`` of a tree to save, in depth-first order, after checking what
    version 2 can hold: ``str`` keys, no empty dict or list, the depth and the leaf count."""
    out = []

    def walk(node, path):
        if isinstance(node, (Mapping, list, tuple)):
            where = f"params{_spell(path)}"
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
            if len(out) == _MAX_LEAVES:
                raise ValueError(f"params holds more than the {_MAX_LEAVES} arrays a saved tree "
                                 "may have")
            out.append((path, node))

    walk(tree, ())
    return out


def _mode_for(path):
    """The permission bits ``open(path, "wb")`` would leave ``path`` with.

    ``open`` keeps an existing file's mode when it truncates it and creates a new one with
    ``0o666`` less the umask; the temporary file that replaces ``path`` gets the same.
    """
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except OSError:
        return 0o666 & ~_umask()


def _umask():
    """The process umask, read without changing it where the system allows."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it and restore it
    os.umask(mask)
    return mask


def load_params(
    path: str | os.PathLike | BinaryIO, *, xp: Any = None, device: Any = None
) -> dict[str, Array] | list:
    """Load the parameters written by :func:`save_params`: the notebook's dict or a tree.

    The archive is read as untrusted data. Before any array data is read, every check is
    made: the file is a zip archive of ``.npy`` entries with unique names, among them a
    ``__meta__`` entry; the metadata (a small JSON object, nested four levels at most)
    names the format, a known version and the dtype, and either the sizes of the
    notebook's dict (version 1) or the path and shape of every leaf of a tree (version 2),
    whose structure is checked strictly: paths at most 8 keys long, at most 1024 leaves,
    dict keys that are strings, list indices ``0`` to ``n - 1``, no path twice nor both a
    leaf and a branch, leaves listed in depth-first order; the entries are exactly the
    ``__meta__`` entry and the parameters the metadata describes; the parameters it
    declares fit in ``xlstm.io.MAX_LOAD_BYTES``; and each entry's ``.npy`` header gives the
    recorded dtype (float32 or float64, never an object array or pickled data) and the
    recorded shape, with a byte count equal to the one in the zip directory. Then exactly
    those bytes are read, in bounded pieces, so a damaged or crafted file is refused with a
    clear message while using little more memory than the parameters it declares.

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        The archive to read: a regular file. A file object must be open for binary
        reading and seekable.
    xp : namespace, optional
        Target array namespace (``numpy``, ``cupy``, ``torch``, ``jax.numpy``,
        ``array_api_strict`` or their array-api-compat wrappers). Default: numpy.
    device : device, optional
        Target device in ``xp``. Default: the namespace's default device.

    Returns
    -------
    dict or list
        The notebook's ``Wf, bf, Wi, bi, Wc, bc, Wo, bo, Wy, by``, or the saved tree
        (dicts and lists; a saved tuple comes back as a list), its arrays in ``xp`` on
        ``device``, with the saved dtype, in native byte order, independent of each other
        and of the file.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    KeyError
        If a parameter is missing from the archive; the message names it and the path.
    ValueError
        If ``path`` (or the file object's descriptor) is not a regular file: a directory,
        a FIFO, a device such as ``/dev/zero``, which is refused before it is read (a FIFO
        without waiting for a writer); if the file is not a readable ``.npz`` archive (not a
        zip archive at all, a bare
        ``.npy`` array, a pickle, corrupt or truncated), has duplicate, unknown or
        non-``.npy`` entries, holds pickled data or an object array, its metadata is
        missing, malformed, oversized or too deeply nested, describes a tree that breaks
        the rules above, or declares parameters larger than ``xlstm.io.MAX_LOAD_BYTES``,
        or an entry's dtype, shape or size disagrees with the metadata or the zip
        directory; the message names the problem and the path.
    TypeError
        If ``xp`` cannot hold the saved dtype (for example float64 in JAX without
        ``jax_enable_x64``), or a file object is open in text mode.

    See Also
    --------
    save_params
    """
    return _load(path, xp, device)[0]


def load_checkpoint(path: str | os.PathLike | BinaryIO, *, xp: Any = None, device: Any = None,
                    ) -> tuple[dict | list, dict[str, int]]:
    """Load what :func:`save_checkpoint` wrote: the tree and its counters.

    The archive is read and checked as by :func:`~xlstm.load_params` (which also reads it, and
    returns the tree alone); the counters must be a JSON object of at most 32 names to
    integers in ``[0, 2**53)``.

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        The checkpoint to read.
    xp, device : optional
        Target namespace and device, as for :func:`~xlstm.load_params`.

    Returns
    -------
    tree : dict or list
        The saved tree (a saved tuple comes back as a list).
    counters : dict of str to int
        The saved counters.

    Raises
    ------
    ValueError
        If the file is not a checkpoint (a parameter file of version 1 or 2), or for
        any reason :func:`~xlstm.load_params` gives.
    """
    tree, meta = _load(path, xp, device)
    if meta["version"] != 3:
        raise ValueError(f"{_name(path)}: not a checkpoint (format version {meta['version']} "
                         "holds parameters without counters; save_checkpoint writes 3)")
    return tree, meta["counters"]


def _load(path, xp, device):
    """The tree (or the notebook's dict) and the metadata of the archive at ``path``."""
    where = _name(path)
    target = namespace_of_module(xp)
    if isinstance(path, (str, bytes, os.PathLike)):
        with _open_regular(path, where) as f:
            meta, layout, host = _read_archive(f, where)
    else:
        _check_file_object(path, where)
        meta, layout, host = _read_archive(path, where)

    dtype = getattr(target, meta["dtype"])
    out = {}
    with device_scope(xp=target, device=device):
        for key, arr in host.items():
            arr = target.asarray(arr, dtype=dtype, device=device)
            if arr.dtype != dtype:
                raise TypeError(
                    f"{where}: the target namespace turned {meta['dtype']} into {arr.dtype}"
                )
            out[key] = arr
    if layout.tree is None:
        return out, meta
    tree = unflatten(layout.tree, {p: out[key] for p, key in flatten(layout.tree).items()})
    return tree, meta


def _open_regular(path: str | bytes | os.PathLike, where: str | None = None) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file.

    The kind of file is checked before it is opened (``os.stat``: a directory, a FIFO, a
    device such as ``/dev/zero`` or ``/dev/urandom``, a socket is refused), and again on
    the open descriptor (``os.fstat``), which is opened without waiting for a writer
    (``O_NONBLOCK``): a FIFO swapped in between the two checks neither hangs the call nor
    is read. A regular file has a size, which bounds every read of it.

    Parameters
    ----------
    path : str, bytes or os.PathLike
        The file to open.
    where : str, optional
        How messages name the file (default: the path, quoted).

    Returns
    -------
    binary file object
        Open for reading, positioned at the start; the caller closes it.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not a regular file; the message says what it is.
    """
    where = _name(path) if where is None else where
    _check_regular(os.stat(path).st_mode, where)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        _check_regular(os.fstat(fd).st_mode, where)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


#: What a file that is not a regular one is, by its ``stat`` mode.
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _check_regular(mode, where):
    """Refuse a file whose ``stat`` mode is not a regular file's, naming what it is."""
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    raise ValueError(f"{where}: is {kind}; only regular files are read (a file of "
                     "unbounded or unknown size could exhaust memory or block forever)")


def _check_file_object(f, where):
    """Refuse a file object in text mode, or one over a descriptor that is not a regular
    file (``open('/dev/zero', 'rb')``, a pipe); an in-memory one (``io.BytesIO``) passes."""
    if isinstance(f, io.TextIOBase):
        raise TypeError(f"path {where} must be opened in binary mode ('rb'), not text mode")
    try:
        fd = f.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: no descriptor
        return
    if isinstance(fd, int):
        _check_regular(os.fstat(fd).st_mode, where)


class _Layout(collections.namedtuple("_Layout", "entries tree sizes")):
    """What the metadata says the archive holds.

    ``entries`` maps each parameter's entry name (without ``.npy``) to ``(label, shape)``,
    the label naming it in messages; ``tree`` is the saved tree with entry names as
    leaves (None for the notebook's dict); ``sizes`` says where the shapes come from.
    """


def _not_readable(where, why):
    return ValueError(f"{where}: not a readable xlstm .npz parameter file: {why}")


def _read_archive(f, where):
    """The metadata, its layout and the checked parameter arrays (numpy, by entry name) of
    the archive in file ``f``."""
    import numpy as np

    with _open_zip(f, where) as (zf, size):
        infos = _check_entries(zf, where, size)
        meta = _read_meta(zf, infos[_META], where)
        layout = _layout(meta, where)
        _check_entry_names(infos, layout, where)
        itemsize = np.dtype(meta["dtype"]).itemsize
        total = itemsize * sum(math.prod(shape) for _, shape in layout.entries.values())
        if total > MAX_LOAD_BYTES:
            raise ValueError(
                f"{where}: the metadata declares {total} bytes of parameters ({layout.sizes}, "
                f"{meta['dtype']}), more than xlstm.io.MAX_LOAD_BYTES = {MAX_LOAD_BYTES}; "
                "raise that limit to load a larger model from a trusted file"
            )
        with contextlib.ExitStack() as stack:
            members, headers = {}, {}
            for k, (label, _) in layout.entries.items():
                members[k] = stack.enter_context(_open_entry(zf, infos[k], label, where))
                headers[k] = _read_header(members[k], label, where)
            _check_headers(headers, infos, layout, meta, where)
            host = {}
            for k, (label, _) in layout.entries.items():
                shape, fortran_order, dt, _ = headers[k]
                data = _read_data(members[k], math.prod(shape) * dt.itemsize, label, where)
                order = "F" if fortran_order else "C"
                arr = np.frombuffer(data, dtype=dt).reshape(shape, order=order)
                if not dt.isnative:
                    arr = arr.astype(dt.newbyteorder("="))
                host[k] = arr
    return meta, layout, host


@contextlib.contextmanager
def _open_zip(f, where):
    """``(zf, size)``: ``f`` opened as a zip archive, after ruling out other kinds of file by
    their start, and the bytes from its position to its end."""
    try:
        start = f.tell()
        head = f.read(8)
        f.seek(start)
    except UnicodeDecodeError:  # a text-mode reader that is no io.TextIOBase
        raise TypeError(f"path {where} must be opened in binary mode ('rb'), not text mode"
                        ) from None
    except (OSError, ValueError, AttributeError) as exc:
        raise _not_readable(where, f"cannot read or seek the file ({_why(exc)})") from None
    if isinstance(head, str):
        raise TypeError(f"path {where} must be opened in binary mode ('rb'), not text mode")
    head = bytes(head)
    if not head:
        raise _not_readable(where, "the file is empty")
    if head.startswith(b"\x93NUMPY"):
        raise _bare_npy(f, where)
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2 to 5
        raise _not_readable(where, f"it is a Python pickle, {_PICKLE_WHY}")
    if head.startswith(b"PK"):
        _check_directory_size(f, start, where)
    try:
        size = f.seek(0, os.SEEK_END) - start
        f.seek(start)
    except (OSError, ValueError) as exc:
        raise _not_readable(where, f"cannot read or seek the file ({_why(exc)})") from None
    try:
        zf = zipfile.ZipFile(f)
    except _READ_ERRORS as exc:
        if head.startswith(b"PK"):
            why = f"a damaged, truncated or unsupported zip archive ({_why(exc)})"
            raise _not_readable(where, why) from None
        raise _not_readable(where, "it is not a zip archive, so not an .npz") from None
    with zf:
        yield zf, size


def _check_directory_size(f, start, where):
    """Refuse a zip whose end record declares a central directory far larger than needed.

    ``zipfile`` reads the whole directory into memory at once; this bounds it by what a
    parameter file needs rather than by the file size. Archives whose end record defers to
    the zip64 record, or that have no end record, are left to ``zipfile``.
    """
    try:
        end = f.seek(0, os.SEEK_END)
        f.seek(max(start, end - (1 << 16) - 22))
        tail = f.read()
        f.seek(start)
    except (OSError, ValueError) as exc:
        raise _not_readable(where, f"cannot read or seek the file ({_why(exc)})") from None
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return
    entries, size = struct.unpack("<HI", tail[at + 10 : at + 16])
    if size != 0xFFFFFFFF and size > _MAX_DIRECTORY_BYTES:
        raise ValueError(
            f"{where}: the zip directory declares {entries} entries in {size} bytes, over the "
            f"{_MAX_DIRECTORY_BYTES} bytes read; a parameter file has at most "
            f"{_MAX_LEAVES + 1} entries"
        )


def _bare_npy(f, where):
    """The error for a file that is one ``.npy`` array rather than an archive."""
    what = "a single .npy array"
    with contextlib.suppress(*_READ_ERRORS):
        _, _, dtype, _ = _read_header(f, "'the array'", where, allow_object=True)
        if dtype.hasobject:
            what = f"a single .npy object array (pickled data, {_PICKLE_WHY})"
    return ValueError(f"{where}: holds {what}, not an .npz parameter archive")


def _check_entries(zf, where, size):
    """The zip entries by name without ``.npy``, after checking their names, compression,
    encryption and sizes, and that the metadata is among them.

    Every read is bounded by the file's ``size``: an entry's stored bytes fit in the file,
    a stored entry is as long as its stored bytes, and a deflated one at most
    ``_MAX_DEFLATE_RATIO`` times them (deflate's limit).
    """
    infos = zf.infolist()
    names = [info.filename for info in infos]
    not_npy = [n for n in names if not n.endswith(".npy")]
    if not_npy:
        raise ValueError(
            f"{where}: entry {not_npy[0]!r} is not an .npy array; a parameter file holds "
            f"only .npy entries"
        )
    twice = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if twice:
        raise ValueError(f"{where}: duplicate entries {twice}; each entry must appear once")
    by_key = {info.filename[: -len(".npy")]: info for info in infos}
    if _META not in by_key:
        raise ValueError(f"{where}: has no {_META} entry; it was not written by xlstm.save_params")
    for key, info in by_key.items():
        if info.flag_bits & 0x1:
            raise ValueError(f"{where}: entry {key!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ValueError(
                f"{where}: entry {key!r} uses zip compression method {info.compress_type}; "
                "only stored and deflated entries are read"
            )
        stored = info.compress_type == zipfile.ZIP_STORED
        most = info.compress_size if stored else _MAX_DEFLATE_RATIO * (info.compress_size + 1)
        if info.compress_size > size or info.file_size > most:
            raise _not_readable(
                where, f"entry {key!r} declares {info.file_size} bytes stored in "
                f"{info.compress_size}, which a file of {size} bytes cannot hold "
                "(damaged or crafted)")
    return by_key


def _check_entry_names(infos, layout, where):
    """The entries must be exactly the metadata's and the parameters it describes."""
    missing = [k for k in layout.entries if k not in infos]
    if missing:
        label = layout.entries[missing[0]][0]
        raise KeyError(f"{where}: parameter {label} is missing from the file")
    extra = sorted(set(infos) - set(layout.entries) - {_META})
    if extra:
        hint = "" if layout.tree is None else (
            f"; the metadata describes {len(layout.entries)} leaves, entries '0' to "
            f"'{len(layout.entries) - 1}'"
        )
        raise ValueError(f"{where}: unexpected entries {extra[:8]} in a parameter file{hint}")


@contextlib.contextmanager
def _open_entry(zf, info, label, where):
    try:
        member = zf.open(info)
    except (*_READ_ERRORS, RuntimeError) as exc:  # RuntimeError: an encrypted entry
        raise ValueError(f"{where}: cannot read entry {label} ({_why(exc)})") from None
    with member:
        yield member


def _read_header(member, label, where, *, allow_object=False):
    """``(shape, fortran_order, dtype, header_bytes)`` of the ``.npy`` stream ``member``
    (``label`` names it in messages).

    Reads only the header, whose size is capped. Object arrays are refused unless
    ``allow_object`` (for an error message that says what the file holds).
    """
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(member)
        if version == (1, 0):
            shape, fortran_order, dtype = npy.read_array_header_1_0(
                member, max_header_size=_MAX_HEADER_BYTES
            )
        elif version == (2, 0):
            shape, fortran_order, dtype = npy.read_array_header_2_0(
                member, max_header_size=_MAX_HEADER_BYTES
            )
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        header_bytes = member.tell()
    except _READ_ERRORS as exc:
        raise ValueError(f"{where}: cannot read entry {label} ({_why(exc)})") from None
    if dtype.hasobject and not allow_object:
        raise ValueError(f"{where}: entry {label} is an object array (pickled data), {_PICKLE_WHY}")
    return shape, fortran_order, dtype, header_bytes


def _check_size(info, header_bytes, data_bytes, label, where):
    """The zip directory must declare exactly the bytes that the ``.npy`` header implies."""
    if info.file_size != header_bytes + data_bytes:
        raise ValueError(
            f"{where}: entry {label} is {info.file_size} bytes according to the zip directory, "
            f"but its .npy header declares {header_bytes} + {data_bytes} bytes"
        )


def _read_data(member, n, label, where):
    """Exactly ``n`` bytes from ``member`` into a new ``bytearray``, read in bounded pieces.

    Memory grows with the data actually present, whatever the headers claim; the entry
    must end right there, and its CRC is checked.
    """
    data = bytearray()
    try:
        while len(data) < n:
            piece = member.read(min(_CHUNK, n - len(data)))
            if not piece:
                break
            data += piece
        more = member.read(1)
    except _READ_ERRORS as exc:
        raise ValueError(f"{where}: cannot read entry {label} ({_why(exc)})") from None
    if len(data) < n:
        raise ValueError(f"{where}: entry {label} is truncated: {len(data)} of {n} data bytes")
    if more:
        raise ValueError(f"{where}: entry {label} holds more data than its header declares")
    return data


def _read_meta(zf, info, where):
    """The metadata: read with a size cap, parsed, and its common fields checked (the
    rest is :func:`_layout`'s)."""
    import numpy as np

    label = repr(_META)
    with _open_entry(zf, info, label, where) as member:
        shape, _, dtype, header_bytes = _read_header(member, label, where)
        if dtype != np.uint8 or len(shape) != 1:
            raise ValueError(
                f"{where}: {_META} must be a 1-D uint8 byte array, got dtype {dtype} and "
                f"shape {shape}"
            )
        if shape[0] > _MAX_META_BYTES:
            raise ValueError(
                f"{where}: {_META} is {shape[0]} bytes; metadata over {_MAX_META_BYTES} bytes "
                "is refused (save_params writes about 100, and 50 more per array of a tree)"
            )
        _check_size(info, header_bytes, shape[0], label, where)
        raw = bytes(_read_data(member, shape[0], label, where))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: {_META} is not valid UTF-8 JSON ({exc})") from None
    depth = _json_depth(text)
    if depth > _MAX_META_DEPTH:
        raise ValueError(
            f"{where}: {_META} is nested {depth} levels deep; the metadata is a JSON object "
            f"nested {_MAX_META_DEPTH} levels at most, and deeper nesting is refused"
        )
    try:
        meta = json.loads(text, object_pairs_hook=_no_duplicate_fields)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{where}: {_META} is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: {_META} must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{where}: not an xlstm parameter file ({_META} format is {meta.get('format')!r}, "
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
            f"{where}: {_META} has unknown fields {unknown[:8]}; version {version} has exactly "
            f"{list(_META_FIELDS[version])}"
        )
    if version == 3:
        meta["counters"] = _check_counters(meta.get("counters"), f"{where}: {_META} counters")
    if meta.get("dtype") not in _DTYPES:
        raise ValueError(
            f"{where}: {_META} field 'dtype' must be one of {_DTYPES}, got {meta.get('dtype')!r}"
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


def _layout(meta, where):
    """The parameters the metadata describes, checked: the notebook's sizes (version 1) or
    the tree's leaves (version 2)."""
    if meta["version"] == 1:
        for k in ("n_x", "n_a", "n_y"):
            v = meta.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {_META} field {k!r} must be a positive int, got {v!r}")
        n_x, n_a, n_y = meta["n_x"], meta["n_a"], meta["n_y"]
        shapes = {}
        for g in "fico":
            shapes["W" + g] = (n_a, n_a + n_x)
            shapes["b" + g] = (n_a, 1)
        shapes["Wy"] = (n_y, n_a)
        shapes["by"] = (n_y, 1)
        entries = {k: (repr(k), shapes[k]) for k in PARAM_KEYS}
        return _Layout(entries, None, f"n_x={n_x}, n_a={n_a}, n_y={n_y}")

    leaves = meta.get("leaves")
    if not isinstance(leaves, list) or not 1 <= len(leaves) <= _MAX_LEAVES:
        got = f"a list of {len(leaves)}" if isinstance(leaves, list) else _short(leaves)
        raise ValueError(
            f"{where}: {_META} field 'leaves' must be a list of 1 to {_MAX_LEAVES} leaves, "
            f"got {got}"
        )
    paths, shapes = [], []
    for i, leaf in enumerate(leaves):
        what = f"{_META} leaf {i}"
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
                f"{where}: {what} (params{_spell(path)}) has the shape {_short(shape)}; a "
                f"shape is a list of at most {_MAX_NDIM} integers >= 0"
            )
        paths.append(tuple(path))
        shapes.append(tuple(shape))
    tree = _build_tree(paths, where)
    entries = {
        str(i): (f"'{i}' (params{_spell(p)})", shape)
        for i, (p, shape) in enumerate(zip(paths, shapes))
    }
    return _Layout(entries, tree, f"{len(paths)} arrays")


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
                        f"{where}: {_META} leaf {i} repeats the path params{_spell(path)} of "
                        f"leaf {child}; each leaf has its own path"
                    )
                if child is not None:
                    raise ValueError(
                        f"{where}: {_META} leaf {i} is at params{_spell(path)}, a branch of "
                        "other leaves; a path is either a leaf or a branch"
                    )
                node[c] = str(i)
            elif isinstance(child, str):
                raise ValueError(
                    f"{where}: {_META} leaf {i} (params{_spell(path)}) goes through "
                    f"params{_spell(path[: depth + 1])}, which is leaf {child}; a path is "
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
                    f"{where}: {_META} describes params{_spell(path)} as a list with the "
                    f"indices {_short(sorted(keys))}; a list's indices are 0 to n - 1"
                )
            items = [(k, node[k]) for k in range(len(keys))]
            container = list
        else:
            raise ValueError(
                f"{where}: {_META} gives params{_spell(path)} both string keys and integer "
                "indices; a branch is a dict (string keys) or a list (indices)"
            )
        built = [(k, v if isinstance(v, str) else build(v, (*path, k))) for k, v in items]
        return dict(built) if container is dict else [v for _, v in built]

    tree = build(root, ())
    order = list(flatten(tree).values())
    if order != [str(i) for i in range(len(paths))]:
        first = next(i for i, k in enumerate(order) if k != str(i))
        raise ValueError(
            f"{where}: {_META} lists the leaves out of depth-first order: place {first} of "
            f"the tree holds leaf {order[first]}; save_params lists them in that order"
        )
    return tree


def _check_headers(headers, infos, layout, meta, where):
    """Every parameter's header against the metadata and the zip directory (no data read)."""
    for k, (_, _, dtype, _) in headers.items():
        if dtype.kind != "f" or dtype.itemsize not in (4, 8):
            label = layout.entries[k][0]
            raise ValueError(f"{where}: {label} has dtype {dtype}; expected float32 or float64")
    dtypes = {dtype.name for _, _, dtype, _ in headers.values()}
    if dtypes != {meta["dtype"]}:
        raise ValueError(
            f"{where}: arrays have dtypes {sorted(dtypes)} but the metadata says "
            f"{meta['dtype']!r}; all parameters must share the recorded dtype"
        )
    source = " records" if layout.tree is not None else f"'s sizes ({layout.sizes}) make it"
    for k, (shape, _, dtype, header_bytes) in headers.items():
        label, want = layout.entries[k]
        if shape != want:
            raise ValueError(
                f"{where}: {label} has shape {shape}, but the metadata{source} {want}"
            )
        _check_size(infos[k], header_bytes, math.prod(shape) * dtype.itemsize, label, where)


def _why(exc):
    """A short reason for a read error."""
    text = str(exc.args[0]) if exc.args else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
