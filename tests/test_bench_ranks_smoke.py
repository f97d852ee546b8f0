"""Smoke test of benchmarks/bench_ranks.py: tiny shards, every contender, no timings asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_ranks.py"
pytest.importorskip("pytorch_pfn_extras")


def test_tiny_run_reports_every_contender(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("snapwriter_bench_ranks", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        out = tmp_path / "bench_ranks.json"
        report = module.main(
            ["--mib=1", "--snapshots=1", "--rounds=1", f"--out={out}", f"--dir={tmp_path}"]
        )
    finally:
        sys.modules.pop(spec.name, None)
    assert set(report["contenders"]) == set(module.CONTENDERS)
    for row in report["contenders"].values():
        assert len(row["lost_s"]) == 1 and len(row["complete_s"]) == 1
    assert json.loads(out.read_text())["world_size"] == 2
