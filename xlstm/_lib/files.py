"""Opening files that are read whole or bounded by their size: regular files only.

A directory, a FIFO, a device such as ``/dev/zero`` or a socket has no size to bound a read
by (or blocks the reader forever); these are refused by what they are, before any read.
"""

from __future__ import annotations

import io
import os
import stat
from typing import BinaryIO

__all__ = ["describe", "open_regular", "check_regular", "check_file_object", "FILE_KINDS"]

#: What a file that is not a regular one is, by its ``stat`` mode.
FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISSOCK, "a socket"))


def describe(path) -> str:
    """How error messages refer to ``path`` (a path or an open file)."""
    if isinstance(path, (str, bytes, os.PathLike)):
        return repr(os.fsdecode(path))
    return repr(getattr(path, "name", path))


def open_regular(path: str | bytes | os.PathLike, where: str | None = None) -> BinaryIO:
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
    where = describe(path) if where is None else where
    check_regular(os.stat(path).st_mode, where)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        check_regular(os.fstat(fd).st_mode, where)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(mode: int, where: str) -> None:
    """Refuse a file whose ``stat`` mode is not a regular file's, naming what it is.

    Raises
    ------
    ValueError
        If ``mode`` is not a regular file's; the message starts with ``where``.
    """
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in FILE_KINDS if test(mode)), "not a regular file")
    raise ValueError(f"{where}: is {kind}; only regular files are read (a file of "
                     "unbounded or unknown size could exhaust memory or block forever)")


def check_file_object(f, where: str) -> None:
    """Refuse a file object in text mode, or one over a descriptor that is not a regular
    file (``open('/dev/zero', 'rb')``, a pipe); an in-memory one (``io.BytesIO``) passes.

    Raises
    ------
    TypeError
        If ``f`` is open in text mode.
    ValueError
        If its descriptor is not a regular file's.
    """
    if isinstance(f, io.TextIOBase):
        raise TypeError(f"path {where} must be opened in binary mode ('rb'), not text mode")
    try:
        fd = f.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: no descriptor
        return
    if isinstance(fd, int):
        check_regular(os.fstat(fd).st_mode, where)
