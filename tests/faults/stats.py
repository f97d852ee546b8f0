"""The fault suite's counters (kill points tried/survived, fault kinds, inputs tried).

Tests add to the counters of the run (kept on the pytest config object, so that every
import of this module sees the same ones) through the ``fault_stats`` fixture. Under
pytest-xdist each
worker hands its counters to the controller (``workeroutput``), which merges them; the
root ``tests/conftest.py`` prints the merged table at the end of the run and, when
``SNAPWRITER_FAULTS_STATS`` names a file, writes it as JSON.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

Stats = dict[str, collections.Counter[str]]
WORKER_KEY = "snapwriter_fault_stats"
_ATTR = "_snapwriter_fault_stats"


def of(config: Any) -> Stats:
    """The counters of this pytest run."""
    stats: Stats | None = getattr(config, _ATTR, None)
    if stats is None:
        stats = collections.defaultdict(collections.Counter)
        setattr(config, _ATTR, stats)
    return stats


def dump(config: Any, indent: int | None = None) -> str:
    return json.dumps({k: dict(v) for k, v in of(config).items()}, indent=indent)


def merge(config: Any, text: str) -> None:
    stats = of(config)
    for key, counts in json.loads(text).items():
        stats[key].update(counts)


def report(terminalreporter: Any) -> None:
    counters = of(terminalreporter.config)
    if not counters:
        return
    tr = terminalreporter
    tr.section("snapwriter fault-injection counts")
    for key in sorted(counters):
        counts = ", ".join(f"{k}={v}" for k, v in sorted(counters[key].items()))
        tr.write_line(f"{key}: {counts}")
    out = os.environ.get("SNAPWRITER_FAULTS_STATS")
    if out:
        Path(out).write_text(dump(terminalreporter.config, indent=1))
