"""The exceptions snapwriter raises.

Every error is a :class:`SnapshotError`, itself a :class:`RuntimeError` so code written
for pytorch-pfn-extras (which raises ``RuntimeError`` from ``finalize()``) keeps
catching it::

    RuntimeError
    └── SnapshotError                 base of everything raised by snapwriter
        ├── InvalidSnapshotArgument   bad filename / option (also a ValueError); raised
        │                             by the call, before anything is written
        ├── StagingError              the target could not be copied or is not
        │                             picklable; raised by the call
        ├── SnapshotWriteError        a save failed in the background; raised by the
        │                             handle, by the next call and by finalize()/aclose();
        │                             ``__cause__`` is the original exception
        │   └── IncompleteSetError    a rank set (one file per rank) was not committed:
        │                             a rank died, failed or timed out; raised on every
        │                             surviving rank (handles, next call, finalize())
        ├── ChildProcessFailure       a child process (ProcessWriter...) died or failed
        │                             with an exception that could not be sent back;
        │                             found as the __cause__ of a SnapshotWriteError
        ├── SnapshotLostError         interpreter exit or a closing timeout abandoned
        │                             pending saves; names the files
        ├── WriterBusyError           a sync call made on a running event loop found
        │                             max_pending saves in flight (it would block the
        │                             loop); raised by the call, nothing was staged
        └── WriterClosedError         the writer was finalized (or inherited across
                                      fork()); raised by any call after that
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = (
    "ChildProcessFailure",
    "IncompleteSetError",
    "InvalidSnapshotArgument",
    "SnapshotError",
    "SnapshotLostError",
    "SnapshotWriteError",
    "StagingError",
    "WriterBusyError",
    "WriterClosedError",
)


class SnapshotError(RuntimeError):
    """Base class of every exception snapwriter raises."""


class InvalidSnapshotArgument(SnapshotError, ValueError):
    """A filename, directory or option was rejected before anything was written."""


class StagingError(SnapshotError):
    """The target could not be staged (copied) or would not serialize.

    Raised synchronously by the call; nothing has been written. ``__cause__`` holds the
    original exception.
    """


class SnapshotWriteError(SnapshotError):
    """Writing or committing a snapshot failed.

    Attributes:
        path: the final path the snapshot was meant to have.

    The original exception (``OSError``, ``PicklingError``, whatever ``savefun``
    raised) is chained as ``__cause__``. The previous file at ``path``, if any, is left
    untouched unless the save was made with ``append=True``.
    """

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class IncompleteSetError(SnapshotWriteError):
    """A rank set was not committed: its marker was not (and will not be) written.

    Attributes:
        path: the set directory.
        missing_ranks: ranks whose member was never reported committed (dead or too
            slow: the timeout passed).
        failed_ranks: ranks whose own save failed (their error is in their logs).

    The previous complete set is untouched and stays the one discovery and autoload
    find.
    """

    def __init__(
        self,
        message: str,
        path: str,
        missing_ranks: Sequence[int] = (),
        failed_ranks: Sequence[int] = (),
    ) -> None:
        super().__init__(message, path)
        self.missing_ranks = tuple(missing_ranks)
        self.failed_ranks = tuple(failed_ranks)


class ChildProcessFailure(SnapshotError):
    """A saving child process died, or failed with an exception that does not pickle.

    The message holds the exit status or the child's formatted traceback.
    """


class SnapshotLostError(SnapshotError):
    """Pending saves were abandoned (closing timeout or interpreter exit).

    Attributes:
        paths: the final paths of the snapshots that were not committed.
    """

    def __init__(self, message: str, paths: Sequence[str]) -> None:
        super().__init__(message)
        self.paths = tuple(paths)


class WriterClosedError(SnapshotError):
    """The writer was finalized, or was inherited by a forked child process."""


class WriterBusyError(SnapshotError):
    """A sync call made from a coroutine found ``max_pending`` saves in flight.

    Waiting for room there would block the event loop for a whole save: ``await
    writer.wait_for_room()`` first, or use ``await writer.asave(...)``. Nothing was
    staged or written.
    """
