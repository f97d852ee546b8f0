"""Smoke tests of benchmarks/bench.py (and its snapbench package), in-process.

They keep the benchmark from rotting (imports, adapters, workloads, report structure,
the --compare table, the plan of default runs, the verdict logic); they assert no
timings, which are meaningless on a shared CI machine.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

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
    assert summary["first_s"] == cold["durable_s"]
    writer_verdicts = {t["target"]: t["verdict"] for t in on_disk["writer_targets"]}
    assert set(writer_verdicts.values()) == {"NOT RUN"}  # none of their workloads ran
    assert not list((tmp_path / "scratch").glob("**/*.pt"))  # files cleaned up


def test_sweep_fit_is_linear_regression(bench: ModuleType) -> None:
    fit = bench.linear_fit([1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.5, 2.0])
    assert fit["slope"] == pytest.approx(0.5)
    assert fit["intercept"] == pytest.approx(0.0, abs=1e-12)
    assert fit["r2"] == pytest.approx(1.0)


def test_compare_on_tiny_has_ratio_table(bench: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.checkpoint", reason="DCP needs torch.distributed")
    writers = ["memcpy", "torch.save+fsync", "snap.Standard", "dcp.async_save"]
    out = tmp_path / "bench.json"
    report = bench.main(
        [
            "--compare",
            "--workloads=tiny",
            f"--writers={','.join(writers)}",
            "--reps=1",
            "--idle-s=0.02",
            "--isolation=none",
            f"--tmp-dir={tmp_path / 'scratch'}",
            f"--out={out}",
        ]
    )
    assert report["meta"]["compare"] is True
    for writer in writers:
        case = report["cases"][f"{writer}|tiny"]
        assert "error" not in case, case.get("error")
        assert case["summary"]["first_s"] > 0
    # DCP writes a directory; it is read back through DCP's own torch.save converter.
    assert report["cases"]["dcp.async_save|tiny"]["summary"]["consistency"] == "ok 1/1"
    markdown = out.with_suffix(".md").read_text()
    table = markdown.split("## Comparison")[1].split("## Targets")[0]
    assert "| lost / memcpy |" in table and "| durable / torch.save+fsync |" in table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert rows["memcpy"].split(" | ")[2] == "1.00x"
    assert rows["torch.save+fsync"].split(" | ")[4] == "1.00x"
    assert "dcp.async_save" in rows and "snap.Standard" in rows


def test_the_floors_run_and_write_the_states_bytes(bench: ModuleType, tmp_path: Path) -> None:
    """copy(tensors) copies every tensor; floor.bg-write's other process writes the flat
    state's bytes durably into the named file (checked here byte for byte)."""
    from snapbench.contenders import writers
    from snapbench.workloads import WORKLOADS, build_state, state_tensors

    out = tmp_path / "bench.json"
    report = bench.main(
        [
            "--workloads=tiny",
            "--writers=memcpy,copy(tensors),floor.bg-write",
            "--reps=2",
            "--idle-s=0.02",
            "--isolation=none",
            f"--tmp-dir={tmp_path / 'scratch'}",
            f"--out={out}",
        ]
    )
    for writer in ("copy(tensors)", "floor.bg-write"):
        case = report["cases"][f"{writer}|tiny"]
        assert "error" not in case, case.get("error")
        assert case["summary"]["lost_s"]["median"] > 0
    state = build_state(WORKLOADS["tiny"], flat=True)
    floor = writers()["floor.bg-write"](str(tmp_path))
    floor.setup(state)
    try:
        floor.call("floor.bin", state)
        floor.wait()
        assert floor.done()
        flat = state_tensors(state)[0]
        assert (tmp_path / "floor.bin").read_bytes() == flat.numpy().tobytes()
        copy = writers()["copy(tensors)"](str(tmp_path))
        copy.setup(state)
        flat.add_(1)
        copy.call("unused", state)
        assert all(torch.equal(a, b) for a, b in zip(copy.dsts, copy.srcs, strict=True))
    finally:
        floor.close()


def test_plans_include_ppe_process_everywhere(bench: ModuleType) -> None:
    for argv in ([], ["--quick"], ["--compare"], ["--compare", "--quick"]):
        workloads, writers, cases = bench.plan(bench.parse_args(argv))
        assert {"5k", "50k-small"} <= set(workloads), argv
        if "--quick" not in argv:
            assert {"2GiB-400", "50k-adam"} <= set(workloads), argv
        if bench.ppe_available():
            assert all(("ppe.Process", wl) in cases for wl in workloads), argv
    _, writers, _ = bench.plan(bench.parse_args(["--compare"]))
    assert {"snap.Process", "snap.ProcessQueue", "ppe.Thread", "dcp.async_save"} <= set(writers)


def test_new_workloads_shape(bench: ModuleType) -> None:
    mixed = bench.WORKLOADS["5k"]
    state = bench.build_state(mixed)
    tensors = bench.state_tensors(state)
    assert len(tensors) == mixed.count == 5000
    assert sum(t.numel() * 4 for t in tensors) == mixed.state_bytes
    assert 63 * 2**20 < mixed.state_bytes < 65 * 2**20
    assert len({t.numel() for t in tensors}) == 3  # mixed sizes

    adam = bench.WORKLOADS["50k-adam"]
    assert adam.count == 4 * 16_667 and 48 * 2**20 < adam.state_bytes < 50 * 2**20
    # The same builder on 100 parameters (16,667 take seconds: Adam's first step).
    small = dataclasses.replace(adam, name="adam-100", count=400)
    state = bench.build_state(small)
    assert set(state) == {"model", "optimizer", "iteration"}
    assert len(state["model"]) == 100
    per_param = state["optimizer"]["state"]
    assert len(per_param) == 100 and set(per_param[0]) == {"step", "exp_avg", "exp_avg_sq"}
    tensors = bench.state_tensors(state)
    assert len(tensors) == small.count
    assert sum(t.numel() * 4 for t in tensors) == small.state_bytes
    assert all(torch.equal(t, t.round()) for t in tensors)  # the exact check holds
    # the state dicts hold the live tensors: the optimizer step reaches what is saved
    before = per_param[0]["exp_avg"].clone()
    bench.optimizer_step(tensors)
    assert torch.equal(per_param[0]["exp_avg"], before + 1)


def _case(**summary: Any) -> dict[str, Any]:
    return {"summary": {k: {"median": v} if k.endswith("_s") else v for k, v in summary.items()}}


def test_writer_targets_verdicts(bench: ModuleType) -> None:
    fast = {"lost_s": 0.05, "durable_s": 1.0, "slowdown_py": 1.01, "slowdown_compute": 1.02}
    cases = {
        "memcpy|0.5GiB-190": _case(lost_s=0.1),
        "torch.save+fsync|0.5GiB-190": _case(durable_s=2.0),
        "snap.Standard|0.5GiB-190": _case(**fast, peak_extra_ratio=1.0),
        "snap.Process(fork)|0.5GiB-190": _case(**{**fast, "lost_s": 0.2}, peak_extra_ratio=1.0),
        "snap.ThreadQueue|0.5GiB-190": {"error": "boom"},
        "torch.save|50k-small": _case(durable_s=4.0),
        "ppe.Process|50k-small": _case(lost_s=0.5),
        "snap.Standard|50k-small": _case(**{**fast, "lost_s": 0.08}),
        "snap.Process(fork)|50k-small": _case(**{**fast, "lost_s": 0.03}),
        # the fork-per-save option counts among the best on many tensors only
        "snap.Process(cow)|50k-small": _case(**{**fast, "lost_s": 0.02}),
        "snap.Process(cow)|0.5GiB-190": _case(**{**fast, "lost_s": 0.9}),
        "memcpy|5k": _case(lost_s=0.01),
        "snap.Standard|5k": _case(lost_s=0.03, first_s=0.5),
    }
    report = {"cases": cases}
    got = {t["target"]: t for t in bench.evaluate_writer_targets(report)}
    every = "every snapwriter writer: "
    lost = got[every + "lost <= 1.3x memcpy [0.5GiB-190]"]
    assert lost["verdict"] == "FAIL"  # Process(fork) 2.0x, ThreadQueue failed
    assert "snap.Process(fork) 0.200s = 2.00x memcpy" in lost["detail"]
    assert "snap.ThreadQueue ERROR" in lost["detail"]
    assert "not run: snap.Process, snap.Process(auto), snap.ProcessQueue" in lost["detail"]
    assert got[every + "peak extra memory <= 1.1x state [0.5GiB-190]"]["verdict"] == "FAIL"
    best = got["best snapwriter writer: lost <= 0.1 s and < ppe.Process [50k-small]"]
    assert best["verdict"] == "PASS" and best["detail"].startswith("snap.Process(cow)")
    assert "snap.Process(cow)" not in lost["detail"]
    assert (
        got["best snapwriter writer: durable done <= 0.5x sync torch.save [50k-small]"]["verdict"]
        == "PASS"
    )
    assert (
        got["best snapwriter writer: lost <= 0.1 s and < ppe.Process [50k-adam]"]["verdict"]
        == "NOT RUN"
    )
    assert got[every + "lost <= 1.3x memcpy + 20 ms [5k]"]["verdict"] == "PASS"
    assert got[every + "first save <= 2 s [5k]"]["verdict"] == "PASS"
