"""fsspec file systems (memory, S3 through s3fs, ...) behind ppe's file-system interface.

snapwriter's storage, retention and discovery, and pytorch-pfn-extras' snapshot
extension, talk to a file system through ppe's PFIO-style interface (``open``,
``makedirs``, ``exists``, ``isdir``, ``rename``, ``remove``, ``list``, ``stat``).
:class:`FsspecFileSystem` gives that interface to any :class:`fsspec.AbstractFileSystem`;
:func:`resolve_filesystem` turns what a writer was given (``fs=`` and ``out_dir=``, which
may be a URL such as ``s3://bucket/run``) into the file system and directory it uses.

fsspec is an optional dependency (``pip install snapwriter[fsspec]``, or
``snapwriter[s3]`` for S3): nothing here imports it unless a URL or an fsspec file
system is actually given.

On an object store the commit's ``rename`` is fsspec's ``mv``: a server-side copy of the
temporary object to the final key, then a delete. The final key therefore holds the
previous complete object or the new complete one, never a partial one; a failure leaves at
worst a temporary object, removed by the writer or by a later clean-up.
"""

from __future__ import annotations

import logging
import os
import pickle
import stat as stat_module
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

from ._exceptions import InvalidSnapshotArgument
from ._paths import is_url
from ._storage import FileStat, LocalFileSystem

__all__ = ("FsspecFileSystem", "resolve_filesystem")

logger = logging.getLogger("snapwriter")

#: Protocols of fsspec's local file system; it is replaced by snapwriter's own
#: :class:`LocalFileSystem` (which fsyncs files and directories).
LOCAL_PROTOCOLS = frozenset({"file", "local"})
#: Protocols whose files live in one process's memory: a child process cannot write them.
PROCESS_LOCAL_PROTOCOLS = frozenset({"memory"})
#: Default :attr:`FsspecFileSystem.stale_temp_seconds` of stores other hosts may share.
SHARED_STORE_TEMP_GRACE = 3600.0

#: ``info()`` keys that hold a modification time, most specific first (local
#: ``mtime``, S3 ``LastModified``, GCS ``updated``, Azure ``last_modified``, memory
#: ``created``...).
_MTIME_KEYS = (
    "mtime",
    "LastModified",
    "last_modified",
    "modified",
    "updated",
    "time",
    "created",
    "ctime",
    "creation_time",
)
_WRITE_MODE_CHARS = frozenset("wax+")


def _fsspec_module() -> Any:
    """fsspec if it was imported already (an fsspec object cannot exist otherwise)."""
    return sys.modules.get("fsspec")


def _is_fsspec_filesystem(obj: Any) -> bool:
    fsspec = _fsspec_module()
    return fsspec is not None and isinstance(obj, fsspec.AbstractFileSystem)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = getattr(fs, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _timestamp(value: Any) -> float | None:
    """A POSIX timestamp from what a backend's ``info()`` gives, or ``None``."""
    if isinstance(value, datetime):
        moment: datetime = value
        if moment.tzinfo is None:  # object stores report UTC
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return float(value)
        except ValueError:
            pass
        try:
            return _timestamp(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def _first_timestamp(info: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        if key in info:
            stamp = _timestamp(info[key])
            if stamp is not None:
                return stamp
    return None


def _restore(fs: Any, origin_pid: int) -> FsspecFileSystem:
    """Unpickle an :class:`FsspecFileSystem` (in a spawned child, for instance)."""
    return FsspecFileSystem(fs, _origin_pid=origin_pid)


class FsspecFileSystem:
    """An fsspec file system with ppe's (PFIO-compatible) file-system interface.

    Writers wrap fsspec file systems in this automatically (see
    :func:`resolve_filesystem`); the wrapped one stays reachable as :attr:`fsspec`.
    Paths are the fsspec file system's own (``bucket/run/snap.pt`` for S3, ``/run``
    for memory); a URL with the file system's protocol is accepted too.

    Metadata calls (``list``, ``stat``, ``exists``, ``isdir``) drop the backend's
    listing cache for the path first, so a snapshot committed by a child process, or
    by another host, is seen at once.

    Processes: after ``fork`` the wrapped file system is rebuilt in the child (its
    connections and event loop do not survive a fork); under ``spawn`` it is pickled
    like any fsspec file system. A ``memory://`` file system lives in one process's
    memory, so writing it from another process (``ProcessWriter``, ``ProcessQueueWriter``)
    raises :class:`InvalidSnapshotArgument` instead of silently losing the file.

    Args:
        fs: the :class:`fsspec.AbstractFileSystem` to wrap.

    Attributes:
        is_local: always ``False``: no ``fsync``, no symbolic-link checks.
        process_local: whether files exist only in the creating process (memory).
        stale_temp_seconds: clean-up leaves temporary objects younger than this alone,
            as another host's save may be committing them (pids name processes of this
            host only). 0 for process-local stores, an hour otherwise.
    """

    is_local = False

    def __init__(self, fs: Any, *, _origin_pid: int | None = None) -> None:
        if not _is_fsspec_filesystem(fs):
            raise InvalidSnapshotArgument(
                f"FsspecFileSystem wraps an fsspec.AbstractFileSystem, not {type(fs).__name__}"
            )
        self._fs = fs
        self._forked_away: list[Any] = []  # clients inherited through fork: never closed
        self._pid = os.getpid()
        self._origin_pid = os.getpid() if _origin_pid is None else _origin_pid
        self.protocols = _protocols(fs)
        self.process_local = bool(PROCESS_LOCAL_PROTOCOLS.intersection(self.protocols))
        self.stale_temp_seconds = 0.0 if self.process_local else SHARED_STORE_TEMP_GRACE

    @property
    def fsspec(self) -> Any:
        """The wrapped fsspec file system (rebuilt first if this process was forked)."""
        pid = os.getpid()
        if pid != self._pid:
            if not self.process_local:
                # Connections and event loops do not survive fork: use a fresh client, and
                # keep the inherited one referenced so its finalizer never runs here.
                self._forked_away.append(self._fs)
                self._fs = pickle.loads(pickle.dumps(self._fs))
            self._pid = pid
        return self._fs

    def __reduce__(self) -> tuple[Any, tuple[Any, int]]:
        return _restore, (self._fs, self._origin_pid)

    def _for_writing(self, path: str) -> Any:
        """The file system, checked to be writable from this process."""
        fs = self.fsspec
        if self.process_local and os.getpid() != self._origin_pid:
            raise InvalidSnapshotArgument(
                f"cannot write {path!r}: a {self.protocols[0]}:// file system keeps its files "
                "in the memory of the process that created the writer, and this is another "
                "process (ProcessWriter / ProcessQueueWriter). Use a thread-based writer "
                "(StandardWriter, ThreadWriter, QueueWriter) or a shared store"
            )
        return fs

    def _fresh(self, path: str) -> Any:
        """The file system, with its listing cache for ``path`` dropped."""
        fs = self.fsspec
        fs.invalidate_cache(path)
        return fs

    def _strip(self, path: str) -> str:
        return str(self.fsspec._strip_protocol(path))

    # -- ppe / PFIO interface --------------------------------------------------------

    def open(self, file_path: str, mode: str = "r", buffering: int = -1, **kwargs: Any) -> IO[Any]:
        """Open a file (``buffering`` is ignored; the backend buffers).

        Writes on object stores are uploaded when the file is closed.

        Raises:
            InvalidSnapshotArgument: writing a process-local (memory) file system from
                another process than the one that created this object.
        """
        writes = bool(_WRITE_MODE_CHARS.intersection(mode))
        fs = self._for_writing(file_path) if writes else self.fsspec
        return fs.open(file_path, mode, **kwargs)  # type: ignore[no-any-return]

    def makedirs(self, file_path: str, mode: int = 0o777, exist_ok: bool = False) -> None:
        """Create a directory and its parents (a no-op below an S3 bucket).

        ``mode`` is ignored. On S3 a missing bucket is created, as s3fs does.
        """
        self._for_writing(file_path).makedirs(file_path, exist_ok=exist_ok)

    def exists(self, file_path: str) -> bool:
        """Whether ``file_path`` exists (as a file or a directory)."""
        return bool(self._fresh(file_path).exists(file_path))

    def isdir(self, file_path: str) -> bool:
        """Whether ``file_path`` is a directory (on S3: a prefix with objects under it)."""
        return bool(self._fresh(file_path).isdir(file_path))

    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` onto ``dst``, replacing it.

        fsspec's ``mv``: a rename where the backend has one, else a copy then a delete
        (on S3 a server-side copy, so ``dst`` appears complete or not at all).
        """
        self._for_writing(dst).mv(src, dst)

    def commit_rename(self, src: str, dst: str) -> None:
        """Move the temporary object ``src`` onto ``dst`` for a commit.

        A copy (server-side on S3), then a delete of ``src``. Once the copy returned,
        ``dst`` holds the new snapshot: a failing delete is logged, not raised, since
        reporting the committed snapshot as failed would be false. The left-over
        temporary object is removed by a later clean-up.
        """
        fs = self._for_writing(dst)
        fs.copy(src, dst)
        try:
            fs.rm_file(src)
        except Exception as exc:
            logger.warning(
                "snapwriter: committed %s, but could not delete its temporary object %s "
                "(a later clean-up removes it): %s: %s",
                dst,
                src,
                type(exc).__name__,
                exc,
            )
        fs.invalidate_cache(dst)

    def remove(self, file_path: str, recursive: bool = False) -> None:
        """Delete a file, an empty directory, or (``recursive``) a whole tree."""
        fs = self._for_writing(file_path)
        fs.invalidate_cache(file_path)
        if recursive:
            fs.rm(file_path, recursive=True)
        elif fs.isdir(file_path):
            fs.rmdir(file_path)
        else:
            fs.rm_file(file_path)

    def list(self, path_or_prefix: str | None = None, recursive: bool = False) -> Iterator[str]:
        """Yield the names under a directory, relative to it (ppe's ``list``).

        Raises:
            FileNotFoundError: the directory does not exist (non-recursive listing).
            NotADirectoryError: the path is a file.
        """
        root = path_or_prefix or ""
        fs = self._fresh(root)
        base = self._strip(root).rstrip("/")
        if recursive:
            entries = fs.find(root, withdirs=True, detail=False)
            names = list(self._relative(entries, base))
            # Rank sets whose marker is missing are hidden (see snapwriter._manifest).
            from ._manifest import hide_incomplete_set_names

            yield from hide_incomplete_set_names(names)
            return
        else:
            entries = fs.ls(root, detail=False)
            if [str(e).rstrip("/") for e in entries] == [base] and not fs.isdir(root):
                raise NotADirectoryError(root)
        yield from self._relative(entries, base)

    @staticmethod
    def _relative(entries: Any, base: str) -> Iterator[str]:
        for entry in sorted(str(e).rstrip("/") for e in entries):
            if not base:
                name = entry.lstrip("/")
            elif entry.startswith(base + "/"):
                name = entry[len(base) + 1 :]
            else:
                continue  # the directory itself
            if name:
                yield name

    def stat(self, path: str) -> FileStat:
        """Size and times of ``path``, from whatever keys the backend reports.

        Raises:
            FileNotFoundError: ``path`` does not exist.
        """
        fs = self._fresh(path)
        info = fs.info(path)
        mtime = _first_timestamp(info, _MTIME_KEYS)
        if mtime is None:
            try:
                mtime = _timestamp(fs.modified(path))
            except (NotImplementedError, AttributeError, OSError, ValueError):
                mtime = None
        mtime = 0.0 if mtime is None else mtime
        created = _first_timestamp(info, ("created", "ctime", "creation_time"))
        is_dir = info.get("type") == "directory"
        mode = (stat_module.S_IFDIR | 0o755) if is_dir else (stat_module.S_IFREG | 0o644)
        return FileStat(
            filename=path,
            last_modified=mtime,
            last_accessed=mtime,
            created=mtime if created is None else created,
            mode=mode,
            size=int(info.get("size") or 0),
        )

    def close(self) -> None:
        """Nothing to release (the wrapped file system manages its connections)."""

    def __enter__(self) -> FsspecFileSystem:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FsspecFileSystem({self._fs!r})"


def _directory_on(fs: Any, out_dir: str) -> str:
    """``out_dir`` as a path of the fsspec file system ``fs`` (its protocol stripped)."""
    if not is_url(out_dir):
        return out_dir
    protocol = out_dir.split("://", 1)[0].split("::", 1)[0]
    protocols = _protocols(fs)
    if protocol not in protocols:
        raise InvalidSnapshotArgument(
            f"out_dir {out_dir!r} is a {protocol}:// URL but the file system given as fs "
            f"handles {', '.join(p + '://' for p in protocols) or 'no URL'}"
        )
    return str(fs._strip_protocol(out_dir))


def resolve_filesystem(fs: Any, out_dir: str | os.PathLike[str]) -> tuple[Any, str]:
    """Return the file system and directory a writer uses for ``fs`` and ``out_dir``.

    * ``fs=None`` and a plain path: snapwriter's :class:`LocalFileSystem`.
    * ``fs=None`` and a URL (``s3://bucket/run``, ``memory://run``, ``file:///run``):
      the file system fsspec makes for it (``fsspec.core.url_to_fs``; credentials and
      endpoint from the environment, as fsspec and s3fs read them).
    * an fsspec local file system: snapwriter's :class:`LocalFileSystem`, which keeps
      ``fsync`` of files and directories and the symbolic-link checks.
    * any other fsspec file system: wrapped in :class:`FsspecFileSystem`.
    * anything else (ppe / PFIO file systems, :class:`LocalFileSystem`,
      :class:`FsspecFileSystem`): returned as given.

    With an fsspec file system, ``out_dir`` may be a path of it or a URL with its
    protocol (which is stripped).

    Args:
        fs: the ``fs`` given to a writer (``None`` for "from ``out_dir``").
        out_dir: the ``out_dir`` given to a writer (``""`` for none).

    Returns:
        ``(file_system, directory)``.

    Raises:
        InvalidSnapshotArgument: ``out_dir`` is a URL of another protocol than ``fs``'s.
        ImportError: ``out_dir`` is a URL and fsspec (or its backend, such as s3fs) is
            not installed.
    """
    directory = os.fspath(out_dir)
    if fs is None:
        if not is_url(directory):
            return LocalFileSystem(), directory
        try:
            import fsspec.core
        except ImportError as exc:
            raise ImportError(
                f"out_dir {directory!r} is a URL: install fsspec to use it "
                "(pip install 'snapwriter[fsspec]', or 'snapwriter[s3]' for s3://)"
            ) from exc
        fs, directory = fsspec.core.url_to_fs(directory)
    if isinstance(fs, FsspecFileSystem):
        return fs, _directory_on(fs.fsspec, directory)
    if not _is_fsspec_filesystem(fs):
        return fs, directory
    directory = _directory_on(fs, directory)
    if LOCAL_PROTOCOLS.intersection(_protocols(fs)):
        return LocalFileSystem(), directory
    return FsspecFileSystem(fs), directory
