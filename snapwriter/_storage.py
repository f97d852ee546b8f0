"""Storage: file systems and the atomic, durable write protocol.

The protocol for one snapshot at ``dir/name``:

1. *write*: ``savefun(target, f)`` into ``dir/.name.snapwriter-tmp-<token>``, then flush
   and ``fsync`` it (blocking; runs in a worker thread or a child process);
2. *commit*: ``os.replace`` the temporary file onto ``dir/name`` and ``fsync`` ``dir``
   (coroutines using :mod:`aiofiles`, so the event loop never blocks).

The final name therefore always holds either the previous complete file or the new
complete one, never a partial file and never nothing. A crash leaves at worst a
temporary file, recognisable by name (:func:`snapwriter.is_temp_name`) and removed by the
next writer that initialises the directory.

On a remote file system (:class:`snapwriter._fsspec.FsspecFileSystem`: memory, S3...) the
temporary object is uploaded when its file closes, and the commit is the file system's
``rename`` (on an object store a server-side copy then a delete, so the final key appears
complete or not at all); there is nothing to ``fsync``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import stat as stat_module
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import aiofiles.os
import anyio.to_thread

from ._exceptions import InvalidSnapshotArgument
from ._paths import (
    Destination,
    check_local_destination,
    is_temp_name,
    temp_may_be_removed,
    temp_name_for,
)
from ._writeback import Writeback

__all__ = ("FileStat", "LocalFileSystem", "Storage", "local_paths")

logger = logging.getLogger("snapwriter")


@dataclass(frozen=True)
class FileStat:
    """What :meth:`LocalFileSystem.stat` returns (the PFIO/ppe stat fields)."""

    filename: str
    last_modified: float
    last_accessed: float
    created: float
    mode: int
    size: int


class LocalFileSystem:
    """The local file system, with ppe's (PFIO-compatible) file-system interface.

    This is the default ``fs`` of every snapwriter writer. It offers what
    pytorch-pfn-extras' snapshot extension uses (``open``, ``makedirs``, ``exists``,
    ``rename``, ``remove``, ``list``, ``stat``, ``isdir``), plus the durability
    primitives snapwriter's commit needs. Paths are used as given (relative paths are
    relative to the current directory). All methods block; they are thread-safe.
    """

    is_local = True

    def open(self, file_path: str, mode: str = "r", buffering: int = -1, **kwargs: Any) -> IO[Any]:
        return open(file_path, mode, buffering, **kwargs)

    def makedirs(self, file_path: str, mode: int = 0o777, exist_ok: bool = False) -> None:
        os.makedirs(file_path, mode, exist_ok)

    def exists(self, file_path: str) -> bool:
        return os.path.exists(file_path)

    def isdir(self, file_path: str) -> bool:
        return os.path.isdir(file_path)

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def remove(self, file_path: str, recursive: bool = False) -> None:
        if recursive:
            shutil.rmtree(file_path)
        elif os.path.isdir(file_path):
            os.rmdir(file_path)
        else:
            os.remove(file_path)

    def list(self, path_or_prefix: str | None = None, recursive: bool = False) -> Iterator[str]:
        root = path_or_prefix or "."
        if not recursive:
            for entry in os.scandir(root):
                yield entry.name
            return
        # Rank sets whose marker is missing are hidden (see snapwriter._manifest).
        from ._manifest import hide_incomplete_sets

        yield from hide_incomplete_sets(root, os.walk(root))

    def stat(self, path: str) -> FileStat:
        st = os.stat(path)
        return FileStat(path, st.st_mtime, st.st_atime, st.st_ctime, st.st_mode, st.st_size)

    def close(self) -> None:
        """Nothing to release; present for PFIO compatibility."""

    def __enter__(self) -> LocalFileSystem:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "LocalFileSystem()"


def fsync_directory(path: str) -> None:
    """``fsync`` a directory so a rename in it survives a power loss."""
    fd = os.open(path or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_file(f: IO[Any]) -> None:
    try:
        fd = f.fileno()
    except (AttributeError, io.UnsupportedOperation, OSError):
        return  # not backed by a local descriptor (remote fs): its close() commits
    os.fsync(fd)


_afsync_directory = aiofiles.os.wrap(fsync_directory)


def _identity(path: str) -> str:
    return path


def local_paths(fs: Any) -> Callable[[str], str] | None:
    """How paths of ``fs`` map to local paths, or ``None`` for a file system that is not
    local (then there is nothing to ``fsync`` and no symbolic link to check).

    Local: snapwriter's :class:`LocalFileSystem`, any file system whose ``is_local``
    attribute is ``True``, and pytorch-pfn-extras' own ``_PosixFileSystem`` (its paths
    are relative to its ``root``).
    """
    if isinstance(fs, LocalFileSystem) or getattr(fs, "is_local", False) is True:
        return _identity
    ppe_base = sys.modules.get("pytorch_pfn_extras.writing._writer_base")
    posix = getattr(ppe_base, "_PosixFileSystem", None)
    if isinstance(posix, type) and isinstance(fs, posix):
        mapper: Callable[[str], str] = getattr(fs, "get_actual_path")  # noqa: B009
        return mapper
    return None


def _missing_directories(path: str) -> tuple[list[str], str]:
    """The directories ``makedirs(path)`` would create (deepest first), and the first
    existing ancestor."""
    missing = []
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return missing, probe


class _TempFileWriter:
    """The file object ``savefun`` gets: the real one, remembering the first ``OSError``
    its ``write`` raised (serializers may re-raise it as something without errno), and
    kicking early writeback of a durable local file as it grows
    (:mod:`snapwriter._writeback`)."""

    def __init__(self, f: IO[Any], writeback: Writeback | None) -> None:
        self._f = f
        self._writeback = writeback
        self.os_error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            n = int(self._f.write(data))
            if self._writeback is not None:
                self._writeback.wrote(n)
            return n
        except OSError as exc:
            if self.os_error is None:
                self.os_error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class Storage:
    """Runs the write/commit protocol over a file system.

    Args:
        fs: :class:`LocalFileSystem`, an :class:`~snapwriter._fsspec.FsspecFileSystem`
            or any object with ppe's file-system interface (``open``, ``makedirs``,
            ``exists``, ``rename``, ``remove``, ``list``).
        durable: ``fsync`` the file and its directory (turn off only if losing the last
            snapshots on power loss is acceptable).
    """

    def __init__(self, fs: Any, *, durable: bool = True) -> None:
        self.fs = fs
        self.durable = durable
        self._local = local_paths(fs)
        self.is_local = self._local is not None

    def local(self, path: str) -> str:
        """The local path of ``path`` (local file systems only)."""
        assert self._local is not None
        return self._local(path)

    def makedirs(self, directory: str) -> None:
        """Create ``directory`` and its parents; on a local file system with ``durable``,
        ``fsync`` every new directory and the existing one that holds the first, so the
        new entries survive a power loss."""
        if not (self.is_local and self.durable):
            self.fs.makedirs(directory, exist_ok=True)
            return
        missing, existing = _missing_directories(self.local(directory))
        self.fs.makedirs(directory, exist_ok=True)
        if missing:
            for new in missing:
                fsync_directory(new)
            fsync_directory(existing)

    # -- write (blocking: worker thread or child process) -------------------------------

    @staticmethod
    def temp_path(dest: Destination) -> str:
        """A fresh temporary path next to ``dest``, named for this process (its
        clean-ups leave it alone while the process lives)."""
        return os.path.join(dest.directory, temp_name_for(dest.basename))

    def write_temp(
        self,
        dest: Destination,
        savefun: Callable[..., Any],
        target: Any,
        kwds: dict[str, Any],
        *,
        tmp: str | None = None,
    ) -> tuple[str, int]:
        """Serialize ``target`` into a fresh temporary file next to ``dest`` (named
        ``tmp`` when given: a :meth:`temp_path` of the process that commits it).

        Returns:
            The temporary path and the number of bytes written.

        Raises:
            InvalidSnapshotArgument: the destination escapes ``out_dir`` through a
                symbolic link or is a directory (local file system; nothing written).
            ValueError: ``savefun`` wrote no byte (an empty snapshot is refused).
            Whatever ``savefun`` or the file system raised; the temporary file is removed.
        """
        self._check(dest)
        self.makedirs(dest.directory)
        if tmp is None:
            tmp = self.temp_path(dest)
        recorder: _TempFileWriter | None = None
        try:
            with self.fs.open(tmp, "wb") as f:
                early = Writeback.of(f) if self.durable and self.is_local else None
                recorder = _TempFileWriter(f, early)
                savefun(target, recorder, **kwds)
                f.flush()
                nbytes = f.tell()
                if nbytes == 0:
                    # An empty file committed over a good snapshot destroys it silently.
                    raise ValueError(
                        f"savefun {getattr(savefun, '__name__', savefun)!r} wrote nothing; "
                        f"refusing to replace {dest.path!r} with an empty file"
                    )
                if self.durable:
                    _fsync_file(f)
        except BaseException as exc:
            self.remove_quietly(tmp)
            first = recorder.os_error if recorder is not None else None
            if first is not None and first is not exc and not isinstance(exc, OSError):
                # torch.save turns a failed write into a RuntimeError without errno:
                # surface the OSError (ENOSPC, EIO...) itself.
                raise first from exc
            raise
        return tmp, int(nbytes)

    def write_append(
        self,
        dest: Destination,
        savefun: Callable[..., Any],
        target: Any,
        kwds: dict[str, Any],
    ) -> int:
        """Append to the final file directly (ppe's ``append=True``; not atomic).

        Raises:
            InvalidSnapshotArgument: (local file systems) the final name is a symbolic
                link: it is not followed (``O_NOFOLLOW``), nothing is written.
        """
        self._check(dest)
        self.makedirs(dest.directory)
        created = False
        with self._open_append(dest) as f:
            start = f.tell()
            created = start == 0
            savefun(target, f, **kwds)
            f.flush()
            nbytes = f.tell() - start
            if self.durable:
                _fsync_file(f)
        if created and self.durable and self.is_local:
            fsync_directory(self.local(dest.directory))
        return int(nbytes)

    def _open_append(self, dest: Destination) -> IO[Any]:
        if not self.is_local:
            return self.fs.open(dest.path, "ab")  # type: ignore[no-any-return]
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        flags |= getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.local(dest.path), flags, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidSnapshotArgument(
                    f"snapshot {dest.path!r} is a symbolic link: append=True does not "
                    "follow it (it could point outside out_dir)"
                ) from exc
            raise
        return os.fdopen(fd, "ab")

    def _check(self, dest: Destination) -> None:
        if self._local is not None:
            check_local_destination(dest, self._local)

    def remove_quietly(self, path: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.remove(path)

    # -- commit (coroutines: never block the loop) --------------------------------------

    def commit(self, tmp: str, dest: Destination) -> None:
        """:meth:`acommit`, blocking (the saving process: no event loop there)."""
        try:
            if self.is_local:
                os.replace(self.local(tmp), self.local(dest.path))
            else:
                move = getattr(self.fs, "commit_rename", None) or self.fs.rename
                move(tmp, dest.path)
        except BaseException:
            self.remove_quietly(tmp)
            raise
        if self.durable and self.is_local:
            fsync_directory(self.local(dest.directory))

    async def acommit(self, tmp: str, dest: Destination) -> None:
        """Atomically move ``tmp`` onto ``dest.path`` and make the rename durable."""
        try:
            if self.is_local:
                await aiofiles.os.replace(self.local(tmp), self.local(dest.path))
            else:
                # An object store's move is a copy then a delete: FsspecFileSystem's
                # commit_rename reports success once the copy is done.
                move = getattr(self.fs, "commit_rename", None) or self.fs.rename
                await anyio.to_thread.run_sync(move, tmp, dest.path)
        except BaseException:
            await anyio.to_thread.run_sync(self.remove_quietly, tmp)
            raise
        if self.durable and self.is_local:
            await _afsync_directory(self.local(dest.directory))

    # -- housekeeping -------------------------------------------------------------------

    def clean_temps(self, directory: str, *, only_dead: bool = True) -> list[str]:
        """Remove temporary leftovers of crashed saves directly under ``directory``.

        Args:
            only_dead: remove only what no save can still be writing: this host's
                temporary files whose process is dead (or of an earlier boot), another
                host's once unmodified for :data:`~snapwriter._paths.FOREIGN_TEMP_SECONDS`
                (a shared directory: NFS, Lustre). On a remote file system with a
                ``stale_temp_seconds`` attribute (:class:`FsspecFileSystem`), also skip
                temporary files younger than that.

        Returns the removed paths. Only names matching the temporary pattern are touched.
        """
        removed: list[str] = []
        try:
            names = list(self.fs.list(directory))
        except (FileNotFoundError, NotADirectoryError):
            return removed
        grace = float(getattr(self.fs, "stale_temp_seconds", 0.0)) if only_dead else 0.0
        for name in names:
            if not is_temp_name(name):
                continue
            path = os.path.join(directory, name)
            if self.is_local:
                try:
                    st = os.lstat(self.local(path))
                except FileNotFoundError:
                    continue
                if not stat_module.S_ISREG(st.st_mode):
                    continue
                mtime: float | None = st.st_mtime
            else:
                mtime = self._mtime(path)
            if only_dead:
                if not temp_may_be_removed(name, mtime):
                    continue
                if grace > 0 and (mtime is None or time.time() - mtime <= grace):
                    continue
            try:
                self.fs.remove(path)
            except FileNotFoundError:
                continue  # removed meanwhile
            except OSError as exc:
                logger.warning("snapwriter: cannot remove temporary file %s: %s", path, exc)
                continue
            removed.append(path)
        return removed

    def _mtime(self, path: str) -> float | None:
        """When ``path`` was last modified (remote fs), ``None`` if unknown or vanished."""
        try:
            return float(self.fs.stat(path).last_modified)
        except Exception:
            return None
