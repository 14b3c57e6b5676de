"""The bounded reader of an untrusted ``.npz`` parameter archive.

Only zip archives of ``.npy`` entries are read, and nothing in them is executed or
unpickled. Every check comes before any array data is read: the zip directory (its size,
the entries' names, compression, encryption and sizes against the file's size), the
metadata (:mod:`xlstm.io.schema`), the entry names against it, the total size it declares,
and each entry's ``.npy`` header (dtype and shape against the metadata, byte counts against
the zip directory). Then exactly the bytes the headers declare are read, in bounded pieces.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import struct
import zipfile
import zlib

from .schema import (
    MAX_LEAVES,
    MAX_META_BYTES,
    META,
    Layout,
    check_entry_names,
    layout_of,
    parse_meta,
)

_MAX_HEADER_BYTES = 1024  # an .npy header; numpy writes 128 bytes for these arrays
_MAX_DIRECTORY_BYTES = 1 << 16  # the zip central directory; 1025 entries need about 55 KiB
_CHUNK = 1 << 20  # array data is read in pieces of at most this many bytes
_MAX_DEFLATE_RATIO = 1032  # deflate expands a stored byte into at most this many
_PICKLE_WHY = "which load_params refuses: unpickling a file can run arbitrary code"
# What a damaged archive or entry can raise while it is read.
_READ_ERRORS = (
    ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, struct.error, SyntaxError,
    RecursionError, NotImplementedError,  # zipfile: a zip version or flag it does not support
)


def read_archive(f, where: str, max_bytes: int) -> tuple[dict, Layout, dict]:
    """The metadata, its layout and the checked parameter arrays (numpy, by entry name) of
    the archive in file ``f``, which ``where`` names in messages.

    An archive whose metadata declares more than ``max_bytes`` bytes of parameters
    (``xlstm.io.MAX_LOAD_BYTES``) is refused before any array is read.
    """
    import numpy as np

    with _open_zip(f, where) as (zf, size):
        infos = _check_entries(zf, where, size)
        meta = _read_meta(zf, infos[META], where)
        layout = layout_of(meta, where)
        check_entry_names(infos, layout, where)
        itemsize = np.dtype(meta["dtype"]).itemsize
        total = itemsize * sum(math.prod(shape) for _, shape in layout.entries.values())
        if total > max_bytes:
            raise ValueError(
                f"{where}: the metadata declares {total} bytes of parameters ({layout.sizes}, "
                f"{meta['dtype']}), more than xlstm.io.MAX_LOAD_BYTES = {max_bytes}; "
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


def _not_readable(where, why):
    return ValueError(f"{where}: not a readable xlstm .npz parameter file: {why}")


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
            f"{MAX_LEAVES + 1} entries"
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
    if META not in by_key:
        raise ValueError(f"{where}: has no {META} entry; it was not written by xlstm.save_params")
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
    """The metadata: read with a size cap, then parsed and checked
    (:func:`xlstm.io.schema.parse_meta`)."""
    import numpy as np

    label = repr(META)
    with _open_entry(zf, info, label, where) as member:
        shape, _, dtype, header_bytes = _read_header(member, label, where)
        if dtype != np.uint8 or len(shape) != 1:
            raise ValueError(
                f"{where}: {META} must be a 1-D uint8 byte array, got dtype {dtype} and "
                f"shape {shape}"
            )
        if shape[0] > MAX_META_BYTES:
            raise ValueError(
                f"{where}: {META} is {shape[0]} bytes; metadata over {MAX_META_BYTES} bytes "
                "is refused (save_params writes about 100, and 50 more per array of a tree)"
            )
        _check_size(info, header_bytes, shape[0], label, where)
        raw = bytes(_read_data(member, shape[0], label, where))
    return parse_meta(raw, where)



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
