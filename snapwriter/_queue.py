"""Queue writers: saves run one at a time, in call order.

``QueueWriter`` and ``ThreadQueueWriter`` write in a worker thread;
``ProcessQueueWriter`` in the writer's persistent saving process (:mod:`snapwriter._saver`,
fed through shared memory), or, with a custom ``task``, in one long-lived consumer
process that runs it. Unlike ppe's queue writers they
honour ``fs``, ``out_dir`` and clean-up hooks, stage the target, bound the queue
(``max_pending``) and never hang ``finalize()`` after a failure.

ppe documents ``QueueWriter`` as a base class: its ``create_task``, ``create_queue``,
``create_consumer`` and ``consume`` exist here with ppe's meaning. When a subclass
overrides (or a test patches) ``create_queue``, ``create_consumer`` or ``consume``, the
writer runs ppe's design with them: the queue and its consumer are created at
construction, each call puts ``(task, filename, out_dir, target, savefun, append)`` on
the queue, and ``finalize()`` puts ``None``, joins the queue, then the consumer.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

import anyio.to_thread
import torch

from ._base import SaveFun, _Job, _State, worker_filename
from ._exceptions import ChildProcessFailure, InvalidSnapshotArgument
from ._handle import SnapshotHandle, SnapshotResult
from ._paths import resolve_destination
from ._process import ConsumerProcess, MpContext, check_context, get_context
from ._save import SaveRequest, WriteOutcome, execute_save_blocking
from ._saver import SaverProcess, SaverStats, saver_supported
from ._shm import SharedMemory
from ._staging import Stager
from ._standard import StandardWriter, _check_shareable

__all__ = ("AtomicSaveTask", "ProcessQueueWriter", "QueueWriter", "ThreadQueueWriter")

TaskFun = Any
_PPE_HOOKS = ("create_queue", "create_consumer", "consume")


class AtomicSaveTask:
    """The task ``QueueWriter.create_task`` returns: ppe's task signature, snapwriter's
    atomic, durable save into the writer's directory. Picklable when ``fs`` and
    ``savefun`` are (a consumer process gets it).
    """

    def __init__(
        self, fs: Any, out_dir: str, savefun: SaveFun | None, durable: bool, kwds: dict[str, Any]
    ) -> None:
        self.fs = fs
        self.out_dir = out_dir
        self.savefun = savefun
        self.durable = durable
        self.kwds = dict(kwds)

    def __call__(
        self,
        filename: str,
        out_dir: str,
        target: Any,
        *,
        savefun: SaveFun | None = None,
        append: bool = False,
    ) -> None:
        """Save ``target`` as ``filename`` relative to the writer's ``out_dir``."""
        dest = resolve_destination(self.out_dir, filename, out_dir or "")
        fun = savefun if savefun is not None else self.savefun
        if fun is None:
            raise InvalidSnapshotArgument(f"no savefun for {dest.path!r}")
        execute_save_blocking(
            SaveRequest(dest, target, fun, dict(self.kwds), append, self.fs, self.durable)
        )


class _TrackedTask:
    """A queued task and the future of its call's handle (dropped when pickled: a
    consumer process cannot complete it; ``finalize()`` does)."""

    def __init__(self, task: TaskFun, future: Future[SnapshotResult], path: str) -> None:
        self.task = task
        self.future: Future[SnapshotResult] | None = future
        self.path = path
        self.called_at = time.perf_counter()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.task(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "future": None}


class QueueWriter(StandardWriter):
    """Queues snapshots and writes them one at a time, in call order.

    Args:
        savefun, fs, out_dir: as :class:`StandardWriter`.
        task: ppe's custom task: called as ``task(filename, out_dir, target,
            savefun=savefun, append=append)`` in the background instead of snapwriter's
            atomic save (:meth:`create_task` makes the default one). It then owns
            atomicity and durability.
        durable, stage, keep_last, keep_pattern: as :class:`StandardWriter`.
        max_pending: saves queued or running at most (default 2); a call beyond that
            blocks until one finishes, which bounds the memory held by staged copies.
        **kwds: keyword arguments for ``savefun`` (an addition to ppe's signature).
    """

    _default_max_pending = 2

    def __init__(
        self,
        savefun: SaveFun | None = torch.save,
        fs: Any = None,
        out_dir: str = "",
        task: TaskFun | None = None,
        *,
        durable: bool = True,
        stage: bool = True,
        max_pending: int | None = None,
        keep_last: int | None = None,
        keep_pattern: str | None = None,
        **kwds: Any,
    ) -> None:
        super().__init__(
            savefun,
            fs,
            out_dir,
            durable=durable,
            stage=stage,
            max_pending=max_pending,
            keep_last=keep_last,
            keep_pattern=keep_pattern,
            **kwds,
        )
        self._task: TaskFun = task if task is not None else self.create_task(savefun)
        self._ppe_mode = self._ppe_hooks_overridden()
        self._ppe_lock = threading.Lock()
        self._ppe_tracked: list[_TrackedTask] = []
        self._ppe_drained = False
        if self._ppe_mode:
            self._ppe_queue = self.create_queue()
            self._ppe_consumer = self.create_consumer(self._ppe_queue)
            self._ppe_consumer.start()

    # -- ppe's extension points --------------------------------------------------------

    def create_task(self, savefun: SaveFun | None) -> TaskFun:
        """Return the task run for each queued save (ppe's meaning): by default an
        :class:`AtomicSaveTask` into this writer's directory. Override to customise."""
        return AtomicSaveTask(self.fs, self.out_dir, savefun, self.durable, self._kwds)

    def create_queue(self) -> Any:
        """Return the queue of ppe's design (a :class:`queue.Queue`); used only when
        ``create_queue``, ``create_consumer`` or ``consume`` is overridden."""
        return queue.Queue()

    def create_consumer(self, q: Any) -> Any:
        """Return the consumer of ``q`` (ppe's design): a thread running :meth:`consume`."""
        return threading.Thread(
            target=self.consume, args=(q,), name="snapwriter-queue-consumer", daemon=True
        )

    def consume(self, q: Any) -> None:
        """ppe's consumer loop: run each ``(task, filename, out_dir, target, savefun,
        append)`` taken from ``q`` and mark it done, until ``None``.

        Unlike ppe, a failing task does not end the loop (``q.join()`` in ``finalize()``
        would wait forever): its error is logged and raised by ``finalize()`` (in a
        consumer process, the process then exits with status 1).
        """
        failures = 0
        while True:
            item = q.get()
            try:
                if item is None:
                    break
                if not self._run_queued(item):
                    failures += 1
            finally:
                q.task_done()
        if failures and self._state is _State.FORKED:
            raise SystemExit(1)  # a consumer process: the parent reads the exit code

    def _run_queued(self, item: Any) -> bool:
        task = item[0]
        path = getattr(task, "path", None) or str(item[1])
        future = getattr(task, "future", None)
        try:
            task(item[1], item[2], item[3], savefun=item[4], append=item[5])
            self._post_save()
        except Exception as exc:
            error = self._wrap_failure(path, exc, record=True)
            if isinstance(future, Future):
                future.set_exception(error)
            return False
        if isinstance(future, Future):
            future.set_result(self._ppe_result(task))
        return True

    def _ppe_result(self, task: _TrackedTask) -> SnapshotResult:
        elapsed = time.perf_counter() - task.called_at
        size = 0
        try:
            size = int(self.fs.stat(task.path).size)
        except Exception:  # the task wrote elsewhere, or nothing: figures unknown
            size = 0
        return SnapshotResult(task.path, size, 0.0, elapsed, 0.0, elapsed)

    def _ppe_hooks_overridden(self) -> bool:
        """Whether a ppe hook is not snapwriter's own: overridden by a subclass, or
        replaced on a class (``mock.patch``)."""
        return any(getattr(type(self), n, None) not in _OWN_HOOKS[n] for n in _PPE_HOOKS)

    # -- ppe's design, when its hooks are overridden -----------------------------------

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
        """As :meth:`StandardWriter.__call__`. With a ppe hook overridden (ppe's design),
        the staged target is put on the hook's queue, which is not bounded by
        ``max_pending`` (as in ppe); the handle completes when the consumer ran the save
        (a consumer process: at ``finalize()``)."""
        if not self._ppe_mode:
            return super().__call__(
                filename, out_dir, target, savefun=savefun, append=append, stage=stage
            )
        self._check_open()
        self._raise_unreported()
        request = self._request(filename, out_dir, target, savefun, append, self._kwds)
        do_stage = self._stage if stage is None else stage
        start = time.perf_counter()
        if do_stage:  # never released to the pool: a process queue pickles it later
            target = self._stager.stage(target, check_pickle=request.savefun is torch.save).value
        future: Future[SnapshotResult] = Future()
        future.set_running_or_notify_cancel()
        tracked = _TrackedTask(self._task, future, request.dest.path)
        with self._ppe_lock:
            self._check_open()
            self._ppe_tracked.append(tracked)
            self._ppe_queue.put(
                (
                    tracked,
                    worker_filename(self.out_dir, request.dest),
                    out_dir,
                    target,
                    savefun,
                    append,
                )
            )
        return SnapshotHandle(
            future, request.dest.path, time.perf_counter() - start, self._observed
        )

    def _drain_ppe_queue(self) -> None:
        """ppe's finalize: ``None`` on the queue, join it, join the consumer; then
        complete the handles a consumer process could not (failed, with the consumer's
        failure, if it died or exited non-zero; ``finalize()`` raises it)."""
        with self._ppe_lock:
            if not self._ppe_mode or self._ppe_drained:
                return
            self._ppe_drained = True
        q, consumer = self._ppe_queue, self._ppe_consumer
        failure: BaseException | None = None
        try:
            q.put(None)
            _join_queue(q, consumer)
            consumer.join()
        except Exception as exc:  # the consumer died with saves left: theirs fail
            failure = exc
        code = getattr(consumer, "exitcode", 0)
        if failure is None and isinstance(code, int) and not isinstance(code, bool) and code:
            failure = ChildProcessFailure(f"the queue's consumer ended with exit code {code}")
        for tracked in self._ppe_tracked:
            future = tracked.future
            if future is None or future.done():
                continue
            if failure is not None:
                future.set_exception(self._wrap_failure(tracked.path, failure, record=True))
            else:
                future.set_result(self._ppe_result(tracked))
        self._ppe_tracked.clear()

    def _stop_background(self) -> None:
        self._drain_ppe_queue()

    # -- snapwriter's own design -------------------------------------------------------

    def _uses_workers(self) -> bool:
        return False

    def _own_task(self) -> bool:
        return isinstance(self._task, AtomicSaveTask)

    async def _write_job(self, job: _Job) -> WriteOutcome:
        if self._own_task():
            return await super()._write_job(job)
        request = job.request
        outcome = await anyio.to_thread.run_sync(self._run_task, job)
        await anyio.to_thread.run_sync(self._post_save)
        return WriteOutcome(await anyio.to_thread.run_sync(self._size_of, request), outcome, 0.0)

    def _run_task(self, job: _Job) -> float:
        request = job.request
        task = self._task
        assert task is not None
        start = time.perf_counter()
        task(
            job.filename,
            job.out_dir,
            request.target,
            savefun=request.savefun,
            append=request.append,
        )
        return time.perf_counter() - start


def _join_queue(q: Any, consumer: Any) -> None:
    """``q.join()``, but not forever when a real consumer died with tasks left."""
    if not isinstance(consumer, threading.Thread) and not hasattr(consumer, "_popen"):
        q.join()  # a consumer of the user's own kind: trust it, as ppe does
        return
    joiner = threading.Thread(target=q.join, name="snapwriter-queue-join", daemon=True)
    joiner.start()
    while joiner.is_alive():
        joiner.join(0.2)
        if joiner.is_alive() and not consumer.is_alive():
            raise ChildProcessFailure(
                "the queue's consumer ended with saves left in the queue "
                f"(exit code {getattr(consumer, 'exitcode', None)})"
            )


class ThreadQueueWriter(QueueWriter):
    """A :class:`QueueWriter` whose consumer is a thread (ppe's ``ThreadQueueWriter``)."""


class ProcessQueueWriter(QueueWriter):
    """A :class:`QueueWriter` whose saves run, in call order, in one child process.

    With snapwriter's own task that child is the writer's saving process, as for
    :class:`~snapwriter.ProcessWriter` (:mod:`snapwriter._saver`): by default forked
    from a zygote interpreter with torch imported (``mp_context`` picks another start
    method), started by the first save, stopped by ``finalize()``, replaced by the next
    save if it dies (the save it was running fails with :class:`ChildProcessFailure`
    naming the file and the signal), gone soon after the trainer dies. Staged storages
    live in shared segments sent once each (a few descriptors for any number of
    tensors); a save sends ``data.pkl`` and ``(segment, offset, nbytes)`` per storage.
    ``savefun`` and ``fs`` must pickle.

    A custom ``task`` runs in a long-lived consumer process
    (:class:`~snapwriter._process.ConsumerProcess`; the task, target, ``savefun`` and
    ``fs`` must pickle outside ``fork``); overriding ppe's hooks keeps ppe's queue
    design. So does snapwriter's own save where there is no saving process (not Linux:
    no memfd segments or pidfds), the staged target crossing the pipe. Either consumer
    that dies is replaced for the next save.

    Args:
        mp_context: a :mod:`multiprocessing` context or start-method name.
        Other arguments: as :class:`QueueWriter`.
    """

    def __init__(
        self,
        savefun: SaveFun | None = torch.save,
        fs: Any = None,
        out_dir: str = "",
        task: TaskFun | None = None,
        *,
        mp_context: MpContext = None,
        **kwds: Any,
    ) -> None:
        self._mp_context = check_context(mp_context)  # create_queue may need it
        super().__init__(savefun, fs, out_dir, task, **kwds)
        _check_shareable(self.fs, type(self).__name__)
        self._consumer: ConsumerProcess | SaverProcess
        if self._own_task() and saver_supported():
            self._shm = SharedMemory()
            if not self._ppe_mode:
                self._stager = Stager(
                    allocate=self._shm.allocate, allocate_many=self._shm.allocate_many
                )
            self._consumer = SaverProcess(self._mp_context, self._shm)
            if not self._ppe_mode:
                self._consumer.prestart()
        else:
            # a custom task runs in the consumer; snapwriter's own save crosses the pipe
            # as a SaveRequest where there is no saving process (not Linux)
            own = None if self._own_task() else self._task
            self._consumer = ConsumerProcess(self._mp_context, own)

    def saver_stats(self) -> SaverStats | None:
        """Counters of the saving process (starts, pid, segments sent...), or None with
        a custom ``task`` (its consumer process runs it)."""
        consumer = self._consumer
        return consumer.stats() if isinstance(consumer, SaverProcess) else None

    def create_queue(self) -> Any:
        """ppe's process queue: a :class:`multiprocessing.JoinableQueue` of the writer's
        context (used only when a ppe hook is overridden)."""
        return get_context(self._mp_context).JoinableQueue()

    def create_consumer(self, q: Any) -> Any:
        """ppe's consumer process running :meth:`consume` (needs the ``fork`` start
        method: the writer itself is its target)."""
        ctx = get_context(self._mp_context)
        return ctx.Process(target=self.consume, args=(q,), daemon=True)  # type: ignore[attr-defined]

    async def _write_job(self, job: _Job) -> WriteOutcome:
        request = job.request
        consumer = self._consumer
        if isinstance(consumer, SaverProcess) or consumer.task is None:
            outcome = await anyio.to_thread.run_sync(consumer.run, request)
        else:
            args = (
                job.filename,
                job.out_dir,
                request.target,
                request.savefun,
                request.append,
            )
            outcome = await anyio.to_thread.run_sync(consumer.run, None, args)
            outcome = WriteOutcome(
                await anyio.to_thread.run_sync(self._size_of, request),
                outcome.write_seconds,
                0.0,
            )
        await anyio.to_thread.run_sync(self._post_save)
        return outcome

    def _stop_background(self) -> None:
        super()._stop_background()
        self._consumer.close()
        if isinstance(self._consumer, SaverProcess):
            self._shm.close()


#: snapwriter's own ppe hooks, taken when the classes are defined (a patch replaces
#: the class attribute later, so comparing with it at run time would see the patch).
_OWN_HOOKS = {
    name: [QueueWriter.__dict__[name], ProcessQueueWriter.__dict__.get(name, None)]
    for name in _PPE_HOOKS
}
