"""Retention: keep the last N committed snapshots of a writer.

Runs after each commit. It counts only committed files (never temporary leftovers),
considers only names matching the writer's pattern, orders them by modification time
(ties by the numbers in their names) and never deletes the file just committed.
"""

from __future__ import annotations

import fnmatch
import os
import re
from typing import Any

from ._discovery import SnapshotEntry, list_snapshots, natural_key
from ._exceptions import InvalidSnapshotArgument

__all__ = ("apply_retention", "check_keep_last", "default_pattern")

_DIGITS = re.compile(r"\d+")


def check_keep_last(value: Any) -> int | None:
    """Validate the ``keep_last`` option (``None`` or an int >= 1)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSnapshotArgument(f"keep_last must be None or an int >= 1, not {value!r}")
    return value


def default_pattern(basename: str) -> str:
    """The glob of names "shaped like" ``basename``: every run of digits becomes ``*``.

    ``snapshot_iter_1200.pt`` gives ``snapshot_iter_*.pt``; a name without digits
    matches only itself.
    """
    parts = _DIGITS.split(basename)
    return "*".join(_escape_glob(p) for p in parts)


def _escape_glob(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def apply_retention(
    fs: Any, directory: str, pattern: str, keep_last: int, newest_path: str
) -> list[str]:
    """Delete all but the ``keep_last`` newest committed snapshots matching ``pattern``.

    Args:
        fs: the file system.
        directory: the directory holding the snapshots.
        pattern: a glob for base names of this writer's snapshots.
        keep_last: how many to keep (>= 1).
        newest_path: the snapshot just committed; it is never deleted.

    Returns:
        The deleted paths.
    """
    entries: list[SnapshotEntry] = list_snapshots(
        directory, pattern, fs=fs, include_temporary=False
    )
    entries.sort(key=lambda e: (e.mtime, natural_key(e.name)))
    newest = os.path.normpath(newest_path)
    keep = [e for e in entries if os.path.normpath(e.path) == newest]
    others = [e for e in entries if os.path.normpath(e.path) != newest]
    n_others_kept = max(0, keep_last - len(keep))
    doomed = others[: max(0, len(others) - n_others_kept)]
    removed = []
    for entry in doomed:
        if not fnmatch.fnmatchcase(entry.name, pattern):  # defensive: list filtered already
            continue
        fs.remove(entry.path)
        removed.append(entry.path)
    return removed
