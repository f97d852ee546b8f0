"""The persistent saving process of ``ProcessWriter`` and ``ProcessQueueWriter``.

One child process per writer writes every snapshot the writer takes (unless a ppe hook
is overridden: those keep their own workers and consumers).

**Lifecycle.** Started by the first save, in the writer's background thread (the call
that stages the target does not wait for it). By default it is forked from this
process's *zygote*: a fresh interpreter (``python -c``) that imports snapwriter's
saving side and no torch (:mod:`snapwriter._saver_child`), started when the first
default-mode process writer is created (a tenth of a second). Like ``forkserver``, but
it never imports the program's ``__main__`` (an unguarded training script is not run
again), and neither it nor its savers hold a copy of the trainer's memory image: no
copy-on-write fault ever slows the trainer, and a saver costs a few MiB, not a second
copy of torch. A process forked from the trainer (``os.fork()``) starts a zygote of its
own the same way. With the writer's ``mp_context`` the saver is started with that
context instead. A saver that dies is replaced by the next save; the save it was
running fails with :class:`~snapwriter.ChildProcessFailure` naming the file and how
the saver died. ``finalize()``/``aclose()`` stop it. It never outlives the trainer: a
watchdog thread in it exits within
:data:`~snapwriter._saver_child.PARENT_POLL_SECONDS` of the trainer's death (a pidfd,
so even a SIGKILL), the zygote exits when the trainer does, and the exit machinery
kills savers when interpreter exit gives up on saves. Each saver is tracked through a
pidfd (it is the zygote's child; the zygote reaps it and reports its exit status).

**What crosses the pipe.** Staged storages live in shared segments
(:mod:`snapwriter._shm`); each segment is handed over once, as one file descriptor
(``SCM_RIGHTS``), which the child maps and closes: the trainer holds one descriptor per
segment, a pidfd and a socket per saver; the saver none per segment. Per save, the
parent pickles the staged state *in the writer's background thread* with
:func:`~snapwriter._fastsave.pickle_state` (not at all when its layout repeats the
previous save's: :mod:`snapwriter._layout`) and sends ``data.pkl``'s bytes (or "same as
the previous save" when unchanged), one ``(key, segment, offset, nbytes)`` per storage
record, the destination and the archive's :class:`~snapwriter._ziparchive.ArchivePlan`
(what torch's zip writer adds, read from torch here); the child writes torch.save's
archive from the mapped segments with :mod:`snapwriter._ziparchive` and commits it with
:class:`~snapwriter._storage.Storage` (same temporary names, fsyncs, rename, errors).
What ``pickle_state`` refuses is recorded from ``torch.save`` itself in the parent (its
records, storages named by place), so the file is still torch.save's, byte for byte. A
custom ``savefun`` (or ``savefun`` keyword arguments) gets the object graph in the child
(which imports torch for it, once): it is pickled with torch.save's reducers
(:mod:`snapwriter._transfer`) and its storages named by place.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import IO, Any

import torch
import torch.serialization

from ._compat import register_at_fork
from ._exceptions import ChildProcessFailure, SnapshotError
from ._fastsave import (
    Pickled,
    archive_plan,
    archive_records,
    pure_archives,
    using_save_options,
    write_archive,
    write_records,
)
from ._gcpause import collector_paused
from ._pool import device_tags
from ._process import MpContext, _describe_exit, _track, _untrack, get_context
from ._save import SaveRequest, WriteOutcome, execute_save_blocking
from ._saver_child import Mappings, serve
from ._shm import Location, SharedMemory, _storage_over
from ._transfer import _Pickler as _GraphPickler
from ._transfer import _Unpickler as _GraphUnpickler
from ._ziparchive import ArchivePlan, fits

__all__ = ("NotPicklable", "SaverProcess", "SaverStats")

#: The saving process needs Linux's memfd segments and pidfds; elsewhere the process
#: writers keep their per-save child (``ProcessWriter``) and pipe-fed consumer.
SUPPORTED = hasattr(os, "memfd_create") and hasattr(os, "pidfd_open")
#: How long a request to the zygote may wait (its first one waits for its start).
ZYGOTE_START_SECONDS = 300.0
#: How long ``close()`` waits for the child to exit before killing it (seconds).
STOP_SECONDS = 30.0


class NotPicklable(SnapshotError):
    """The save's ``savefun``, ``fs`` or keyword arguments do not pickle, so they cannot
    reach a saving process that is already running."""


@dataclass
class SaverStats:
    """Counters of a writer's saving process (``writer.saver_stats()``).

    Attributes:
        starts: saving processes started (1 for a writer whose child never died).
        pid: the current one's pid, or None.
        saves: saves handed to it.
        same_pickle: saves whose ``data.pkl`` was sent as "same as the previous".
        segments, reserved_bytes, blocks: shared staging memory (see
            :class:`~snapwriter._shm.ShmStats`).
        segments_sent: segments handed to a saving process (each once per process).
        forked: saves written by a child forked at the call (``staging="fork"``).
    """

    starts: int = 0
    pid: int | None = None
    saves: int = 0
    same_pickle: int = 0
    segments: int = 0
    reserved_bytes: int = 0
    blocks: int = 0
    segments_sent: int = 0
    forked: int = 0


# -- the description of one save ----------------------------------------------------------


class _Recorder:
    """Stands for torch's zip writer in ``torch.serialization._save``: keeps the records
    torch.save writes, in order (storages as storage objects)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, Any]] = []

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        if isinstance(data, str):
            data = data.encode()
        elif isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
        self.records.append((name, data))


def _torch_save_records(target: Any) -> list[tuple[str, Any]] | None:
    """The records ``torch.save(target, f)`` writes, or None where this torch's private
    ``_save`` is not the one this was written against."""
    save = getattr(torch.serialization, "_save", None)
    if save is None:
        return None
    recorder = _Recorder()
    try:
        save(target, recorder, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
    except (TypeError, AttributeError) as exc:
        if "write_record" in str(exc) or "_save()" in str(exc):
            return None
        raise
    return recorder.records


@dataclass
class _Prepared:
    """One save as it goes to the child, and what must stay alive until it is written."""

    kind: str  # "fast", "records" or "graph"
    data: bytes
    records: list[Any]
    rest: dict[str, Any]
    keep: list[torch.UntypedStorage] = field(default_factory=list)
    segments: set[int] = field(default_factory=set)
    pickled: Pickled | None = None  # the "fast" kind's source
    #: how the child writes the archive without torch (None: with torch)
    plan: ArchivePlan | None = None


def _plan(records: list[tuple[str, bytes | Location]], key: Any, crc32: bool) -> ArchivePlan | None:
    """The archive plan of ``records`` (name, bytes or the place of a storage), or None
    when the child must write them with torch (CRC-32s off, this torch's archives not
    reproduced, or zip64)."""
    if not crc32 or not pure_archives():
        return None
    plan = archive_plan([name for name, _ in records], key=key)
    sizes = ((name, len(v) if isinstance(v, bytes) else v[2]) for name, v in records)
    return plan if fits(sizes, plan) else None


def _prepare(
    request: SaveRequest, shm: SharedMemory, previous: _Prepared | None = None
) -> _Prepared:
    """Describe ``request``: data.pkl (or the graph) and every storage by its place.

    ``previous``: the last save prepared for the same saving process. When the layout
    repeated and staging handed back the very same staged storages (the same
    :class:`~snapwriter._fastsave.Pickled`, see :mod:`snapwriter._layout`), their places
    are the same too and are not looked up again.

    Runs in the writer's background thread (holds the GIL while pickling).
    """
    keep: list[torch.UntypedStorage] = []
    segments: set[int] = set()

    def where(storage: torch.UntypedStorage) -> Location:
        loc = shm.locate(storage)
        if loc is None:  # not staged here (stage=False, special tensors): copy it in
            copy, loc = shm.copy_in(storage)
            keep.append(copy)
        if loc[0] >= 0:
            segments.add(loc[0])
        return loc

    rest = {
        "dest": request.dest,
        "append": request.append,
        "fs": request.fs,
        "durable": request.durable,
        "options": request.options,
    }
    # torch.save's own records (.storage_alignment) and the archive plan follow the
    # caller's options
    with using_save_options(request.options):
        target = request.target
        crc32 = request.options[0]
        if request.plain_torch_save:
            with device_tags(request.device_tags):
                pickled = request.pickle_target()
                raw = None if pickled is not None else _torch_save_records(target)
            if pickled is not None:
                if previous is not None and previous.pickled is pickled and not previous.keep:
                    # the very same staged storages (kept alive by ``pickled``): same places
                    records, segments = previous.records, previous.segments
                    plan = previous.plan
                else:
                    records = [(key, where(storage)) for key, storage in pickled.storages]
                    plan = None
                if plan is None:
                    plan_key = ("fast", tuple(k for k, _ in records))
                    plan = _plan(archive_records(pickled.data, records), plan_key, crc32)
                return _Prepared("fast", pickled.data, records, rest, keep, segments, pickled, plan)
            if raw is not None and raw and raw[0][0] == "data.pkl":
                described = [
                    (name, value if isinstance(value, bytes) else where(value))
                    for name, value in raw[1:]
                ]
                plan = _plan([("data.pkl", raw[0][1]), *described], None, crc32)
                return _Prepared("records", raw[0][1], described, rest, keep, segments, None, plan)
        pickler_buffer = io.BytesIO()
        pickler = _GraphPickler(pickler_buffer)
        pickler.dump((target, request.device_tags))
        locations = [where(storage) for storage in pickler.storages]
        rest.update(savefun=request.savefun, kwds=request.kwds)
        return _Prepared("graph", pickler_buffer.getvalue(), locations, rest, keep, segments)


# -- the torch side of a saving process ---------------------------------------------------


def _write_pickled(target: Pickled, f: IO[bytes]) -> None:
    write_archive(f, target)


def _write_records(target: list[tuple[str, Any]], f: IO[bytes]) -> None:
    """Write the records torch.save wrote (recorded in the parent) as torch.save does."""
    write_records(f, target)


class TorchSide:
    """What a saving process does with torch (imported for it, once): saves with a
    custom ``savefun`` (the object graph rebuilt over the shared segments) and archives
    :mod:`snapwriter._ziparchive` does not write (past 4 GiB; a torch whose format the
    trainer could not reproduce), written by torch's own zip writer."""

    def __init__(self, maps: Mappings) -> None:
        self._maps = maps
        #: the previous "fast" save's records and the storages made for them: a save
        #: with the same records ("same as last time") reuses the storages
        self._fast: tuple[list[Any], list[tuple[str, Any]]] | None = None

    def _storage(self, where: Location) -> torch.UntypedStorage:
        seg_id, offset, nbytes = where
        if nbytes == 0:
            return torch.UntypedStorage(0)  # type: ignore[no-untyped-call]
        return _storage_over(self._maps.maps[seg_id], offset, nbytes)[0]

    def save(
        self, kind: str, data: bytes, records: list[Any], rest: dict[str, Any]
    ) -> WriteOutcome:
        """Write and commit one save described by the trainer (see :func:`_prepare`)."""
        dest, append, fs, durable = rest["dest"], rest["append"], rest["fs"], rest["durable"]
        options = rest["options"]
        storage = self._storage
        if kind == "fast":
            known = self._fast
            if known is not None and known[0] is records:
                by_key = known[1]
            else:
                by_key = [(key, storage(loc)) for key, loc in records]
                self._fast = (records, by_key)
            request = SaveRequest(
                dest,
                Pickled(data, by_key),
                _write_pickled,
                {},
                append,
                fs,
                durable,
                options=options,
            )
        elif kind == "records":
            described: list[tuple[str, Any]] = [("data.pkl", data)]
            described += [
                (name, value if isinstance(value, bytes) else storage(value))
                for name, value in records
            ]
            request = SaveRequest(
                dest, described, _write_records, {}, append, fs, durable, options=options
            )
        else:
            storages = [storage(loc) for loc in records]
            target, tags = _GraphUnpickler(io.BytesIO(data), storages).load()
            request = SaveRequest(
                dest,
                target,
                rest["savefun"],
                rest["kwds"],
                append,
                fs,
                durable,
                list(tags),
                options=options,
            )
        return execute_save_blocking(request)


# -- the parent's side --------------------------------------------------------------------


class _Zygote:
    """A fresh interpreter (``python -c``) that has imported snapwriter's saving side
    (:mod:`snapwriter._saver_child`, no torch) and forks saving processes on request:
    like multiprocessing's ``forkserver``, but it never imports the program's
    ``__main__`` (an unguarded training script is not run again) and the savers it forks
    hold nothing of the trainer's memory. One per trainer process, started by the first
    default-mode process writer; it exits with the trainer (its control socket closes,
    or its parent changes).
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = (
            f"import sys, importlib.util; sys.path[:0] = {list(sys.path)!r}; "
            # the package without its __init__ (which imports torch): see _saver_child
            "spec = importlib.util.find_spec('snapwriter'); "
            "sys.modules['snapwriter'] = importlib.util.module_from_spec(spec); "
            "from snapwriter._saver_child import zygote_main; "
            f"zygote_main({theirs.fileno()}, {os.getpid()})"
        )
        try:
            self._popen = subprocess.Popen(
                [sys.executable, "-c", code], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL
            )
        finally:
            theirs.close()
        self.pid = self._popen.pid
        self._ctl = ours
        self._lock = threading.Lock()

    def alive(self) -> bool:
        return self._popen.poll() is None

    def _ask(self, request: tuple[Any, ...], fds: list[int]) -> Any:
        with self._lock:
            self._ctl.settimeout(ZYGOTE_START_SECONDS)
            socket.send_fds(self._ctl, [pickle.dumps(request)], fds)
            reply = self._ctl.recv(4096)
        if not reply:
            raise ChildProcessFailure("the snapwriter zygote process exited")
        return pickle.loads(reply)

    def spawn(self, fd: int) -> int:
        """Fork a saving process serving the socket ``fd``; return its pid."""
        pid = self._ask(("spawn",), [fd])
        assert isinstance(pid, int)
        return pid

    def status(self, pid: int) -> int | None:
        """Reap the exited saver ``pid``: its exit code (negative: killed by a signal)."""
        code = self._ask(("status", pid), [])
        return code if isinstance(code, int) else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._ctl.close()


_zygote: _Zygote | None = None
_zygote_lock = threading.Lock()


def zygote() -> _Zygote:
    """This process's zygote, started (again) if need be."""
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive():
            if _zygote is not None:
                _zygote.close()
            _zygote = _Zygote()
        return _zygote


def _forget_zygote_after_fork() -> None:
    """In a process forked from this one: the parent's zygote is not ours (a writer
    here starts this process's own)."""
    global _zygote, _zygote_lock
    _zygote_lock = threading.Lock()
    if _zygote is not None:
        _zygote.close()  # our copy of the parent's control socket
    _zygote = None


class _Forked:
    """A saving process forked by the zygote (not our child): the parts of
    :class:`multiprocessing.Process` the writers and the exit machinery use, through a
    pidfd (readable once the process has exited)."""

    def __init__(self, pid: int, parent: _Zygote) -> None:
        self.pid = pid
        self._zygote = parent
        self._pidfd = os.pidfd_open(pid)
        self._exitcode: int | None = None
        self._exited = False

    def is_alive(self) -> bool:
        return not self._exited and not select.select([self._pidfd], [], [], 0)[0]

    def kill(self) -> None:
        if not self._exited:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        if self._exited:
            return
        if select.select([self._pidfd], [], [], timeout)[0]:
            self._exited = True
            with contextlib.suppress(Exception):
                self._exitcode = self._zygote.status(self.pid)
            os.close(self._pidfd)

    @property
    def exitcode(self) -> int | None:
        if not self._exited and not self.is_alive():
            self.join(0)
        return self._exitcode


class SaverProcess:
    """The parent's handle on a writer's saving process (see the module docstring).

    Thread-safe; one save at a time, in the order :meth:`run` is called.
    """

    def __init__(self, context: MpContext, shm: SharedMemory) -> None:
        self._context = context
        self._shm = shm
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._process: Any = None
        self._sent: set[int] = set()
        self._last: dict[str, tuple[bytes, list[Any]]] = {}
        self._previous: _Prepared | None = None
        self._closed = False
        self._stats = SaverStats()

    def prestart(self) -> None:
        """Get the default start method ready (the zygote) before the first save."""
        if self._context is None:
            prestart()

    @property
    def start_method(self) -> str:
        """``"zygote"`` (the default) or the start method of the writer's ``mp_context``."""
        if self._context is None:
            return "zygote"
        return get_context(self._context).get_start_method()

    def stats(self) -> SaverStats:
        """A copy of the counters, with the shared memory's."""
        shm = self._shm.stats
        process = self._process  # no lock: a save in flight holds it
        pid = process.pid if process is not None else None
        return SaverStats(
            starts=self._stats.starts,
            pid=pid,
            saves=self._stats.saves,
            same_pickle=self._stats.same_pickle,
            segments=shm.segments,
            reserved_bytes=shm.reserved_bytes,
            blocks=shm.blocks,
            segments_sent=self._stats.segments_sent,
        )

    def _start(self) -> None:
        self._stop_quietly()
        if self._context is None:
            ours, theirs = socket.socketpair()
            try:
                parent = zygote()
                self._process = _Forked(parent.spawn(theirs.fileno()), parent)
            finally:
                theirs.close()
            self._conn = Connection(ours.detach())
        else:
            ctx = get_context(self._context or "fork")
            ours_c, theirs_c = ctx.Pipe(duplex=True)
            process = ctx.Process(  # type: ignore[attr-defined]
                target=serve,
                args=(theirs_c, os.getpid()),
                name="snapwriter-saver",
                daemon=True,
            )
            process.start()
            theirs_c.close()
            self._process = process
            self._conn = ours_c
        _track(self._process)
        self._sent = set()
        self._last = {}
        self._stats.starts += 1

    def _send(self, prepared: _Prepared, message: bytes) -> None:
        conn, process = self._conn, self._process
        assert conn is not None and process is not None
        for seg_id in sorted(prepared.segments - self._sent):
            segment = self._shm.segment(seg_id)
            conn.send_bytes(pickle.dumps(("segment", seg_id, segment.size)))
            reduction.send_handle(conn, segment.fd, process.pid)
            self._sent.add(seg_id)
            self._stats.segments_sent += 1
        conn.send_bytes(message)

    def _message(self, prepared: _Prepared) -> bytes:
        last = self._last.get(prepared.kind)
        data: bytes | None = prepared.data
        records: list[Any] | None = prepared.records
        if last is not None:
            if last[0] == prepared.data:
                data = None
                self._stats.same_pickle += 1
            if last[1] == prepared.records:
                records = None
        self._last[prepared.kind] = (prepared.data, prepared.records)
        body = {
            "kind": prepared.kind,
            "data": data,
            "records": records,
            "rest": prepared.rest,
            "plan": prepared.plan,
        }
        try:
            return pickle.dumps(("save", body), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            self._last.pop(prepared.kind, None)
            raise NotPicklable(
                f"the save cannot be sent to the saving process: {type(exc).__name__}: {exc}"
            ) from exc

    def run(self, request: SaveRequest) -> WriteOutcome:
        """Describe ``request`` (in the calling thread), hand it to the saving process
        (started if need be) and block until it reports.

        Raises:
            NotPicklable: ``savefun``, ``fs`` or the keyword arguments do not pickle.
            ChildProcessFailure: the saving process died during the save.
            The child's exception, when the save failed there.
        """
        with collector_paused():  # tens of thousands of records: no collector passes
            prepared = _prepare(request, self._shm, self._previous)
        self._previous = prepared if prepared.kind == "fast" and not prepared.keep else None
        path = request.dest.path
        with self._lock:
            if self._closed:
                raise ChildProcessFailure(f"the writer's saving process was stopped ({path!r})")
            for attempt in (1, 2):
                reply = self._hand_over(prepared, path, last_try=attempt == 2)
                if reply is not None:
                    break
        kind, payload = reply
        if kind == "ok":
            nbytes, write_seconds, commit_seconds = payload
            return WriteOutcome(nbytes, write_seconds, commit_seconds)
        raise payload

    def _hand_over(self, prepared: _Prepared, path: str, *, last_try: bool) -> Any:
        """Send the save and wait for its outcome; None when the saving process died
        before it acknowledged the save (it never started it: the caller retries once
        with a new one). The lock is held."""
        if self._process is None or not self._process.is_alive():
            self._start()
        conn, process = self._conn, self._process
        assert conn is not None and process is not None
        started = False
        try:
            self._send(prepared, self._message(prepared))
            self._stats.saves += 1
            kind, payload = conn.recv()
            if kind == "started":
                started = True
                kind, payload = conn.recv()
        except (EOFError, OSError) as exc:  # closed, or reset by the dying child
            process.join(10)
            code, pid = process.exitcode, process.pid
            self._stop_quietly()
            if not started and not last_try:
                # It died while idle (or as the save arrived): the save never started.
                # A new saving process (segments and caches afresh) gets it.
                return None
            what = "while saving" if started else "before it could start saving"
            raise ChildProcessFailure(
                f"the saving process (pid {pid}) {_describe_exit(code)} {what} {path!r}"
            ) from exc
        return kind, payload

    def close(self) -> None:
        """Stop the saving process (it finishes nothing: the writer waited for its
        saves) and wait for it; kill it if it does not exit. Idempotent."""
        with self._lock:
            self._closed = True
            self._previous = None  # it holds staged storages the writer frees now
            conn, process = self._conn, self._process
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.send_bytes(pickle.dumps(None))
            if process is not None:
                process.join(STOP_SECONDS)
                if process.is_alive():
                    process.kill()
                    process.join(5)
            self._stop_quietly()

    def _stop_quietly(self) -> None:
        if self._conn is not None:
            self._conn.close()
        process = self._process
        if process is not None:
            if process.is_alive():
                with contextlib.suppress(Exception):
                    process.kill()
                    process.join(5)
            _untrack(process)
        self._conn = None
        self._process = None


def prestart() -> None:
    """Start this process's zygote now (a default-mode writer was created), so that the
    first save does not wait for torch's import in a fresh interpreter."""
    with contextlib.suppress(Exception):
        zygote()


register_at_fork(after_in_child=_forget_zygote_after_fork)


def saver_supported() -> bool:
    """Whether this platform runs the persistent saving process (:data:`SUPPORTED`; read
    at call time so a test can switch it off)."""
    return SUPPORTED
