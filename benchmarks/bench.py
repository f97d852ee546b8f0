#!/usr/bin/env python
"""Benchmark snapwriter's writers against synchronous saves, ppe's writers and the hardware.

One command runs every writer side by side on the same workloads and prints one table::

    .venv/bin/python benchmarks/bench.py --quick            # ~4 min: 0.5 GiB and 50k tensors
    .venv/bin/python benchmarks/bench.py                    # + the 2 GiB workload
    .venv/bin/python benchmarks/bench.py --sweep            # + the 64 MiB..2 GiB / 1k..50k sweeps

Each (writer, workload) pair runs in a fresh subprocess, so memory figures are comparable
and no writer inherits another's threads, page cache pressure or allocator state. Inside
it, one cold save (which also measures memory) is followed by ``--reps`` warm saves. Each
save is one *rep*:

1. idle reference: the training loop (a Python-heavy chunk and a matmul chunk,
   alternating) runs for a moment and the "optimizer step" (an in-place add on every
   tensor) runs once, with nothing in flight;
2. the writer is called (*stall*), then the step runs at once (its extra time over the idle
   step is charged to the writer: copy-on-write faults after a fork land here), then the
   loop runs until the save is done (*durable done*, measured from the call);
3. *lost* = stall + extra step time + extra loop time while the save was in flight;
   *slowdown* = chunk time in flight / idle chunk time, per loop;
4. the file is loaded with plain ``torch.load`` and compared with the state as it was at
   the call (the step after the call adds exactly 1.0 to integer-valued float tensors, so
   the comparison is exact without keeping a second copy): *consistent* or *TORN*.

See benchmarks/README.md for the metrics, the targets and how to read the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

MiB = 1 << 20
GiB = 1 << 30
RESULT_PREFIX = "@@BENCH-RESULT "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "bench.json")
DEFAULT_WRITER = "snap.Standard"

# -- workloads ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A state dict of ``count`` float32 tensors holding ``nbytes`` bytes together."""

    name: str
    nbytes: int
    count: int
    group: str  # "main", "big", "sweep-size", "sweep-count" or "smoke"

    @property
    def numel_each(self) -> int:
        return max(1, self.nbytes // 4 // self.count)

    @property
    def state_bytes(self) -> int:
        return self.numel_each * 4 * self.count


def _workloads() -> dict[str, Workload]:
    items = [
        Workload("tiny", 8 * MiB, 16, "smoke"),
        Workload("0.5GiB-190", 512 * MiB, 190, "main"),
        Workload("50k-small", 50_000 * 256 * 4, 50_000, "main"),
        Workload("2GiB-400", 2 * GiB, 400, "big"),
    ]
    items += [Workload(f"size-{m}MiB", m * MiB, 200, "sweep-size") for m in (64, 256, 1024, 2048)]
    items += [
        Workload(f"count-{k}k", k * 1000 * 256 * 4, k * 1000, "sweep-count")
        for k in (1, 5, 20)  # 50k-small closes the count sweep
    ]
    return {w.name: w for w in items}


WORKLOADS = _workloads()


def build_state(workload: Workload, *, flat: bool = False, seed: int = 0) -> dict[str, Any]:
    """A training-state-like target: ``{"model": OrderedDict(name -> tensor), "iteration"}``.

    Values are integers in [-2**20, 2**20) stored as float32, so adding 1.0 is exact and
    a snapshot can be checked against the live state without a second copy. ``flat``
    puts all the bytes in one tensor (the physical baselines).
    """
    gen = torch.Generator().manual_seed(seed)
    model: OrderedDict[str, torch.Tensor] = OrderedDict()
    shapes = [(workload.numel_each * workload.count,)] if flat else None
    for i, shape in enumerate(shapes or [(workload.numel_each,)] * workload.count):
        t = torch.empty(shape, dtype=torch.float32)
        t.random_(-(2**20), 2**20, generator=gen)
        model[f"layer{i}.weight"] = t
    return {"model": model, "iteration": 0}


def state_tensors(state: dict[str, Any]) -> list[torch.Tensor]:
    return list(state["model"].values())


def optimizer_step(tensors: list[torch.Tensor]) -> None:
    """The "optimizer step": an in-place add of 1.0 on every tensor (foreach, like torch.optim)."""
    with torch.no_grad():
        torch._foreach_add_(tensors, 1.0)


# -- the training loop --------------------------------------------------------------------


def _py_chunk(n: int) -> int:
    d: dict[int, int] = {}
    s = 0
    for i in range(n):
        k = i & 127
        d[k] = d.get(k, 0) + i
        s += len(d)
    return s


class TrainingLoop:
    """Alternating chunks of Python-heavy work and of matmuls, each ~``chunk_s`` when idle."""

    def __init__(self, chunk_s: float = 0.002) -> None:
        self.a = torch.randn(192, 192)
        self.b = torch.randn(192, 192)
        self.c = torch.empty(192, 192)
        self.n_py = self._calibrate(lambda n: _py_chunk(n), 2000, chunk_s)
        self.n_mm = self._calibrate(self._mm, 1, chunk_s)

    def _mm(self, k: int) -> None:
        for _ in range(k):
            torch.mm(self.a, self.b, out=self.c)

    @staticmethod
    def _calibrate(fn: Callable[[int], object], n: int, target: float) -> int:
        for _ in range(30):
            times = []
            for _ in range(5):
                t = time.perf_counter()
                fn(n)
                times.append(time.perf_counter() - t)
            took = statistics.median(times)
            if took >= target * 0.9:
                return n
            n = max(n + 1, int(n * min(8.0, target / max(took, 1e-7))))
        return n

    def one(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        _py_chunk(self.n_py)
        t1 = time.perf_counter()
        self._mm(self.n_mm)
        return t1 - t0, time.perf_counter() - t1

    def idle(self, seconds: float) -> tuple[float, float]:
        """Mean chunk times with nothing in flight."""
        py: list[float] = []
        mm: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(py) < 10:
            a, b = self.one()
            py.append(a)
            mm.append(b)
        return statistics.fmean(py), statistics.fmean(mm)


# -- memory -------------------------------------------------------------------------------


def _status_kib(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(m.group(1)) if m else 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_pss_bytes() -> int:
    """Proportional set size of this process and its descendants: shared pages (fork,
    shared memory) are counted once in total, copy-on-write copies count in full."""
    total = 0
    for pid in [os.getpid(), *_descendants(os.getpid())]:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                m = re.search(r"^Pss:\s+(\d+) kB", f.read(), re.MULTILINE)
        except OSError:
            continue
        if m:
            total += int(m.group(1)) * 1024
    return total


class PeakSampler(threading.Thread):
    """Samples :func:`tree_pss_bytes` until stopped; used on the cold save only."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(name="bench-pss-sampler", daemon=True)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, tree_pss_bytes())
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, tree_pss_bytes())
        return self.peak


# -- writers ------------------------------------------------------------------------------


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


def _snap(factory: Callable[[str], Any], *, is_async: bool = True) -> Callable[[str], Adapter]:
    return lambda out_dir: SnapAdapter(out_dir, factory, is_async=is_async)


def _writers() -> dict[str, Callable[[str], Adapter]]:
    import snapwriter as sw

    return {
        "memcpy": MemcpyBaseline,
        "os.write+fsync": OsWriteBaseline,
        "torch.save": lambda d: SyncTorchSave(d, fsync=False),
        "torch.save+fsync": lambda d: SyncTorchSave(d, fsync=True),
        "snap.Standard": _snap(lambda d: sw.StandardWriter(out_dir=d)),
        "snap.Standard(stage=False)": _snap(lambda d: sw.StandardWriter(out_dir=d, stage=False)),
        "snap.Process(fork)": _snap(lambda d: sw.ProcessWriter(out_dir=d, mp_context="fork")),
        "snap.Process(spawn)": _snap(lambda d: sw.ProcessWriter(out_dir=d, mp_context="spawn")),
        "snap.ProcessQueue(fork)": _snap(
            lambda d: sw.ProcessQueueWriter(out_dir=d, mp_context="fork")
        ),
        "snap.ThreadQueue": _snap(lambda d: sw.ThreadQueueWriter(out_dir=d)),
        "snap.Simple": _snap(lambda d: sw.SimpleWriter(out_dir=d), is_async=False),
        "ppe.Simple": lambda d: PpeAdapter(d, "SimpleWriter"),
        "ppe.Thread": lambda d: PpeAdapter(d, "ThreadWriter"),
        "ppe.Process": lambda d: PpeAdapter(d, "ProcessWriter"),
        "ppe.ThreadQueue": lambda d: PpeAdapter(d, "ThreadQueueWriter"),
    }


WRITER_NAMES = (
    "memcpy",
    "os.write+fsync",
    "torch.save",
    "torch.save+fsync",
    "snap.Standard",
    "snap.Standard(stage=False)",
    "snap.Process(fork)",
    "snap.Process(spawn)",
    "snap.ProcessQueue(fork)",
    "snap.ThreadQueue",
    "snap.Simple",
    "ppe.Simple",
    "ppe.Thread",
    "ppe.Process",
    "ppe.ThreadQueue",
)
QUICK_WRITERS = tuple(
    w for w in WRITER_NAMES if w not in ("snap.Process(spawn)", "snap.ThreadQueue")
)
#: --quick on the 50k-small workload: every save of 50k tensors through torch.save's
#: pickler takes seconds, so quick mode keeps one writer per behaviour there.
QUICK_SMALL_WRITERS = (
    "memcpy",
    "os.write+fsync",
    "torch.save",
    "torch.save+fsync",
    DEFAULT_WRITER,
    "snap.Process(fork)",
    "ppe.Thread",
    "ppe.Process",
)
SWEEP_WRITERS = ("memcpy", "torch.save+fsync", DEFAULT_WRITER)


def ppe_available() -> bool:
    try:
        import pytorch_pfn_extras.writing  # noqa: F401
    except ImportError:
        return False
    return True


# -- one case (runs in a fresh subprocess, or in-process for the smoke test) --------------


def _check_file(path: str, state: dict[str, Any], steps_since_call: int) -> dict[str, Any]:
    """Load ``path`` with plain torch.load and compare it with the state at call time."""
    try:
        loaded = torch.load(path, map_location="cpu")
    except Exception as exc:
        return {"loadable": False, "consistent": False, "error": f"{type(exc).__name__}: {exc}"}
    torn = 0
    model = state["model"]
    try:
        got = loaded["model"]
        for name, live in model.items():
            if not torch.equal(got[name], live - steps_since_call):
                torn += 1
        missing = len(model) != len(got)
    except Exception as exc:
        return {"loadable": True, "consistent": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        del loaded
    return {"loadable": True, "consistent": torn == 0 and not missing, "torn_tensors": torn}


def _clean_dir(directory: str) -> None:
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def _wait_polling(adapter: Adapter, timeout: float, sleep: float = 0.002) -> None:
    deadline = time.perf_counter() + timeout
    while not adapter.done():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"save still running after {timeout}s")
        time.sleep(sleep)


def _cold_rep(
    adapter: Adapter, state: dict[str, Any], tensors: list[torch.Tensor], timeout: float
) -> dict[str, Any]:
    """The first save: untimed for the summary, but it measures peak memory and the
    allocation of staging buffers."""
    filename = "snapshot_cold.pt"
    gc.collect()
    base_pss = tree_pss_bytes()
    base_rss = _status_kib("VmRSS") * 1024
    hwm_reset = _reset_hwm()
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    adapter.call(filename, state)
    t1 = time.perf_counter()
    finished_in_call = adapter.done()
    optimizer_step(tensors)
    _wait_polling(adapter, timeout)
    t_done = t1 if finished_in_call else time.perf_counter()
    figures = adapter.wait()
    peak_pss = sampler.stop()
    hwm = _status_kib("VmHWM") * 1024
    _clean_dir(adapter.out_dir)
    return {
        "stall_s": t1 - t0,
        "durable_s": t_done - t0,
        "peak_extra_bytes": peak_pss - base_pss,
        "rss_hwm_delta_bytes": (hwm - base_rss) if hwm_reset else None,
        "pss_samples": sampler.samples,
        "writer_figures": figures,
    }


def _warm_rep(
    adapter: Adapter,
    state: dict[str, Any],
    tensors: list[torch.Tensor],
    loop: TrainingLoop,
    index: int,
    *,
    idle_s: float,
    check: bool,
    timeout: float,
) -> dict[str, Any]:
    filename = f"snapshot_iter_{index}.pt"
    gc.collect()
    py_idle, mm_idle = loop.idle(idle_s)
    t = time.perf_counter()
    optimizer_step(tensors)
    step_idle = time.perf_counter() - t

    t0 = time.perf_counter()
    adapter.call(filename, state)
    t1 = time.perf_counter()
    finished_in_call = adapter.done()  # a blocking writer: durable when the call returns
    optimizer_step(tensors)
    t2 = time.perf_counter()
    py_times: list[float] = []
    mm_times: list[float] = []
    deadline = t2 + timeout
    while not adapter.done():
        a, b = loop.one()
        py_times.append(a)
        mm_times.append(b)
        if time.perf_counter() > deadline:
            raise TimeoutError(f"save still running after {timeout}s")
    t_done = t1 if finished_in_call else time.perf_counter()
    figures = adapter.wait()
    if py_times:
        # The machine's load drifts: take the idle reference on both sides of the save.
        py_after, mm_after = loop.idle(idle_s)
        py_idle, mm_idle = (py_idle + py_after) / 2, (mm_idle + mm_after) / 2

    stall = t1 - t0
    step_extra = (t2 - t1) - step_idle
    loop_extra = sum(py_times) - len(py_times) * py_idle + sum(mm_times) - len(mm_times) * mm_idle
    rep: dict[str, Any] = {
        "stall_s": stall,
        "step_idle_s": step_idle,
        "step_extra_s": step_extra,
        "loop_extra_s": loop_extra,
        # Time cannot be gained by saving: negative noise is clipped per component.
        "lost_s": stall + max(0.0, step_extra) + max(0.0, loop_extra),
        "durable_s": t_done - t0,
        "inflight_iterations": len(py_times),
        "slowdown_py": statistics.fmean(py_times) / py_idle if py_times else None,
        "slowdown_compute": statistics.fmean(mm_times) / mm_idle if mm_times else None,
        "idle_chunk_s": {"py": py_idle, "compute": mm_idle},
        "writer_figures": figures,
    }
    path = adapter.path(filename)
    rep["file_bytes"] = os.path.getsize(path) if os.path.exists(path) else None
    if check:
        rep["check"] = _check_file(path, state, steps_since_call=1)
    _clean_dir(adapter.out_dir)
    return rep


def run_case(
    writer: str,
    workload: str,
    *,
    reps: int = 3,
    tmp_dir: str | None = None,
    threads: int = 1,
    idle_s: float = 0.3,
    check_reps: int | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run one writer on one workload: a cold save, then ``reps`` warm ones.

    Args:
        check_reps: how many warm reps (the last ones) load and verify their file;
            ``None`` checks all of them.

    Returns:
        A JSON-serialisable dict: ``cold`` (memory, first-save figures), ``reps``
        (per-save figures) and ``allocations`` (staging allocations after each save).
    """
    wl = WORKLOADS[workload]
    make_adapter = _writers()[writer]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    out_dir = tempfile.mkdtemp(prefix=f"case-{os.getpid()}-", dir=tmp_dir)
    started = time.perf_counter()
    adapter: Adapter | None = None
    close_error = None
    try:
        adapter = make_adapter(out_dir)
        state = build_state(wl, flat=adapter.flat)
        tensors = state_tensors(state)
        adapter.setup(state)
        loop = TrainingLoop()
        allocations = []
        cold = _cold_rep(adapter, state, tensors, timeout)
        allocations.append(adapter.allocations())
        checked_from = 0 if check_reps is None else max(0, reps - check_reps)
        rep_results = []
        for i in range(reps):
            check = adapter.check_consistency and i >= checked_from
            rep_results.append(
                _warm_rep(
                    adapter, state, tensors, loop, i, idle_s=idle_s, check=check, timeout=timeout
                )
            )
            allocations.append(adapter.allocations())
    finally:
        if adapter is not None:
            try:
                adapter.close()
            except Exception as exc:  # reported with the figures, never hidden
                close_error = f"{type(exc).__name__}: {exc}"
        shutil.rmtree(out_dir, ignore_errors=True)
        torch.set_num_threads(previous_threads)
    return {
        "writer": writer,
        "workload": workload,
        "family": adapter.family,
        "durability": adapter.durability,
        "async": adapter.is_async,
        "state_bytes": wl.state_bytes,
        "tensors": 1 if adapter.flat else wl.count,
        "threads": threads,
        "loop_chunk_n": {"py": loop.n_py, "compute_matmuls": loop.n_mm},
        "cold": cold,
        "reps": rep_results,
        "allocations": allocations,
        "case_seconds": time.perf_counter() - started,
        "close_error": close_error,
    }


# -- summaries, targets and the table ------------------------------------------------------


def _stat(values: Sequence[float | None]) -> dict[str, Any] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


SUMMARY_METRICS = (
    "lost_s",
    "stall_s",
    "step_extra_s",
    "loop_extra_s",
    "durable_s",
    "slowdown_py",
    "slowdown_compute",
)


def summarize_case(case: dict[str, Any]) -> dict[str, Any]:
    reps = case["reps"]
    summary: dict[str, Any] = {m: _stat([r[m] for r in reps]) for m in SUMMARY_METRICS}
    checks = [r["check"] for r in reps if "check" in r]
    if not checks:
        summary["consistency"] = "n/a"
    elif not all(c["loadable"] for c in checks):
        summary["consistency"] = "UNLOADABLE"
    elif all(c["consistent"] for c in checks):
        summary["consistency"] = f"ok {len(checks)}/{len(checks)}"
    else:
        bad = sum(not c["consistent"] for c in checks)
        summary["consistency"] = f"TORN {bad}/{len(checks)}"
    summary["loadable"] = all(c["loadable"] for c in checks) if checks else None
    allocs = case["allocations"]
    staged = allocs[0] is not None and allocs[0] > 0  # None/0: this writer stages nothing
    summary["staging_reused"] = all(a == allocs[0] for a in allocs[1:]) if staged else None
    summary["peak_extra_bytes"] = case["cold"]["peak_extra_bytes"]
    summary["peak_extra_ratio"] = case["cold"]["peak_extra_bytes"] / case["state_bytes"]
    return summary


def _median(report: dict[str, Any], writer: str, workload: str, metric: str) -> float | None:
    case = report["cases"].get(f"{writer}|{workload}")
    if not case or "summary" not in case:
        return None
    stat = case["summary"].get(metric)
    if isinstance(stat, dict):
        return float(stat["median"])
    return None if stat is None else float(stat)


def _linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    n = len(xs)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx if sxx else math.nan
    intercept = my - slope * mx
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot else 1.0
    return {"slope": slope, "intercept": intercept, "r2": r2, "points": n}


def sweep_fits(report: dict[str, Any]) -> dict[str, Any]:
    fits: dict[str, Any] = {}
    for group, unit, scale in (("sweep-size", "s/GiB", GiB), ("sweep-count", "s/1k tensors", 1000)):
        names = [w.name for w in WORKLOADS.values() if w.group == group]
        if group == "sweep-count":
            names.append("50k-small")
        for writer in report["writers"]:
            for metric in ("lost_s", "durable_s"):
                pts = []
                for name in names:
                    y = _median(report, writer, name, metric)
                    if y is not None:
                        wl = WORKLOADS[name]
                        x = wl.state_bytes / scale if group == "sweep-size" else wl.count / scale
                        pts.append((x, y))
                if len(pts) >= 3:
                    fit = _linear_fit([p[0] for p in pts], [p[1] for p in pts])
                    fit["unit"] = unit
                    fits[f"{writer}|{group}|{metric}"] = fit
    return fits


def _target(name: str, ok: bool | None, detail: str) -> dict[str, Any]:
    verdict = "NOT RUN" if ok is None else ("PASS" if ok else "FAIL")
    return {"target": name, "verdict": verdict, "detail": detail}


def evaluate_targets(report: dict[str, Any], writer: str = DEFAULT_WRITER) -> list[dict[str, Any]]:
    """The issue's targets for the default writer, from the medians of the warm reps."""
    out = []

    def med(w: str, wl: str, m: str) -> float | None:
        return _median(report, w, wl, m)

    def versus(name: str, wl: str, metric: str, baseline: str, bound: float) -> dict[str, Any]:
        """Target ``name``: the writer's ``metric`` <= ``bound`` x the baseline's."""
        value, ref = med(writer, wl, metric), med(baseline, wl, metric)
        ok = None if value is None or ref is None else value <= bound * ref
        label = metric.removesuffix("_s")
        detail = (
            "not run"
            if ok is None
            else f"{label} {value:.3f}s vs {baseline} {ref:.3f}s = {value / ref:.2f}x "
            f"(<= {bound:.1f}x)"
        )
        return _target(f"{name} [{wl}]", ok, detail)

    for wl in ("0.5GiB-190", "2GiB-400"):
        out.append(versus("lost <= 1.3x memcpy", wl, "lost_s", "memcpy", 1.3))
    for wl in ("0.5GiB-190", "2GiB-400"):
        out.append(
            versus(
                "durable done <= 1.0x torch.save+fsync", wl, "durable_s", "torch.save+fsync", 1.0
            )
        )
    wl = "50k-small"
    lost = med(writer, wl, "lost_s")
    out.append(
        _target(
            f"lost <= 0.1 s [{wl}]",
            None if lost is None else lost <= 0.1,
            "not run" if lost is None else f"lost {lost:.3f}s",
        )
    )
    out.append(versus("durable done <= 0.5x sync torch.save", wl, "durable_s", "torch.save", 0.5))
    case = report["cases"].get(f"{writer}|{wl}", {})
    loadable = case.get("summary", {}).get("loadable")
    out.append(
        _target(f"file loadable by plain torch.load [{wl}]", loadable, f"loadable={loadable}")
    )
    for wl in ("0.5GiB-190", "2GiB-400", "50k-small"):
        py, mm = med(writer, wl, "slowdown_py"), med(writer, wl, "slowdown_compute")
        ok = None if py is None or mm is None else max(py, mm) <= 1.05
        detail = (
            "not run" if ok is None else f"python loop {py:.2f}x, compute loop {mm:.2f}x (<= 1.05x)"
        )
        out.append(_target(f"loop slowdown <= 1.05x [{wl}]", ok, detail))
    for wl in ("0.5GiB-190", "2GiB-400", "50k-small"):
        ratio = med(writer, wl, "peak_extra_ratio")
        peak = med(writer, wl, "peak_extra_bytes")
        ok = None if ratio is None else ratio <= 1.1
        detail = (
            "not run"
            if ok is None or peak is None
            else f"peak extra {peak / MiB:.0f} MiB = {ratio:.2f}x state (<= 1.1x)"
        )
        out.append(_target(f"peak extra memory <= 1.1x state [{wl}]", ok, detail))
    for wl in ("0.5GiB-190", "2GiB-400", "50k-small"):
        case = report["cases"].get(f"{writer}|{wl}")
        reused = None if not case or "summary" not in case else case["summary"]["staging_reused"]
        allocs = None if not case or "allocations" not in case else case["allocations"]
        out.append(
            _target(
                f"warm saves allocate no staging memory [{wl}]",
                reused,
                f"allocations after each save: {allocs}",
            )
        )
    fits = report.get("sweep_fits", {})
    for group in ("sweep-size", "sweep-count"):
        keys = [f"{writer}|{group}|lost_s", f"{writer}|{group}|durable_s"]
        if not all(k in fits for k in keys):
            out.append(_target(f"linear scaling [{group}]", None, "run with --sweep"))
            continue
        lo, du = fits[keys[0]], fits[keys[1]]
        ok = lo["r2"] >= 0.9 and du["r2"] >= 0.9
        detail = (
            f"lost {lo['slope']:.3f} {lo['unit']} (R2 {lo['r2']:.3f}), "
            f"durable {du['slope']:.3f} {du['unit']} (R2 {du['r2']:.3f}); PASS if R2 >= 0.9"
        )
        out.append(_target(f"linear scaling [{group}]", ok, detail))
    return out


def _fmt_stat(stat: dict[str, Any] | None, digits: int = 3, unit: str = "") -> str:
    if stat is None:
        return "—"
    m, lo, hi = stat["median"], stat["min"], stat["max"]
    return f"{m:.{digits}f}{unit} [{lo:.{digits}f}-{hi:.{digits}f}]"


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# snapwriter benchmark — {report['meta']['date']}",
        "",
        f"`{report['meta']['command']}`  ",
        f"{report['meta']['machine']['summary']}; torch {report['meta']['torch']}, "
        f"ppe {report['meta']['ppe']}, snapwriter {report['meta']['snapwriter']}; "
        f"{report['meta']['reps']} warm reps per cell (median [min-max]); "
        f"torch threads {report['meta']['threads']}; wall {report['meta']['wall_seconds']:.0f}s",
        "",
        "lost = stall + extra step time + extra loop time while in flight (s). "
        "durable = call → file fsync'd and renamed (ppe and torch.save: call → done, no fsync). "
        "slowdown = in-flight chunk time / idle chunk time. mem = peak extra PSS of the process "
        "tree during the cold save, x state size.",
    ]
    for wl_name in report["workloads"]:
        wl = WORKLOADS[wl_name]
        lines += [
            "",
            f"## {wl_name}: {wl.state_bytes / MiB:.0f} MiB in {wl.count} tensors",
            "",
            "| writer | lost s | stall s | durable s | slowdown py | slowdown mm | mem "
            "| consistent | staging reused | durability |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for writer in report["writers"]:
            case = report["cases"].get(f"{writer}|{wl_name}")
            if case is None:
                continue
            if "error" in case:
                lines.append(f"| {writer} | ERROR: {case['error'][:80]} |||||||||")
                continue
            s = case["summary"]
            mem = f"{s['peak_extra_bytes'] / MiB:.0f} MiB ({s['peak_extra_ratio']:.2f}x)"
            reused = {None: "—", True: "yes", False: "NO"}[s["staging_reused"]]
            lines.append(
                f"| {writer} | {_fmt_stat(s['lost_s'])} | {_fmt_stat(s['stall_s'])} | "
                f"{_fmt_stat(s['durable_s'])} | {_fmt_stat(s['slowdown_py'], 2)} | "
                f"{_fmt_stat(s['slowdown_compute'], 2)} | {mem} | {s['consistency']} | "
                f"{reused} | {case['durability']} |"
            )
    if report.get("sweep_fits"):
        lines += [
            "",
            "## Sweeps: linear fits of the medians",
            "",
            "| writer | sweep | metric | slope | intercept s | R2 |",
            "|---|---|---|---|---|---|",
        ]
        for key, fit in report["sweep_fits"].items():
            writer, group, metric = key.split("|")
            lines.append(
                f"| {writer} | {group} | {metric} | {fit['slope']:.4f} {fit['unit']} | "
                f"{fit['intercept']:.4f} | {fit['r2']:.3f} |"
            )
    lines += ["", f"## Targets ({DEFAULT_WRITER})", ""]
    for t in report["targets"]:
        lines.append(f"- **{t['verdict']}** {t['target']}: {t['detail']}")
    return "\n".join(lines) + "\n"


# -- metadata -----------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _fs_type(path: str) -> str:
    path = os.path.realpath(path)
    best, fstype = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            under = len(parts) >= 3 and (
                path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")
            )
            if under and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def machine_info() -> dict[str, Any]:
    mem_total = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        m = re.search(r"MemTotal:\s+(\d+) kB", f.read())
        mem_total = int(m.group(1)) * 1024 if m else 0
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        m = re.search(r"model name\s*:\s*(.+)", f.read())
        cpu = m.group(1).strip() if m else cpu
    info = {
        "node": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_bytes": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }
    info["summary"] = (
        f"{info['cpus']} CPUs ({cpu}), {mem_total / GiB:.0f} GiB RAM, Linux {info['kernel']}"
    )
    return info


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", REPO_ROOT, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# -- the command --------------------------------------------------------------------------


def _run_case_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        # cwd: a writer that ignores out_dir (ppe's queue writers do) writes there.
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=spec["tmp_dir"]
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def _run_case_forked(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one case in a child forked from this (single-threaded, torch-preloaded)
    process: as isolated as a fresh interpreter, without paying torch's import again."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, report, leave without running the parent's exit hooks
        status = 0
        try:
            os.close(read_fd)
            os.chdir(spec["tmp_dir"])  # a writer that ignores out_dir writes here
            try:
                result = run_case(**spec)
            except Exception as exc:
                import traceback

                traceback.print_exc()
                result = {"error": f"{type(exc).__name__}: {exc}"}
            with os.fdopen(write_fd, "wb") as f:
                f.write(json.dumps(result).encode())
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_fd], [], [], remaining)[0]:
                os.kill(pid, signal.SIGKILL)
                return {"error": f"timed out after {timeout:.0f}s"}
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"error": f"case process ended with status {status} and no result"}
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        result = run_case(**spec)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark snapwriter against torch.save, ppe's writers and memcpy/os.write.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="0.5 GiB and 50k-tensor workloads, core writers only (a few minutes)",
    )
    p.add_argument(
        "--big", action="store_true", help="include the 2 GiB workload even with --quick"
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="run the size (64 MiB..2 GiB) and count (1k..50k) sweeps",
    )
    p.add_argument(
        "--workloads",
        help=f"comma-separated workloads (overrides the above): {','.join(WORKLOADS)}",
    )
    p.add_argument("--writers", help=f"comma-separated writers: {','.join(WRITER_NAMES)}")
    p.add_argument(
        "--sweep-writers", default=",".join(SWEEP_WRITERS), help="writers run on the sweeps"
    )
    p.add_argument("--reps", type=int, default=3, help="warm saves per cell (after one cold save)")
    p.add_argument(
        "--check-reps",
        type=int,
        default=None,
        help="warm reps that load and verify their file (default: all; --quick: 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads in each case (1 leaves a core for the writer)",
    )
    p.add_argument(
        "--idle-s",
        type=float,
        default=0.3,
        help="seconds of idle loop before each save, the reference rate",
    )
    p.add_argument(
        "--tmp-dir",
        help="where files are written (default: benchmarks/results/tmp, on the repo's disk)",
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help="JSON report path; the markdown table goes next to it (.md)",
    )
    p.add_argument(
        "--isolation",
        choices=("fork", "subprocess", "none"),
        default="fork" if hasattr(os, "fork") else "subprocess",
        help="how each case is isolated: a child forked from this torch-preloaded process, "
        "a fresh interpreter, or none (in-process: smoke tests; memory not comparable)",
    )
    p.add_argument(
        "--case-timeout", type=float, default=900.0, help="seconds before a case is abandoned"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _plan(args: argparse.Namespace) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    if args.workloads:
        workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    else:
        workloads = ["0.5GiB-190", "50k-small"]
        if args.big or not args.quick:
            workloads.insert(1, "2GiB-400")
    if args.writers:
        writers = [w.strip() for w in args.writers.split(",") if w.strip()]
    else:
        writers = list(QUICK_WRITERS if args.quick else WRITER_NAMES)
    if not ppe_available():
        writers = [w for w in writers if not w.startswith("ppe.")]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for w in writers:
        if w not in WRITER_NAMES:
            raise SystemExit(f"unknown writer {w!r}; choose from {', '.join(WRITER_NAMES)}")
    cases = [
        (w, wl)
        for wl in workloads
        for w in writers
        if not (args.quick and not args.writers and wl == "50k-small") or w in QUICK_SMALL_WRITERS
    ]
    if args.sweep:
        sweep_writers = [w.strip() for w in args.sweep_writers.split(",") if w.strip()]
        sweep = [wl.name for wl in WORKLOADS.values() if wl.group.startswith("sweep")]
        for name in [*sweep, "50k-small"]:  # 50k-small closes the count sweep
            if name not in workloads:
                workloads.append(name)
            cases += [(w, name) for w in sweep_writers if (w, name) not in cases]
        writers += [w for w in sweep_writers if w not in writers]
    return workloads, writers, cases


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; return the report (also written as JSON and markdown)."""
    args = parse_args(argv)
    if args.worker:
        raise SystemExit(_worker_main(args.worker))
    started = time.perf_counter()
    workloads, writers, cases = _plan(args)
    if args.isolation == "fork":
        _writers()  # import snapwriter (and ppe below) once, before forking the cases
        if any(w.startswith("ppe.") for w in writers):
            import pytorch_pfn_extras.writing  # noqa: F401
    check_reps = args.check_reps if args.check_reps is not None else (1 if args.quick else None)
    tmp_root = args.tmp_dir or os.path.join(REPO_ROOT, "benchmarks", "results", "tmp")
    os.makedirs(tmp_root, exist_ok=True)
    fs_type = _fs_type(tmp_root)
    if fs_type in ("tmpfs", "ramfs"):
        print(f"warning: {tmp_root} is on {fs_type}: fsync is free there", file=sys.stderr)
    command = shlex.join(
        [
            os.path.relpath(sys.executable, REPO_ROOT)
            if sys.executable.startswith(REPO_ROOT)
            else sys.executable,
            os.path.relpath(os.path.abspath(__file__), REPO_ROOT),
            *(argv if argv is not None else sys.argv[1:]),
        ]
    )
    report: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": command,
            "machine": machine_info(),
            "torch": torch.__version__,
            "ppe": _version("pytorch-pfn-extras"),
            "snapwriter": f"{_version('snapwriter')} ({_git_commit()})",
            "reps": args.reps,
            "check_reps": check_reps,
            "threads": args.threads,
            "idle_s": args.idle_s,
            "tmp_dir": tmp_root,
            "tmp_fs": fs_type,
            "isolation": args.isolation,
        },
        "workloads": workloads,
        "writers": writers,
        "cases": {},
    }
    for n, (writer, workload) in enumerate(cases, 1):
        spec = {
            "writer": writer,
            "workload": workload,
            "reps": args.reps,
            "tmp_dir": tmp_root,
            "threads": args.threads,
            "idle_s": args.idle_s,
            "check_reps": check_reps,
        }
        t = time.perf_counter()
        print(
            f"[{n}/{len(cases)}] {writer} on {workload} ...", end=" ", file=sys.stderr, flush=True
        )
        if args.isolation == "none":
            try:
                case = run_case(**spec)
            except Exception as exc:
                case = {"error": f"{type(exc).__name__}: {exc}"}
        elif args.isolation == "fork":
            case = _run_case_forked(spec, args.case_timeout)
        else:
            case = _run_case_subprocess(spec, args.case_timeout)
        if "error" not in case:
            case["summary"] = summarize_case(case)
            s = case["summary"]
            print(
                f"lost {s['lost_s']['median']:.3f}s durable {s['durable_s']['median']:.3f}s "
                f"({time.perf_counter() - t:.0f}s)",
                file=sys.stderr,
            )
        else:
            print(f"ERROR {case['error']}", file=sys.stderr)
        report["cases"][f"{writer}|{workload}"] = case
    with contextlib.suppress(OSError):
        os.rmdir(tmp_root)  # only if empty: never remove files we did not create
    report["sweep_fits"] = sweep_fits(report)
    report["targets"] = evaluate_targets(report)
    report["meta"]["wall_seconds"] = time.perf_counter() - started
    report["meta"]["machine"]["loadavg_end"] = list(os.getloadavg())
    markdown = render_markdown(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
