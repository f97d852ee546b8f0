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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import aiofiles.os
import anyio.to_thread

from ._paths import (
    Destination,
    check_local_destination,
    is_temp_name,
    temp_name_for,
    temp_owner_alive,
)

__all__ = ("FileStat", "LocalFileSystem", "Storage")

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
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for name in sorted(dirnames) + sorted(filenames):
                yield name if rel == "." else os.path.join(rel, name)

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


class _WriteErrorRecorder:
    """The file object ``savefun`` gets: the real one, remembering the first ``OSError``
    its ``write`` raised (serializers may re-raise it as something without errno)."""

    def __init__(self, f: IO[Any]) -> None:
        self._f = f
        self.os_error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self._f.write(data))
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
        self.is_local = isinstance(fs, LocalFileSystem)

    # -- write (blocking: worker thread or child process) -------------------------------

    def write_temp(
        self,
        dest: Destination,
        savefun: Callable[..., Any],
        target: Any,
        kwds: dict[str, Any],
    ) -> tuple[str, int]:
        """Serialize ``target`` into a fresh temporary file next to ``dest``.

        Returns:
            The temporary path and the number of bytes written.

        Raises:
            InvalidSnapshotArgument: the destination escapes ``out_dir`` through a
                symbolic link or is a directory (local file system; nothing written).
            ValueError: ``savefun`` wrote no byte (an empty snapshot is refused).
            Whatever ``savefun`` or the file system raised; the temporary file is removed.
        """
        self._check(dest)
        self.fs.makedirs(dest.directory, exist_ok=True)
        tmp = os.path.join(dest.directory, temp_name_for(dest.basename))
        recorder: _WriteErrorRecorder | None = None
        try:
            with self.fs.open(tmp, "wb") as f:
                recorder = _WriteErrorRecorder(f)
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
        """Append to the final file directly (ppe's ``append=True``; not atomic)."""
        self._check(dest)
        self.fs.makedirs(dest.directory, exist_ok=True)
        with self.fs.open(dest.path, "ab") as f:
            start = f.tell()
            savefun(target, f, **kwds)
            f.flush()
            nbytes = f.tell() - start
            if self.durable:
                _fsync_file(f)
        return int(nbytes)

    def _check(self, dest: Destination) -> None:
        if self.is_local:
            check_local_destination(dest)

    def remove_quietly(self, path: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.remove(path)

    # -- commit (coroutines: never block the loop) --------------------------------------

    async def acommit(self, tmp: str, dest: Destination) -> None:
        """Atomically move ``tmp`` onto ``dest.path`` and make the rename durable."""
        try:
            if self.is_local:
                await aiofiles.os.replace(tmp, dest.path)
            else:
                await anyio.to_thread.run_sync(self.fs.rename, tmp, dest.path)
        except BaseException:
            await anyio.to_thread.run_sync(self.remove_quietly, tmp)
            raise
        if self.durable and self.is_local:
            await _afsync_directory(dest.directory)

    # -- housekeeping -------------------------------------------------------------------

    def clean_temps(self, directory: str, *, only_dead: bool = True) -> list[str]:
        """Remove temporary leftovers of crashed saves directly under ``directory``.

        Args:
            only_dead: skip temporary files whose writing process is still alive on this
                host (a save in progress by another writer). On a remote file system
                with a ``stale_temp_seconds`` attribute (:class:`FsspecFileSystem`),
                also skip temporary files younger than that: pids only name processes
                of this host, and another host's save may be committing them.

        Returns the removed paths. Only names matching the temporary pattern are touched.
        """
        removed: list[str] = []
        try:
            names = list(self.fs.list(directory))
        except (FileNotFoundError, NotADirectoryError):
            return removed
        grace = float(getattr(self.fs, "stale_temp_seconds", 0.0)) if only_dead else 0.0
        for name in names:
            if is_temp_name(name) and not (only_dead and temp_owner_alive(name)):
                path = os.path.join(directory, name)
                if self.is_local:
                    try:
                        if not stat_module.S_ISREG(os.lstat(path).st_mode):
                            continue
                    except FileNotFoundError:
                        continue
                elif grace > 0 and not self._older_than(path, grace):
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

    def _older_than(self, path: str, seconds: float) -> bool:
        """Whether ``path`` was last modified more than ``seconds`` ago (remote fs)."""
        try:
            return time.time() - float(self.fs.stat(path).last_modified) > seconds
        except Exception:  # vanished, or no usable time: leave it alone
            return False
