"""Queue writers: saves run one at a time, in call order.

``QueueWriter`` and ``ThreadQueueWriter`` write in a worker thread;
``ProcessQueueWriter`` in one long-lived child process. Unlike ppe's queue writers they
honour ``fs``, ``out_dir`` and clean-up hooks, stage the target, bound the queue
(``max_pending``) and never hang ``finalize()`` after a failure.
"""

from __future__ import annotations

import time
from typing import Any

import anyio.to_thread
import torch

from ._base import SaveFun, _Job
from ._process import ConsumerProcess, MpContext, check_context
from ._save import WriteOutcome
from ._standard import StandardWriter, _check_shareable

__all__ = ("ProcessQueueWriter", "QueueWriter", "ThreadQueueWriter")

TaskFun = Any


class QueueWriter(StandardWriter):
    """Queues snapshots and writes them one at a time, in call order.

    Args:
        savefun, fs, out_dir: as :class:`StandardWriter`.
        task: ppe's custom task: called as ``task(filename, out_dir, target,
            savefun=savefun, append=append)`` in the background instead of snapwriter's
            atomic save. It then owns atomicity and durability.
        durable, stage, keep_last, keep_pattern: as :class:`StandardWriter`.
        max_pending: saves queued or running at most (default 2); a call beyond that
            blocks until one finishes, which bounds the memory held by staged copies.
        **kwds: keyword arguments for ``savefun`` (an addition to ppe's signature).
    """

    _default_max_pending = 2

    def __init__(
        self,
        savefun: SaveFun = torch.save,
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
        self._task = task if task is not None else self.create_task(savefun)

    def create_task(self, savefun: SaveFun) -> TaskFun | None:
        """Return the task run for each queued save; ``None`` means snapwriter's own
        atomic save (the default). Override to customise, as in ppe."""
        return None

    def _uses_workers(self) -> bool:
        return False

    async def _write_job(self, job: _Job) -> WriteOutcome:
        if self._task is None:
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
            request.dest.out_dir,
            request.target,
            savefun=request.savefun,
            append=request.append,
        )
        return time.perf_counter() - start


class ThreadQueueWriter(QueueWriter):
    """A :class:`QueueWriter` whose consumer is a thread (ppe's ``ThreadQueueWriter``)."""


class ProcessQueueWriter(QueueWriter):
    """A :class:`QueueWriter` whose consumer is one long-lived child process.

    Works under ``fork``, ``spawn`` and ``forkserver``; the target, ``savefun``, ``fs``
    and ``task`` must be picklable for the latter two. A consumer that dies is replaced
    for the next save; the save it was running fails with the exit status.

    Args:
        mp_context: a :mod:`multiprocessing` context or start-method name.
        Other arguments: as :class:`QueueWriter`.
    """

    def __init__(
        self,
        savefun: SaveFun = torch.save,
        fs: Any = None,
        out_dir: str = "",
        task: TaskFun | None = None,
        *,
        mp_context: MpContext = None,
        **kwds: Any,
    ) -> None:
        super().__init__(savefun, fs, out_dir, task, **kwds)
        _check_shareable(self.fs, type(self).__name__)
        self._consumer = ConsumerProcess(check_context(mp_context), self._task)

    async def _write_job(self, job: _Job) -> WriteOutcome:
        request = job.request
        if self._task is None:
            outcome = await anyio.to_thread.run_sync(self._consumer.run, request)
        else:
            args = (
                job.filename,
                request.dest.out_dir,
                request.target,
                request.savefun,
                request.append,
            )
            outcome = await anyio.to_thread.run_sync(self._consumer.run, None, args)
            outcome = WriteOutcome(
                await anyio.to_thread.run_sync(self._size_of, request),
                outcome.write_seconds,
                0.0,
            )
        await anyio.to_thread.run_sync(self._post_save)
        return outcome

    def _stop_background(self) -> None:
        self._consumer.close()
