"""Hand-written zip archives for the ``load_params`` tests: what ``numpy.savez`` and
``zipfile`` refuse to write (duplicate names, sizes that lie, huge members built cheaply)."""

from __future__ import annotations

import dataclasses
import io
import struct
import zipfile
import zlib

import numpy as np

_BLOCK = 1 << 24  # 16 MiB of zeros per repeated deflate block


@dataclasses.dataclass(frozen=True)
class Member:
    """One zip entry: its name, its payload as stored, and what the zip directory declares."""

    name: str
    payload: bytes
    crc: int
    file_size: int
    method: int = zipfile.ZIP_STORED
    flags: int = 0


def npy(array):
    """The bytes of ``array`` as a ``.npy`` file (no pickles)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_header(shape, descr="<f8", fortran_order=False):
    """A version 1.0 ``.npy`` header declaring ``shape`` and ``descr``, without data."""
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": fortran_order, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def stored(name, data):
    """An uncompressed entry holding ``data``."""
    return Member(name, data, zlib.crc32(data), len(data))


def deflated(name, data):
    """A deflated entry holding ``data``."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return Member(name, c.compress(data) + c.flush(), zlib.crc32(data), len(data),
                  zipfile.ZIP_DEFLATED)


def deflated_zeros(name, head, n_blocks):
    """A deflated entry holding ``head`` then ``n_blocks`` blocks of 16 MiB of zeros.

    Each block is compressed once and repeated (a full flush resets the compressor, so
    every block compresses to the same bytes): 1 GiB of zeros costs about 1 MB of file and
    well under a second to build.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(_BLOCK)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.flush()
    crc = zlib.crc32(head)
    for _ in range(n_blocks):
        crc = zlib.crc32(zeros, crc)
    payload = first + block * n_blocks + tail
    return Member(name, payload, crc, len(head) + n_blocks * _BLOCK, zipfile.ZIP_DEFLATED)


def write_zip(path, members):
    """Write ``members`` (in order, duplicates allowed) as a plain zip archive."""
    out = bytearray()
    central = bytearray()
    for m in members:
        name = m.name.encode()
        offset = len(out)
        fields = (m.flags, m.method, 0, 0x21, m.crc, len(m.payload), m.file_size, len(name))
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, *fields, 0) + name + m.payload
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, *fields, 0, 0, 0, 0, 0o644 << 16, offset
        ) + name
    cd_offset = len(out)
    out += central
    out += struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), cd_offset, 0
    )
    with open(path, "wb") as f:
        f.write(out)
