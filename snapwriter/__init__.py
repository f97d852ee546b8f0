"""snapwriter: background PyTorch snapshot writers that never stall or tear a snapshot.

A drop-in replacement for pytorch-pfn-extras' ``writing`` module, built on an asyncio
core: calls stage the target and return; saves are atomic and durable; failures raise.
"""

from ._base import Writer as Writer
from ._base import WriterStats as WriterStats
from ._coordination import SET_TIMEOUT_ENV as SET_TIMEOUT_ENV
from ._discovery import SnapshotEntry as SnapshotEntry
from ._discovery import find_latest_snapshot as find_latest_snapshot
from ._discovery import list_snapshots as list_snapshots
from ._distributed import RankSetHandle as RankSetHandle
from ._distributed import RankSetResult as RankSetResult
from ._distributed import RankSetWriter as RankSetWriter
from ._distributed import load_rank_shard as load_rank_shard
from ._exceptions import ChildProcessFailure as ChildProcessFailure
from ._exceptions import IncompleteSetError as IncompleteSetError
from ._exceptions import InvalidSnapshotArgument as InvalidSnapshotArgument
from ._exceptions import SnapshotError as SnapshotError
from ._exceptions import SnapshotLostError as SnapshotLostError
from ._exceptions import SnapshotWriteError as SnapshotWriteError
from ._exceptions import StagingError as StagingError
from ._exceptions import WriterBusyError as WriterBusyError
from ._exceptions import WriterClosedError as WriterClosedError
from ._fsspec import FsspecFileSystem as FsspecFileSystem
from ._handle import SnapshotHandle as SnapshotHandle
from ._handle import SnapshotResult as SnapshotResult
from ._manifest import MemberRecord as MemberRecord
from ._manifest import SetManifest as SetManifest
from ._paths import is_temp_name as is_temp_name
from ._portal import EXIT_TIMEOUT_ENV as EXIT_TIMEOUT_ENV
from ._queue import ProcessQueueWriter as ProcessQueueWriter
from ._queue import QueueWriter as QueueWriter
from ._queue import ThreadQueueWriter as ThreadQueueWriter
from ._simple import SimpleWriter as SimpleWriter
from ._standard import ProcessWriter as ProcessWriter
from ._standard import StandardWriter as StandardWriter
from ._standard import ThreadWriter as ThreadWriter
from ._storage import FileStat as FileStat
from ._storage import LocalFileSystem as LocalFileSystem

__version__ = "0.1.0"

__all__ = (
    "EXIT_TIMEOUT_ENV",
    "SET_TIMEOUT_ENV",
    "ChildProcessFailure",
    "FileStat",
    "FsspecFileSystem",
    "IncompleteSetError",
    "InvalidSnapshotArgument",
    "LocalFileSystem",
    "MemberRecord",
    "ProcessQueueWriter",
    "ProcessWriter",
    "QueueWriter",
    "RankSetHandle",
    "RankSetResult",
    "RankSetWriter",
    "SetManifest",
    "SimpleWriter",
    "SnapshotEntry",
    "SnapshotError",
    "SnapshotHandle",
    "SnapshotLostError",
    "SnapshotResult",
    "SnapshotWriteError",
    "StagingError",
    "StandardWriter",
    "ThreadQueueWriter",
    "ThreadWriter",
    "Writer",
    "WriterBusyError",
    "WriterClosedError",
    "WriterStats",
    "__version__",
    "find_latest_snapshot",
    "is_temp_name",
    "list_snapshots",
    "load_rank_shard",
)
