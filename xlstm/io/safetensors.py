"""The safetensors format, read and written by hand: the file format in which torch, JAX
and Hugging Face users exchange tensors.

A file is an 8-byte little-endian unsigned integer ``n``, then ``n`` bytes of UTF-8 JSON
(the header, padded with spaces), then the tensors' raw little-endian bytes. The header
maps each tensor's name to ``{"dtype": "F32", "shape": [4, 7], "data_offsets": [begin,
end]}`` (offsets into the data that follows the header) and may hold ``"__metadata__"``, an
object of strings to strings. The data is exactly the tensors' bytes: no gaps, no overlap,
nothing after the last one.

The reader treats the file as untrusted data and makes every check before it reads any
tensor data: the header's declared size against a cap (:data:`MAX_HEADER_BYTES`) and the
file's actual size, the header's JSON (nesting, duplicate names, the fields of every
entry), each tensor's dtype (``F64``, ``F32``, and ``F16`` and ``BF16``, which are read into
float32 exactly), its shape against its byte count, the offsets against each other (they
must tile the data) and against the file's size, and the total size of the arrays it will
make against a caller's limit. Then exactly those bytes are read, in bounded pieces. Nothing
in a file is executed.

Only numpy is used; :func:`xlstm.save` and :func:`xlstm.load` build on this module.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, BinaryIO, NamedTuple

from .schema import _json_depth, _no_duplicate_fields, _short

__all__ = ["MAX_HEADER_BYTES", "READ_DTYPES", "Entry", "Header", "read_header", "read_tensors",
           "write"]

#: The largest header (the JSON after the first 8 bytes) that is read: 4 MiB, room for
#: tens of thousands of tensors. A file whose first 8 bytes declare more is refused
#: before the header is read, and :func:`write` refuses to write one.
MAX_HEADER_BYTES = 1 << 22

#: The dtypes read, by their safetensors code: the numpy dtype of the bytes in the file and
#: the dtype of the array made from them (F16 and BF16 are widened to float32 exactly).
READ_DTYPES = {"F64": ("<f8", "float64"), "F32": ("<f4", "float32"), "F16": ("<f2", "float32"),
               "BF16": ("<u2", "float32")}
_WRITE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_ENTRY_FIELDS = ("data_offsets", "dtype", "shape")
_METADATA = "__metadata__"
_MAX_NDIM = 32  # numpy holds at most 64 dimensions
_MAX_DEPTH = 3  # the header nests {name: {"shape": [...]}}: three levels
_CHUNK = 1 << 20  # tensor data is read in pieces of at most this many bytes


class Entry(NamedTuple):
    """One tensor of a header: its name, safetensors dtype code, shape and the ``[begin,
    end)`` of its bytes in the data that follows the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class Header(NamedTuple):
    """A checked header: the tensors in the header's order, the ``__metadata__`` strings
    (``None`` when the file has none), and where the data starts in the file."""

    entries: dict[str, Entry]
    metadata: dict[str, str] | None
    data_start: int


def _bad(where, why):
    return ValueError(f"{where}: not a readable safetensors file: {why}")


def read_header(f: BinaryIO, where: str, *, max_bytes: int) -> Header:
    """The header of the safetensors file ``f`` (from its current position), checked
    against the file's size before any tensor data is read.

    Parameters
    ----------
    f : binary file object
        Open for reading and seekable, positioned at the start of the file.
    where : str
        How messages name the file.
    max_bytes : int
        The largest total size in bytes of the arrays :func:`read_tensors` would make (F16
        and BF16 count as float32); a file declaring more is refused.

    Returns
    -------
    Header

    Raises
    ------
    TypeError
        If ``f`` is open in text mode.
    ValueError
        If the file is shorter than its header says, its header is larger than
        :data:`MAX_HEADER_BYTES`, is not a JSON object of valid entries (a duplicate name,
        an unknown dtype, a shape that disagrees with the entry's byte count, ...), its
        offsets overlap, leave a gap or do not end where the file does, or it declares more
        than ``max_bytes``; the message starts with ``where``.
    """
    try:
        start = f.tell()
        size = f.seek(0, os.SEEK_END) - start
        f.seek(start)
        head = f.read(8)
    except UnicodeDecodeError:  # a text-mode reader that is no io.TextIOBase
        raise TypeError(f"path {where} must be opened in binary mode ('rb'), not text mode"
                        ) from None
    except (OSError, ValueError, AttributeError) as exc:
        raise _bad(where, f"cannot read or seek the file ({type(exc).__name__}: {exc})"
                   ) from None
    if isinstance(head, str):
        raise TypeError(f"path {where} must be opened in binary mode ('rb'), not text mode")
    head = bytes(head)
    if len(head) < 8:
        raise _bad(where, f"the file is {size} bytes, too short to hold the 8-byte length of "
                   "its header (empty or truncated)")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise ValueError(
            f"{where}: its first 8 bytes declare a header of {n} bytes, over the "
            f"{MAX_HEADER_BYTES} read (xlstm.io.safetensors.MAX_HEADER_BYTES); not a "
            "safetensors file, or a damaged or crafted one"
        )
    if 8 + n > size:
        raise _bad(where, f"the header declares {n} bytes but only {size - 8} follow its "
                   "length (truncated)")
    raw = f.read(n)
    if len(raw) != n:
        raise _bad(where, f"read {len(raw)} of the header's {n} bytes (the file changed?)")
    entries, metadata = _parse(bytes(raw), where)
    _check_offsets(entries, size - 8 - n, where)
    total = sum(math.prod(e.shape) * (4 if e.dtype in ("F16", "BF16") else _ITEMSIZE[e.dtype])
                for e in entries.values())
    if total > max_bytes:
        raise ValueError(
            f"{where}: the header declares {total} bytes of arrays ({len(entries)} tensors), "
            f"more than xlstm.io.MAX_LOAD_BYTES = {max_bytes}; raise that limit to load a "
            "larger model from a trusted file"
        )
    return Header(entries, metadata, start + 8 + n)


def _parse(raw, where):
    """The entries and the metadata of the header's bytes ``raw``, every field checked."""
    try:
        text = raw.decode("utf-8").rstrip(" ")
    except UnicodeDecodeError as exc:
        raise _bad(where, f"the header is not UTF-8 ({exc})") from None
    if not text.startswith("{"):
        raise _bad(where, f"the header is not a JSON object (it starts {_short(text[:16])})")
    depth = _json_depth(text)
    if depth > _MAX_DEPTH:
        raise _bad(where, f"the header nests {depth} levels deep; a safetensors header "
                   f"nests {_MAX_DEPTH}")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_fields)
    except (ValueError, RecursionError) as exc:  # duplicates: ValueError, named
        raise _bad(where, f"the header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _bad(where, f"the header is a JSON {type(obj).__name__}, not an object")
    metadata = obj.pop(_METADATA, None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise _bad(where, f"{_METADATA} must be an object of strings to strings, got "
                   f"{_short(metadata)}")
    entries = {}
    for name, spec in obj.items():
        label = f"tensor {name!r}"
        if not isinstance(spec, dict) or sorted(spec) != list(_ENTRY_FIELDS):
            raise _bad(where, f"{label} must be an object with exactly the fields "
                       f"{list(_ENTRY_FIELDS)}, got {_short(spec)}")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in READ_DTYPES:
            raise ValueError(
                f"{where}: {label} has dtype {_short(dtype)}; only {list(READ_DTYPES)} are "
                "read (F16 and BF16 into float32)"
            )
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(
                _is_count(d) for d in shape):
            raise _bad(where, f"{label} has the shape {_short(shape)}; a shape is a list of "
                       f"at most {_MAX_NDIM} integers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(_is_count(o) for o in offsets) and offsets[0] <= offsets[1]):
            raise _bad(where, f"{label} has the data_offsets {_short(offsets)}; they are "
                       "[begin, end], integers with 0 <= begin <= end")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise _bad(where, f"{label} of shape {tuple(shape)} and dtype {dtype} takes "
                       f"{nbytes} bytes, but its data_offsets {offsets} span "
                       f"{offsets[1] - offsets[0]}")
        entries[name] = Entry(name, dtype, tuple(shape), offsets[0], offsets[1])
    return entries, metadata


def _check_offsets(entries, data_bytes, where):
    """The tensors' bytes must tile the ``data_bytes`` after the header exactly: sorted by
    offset, each starts where the one before ends, and the last ends at the file's end."""
    at, before = 0, None
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin < at:
            raise _bad(where, f"tensor {e.name!r} (bytes {e.begin} to {e.end}) overlaps "
                       f"tensor {before!r}, which ends at {at}; the tensors' bytes may not "
                       "overlap")
        if e.begin > at:
            raise _bad(where, f"the bytes {at} to {e.begin} of the data belong to no tensor "
                       f"(before tensor {e.name!r}); the tensors' bytes must cover the data "
                       "without gaps")
        at, before = e.end, e.name
    if at > data_bytes:
        raise _bad(where, f"the tensors take {at} bytes of data, but the file holds "
                   f"{data_bytes} after its header (truncated, or offsets out of range)")
    if at < data_bytes:
        raise _bad(where, f"the file holds {data_bytes - at} bytes after its last tensor; "
                   "the tensors' bytes must cover the data exactly")


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_tensors(f: BinaryIO, header: Header, where: str,
                 names: Any = None) -> dict[str, Any]:
    """The tensors of ``header`` (:func:`read_header`) as numpy arrays, read from ``f``.

    Each tensor's bytes are read exactly, in pieces of at most 1 MiB, into a new buffer:
    memory grows with the data actually present. F64 gives float64 and F32 float32, in
    native byte order; F16 and BF16 are widened to float32 (exactly). The arrays are
    writable and independent of each other and of the file.

    Parameters
    ----------
    f : binary file object
        The file the header came from.
    header : Header
    where : str
        How messages name the file.
    names : collection of str, optional
        The tensors to read (default: all); the others are skipped.

    Returns
    -------
    dict of str to numpy.ndarray
        In the header's order.

    Raises
    ------
    ValueError
        If the file ends before a tensor's last byte (it changed since its header was read).
    """
    import numpy as np

    wanted = header.entries if names is None else {k: header.entries[k] for k in names}
    out = {}
    for e in sorted(wanted.values(), key=lambda e: e.begin):
        n = e.end - e.begin
        data = bytearray()
        try:
            f.seek(header.data_start + e.begin)
            while len(data) < n:
                piece = f.read(min(_CHUNK, n - len(data)))
                if not piece:
                    break
                data += piece
        except (OSError, ValueError) as exc:
            raise _bad(where, f"cannot read tensor {e.name!r} ({type(exc).__name__}: {exc})"
                       ) from None
        if len(data) < n:
            raise _bad(where, f"tensor {e.name!r} is truncated: {len(data)} of {n} bytes")
        stored, dtype = READ_DTYPES[e.dtype]
        arr = np.frombuffer(data, dtype=stored)
        if e.dtype == "BF16":  # the upper half of a float32's bits
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif arr.dtype != np.dtype(dtype) or not arr.dtype.isnative:
            arr = arr.astype(dtype)
        out[e.name] = arr.reshape(e.shape)
    return {k: out[k] for k in wanted}


def write(f: BinaryIO, tensors: Mapping[str, Any],
          metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (and ``metadata``) to the binary file ``f`` in the safetensors
    format.

    The header lists the tensors in the order given, their bytes follow in that order, and
    the header is padded with spaces to a multiple of 8 bytes, so that every tensor's data
    is aligned to its item size.

    Parameters
    ----------
    f : binary file object
        Open for writing.
    tensors : dict of str to numpy.ndarray
        float64, float32 or float16 arrays, by name (any ``str`` but ``"__metadata__"``).
    metadata : dict of str to str, optional
        Stored as the header's ``__metadata__``.

    Raises
    ------
    TypeError
        If a name or a metadata field is not a ``str``, or an array's dtype is not float64,
        float32 or float16.
    ValueError
        If the header would exceed :data:`MAX_HEADER_BYTES`.

    Examples
    --------
    >>> import io, numpy as np
    >>> from xlstm.io import safetensors
    >>> f = io.BytesIO()
    >>> safetensors.write(f, {"w": np.ones((2, 3), np.float32)}, {"note": "ones"})
    >>> _ = f.seek(0)
    >>> header = safetensors.read_header(f, "'buffer'", max_bytes=1 << 20)
    >>> header.metadata, header.entries["w"].shape
    ({'note': 'ones'}, (2, 3))
    >>> float(safetensors.read_tensors(f, header, "'buffer'")["w"].sum())
    6.0
    """
    import numpy as np

    head: dict[str, Any] = {}
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str to str, got {_short(k)}: {_short(v)}")
        head[_METADATA] = dict(metadata)
    data, offset = [], 0
    for name, arr in tensors.items():
        if not isinstance(name, str) or name == _METADATA:
            raise TypeError(f"a tensor's name must be a str other than {_METADATA!r}, got "
                            f"{_short(name)}")
        arr = np.asarray(arr)
        code = _WRITE_CODES.get(arr.dtype.name)
        if code is None:
            raise TypeError(f"tensor {name!r} has dtype {arr.dtype}; float64, float32 and "
                            "float16 are written")
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        head[name] = {"dtype": code, "shape": list(arr.shape),
                      "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        data.append(arr)
    text = json.dumps(head, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"the header takes {len(text)} bytes, over the {MAX_HEADER_BYTES} "
                         "that the reader reads; use fewer tensors or shorter names")
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for arr in data:
        f.write(memoryview(arr.reshape(-1)).cast("B"))
