"""``SimpleWriter``: the blocking writer."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import torch

from ._base import SaveFun, Writer, _Job, worker_filename
from ._exceptions import InvalidSnapshotArgument
from ._handle import SnapshotHandle, SnapshotResult

__all__ = ("SimpleWriter",)


class SimpleWriter(Writer):
    """Saves in the caller's time: the call returns once the snapshot is durable.

    The write still goes through the atomic protocol (temporary file, ``fsync``,
    rename, directory ``fsync``) and runs on the writer's loop; the caller just waits.
    Nothing is staged, since the caller cannot mutate the target while it waits.

    Args:
        savefun: called as ``savefun(target, file_object, **kwds)``; ``None`` if every
            call passes its own ``savefun=``.
        fs, out_dir, durable, keep_last, keep_pattern: see :class:`Writer`.
        **kwds: keyword arguments for ``savefun``.
    """

    def __init__(
        self,
        savefun: SaveFun | None = torch.save,
        fs: Any = None,
        out_dir: str = "",
        *,
        durable: bool = True,
        keep_last: int | None = None,
        keep_pattern: str | None = None,
        **kwds: Any,
    ) -> None:
        super().__init__(
            fs=fs, out_dir=out_dir, durable=durable, keep_last=keep_last, keep_pattern=keep_pattern
        )
        if savefun is not None and not callable(savefun):
            raise InvalidSnapshotArgument(f"savefun must be callable, not {savefun!r}")
        self._savefun = savefun
        self._kwds = kwds

    def __call__(
        self,
        filename: str,
        out_dir: str,
        target: Any,
        *,
        savefun: SaveFun | None = None,
        append: bool = False,
    ) -> SnapshotHandle:
        """Save ``target`` as ``out_dir/filename`` and return once it is durable.

        Returns:
            A finished :class:`SnapshotHandle`.

        Raises:
            InvalidSnapshotArgument: bad filename or option; nothing was written.
            SnapshotWriteError: the save failed; the previous file is intact.
            WriterClosedError: the writer was finalized.
        """
        self._check_open()
        self._raise_unreported()
        request = self._request(filename, out_dir, target, savefun, append, self._kwds)
        if self._portal.in_loop_thread():
            raise RuntimeError("a writer cannot be called from its own loop thread")
        if self._save_overridden():  # ppe's SimpleWriter calls self.save(): honour it
            start = time.perf_counter()
            self.save(filename, out_dir, target, request.savefun, append, **self._kwds)
            elapsed = time.perf_counter() - start
            done: Future[SnapshotResult] = Future()
            done.set_result(SnapshotResult(request.dest.path, 0, 0.0, elapsed, 0.0, elapsed))
            return SnapshotHandle(done, request.dest.path, 0.0)
        job = _Job(
            request=request,
            filename=worker_filename(self.out_dir, request.dest),
            staged=None,
            stage_seconds=0.0,
            out_dir=self._check_call_out_dir(out_dir),
        )
        handle = self._submit(job)
        handle.result()  # raises the failure; the handle reported it, finalize won't repeat it
        return handle

    def _save_overridden(self) -> bool:
        """Whether :meth:`save` was replaced (subclass, class patch or instance attribute)."""
        return "save" in vars(self) or getattr(type(self), "save", None) is not _DEFAULT_SAVE


_DEFAULT_SAVE = Writer.__dict__["save"]
