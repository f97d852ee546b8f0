"""Copy-on-write snapshots: ``ProcessWriter(staging="fork")`` forks the trainer per save.

Staging copies every tensor in the call, a few microseconds each in Python: 0.4 s for
50,000 small tensors, however fast the copy itself is. A fork copies nothing but the
trainer's page tables (3 to 6 ms here for a trainer holding 50,000 tensors or 0.5 GiB):
the child holds the state as it was at the call, copy-on-write, and writes the file
from it (torch.save's bytes, through :func:`~snapwriter._fastsave.fast_torch_save`)
into a temporary file, ``fsync``'d; the trainer's writer then commits it (rename,
directory ``fsync``, retention) as for any other save. pytorch-pfn-extras'
``ProcessWriter`` forks the same way, but writes the final name directly and never
``fsync``\\ s.

What it costs instead: every page the trainer writes while a child is alive is copied
once (the state's pages after an optimizer step: up to 1x the state in extra memory
for as long as the write takes); the child runs with the trainer's memory image, so it
must not need anything another thread of the trainer may hold at the fork: it runs no
torch op (it only reads tensors and writes bytes), keeps the collector off and leaves
with ``os._exit``. Where a fork cannot see the state (CUDA or another accelerator is
initialised: device memory is not copied by ``fork``), for a remote file system (the
child would share the trainer's connections), for ``append=True`` and off Linux, the
call stages into shared memory as usual (:func:`unforkable` says why).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
import warnings
from typing import Any

import torch

from ._exceptions import ChildProcessFailure
from ._fastsave import save_and_measure, using_save_options
from ._process import _describe_exit
from ._save import SaveRequest
from ._saver_child import watch_parent as _watch_parent
from ._storage import Storage

__all__ = (
    "AUTO_MAX_MEAN_BYTES",
    "AUTO_MIN_STORAGES",
    "ForkedSave",
    "many_small_storages",
    "unforkable",
)

#: ``staging="auto"`` forks for states of at least this many storages...
AUTO_MIN_STORAGES = 5000
#: ...of at most this many bytes on average. Measured here (2 cores, one run of
#: ``make bench-compare``): a warm staging call costs about 4 us a storage plus the copy
#: (runs of a state dict are checked and staged by whole-list operations); a fork costs
#: about 15 ms plus about 3 us for each 4 KiB page the trainer writes while the child
#: lives. 50,000 storages of 1 KiB: 0.08-0.14 s lost with a fork, 0.20-0.28 s staged;
#: 5,000 of 13 KiB: 0.055 s against 0.024 s; 190 of 2.7 MiB: 0.32 s against 0.05 s. So
#: about 5,000 storages of 1 KiB cost the same either way.
AUTO_MAX_MEAN_BYTES = 8192


def many_small_storages(shape: tuple[int, int] | None) -> bool:
    """Whether a save of ``shape`` (storages, bytes) is one ``staging="auto"`` forks."""
    if shape is None:
        return False
    count, nbytes = shape
    return count >= AUTO_MIN_STORAGES and nbytes <= AUTO_MAX_MEAN_BYTES * count


def unforkable(request: SaveRequest) -> str | None:
    """Why ``request`` cannot be saved from a fork of this process (None: it can)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return "fork snapshots need Linux"
    if request.append:
        return "append=True writes the final file in place"
    if not Storage(request.fs).is_local:
        return "the file system is not local"
    for name in ("cuda", "xpu", "mtia"):
        device = getattr(torch, name, None)
        initialised = getattr(device, "is_initialized", None)
        if initialised is not None and initialised():
            return f"torch.{name} is initialised: a fork does not copy device memory"
    return None


class ForkedSave:
    """A child forked at the call that writes ``request`` to a temporary file.

    The parts of :class:`multiprocessing.Process` the exit machinery uses (``pid``,
    :meth:`is_alive`, :meth:`kill`, :meth:`join`). Thread-safe for one waiter.
    """

    def __init__(self, request: SaveRequest) -> None:
        self.path = request.dest.path
        #: named here, by the process that commits it: the writer's own clean-ups
        #: (which remove a dead process's temporary files) leave it alone
        self.tmp = Storage.temp_path(request.dest)
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        with warnings.catch_warnings():
            # Python 3.12+ warns about forking a process with threads: the child is
            # written for that (module docstring)
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_fd)
            _child(request, self.tmp, write_fd, parent)
        os.close(write_fd)
        self.pid = pid
        self._read_fd = read_fd
        self._exitcode: int | None = None

    def wait(self) -> tuple[str, int, float, tuple[int, int] | None]:
        """Block until the child is done: (temporary path, bytes, write seconds, and the
        number of storages with their bytes, None for a custom ``savefun``).

        Raises:
            The child's exception (the save failed there), or ChildProcessFailure: the
            child died (killed...) before reporting. Either way the temporary file is
            gone.
        """
        chunks = []
        try:
            while chunk := os.read(self._read_fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(self._read_fd)
        self.join()
        report = b"".join(chunks)
        if not report:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            raise ChildProcessFailure(
                f"the snapshot's forked process (pid {self.pid}) "
                f"{_describe_exit(self._exitcode)} while saving {self.path!r}"
            )
        kind, payload = pickle.loads(report)
        if kind == "ok":
            tmp, nbytes, seconds, shape = payload
            return str(tmp), int(nbytes), float(seconds), shape
        raise payload

    def is_alive(self) -> bool:
        if self._exitcode is not None:
            return False
        try:
            done, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by another thread's join
            return False
        if done:
            self._exitcode = os.waitstatus_to_exitcode(status)
            return False
        return True

    def kill(self) -> None:
        if self._exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_alive():
            if deadline is None:
                with contextlib.suppress(ChildProcessError):
                    _, status = os.waitpid(self.pid, 0)
                    self._exitcode = os.waitstatus_to_exitcode(status)
                return
            if time.monotonic() >= deadline:
                return
            select.select([], [], [], 0.01)

    @property
    def exitcode(self) -> int | None:
        self.is_alive()
        return self._exitcode


def _child(request: SaveRequest, tmp: str, write_fd: int, parent: int) -> None:
    """The forked child: write the temporary file, report, leave (``os._exit``)."""
    code = 1
    try:
        gc.disable()  # a collection would touch (and copy) every page of the trainer's heap
        with contextlib.suppress(Exception):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's
        # gone within a fraction of a second of the trainer (not PR_SET_PDEATHSIG: that
        # fires when the *thread* that forked exits, and callers' threads come and go)
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
        start = time.perf_counter()
        shape: list[tuple[int, int] | None] = [None]
        if request.plain_torch_save:

            def write(target: Any, f: Any) -> None:
                with using_save_options(request.options):
                    shape[0] = save_and_measure(target, f)

        else:
            write = request.writing_function()
        try:
            storage = Storage(request.fs, durable=request.durable)
            tmp, nbytes = storage.write_temp(
                request.dest, write, request.target, request.kwds, tmp=tmp
            )
            report: Any = ("ok", (tmp, nbytes, time.perf_counter() - start, shape[0]))
            code = 0
        except BaseException as exc:  # the parent raises it for the caller
            report = ("error", exc)
        try:
            data = pickle.dumps(report)
        except Exception:  # an exception that does not pickle: its text
            failure = report[1]
            text = "".join(traceback.format_exception(failure))
            data = pickle.dumps(
                ("error", ChildProcessFailure(f"{type(failure).__name__}: {failure}\n{text}"))
            )
        view = memoryview(data)
        while view:
            view = view[os.write(write_fd, view) :]
    finally:
        os._exit(code)
