"""``StandardWriter`` and its thread and process variants.

A call validates its arguments, stages the target (a consistent copy), schedules the
save coroutine on the writer's loop and returns a :class:`SnapshotHandle` at once. The
save runs through ppe's worker contract only when a subclass overrides
:meth:`StandardWriter.create_worker`; otherwise the coroutine writes in a worker thread
directly, or, for ``ProcessWriter``, hands the save to the writer's persistent saving
process (:mod:`snapwriter._saver`; staging into shared memory, :mod:`snapwriter._shm`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import anyio
import anyio.to_thread
import sniffio
import torch

from ._base import SaveFun, Writer, _Job, worker_filename
from ._coordination import is_marker_call
from ._cow import ForkedSave, many_small_storages, unforkable
from ._exceptions import ChildProcessFailure, InvalidSnapshotArgument, WriterBusyError
from ._handle import SnapshotHandle, SnapshotResult, await_any
from ._process import MpContext, ProcessWorker, _track, _untrack, check_context
from ._save import SaveRequest, WriteOutcome
from ._saver import NotPicklable, SaverProcess, SaverStats, saver_supported
from ._shm import SharedMemory
from ._staging import Stager
from ._storage import Storage

__all__ = ("ProcessWriter", "StandardWriter", "ThreadWriter")


class _NoRoom:
    """Admission for calls that hold no staged copy (ppe's rank-set marker)."""

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


_NO_ROOM = _NoRoom()


def _check_max_pending(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSnapshotArgument(f"max_pending must be an int >= 1, not {value!r}")
    return value


def _check_shareable(fs: Any, writer: str) -> None:
    """Process writers need a file system other processes see (not ``memory://``)."""
    if getattr(fs, "process_local", False):
        raise InvalidSnapshotArgument(
            f"{writer} writes in another process, but this file system ({fs!r}) exists only "
            "in this process: use a thread-based writer (StandardWriter, QueueWriter)"
        )


def _on_event_loop() -> bool:
    """Whether the calling thread runs an event loop (asyncio, or trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return getattr(sniffio.thread_local, "name", None) is not None
    return True


class _ThreadWorker(threading.Thread):
    """What :meth:`StandardWriter.create_worker` returns: a thread running ``save()``.

    Unlike a bare :class:`threading.Thread` it records the exception and an ``exitcode``
    (0 on success, 1 on failure) so the failure is not lost.
    """

    def __init__(self, writer: Writer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__(name="snapwriter-worker", daemon=True)
        self._writer = writer
        self._args = args
        self._kwargs = kwargs
        self.exitcode: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._writer.save(*self._args, **self._kwargs)
        except BaseException as exc:
            self.error = exc
            self.exitcode = 1
        else:
            self.exitcode = 0


class StandardWriter(Writer):
    """Writes snapshots in the background; the call returns once the target is staged.

    Used directly it writes through a thread executor. A drop-in for ppe's
    ``StandardWriter`` family: subclasses may override :meth:`create_worker` exactly as
    in ppe.

    Args:
        savefun: called as ``savefun(target, file_object, **kwds)``; :func:`torch.save`
            by default; ``None`` if every call passes its own ``savefun=``.
        fs: file system (see :class:`Writer`).
        out_dir: output directory; non-empty takes precedence over each call's.
        durable: ``fsync`` file and directory before a save counts as done.
        stage: copy the target at call time (default) so later mutation cannot reach
            the file. ``False`` hands the target itself to the background save: the
            caller promises not to mutate it until the handle is done.
        max_pending: saves in flight at most. A further sync call blocks until one
            finishes (ppe behaviour), except on a running event loop, where it raises
            :class:`WriterBusyError` instead of blocking the loop (use
            :meth:`wait_for_room` or :meth:`asave`); staging memory is bounded by
            ``max_pending`` copies of the target.
        keep_last, keep_pattern: retention (see :class:`Writer`).
        **kwds: keyword arguments for ``savefun``.

    Threading: calls may come from any thread except the writer's own loop thread;
    from a coroutine, a call blocks the loop only while staging.
    """

    _default_max_pending = 1

    def __init__(
        self,
        savefun: SaveFun | None = torch.save,
        fs: Any = None,
        out_dir: str = "",
        *,
        durable: bool = True,
        stage: bool = True,
        max_pending: int | None = None,
        keep_last: int | None = None,
        keep_pattern: str | None = None,
        **kwds: Any,
    ) -> None:
        super().__init__(
            fs=fs, out_dir=out_dir, durable=durable, keep_last=keep_last, keep_pattern=keep_pattern
        )
        if savefun is not None and not callable(savefun):
            raise InvalidSnapshotArgument(f"savefun must be callable, not {savefun!r}")
        if not isinstance(stage, bool):
            raise InvalidSnapshotArgument(f"stage must be a bool, not {stage!r}")
        self._savefun = savefun
        self._kwds = kwds
        self._stage = stage
        self.max_pending = _check_max_pending(
            self._default_max_pending if max_pending is None else max_pending
        )
        self._room = threading.Semaphore(self.max_pending)

    def __call__(
        self,
        filename: str,
        out_dir: str,
        target: Any,
        *,
        savefun: SaveFun | None = None,
        append: bool = False,
        stage: bool | None = None,
    ) -> SnapshotHandle:
        """Stage ``target`` and save it in the background as ``out_dir/filename``.

        Args:
            filename: file name relative to the output directory.
            out_dir: output directory, used when the constructor's is empty.
            target: the object to save (a ``state_dict``, any nesting of containers).
            savefun: overrides the writer's ``savefun`` for this call.
            append: append to the file instead of replacing it (ppe semantics; not
                atomic).
            stage: overrides the writer's ``stage`` for this call.

        Returns:
            A :class:`SnapshotHandle`; ``await`` it or call ``result()`` to wait until
            the file is durable.

        Raises:
            InvalidSnapshotArgument: bad filename or option; nothing was written.
            StagingError: the target cannot be copied or serialized; nothing written.
            SnapshotWriteError: an earlier save failed and was not reported yet.
            WriterBusyError: called on a running event loop while ``max_pending`` saves
                are in flight (nothing staged): ``await writer.wait_for_room()`` first.
            WriterClosedError: the writer was finalized.
        """
        self._check_open()
        self._raise_unreported()
        request = self._request(filename, out_dir, target, savefun, append, self._kwds)
        do_stage = self._stage if stage is None else stage
        if not isinstance(do_stage, bool):
            raise InvalidSnapshotArgument(f"stage must be a bool, not {stage!r}")
        if self._portal.in_loop_thread():
            raise RuntimeError("a writer cannot be called from its own loop thread")
        room: threading.Semaphore | _NoRoom = self._room
        if is_marker_call(request):  # ppe's rank-set marker: an empty dict, see there
            room, do_stage = _NO_ROOM, False
        else:
            self._take_room(request.dest.path)
        staged = None
        forked = None
        try:
            self._check_open()
            start = time.perf_counter()
            call_out_dir = self._check_call_out_dir(out_dir)
            if do_stage:
                forked = self._fork_snapshot(request)
            if do_stage and forked is None:
                staged = self._stager.stage(target, check_pickle=request.savefun is torch.save)
                request.target = staged.value
                request.device_tags = staged.device_tags
                request.layout = staged.layout
            job = _Job(
                request=request,
                filename=worker_filename(self.out_dir, request.dest),
                staged=staged,
                stage_seconds=time.perf_counter() - start,
                called_at=start,
                out_dir=call_out_dir,
                forked=forked,
            )
            return self._submit(job, on_done=room.release)
        except BaseException:
            if staged is not None:
                self._stager.release(staged)
            if forked is not None:
                forked.kill()
                forked.join()
            room.release()
            raise

    def _fork_snapshot(self, request: SaveRequest) -> Any:
        """A child forked now that writes ``request`` (a copy-on-write snapshot), or
        None to stage as usual. Only ``ProcessWriter(staging="fork")`` forks."""
        return None

    def _take_room(self, path: str) -> None:
        """Take one of the ``max_pending`` slots; block for it unless that would block a
        running event loop (then :class:`WriterBusyError`)."""
        if self._room.acquire(blocking=False):
            return
        if _on_event_loop():
            raise WriterBusyError(
                f"cannot start saving {path!r}: max_pending={self.max_pending} save(s) are in "
                "flight, and waiting for one here would block the event loop; await "
                "writer.wait_for_room() before the call, or use await writer.asave(...)"
            )
        self._room.acquire()

    async def wait_for_room(self) -> None:
        """Wait, without blocking the loop, until a call would not block on ``max_pending``.

        Works from asyncio and trio. Another thread may still take the room first.
        """
        while True:
            if self._room.acquire(blocking=False):
                self._room.release()
                return
            with self._lock:
                pending = list(self._pending)
            if pending:
                await await_any(pending)
            else:  # a call of another thread is staging: its save is not pending yet
                await anyio.sleep(0.005)

    async def asave(
        self,
        filename: str,
        out_dir: str,
        target: Any,
        *,
        savefun: SaveFun | None = None,
        append: bool = False,
        stage: bool | None = None,
    ) -> SnapshotResult:
        """Async save: wait for room without blocking, stage, and await durability.

        Same arguments and errors as calling the writer; returns the
        :class:`SnapshotResult` of the committed snapshot.
        """
        while True:
            await self.wait_for_room()
            try:
                handle = self(
                    filename, out_dir, target, savefun=savefun, append=append, stage=stage
                )
            except WriterBusyError:
                continue  # another caller took the room first
            return await handle

    def create_worker(
        self,
        filename: str,
        out_dir: str,
        target: Any,
        *,
        savefun: SaveFun | None = None,
        append: bool = False,
        **savefun_kwargs: Any,
    ) -> Any:
        """Create the worker of one save: an object with ``start()``, ``join()`` and
        ``exitcode``, as in ppe.

        Override it to run saves your own way (ppe's contract: the worker should call
        :meth:`save`). When not overridden, snapwriter does not create a worker at all:
        the save coroutine writes in a worker thread directly. The default returns a
        thread that runs :meth:`save`, for callers that use it directly.
        """
        fun = savefun if savefun is not None else self._savefun
        return _ThreadWorker(self, (filename, out_dir, target, fun, append), savefun_kwargs)

    def _uses_workers(self) -> bool:
        """Whether saves go through :meth:`create_worker`: it was overridden by a subclass
        or replaced on a class or instance (``mock.patch``): it is not the default one."""
        if "create_worker" in vars(self):  # patched on the instance
            return True
        return getattr(type(self), "create_worker", None) is not _DEFAULT_CREATE_WORKER

    async def _write_job(self, job: _Job) -> WriteOutcome:
        if not self._uses_workers():
            return await super()._write_job(job)
        request = job.request
        start = time.perf_counter()
        worker = self.create_worker(
            job.filename,
            job.out_dir,
            request.target,
            savefun=request.savefun,
            append=request.append,
            **request.kwds,
        )
        await anyio.to_thread.run_sync(worker.start)
        await anyio.to_thread.run_sync(worker.join)
        _check_worker(worker)
        outcome = getattr(worker, "outcome", None)
        if getattr(worker, "runs_hooks", True) is False:
            await anyio.to_thread.run_sync(self._post_save)
        if isinstance(outcome, WriteOutcome):
            return outcome
        return WriteOutcome(
            await anyio.to_thread.run_sync(self._size_of, request), time.perf_counter() - start, 0.0
        )

    def _size_of(self, request: SaveRequest) -> int:
        try:
            return int(self.fs.stat(request.dest.path).size)
        except Exception:
            return 0


_DEFAULT_CREATE_WORKER = StandardWriter.__dict__["create_worker"]


def _check_worker(worker: Any) -> None:
    """ppe's worker contract, after ``join()``: raise the failure it reports.

    A real exception on ``worker.error`` is raised as it is. An ``exitcode`` that is an
    int other than 0, or ``None`` (``join()`` returned while the process still runs), is
    a failure; a worker without ``exitcode`` (a bare thread) counts as successful.
    """
    error = getattr(worker, "error", None)
    if isinstance(error, BaseException):
        raise error
    if not hasattr(worker, "exitcode"):
        return
    exitcode = worker.exitcode
    if exitcode is None:
        raise ChildProcessFailure(
            "the worker of this save had not exited when join() returned (exitcode None)"
        )
    if isinstance(exitcode, int) and not isinstance(exitcode, bool) and exitcode != 0:
        raise ChildProcessFailure(f"the worker of this save ended with exit code {exitcode}")


class ThreadWriter(StandardWriter):
    """Writes each snapshot in a worker thread (ppe's ``ThreadWriter``).

    Same as :class:`StandardWriter`; named for drop-in compatibility.
    """


class ProcessWriter(StandardWriter):
    """Writes each snapshot in the writer's saving process (ppe's ``ProcessWriter``).

    One saving process per writer (:mod:`snapwriter._saver`): started by the first save,
    replaced by the next save if it dies (the save it was running fails with
    :class:`ChildProcessFailure` naming the file and how it died), stopped by
    :meth:`finalize`/:meth:`aclose`, and gone within a fraction of a second when the
    trainer dies. By default it is forked from a small zygote interpreter that imports
    no torch (started when the writer is created; never a copy of the trainer's memory);
    with ``mp_context`` it is started with that context instead. Staging copies the
    target into shared segments (:mod:`snapwriter._shm`), each sent to the child once as
    one file descriptor; per save only ``data.pkl`` (pickled in the writer's background
    thread) and ``(segment, offset, nbytes)`` per storage cross the pipe, and the child
    writes torch.save's very file with the usual atomic, durable commit. Without memfd
    segments and pidfds (not Linux), each save runs in a child process of its own.

    With ``staging="fork"`` a call copies nothing: it forks the trainer (a few
    milliseconds, whatever the number of tensors), and the forked child writes the
    state as it was at the call, copy-on-write, into the temporary file that the writer
    then commits (:mod:`snapwriter._cow`). For states of many small CPU tensors, where
    copying costs microseconds per tensor; the trainer's pages written while the child
    lives are copied by the kernel (up to 1x the state in extra memory). Calls that a
    fork cannot save (CUDA initialised, a remote file system, ``append=True``) stage
    into shared memory as usual. Errors in non-tensor objects that staging reports in
    the call surface through the handle instead.

    ``savefun`` and ``fs`` must pickle (a closure works only under ``fork``, where such a
    save falls back to a child forked for it). A subclass that overrides
    :meth:`create_worker` gets ppe's design: one worker (by default a
    :class:`ProcessWorker`, a :class:`multiprocessing.Process`) per save.

    Args:
        mp_context: a :mod:`multiprocessing` context or start-method name for the saving
            process; ``None``: the zygote (see above).
        staging: ``"shared"`` (copy into shared memory, the default), ``"fork"`` (a
            copy-on-write snapshot per call, see above) or ``"auto"``: the first save
            forks (its child reports the state's shape), later ones fork while the
            writer's previous save held many small storages
            (:func:`~snapwriter._cow.many_small_storages`: at least 5,000 of 8 KiB or
            less on average) and stage into shared memory otherwise.
        Other arguments: as :class:`StandardWriter`.
    """

    def __init__(
        self,
        savefun: SaveFun | None = torch.save,
        fs: Any = None,
        out_dir: str = "",
        *,
        mp_context: MpContext = None,
        staging: str = "shared",
        **kwds: Any,
    ) -> None:
        super().__init__(savefun, fs, out_dir, **kwds)
        _check_shareable(self.fs, type(self).__name__)
        self._mp_context = check_context(mp_context)
        if staging not in ("shared", "fork", "auto"):
            raise InvalidSnapshotArgument(
                f"staging must be 'shared', 'fork' or 'auto', not {staging!r}"
            )
        self.staging = staging
        self._forked_saves = 0
        #: (storages, bytes) of the last save: what ``staging="auto"`` decides on
        self._shape: tuple[int, int] | None = None
        self._saver: SaverProcess | None = None
        if self._uses_saver():
            self._shm = SharedMemory()
            self._stager = Stager(
                allocate=self._shm.allocate, allocate_many=self._shm.allocate_many
            )
            self._saver = SaverProcess(self._mp_context, self._shm)
            self._saver.prestart()

    def _uses_saver(self) -> bool:
        """Whether saves go to the writer's saving process: ``create_worker`` is this
        class's own (not overridden, replaced or patched), on a platform that has one."""
        if not saver_supported() or "create_worker" in vars(self):
            return False
        return getattr(type(self), "create_worker", None) is _PROCESS_CREATE_WORKER

    def saver_stats(self) -> SaverStats | None:
        """Counters of the saving process (starts, pid, segments sent...) and of the
        saves written by a child forked at the call, or None when saves go through
        ``create_worker`` workers instead."""
        if self._saver is None:
            return None
        return dataclasses.replace(self._saver.stats(), forked=self._forked_saves)

    def _fork_snapshot(self, request: SaveRequest) -> ForkedSave | None:
        if self.staging == "shared" or self._saver is None or not self._uses_saver():
            return None
        if (
            self.staging == "auto"
            and self._shape is not None
            and not many_small_storages(self._shape)
        ):
            return None
        if unforkable(request) is not None:
            return None
        directory = request.dest.out_dir
        if directory not in self._initialized_dirs:
            # the directory's clean-up of dead saves' temporary files runs now, before
            # the fork, never beside a child already writing one (where it fails, the
            # call stages and the save reports the error)
            try:
                self._initialize_dir(directory)
            except Exception:
                return None
        forked = ForkedSave(request)
        _track(forked)
        with self._lock:
            self._forked_saves += 1
        return forked

    async def _write_job(self, job: _Job) -> WriteOutcome:
        if job.forked is not None:
            return await self._finish_forked(job)
        if job.staged is not None:
            self._shape = (job.staged.storages, job.staged.tensor_bytes)
        saver = self._saver
        if saver is None or not self._uses_saver():
            return await super()._write_job(job)
        try:
            outcome = await anyio.to_thread.run_sync(saver.run, job.request)
        except NotPicklable:
            if saver.start_method != "fork":
                raise
            # Under fork a per-save child inherits what does not pickle (ppe's design)
            return await super()._write_job(job)
        await anyio.to_thread.run_sync(self._post_save)
        return outcome

    async def _finish_forked(self, job: _Job) -> WriteOutcome:
        """Wait for the child forked at the call, then commit its temporary file."""
        forked, request = job.forked, job.request
        try:
            tmp, nbytes, write_seconds, shape = await anyio.to_thread.run_sync(forked.wait)
        finally:
            _untrack(forked)
        # a custom savefun's child cannot say: the next save stages, and learns
        self._shape = shape if shape is not None else (0, 0)
        start = time.perf_counter()
        await Storage(request.fs, durable=request.durable).acommit(tmp, request.dest)
        commit_seconds = time.perf_counter() - start
        await anyio.to_thread.run_sync(self._post_save)
        return WriteOutcome(nbytes, write_seconds, commit_seconds)

    def _stop_background(self) -> None:
        super()._stop_background()
        if self._saver is not None:
            self._saver.close()
            self._shm.close()

    def create_worker(
        self,
        filename: str,
        out_dir: str,
        target: Any,
        *,
        savefun: SaveFun | None = None,
        append: bool = False,
        **savefun_kwargs: Any,
    ) -> ProcessWorker:
        """Return a :class:`ProcessWorker` (a :class:`multiprocessing.Process`) that saves
        ``target`` in a child process."""
        request = self._request(filename, out_dir, target, savefun, append, savefun_kwargs)
        return ProcessWorker(request, self._mp_context)


_PROCESS_CREATE_WORKER = ProcessWriter.__dict__["create_worker"]
