"""The saving process's own side: it runs saves without importing torch.

A writer's saving process (see :mod:`snapwriter._saver`) receives each save as
``data.pkl``'s bytes and the places of its storages in shared segments, and writes
torch.save's archive with :mod:`snapwriter._ziparchive` straight from the mapped
segments, then commits it through :class:`~snapwriter._storage.Storage`. None of that
needs torch, so the zygote and the savers it forks are small interpreters (about 20 MiB
instead of torch's 200). torch is imported, once per saving process, only for what the
trainer cannot describe that way: a custom ``savefun`` (it gets the object graph), an
archive past 4 GiB, or a torch whose archive format the trainer could not reproduce.

Nothing here may import torch at module level (``tests/test_ziparchive.py`` checks
that a saver serving plain saves never loads it).
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

from ._exceptions import ChildProcessFailure
from ._storage import Storage
from ._ziparchive import ArchivePlan, ArchiveSkeleton, head_records

__all__ = ("Mappings", "send_outcome", "serve", "watch_parent", "zygote_main")

#: How often the saving process checks that the trainer still lives (seconds).
PARENT_POLL_SECONDS = 0.25

#: A segment place: (segment id, offset, nbytes); segment -1: nothing (empty).
Location = tuple[int, int, int]


def send_outcome(conn: Connection, kind: str, payload: Any) -> None:
    """Send ``(kind, payload)``; an exception that does not pickle goes as its text
    (type, message and traceback) in a :class:`~snapwriter.ChildProcessFailure`."""
    try:
        conn.send((kind, payload))
    except Exception:
        if isinstance(payload, BaseException):
            text = "".join(traceback.format_exception(payload))
            conn.send((kind, ChildProcessFailure(f"{type(payload).__name__}: {payload}\n{text}")))
        else:
            raise


class Mappings:
    """Shared segments mapped once each (their descriptors closed at once)."""

    def __init__(self) -> None:
        self.maps: dict[int, mmap.mmap] = {}

    def add(self, seg_id: int, fd: int, size: int) -> None:
        """Map segment ``seg_id`` from ``fd`` (closed here: the mapping is enough)."""
        try:
            self.maps[seg_id] = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def view(self, where: Location) -> memoryview:
        """The bytes at ``where``, without a copy."""
        seg_id, offset, nbytes = where
        if nbytes == 0:
            return memoryview(b"")
        return memoryview(self.maps[seg_id])[offset : offset + nbytes]


def _complete_package() -> None:
    """Run ``snapwriter/__init__`` if this process imported its modules without it (the
    zygote does, to stay free of torch): what needs torch expects the whole package."""
    package = sys.modules.get("snapwriter")
    if package is not None and "__version__" not in vars(package):
        vars(package).pop("__getattr__", None)
        spec = package.__spec__
        assert spec is not None and spec.loader is not None
        spec.loader.exec_module(package)


def _complete_on_demand() -> None:
    """In a package imported without its ``__init__``: the first look-up of a public
    name (``snapwriter.Writer`` in a module a save unpickles) runs the ``__init__``."""
    package = sys.modules.get("snapwriter")
    if package is None or "__version__" in vars(package):
        return

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        _complete_package()
        return getattr(package, name)

    package.__getattr__ = __getattr__  # type: ignore[method-assign]


_complete_on_demand()


def _skeleton(archive: list[tuple[str, Any]], plan: ArchivePlan) -> ArchiveSkeleton:
    """The skeleton of ``archive`` (name, bytes or mapped memory view) under ``plan``."""
    return ArchiveSkeleton([name for name, _ in archive], [len(data) for _, data in archive], plan)


class _ChildState:
    """What a saving process keeps between saves: mappings, the last save's data.pkl
    and records (a save may say "same as last time"), the torch side once needed."""

    def __init__(self) -> None:
        self.maps = Mappings()
        self.last: dict[str, tuple[bytes, list[Any]]] = {}
        # the last fast save's records (as sent), plan, data.pkl size, archive, skeleton
        self._known: (
            tuple[list[Any], ArchivePlan, int, list[tuple[str, Any]], ArchiveSkeleton] | None
        ) = None
        self._torch: Any = None

    def save(self, message: dict[str, Any]) -> tuple[int, float, float]:
        """Run one save; returns (bytes written, write seconds, commit seconds)."""
        kind = message["kind"]
        data, records = message["data"], message["records"]
        if data is None or records is None:
            last_data, last_records = self.last[kind]
            data = last_data if data is None else data
            records = last_records if records is None else records
        self.last[kind] = (data, records)
        plan = message.get("plan")
        if plan is None or kind == "graph":
            return self._save_with_torch(kind, data, records, message["rest"])
        if kind == "fast":
            known = self._known
            if (
                known is not None
                and known[0] is records  # "same records as last time"
                and known[1:3] == (plan, len(data))
            ):
                archive, skeleton = known[3], known[4]
            else:
                view = self.maps.view
                archive = head_records(data, plan.alignment)
                archive += [(f"data/{key}", view(loc)) for key, loc in records]
                skeleton = _skeleton(archive, plan)
                self._known = (records, plan, len(data), archive, skeleton)
            archive[0] = ("data.pkl", data)
        else:
            archive = [("data.pkl", data)]
            archive += [
                (name, value if isinstance(value, bytes) else self.maps.view(value))
                for name, value in records
            ]
            skeleton = _skeleton(archive, plan)
        buffers = [value for _, value in archive]
        rest = message["rest"]

        def writer(target: list[Any], f: Any) -> None:
            skeleton.write(f, target)

        storage = Storage(rest["fs"], durable=rest["durable"])
        start = time.perf_counter()
        if rest["append"]:
            nbytes = storage.write_append(rest["dest"], writer, buffers, {})
            return nbytes, time.perf_counter() - start, 0.0
        tmp, nbytes = storage.write_temp(rest["dest"], writer, buffers, {})
        written = time.perf_counter()
        storage.commit(tmp, rest["dest"])
        return nbytes, written - start, time.perf_counter() - written

    def _save_with_torch(
        self, kind: str, data: bytes, records: list[Any], rest: dict[str, Any]
    ) -> tuple[int, float, float]:
        if self._torch is None:
            _complete_package()
            from ._saver import TorchSide

            self._torch = TorchSide(self.maps)
        outcome = self._torch.save(kind, data, records, rest)
        return outcome.nbytes, outcome.write_seconds, outcome.commit_seconds


def watch_parent(parent_pid: int) -> None:
    """Exit at once when the trainer is gone (the save in flight, if any, is abandoned:
    its temporary file is removed by the next writer that opens the directory)."""
    first_ppid = os.getppid()
    try:
        pidfd: int | None = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        os._exit(3)
    except OSError:  # no pidfd here: the parent pid alone
        pidfd = None
    while True:
        if pidfd is not None:
            if select.select([pidfd], [], [], PARENT_POLL_SECONDS)[0]:
                os._exit(3)  # the trainer exited (even if its parent did not reap it)
        else:
            time.sleep(PARENT_POLL_SECONDS)
        if os.getppid() != first_ppid:
            os._exit(3)


def serve(conn: Connection, parent_pid: int) -> None:
    """Entry point of the saving process: run saves until told to stop (``None``) or
    the pipe closes; exits when the trainer dies."""
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    threading.Thread(
        target=watch_parent, args=(parent_pid,), name="snapwriter-watch", daemon=True
    ).start()
    state = _ChildState()
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        # a save's description holds a few objects per storage, tens of thousands of
        # them: no collector passes while it is read and written (on again after)
        gc.disable()
        try:
            if not _serve_one(conn, state, raw):
                return
        finally:
            gc.enable()


def _serve_one(conn: Connection, state: _ChildState, raw: bytes) -> bool:
    """Run one message of the trainer (a save, or a segment handed over); False when
    it says stop."""
    try:
        message = pickle.loads(raw)
    except Exception as exc:  # a save whose savefun/fs does not unpickle here
        send_outcome(
            conn,
            "error",
            ChildProcessFailure(f"the saving process could not receive the save: {exc!r}"),
        )
        return True
    if message is None:
        return False
    if message[0] == "segment":
        _, seg_id, size = message
        state.maps.add(seg_id, reduction.recv_handle(conn), size)
        return True
    send_outcome(conn, "started", None)
    try:
        outcome = state.save(message[1])
    except Exception as exc:
        send_outcome(conn, "error", exc)
    else:
        send_outcome(conn, "ok", outcome)
    return True


def zygote_main(fd: int, trainer_pid: int) -> None:
    """Entry point of the zygote: fork savers on request until the trainer is gone."""
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl = socket.socket(fileno=fd)
    first_ppid = os.getppid()
    while True:
        ready, _, _ = select.select([ctl], [], [], PARENT_POLL_SECONDS)
        if os.getppid() != first_ppid:
            os._exit(0)
        if not ready:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(ctl, 4096, 4)
        except OSError:
            os._exit(0)
        if not data:
            os._exit(0)
        request = pickle.loads(data)
        if request[0] == "spawn":
            pid = os.fork()
            if pid == 0:
                ctl.close()
                code = 0
                try:
                    serve(Connection(fds[0]), trainer_pid)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            for received in fds:
                os.close(received)
            reply: Any = pid
        else:
            reply = _reap(request[1])
        ctl.sendall(pickle.dumps(reply))


def _reap(pid: int) -> int | None:
    deadline = time.monotonic() + 5.0
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)
