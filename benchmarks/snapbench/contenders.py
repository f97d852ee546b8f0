"""The contenders: every writer benchmarked, behind one adapter interface.

Physical baselines (``memcpy``, ``os.write+fsync``), floors (``copy(tensors)``: the
cheapest per-tensor copy torch has; ``floor.bg-write``: a memcpy at the call, then another
process writes the bytes durably), synchronous ``torch.save`` (with and without fsync),
snapwriter's writers (``snap.*``), pytorch-pfn-extras' (``ppe.*``) and
``torch.distributed.checkpoint.async_save`` in a single process (``dcp.async_save``).
"""

from __future__ import annotations

import mmap
import os
import select
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import DEFAULT_WRITER, MiB
from .workloads import state_tensors


class Adapter:
    """Drives one writer with a uniform interface: call, done, wait, close."""

    family = "?"
    durability = "?"
    is_async = True
    check_consistency = True
    flat = False  # baselines work on one flat buffer

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def setup(self, state: dict[str, Any]) -> None:
        """Called once the state exists, before the first save."""

    def call(self, filename: str, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def done(self) -> bool:
        return True

    def wait(self) -> dict[str, Any]:
        """Block until the save finished; raise its failure; return extra figures."""
        return {}

    def close(self) -> None:
        """Finalize the writer."""

    def allocations(self) -> int | None:
        return None

    def path(self, filename: str) -> str:
        return os.path.join(self.out_dir, filename)

    def load(self, filename: str) -> Any:
        """The saved object, read back the way its users would (plain ``torch.load``)."""
        return torch.load(self.path(filename), map_location="cpu")


class SyncTorchSave(Adapter):
    family = "sync"
    is_async = False

    def __init__(self, out_dir: str, *, fsync: bool) -> None:
        super().__init__(out_dir)
        self.fsync = fsync
        self.durability = "flush+fsync (no rename)" if fsync else "none (page cache)"

    def call(self, filename: str, state: dict[str, Any]) -> None:
        with open(self.path(filename), "wb") as f:
            torch.save(state, f)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())


class SnapAdapter(Adapter):
    family = "snapwriter"
    durability = "fsync+rename+dir fsync"

    def __init__(self, out_dir: str, factory: Callable[[str], Any], *, is_async: bool) -> None:
        super().__init__(out_dir)
        self.writer = factory(out_dir)
        self.is_async = is_async
        self.handle: Any = None

    def call(self, filename: str, state: dict[str, Any]) -> None:
        self.handle = self.writer(filename, self.out_dir, state)

    def done(self) -> bool:
        return bool(self.handle.done())

    def wait(self) -> dict[str, Any]:
        r = self.handle.result()
        return {
            "stage_seconds": r.stage_seconds,
            "write_seconds": r.write_seconds,
            "commit_seconds": r.commit_seconds,
            "total_seconds": r.total_seconds,
            "nbytes": r.nbytes,
        }

    def close(self) -> None:
        self.writer.finalize()

    def allocations(self) -> int | None:
        stager = getattr(self.writer, "_stager", None)
        return None if stager is None else int(stager.allocations)


class PpeAdapter(Adapter):
    family = "ppe"
    durability = "none: no fsync; done = worker joined"

    def __init__(self, out_dir: str, cls_name: str) -> None:
        super().__init__(out_dir)
        from pytorch_pfn_extras import writing

        self.kind = cls_name
        kwargs: dict[str, Any] = {"out_dir": out_dir}
        if "Queue" in cls_name:
            # ppe's queue writers ignore out_dir (their task is a SimpleWriter without one)
            # and would write into the working directory: hand them a task that has it.
            kwargs["task"] = writing.SimpleWriter(out_dir=out_dir)
        self.writer = getattr(writing, cls_name)(**kwargs)
        self.is_async = cls_name != "SimpleWriter"
        if not self.is_async:
            self.durability = "none: no fsync"

    def call(self, filename: str, state: dict[str, Any]) -> None:
        self.writer(filename, self.out_dir, state)

    def done(self) -> bool:
        if self.kind in ("ThreadWriter", "ProcessWriter"):
            return not self.writer._worker.is_alive()
        if self.kind == "ThreadQueueWriter":
            return bool(self.writer._queue.unfinished_tasks == 0)
        return True

    def wait(self) -> dict[str, Any]:
        if self.kind in ("ThreadWriter", "ProcessWriter"):
            worker = self.writer._worker
            worker.join()
            code = getattr(worker, "exitcode", 0)
            if code not in (0, None):
                raise RuntimeError(f"ppe {self.kind} worker exit code {code}")
        elif self.kind == "ThreadQueueWriter":
            self.writer._queue.join()
        return {}

    def close(self) -> None:
        self.writer.finalize()


class DcpAdapter(Adapter):
    """``torch.distributed.checkpoint.async_save`` with no process group (single process,
    as ``benchmarks/bench_ranks.py`` drives it per rank): a directory per save."""

    family = "dcp"
    durability = "fsync per file (no rename)"

    def __init__(self, out_dir: str) -> None:
        super().__init__(out_dir)
        import torch.distributed.checkpoint as dcp

        self.dcp = dcp
        self.future: Any = None
        # DCP warns on every save (in the call and in its saving thread) that it found no
        # process group, as expected here: silenced for the adapter's lifetime.
        self._quiet = warnings.catch_warnings()
        self._quiet.__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")

    def call(self, filename: str, state: dict[str, Any]) -> None:
        self.future = self.dcp.async_save(state, checkpoint_id=self.path(filename))

    def done(self) -> bool:
        return bool(self.future.done())

    def wait(self) -> dict[str, Any]:
        self.future.result()
        return {}

    def load(self, filename: str) -> Any:
        """DCP's own converter to a ``torch.save`` file, then plain ``torch.load``."""
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory(dir=self.out_dir) as tmp:
            converted = os.path.join(tmp, "converted.pt")
            dcp_to_torch_save(self.path(filename), converted)
            return torch.load(converted, map_location="cpu")

    def close(self) -> None:
        self._quiet.__exit__(None, None, None)


class MemcpyBaseline(Adapter):
    family = "baseline"
    durability = "n/a (memory only)"
    is_async = False
    check_consistency = False
    flat = True

    def setup(self, state: dict[str, Any]) -> None:
        self.src = state_tensors(state)[0]
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # fault the pages in: the buffer is preallocated

    def call(self, filename: str, state: dict[str, Any]) -> None:
        self.dst.copy_(self.src)


class OsWriteBaseline(Adapter):
    family = "baseline"
    durability = "fsync (no rename)"
    is_async = False
    check_consistency = False
    flat = True

    def setup(self, state: dict[str, Any]) -> None:
        self.view = memoryview(state_tensors(state)[0].numpy()).cast("B")

    def call(self, filename: str, state: dict[str, Any]) -> None:
        fd = os.open(self.path(filename), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            offset, size = 0, len(self.view)
            while offset < size:
                offset += os.write(fd, self.view[offset : offset + 64 * MiB])
            os.fsync(fd)
        finally:
            os.close(fd)


class ForeachCopyFloor(Adapter):
    """Every tensor of the state copied into a preallocated twin by one
    ``torch._foreach_copy_``: the least a staging call can stall on this many tensors
    with torch's own API (no check, no bookkeeping, no file)."""

    family = "baseline"
    durability = "n/a (memory only)"
    is_async = False
    check_consistency = False

    def setup(self, state: dict[str, Any]) -> None:
        self.srcs = state_tensors(state)
        self.dsts = [torch.empty_like(t) for t in self.srcs]
        torch._foreach_copy_(self.dsts, self.srcs)  # fault the pages in

    def call(self, filename: str, state: dict[str, Any]) -> None:
        torch._foreach_copy_(self.dsts, self.srcs)


# The other process of BackgroundWriteFloor: maps the shared buffer, then for each path
# it is sent, writes the bytes (CRC-32 as it goes), fsyncs, renames and fsyncs the
# directory, and answers one line.
_FLOOR_CHILD = """
import mmap, os, sys
try:
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
view = memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))
for line in sys.stdin:
    path = line.rstrip("\\n")
    try:
        out = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            crc, offset = 0, 0
            while offset < size:
                chunk = view[offset : offset + (64 << 20)]
                crc = crc32(chunk, crc)
                written = 0
                while written < len(chunk):
                    written += os.write(out, chunk[written:])
                offset += len(chunk)
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(path + ".tmp", path)
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        print("ok", crc, flush=True)
    except OSError as exc:
        print("error", exc, flush=True)
"""


class BackgroundWriteFloor(Adapter):
    """The least a durable asynchronous save can cost here: the state's bytes (one flat
    buffer) copied into shared memory at the call, then a process that runs all along
    checksums them, writes them, fsyncs, renames and fsyncs the directory, as snapwriter's
    saving process does, with no pickling and no file format. Its *lost* is memcpy plus
    what writing that many bytes in the background costs the loop on this machine
    (cores, memory bandwidth, the kernel's writeback); not a loadable file."""

    family = "baseline"
    durability = "fsync+rename+dir fsync"
    check_consistency = False
    flat = True

    def setup(self, state: dict[str, Any]) -> None:
        self.src = state_tensors(state)[0]
        nbytes = self.src.numel() * self.src.element_size()
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self._buffer_path = tempfile.mkstemp(prefix="snapbench-floor-", dir=shm)
        try:
            os.ftruncate(fd, nbytes)
            self._map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.dst = torch.frombuffer(self._map, dtype=self.src.dtype, count=self.src.numel())
        self.dst.copy_(self.src)  # fault the pages in
        self._child = subprocess.Popen(
            [sys.executable, "-c", _FLOOR_CHILD, self._buffer_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._pending = False

    def call(self, filename: str, state: dict[str, Any]) -> None:
        self.dst.copy_(self.src)
        assert self._child.stdin is not None
        self._child.stdin.write(self.path(filename) + "\n")
        self._child.stdin.flush()
        self._pending = True

    def done(self) -> bool:
        if not self._pending:
            return True
        return bool(select.select([self._child.stdout], [], [], 0)[0])

    def wait(self) -> dict[str, Any]:
        if self._pending:
            assert self._child.stdout is not None
            answer = self._child.stdout.readline()
            self._pending = False
            if not answer.startswith("ok"):
                raise RuntimeError(f"background writer: {answer.strip() or 'exited'}")
        return {}

    def close(self) -> None:
        if self._child.stdin is not None:
            self._child.stdin.close()
        self._child.wait(timeout=60)
        if self._child.stdout is not None:
            self._child.stdout.close()
        del self.dst
        self._map.close()
        os.unlink(self._buffer_path)


def _snap(factory: Callable[[str], Any], *, is_async: bool = True) -> Callable[[str], Adapter]:
    return lambda out_dir: SnapAdapter(out_dir, factory, is_async=is_async)


def writers() -> dict[str, Callable[[str], Adapter]]:
    """Writer name -> adapter factory (imports snapwriter)."""
    import snapwriter as sw

    return {
        "memcpy": MemcpyBaseline,
        "copy(tensors)": ForeachCopyFloor,
        "os.write+fsync": OsWriteBaseline,
        "floor.bg-write": BackgroundWriteFloor,
        "torch.save": lambda d: SyncTorchSave(d, fsync=False),
        "torch.save+fsync": lambda d: SyncTorchSave(d, fsync=True),
        "snap.Standard": _snap(lambda d: sw.StandardWriter(out_dir=d)),
        "snap.Standard(stage=False)": _snap(lambda d: sw.StandardWriter(out_dir=d, stage=False)),
        "snap.Process": _snap(lambda d: sw.ProcessWriter(out_dir=d)),
        "snap.Process(fork)": _snap(lambda d: sw.ProcessWriter(out_dir=d, mp_context="fork")),
        "snap.Process(spawn)": _snap(lambda d: sw.ProcessWriter(out_dir=d, mp_context="spawn")),
        "snap.Process(cow)": _snap(lambda d: sw.ProcessWriter(out_dir=d, staging="fork")),
        "snap.Process(auto)": _snap(lambda d: sw.ProcessWriter(out_dir=d, staging="auto")),
        "snap.ProcessQueue": _snap(lambda d: sw.ProcessQueueWriter(out_dir=d)),
        "snap.ProcessQueue(fork)": _snap(
            lambda d: sw.ProcessQueueWriter(out_dir=d, mp_context="fork")
        ),
        "snap.ThreadQueue": _snap(lambda d: sw.ThreadQueueWriter(out_dir=d)),
        "snap.Simple": _snap(lambda d: sw.SimpleWriter(out_dir=d), is_async=False),
        "ppe.Simple": lambda d: PpeAdapter(d, "SimpleWriter"),
        "ppe.Thread": lambda d: PpeAdapter(d, "ThreadWriter"),
        "ppe.Process": lambda d: PpeAdapter(d, "ProcessWriter"),
        "ppe.ThreadQueue": lambda d: PpeAdapter(d, "ThreadQueueWriter"),
        "dcp.async_save": DcpAdapter,
    }


#: Every writer of a default run, in table order (``dcp.async_save``: ``--compare`` or
#: ``--writers`` only).
WRITER_NAMES = (
    "memcpy",
    "copy(tensors)",
    "os.write+fsync",
    "floor.bg-write",
    "torch.save",
    "torch.save+fsync",
    "snap.Standard",
    "snap.Standard(stage=False)",
    "snap.Process",
    "snap.Process(fork)",
    "snap.Process(spawn)",
    "snap.Process(cow)",
    "snap.Process(auto)",
    "snap.ProcessQueue",
    "snap.ProcessQueue(fork)",
    "snap.ThreadQueue",
    "snap.Simple",
    "ppe.Simple",
    "ppe.Thread",
    "ppe.Process",
    "ppe.ThreadQueue",
)
ALL_WRITERS = (*WRITER_NAMES, "dcp.async_save")
QUICK_WRITERS = tuple(
    w
    for w in WRITER_NAMES
    if w not in ("snap.Process(spawn)", "snap.Process(fork)", "snap.ProcessQueue(fork)")
    and w != "snap.ThreadQueue"
)
#: --quick on the many-tensor workloads: every save of 50k tensors through torch.save's
#: pickler takes seconds, so quick mode keeps one writer per behaviour there.
QUICK_SMALL_WRITERS = (
    "memcpy",
    "os.write+fsync",
    "torch.save",
    "torch.save+fsync",
    DEFAULT_WRITER,
    "snap.Process",
    "ppe.Thread",
    "ppe.Process",
)
SWEEP_WRITERS = ("memcpy", "torch.save+fsync", DEFAULT_WRITER)
#: The asynchronous snapwriter writers the per-writer targets are about (``Simple``
#: blocks by design; ``stage=False`` hands consistency to the caller).
SNAP_ASYNC = (
    "snap.Standard",
    "snap.Process",
    "snap.Process(auto)",
    "snap.ProcessQueue",
    "snap.Process(fork)",
    "snap.Process(spawn)",
    "snap.ProcessQueue(fork)",
    "snap.ThreadQueue",
)
#: The candidates of the "best writer" targets on many tensors: also the writer option
#: made for them only (``staging="fork"``: a fork per save, costly on large states).
SNAP_BEST = (*SNAP_ASYNC, "snap.Process(cow)")
#: ``--compare``: the baselines the ratios need, then ours beside ppe's and DCP's.
COMPARE_WRITERS = (
    "memcpy",
    "copy(tensors)",
    "floor.bg-write",
    "torch.save",
    "torch.save+fsync",
    "snap.Standard",
    "snap.Process",
    "snap.Process(auto)",
    "snap.Process(cow)",
    "snap.ProcessQueue",
    "snap.ThreadQueue",
    "ppe.Thread",
    "ppe.Process",
    "dcp.async_save",
)


def ppe_available() -> bool:
    try:
        import pytorch_pfn_extras.writing  # noqa: F401
    except ImportError:
        return False
    return True


def dcp_available() -> bool:
    try:
        from torch.distributed.checkpoint import async_save  # noqa: F401
    except ImportError:
        return False
    return True
