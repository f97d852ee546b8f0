"""Smoke test of benchmarks/bench.py: the smallest workload, one writer, in-process.

It keeps the benchmark from rotting (imports, adapters, report structure); it asserts no
timings, which are meaningless on a shared CI machine.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("snapwriter_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_smallest_workload_one_writer_report(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "results" / "bench.json"
    report = bench.main(
        [
            "--workloads=tiny",
            "--writers=snap.Standard",
            "--reps=1",
            "--idle-s=0.05",
            "--isolation=none",
            f"--tmp-dir={tmp_path / 'scratch'}",
            f"--out={out}",
        ]
    )

    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(report))  # what was written is the report
    assert out.with_suffix(".md").read_text().startswith("# snapwriter benchmark")
    meta = on_disk["meta"]
    for key in ("date", "command", "machine", "torch", "snapwriter", "reps", "wall_seconds"):
        assert key in meta
    assert "--quick" not in meta["command"] and "tiny" in meta["command"]
    assert on_disk["workloads"] == ["tiny"]
    assert on_disk["writers"] == ["snap.Standard"]

    case = on_disk["cases"]["snap.Standard|tiny"]
    assert "error" not in case
    assert len(case["reps"]) == 1
    rep = case["reps"][0]
    for key in ("stall_s", "step_extra_s", "loop_extra_s", "lost_s", "durable_s"):
        assert isinstance(rep[key], float)
    assert rep["lost_s"] >= rep["stall_s"] >= 0
    assert rep["durable_s"] >= rep["stall_s"]
    assert rep["check"] == {"loadable": True, "consistent": True, "torn_tensors": 0}
    assert rep["writer_figures"]["nbytes"] == rep["file_bytes"] > case["state_bytes"]
    cold = case["cold"]
    assert cold["peak_extra_bytes"] is not None and cold["durable_s"] > 0

    summary = case["summary"]
    for metric in bench.SUMMARY_METRICS:
        stat = summary[metric]
        if stat is not None:
            assert stat["min"] <= stat["median"] <= stat["max"]
    assert summary["consistency"] == "ok 1/1"
    assert summary["staging_reused"] is True  # functional, not a timing: no new buffers
    assert case["allocations"][0] == case["allocations"][1] > 0

    verdicts = {t["target"]: t["verdict"] for t in on_disk["targets"]}
    assert verdicts  # every target is listed; those needing other workloads are NOT RUN
    assert set(verdicts.values()) <= {"PASS", "FAIL", "NOT RUN"}
    assert verdicts["lost <= 0.1 s [50k-small]"] == "NOT RUN"
    assert not list((tmp_path / "scratch").glob("**/*.pt"))  # files cleaned up


def test_sweep_fit_is_linear_regression(bench: ModuleType) -> None:
    fit = bench._linear_fit([1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.5, 2.0])
    assert fit["slope"] == pytest.approx(0.5)
    assert fit["intercept"] == pytest.approx(0.0, abs=1e-12)
    assert fit["r2"] == pytest.approx(1.0)
