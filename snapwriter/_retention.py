"""Retention: keep the last N committed snapshots of a writer.

Runs after each commit. It counts only committed files (never temporary leftovers),
considers only names matching the writer's pattern, orders them by modification time
(ties by the numbers in their names) and never deletes the file just committed.

By default a name matches when it is the committed name with its numbers changed:
``model_3.pt`` owns ``model_12.pt``, never ``model_best.pt``, ``model_3_ema.pt`` or
``model_3.pt.bak``. Deleting a file the writer does not own (the best checkpoint) is the
worst thing retention can do, so the default is anchored and digits-only.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable
from typing import Any

from ._discovery import SnapshotEntry, list_snapshots, natural_key
from ._exceptions import InvalidSnapshotArgument

__all__ = ("apply_retention", "check_keep_last", "default_pattern", "matcher")

Matcher = Callable[[str], bool]

_DIGITS = re.compile(r"[0-9]+")


def check_keep_last(value: Any) -> int | None:
    """Validate the ``keep_last`` option (``None`` or an int >= 1)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSnapshotArgument(f"keep_last must be None or an int >= 1, not {value!r}")
    return value


def default_pattern(basename: str) -> re.Pattern[str]:
    """The names "shaped like" ``basename``: the same text, each run of digits free.

    Anchored at both ends; every digit run matches digits only
    (``snapshot_iter_1200.pt`` gives ``^snapshot_iter_[0-9]+\\.pt$``); a name without
    digits matches only itself.
    """
    parts = _DIGITS.split(basename)
    return re.compile("[0-9]+".join(re.escape(p) for p in parts), re.ASCII)


def matcher(keep_pattern: str | None, basename: str) -> Matcher:
    """What retention may delete: names matching the glob ``keep_pattern``, or by default
    those :func:`default_pattern` gives for ``basename``."""
    if keep_pattern is not None:
        return lambda name: fnmatch.fnmatchcase(name, keep_pattern)
    regex = default_pattern(basename)
    return lambda name: regex.fullmatch(name) is not None


def apply_retention(
    fs: Any, directory: str, matches: Matcher, keep_last: int, newest_path: str
) -> list[str]:
    """Delete all but the ``keep_last`` newest committed snapshots ``matches`` accepts.

    Args:
        fs: the file system.
        directory: the directory holding the snapshots.
        matches: tells the base names of this writer's snapshots (see :func:`matcher`).
        keep_last: how many to keep (>= 1).
        newest_path: the snapshot just committed; it is never deleted.

    Returns:
        The deleted paths.
    """
    entries: list[SnapshotEntry] = [
        e for e in list_snapshots(directory, "*", fs=fs, include_temporary=False) if matches(e.name)
    ]
    entries.sort(key=lambda e: (e.mtime, natural_key(e.name)))
    newest = os.path.normpath(newest_path)
    keep = [e for e in entries if os.path.normpath(e.path) == newest]
    others = [e for e in entries if os.path.normpath(e.path) != newest]
    n_others_kept = max(0, keep_last - len(keep))
    doomed = others[: max(0, len(others) - n_others_kept)]
    removed = []
    for entry in doomed:
        fs.remove(entry.path)
        removed.append(entry.path)
    return removed
