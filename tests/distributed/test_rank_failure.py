"""kill -9 of one rank during its save: the previous set survives, no marker, clear errors.

The victim kills itself at a precise point of its save (fault injection in its own
process, see scenarios.arm_fault). ``SNAPWRITER_SET_TIMEOUT`` is 4 s here, so survivors
must raise ``IncompleteSetError`` naming the victim within ~4-7 s; the rank processes
have a hard limit of their own (ranks.run_ranks), so nothing can hang.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import snapwriter
import snapwriter._cli
from tests.distributed import scenarios
from tests.distributed.ranks import assert_ok, run_ranks

pytest.importorskip("pytorch_pfn_extras")

TIMEOUT_ENV = {"SNAPWRITER_SET_TIMEOUT": "4"}
#: (kill point, victim rank): rank 0 writes the marker, so "before_marker" kills it.
POINTS = [
    ("staging", 1),
    ("write", 1),
    ("before_commit", 1),
    ("after_commit", 1),
    ("before_marker", 0),
]


def _check_previous_set_survives(out: Path, world: int) -> None:
    assert (out / "snapshot_iter_1" / "complete").exists()
    assert not (out / "snapshot_iter_2" / "complete").exists()  # no marker, ever
    entries = {e.name: e for e in snapwriter.list_snapshots(str(out), include_sets=True)}
    assert entries["snapshot_iter_1"].complete
    assert "snapshot_iter_2" not in entries or not entries["snapshot_iter_2"].complete
    assert snapwriter.find_latest_snapshot(str(out)) == str(out / "snapshot_iter_1")
    for r in range(world):
        snapwriter.load_rank_shard(str(out / "snapshot_iter_1"), r)
    assert snapwriter._cli.main(["verify", "--quick", str(out / "snapshot_iter_2")]) in (1, 2)


@pytest.mark.parametrize(("point", "victim"), POINTS, ids=[p for p, _ in POINTS])
def test_ppe_sharded_kill_matrix(point: str, victim: int, tmp_path: Path) -> None:
    fault = {"rank": victim, "at": 2, "point": point}
    extra = {"writer": "ThreadWriter", "fault": fault, "iters": 3}
    outcomes = run_ranks(
        scenarios.train_ppe,
        2,
        tmp_path,
        extra=extra,
        env=TIMEOUT_ENV,
        rendezvous="agent",
        timeout=60,
    )
    assert outcomes[victim].killed, outcomes[victim]
    survivor = outcomes[1 - victim]
    assert survivor.exitcode == 0, survivor.error
    # the survivor's next snapshot call or its finalize() raised, naming the victim
    error = survivor.result["finalize_error"] or survivor.result["error"]
    assert isinstance(error, dict) and error["type"] == "IncompleteSetError", survivor.result
    assert "snapshot_iter_2" in error["message"] or "snapshot_iter_3" in error["message"]
    assert error["missing"] == [victim], error
    assert f"rank {victim}" in error["message"] or f"rank(s) {victim}" in error["message"]
    out = tmp_path / "snapshots"
    _check_previous_set_survives(out, 2)

    # a restarted job autoloads the previous complete set on every rank
    again = assert_ok(
        run_ranks(
            scenarios.train_ppe,
            2,
            tmp_path,
            extra={"writer": "ThreadWriter", "autoload": True, "iters": 1},
            rendezvous="agent",
        )
    )
    assert [r["loaded"] for r in again] == ["snapshot_iter_1/0", "snapshot_iter_1/1"]
    assert [r["start"] for r in again] == [1, 1]


@pytest.mark.parametrize(("point", "victim"), POINTS, ids=[p for p, _ in POINTS])
def test_native_kill_matrix(point: str, victim: int, tmp_path: Path) -> None:
    world = 2
    fault = {"rank": victim, "at": 2, "point": point}
    extra = {"fault": fault, "sets": 2, "timeout": 4.0}
    outcomes = run_ranks(
        scenarios.native_sets, world, tmp_path, extra=extra, rendezvous="agent", timeout=60
    )
    assert outcomes[victim].killed, outcomes[victim]
    for o in outcomes:
        if o.rank == victim:
            continue
        assert o.exitcode == 0, o.error
        first, second = o.result["results"]
        assert "path" in first  # the first set committed everywhere
        assert second["error"] == "IncompleteSetError", second
        assert second["missing"] == [victim], second
    out = tmp_path / "snapshots"
    assert (out / "step_1" / "complete").exists()
    assert not (out / "step_2" / "complete").exists()
    assert snapwriter.find_latest_snapshot(str(out)) == str(out / "step_1")
    assert os.listdir(out / "step_1")


def test_store_host_dies_before_the_marker(tmp_path: Path) -> None:
    """The rendezvous is hosted by rank 0 and rank 0 dies: rank 1 fails, not hangs."""
    fault = {"rank": 0, "at": 2, "point": "before_marker"}
    outcomes = run_ranks(
        scenarios.native_sets,
        2,
        tmp_path,
        rendezvous="tcp",
        timeout=60,
        extra={"fault": fault, "sets": 2, "timeout": 4.0},
    )
    assert outcomes[0].killed
    assert outcomes[1].exitcode == 0, outcomes[1].error
    second = outcomes[1].result["results"][1]
    assert second["error"] == "IncompleteSetError", second
    assert not (tmp_path / "snapshots" / "step_2" / "complete").exists()
