"""The writer base: state, lifecycle, error bookkeeping and the save coroutine.

Everything that does no I/O of its own lives here and is shared by every writer. The
save itself always runs as a coroutine (:meth:`Writer._run_job`) on the writer's portal
loop; the sync methods (:meth:`Writer.save`, :meth:`Writer.finalize`) are bridges that
wait on it, and the async ones (:meth:`Writer.aclose`, awaiting a handle) await it
without blocking the caller's loop.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import torch

from ._coordination import SetRole, role_for
from ._exceptions import (
    InvalidSnapshotArgument,
    SnapshotError,
    SnapshotLostError,
    SnapshotWriteError,
    WriterClosedError,
)
from ._fsspec import resolve_filesystem
from ._handle import SnapshotHandle, SnapshotResult, await_any
from ._paths import Destination, is_url, resolve_destination
from ._portal import Portal, register_for_exit
from ._retention import apply_retention, check_keep_last, matcher
from ._save import SaveRequest, WriteOutcome, execute_save, execute_save_blocking
from ._staging import StagedTarget, Stager
from ._storage import Storage

__all__ = ("Writer", "WriterStats")

logger = logging.getLogger("snapwriter")

SaveFun = Callable[..., Any]
_W = TypeVar("_W", bound="Writer")
T = TypeVar("T")

#: The writer whose save the current task (and the worker threads it runs savefun in)
#: belongs to; lets a writer refuse calls from inside its own savefun.
_saving_for: contextvars.ContextVar[Writer | None] = contextvars.ContextVar(
    "snapwriter_saving_for", default=None
)
HookFun = Callable[[], None]


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"
    FORKED = "forked"


@dataclass
class WriterStats:
    """Counters of one writer, updated as saves finish (read with ``writer.stats()``).

    Attributes:
        committed: snapshots committed.
        failed: saves that failed.
        bytes_written: total bytes of committed snapshots.
        stage_seconds: total time callers spent staging.
        write_seconds: total time spent writing and fsyncing temporary files.
        last: figures of the last committed snapshot.
    """

    committed: int = 0
    failed: int = 0
    bytes_written: int = 0
    stage_seconds: float = 0.0
    write_seconds: float = 0.0
    last: SnapshotResult | None = None


@dataclass
class _Job:
    """One admitted save. ``filename`` and ``out_dir`` are what ppe-style workers and
    tasks get back: a name that resolves to the same file, and the call's ``out_dir``."""

    request: SaveRequest
    filename: str
    staged: StagedTarget | None
    stage_seconds: float
    called_at: float = field(default_factory=time.perf_counter)
    out_dir: str = ""
    #: This call's part in a rank set (ppe's SHARDED mode, RankSetWriter), if any.
    rank_set: SetRole | None = None
    #: The child forked at the call that writes it (``ProcessWriter(staging="fork")``).
    forked: Any = None


def worker_filename(writer_out_dir: str, dest: Destination) -> str:
    """The filename to hand a worker or task for ``dest`` (relative when it lies in the
    writer's directory, else the absolute path the call gave)."""
    return dest.relpath if dest.out_dir == (writer_out_dir or ".") else dest.path


class Writer:
    """Base class of snapshot writers (pytorch-pfn-extras' ``Writer`` interface).

    Subclasses implement ``__call__``; this base provides the blocking :meth:`save`, the
    lifecycle (:meth:`finalize`, :meth:`aclose`, ``with`` / ``async with``), clean-up
    hooks and error reporting.

    Args:
        fs: the file system: ``None`` for the local one (:class:`LocalFileSystem`), an
            fsspec file system (wrapped in :class:`FsspecFileSystem`), or any object with
            ppe's file-system interface (PFIO-compatible).
        out_dir: the output directory, the one place where files are written and where
            retention and ppe's ``n_retains`` and ``autoload`` look; ``""`` (default) is
            the current directory. With ``fs=None`` it may be a URL
            (``s3://bucket/run``, ``memory://run``) resolved through fsspec. As in ppe,
            the ``out_dir`` given to each call is ignored (it only confines absolute
            filenames when this one is empty).
        durable: ``fsync`` each file and its directory before reporting success. Turn
            off only when losing recent snapshots on power loss is acceptable.
        keep_last: after each commit, delete all but the ``keep_last`` newest committed
            snapshots in that directory whose names match ``keep_pattern``. ``None``
            (default) keeps everything. The file just committed is never deleted;
            temporary files never count.
        keep_pattern: glob of the base names retention may delete; by default the
            committed name with each run of digits free and nothing else
            (``snapshot_iter_1200.pt`` owns ``snapshot_iter_7.pt``, never
            ``snapshot_iter_best.pt`` or ``snapshot_iter_7.pt.bak``).

    Attributes:
        fs: the file system object (ppe's ``autoload`` and ``n_retains`` use it).
        out_dir: the directory given to the constructor.
    """

    def __init__(
        self,
        fs: Any = None,
        out_dir: str = "",
        *,
        durable: bool = True,
        keep_last: int | None = None,
        keep_pattern: str | None = None,
    ) -> None:
        if not isinstance(out_dir, (str, os.PathLike)):
            raise InvalidSnapshotArgument(
                f"out_dir must be a str or os.PathLike, not {type(out_dir).__name__}"
            )
        if not isinstance(durable, bool):
            raise InvalidSnapshotArgument(f"durable must be a bool, not {durable!r}")
        self.fs: Any
        self.out_dir: str
        self.fs, self.out_dir = resolve_filesystem(fs, out_dir)
        self.durable = durable
        self.keep_last = check_keep_last(keep_last)
        if keep_pattern is not None and not isinstance(keep_pattern, str):
            raise InvalidSnapshotArgument(f"keep_pattern must be a str, not {keep_pattern!r}")
        self.keep_pattern = keep_pattern
        self._post_save_hooks: list[HookFun] = []
        self._lock = threading.RLock()
        self._state = _State.OPEN
        self._portal = Portal()
        self._pending: dict[Future[Any], str] = {}
        self._unreported: list[BaseException] = []
        self._initialized_dirs: set[str] = set()
        self._path_locks: dict[str, tuple[anyio.Lock, int]] = {}
        self._limiter: anyio.CapacityLimiter | None = None
        self._stats = WriterStats()
        self._stager = Stager()
        register_for_exit(self)

    # -- ppe interface ---------------------------------------------------------------

    def __call__(
        self,
        filename: str,
        out_dir: str,
        target: Any,
        *,
        savefun: SaveFun | None = None,
        append: bool = False,
    ) -> Any:
        """Save ``target``; implemented by subclasses."""
        raise NotImplementedError

    def initialize(self, out_dir: str = "") -> None:
        """Create the writer's directory and remove temporary leftovers of crashed saves.

        Called by ppe's ``ExtensionsManager`` (with the manager's ``out``, which is this
        writer's ``out_dir``); snapwriter also calls it before the first save. As in
        ppe's saves, the directory is always the writer's own ``out_dir`` (the current
        directory when empty): ``out_dir`` is only checked. Blocking. Temporary files of
        saves that may still be running (live processes, other hosts) are left alone.

        Raises:
            InvalidSnapshotArgument: ``out_dir`` is not a path, or is a URL while the
                writer has no ``out_dir`` of its own.
        """
        self._check_call_out_dir(out_dir)
        self._initialize_dir(self.out_dir or ".")

    def _initialize_dir(self, directory: str) -> None:
        Storage(self.fs, durable=self.durable).makedirs(directory)
        Storage(self.fs).clean_temps(directory)
        with self._lock:
            self._initialized_dirs.add(directory)

    def save(
        self,
        filename: str,
        out_dir: str,
        target: Any,
        savefun: SaveFun,
        append: bool,
        **savefun_kwargs: Any,
    ) -> None:
        """Save ``target`` now and block until it is durable; then run clean-up hooks.

        This is ppe's blocking primitive (workers returned by ``create_worker`` call
        it). The target is not staged: do not mutate it until this returns. Safe to
        call from any thread except the writer's loop thread, and from a child process
        forked to run it (ppe's ``multiprocessing.Process(target=self.save)`` worker),
        where it writes with the same atomic protocol on a private loop.

        Raises:
            InvalidSnapshotArgument: bad filename, or no ``savefun``.
            SnapshotWriteError: the save failed (the original exception chained).
        """
        request = self._request(filename, out_dir, target, savefun, append, savefun_kwargs)
        if self._state is _State.FORKED:
            self._save_in_forked_child(request)
            return
        if self._portal.in_loop_thread():
            raise RuntimeError("Writer.save() cannot be called from the writer's own loop thread")
        # A worker started before finalize() may still save while the writer closes
        # (finalize waits for it); once closed, nothing restarts the loop.
        self._start_pending(self._save_now, request, request.dest.path, while_closing=True).result()

    def _save_in_forked_child(self, request: SaveRequest) -> None:
        """``save()`` in a forked child: no loop thread here; write, commit, run the hooks
        and retention in this thread (ppe's worker processes run the hooks too)."""
        try:
            execute_save_blocking(request)
            self._post_save()
            self._retain(request)
        except Exception as exc:
            error = self._wrap_failure(request.dest.path, exc, record=False)
            raise error from error.__cause__

    def _add_cleanup_hook(self, hook_fun: HookFun) -> None:
        """Run ``hook_fun()`` after each committed save (ppe's ``n_retains`` uses this)."""
        self._post_save_hooks.append(hook_fun)

    def _post_save(self) -> None:
        for hook in list(self._post_save_hooks):
            hook()

    # -- lifecycle -------------------------------------------------------------------

    def finalize(self, timeout: float | None = None) -> None:
        """Wait for every pending save, stop the background loop and report failures.

        Idempotent: later calls return at once. Blocking; from a coroutine use
        :meth:`aclose` instead.

        Args:
            timeout: seconds to wait for pending saves; ``None`` waits as long as they
                take (a running ``savefun`` cannot be interrupted).

        Raises:
            SnapshotWriteError: a save failed and no handle reported it yet (the first
                such failure; the others are named in the message and logged).
            SnapshotLostError: saves were still pending after ``timeout``.
        """
        self._refuse_reentry("finalize()")
        if self._portal.in_loop_thread():
            raise RuntimeError("finalize() cannot be called from the writer's own loop thread")
        with self._lock:
            if self._state in (_State.CLOSED, _State.FORKED):
                return
            self._state = _State.CLOSING
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # saves of workers already running may still join while closing
            with self._lock:
                pending = dict(self._pending)
            if not pending:
                break
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            _done, not_done = wait_futures(list(pending), timeout=left)
            if not_done:
                paths = [pending[f] for f in not_done]
                raise SnapshotLostError(
                    f"{len(paths)} snapshot(s) still pending after {timeout}s: {', '.join(paths)}",
                    paths,
                )
        self._stop_background()
        self._portal.stop()
        self._stager.close()
        with self._lock:
            self._state = _State.CLOSED
        self._raise_unreported()

    async def aclose(self) -> None:
        """Await every pending save without blocking the loop, then close the writer.

        The async twin of :meth:`finalize` (works from asyncio and trio). Idempotent.

        Raises:
            SnapshotWriteError: as :meth:`finalize`.
        """
        with self._lock:
            if self._state in (_State.CLOSED, _State.FORKED):
                return
            self._state = _State.CLOSING
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                break
            await await_any(pending)
        await anyio.to_thread.run_sync(self._stop_background)
        await anyio.to_thread.run_sync(self._portal.stop)
        self._stager.close()
        with self._lock:
            self._state = _State.CLOSED
        self._raise_unreported()

    @property
    def closed(self) -> bool:
        """Whether :meth:`finalize` or :meth:`aclose` has been called."""
        return self._state is not _State.OPEN

    def pending(self) -> int:
        """Number of saves scheduled and not finished yet."""
        with self._lock:
            return len(self._pending)

    def stats(self) -> WriterStats:
        """A copy of this writer's counters."""
        with self._lock:
            return WriterStats(**vars(self._stats))

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finalize()

    async def __aenter__(self: _W) -> _W:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is None or state in (_State.CLOSED, _State.FORKED):
            return
        if self._portal.in_loop_thread():
            # The last reference died on the loop thread; stop the loop from elsewhere.
            threading.Thread(target=self._portal.stop, daemon=True).start()
            return
        try:
            self.finalize()
        except Exception:  # already logged when the save failed
            logger.debug("writer collected with unreported failures", exc_info=True)

    def _wait_at_exit(self, timeout: float) -> list[str]:
        """Interpreter exit, before threads are joined: wait up to ``timeout`` for the
        pending saves; return the paths not committed. The writer stays open, so the
        program's own ``atexit`` handlers may still save."""
        with self._lock:
            if self._state in (_State.CLOSED, _State.FORKED):
                return []
            pending = dict(self._pending)
        _done, not_done = wait_futures(list(pending), timeout=timeout)
        return [pending[f] for f in not_done]

    def _close_at_exit(self, timeout: float) -> tuple[list[str], list[BaseException]]:
        """Interpreter exit, after the program's ``atexit`` handlers: wait up to
        ``timeout``, close, and return the paths not committed and the failures that no
        handle, call or ``finalize()`` reported."""
        lost = self._wait_at_exit(timeout)
        if lost:
            return lost, []
        with self._lock:
            if self._state in (_State.CLOSED, _State.FORKED):
                return [], []
            self._state = _State.CLOSING
        self._stop_background()
        self._portal.stop()
        self._stager.close()
        with self._lock:
            self._state = _State.CLOSED
            failures, self._unreported = self._unreported, []
        return [], failures

    def _stop_background(self) -> None:
        """Release background resources other than the loop (consumer processes)."""

    def _forget_after_fork(self) -> None:
        self._lock = threading.RLock()
        self._state = _State.FORKED
        self._pending.clear()
        self._portal.forget()

    # -- helpers for subclasses ------------------------------------------------------

    def _refuse_reentry(self, what: str) -> None:
        """A ``savefun`` (or a clean-up hook) of this writer calling back into it would
        wait for its own save: refuse instead of deadlocking."""
        if _saving_for.get() is self:
            raise SnapshotError(
                f"{what} was called from inside one of this writer's own saves (its "
                "savefun or a clean-up hook); it would wait for itself forever"
            )

    def _check_open(self) -> None:
        self._refuse_reentry("the writer")
        state = self._state
        if state is _State.FORKED:
            raise WriterClosedError(
                "this writer was inherited through fork(); its background loop does not "
                "exist in the child process: create a new writer in the child"
            )
        if state is not _State.OPEN:
            raise WriterClosedError(f"the writer is {state.value}: create a new writer")

    def _check_call_out_dir(self, out_dir: Any) -> str:
        """Validate the ``out_dir`` of a call (ppe's manager passes its ``out``, which is
        this writer's ``out_dir``); return it as a path."""
        if out_dir is None:
            return ""
        if not isinstance(out_dir, (str, os.PathLike)):
            raise InvalidSnapshotArgument(
                f"out_dir must be a str or os.PathLike, not {type(out_dir).__name__}"
            )
        path = os.fspath(out_dir)
        if not self.out_dir and is_url(path):
            # ppe would write into the current directory; a URL here is a mistake
            raise InvalidSnapshotArgument(
                f"out_dir {path!r} is a URL: give URLs to the writer's constructor "
                "(StandardWriter(out_dir=...)); a call's out_dir is a path on the writer's fs"
            )
        return path

    def _destination(self, filename: Any, out_dir: Any) -> Destination:
        """Where a call's file goes: relative to the writer's ``out_dir`` (ppe's rule)."""
        return resolve_destination(self.out_dir, filename, self._check_call_out_dir(out_dir))

    def _request(
        self,
        filename: Any,
        out_dir: Any,
        target: Any,
        savefun: SaveFun | None,
        append: Any,
        kwds: dict[str, Any],
    ) -> SaveRequest:
        dest = self._destination(filename, out_dir)
        fun = savefun if savefun is not None else self._default_savefun()
        if fun is None:
            raise InvalidSnapshotArgument(
                f"no savefun for {dest.path!r}: the writer was created with savefun=None, "
                "so each call must pass savefun=..."
            )
        if not callable(fun):
            raise InvalidSnapshotArgument(f"savefun must be callable, not {fun!r}")
        if not isinstance(append, bool):
            raise InvalidSnapshotArgument(f"append must be a bool, not {append!r}")
        return SaveRequest(
            dest=dest,
            target=target,
            savefun=fun,
            kwds=dict(kwds),
            append=append,
            fs=self.fs,
            durable=self.durable,
        )

    def _default_savefun(self) -> SaveFun | None:
        fun: SaveFun | None = getattr(self, "_savefun", torch.save)
        return fun

    def _observed(self, exc: BaseException) -> None:
        """A handle delivered ``exc`` to the user: do not raise it again."""
        with self._lock:
            self._unreported = [e for e in self._unreported if e is not exc]

    def _raise_unreported(self) -> None:
        with self._lock:
            errors, self._unreported = self._unreported, []
        if errors:
            first = errors[0]
            if len(errors) > 1:
                others = ", ".join(getattr(e, "path", "?") for e in errors[1:])
                first.add_note(f"{len(errors) - 1} more save(s) failed as well: {others}")
            raise first

    def _submit(self, job: _Job, on_done: Callable[[], None] | None = None) -> SnapshotHandle:
        """Schedule ``job`` on the loop; return its handle.

        Raises:
            WriterClosedError: the writer closed meanwhile (the caller releases what it
                holds: staged buffers, its ``max_pending`` slot).
        """
        path = job.request.dest.path
        job.rank_set = role_for(self, job)
        future: Future[SnapshotResult] = self._start_pending(self._run_job, job, path)

        def finished(_f: Future[SnapshotResult]) -> None:
            if job.staged is not None:
                self._stager.release(job.staged)
            if on_done is not None:
                on_done()

        future.add_done_callback(finished)
        return SnapshotHandle(future, path, job.stage_seconds, self._observed)

    def _start_pending(
        self,
        fn: Callable[[Any], Coroutine[Any, Any, T]],
        arg: Any,
        path: str,
        *,
        while_closing: bool = False,
    ) -> Future[T]:
        """Start ``fn(arg)`` on the loop as a pending save of ``path``.

        Admission is atomic with :meth:`finalize`: under the writer's lock the save is
        either registered as pending before the writer starts closing (so finalize
        waits for it), or refused with :class:`WriterClosedError` (a call that passed
        its first check, then staged while another thread finalized).
        ``while_closing`` also admits it while finalize waits (not once closed).
        """
        with self._lock:
            if not (while_closing and self._state is _State.CLOSING):
                self._check_open()
            future = self._portal.start_task_soon(fn, arg)
            self._pending[future] = path
        future.add_done_callback(self._forget_pending)
        return future

    def _forget_pending(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.pop(future, None)

    # -- coroutines (run on the portal loop) -----------------------------------------

    def _concurrency(self) -> int:
        """How many saves may write at once (queue writers: 1, in call order)."""
        return 1

    async def _save_now(self, request: SaveRequest) -> WriteOutcome:
        """``save()``: write, commit, run hooks; errors wrapped like background ones."""
        _saving_for.set(self)
        try:
            await self._ensure_initialized(request.dest)
            outcome = await execute_save(request)
            await anyio.to_thread.run_sync(self._post_save)
            await self._after_commit(request)
        except Exception as exc:
            error = self._wrap_failure(request.dest.path, exc, record=False)
            raise error from error.__cause__
        return outcome

    async def _run_job(self, job: _Job) -> SnapshotResult:
        if job.rank_set is not None:  # the all-ranks commit wraps the ordinary save
            result: SnapshotResult = await job.rank_set.run(self, job, self._run_one_job)
            return result
        return await self._run_one_job(job)

    async def _run_one_job(self, job: _Job) -> SnapshotResult:
        _saving_for.set(self)  # this task's context; copied into its worker threads
        dest = job.request.dest
        lock = self._path_lock_acquire(dest.path)
        try:
            if self._limiter is None:
                self._limiter = anyio.CapacityLimiter(self._concurrency())
            async with lock, self._limiter:
                await self._ensure_initialized(dest)
                if job.staged is not None and job.staged._events:
                    await anyio.to_thread.run_sync(job.staged.wait)
                outcome = await self._write_job(job)
                await self._after_commit(job.request)
        except Exception as exc:
            error = self._wrap_failure(dest.path, exc, record=True)
            raise error from error.__cause__
        finally:
            self._path_lock_release(dest.path)
        result = SnapshotResult(
            path=dest.path,
            nbytes=outcome.nbytes,
            stage_seconds=job.stage_seconds,
            write_seconds=outcome.write_seconds,
            commit_seconds=outcome.commit_seconds,
            total_seconds=time.perf_counter() - job.called_at,
        )
        self._record_success(result)
        return result

    async def _write_job(self, job: _Job) -> WriteOutcome:
        """Write and commit one job, then run the clean-up hooks. Overridable."""
        outcome = await execute_save(job.request)
        await anyio.to_thread.run_sync(self._post_save)
        return outcome

    async def _after_commit(self, request: SaveRequest) -> None:
        """Apply retention once a snapshot is committed (not for ``append=True``)."""
        if self.keep_last is None or request.append:
            return
        await anyio.to_thread.run_sync(self._retain, request)

    def _retain(self, request: SaveRequest) -> None:
        if self.keep_last is None or request.append:
            return
        dest = request.dest
        matches = matcher(self.keep_pattern, dest.basename)
        removed = apply_retention(self.fs, dest.directory, matches, self.keep_last, dest.path)
        for path in removed:
            logger.info("snapwriter: retention removed %s (keep_last=%d)", path, self.keep_last)

    async def _ensure_initialized(self, dest: Destination) -> None:
        directory = dest.out_dir
        if directory not in self._initialized_dirs:
            await anyio.to_thread.run_sync(self._initialize_dir, directory)

    def _path_lock_acquire(self, path: str) -> anyio.Lock:
        lock, users = self._path_locks.get(path, (None, 0))
        if lock is None:
            lock = anyio.Lock()
        self._path_locks[path] = (lock, users + 1)
        return lock

    def _path_lock_release(self, path: str) -> None:
        lock, users = self._path_locks[path]
        if users <= 1:
            del self._path_locks[path]
        else:
            self._path_locks[path] = (lock, users - 1)

    def _wrap_failure(
        self, path: str, exc: BaseException, *, record: bool
    ) -> SnapshotWriteError | InvalidSnapshotArgument:
        """Log ``exc`` and return the error to raise, its ``__cause__`` the original."""
        if isinstance(exc, (SnapshotWriteError, InvalidSnapshotArgument)):
            error = exc  # already names the file (and chains the original cause)
        else:
            error = SnapshotWriteError(
                f"failed to save snapshot {path!r}: {type(exc).__name__}: {exc}", path
            )
            error.__cause__ = exc
        logger.error("snapwriter: %s", error, exc_info=(type(exc), exc, exc.__traceback__))
        with self._lock:
            self._stats.failed += 1
            if record:
                self._unreported.append(error)
        return error

    def _record_success(self, result: SnapshotResult) -> None:
        with self._lock:
            s = self._stats
            s.committed += 1
            s.bytes_written += result.nbytes
            s.stage_seconds += result.stage_seconds
            s.write_seconds += result.write_seconds
            s.last = result
        logger.info(
            "snapwriter: committed %s: %d bytes, stall %.3fs, write %.3fs, commit %.3fs, %.1f MB/s",
            result.path,
            result.nbytes,
            result.stage_seconds,
            result.write_seconds,
            result.commit_seconds,
            result.mb_per_second,
        )
