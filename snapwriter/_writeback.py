"""Early writeback: the disk starts writing a temporary file while it is being written.

A durable save ends in ``fsync``, which on its own waits for every byte of the file to
reach the disk *after* the last one was written. On Linux,
``sync_file_range(SYNC_FILE_RANGE_WRITE)`` queues a range's dirty pages for writeback
and returns without waiting for it (pages already under writeback are skipped), so
kicking the file every :data:`WRITEBACK_BYTES` while it is written overlaps the disk's
work with serialization, and the final ``fsync`` waits for the last stretch only.

This changes when the bytes go to the disk, never which bytes: the ``fsync`` after the
write stays, and is what makes the file durable. Nothing here is used unless the save
is durable and the file is a local one; where the call does not exist (not Linux, not
glibc) or the file system refuses it (``EINVAL``, ``ENOSYS``, ``ESPIPE``, ``ENOTSUP``),
the file is written as before. Any other error (``EIO``...) fails the save, as the
``fsync`` would have.

Torch-free: the saving process imports this.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Callable
from typing import IO, Any

__all__ = ("WRITEBACK_BYTES", "Writeback")

#: Start writeback each time this many more bytes were written.
WRITEBACK_BYTES = 8 << 20
#: A kick starts this far before the bytes written so far, so that bytes a buffered
#: file object still held at the previous kick are covered by the next one.
_OVERLAP = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2
#: Errors that mean "not supported here": the file is then written without kicks.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.ENOTSUP})

_SyncFileRange = Callable[[int, int, int, int], int]
_sync_file_range: _SyncFileRange | None = None
_looked_up = False


def _lookup() -> _SyncFileRange | None:
    """glibc's ``sync_file_range`` (ctypes releases the GIL around it), or ``None``."""
    global _sync_file_range, _looked_up
    if not _looked_up:
        _looked_up = True
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            except (OSError, AttributeError):
                fn = None
            if fn is not None:
                fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                fn.restype = ctypes.c_int
                _sync_file_range = fn
    return _sync_file_range


class Writeback:
    """Kicks writeback of one file as it grows (see the module docstring).

    Args:
        fd: the file's descriptor, written sequentially from offset 0.
        every: kick each time this many more bytes were written.

    Threading: one writer thread per file.
    """

    def __init__(self, fd: int, every: int = WRITEBACK_BYTES) -> None:
        self._fd = fd
        self._every = every
        self._fn = _lookup()
        self._written = 0
        self._next = every
        self._start = 0

    @classmethod
    def of(cls, f: IO[Any]) -> Writeback | None:
        """A :class:`Writeback` for ``f`` if it is a local file on a platform that has
        the call, else ``None``."""
        if _lookup() is None:
            return None
        try:
            fd = f.fileno()
        except (AttributeError, OSError, ValueError):
            return None
        return cls(fd)

    def wrote(self, nbytes: int) -> None:
        """Count ``nbytes`` more written; kick writeback when a stretch is complete.

        Raises:
            OSError: the kernel reported an error (``EIO``...) for the file.
        """
        self._written += nbytes
        if self._written < self._next or self._fn is None:
            return
        self._next = self._written + self._every
        # from the previous kick's start to the end of the file (nbytes 0)
        if self._fn(self._fd, self._start, 0, _SYNC_FILE_RANGE_WRITE) != 0:
            code = ctypes.get_errno()
            if code in _UNSUPPORTED:
                self._fn = None
                return
            raise OSError(code, f"sync_file_range: {os.strerror(code)}")
        self._start = max(0, self._written - _OVERLAP)
