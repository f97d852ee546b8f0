"""The all-ranks commit: members report to the rendezvous store, the marker comes last.

A rank set (see :mod:`snapwriter._manifest`) is saved by every rank of a
``torch.distributed`` job; each rank's writer runs one *role* for its part:

* a **member** writes the set's tag, then its own file through the writer's ordinary
  save (atomic, durable), then its digest (:func:`~snapwriter._manifest.file_digest`:
  for a torch.save archive, a hash of its central directory of CRC-32s) and publishes
  ``{size, digest}`` under its key in the store (or its error, if its save failed);
* the **marker** side (ppe's saver rank, or the native API's leader) waits until every
  member key is there, writes the manifest, then the ``complete`` marker, and publishes
  the outcome (``done``: the manifest, or the error naming the missing ranks);
* every other member **watches** ``done`` and fails, naming the missing ranks, when
  it reports a failure or does not come within the timeout.

Why the store: it is the job's own rendezvous (TCPStore/FileStore), reachable from
every host, push-free and cheap (one key per rank per set), and using it involves no
collective, so a background thread can never deadlock against the training loop's own
``barrier``/``all_reduce`` (DCP's background collectives do). A TCPStore is reached
through a *private* client connection of ours (a client holds a mutex during each
request: sharing the training loop's client could stall its ``new_group`` or
``monitored_barrier``, or be stalled by them); keys are only polled with ``check``,
never waited on while holding the connection. The file system is the fallback for the
one case the store cannot answer: a store that went away (its host, often rank 0, exited
right after committing), when the marker and manifest on disk decide.

Timeout: :data:`SET_TIMEOUT_ENV` (``SNAPWRITER_SET_TIMEOUT``, seconds, default
:data:`DEFAULT_SET_TIMEOUT`). The marker side waits that long after its own member is
committed; watchers a little longer. Past it the set fails on every surviving rank with
:class:`~snapwriter.IncompleteSetError`; nothing ever waits forever.
"""

from __future__ import annotations

import contextvars
import datetime
import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import anyio
import anyio.to_thread

from ._compat import register_at_fork
from ._exceptions import IncompleteSetError, SnapshotWriteError
from ._manifest import (
    MANIFEST_NAME,
    MARKER_NAME,
    MemberRecord,
    SetManifest,
    file_digest,
    set_status,
    write_json_atomic,
    write_tag,
)

__all__ = (
    "DEFAULT_SET_TIMEOUT",
    "RANK_SETS_ENV",
    "SET_TIMEOUT_ENV",
    "SetRole",
    "native_role",
    "is_marker_call",
    "private_store",
    "role_for",
    "set_timeout",
)

logger = logging.getLogger("snapwriter")

SET_TIMEOUT_ENV = "SNAPWRITER_SET_TIMEOUT"
DEFAULT_SET_TIMEOUT = 600.0
#: ``SNAPWRITER_RANK_SETS=0`` turns off the recognition of ppe's SHARDED calls.
RANK_SETS_ENV = "SNAPWRITER_RANK_SETS"
_KEY_ROOT = "snapwriter/set/v1"
_POLL_FIRST = 0.002
_POLL_MAX = 0.05
_PPE_SNAPSHOT_MODULE = "pytorch_pfn_extras.training.extensions._snapshot"

#: Set by the native API around its call into the inner writer: builds that call's role.
native_role: contextvars.ContextVar[Callable[[Any, Any], SetRole] | None] = contextvars.ContextVar(
    "snapwriter_native_role", default=None
)


def set_timeout(value: float | None = None) -> float:
    """The timeout of a set: ``value``, else ``SNAPWRITER_SET_TIMEOUT``, else the default."""
    if value is not None:
        return float(value)
    raw = os.environ.get(SET_TIMEOUT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_SET_TIMEOUT
    except ValueError:
        logger.warning("snapwriter: ignoring %s=%r (not a number)", SET_TIMEOUT_ENV, raw)
        return DEFAULT_SET_TIMEOUT


# -- the store ------------------------------------------------------------------------

_private_lock = threading.Lock()
_private: dict[tuple[Any, ...], Any] = {}


def private_store(store: Any = None) -> Any:
    """A store handle of our own on the same rendezvous as ``store``.

    ``None`` means the default process group's store. Prefix stores are unwrapped (our
    keys live under ``snapwriter/``); a TCPStore gets a private client connection
    (cached per process and server); other stores (FileStore, HashStore) are used as
    they are: their requests are short and hold no connection-wide lock across waits.

    Raises:
        RuntimeError: ``store`` is ``None`` and ``torch.distributed`` is not initialized.
    """
    import torch.distributed as dist
    from torch._C._distributed_c10d import PrefixStore, TCPStore

    if store is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "rank sets need torch.distributed to be initialized (or a store passed in)"
            )
        store = dist.distributed_c10d._get_default_store()
    base = store
    while isinstance(base, PrefixStore):
        base = base.underlying_store
    if not isinstance(base, TCPStore):
        return base
    key = (os.getpid(), base.host, base.port)
    with _private_lock:
        client = _private.get(key)
        if client is None:
            client = TCPStore(
                base.host,
                base.port,
                is_master=False,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=30),
            )
            _private[key] = client
        return client


@dataclass(frozen=True)
class _Keys:
    prefix: str

    def member(self, rank: int) -> str:
        return f"{self.prefix}/m/{rank}"

    @property
    def failed(self) -> str:
        return f"{self.prefix}/failed"

    @property
    def done(self) -> str:
        return f"{self.prefix}/done"


_generations_lock = threading.Lock()
_generations: dict[tuple[str, str, str, int], int] = {}


def _next_generation(kind: str, out_dir: str, set_rel: str, rank: int) -> int:
    """How many calls of ``kind`` this process made for this set before (in call order).

    Every rank makes the same calls in the same order, so the n-th save of a set
    directory pairs up across ranks even when a directory is saved twice (ppe's
    ``snapshot_on_error`` at the iteration of a regular snapshot).
    """
    key = (kind, os.path.normpath(out_dir), set_rel, rank)  # ranks may share a process
    with _generations_lock:
        n = _generations.get(key, 0)
        _generations[key] = n + 1
    return n


def _after_fork() -> None:
    global _private_lock, _generations_lock
    _private_lock = threading.Lock()
    _generations_lock = threading.Lock()
    _private.clear()


register_at_fork(after_in_child=_after_fork)


async def _store_call(fn: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args)


def _store_down(exc: BaseException) -> bool:
    """Whether ``exc`` says the store cannot be reached (not a missing key)."""
    return isinstance(exc, (RuntimeError, OSError, ConnectionError))


# -- roles ----------------------------------------------------------------------------

_Plain = Callable[[Any], Awaitable[Any]]


@dataclass
class SetRole:
    """One rank's part in saving one rank set (built at call time, run on the loop).

    Attributes:
        kind: ``"member"`` (this rank's file) or ``"marker"`` (ppe's ``complete`` call).
        set_dir: the set directory (a path on the writer's file system).
        rank, world_size: this rank and the number of members.
        leader: a native member that also writes the manifest and the marker.
        native: the native API's call: the handle waits for the whole set.
        timeout: seconds (see the module docstring).
    """

    kind: str
    set_dir: str
    rank: int
    world_size: int
    keys: _Keys
    store: Any
    fs: Any
    durable: bool
    timeout: float
    leader: bool = False
    native: bool = False
    marker_rank: int | None = None
    keep: Callable[[SetManifest], Awaitable[None]] | None = None
    manifest: SetManifest | None = None
    committed_at: float = 0.0

    # -- running --------------------------------------------------------------------

    async def run(self, writer: Any, job: Any, plain: _Plain) -> Any:
        """Run ``plain(job)`` (the writer's ordinary save) inside this role."""
        if self.kind == "marker":
            return await self._run_marker(writer, job, plain)
        return await self._run_member(writer, job, plain)

    async def _run_member(
        self, writer: Any, job: Any, plain: Callable[[Any], Awaitable[Any]]
    ) -> Any:
        path = job.request.dest.path
        try:
            await anyio.to_thread.run_sync(_write_tag, self.fs, self.set_dir, self.durable)
        except Exception as exc:
            await self._publish_failure(f"rank {self.rank}: cannot create the set directory: {exc}")
            raise self._recorded(writer, path, exc) from exc
        try:
            result = await plain(job)
        except BaseException as exc:
            await self._publish_failure(f"rank {self.rank}: {type(exc).__name__}: {exc}")
            raise
        try:
            size, digest = await anyio.to_thread.run_sync(file_digest, self.fs, path)
            record = MemberRecord(self.rank, os.path.basename(path), size, digest)
            await self._publish_member(record)
        except Exception as exc:
            await self._publish_failure(f"rank {self.rank}: cannot report its member: {exc}")
            raise self._recorded(writer, path, exc) from exc
        self.committed_at = time.time()
        if not self.native:
            # ppe: the call returned long ago and the marker is another call; watch
            # the set's outcome as a pending save of its own (finalize() waits for it).
            # (A fresh context: this task's marks it as inside one of the writer's saves.)
            contextvars.Context().run(
                writer._start_pending,
                self._watch_pending,
                writer,
                self.set_dir,
                while_closing=True,
            )
            return result
        try:
            if self.leader:
                await self._commit_set(write_marker=True)
            else:
                await self._wait_done(self.committed_at)
        except Exception as exc:
            raise self._recorded(writer, self.set_dir, exc) from exc
        return result

    async def _run_marker(
        self, writer: Any, job: Any, plain: Callable[[Any], Awaitable[Any]]
    ) -> Any:
        # Markers commit in call order: set N+1's manifest never lands before set N's
        # marker (a crash then would lose set N although every member of it is durable).
        # Tasks start in call order and take the lock before their first await.
        lock = writer.__dict__.setdefault("_snapwriter_marker_lock", anyio.Lock())
        async with lock:
            return await self._run_marker_in_order(writer, job, plain)

    async def _run_marker_in_order(
        self, writer: Any, job: Any, plain: Callable[[Any], Awaitable[Any]]
    ) -> Any:
        try:
            await self._commit_set(write_marker=False)
        except Exception as exc:
            raise self._recorded(writer, self.set_dir, exc) from exc
        try:
            result = await plain(job)  # ppe's ``complete``, through the writer: last
        except BaseException as exc:
            await self._publish_done({"ok": False, "error": f"the marker failed: {exc}"})
            raise
        assert self.manifest is not None
        await self._publish_done({"ok": True, "manifest": json.loads(self.manifest.to_json())})
        return result

    async def _watch_pending(self, writer: Any) -> SetManifest | None:
        try:
            return await self._wait_done(self.committed_at)
        except Exception as exc:
            raise self._recorded(writer, self.set_dir, exc) from exc

    @staticmethod
    def _recorded(writer: Any, path: str, exc: BaseException) -> BaseException:
        error: BaseException = writer._wrap_failure(path, exc, record=True)
        return error

    # -- the marker side ------------------------------------------------------------

    async def _commit_set(self, *, write_marker: bool) -> None:
        """Wait for every member, write the manifest (and, natively, the marker)."""
        records = await self._wait_members()
        self.manifest = SetManifest(self.world_size, tuple(records))
        manifest_path = os.path.join(self.set_dir, MANIFEST_NAME)
        try:
            # One directory fsync for both when the marker follows (its own fsync makes
            # the manifest's rename durable too; members are durable already).
            await anyio.to_thread.run_sync(
                _write_manifest,
                self.fs,
                manifest_path,
                self.manifest.to_json(),
                self.durable,
                not write_marker,
            )
            if write_marker:
                await anyio.to_thread.run_sync(_write_marker, self.fs, self.set_dir, self.durable)
        except Exception as exc:
            await self._publish_done({"ok": False, "error": f"the manifest failed: {exc}"})
            raise
        if write_marker:
            await self._publish_done({"ok": True, "manifest": json.loads(self.manifest.to_json())})
            if self.keep is not None:
                await self.keep(self.manifest)

    async def _wait_members(self) -> list[MemberRecord]:
        keys = [self.keys.member(r) for r in range(self.world_size)]
        deadline = time.monotonic() + self.timeout
        interval = _POLL_FIRST
        try:
            while True:
                if await _store_call(self.store.check, keys):
                    break
                if await _store_call(self.store.check, [self.keys.failed]):
                    break
                if time.monotonic() >= deadline:
                    break
                await anyio.sleep(interval)
                interval = min(interval * 2, _POLL_MAX)
            records, missing, failed = await self._read_members()
        except Exception as exc:
            if not _store_down(exc):
                raise
            error = IncompleteSetError(
                f"rank set {self.set_dir!r} not committed: the rendezvous store is unreachable "
                f"({type(exc).__name__}: {exc}); its host may have died",
                self.set_dir,
            )
            await self._publish_done({"ok": False, "error": str(error)})
            raise error from exc
        if missing or failed:
            error = self._incomplete(missing, failed, list(records.values()))
            await self._publish_done(
                {"ok": False, "error": str(error), "missing": missing, "failed": failed}
            )
            raise error
        return [records[r] for r in range(self.world_size)]

    async def _read_members(self) -> tuple[dict[int, MemberRecord], list[int], list[int]]:
        records: dict[int, MemberRecord] = {}
        missing: list[int] = []
        failed: list[int] = []
        self._errors: dict[int, str] = {}
        for r in range(self.world_size):
            key = self.keys.member(r)
            if not await _store_call(self.store.check, [key]):
                missing.append(r)
                continue
            value = json.loads(await _store_call(self.store.get, key))
            if "error" in value:
                failed.append(r)
                self._errors[r] = str(value["error"])
            else:
                records[r] = MemberRecord(r, value["name"], value["size"], value["digest"])
        return records, missing, failed

    def _incomplete(
        self, missing: list[int], failed: list[int], _records: list[MemberRecord]
    ) -> IncompleteSetError:
        parts = []
        if missing:
            parts.append(
                f"rank(s) {', '.join(map(str, missing))} did not commit their member within "
                f"{self.timeout:g}s ({SET_TIMEOUT_ENV}): dead, hung or too slow"
            )
        if failed:
            errors = getattr(self, "_errors", {})
            details = "; ".join(errors.get(r, f"rank {r} failed") for r in failed)
            parts.append(f"rank(s) {', '.join(map(str, failed))} failed: {details}")
        return IncompleteSetError(
            f"rank set {self.set_dir!r} not committed (no marker written; the previous "
            f"complete set is intact): {'; '.join(parts)}",
            self.set_dir,
            missing,
            failed,
        )

    # -- the watchers ---------------------------------------------------------------

    async def _wait_done(self, since: float) -> SetManifest | None:
        """Wait for the set's outcome; return its manifest or raise naming the culprits."""
        deadline = time.monotonic() + self.timeout * 1.1 + 2.0
        interval = _POLL_FIRST
        try:
            while not await _store_call(self.store.check, [self.keys.done]):
                if time.monotonic() >= deadline:
                    # the marker may be on disk with the outcome unpublished (the
                    # leader died right after writing it): the disk decides
                    on_disk = await anyio.to_thread.run_sync(self._committed_on_disk, since)
                    if on_disk is not None:
                        self.manifest = on_disk
                        return on_disk
                    _records, missing, failed = await self._read_members()
                    if not missing and not failed:
                        who = "the rank writing it"
                        if self.marker_rank is not None:
                            who = f"rank {self.marker_rank} (which writes it)"
                        raise IncompleteSetError(
                            f"rank set {self.set_dir!r} not committed: every member was "
                            f"committed but the marker was not written within "
                            f"{self.timeout:g}s ({SET_TIMEOUT_ENV}): {who} died or hung",
                            self.set_dir,
                            () if self.marker_rank is None else (self.marker_rank,),
                        )
                    raise self._incomplete(missing, failed, [])
                await anyio.sleep(interval)
                interval = min(interval * 2, _POLL_MAX)
            outcome = json.loads(await _store_call(self.store.get, self.keys.done))
        except IncompleteSetError:
            raise
        except Exception as exc:
            if not _store_down(exc):
                raise
            manifest = await anyio.to_thread.run_sync(self._committed_on_disk, since)
            if manifest is not None:
                return manifest
            raise IncompleteSetError(
                f"rank set {self.set_dir!r} not committed: the rendezvous store is unreachable "
                f"({type(exc).__name__}: {exc}) and no marker is on disk; its host may have died",
                self.set_dir,
            ) from exc
        if not outcome.get("ok"):
            raise IncompleteSetError(
                str(outcome.get("error", "the set failed")),
                self.set_dir,
                outcome.get("missing", ()),
                outcome.get("failed", ()),
            )
        manifest = SetManifest.from_json(json.dumps(outcome["manifest"]).encode())
        self.manifest = manifest
        return manifest

    def _committed_on_disk(self, since: float) -> SetManifest | None:
        """The store is gone: the set is committed iff marker and manifest say so."""
        status = set_status(self.fs, self.set_dir)
        if status is None or not status.complete or status.manifest is None:
            return None
        if status.mtime + 1.0 < since or len(status.manifest.members) != self.world_size:
            return None
        return status.manifest

    # -- publishing -----------------------------------------------------------------

    async def _publish_member(self, record: MemberRecord) -> None:
        value = {"name": record.name, "size": record.size, "digest": record.digest}
        await _store_call(self.store.set, self.keys.member(self.rank), json.dumps(value))

    async def _publish_failure(self, message: str) -> None:
        """Best effort: tell the marker side at once that this rank's member failed."""
        try:
            await _store_call(
                self.store.set, self.keys.member(self.rank), json.dumps({"error": message})
            )
            await _store_call(self.store.set, self.keys.failed, str(self.rank))
        except Exception:
            logger.warning("snapwriter: could not report a failed member of %s", self.set_dir)

    async def _publish_done(self, outcome: dict[str, Any]) -> None:
        try:
            await _store_call(self.store.set, self.keys.done, json.dumps(outcome))
        except Exception:
            logger.warning("snapwriter: could not publish the outcome of set %s", self.set_dir)
            return
        for r in range(self.world_size):  # the outcome is out: members' keys are spent
            try:
                await _store_call(self.store.delete_key, self.keys.member(r))
            except Exception:
                break


def _write_tag(fs: Any, set_dir: str, durable: bool) -> None:
    write_tag(fs, set_dir, durable=durable)


def _write_manifest(fs: Any, path: str, data: bytes, durable: bool, sync_dir: bool) -> None:
    write_json_atomic(fs, path, data, durable=durable, sync_dir=sync_dir)


def _marker_bytes() -> bytes:
    """What ppe writes as its marker (``torch.save({})``): a set ppe can autoload."""
    import torch

    buffer = io.BytesIO()
    torch.save({}, buffer)
    return buffer.getvalue()


def _write_marker(fs: Any, set_dir: str, durable: bool) -> None:
    write_json_atomic(fs, os.path.join(set_dir, MARKER_NAME), _marker_bytes(), durable=durable)


# -- building roles -------------------------------------------------------------------


def make_role(
    *,
    kind: str,
    writer: Any,
    job: Any,
    rank: int,
    world_size: int,
    store: Any,
    timeout: float | None,
    namespace: str = "",
    leader: bool = False,
    native: bool = False,
    keep: Callable[[SetManifest], Awaitable[None]] | None = None,
    marker_rank: int | None = None,
) -> SetRole:
    """The role of one call, in call order (its generation pairs it up across ranks)."""
    dest = job.request.dest
    set_rel = os.path.dirname(dest.relpath)
    generation = _next_generation(kind, dest.out_dir, set_rel, rank)
    out = os.path.normpath(dest.out_dir)
    prefix = f"{_KEY_ROOT}/{namespace}{out}/{set_rel}/{generation}"
    return SetRole(
        kind=kind,
        set_dir=dest.directory,
        rank=rank,
        world_size=world_size,
        keys=_Keys(prefix),
        store=store,
        fs=writer.fs,
        durable=bool(getattr(writer, "durable", True)),
        timeout=set_timeout(timeout),
        leader=leader,
        native=native,
        keep=keep,
        marker_rank=marker_rank,
    )


def _ppe_sharded_caller() -> Any:
    """The ppe ``_ShardedSnapshot`` extension on the caller's stack, if any."""
    module = sys.modules.get(_PPE_SNAPSHOT_MODULE)
    cls = getattr(module, "_ShardedSnapshot", None) if module is not None else None
    if cls is None:
        return None
    frame: FrameType | None = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, cls):
            return owner
        frame = frame.f_back
    return None


def is_marker_call(request: Any) -> bool:
    """Whether a call is ppe's SHARDED ``<dir>/complete`` call (checked before admission:
    the marker stages nothing, so it does not take one of the ``max_pending`` slots,
    which would hold the training loop until this rank's own member is written)."""
    if native_role.get() is not None or request.append:
        return False
    if os.environ.get(RANK_SETS_ENV, "1") in ("0", "off", "false"):
        return False
    if request.dest.basename != MARKER_NAME or request.target != {}:
        return False
    extension = _ppe_sharded_caller()
    return extension is not None and int(getattr(extension, "_size", 0)) >= 2


def role_for(writer: Any, job: Any) -> SetRole | None:
    """The rank-set role of a call, or ``None`` for an ordinary save.

    Called by the writer in the caller's thread, in call order. A role comes from the
    native API (:class:`~snapwriter.RankSetWriter`), or from recognising ppe's
    ``SnapshotMode.SHARDED`` extension on the caller's stack: its ``<dir>/<rank>``
    call is this rank's member, its ``<dir>/complete`` call (an empty dict) the marker.
    """
    build = native_role.get()
    if build is not None:
        return build(writer, job)
    if os.environ.get(RANK_SETS_ENV, "1") in ("0", "off", "false"):
        return None
    if job.request.append:
        return None
    extension = _ppe_sharded_caller()
    if extension is None:
        return None
    rank = int(getattr(extension, "_rank", -1))
    world = int(getattr(extension, "_size", 0))
    if world < 2 or rank < 0:
        return None
    basename = job.request.dest.basename
    target = job.request.target
    if basename == str(rank):
        kind = "member"
    elif basename == MARKER_NAME and isinstance(target, dict) and not target:
        kind = "marker"
    else:
        return None
    try:
        store = private_store()
    except Exception as exc:
        raise SnapshotWriteError(
            f"cannot reach the rendezvous store for rank set {job.request.dest.directory!r}: {exc}",
            job.request.dest.directory,
        ) from exc
    saver = getattr(extension, "_saver_rank", None)
    return make_role(
        kind=kind,
        writer=writer,
        job=job,
        rank=rank,
        world_size=world,
        store=store,
        timeout=None,
        marker_rank=saver if isinstance(saver, int) else None,
    )
