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

The reader is :mod:`xlstm.io.archive`; the metadata's fields, versions and tree rules are
:mod:`xlstm.io.schema`'s.

A whole model (its class, configuration and parameters) is saved by :func:`save` and
loaded by :func:`load`, in a safetensors file (:mod:`xlstm.io.safetensors`, read with the
same care; the model file's rules are :mod:`xlstm.io.models`').
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Mapping
from typing import Any, BinaryIO

from .._lib.compat import device_scope, namespace, namespace_of_module, to_host
from .._lib.files import check_file_object, describe, open_regular
from .._lib.tree import flatten, is_tree, unflatten
from .._lib.typing import Params
from ..notebook.params import PARAM_KEYS, check_params, param_arrays
from . import safetensors
from .archive import read_archive
from .models import build, check_file, file_contents
from .schema import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_META_BYTES,
    META,
    check_counters,
    spell,
    tree_leaves,
)

__all__ = ["save", "load", "save_params", "load_params", "save_checkpoint", "load_checkpoint",
           "FORMAT_NAME", "FORMAT_VERSION", "MAX_LOAD_BYTES"]

#: Largest total size in bytes of the parameters that :func:`load_params` accepts to read
#: (4 GiB); a file whose metadata declares more is refused before any array is read. Raise
#: it (``xlstm.io.MAX_LOAD_BYTES = ...``) to load a larger model from a trusted file.
MAX_LOAD_BYTES = 1 << 32

_PROC_STATUS = "/proc/self/status"  # where Linux shows the umask without changing it


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

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import xlstm
    >>> params = xlstm.init_params(3, 5, 2, seed=0)  # the notebook's dict, float64
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "params.npz")
    ...     xlstm.save_params(path, params)
    ...     back = xlstm.load_params(path)
    >>> sorted(back) == sorted(params), all(np.array_equal(back[k], params[k]) for k in params)
    (True, True)
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


def _save(path, params, counters):
    """:func:`save_params`, with the counters of :func:`save_checkpoint` (or ``None``)."""
    import numpy as np

    tree = is_tree(params)
    if tree:
        leaves = tree_leaves(params)
        arrays = {f"params{spell(p)}": leaf for p, leaf in leaves}
    else:
        n_a, n_x, n_y = check_params(params)
        arrays = param_arrays(params)
    namespace(**arrays)
    # np.asarray(order="C"), not ascontiguousarray, which makes a 0-d array 1-d
    host = [np.asarray(to_host(a), order="C") for a in arrays.values()]
    dtype = host[0].dtype.name
    if dtype not in DTYPES:
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
            meta.update(version=3, counters=check_counters(counters, "counters"))
        entries = {str(i): a for i, a in enumerate(host)}
    else:
        meta = {"format": FORMAT_NAME, "version": 1, "n_x": n_x, "n_a": n_a, "n_y": n_y,
                "dtype": dtype}
        entries = dict(zip(PARAM_KEYS, host))
    text = json.dumps(meta, sort_keys=True).encode("utf-8")
    if len(text) > MAX_META_BYTES:
        raise ValueError(
            f"the description of the tree (its keys and shapes) takes {len(text)} bytes, over "
            f"the {MAX_META_BYTES} that load_params reads; use shorter keys"
        )
    entries[META] = np.frombuffer(text, dtype=np.uint8)

    _write(path, lambda f: np.savez(f, **entries), ".npz")


def _write(path, write, suffix):
    """``write(f)`` into the binary file object ``path``, or atomically into the file at
    ``path``: into a temporary file in the same folder (named with ``suffix``), which gets
    the mode ``open`` would give ``path`` (:func:`_mode_for`) and then replaces it."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        write(path)
        return
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=".xlstm-", suffix=f"{suffix}.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if os.chmod in os.supports_fd:
                os.chmod(f.fileno(), mode)
        if os.chmod not in os.supports_fd:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
) -> Any:  # a dict or a list, as saved: the file says which
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

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import xlstm
    >>> W, b = np.ones((2, 3), dtype=np.float32), np.zeros(2, dtype=np.float32)
    >>> tree = {"rnn": [{"W": W}], "head": (b,)}  # a tuple comes back as a list
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "tree.npz")
    ...     xlstm.save_params(path, tree)
    ...     back = xlstm.load_params(path)
    >>> back["rnn"][0]["W"].shape, back["rnn"][0]["W"].dtype, type(back["head"]).__name__
    ((2, 3), dtype('float32'), 'list')
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
        raise ValueError(f"{describe(path)}: not a checkpoint (format version {meta['version']} "
                         "holds parameters without counters; save_checkpoint writes 3)")
    return tree, meta["counters"]


def _load(path, xp, device):
    """The tree (or the notebook's dict) and the metadata of the archive at ``path``."""
    where = describe(path)
    target = namespace_of_module(xp)
    if isinstance(path, (str, bytes, os.PathLike)):
        with open_regular(path, where) as f:
            meta, layout, host = read_archive(f, where, MAX_LOAD_BYTES)
    else:
        check_file_object(path, where)
        meta, layout, host = read_archive(path, where, MAX_LOAD_BYTES)

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


def save(path: str | os.PathLike | BinaryIO, model: Any) -> None:
    """Save a model: its class, its configuration and its parameters, in one safetensors
    file that :func:`load` reads back.

    The file is a standard safetensors file, which torch, JAX and Hugging Face users read
    (``safetensors.numpy.load_file(path)``): one tensor per parameter, named by its place in
    ``model.params`` (``"0.Wf"``, ``"1.bhf"``: the (layer, direction) index, then the key),
    float32 or float64 as the model, and in the header's ``__metadata__`` the format
    (``"xlstm-model"``), its version, the class's name and ``model.config()`` as JSON.

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        Where to write. A path is used exactly as given and written atomically (see
        :func:`~xlstm.save_params`).
    model : LSTM, GRU, RNN, SLSTM, MLSTM or Recurrent
        An instance of a model class of :data:`xlstm.models.MODELS`, in any namespace and on
        any device; its parameters are copied to the host to be written.

    Raises
    ------
    TypeError
        If ``model`` is not an instance of a model class (a subclass of one is not), or
        its parameters are not float32 or float64 arrays of one namespace and device.
    ValueError, KeyError
        If ``model.params`` does not have the model's structure and shapes.

    See Also
    --------
    load, save_params

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import xlstm
    >>> model = xlstm.GRU(3, 4, num_layers=2, dtype="float32")
    >>> path = os.path.join(tempfile.mkdtemp(), "gru.safetensors")
    >>> xlstm.save(path, model)
    >>> back = xlstm.load(path)
    >>> type(back).__name__, back.config() == model.config()
    ('GRU', True)
    >>> all(np.array_equal(a[k], b[k]) for a, b in zip(back.params, model.params) for k in a)
    True
    """
    tensors, meta = file_contents(model)
    _write(path, lambda f: safetensors.write(f, tensors, meta), ".safetensors")


def load(path: str | os.PathLike | BinaryIO, *, xp: Any = None, device: Any = None) -> Any:
    """Load a model written by :func:`save`: a model of the saved class and configuration
    with the saved parameters, bit for bit.

    The file is read as untrusted data. Before any parameter is read or made, every check
    is made: the file is a regular file; its header (at most
    ``xlstm.io.safetensors.MAX_HEADER_BYTES``) is JSON of well-formed entries with no name
    twice; every tensor is F64 or F32 (F16 and BF16 are read into float32), its byte count
    agrees with its shape, and the tensors' bytes tile the data after the header exactly,
    up to the file's actual end; the parameters fit in ``xlstm.io.MAX_LOAD_BYTES``; the
    metadata names this format and version, a model class of :data:`xlstm.models.MODELS`
    and a configuration (a small JSON object) whose namespace and dtype are among the known
    ones, and which builds the class; and the tensors are exactly that model's parameters,
    by name, shape and dtype. Then exactly those bytes are read, in bounded pieces. Nothing
    in the file is executed, and no module is imported but the namespace's own.

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        The file to read: a regular file. A file object must be open for binary reading
        and seekable.
    xp : namespace, optional
        The namespace of the model (``numpy``, ``torch``, ``jax.numpy``, ``cupy``,
        ``array_api_strict``). Default: the one it was saved from, imported.
    device : device, optional
        The parameters' device in that namespace (default: its default device).

    Returns
    -------
    model
        A new instance of the saved class: ``type(model).from_config(config, xp=xp,
        device=device)`` with its parameters replaced by the file's, in the saved dtype.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ImportError
        If ``xp`` is not given and the namespace the model was saved from cannot be imported.
    TypeError
        If ``xp`` cannot hold the saved dtype (float64 in JAX without
        ``jax_enable_x64``), or a file object is open in text mode.
    ValueError
        If ``path`` is not a regular file (a directory, a FIFO, ``/dev/zero``), or the file
        breaks any rule above: truncated, an oversized or malformed header, overlapping,
        out-of-range or gapped offsets, an unknown dtype, class, namespace or version, a
        configuration that does not build the class or does not match the tensors; the
        message names the file and the problem.

    See Also
    --------
    save, load_params

    Examples
    --------
    >>> import os, tempfile
    >>> import xlstm
    >>> path = os.path.join(tempfile.mkdtemp(), "lstm.safetensors")
    >>> xlstm.save(path, xlstm.LSTM(3, 5, bidirectional=True, dtype="float64"))
    >>> model = xlstm.load(path)
    >>> type(model).__name__, model.bidirectional, str(model.params[0]["Wf"].dtype)
    ('LSTM', True, 'float64')
    """
    where = describe(path)
    if xp is not None:
        namespace_of_module(xp)  # refuse a non-namespace before reading
    with contextlib.ExitStack() as stack:
        if isinstance(path, (str, bytes, os.PathLike)):
            f = stack.enter_context(open_regular(path, where))
        else:
            check_file_object(path, where)
            f = path
        header = safetensors.read_header(f, where, max_bytes=MAX_LOAD_BYTES)
        cls, config = check_file(header, where)
        host = safetensors.read_tensors(f, header, where)
    return build(cls, config, host, where, xp, device)
