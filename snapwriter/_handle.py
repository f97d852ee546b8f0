"""Handles: what a writer call returns.

A :class:`SnapshotHandle` is a thin view over a :class:`concurrent.futures.Future` that the
writer's background loop completes. It can be waited on from sync code (``result()``)
and awaited from asyncio or trio (``await handle``) without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Generator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import anyio
import sniffio

__all__ = ("SnapshotHandle", "SnapshotResult", "await_any", "await_future")


@dataclass(frozen=True)
class SnapshotResult:
    """Figures of one committed snapshot.

    Attributes:
        path: the final path of the file.
        nbytes: bytes written by ``savefun``.
        stage_seconds: time the call spent copying the target (the caller's stall).
        write_seconds: time to serialize into the temporary file and ``fsync`` it.
        commit_seconds: time to rename it onto the final name and ``fsync`` the directory.
        total_seconds: from the call to the durable commit, queueing included.
    """

    path: str
    nbytes: int
    stage_seconds: float
    write_seconds: float
    commit_seconds: float
    total_seconds: float

    @property
    def mb_per_second(self) -> float:
        """Write throughput in MB/s (10**6 bytes), write and commit phases together."""
        busy = self.write_seconds + self.commit_seconds
        return self.nbytes / busy / 1e6 if busy > 0 else float("inf")


def _threadsafe_waker(event: anyio.Event) -> Callable[[], None]:
    """Return a callable that sets ``event`` from any thread, for asyncio and trio."""
    library = sniffio.current_async_library()
    if library == "asyncio":
        loop = asyncio.get_running_loop()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                loop.call_soon_threadsafe(event.set)

        return wake
    if library == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()

        def wake_trio() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(event.set)

        return wake_trio
    raise RuntimeError(f"unsupported async library {library!r}")  # pragma: no cover


async def await_any(futures: Collection[Future[Any]]) -> None:
    """Wait, without blocking the loop, until one of ``futures`` is done (or none given)."""
    if not futures or any(f.done() for f in futures):
        return
    event = anyio.Event()
    wake = _threadsafe_waker(event)
    for f in futures:
        f.add_done_callback(lambda _f: wake())
    await event.wait()


async def await_future(future: Future[Any]) -> Any:
    """Await a concurrent future from asyncio or trio; cancelling the awaiter leaves it running."""
    await await_any((future,))
    return future.result()


class SnapshotHandle:
    """The pending or finished save of one snapshot.

    Returned by every writer call. Thread-safe. Awaiting it (``await handle``) from
    asyncio or trio waits until the snapshot is durable, without blocking the loop, and
    returns a :class:`SnapshotResult`; cancelling that ``await`` does not cancel the save
    (a running ``savefun`` cannot be interrupted).

    Attributes:
        path: the final path the snapshot is committed to.
        stage_seconds: time the call spent staging the target.
    """

    def __init__(
        self,
        future: Future[SnapshotResult],
        path: str,
        stage_seconds: float,
        on_observed: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._future = future
        self.path = path
        self.stage_seconds = stage_seconds
        self._on_observed = on_observed

    def done(self) -> bool:
        """Whether the save has finished, successfully or not."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> SnapshotResult:
        """Wait until the snapshot is durable and return its figures.

        Args:
            timeout: seconds to wait; ``None`` waits as long as it takes.

        Raises:
            SnapshotWriteError: the save failed; the original exception is ``__cause__``.
            TimeoutError: the save did not finish within ``timeout``.
        """
        try:
            return self._future.result(timeout)
        except TimeoutError:
            raise
        except BaseException as exc:
            self._observed(exc)
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait like :meth:`result` and return the failure, or ``None`` on success."""
        exc = self._future.exception(timeout)
        if exc is not None:
            self._observed(exc)
        return exc

    def add_done_callback(self, fn: Callable[[SnapshotHandle], object]) -> None:
        """Call ``fn(handle)`` once the save finishes (in the writer's thread, or now)."""
        self._future.add_done_callback(lambda _f: fn(self))

    async def wait(self) -> SnapshotResult:
        """Await the save without blocking the loop (asyncio or trio); see :meth:`result`."""
        await await_any((self._future,))
        return self.result()

    def __await__(self) -> Generator[Any, None, SnapshotResult]:
        return self.wait().__await__()

    # Figures, available once the save succeeded (None before or on failure).

    def _figures(self) -> SnapshotResult | None:
        f = self._future
        if f.done() and not f.cancelled() and f.exception() is None:
            return f.result()
        return None

    @property
    def nbytes(self) -> int | None:
        """Bytes written, once committed."""
        r = self._figures()
        return None if r is None else r.nbytes

    @property
    def write_seconds(self) -> float | None:
        """Seconds spent writing and fsyncing the temporary file, once committed."""
        r = self._figures()
        return None if r is None else r.write_seconds

    @property
    def commit_seconds(self) -> float | None:
        """Seconds spent renaming and fsyncing the directory, once committed."""
        r = self._figures()
        return None if r is None else r.commit_seconds

    def _observed(self, exc: BaseException) -> None:
        if self._on_observed is not None:
            self._on_observed(exc)

    def __repr__(self) -> str:
        state = "pending"
        if self._future.done():
            state = "failed" if self._future.exception() is not None else "committed"
        return f"<SnapshotHandle {self.path!r} {state}>"
