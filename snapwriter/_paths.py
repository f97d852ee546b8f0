"""Filename validation and temporary-file naming.

Nothing outside ``out_dir`` is ever written: every filename is checked here, at call
time, before any byte goes to disk.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from ._compat import register_at_fork
from ._exceptions import InvalidSnapshotArgument

__all__ = (
    "FOREIGN_TEMP_SECONDS",
    "TEMP_MARKER",
    "Destination",
    "check_local_destination",
    "is_temp_name",
    "is_url",
    "resolve_destination",
    "temp_is_foreign",
    "temp_may_be_removed",
    "temp_name_for",
    "temp_owner_alive",
)

#: Every temporary file snapshot writers create contains this marker. The full pattern is
#: ``.<final name>.snapwriter-tmp-<host>-<boot>-<pid>-<hex token>``: a hidden file that
#: neither starts nor ends like the final name, so prefix/suffix matchers (ppe's
#: ``n_retains`` and ``autoload``) never mistake it for a snapshot. ``<host>`` (8 hex
#: digits, a hash of the host name) and ``<boot>`` (6 hex digits, a hash of the kernel's
#: boot id where there is one) say where the writing process runs, ``<pid>`` which one:
#: a clean-up judges by pid only the temporary files of this host and this boot.
TEMP_MARKER = ".snapwriter-tmp-"
_TEMP_RE = re.compile(
    r"^\..+"
    + re.escape(TEMP_MARKER)
    + r"(?:(?P<host>[0-9a-f]{8})-(?P<boot>[0-9a-f]{6})-)?(?P<pid>\d+)-(?P<token>[0-9a-f]{16})$"
)

#: Temporary files of another host (on a shared directory: NFS, Lustre...) are removed
#: only once they have not been modified for this long: their writer may still be
#: saving, and its pid means nothing here. A save keeps its file's modification time
#: fresh while it writes.
FOREIGN_TEMP_SECONDS = 3600.0


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:n]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:  # not Linux: no boot id, the host name alone tells hosts apart
        return ""


#: This host and this boot, as they appear in temporary names (see ``TEMP_MARKER``).
HOST_ID = _digest(socket.gethostname(), 8)
BOOT_ID = _digest(_boot_id(), 6)

#: Drawn per process (again after fork): tells this process's temporary files from those
#: of a crashed earlier process that had the same pid (PID 1 in containers).
_PROCESS_TOKEN = secrets.token_hex(4)


def _new_process_token() -> None:
    global _PROCESS_TOKEN
    _PROCESS_TOKEN = secrets.token_hex(4)


register_at_fork(after_in_child=_new_process_token)
#: A URL (``s3://bucket/run``) or an fsspec chained URL (``simplecache::s3://...``).
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(://|::)")


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``proto://...``) rather than a file-system path."""
    return _URL_RE.match(path) is not None


def temp_name_for(basename: str) -> str:
    """Return a fresh temporary name, in the same directory, for ``basename``."""
    token = f"{_PROCESS_TOKEN}{secrets.token_hex(4)}"
    return f".{basename}{TEMP_MARKER}{HOST_ID}-{BOOT_ID}-{os.getpid()}-{token}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` (a path or base name) is a temporary file of a snapshot writer."""
    return _TEMP_RE.match(posixpath.basename(name)) is not None


def temp_is_foreign(name: str) -> bool:
    """Whether temporary file ``name`` was made on another host (its pid means nothing here).

    Names of snapwriter versions without a host part count as this host's.
    """
    match = _TEMP_RE.match(posixpath.basename(name))
    host = None if match is None else match.group("host")
    return host is not None and host != HOST_ID


def temp_owner_alive(name: str) -> bool:
    """Whether the process that created temporary file ``name`` may still run.

    On this host and boot, by its pid; a file of an earlier boot of this host is
    dead; a file of another host counts as alive (see :func:`temp_may_be_removed`).
    """
    match = _TEMP_RE.match(posixpath.basename(name))
    if match is None:
        return False
    host, boot = match.group("host"), match.group("boot")
    if host is not None and host != HOST_ID:
        return True
    if boot is not None and boot != BOOT_ID:
        return False  # this host rebooted since: nothing of that boot runs
    pid = int(match.group("pid"))
    if pid <= 0:
        return False
    if pid == os.getpid():  # ours only if this very process (not a namesake) made it
        return match.group("token").startswith(_PROCESS_TOKEN)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def temp_may_be_removed(name: str, mtime: float | None, *, now: float | None = None) -> bool:
    """Whether a clean-up may remove temporary file ``name`` (last modified at ``mtime``).

    This host's temporary files go as soon as their process is dead; another host's only
    after :data:`FOREIGN_TEMP_SECONDS` without modification (``mtime`` ``None``: never).
    """
    if temp_is_foreign(name):
        if mtime is None:
            return False
        return (time.time() if now is None else now) - mtime > FOREIGN_TEMP_SECONDS
    return not temp_owner_alive(name)


def _is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and only waits to be reaped (Linux; else ``False``).

    A killed saving process stays a zombie until its parent reaps it; its temporary
    file is already abandoned.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # "pid (comm) state ...": comm may contain spaces and parentheses
    end_of_comm = stat.rfind(b")")
    state = stat[end_of_comm + 2 : end_of_comm + 3]
    return state in (b"Z", b"X")


@dataclass(frozen=True)
class Destination:
    """Where one snapshot goes.

    Attributes:
        out_dir: the directory the writer owns, as given (``"."`` when empty).
        relpath: the validated, normalised filename relative to ``out_dir``.
        path: ``out_dir`` joined with ``relpath``: the final name of the file.
    """

    out_dir: str
    relpath: str
    path: str

    @property
    def directory(self) -> str:
        """The directory that holds the final file (and its temporary sibling)."""
        return os.path.dirname(self.path) or "."

    @property
    def basename(self) -> str:
        return os.path.basename(self.path)


def _as_str(value: object, what: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        raise InvalidSnapshotArgument(f"{what} must be a str, not bytes: {value!r}")
    if not isinstance(value, str):
        raise InvalidSnapshotArgument(
            f"{what} must be a str or os.PathLike, not {type(value).__name__}"
        )
    if "\x00" in value:
        raise InvalidSnapshotArgument(f"{what} contains a NUL byte: {value!r}")
    return value


def _inside(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` (both made absolute) if it lies inside, else ``None``."""
    absolute_root = os.path.abspath(root)
    absolute = os.path.abspath(path)
    if absolute == absolute_root:
        return None
    if not absolute.startswith(absolute_root.rstrip(os.sep) + os.sep):
        return None
    return os.path.relpath(absolute, absolute_root).replace(os.sep, "/")


def resolve_destination(
    out_dir: object, filename: object, call_out_dir: object = ""
) -> Destination:
    """Validate ``filename`` against the writer's ``out_dir`` and return where the file goes.

    ppe's rule: a relative filename is relative to the writer's ``out_dir`` (the current
    directory when empty) and the call's ``out_dir`` is ignored. An absolute filename is
    accepted when it lies inside the writer's ``out_dir`` or, that one being empty,
    inside the call's; when neither is given, anywhere.

    Pure string checks, no file-system access (safe on an event loop);
    :func:`check_local_destination` completes them before the write.

    Args:
        out_dir: the writer's output directory (``""`` means the current directory).
        filename: a file name, relative (possibly with sub-directories) or absolute.
        call_out_dir: the ``out_dir`` given to the call; it only confines absolute names.

    Raises:
        InvalidSnapshotArgument: the filename is not a string, is empty, contains a NUL
            byte, escapes ``out_dir`` through ``..``, is absolute outside the directory
            that confines it, or ends with a separator; or ``out_dir`` is a URL (URLs go to
            the writer's constructor).
    """
    given = _as_str(out_dir, "out_dir")
    out = given or "."
    if is_url(out):
        raise InvalidSnapshotArgument(
            f"out_dir {out!r} is a URL: give URLs to the writer's constructor "
            f"(for example StandardWriter(out_dir={out!r})), which picks the file system "
            "for them; the out_dir of a call must be a path on the writer's file system"
        )
    name = _as_str(filename, "filename")
    if not name:
        raise InvalidSnapshotArgument("filename is empty")
    if name.endswith(("/", os.sep)):
        raise InvalidSnapshotArgument(f"filename {name!r} names a directory")
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        return _absolute_destination(given, name, _as_str(call_out_dir, "out_dir"))
    rel = posixpath.normpath(name.replace(os.sep, "/"))
    if rel in (".", "..") or rel.startswith("../"):
        raise InvalidSnapshotArgument(f"filename {name!r} escapes out_dir {out!r}")
    return Destination(out_dir=out, relpath=rel, path=os.path.join(out, rel))


def _absolute_destination(out_dir: str, name: str, call_out_dir: str) -> Destination:
    confining = out_dir or ("" if is_url(call_out_dir) else call_out_dir)
    if not confining:  # nothing confines it (ppe: os.path.join("", name) is name)
        path = os.path.normpath(name)
        return Destination(out_dir=os.path.dirname(path), relpath=os.path.basename(path), path=path)
    rel = _inside(name, confining)
    if rel is None:
        raise InvalidSnapshotArgument(
            f"filename {name!r} is absolute and outside out_dir {confining!r}; give a name "
            "relative to out_dir, or an absolute one inside it"
        )
    if out_dir:
        return Destination(out_dir=out_dir, relpath=rel, path=os.path.join(out_dir, rel))
    path = os.path.normpath(name)
    return Destination(out_dir=os.path.normpath(confining), relpath=rel, path=path)


def check_local_destination(dest: Destination, local: Callable[[str], str] = str) -> None:
    """File-system checks of a local destination, made before anything is written.

    Args:
        dest: the destination.
        local: maps a path of the writer's file system to a local path (ppe's
            ``_PosixFileSystem`` joins its root; snapwriter's own is the identity).

    Raises:
        InvalidSnapshotArgument: the file's directory resolves (through symbolic links)
            outside ``out_dir``, or the final name is an existing directory.
    """
    root = os.path.realpath(local(dest.out_dir))
    parent = os.path.realpath(local(dest.directory))
    if parent != root and not parent.startswith(root.rstrip(os.sep) + os.sep):
        raise InvalidSnapshotArgument(
            f"snapshot {dest.path!r} escapes out_dir {dest.out_dir!r} through a symbolic link "
            f"(its directory resolves to {parent!r})"
        )
    if os.path.isdir(local(dest.path)):
        raise InvalidSnapshotArgument(f"snapshot {dest.path!r} names an existing directory")
