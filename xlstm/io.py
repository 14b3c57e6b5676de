"""Saving and loading the seed's parameter dict as a plain ``.npz`` archive.

The archive holds one float array per parameter (``Wf, bf, ..., Wy, by``, all float32 or
all float64) and a ``__meta__`` entry: a UTF-8 JSON object stored as a ``uint8`` byte array,
with the format name, the format version, the sizes ``n_x``, ``n_a``, ``n_y`` and the dtype.
No pickles and no object arrays are written, and none are read: loading uses
``numpy.load(..., allow_pickle=False)``, so a file from an untrusted source cannot run code.
A file written on one backend loads on any other.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib

from ._compat import namespace, namespace_of_module, to_host
from .params import PARAM_KEYS, check_params, param_arrays

__all__ = ["save_params", "load_params", "FORMAT_NAME", "FORMAT_VERSION"]

#: Value of the ``format`` field of the metadata.
FORMAT_NAME = "xlstm-params"
#: Version written by :func:`save_params`; :func:`load_params` reads versions up to this one.
FORMAT_VERSION = 1
_META = "__meta__"
_DTYPES = ("float32", "float64")
# What a damaged archive can raise while numpy reads it.
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)


def _name(path):
    """How error messages refer to ``path`` (a path or an open file)."""
    if isinstance(path, (str, bytes, os.PathLike)):
        return repr(os.fsdecode(path))
    return repr(getattr(path, "name", path))


def save_params(path, params):
    """Save the seed's parameter dict to an ``.npz`` archive.

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        Where to write. A path is used exactly as given (no ``.npz`` is appended) and is
        written atomically: the archive goes to a temporary file in the same folder that
        then replaces ``path``, so a crash never leaves a half-written file behind.
    params : dict of arrays
        ``Wf, bf, Wi, bi, Wc, bc, Wo, bo, Wy, by`` in any supported namespace (numpy, CuPy,
        torch, JAX, array-api-strict), all float32 or all float64, on one device. Extra
        keys are not saved.

    Raises
    ------
    KeyError
        If a parameter is missing.
    TypeError, ValueError
        If the parameters are not arrays of one floating dtype, namespace and device, or
        a shape is inconsistent.

    See Also
    --------
    load_params
    """
    import numpy as np

    n_a, n_x, n_y = check_params(params)
    namespace(**param_arrays(params))
    host = {k: np.ascontiguousarray(to_host(params[k])) for k in PARAM_KEYS}
    dtype = host["Wf"].dtype.name
    if dtype not in _DTYPES:
        raise TypeError(f"params must be float32 or float64 to be saved, got {dtype}")
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "n_x": n_x,
        "n_a": n_a,
        "n_y": n_y,
        "dtype": dtype,
    }
    host[_META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)

    if not isinstance(path, (str, bytes, os.PathLike)):
        np.savez(path, **host)
        return
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".xlstm-", suffix=".npz.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **host)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_meta(raw, where):
    import numpy as np

    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(
            f"{where}: {_META} must be a 1-D uint8 byte array, got dtype {raw.dtype} and "
            f"shape {raw.shape}"
        )
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
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
    for k in ("n_x", "n_a", "n_y"):
        v = meta.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {_META} field {k!r} must be a positive int, got {v!r}")
    if meta.get("dtype") not in _DTYPES:
        raise ValueError(
            f"{where}: {_META} field 'dtype' must be one of {_DTYPES}, got {meta.get('dtype')!r}"
        )
    return meta


def load_params(path, *, xp=None, device=None):
    """Load a parameter dict written by :func:`save_params`.

    Every entry is checked before anything is converted: the metadata (format name and
    version, sizes, dtype), the presence of every parameter and the absence of unknown
    entries, each array's dtype (float32 or float64, all equal, as recorded) and shape
    (consistent with each other and with the recorded sizes). Pickled data and object
    arrays are refused.

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        The archive to read.
    xp : namespace, optional
        Target array namespace (``numpy``, ``cupy``, ``torch``, ``jax.numpy``,
        ``array_api_strict`` or their array-api-compat wrappers). Default: numpy.
    device : device, optional
        Target device in ``xp``. Default: the namespace's default device.

    Returns
    -------
    dict
        ``Wf, bf, Wi, bi, Wc, bc, Wo, bo, Wy, by`` as ``xp`` arrays on ``device``, with the
        saved dtype.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    KeyError
        If a parameter is missing from the archive; the message names it and the path.
    ValueError
        If the file is not a readable ``.npz`` archive (corrupt, truncated, a bare ``.npy``
        array), holds pickled data or an object array, or its metadata, dtypes or shapes
        are wrong; the message names the problem and the path.
    TypeError
        If ``xp`` cannot hold the saved dtype (for example float64 in JAX without
        ``jax_enable_x64``).

    See Also
    --------
    save_params
    """
    where = _name(path)
    target = namespace_of_module(xp)
    if isinstance(path, (str, bytes, os.PathLike)):
        # Our own handle, closed here: numpy leaks the one it opens when a damaged zip fails.
        with open(path, "rb") as f:
            host = _read_archive(f, where)
    else:
        host = _read_archive(path, where)

    meta = _read_meta(host.pop(_META), where)
    for k, arr in host.items():
        if arr.dtype.kind != "f" or arr.dtype.itemsize not in (4, 8):
            raise ValueError(
                f"{where}: {k!r} has dtype {arr.dtype}; expected float32 or float64"
            )
        host[k] = arr.astype(arr.dtype.newbyteorder("="), copy=False)  # native byte order
    dtypes = {arr.dtype.name for arr in host.values()}
    if dtypes != {meta["dtype"]}:
        raise ValueError(
            f"{where}: arrays have dtypes {sorted(dtypes)} but the metadata says "
            f"{meta['dtype']!r}; all parameters must share the recorded dtype"
        )
    try:
        n_a, n_x, n_y = check_params(host)
    except (KeyError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc.args[0]}") from None
    sizes = {"n_x": n_x, "n_a": n_a, "n_y": n_y}
    for k, v in sizes.items():
        if meta[k] != v:
            raise ValueError(
                f"{where}: the arrays give {k}={v} but the metadata says {k}={meta[k]}"
            )

    dtype = getattr(target, meta["dtype"])
    out = {}
    for k in PARAM_KEYS:
        arr = target.asarray(host[k], dtype=dtype, device=device)
        if arr.dtype != dtype:
            raise TypeError(
                f"{where}: the target namespace turned {meta['dtype']} into {arr.dtype}"
            )
        out[k] = arr
    return out


def _read_archive(f, where):
    """Every entry of the ``.npz`` in open file ``f``, checked for names and readability."""
    import numpy as np

    try:
        archive = np.load(f, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise ValueError(
            f"{where}: not a readable xlstm .npz parameter file ({_why(exc)})"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{where}: holds a single .npy array, not an .npz parameter archive")

    with archive:
        names = set(archive.files)
        if _META not in names:
            raise ValueError(
                f"{where}: has no {_META} entry; it was not written by xlstm.save_params"
            )
        missing = [k for k in PARAM_KEYS if k not in names]
        if missing:
            raise KeyError(f"{where}: parameter {missing[0]!r} is missing from the file")
        extra = sorted(names - set(PARAM_KEYS) - {_META})
        if extra:
            raise ValueError(f"{where}: unexpected entries {extra} in a parameter file")
        host = {}
        for k in (_META, *PARAM_KEYS):
            try:
                host[k] = archive[k]
            except _READ_ERRORS as exc:
                raise ValueError(f"{where}: cannot read entry {k!r} ({_why(exc)})") from None
    return host


def _why(exc):
    """A short reason for a numpy read error; says so plainly when pickled data was refused."""
    text = str(exc.args[0]) if exc.args else ""
    if isinstance(exc, ValueError) and ("allow_pickle" in text or "pickled" in text):
        return (
            "it holds pickled data or an object array, which load_params refuses: "
            "unpickling a file can run arbitrary code"
        )
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
