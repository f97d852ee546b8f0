"""Finding snapshots in a directory."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Any

from ._paths import is_temp_name
from ._storage import LocalFileSystem

__all__ = ("SnapshotEntry", "find_latest_snapshot", "list_snapshots")


@dataclass(frozen=True)
class SnapshotEntry:
    """One file in a snapshot directory.

    Attributes:
        name: path relative to the directory.
        path: the directory joined with ``name``.
        size: bytes.
        mtime: modification time (seconds since the epoch).
        temporary: whether it is a leftover temporary file of an unfinished save.
    """

    name: str
    path: str
    size: int
    mtime: float
    temporary: bool


def list_snapshots(
    directory: str, pattern: str = "*", *, fs: Any = None, include_temporary: bool = True
) -> list[SnapshotEntry]:
    """List the files directly in ``directory`` whose names match ``pattern``, oldest first.

    Args:
        directory: the snapshot directory.
        pattern: a :mod:`fnmatch` pattern for committed snapshot names.
        fs: file system (default: the local one).
        include_temporary: also list temporary leftovers (whatever ``pattern`` says).

    Raises:
        FileNotFoundError: ``directory`` does not exist.
    """
    fs = fs if fs is not None else LocalFileSystem()
    entries = []
    for name in fs.list(directory):
        path = os.path.join(directory, name)
        temporary = is_temp_name(name)
        if temporary and not include_temporary:
            continue
        if not temporary and not fnmatch.fnmatchcase(name, pattern):
            continue
        try:
            if fs.isdir(path):
                continue
            st = fs.stat(path)
        except FileNotFoundError:
            continue  # removed meanwhile
        entries.append(SnapshotEntry(name, path, int(st.size), float(st.last_modified), temporary))
    entries.sort(key=lambda e: (e.mtime, e.name))
    return entries


def find_latest_snapshot(directory: str, pattern: str = "*", *, fs: Any = None) -> str | None:
    """Return the path of the newest complete snapshot in ``directory``, or ``None``.

    Only committed files count: temporary leftovers of unfinished saves are ignored.
    Newest means latest modification time (ties broken by name).
    """
    try:
        entries = list_snapshots(directory, pattern, fs=fs, include_temporary=False)
    except FileNotFoundError:
        return None
    return entries[-1].path if entries else None
