"""Rank sets on disk: the layout of a snapshot made of one file per rank.

A *rank set* is a directory holding one member file per rank, written by the ranks of
one ``torch.distributed`` job (ppe's ``SnapshotMode.SHARDED`` layout)::

    step_100/
        .snapwriter-set          tag: "a snapwriter-managed set"; written first
        0  1  2  3               the members, one per rank (each an atomic, durable file)
        snapwriter-set.json      the manifest: each member's name, size and digest
        complete                 the commit marker (ppe's name), written last

A set is **complete** when its ``complete`` marker exists; snapwriter writes the marker
only after every member is durable and the manifest lists them. A tagged set without a
marker is incomplete (in flight, or broken by a rank that died): discovery, retention
and the recursive listings ppe's ``autoload`` and ``n_retains`` read never count it.
Sets written by ppe itself (no tag, no manifest) count as complete when they have the
marker, as ppe decides.

**Member digests** (:func:`file_digest`). A member that is a zip archive (what
``torch.save`` writes) is identified by ``zip-directory:<SHA-256>``: the hash of its
central directory's entries (each record's name, CRC-32, sizes and offset), read from
the end of the file; ``torch.save`` already computed a CRC-32 of every record while
writing, and ``verify`` checks each of them against the data. Hashing the whole member
again would double the cost of writing it (SHA-256 runs at about 1 GB/s, as fast as the
write itself). Any other member is identified by ``sha256:<SHA-256 of its bytes>``.

Everything here blocks (file I/O): call it from worker threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ._paths import temp_name_for
from ._storage import LocalFileSystem, fsync_directory

__all__ = (
    "MANIFEST_NAME",
    "MARKER_NAME",
    "TAG_NAME",
    "MemberRecord",
    "SetManifest",
    "SetStatus",
    "file_digest",
    "hide_incomplete_sets",
    "hide_incomplete_set_names",
    "is_member_name",
    "read_manifest",
    "set_status",
    "write_json_atomic",
    "write_tag",
)

#: The commit marker of a set (ppe's name for it): present means complete.
MARKER_NAME = "complete"
#: The manifest, written after every member and before the marker.
MANIFEST_NAME = "snapwriter-set.json"
#: Written by each member before its file, so an unmarked set is known to be incomplete.
TAG_NAME = ".snapwriter-set"
MANIFEST_FORMAT = 2
_KNOWN_FORMATS = (1, 2)  # 1: members had "sha256" (of the bytes) instead of "digest"
_MEMBER_RE = re.compile(r"^\d+$")
_CHUNK = 4 << 20


def is_member_name(name: str) -> bool:
    """Whether ``name`` (a base name) is a member's name: a rank number."""
    return _MEMBER_RE.match(name) is not None


@dataclass(frozen=True)
class MemberRecord:
    """One member of a set, as the manifest records it.

    Attributes:
        rank: the rank that wrote it.
        name: its file name inside the set directory (the rank number).
        size: bytes.
        digest: ``zip-directory:<hex>`` or ``sha256:<hex>`` (see :func:`file_digest`).
    """

    rank: int
    name: str
    size: int
    digest: str


@dataclass(frozen=True)
class SetManifest:
    """The manifest of a committed set (``snapwriter-set.json``).

    Attributes:
        world_size: how many ranks (members) the set has.
        members: one record per rank, in rank order.
        created: when the manifest was written (seconds since the epoch).
        format: version of this layout.
    """

    world_size: int
    members: tuple[MemberRecord, ...]
    created: float = field(default_factory=time.time)
    format: int = MANIFEST_FORMAT

    def to_json(self) -> bytes:
        record = asdict(self)
        record["members"] = [asdict(m) for m in self.members]
        return json.dumps(record, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SetManifest:
        """Parse a manifest.

        Raises:
            ValueError: not a manifest of a known format.
        """
        record = json.loads(data)
        if not isinstance(record, dict) or record.get("format") not in _KNOWN_FORMATS:
            raise ValueError("not a snapwriter set manifest (unknown format)")
        members = tuple(
            MemberRecord(
                int(m["rank"]),
                str(m["name"]),
                int(m["size"]),
                str(m["digest"]) if "digest" in m else f"sha256:{m['sha256']}",
            )
            for m in record["members"]
        )
        return cls(int(record["world_size"]), members, float(record["created"]))


@dataclass(frozen=True)
class SetStatus:
    """What a directory says about itself as a rank set.

    Attributes:
        path: the set directory.
        complete: it has the commit marker.
        tagged: snapwriter wrote (or is writing) it.
        members: the member file names present, in rank order.
        manifest: its manifest, if present and readable.
        size: total bytes of the members present.
        mtime: the newest member's modification time (what ppe's autoload orders by;
            markers of sets saved back to back may land in either order).
        damaged: members the manifest lists that are missing or have another size.
    """

    path: str
    complete: bool
    tagged: bool
    members: tuple[str, ...]
    manifest: SetManifest | None
    size: int
    mtime: float
    damaged: tuple[str, ...] = ()

    @property
    def intact(self) -> bool:
        """Complete, with every member its manifest lists (sizes checked, not content)."""
        return self.complete and not self.damaged


def _names(fs: Any, directory: str) -> list[str]:
    return list(fs.list(directory))


def set_status(fs: Any, directory: str) -> SetStatus | None:
    """Describe ``directory`` as a rank set, or return ``None`` if it is not one.

    A directory is a set when it has the tag, the marker or the manifest.
    """
    try:
        names = set(_names(fs, directory))
    except (FileNotFoundError, NotADirectoryError):
        return None
    tagged = TAG_NAME in names
    complete = MARKER_NAME in names
    if not (tagged or complete or MANIFEST_NAME in names):
        return None
    members = sorted((n for n in names if is_member_name(n)), key=int)
    manifest = None
    if MANIFEST_NAME in names:
        try:
            with fs.open(posixpath.join(directory, MANIFEST_NAME), "rb") as f:
                manifest = SetManifest.from_json(f.read())
        except (OSError, ValueError, KeyError, TypeError):
            manifest = None
    size = 0
    mtime = 0.0
    sizes: dict[str, int] = {}
    for name in members:
        try:
            st = fs.stat(os.path.join(directory, name))
        except FileNotFoundError:
            continue
        sizes[name] = int(st.size)
        size += int(st.size)
        mtime = max(mtime, float(st.last_modified))
    if complete and not fs.exists(os.path.join(directory, MARKER_NAME)):
        complete = False  # removed meanwhile
    damaged: tuple[str, ...] = ()
    if manifest is not None:
        damaged = tuple(m.name for m in manifest.members if sizes.get(m.name) != m.size)
    elif tagged and complete:
        damaged = (MANIFEST_NAME,)  # snapwriter writes the manifest before the marker
    return SetStatus(directory, complete, tagged, tuple(sizes), manifest, size, mtime, damaged)


def read_manifest(fs: Any, directory: str) -> SetManifest | None:
    """The manifest of the set in ``directory``, or ``None`` (absent or unreadable)."""
    status = set_status(fs, directory)
    return None if status is None else status.manifest


def file_digest(fs: Any, path: str, *, like: str | None = None) -> tuple[int, str]:
    """Size and digest of the member ``path`` (see the module docstring).

    Args:
        fs: the file system.
        path: the member.
        like: a digest to compare with later: its scheme is used (a manifest of format
            1 recorded ``sha256:`` digests of zip members too).

    Returns:
        ``(size, "zip-directory:<hex>")`` for a zip archive, else
        ``(size, "sha256:<hex>")`` (the whole file read in chunks; the hash releases
        the GIL).
    """
    if like is None or like.startswith(_ZIP_SCHEME):
        try:
            with fs.open(path, "rb") as f:
                digest = _zip_directory_digest(f)
                if digest is not None:
                    return int(f.seek(0, os.SEEK_END)), digest
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError):
            pass  # not a zip archive (or no seekable file): hash the bytes
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, f"sha256:{h.hexdigest()}"


_ZIP_SCHEME = "zip-directory:"


def _zip_directory_digest(f: Any) -> str | None:
    """``zip-directory:<hex>`` of the archive ``f``, or None when it is none."""
    try:
        archive = zipfile.ZipFile(f)
    except zipfile.BadZipFile:
        return None
    h = hashlib.sha256()
    for info in archive.infolist():
        entry = (
            f"{info.filename}\0{info.CRC}\0{info.file_size}\0{info.compress_size}"
            f"\0{info.compress_type}\0{info.header_offset}\n"
        )
        h.update(entry.encode("utf-8", "surrogateescape"))
    return f"{_ZIP_SCHEME}{h.hexdigest()}"


def _fsync_dir_if_local(fs: Any, directory: str, durable: bool) -> None:
    if durable and isinstance(fs, LocalFileSystem):
        fsync_directory(directory)


def write_tag(fs: Any, directory: str, *, durable: bool = True) -> None:
    """Create ``directory`` and its tag before a member is written into it.

    Idempotent: every member writes it; an existing tag is kept. Not fsynced on its own:
    the member's commit fsyncs this same directory afterwards, which makes the tag's
    entry durable no later than the member's (only its existence matters).
    """
    del durable
    fs.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TAG_NAME)
    if fs.exists(path):
        return
    with fs.open(path, "wb") as f:
        f.write(b"snapwriter rank set\n")


def write_json_atomic(
    fs: Any, path: str, data: bytes, *, durable: bool = True, sync_dir: bool = True
) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename, fsync dir
    (``sync_dir=False`` leaves the directory fsync to a later write in it)."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, temp_name_for(os.path.basename(path)))
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if durable and isinstance(fs, LocalFileSystem):
                os.fsync(f.fileno())
        fs.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):  # already gone: the original error says enough
            fs.remove(tmp)
        raise
    if sync_dir:
        _fsync_dir_if_local(fs, directory, durable)


def hide_incomplete_sets(
    root: str, walk: Iterable[tuple[str, list[str], list[str]]]
) -> Iterator[str]:
    """Names of a recursive listing, without the contents of incomplete tagged sets.

    ``walk`` yields ``(dirpath, dirnames, filenames)`` top-down (as :func:`os.walk`);
    ``dirnames`` is pruned in place under a hidden set. Names are relative to ``root``.
    This is what keeps ppe's ``autoload`` and ``n_retains`` (which list recursively and
    match ``<set>/<rank>``) from ever picking a set whose marker was not written.
    """
    for dirpath, dirnames, filenames in walk:
        rel = os.path.relpath(dirpath, root)
        if TAG_NAME in filenames and MARKER_NAME not in filenames and rel != ".":
            dirnames[:] = []
            continue
        for name in sorted(dirnames) + sorted(filenames):
            yield name if rel == "." else os.path.join(rel, name)


def hide_incomplete_set_names(names: Iterable[str]) -> list[str]:
    """:func:`hide_incomplete_sets` for a ready-made recursive listing (relative names,
    ``/``-separated, directories included), such as an object store's."""
    names = list(names)
    present = set(names)
    hidden = [
        name[: -len(TAG_NAME)]
        for name in names
        if posixpath.basename(name) == TAG_NAME
        and name != TAG_NAME
        and name[: -len(TAG_NAME)] + MARKER_NAME not in present
    ]
    if not hidden:
        return names
    return [n for n in names if not any(n.startswith(prefix) for prefix in hidden)]
