"""Finding snapshots in a directory."""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from typing import Any

from ._fsspec import resolve_filesystem
from ._manifest import set_status
from ._paths import is_temp_name

__all__ = ("SnapshotEntry", "find_latest_snapshot", "list_snapshots", "natural_key")


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders the numbers in names numerically (``snap_9`` < ``snap_10``)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


@dataclass(frozen=True)
class SnapshotEntry:
    """One file in a snapshot directory.

    Attributes:
        name: path relative to the directory.
        path: the directory joined with ``name``.
        size: bytes.
        mtime: modification time (seconds since the epoch).
        temporary: whether it is a leftover temporary file of an unfinished save.
        kind: ``"file"``, or ``"set"`` for a rank set (a directory of one file per rank;
            see :mod:`snapwriter._manifest`), whose size is its members' total.
        complete: for a set, whether it is committed with every member present; an
            incomplete set (in flight, or broken by a dead rank) is never "latest".
    """

    name: str
    path: str
    size: int
    mtime: float
    temporary: bool
    kind: str = "file"
    complete: bool = True


def list_snapshots(
    directory: str,
    pattern: str = "*",
    *,
    fs: Any = None,
    include_temporary: bool = True,
    include_sets: bool = False,
) -> list[SnapshotEntry]:
    """List the files directly in ``directory`` whose names match ``pattern``, oldest first.

    Files with the same modification time (object stores keep whole seconds) are
    ordered by name, numbers compared numerically.

    Args:
        directory: the snapshot directory: a path, or a URL (``s3://bucket/run``,
            ``memory://run``; needs fsspec) when ``fs`` is not given.
        pattern: a :mod:`fnmatch` pattern for committed snapshot names.
        fs: file system: the local one by default; a ppe/PFIO file system, an fsspec
            file system (``directory`` is then a path on it) or a writer's ``fs``.
        include_temporary: also list temporary leftovers (whatever ``pattern`` says)
            and, with ``include_sets``, incomplete rank sets.
        include_sets: also list rank sets (sub-directories with a marker, manifest or
            snapwriter's tag) whose names match ``pattern``.

    Returns:
        The entries; their ``path`` is ``directory`` (as given, URL included) joined
        with the name.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
    """
    fs, root = resolve_filesystem(fs, directory)
    entries = []
    for name in fs.list(root):
        path = os.path.join(root, name)
        temporary = is_temp_name(name)
        if temporary and not include_temporary:
            continue
        if not temporary and not fnmatch.fnmatchcase(name, pattern):
            continue
        shown = os.path.join(directory, name)
        try:
            if fs.isdir(path):
                if include_sets and not temporary:
                    status = set_status(fs, path)
                    if status is not None and (status.intact or include_temporary):
                        entries.append(
                            SnapshotEntry(
                                name, shown, status.size, status.mtime, False, "set", status.intact
                            )
                        )
                continue
            st = fs.stat(path)
        except FileNotFoundError:
            continue  # removed meanwhile
        entries.append(SnapshotEntry(name, shown, int(st.size), float(st.last_modified), temporary))
    entries.sort(key=lambda e: (e.mtime, natural_key(e.name)))
    return entries


def find_latest_snapshot(directory: str, pattern: str = "*", *, fs: Any = None) -> str | None:
    """Return the path of the newest complete snapshot in ``directory``, or ``None``.

    Only committed files and complete rank sets (the set's directory is returned)
    count: temporary leftovers and incomplete sets are ignored. Newest means latest
    modification time (ties broken by name, numbers compared numerically).
    ``directory`` and ``fs`` are as in :func:`list_snapshots`.
    """
    try:
        entries = list_snapshots(
            directory, pattern, fs=fs, include_temporary=False, include_sets=True
        )
    except FileNotFoundError:
        return None
    return entries[-1].path if entries else None
