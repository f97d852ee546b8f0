"""What is measured: the training loop, and one case's cold save and warm saves.

A warm save (*rep*): the loop runs idle (reference chunk times) and the optimizer step
runs once; then the writer is called (*stall*), the step runs at once (its extra time is
charged to the writer), and the loop runs until the save is done (*durable*, from the
call). *lost* = stall + extra step time + extra loop time; *slowdown* = in-flight chunk
time / idle chunk time, per loop. The file is then loaded and compared with the state as
it was at the call. The cold save (the first) measures memory and the *first save* time.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from .contenders import Adapter, writers
from .memory import PeakSampler, reset_hwm, status_kib, tree_pss_bytes
from .workloads import WORKLOADS, build_state, iter_tensors, optimizer_step, state_tensors


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


def check_file(
    adapter: Adapter, filename: str, state: dict[str, Any], steps_since_call: int
) -> dict[str, Any]:
    """Load what was saved and compare every tensor with the state at call time."""
    try:
        loaded = adapter.load(filename)
    except Exception as exc:
        return {"loadable": False, "consistent": False, "error": f"{type(exc).__name__}: {exc}"}
    torn = 0
    try:
        got = dict(iter_tensors(loaded))
        live = dict(iter_tensors(state))
        for path, tensor in live.items():
            if not torch.equal(got[path], tensor - steps_since_call):
                torn += 1
        missing = len(live) != len(got)
    except Exception as exc:
        return {"loadable": True, "consistent": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        del loaded
    return {"loadable": True, "consistent": torn == 0 and not missing, "torn_tensors": torn}


def _size(path: str) -> int | None:
    """Bytes of a file, or of the files under a directory (DCP); None if absent."""
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(path)
            for name in names
        )
    return os.path.getsize(path) if os.path.exists(path) else None


def clean_dir(directory: str) -> None:
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


def cold_rep(
    adapter: Adapter, state: dict[str, Any], tensors: list[torch.Tensor], timeout: float
) -> dict[str, Any]:
    """The first save: out of the warm medians, but it measures peak memory, the
    allocation of staging buffers and the *first save* (call -> durable, cold)."""
    filename = "snapshot_cold.pt"
    gc.collect()
    base_pss = tree_pss_bytes()
    base_rss = status_kib("VmRSS") * 1024
    hwm_reset = reset_hwm()
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
    hwm = status_kib("VmHWM") * 1024
    clean_dir(adapter.out_dir)
    return {
        "stall_s": t1 - t0,
        "durable_s": t_done - t0,
        "peak_extra_bytes": peak_pss - base_pss,
        "rss_hwm_delta_bytes": (hwm - base_rss) if hwm_reset else None,
        "pss_samples": sampler.samples,
        "writer_figures": figures,
    }


def warm_rep(
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
    """One timed save; see the module docstring for the figures."""
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
    rep["file_bytes"] = _size(adapter.path(filename))
    if check:
        rep["check"] = check_file(adapter, filename, state, steps_since_call=1)
    clean_dir(adapter.out_dir)
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
    make_adapter = writers()[writer]
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
        cold = cold_rep(adapter, state, tensors, timeout)
        allocations.append(adapter.allocations())
        checked_from = 0 if check_reps is None else max(0, reps - check_reps)
        rep_results = []
        for i in range(reps):
            check = adapter.check_consistency and i >= checked_from
            rep_results.append(
                warm_rep(
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
        "tensors": 1 if adapter.flat else len(tensors),
        "threads": threads,
        "loop_chunk_n": {"py": loop.n_py, "compute_matmuls": loop.n_mm},
        "cold": cold,
        "reps": rep_results,
        "allocations": allocations,
        "case_seconds": time.perf_counter() - started,
        "close_error": close_error,
    }
