"""The command line: which cases run, how, and where the report goes."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import REPO_ROOT
from .contenders import (
    ALL_WRITERS,
    COMPARE_WRITERS,
    QUICK_SMALL_WRITERS,
    QUICK_WRITERS,
    SWEEP_WRITERS,
    WRITER_NAMES,
    dcp_available,
    ppe_available,
    writers,
)
from .isolation import ENTRY_POINT, run_forked, run_inprocess, run_subprocess, worker_main
from .meta import copy_threads, crc_implementation, fs_type, git_commit, machine_info, version
from .report import render_markdown, summarize_case, sweep_fits
from .targets import evaluate_targets, evaluate_writer_targets
from .workloads import MANY_TENSORS, WORKLOADS

DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "bench.json")
QUICK_WORKLOADS = ("0.5GiB-190", "5k", "50k-small")
DEFAULT_WORKLOADS = ("0.5GiB-190", "2GiB-400", "5k", "50k-small", "50k-adam")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark snapwriter against torch.save, ppe's writers and memcpy/os.write.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"workloads {','.join(QUICK_WORKLOADS)}, core writers only (several minutes)",
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
        "--compare",
        action="store_true",
        help="our writers beside ppe's and DCP's async_save, one ratio table per workload "
        f"(writers: {','.join(COMPARE_WRITERS)}, unless --writers)",
    )
    p.add_argument(
        "--workloads",
        help=f"comma-separated workloads (overrides the above): {','.join(WORKLOADS)}",
    )
    p.add_argument("--writers", help=f"comma-separated writers: {','.join(ALL_WRITERS)}")
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


def _split(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def plan(args: argparse.Namespace) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """(workloads, writers, cases as (writer, workload) in run order)."""
    if args.workloads:
        workloads = _split(args.workloads)
    else:
        workloads = list(QUICK_WORKLOADS if args.quick else DEFAULT_WORKLOADS)
        if args.big and "2GiB-400" not in workloads:
            workloads.insert(1, "2GiB-400")
    if args.writers:
        names = _split(args.writers)
    elif args.compare:
        names = list(COMPARE_WRITERS)
    else:
        names = list(QUICK_WRITERS if args.quick else WRITER_NAMES)
    # (each probe imports its library: only asked when one of its writers is wanted)
    if any(w.startswith("ppe.") for w in names) and not ppe_available():
        names = [w for w in names if not w.startswith("ppe.")]
    if any(w.startswith("dcp.") for w in names) and not dcp_available():
        names = [w for w in names if not w.startswith("dcp.")]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for w in names:
        if w not in ALL_WRITERS:
            raise SystemExit(f"unknown writer {w!r}; choose from {', '.join(ALL_WRITERS)}")
    trimmed = args.quick and not args.writers and not args.compare
    cases = [
        (w, wl)
        for wl in workloads
        for w in names
        if not (trimmed and wl in MANY_TENSORS) or w in QUICK_SMALL_WRITERS
    ]
    if args.sweep:
        sweep_writers = _split(args.sweep_writers)
        sweep = [wl.name for wl in WORKLOADS.values() if wl.group.startswith("sweep")]
        for name in [*sweep, "50k-small"]:  # 50k-small closes the count sweep
            if name not in workloads:
                workloads.append(name)
            cases += [(w, name) for w in sweep_writers if (w, name) not in cases]
        names += [w for w in sweep_writers if w not in names]
    return workloads, names, cases


def _preload(names: Sequence[str]) -> None:
    """Import every writer's library once, before forking the cases."""
    writers()
    if any(w.startswith("ppe.") for w in names):
        import pytorch_pfn_extras.writing  # noqa: F401
    if any(w.startswith("dcp.") for w in names):
        import torch.distributed.checkpoint  # noqa: F401


def _command(argv: Sequence[str] | None) -> str:
    exe = sys.executable
    return shlex.join(
        [
            os.path.relpath(exe, REPO_ROOT) if exe.startswith(REPO_ROOT) else exe,
            os.path.relpath(ENTRY_POINT, REPO_ROOT),
            *(argv if argv is not None else sys.argv[1:]),
        ]
    )


def _run(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if args.isolation == "none":
        return run_inprocess(spec)
    if args.isolation == "fork":
        return run_forked(spec, args.case_timeout)
    return run_subprocess(spec, args.case_timeout)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; return the report (also written as JSON and markdown)."""
    args = parse_args(argv)
    if args.worker:
        raise SystemExit(worker_main(args.worker))
    started = time.perf_counter()
    workloads, names, cases = plan(args)
    if args.isolation == "fork":
        _preload(names)
    check_reps = args.check_reps if args.check_reps is not None else (1 if args.quick else None)
    tmp_root = args.tmp_dir or os.path.join(REPO_ROOT, "benchmarks", "results", "tmp")
    os.makedirs(tmp_root, exist_ok=True)
    tmp_fs = fs_type(tmp_root)
    if tmp_fs in ("tmpfs", "ramfs"):
        print(f"warning: {tmp_root} is on {tmp_fs}: fsync is free there", file=sys.stderr)
    report: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": _command(argv),
            "machine": machine_info(),
            "torch": torch.__version__,
            "ppe": version("pytorch-pfn-extras"),
            "snapwriter": f"{version('snapwriter')} ({git_commit()})",
            "crc32": crc_implementation(),
            "copy_threads": copy_threads(),
            "reps": args.reps,
            "check_reps": check_reps,
            "threads": args.threads,
            "idle_s": args.idle_s,
            "tmp_dir": tmp_root,
            "tmp_fs": tmp_fs,
            "isolation": args.isolation,
            "compare": args.compare,
        },
        "workloads": workloads,
        "writers": names,
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
        case = _run(spec, args)
        if "error" not in case:
            case["summary"] = summarize_case(case)
            s = case["summary"]
            print(
                f"lost {s['lost_s']['median']:.3f}s durable {s['durable_s']['median']:.3f}s "
                f"first {s['first_s']:.3f}s ({time.perf_counter() - t:.0f}s)",
                file=sys.stderr,
            )
        else:
            print(f"ERROR {case['error']}", file=sys.stderr)
        report["cases"][f"{writer}|{workload}"] = case
    with contextlib.suppress(OSError):
        os.rmdir(tmp_root)  # only if empty: never remove files we did not create
    report["sweep_fits"] = sweep_fits(report)
    report["targets"] = evaluate_targets(report)
    report["writer_targets"] = evaluate_writer_targets(report)
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
