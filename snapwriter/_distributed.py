"""The native multi-rank API: :class:`RankSetWriter`.

For users without ppe: every rank of a ``torch.distributed`` job calls the same
:class:`RankSetWriter` with its own shard; the set ``<out_dir>/<name>/`` gets one file per
rank, a manifest and the ``complete`` marker (the layout of :mod:`snapwriter._manifest`,
which is also ppe's SHARDED layout, so ppe's ``autoload`` reads these sets too). The
handle each rank gets completes when the whole set is committed, or raises
:class:`~snapwriter.IncompleteSetError` on every surviving rank.

The save of each shard is an ordinary save of the writer it composes (any snapwriter
writer: staging, atomic durable file, background thread or process); the all-ranks
commit around it is :mod:`snapwriter._coordination`'s.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio.to_thread

from ._coordination import SetRole, make_role, native_role, private_store
from ._discovery import natural_key
from ._exceptions import InvalidSnapshotArgument
from ._handle import SnapshotHandle, SnapshotResult
from ._manifest import MARKER_NAME, SetManifest, set_status
from ._retention import check_keep_last, matcher

__all__ = ("RankSetHandle", "RankSetResult", "RankSetWriter", "load_rank_shard")


@dataclass(frozen=True)
class RankSetResult:
    """A committed rank set, as one rank sees it.

    Attributes:
        path: the set directory.
        manifest: every member's name, size and digest.
        member: the figures of this rank's own file.
    """

    path: str
    manifest: SetManifest
    member: SnapshotResult


class RankSetHandle:
    """What :class:`RankSetWriter` calls return: the pending save of a whole set.

    ``result()`` (or ``await handle``) waits until every rank's file is durable and the
    marker written, and raises :class:`~snapwriter.IncompleteSetError` (naming the
    missing ranks) otherwise, within the set timeout.

    Attributes:
        path: the set directory.
        member: the handle of this rank's own file.
    """

    def __init__(self, member: SnapshotHandle, path: str, role: SetRole) -> None:
        self.member = member
        self.path = path
        self._role = role

    def done(self) -> bool:
        """Whether the set is committed or failed."""
        return self.member.done()

    def result(self, timeout: float | None = None) -> RankSetResult:
        """Wait for the whole set and return it.

        Raises:
            IncompleteSetError: a rank died, failed or timed out; no marker written.
            SnapshotWriteError: this rank's own save failed.
            TimeoutError: not finished within ``timeout``.
        """
        figures = self.member.result(timeout)
        return self._result(figures)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait like :meth:`result`; return the failure or ``None``."""
        return self.member.exception(timeout)

    async def wait(self) -> RankSetResult:
        """Await the set without blocking the loop (asyncio or trio)."""
        return self._result(await self.member.wait())

    def __await__(self) -> Generator[Any, None, RankSetResult]:
        return self.wait().__await__()

    def _result(self, figures: SnapshotResult) -> RankSetResult:
        manifest = self._role.manifest
        assert manifest is not None  # the member's save succeeded: the set is committed
        return RankSetResult(self.path, manifest, figures)

    def __repr__(self) -> str:
        state = "pending"
        if self.done():
            state = "failed" if self.exception() is not None else "committed"
        return f"<RankSetHandle {self.path!r} {state}>"


class RankSetWriter:
    """Saves one shard per rank into a set that is complete on every rank or not at all.

    Every rank of the job creates one (with the same arguments) and calls it with the
    same ``name`` and its own shard, in the same order.

    Args:
        writer: the snapwriter writer that saves this rank's file (``ThreadWriter``,
            ``ProcessWriter``, ``QueueWriter``...); a new :class:`StandardWriter` on
            ``out_dir`` when ``None``. Its own ``keep_last`` must be unset.
        out_dir: the shared directory of the sets (ignored when ``writer`` has one).
        store: a ``torch.distributed`` store of the job (TCPStore, FileStore...); by
            default the default process group's rendezvous store.
        rank, world_size: this rank and the number of ranks (default: the default
            process group's).
        timeout: seconds the set may take after the leader's own file is committed
            (default ``SNAPWRITER_SET_TIMEOUT`` or 600); past it the set fails on every
            surviving rank.
        keep_last: keep only this many complete sets matching ``keep_pattern`` (whole
            sets are deleted, marker first; the newest complete one never).
        keep_pattern: glob of set names retention may delete (default: the name with
            its digits replaced by ``*``).
        leader: the rank that writes the manifest and the marker (default 0).

    Threading: as the writer it composes. The coordination uses no collective: it is
    safe to call while (and from where) the training loop runs its own.
    """

    def __init__(
        self,
        writer: Any = None,
        *,
        out_dir: str = "",
        store: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        timeout: float | None = None,
        keep_last: int | None = None,
        keep_pattern: str | None = None,
        leader: int = 0,
    ) -> None:
        if writer is not None and getattr(writer, "keep_last", None) is not None:
            raise InvalidSnapshotArgument(
                "the writer of a RankSetWriter must not apply keep_last itself (it would "
                "delete other ranks' files): give keep_last to the RankSetWriter"
            )
        if rank is None or world_size is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise InvalidSnapshotArgument(
                    "RankSetWriter needs rank and world_size, or torch.distributed initialized"
                )
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        if not (isinstance(world_size, int) and world_size >= 1):
            raise InvalidSnapshotArgument(f"world_size must be an int >= 1, not {world_size!r}")
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise InvalidSnapshotArgument(f"rank must be in [0, {world_size}), not {rank!r}")
        if not (isinstance(leader, int) and 0 <= leader < world_size):
            raise InvalidSnapshotArgument(f"leader must be in [0, {world_size}), not {leader!r}")
        if timeout is not None and not timeout > 0:
            raise InvalidSnapshotArgument(f"timeout must be > 0, not {timeout!r}")
        self.keep_last = check_keep_last(keep_last)
        self._store = private_store(store)
        if writer is None:
            from ._standard import StandardWriter

            writer = StandardWriter(out_dir=out_dir)
        self.writer = writer
        self.rank = rank
        self.world_size = world_size
        self.leader = leader
        self.timeout = timeout
        self.keep_pattern = keep_pattern

    @property
    def out_dir(self) -> str:
        """The directory holding the sets (the writer's)."""
        return str(self.writer.out_dir)

    def __call__(self, name: str, target: Any, *, savefun: Any = None) -> RankSetHandle:
        """Save this rank's ``target`` as member ``<out_dir>/<name>/<rank>`` of set ``name``.

        Returns at once with the writer's staging done (as the writer's own call).

        Raises:
            InvalidSnapshotArgument: bad ``name`` (empty, absolute, escaping
                ``out_dir``); nothing written.
            StagingError, SnapshotWriteError, WriterClosedError: as the writer's call.
        """
        if not isinstance(name, str) or not name.strip("/"):
            raise InvalidSnapshotArgument(f"the set name must be a non-empty str, not {name!r}")
        roles: list[SetRole] = []

        def build(writer: Any, job: Any) -> SetRole:
            role = make_role(
                kind="member",
                writer=writer,
                job=job,
                rank=self.rank,
                world_size=self.world_size,
                store=self._store,
                timeout=self.timeout,
                leader=self.rank == self.leader,
                native=True,
                keep=self._retain if self.keep_last is not None else None,
                marker_rank=self.leader,
            )
            roles.append(role)
            return role

        token = native_role.set(build)
        try:
            member = self.writer(
                f"{name.rstrip('/')}/{self.rank}", self.writer.out_dir, target, savefun=savefun
            )
        finally:
            native_role.reset(token)
        if not roles:  # pragma: no cover - a writer that does not submit through the base
            raise InvalidSnapshotArgument(f"{type(self.writer).__name__} cannot save rank sets")
        role = roles[0]
        return RankSetHandle(member, role.set_dir, role)

    async def _retain(self, manifest: SetManifest) -> None:
        """The leader, after a commit: delete the oldest complete sets beyond keep_last."""
        del manifest
        await anyio.to_thread.run_sync(self._retain_blocking)

    def _retain_blocking(self) -> None:
        keep_last = self.keep_last
        assert keep_last is not None
        fs = self.writer.fs
        root = self.out_dir or "."
        sets = []
        for name in fs.list(root):
            path = os.path.join(root, name)
            if self.keep_pattern is not None and not fnmatch.fnmatchcase(name, self.keep_pattern):
                continue
            status = set_status(fs, path)
            if status is not None and status.complete:
                sets.append((status.mtime, natural_key(name), name, path))
        sets.sort()
        if self.keep_pattern is None and sets:
            same_shape = matcher(None, sets[-1][2])  # the writers' own default: anchored
            sets = [s for s in sets if same_shape(s[2])]
        for _mtime, _key, _name, path in sets[: max(0, len(sets) - keep_last)]:
            with contextlib.suppress(FileNotFoundError):
                fs.remove(os.path.join(path, MARKER_NAME))  # incomplete first, never torn
            fs.remove(path, recursive=True)

    # -- lifecycle ------------------------------------------------------------------

    def finalize(self, timeout: float | None = None) -> None:
        """Finalize the writer: wait for every pending set; raise the first failure."""
        self.writer.finalize(timeout)

    async def aclose(self) -> None:
        """The async twin of :meth:`finalize`."""
        await self.writer.aclose()

    def __enter__(self) -> RankSetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finalize()


def load_rank_shard(set_dir: str, rank: int, *, fs: Any = None, **load_kwargs: Any) -> Any:
    """Load rank ``rank``'s member of the set in ``set_dir`` with :func:`torch.load`.

    Raises:
        FileNotFoundError: the set is not complete (no marker) or has no such member.
    """
    import torch

    from ._fsspec import resolve_filesystem

    fs, root = resolve_filesystem(fs, set_dir)
    status = set_status(fs, root)
    if status is None or not status.complete:
        raise FileNotFoundError(f"{set_dir!r} is not a complete rank set")
    with fs.open(os.path.join(root, str(rank)), "rb") as f:
        load_kwargs.setdefault("map_location", "cpu")
        load_kwargs.setdefault("weights_only", False)
        return torch.load(f, **load_kwargs)
