"""Filename validation and temporary-file naming.

Nothing outside ``out_dir`` is ever written: every filename is checked here, at call
time, before any byte goes to disk.
"""

from __future__ import annotations

import os
import posixpath
import re
import secrets
from dataclasses import dataclass

from ._exceptions import InvalidSnapshotArgument

__all__ = (
    "TEMP_MARKER",
    "Destination",
    "check_local_destination",
    "is_temp_name",
    "is_url",
    "resolve_destination",
    "temp_name_for",
    "temp_owner_alive",
)

#: Every temporary file snapshot writers create contains this marker. The full pattern is
#: ``.<final name>.snapwriter-tmp-<pid>-<hex token>``: a hidden file that neither starts
#: nor ends like the final name, so prefix/suffix matchers (ppe's ``n_retains`` and
#: ``autoload``) never mistake it for a snapshot. The pid of the writing process lets a
#: clean-up leave alone the temporary files of saves still running in live processes.
TEMP_MARKER = ".snapwriter-tmp-"
_TEMP_RE = re.compile(r"^\..+" + re.escape(TEMP_MARKER) + r"(\d+)-([0-9a-f]{16})$")

#: Drawn per process (again after fork): tells this process's temporary files from those
#: of a crashed earlier process that had the same pid (PID 1 in containers).
_PROCESS_TOKEN = secrets.token_hex(4)


def _new_process_token() -> None:
    global _PROCESS_TOKEN
    _PROCESS_TOKEN = secrets.token_hex(4)


os.register_at_fork(after_in_child=_new_process_token)
#: A URL (``s3://bucket/run``) or an fsspec chained URL (``simplecache::s3://...``).
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(://|::)")


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``proto://...``) rather than a file-system path."""
    return _URL_RE.match(path) is not None


def temp_name_for(basename: str) -> str:
    """Return a fresh temporary name, in the same directory, for ``basename``."""
    return f".{basename}{TEMP_MARKER}{os.getpid()}-{_PROCESS_TOKEN}{secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` (a path or base name) is a temporary file of a snapshot writer."""
    return _TEMP_RE.match(posixpath.basename(name)) is not None


def temp_owner_alive(name: str) -> bool:
    """Whether the process that created temporary file ``name`` still runs (this host)."""
    match = _TEMP_RE.match(posixpath.basename(name))
    if match is None:
        return False
    pid = int(match.group(1))
    if pid <= 0:
        return False
    if pid == os.getpid():  # ours only if this very process (not a namesake) made it
        return match.group(2).startswith(_PROCESS_TOKEN)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


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


def resolve_destination(out_dir: object, filename: object) -> Destination:
    """Validate ``filename`` against ``out_dir`` and return where the file goes.

    Pure string checks, no file-system access (safe on an event loop);
    :func:`check_local_destination` completes them before the write.

    Args:
        out_dir: the output directory (``""`` means the current directory).
        filename: a relative file name, possibly with sub-directories.

    Raises:
        InvalidSnapshotArgument: the filename is not a string, is empty, absolute,
            contains a NUL byte, escapes ``out_dir`` through ``..`` or ends with a
            separator; or ``out_dir`` is a URL (URLs go to the writer's constructor).
    """
    out = _as_str(out_dir, "out_dir") or "."
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
        raise InvalidSnapshotArgument(
            f"filename {name!r} is absolute; it must be relative to out_dir"
        )
    rel = posixpath.normpath(name.replace(os.sep, "/"))
    if rel in (".", "..") or rel.startswith("../"):
        raise InvalidSnapshotArgument(f"filename {name!r} escapes out_dir {out!r}")
    return Destination(out_dir=out, relpath=rel, path=os.path.join(out, rel))


def check_local_destination(dest: Destination) -> None:
    """File-system checks of a local destination, made before anything is written.

    Raises:
        InvalidSnapshotArgument: the file's directory resolves (through symbolic links)
            outside ``out_dir``, or the final name is an existing directory.
    """
    root = os.path.realpath(dest.out_dir)
    parent = os.path.realpath(dest.directory)
    if parent != root and not parent.startswith(root.rstrip(os.sep) + os.sep):
        raise InvalidSnapshotArgument(
            f"snapshot {dest.path!r} escapes out_dir {dest.out_dir!r} through a symbolic link "
            f"(its directory resolves to {parent!r})"
        )
    if os.path.isdir(dest.path):
        raise InvalidSnapshotArgument(f"snapshot {dest.path!r} names an existing directory")
