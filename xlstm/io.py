"""Saving and loading the notebook's parameter dict as a plain ``.npz`` archive.

The archive holds one float array per parameter (``Wf, bf, ..., Wy, by``, all float32 or
all float64) and a ``__meta__`` entry: a UTF-8 JSON object stored as a ``uint8`` byte array,
with the format name, the format version, the sizes ``n_x``, ``n_a``, ``n_y`` and the dtype.
No pickles and no object arrays are written, and none are read. :func:`load_params` reads
the archive itself instead of through ``numpy.load``: it checks the metadata, then every
entry's ``.npy`` header (dtype and shape against the metadata, byte counts against the zip
directory), all before reading any array data, and then reads exactly the bytes the
headers declare. A file from an untrusted source can neither run code nor make
:func:`load_params` allocate much more memory than the parameters it declares, which
``xlstm.io.MAX_LOAD_BYTES`` caps. A file written on one backend loads on any other.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import stat
import struct
import tempfile
import zipfile
import zlib
from typing import Any, BinaryIO

from ._compat import device_scope, namespace, namespace_of_module, to_host
from ._typing import Array, Params
from .params import PARAM_KEYS, check_params, param_arrays

__all__ = ["save_params", "load_params", "FORMAT_NAME", "FORMAT_VERSION", "MAX_LOAD_BYTES"]

#: Value of the ``format`` field of the metadata.
FORMAT_NAME = "xlstm-params"
#: Version written by :func:`save_params`; :func:`load_params` reads versions up to this one.
FORMAT_VERSION = 1
#: Largest total size in bytes of the parameters that :func:`load_params` accepts to read
#: (4 GiB); a file whose metadata declares more is refused before any array is read. Raise
#: it (``xlstm.io.MAX_LOAD_BYTES = ...``) to load a larger model from a trusted file.
MAX_LOAD_BYTES = 1 << 32

_META = "__meta__"
_META_FIELDS = ("format", "version", "n_x", "n_a", "n_y", "dtype")
_DTYPES = ("float32", "float64")
_MAX_META_BYTES = 4096  # the JSON metadata; save_params writes about 100 bytes
_MAX_META_DEPTH = 4  # nesting of JSON arrays and objects; save_params writes 1
_MAX_HEADER_BYTES = 1024  # an .npy header; numpy writes 128 bytes for these arrays
_MAX_DIRECTORY_BYTES = 1 << 16  # the zip central directory; 11 entries need about 1 KiB
_CHUNK = 1 << 20  # array data is read in pieces of at most this many bytes
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


def save_params(path: str | os.PathLike | BinaryIO, params: Params) -> None:
    """Save the notebook's parameter dict to an ``.npz`` archive.

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        Where to write. A path is used exactly as given (no ``.npz`` is appended) and is
        written atomically: the archive goes to a temporary file in the same folder that
        then replaces ``path``, so a crash never leaves a half-written file behind. The
        file gets the permissions ``open`` would give it: those of the file it replaces,
        or ``0o666`` less the umask for a new file.
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
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=".xlstm-", suffix=".npz.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **host)
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
) -> dict[str, Array]:
    """Load a parameter dict written by :func:`save_params`.

    The archive is read as untrusted data. Before any array data is read, every check is
    made: the file is a zip archive of ``.npy`` entries with unique names, exactly the
    ``__meta__`` entry and the ten parameters; the metadata (a small, flat JSON object)
    names the format, a known version, the sizes and the dtype; the parameters it declares
    fit in ``xlstm.io.MAX_LOAD_BYTES``; and each entry's ``.npy`` header gives the recorded
    dtype (float32 or float64, never an object array or pickled data) and the shape the
    recorded sizes imply, with a byte count equal to the one in the zip directory. Then
    exactly those bytes are read, in bounded pieces, so a damaged or crafted file is refused
    with a clear message while using little more memory than the parameters it declares.

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        The archive to read. A file object must be open for binary reading and seekable.
    xp : namespace, optional
        Target array namespace (``numpy``, ``cupy``, ``torch``, ``jax.numpy``,
        ``array_api_strict`` or their array-api-compat wrappers). Default: numpy.
    device : device, optional
        Target device in ``xp``. Default: the namespace's default device.

    Returns
    -------
    dict
        ``Wf, bf, Wi, bi, Wc, bc, Wo, bo, Wy, by`` as ``xp`` arrays on ``device``, with the
        saved dtype, in native byte order, independent of each other and of the file.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    KeyError
        If a parameter is missing from the archive; the message names it and the path.
    ValueError
        If the file is not a readable ``.npz`` archive (not a zip archive at all, a bare
        ``.npy`` array, a pickle, corrupt or truncated), has duplicate, unknown or
        non-``.npy`` entries, holds pickled data or an object array, its metadata is
        missing, malformed, oversized or nested, or declares parameters larger than
        ``xlstm.io.MAX_LOAD_BYTES``, or an entry's dtype, shape or size disagrees with the
        metadata or the zip directory; the message names the problem and the path.
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
        with open(path, "rb") as f:
            meta, host = _read_archive(f, where)
    else:
        meta, host = _read_archive(path, where)

    dtype = getattr(target, meta["dtype"])
    out = {}
    with device_scope(xp=target, device=device):
        for k in PARAM_KEYS:
            arr = target.asarray(host[k], dtype=dtype, device=device)
            if arr.dtype != dtype:
                raise TypeError(
                    f"{where}: the target namespace turned {meta['dtype']} into {arr.dtype}"
                )
            out[k] = arr
    return out


def _not_readable(where, why):
    return ValueError(f"{where}: not a readable xlstm .npz parameter file: {why}")


def _read_archive(f, where):
    """The metadata and the checked parameter arrays (numpy) of the archive in file ``f``."""
    import numpy as np

    with _open_zip(f, where) as zf:
        infos = _check_entries(zf, where)
        meta = _read_meta(zf, infos[_META], where)
        shapes = _expected_shapes(meta)
        itemsize = np.dtype(meta["dtype"]).itemsize
        total = itemsize * sum(math.prod(s) for s in shapes.values())
        if total > MAX_LOAD_BYTES:
            raise ValueError(
                f"{where}: the metadata declares {total} bytes of parameters (n_x={meta['n_x']}, "
                f"n_a={meta['n_a']}, n_y={meta['n_y']}, {meta['dtype']}), more than "
                f"xlstm.io.MAX_LOAD_BYTES = {MAX_LOAD_BYTES}; raise that limit to load a "
                "larger model from a trusted file"
            )
        with contextlib.ExitStack() as stack:
            members, headers = {}, {}
            for k in PARAM_KEYS:
                members[k] = stack.enter_context(_open_entry(zf, infos[k], k, where))
                headers[k] = _read_header(members[k], k, where)
            _check_headers(headers, infos, shapes, meta, where)
            host = {}
            for k in PARAM_KEYS:
                shape, fortran_order, dt, _ = headers[k]
                data = _read_data(members[k], math.prod(shape) * dt.itemsize, k, where)
                order = "F" if fortran_order else "C"
                arr = np.frombuffer(data, dtype=dt).reshape(shape, order=order)
                if not dt.isnative:
                    arr = arr.astype(dt.newbyteorder("="))
                host[k] = arr
    return meta, host


@contextlib.contextmanager
def _open_zip(f, where):
    """``f`` opened as a zip archive, after ruling out other kinds of file by their start."""
    try:
        start = f.tell()
        head = f.read(8)
        f.seek(start)
    except (OSError, ValueError, AttributeError) as exc:
        raise _not_readable(where, f"cannot read or seek the file ({_why(exc)})") from None
    if isinstance(head, str):
        raise TypeError(f"path {where} must be opened in binary mode, not text mode")
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
        zf = zipfile.ZipFile(f)
    except _READ_ERRORS as exc:
        if head.startswith(b"PK"):
            why = f"a damaged, truncated or unsupported zip archive ({_why(exc)})"
            raise _not_readable(where, why) from None
        raise _not_readable(where, "it is not a zip archive, so not an .npz") from None
    with zf:
        yield zf


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
            f"{_MAX_DIRECTORY_BYTES} bytes read; a parameter file has {len(PARAM_KEYS) + 1} "
            "entries"
        )


def _bare_npy(f, where):
    """The error for a file that is one ``.npy`` array rather than an archive."""
    what = "a single .npy array"
    with contextlib.suppress(*_READ_ERRORS):
        _, _, dtype, _ = _read_header(f, "the array", where, allow_object=True)
        if dtype.hasobject:
            what = f"a single .npy object array (pickled data, {_PICKLE_WHY})"
    return ValueError(f"{where}: holds {what}, not an .npz parameter archive")


def _check_entries(zf, where):
    """The zip entries by key, after checking their names, compression and encryption."""
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
    missing = [k for k in PARAM_KEYS if k not in by_key]
    if missing:
        raise KeyError(f"{where}: parameter {missing[0]!r} is missing from the file")
    extra = sorted(set(by_key) - set(PARAM_KEYS) - {_META})
    if extra:
        raise ValueError(f"{where}: unexpected entries {extra} in a parameter file")
    for key, info in by_key.items():
        if info.flag_bits & 0x1:
            raise ValueError(f"{where}: entry {key!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ValueError(
                f"{where}: entry {key!r} uses zip compression method {info.compress_type}; "
                "only stored and deflated entries are read"
            )
    return by_key


@contextlib.contextmanager
def _open_entry(zf, info, key, where):
    try:
        member = zf.open(info)
    except (*_READ_ERRORS, RuntimeError) as exc:  # RuntimeError: an encrypted entry
        raise ValueError(f"{where}: cannot read entry {key!r} ({_why(exc)})") from None
    with member:
        yield member


def _read_header(member, key, where, *, allow_object=False):
    """``(shape, fortran_order, dtype, header_bytes)`` of the ``.npy`` stream ``member``.

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
        raise ValueError(f"{where}: cannot read entry {key!r} ({_why(exc)})") from None
    if dtype.hasobject and not allow_object:
        raise ValueError(f"{where}: entry {key!r} is an object array (pickled data), {_PICKLE_WHY}")
    return shape, fortran_order, dtype, header_bytes


def _check_size(info, header_bytes, data_bytes, key, where):
    """The zip directory must declare exactly the bytes that the ``.npy`` header implies."""
    if info.file_size != header_bytes + data_bytes:
        raise ValueError(
            f"{where}: entry {key!r} is {info.file_size} bytes according to the zip directory, "
            f"but its .npy header declares {header_bytes} + {data_bytes} bytes"
        )


def _read_data(member, n, key, where):
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
        raise ValueError(f"{where}: cannot read entry {key!r} ({_why(exc)})") from None
    if len(data) < n:
        raise ValueError(f"{where}: entry {key!r} is truncated: {len(data)} of {n} data bytes")
    if more:
        raise ValueError(f"{where}: entry {key!r} holds more data than its header declares")
    return data


def _read_meta(zf, info, where):
    """The metadata: read with a size cap, parsed, and checked field by field."""
    import numpy as np

    with _open_entry(zf, info, _META, where) as member:
        shape, _, dtype, header_bytes = _read_header(member, _META, where)
        if dtype != np.uint8 or len(shape) != 1:
            raise ValueError(
                f"{where}: {_META} must be a 1-D uint8 byte array, got dtype {dtype} and "
                f"shape {shape}"
            )
        if shape[0] > _MAX_META_BYTES:
            raise ValueError(
                f"{where}: {_META} is {shape[0]} bytes; metadata over {_MAX_META_BYTES} bytes "
                "is refused (save_params writes about 100)"
            )
        _check_size(info, header_bytes, shape[0], _META, where)
        raw = bytes(_read_data(member, shape[0], _META, where))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: {_META} is not valid UTF-8 JSON ({exc})") from None
    depth = _json_depth(text)
    if depth > _MAX_META_DEPTH:
        raise ValueError(
            f"{where}: {_META} is nested {depth} levels deep; the metadata is a flat JSON "
            f"object, and nesting deeper than {_MAX_META_DEPTH} is refused"
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
    unknown = sorted(set(meta) - set(_META_FIELDS))
    if unknown:
        raise ValueError(
            f"{where}: {_META} has unknown fields {unknown}; version {version} has exactly "
            f"{list(_META_FIELDS)}"
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


def _expected_shapes(meta):
    """Each parameter's shape, as the sizes in the metadata imply."""
    n_x, n_a, n_y = meta["n_x"], meta["n_a"], meta["n_y"]
    shapes = {}
    for g in "fico":
        shapes["W" + g] = (n_a, n_a + n_x)
        shapes["b" + g] = (n_a, 1)
    shapes["Wy"] = (n_y, n_a)
    shapes["by"] = (n_y, 1)
    return shapes


def _check_headers(headers, infos, shapes, meta, where):
    """Every parameter's header against the metadata and the zip directory (no data read)."""
    for k, (_, _, dtype, _) in headers.items():
        if dtype.kind != "f" or dtype.itemsize not in (4, 8):
            raise ValueError(f"{where}: {k!r} has dtype {dtype}; expected float32 or float64")
    dtypes = {dtype.name for _, _, dtype, _ in headers.values()}
    if dtypes != {meta["dtype"]}:
        raise ValueError(
            f"{where}: arrays have dtypes {sorted(dtypes)} but the metadata says "
            f"{meta['dtype']!r}; all parameters must share the recorded dtype"
        )
    sizes = ", ".join(f"{k}={meta[k]}" for k in ("n_x", "n_a", "n_y"))
    for k, (shape, _, dtype, header_bytes) in headers.items():
        if shape != shapes[k]:
            raise ValueError(
                f"{where}: {k!r} has shape {shape}, but the metadata's sizes ({sizes}) "
                f"make it {shapes[k]}"
            )
        _check_size(infos[k], header_bytes, math.prod(shape) * dtype.itemsize, k, where)


def _why(exc):
    """A short reason for a read error."""
    text = str(exc.args[0]) if exc.args else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
