"""Many-rank snapshots: training time lost per snapshot and time to a complete set.

World size 2 on this machine (two forked rank processes on gloo, a FileStore
rendezvous), each rank holding a shard of ``--mib`` MiB (default 256), side by side in
one run:

* ``snapwriter``: :class:`snapwriter.RankSetWriter` over a ``ThreadWriter`` (staged
  call; the handle completes when every rank's file and the marker are durable);
* ``snapwriter+ppe``: ppe's own SHARDED extension (each rank's ``<dir>/<rank>``,
  barrier, saver's ``<dir>/complete``) with a snapwriter ``ThreadWriter``;
* ``ppe.ThreadWriter``: the same extension with ppe's own ``ThreadWriter``;
* ``dcp.async_save``: ``torch.distributed.checkpoint.async_save``.

*lost* is how long the training loop is held by a snapshot (the call(s), ppe's barrier
included); *complete* is from the start of the snapshot until the set is durable on
every rank (ppe's ThreadWriter: every rank's writer finalized, then a barrier). The
reference is one ``memcpy`` of a rank's shard (``copy_`` into a warm buffer). Medians over
``--snapshots`` snapshots after one warm-up, in each of ``--rounds`` rounds over the
contenders (the order alternates). Prints a table and writes JSON.

Run:  .venv/bin/python benchmarks/bench_ranks.py [--mib 256] [--snapshots 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "bench_ranks.json"
CONTENDERS = ("snapwriter", "snapwriter+ppe", "ppe.ThreadWriter", "dcp.async_save")
N_TENSORS = 8


def _shard(mib: int, rank: int) -> dict[str, torch.Tensor]:
    numel = max(1, mib * (1 << 20) // 4 // N_TENSORS)
    g = torch.Generator().manual_seed(rank)
    # Keys differ per rank: DCP would otherwise take same-named plain tensors for
    # replicated ones and write them once for all ranks (half the bytes).
    return {f"rank{rank}.layer{i}": torch.randn(numel, generator=g) for i in range(N_TENSORS)}


def _memcpy_seconds(state: dict[str, torch.Tensor], reps: int = 3) -> float:
    buffers = {k: torch.empty_like(v) for k, v in state.items()}
    for k, v in state.items():
        buffers[k].copy_(v)  # warm
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for k, v in state.items():
            buffers[k].copy_(v)
        best = min(best, time.perf_counter() - t0)
    return best


def _mutate(state: dict[str, torch.Tensor]) -> None:
    for v in state.values():
        v.add_(1.0)  # an optimizer step between snapshots


# -- contenders: each returns (lost seconds, complete seconds) for one snapshot ---------


def _run_snapwriter(out: Path, state: Any, n: int) -> list[tuple[float, float]]:
    import snapwriter

    sets = snapwriter.RankSetWriter(snapwriter.ThreadWriter(out_dir=str(out)))
    times = []
    for i in range(n):
        dist.barrier()
        t0 = time.perf_counter()
        handle = sets(f"step_{i}", state)
        lost = time.perf_counter() - t0
        _mutate(state)
        handle.result()
        times.append((lost, time.perf_counter() - t0))
    sets.finalize()
    return times


class _Target:
    """What ppe's extension snapshots: an object with ``state_dict()``."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state


def _ppe_sharded(writer: Any, out: Path, state: Any, i: int) -> float:
    """One snapshot through ppe's real SHARDED extension; returns the time it held."""
    from types import SimpleNamespace

    from pytorch_pfn_extras.training.extensions import SnapshotMode, snapshot

    ext = snapshot(
        writer=writer,
        target=_Target(state),
        filename="step_{.iteration}",
        snapshot_mode=SnapshotMode.SHARDED,
        saver_rank=0,
    )
    manager = SimpleNamespace(iteration=i, out=str(out), writer=writer)
    t0 = time.perf_counter()
    ext._make_snapshot(manager)  # <dir>/<rank>, barrier, saver's <dir>/complete
    return time.perf_counter() - t0


def _run_snapwriter_ppe(out: Path, state: Any, n: int) -> list[tuple[float, float]]:
    from concurrent.futures import wait

    import snapwriter

    writer = snapwriter.ThreadWriter(out_dir=str(out))
    times = []
    for i in range(n):
        dist.barrier()
        t0 = time.perf_counter()
        lost = _ppe_sharded(writer, out, state, i)
        _mutate(state)
        while writer.pending():  # benchmark-only peek: every save and set watch finished
            wait(list(writer._pending))
        dist.barrier()
        times.append((lost, time.perf_counter() - t0))
    writer.finalize()
    return times


def _run_ppe(out: Path, state: Any, n: int) -> list[tuple[float, float]]:
    from pytorch_pfn_extras import writing

    times = []
    for i in range(n):
        writer = writing.ThreadWriter(out_dir=str(out))  # finalize() is its only "done"
        dist.barrier()
        t0 = time.perf_counter()
        lost = _ppe_sharded(writer, out, state, i)
        _mutate(state)
        writer.finalize()
        dist.barrier()
        times.append((lost, time.perf_counter() - t0))
    return times


def _run_dcp(out: Path, state: Any, n: int) -> list[tuple[float, float]]:
    import torch.distributed.checkpoint as dcp

    times = []
    for i in range(n):
        dist.barrier()
        t0 = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=str(out / f"step_{i}"))
        lost = time.perf_counter() - t0
        _mutate(state)
        future.result()
        dist.barrier()
        times.append((lost, time.perf_counter() - t0))
    return times


RUNNERS: dict[str, Callable[[Path, Any, int], list[tuple[float, float]]]] = {
    "snapwriter": _run_snapwriter,
    "snapwriter+ppe": _run_snapwriter_ppe,
    "ppe.ThreadWriter": _run_ppe,
    "dcp.async_save": _run_dcp,
}


# -- ranks ----------------------------------------------------------------------------


def _rank_main(rank: int, world: int, store_path: str, root: str, args: dict[str, Any]) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)  # what torchrun does (OMP_NUM_THREADS=1) with several ranks
    result: dict[str, Any] = {}
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        state = _shard(args["mib"], rank)
        result["memcpy_s"] = _memcpy_seconds(state)
        for name in args["contenders"]:
            out = Path(root) / name.replace("+", "_").replace(".", "_")
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            times = RUNNERS[name](out, state, args["snapshots"] + 1)[1:]  # one warm-up
            result[name] = times
            dist.barrier()
            if rank == 0:
                shutil.rmtree(out, ignore_errors=True)  # keep the disk (and cache) small
            dist.barrier()
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    Path(root, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0 if "error" not in result else 1)


def _orders(contenders: Sequence[str], rounds: int) -> list[list[str]]:
    """The contenders' order in each round: forward, then backward, and so on, so that
    the disk's drift over a run does not favour one place in the order."""
    forward = list(contenders)
    return [forward if i % 2 == 0 else forward[::-1] for i in range(rounds)]


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _run_world(args: argparse.Namespace, name: str) -> list[dict[str, Any]]:
    """Run contender ``name`` on ``args.world`` fresh rank processes; their results."""
    root = Path(tempfile.mkdtemp(prefix="bench_ranks-", dir=args.dir))
    try:
        ctx = multiprocessing.get_context("fork")
        payload = {"mib": args.mib, "snapshots": args.snapshots, "contenders": [name]}
        store_path = str(root / "store")
        procs = [
            ctx.Process(target=_rank_main, args=(r, args.world, store_path, str(root), payload))
            for r in range(args.world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(args.world)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        raise RuntimeError(f"a rank failed ({name}):\n" + "\n".join(errors))
    return ranks


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB of state per rank")
    parser.add_argument("--snapshots", type=int, default=3, help="timed snapshots each")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds over the contenders (order alternates)"
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--dir", type=Path, default=None, help="where the snapshots go")
    args = parser.parse_args(argv)
    contenders = [c for c in args.contenders.split(",") if c]
    for c in contenders:
        if c not in RUNNERS:
            parser.error(f"unknown contender {c!r}; choose from {', '.join(CONTENDERS)}")
    # Each contender in fresh rank processes, the order alternating between rounds: run
    # one after another in the same processes, the later ones met a different disk and
    # page cache (complete times halved for whoever ran after the others).
    ranks: list[dict[str, Any]] = [{} for _ in range(args.world)]
    # Whoever ran first in a run was measured up to 3x slower (the disk settling after
    # whatever ran before the benchmark): one pass that is not counted.
    _run_world(args, contenders[0])
    for order in _orders(contenders, args.rounds):
        for name in order:
            for r, got in enumerate(_run_world(args, name)):
                ranks[r].setdefault(name, []).extend(got[name])
                ranks[r].setdefault("memcpy", []).append(got["memcpy_s"])
    memcpy = max(min(r["memcpy"]) for r in ranks)
    rows = {}
    for name in contenders:
        # per snapshot: the worst rank (the set is as late as its slowest member)
        samples = args.snapshots * args.rounds
        lost = [max(r[name][i][0] for r in ranks) for i in range(samples)]
        done = [max(r[name][i][1] for r in ranks) for i in range(samples)]
        rows[name] = {
            "lost_s": lost,
            "complete_s": done,
            "lost_median_s": _median(lost),
            "complete_median_s": _median(done),
            "lost_vs_memcpy": _median(lost) / memcpy,
        }
    dcp = rows.get("dcp.async_save")
    report = {
        "benchmark": "bench_ranks",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "world_size": args.world,
        "mib_per_rank": args.mib,
        "snapshots": args.snapshots,
        "rounds": args.rounds,
        "memcpy_s": memcpy,
        "contenders": rows,
        "targets": {
            "lost_le_1.3x_memcpy": rows["snapwriter"]["lost_vs_memcpy"] <= 1.3
            if "snapwriter" in rows
            else None,
            "complete_le_dcp": rows["snapwriter"]["complete_median_s"] <= dcp["complete_median_s"]
            if "snapwriter" in rows and dcp is not None
            else None,
        },
    }
    print(
        f"world size {args.world}, {args.mib} MiB per rank, median of "
        f"{args.snapshots} x {args.rounds} rounds; "
        f"one memcpy of a shard: {memcpy * 1e3:.1f} ms"
    )
    print(f"{'contender':<18} {'lost ms':>9} {'x memcpy':>9} {'complete ms':>12}")
    for name, row in rows.items():
        print(
            f"{name:<18} {row['lost_median_s'] * 1e3:>9.1f} {row['lost_vs_memcpy']:>9.2f} "
            f"{row['complete_median_s'] * 1e3:>12.1f}"
        )
    print(f"targets: {report['targets']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
