#!/usr/bin/env python
"""Benchmark snapwriter's writers against synchronous saves, ppe's writers and the hardware.

One command runs every writer side by side on the same workloads and prints one table::

    .venv/bin/python benchmarks/bench.py --quick      # ~6 min: 0.5 GiB, 5k and 50k tensors
    .venv/bin/python benchmarks/bench.py              # + 2 GiB and 50k-adam, every writer
    .venv/bin/python benchmarks/bench.py --compare    # ours beside ppe's and DCP's, ratios
    .venv/bin/python benchmarks/bench.py --sweep      # + the 64 MiB..2 GiB / 1k..50k sweeps

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

The code lives in the ``snapbench`` package next to this file (workloads, contenders,
metrics, isolation, report, targets, cli); this file is the entry point. See
benchmarks/README.md for the metrics, the targets and how to read the table.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the snapbench package

from snapbench.cli import main, parse_args, plan
from snapbench.contenders import ppe_available
from snapbench.report import SUMMARY_METRICS, linear_fit, summarize_case
from snapbench.targets import evaluate_targets, evaluate_writer_targets
from snapbench.workloads import WORKLOADS, build_state, optimizer_step, state_tensors

__all__ = [
    "SUMMARY_METRICS",
    "WORKLOADS",
    "build_state",
    "evaluate_targets",
    "evaluate_writer_targets",
    "linear_fit",
    "main",
    "optimizer_step",
    "parse_args",
    "plan",
    "ppe_available",
    "state_tensors",
    "summarize_case",
]

if __name__ == "__main__":
    main()
