"""The native API (RankSetWriter), discovery and the CLI on sets, DTensor, shared dirs."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter
import snapwriter._cli as cli
from snapwriter import LocalFileSystem
from snapwriter._manifest import file_digest
from tests.distributed import scenarios
from tests.distributed.ranks import RankContext, assert_ok, run_ranks


@pytest.mark.parametrize(
    ("world", "writer"),
    [(2, "ThreadWriter"), (2, "ProcessWriter-fork"), (2, "SimpleWriter"), (4, "QueueWriter")],
)
def test_every_rank_handle_completes_with_the_manifest(
    world: int, writer: str, tmp_path: Path
) -> None:
    results = assert_ok(
        run_ranks(scenarios.native_sets, world, tmp_path, extra={"writer": writer, "sets": 2})
    )
    out = tmp_path / "snapshots"
    for r in results:
        assert r["finalize_error"] is None
        assert [x["path"] for x in r["results"]] == [str(out / "step_1"), str(out / "step_2")]
    # every rank got the same manifest: each member's real size and digest
    assert all(r["results"] == results[0]["results"] for r in results)
    for step, entry in enumerate(results[0]["results"], start=1):
        for rank, (size, digest) in enumerate(zip(entry["members"], entry["digest"], strict=True)):
            member = out / f"step_{step}" / str(rank)
            assert member.stat().st_size == size
            assert digest == file_digest(LocalFileSystem(), str(member))[1]
            assert digest.startswith("zip-directory:")
            with zipfile.ZipFile(member) as archive:  # the CRC-32s it covers are true
                assert archive.testzip() is None
            shard = snapwriter.load_rank_shard(str(out / f"step_{step}"), rank)
            # staged at the call: the add_(1) after it is not in the file
            assert torch.equal(shard["w"], torch.full((64,), float(rank * 1000 + step)))
    assert snapwriter.find_latest_snapshot(str(out)) == str(out / "step_2")


def test_keep_last_deletes_whole_sets(tmp_path: Path) -> None:
    assert_ok(run_ranks(scenarios.native_sets, 2, tmp_path, extra={"sets": 4, "keep_last": 2}))
    out = tmp_path / "snapshots"
    assert sorted(os.listdir(out)) == ["step_3", "step_4"]


def _make_sets(tmp_path: Path) -> Path:
    assert_ok(run_ranks(scenarios.native_sets, 2, tmp_path, extra={"sets": 2}))
    return tmp_path / "snapshots"


def test_cli_ls_verify_and_latest_understand_sets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _make_sets(tmp_path)
    assert cli.main(["ls", str(out)]) == 0
    listing = capsys.readouterr().out
    assert "step_1" in listing and "complete set" in listing
    assert cli.main(["verify", str(out)]) == 0
    assert "2 checked: 2 OK" in capsys.readouterr().out

    # a damaged member (same size, one byte flipped): the checksum catches it
    member = out / "step_2" / "1"
    data = bytearray(member.read_bytes())
    data[len(data) // 2] ^= 0xFF
    member.write_bytes(bytes(data))
    assert cli.main(["verify", "--quick", str(out)]) == 1
    assert "Bad CRC-32" in capsys.readouterr().out  # the record's own checksum
    # a missing member: the set is incomplete everywhere
    member.unlink()
    assert cli.main(["verify", str(out / "step_2")]) == 1
    assert "member 1 (rank 1) missing" in capsys.readouterr().out
    assert cli.main(["ls", str(out)]) == 0
    assert "incomplete set" in capsys.readouterr().out
    assert snapwriter.find_latest_snapshot(str(out)) == str(out / "step_1")
    assert cli.main(["latest", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "step_1")


def test_set_without_marker_is_hidden_from_ppe_listing(tmp_path: Path) -> None:
    out = _make_sets(tmp_path)
    (out / "step_2" / "complete").unlink()
    names = list(snapwriter.LocalFileSystem().list(str(out), recursive=True))
    assert "step_1/0" in names and "step_2" in names
    assert not any(n.startswith("step_2/") for n in names)  # ppe's autoload won't pick it
    assert cli.main(["verify", str(out / "step_2")]) == 1


def _dtensor_roundtrip(ctx: RankContext) -> list[float]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (ctx.world_size,))
    full = torch.arange(16, dtype=torch.float32).reshape(8, 2)
    dt = distribute_tensor(full, mesh, [Shard(0)])
    sets = snapwriter.RankSetWriter(snapwriter.ThreadWriter(out_dir=str(ctx.out)))
    sets("dt_1", {"w": dt}).result(60)
    sets.finalize()
    loaded = snapwriter.load_rank_shard(str(ctx.out / "dt_1"), ctx.rank)["w"]
    assert type(loaded).__name__ == "DTensor"
    assert loaded.placements == dt.placements
    assert torch.equal(loaded.to_local(), dt.to_local())
    back = loaded.full_tensor()  # a collective on the mesh: the shards fit back together
    assert torch.equal(back, full)
    return [float(x) for x in loaded.to_local().flatten()]


def test_dtensor_on_a_cpu_mesh_round_trips(tmp_path: Path) -> None:
    results = assert_ok(run_ranks(_dtensor_roundtrip, 2, tmp_path))
    assert results[0] + results[1] == [float(x) for x in range(16)]


def _shared_dir(ctx: RankContext) -> dict[str, Any]:
    """Rank 1's member is in flight while rank 0 runs every clean-up there is."""
    store = ctx.store
    out = ctx.out

    def held(obj: object, f: Any) -> None:
        store.set("in_flight", "1")
        store.wait(["cleaned"])
        torch.save(obj, f)

    writer = snapwriter.ThreadWriter(
        savefun=held if ctx.rank == 1 else torch.save, out_dir=str(out)
    )
    sets = snapwriter.RankSetWriter(writer)
    handle = sets("step_1", {"rank": torch.tensor([ctx.rank])})
    seen: dict[str, Any] = {}
    if ctx.rank == 0:
        store.wait(["in_flight"])
        # rank 1's member, held in its savefun (rank 0's own may be in flight too)
        temps = [
            n
            for n in os.listdir(out / "step_1")
            if snapwriter.is_temp_name(n) and n.startswith(".1.")
        ]
        # another "host": a fresh writer initialising the shared directory, and the CLI
        snapwriter.ThreadWriter(out_dir=str(out)).initialize(str(out))
        snapwriter.StandardWriter(out_dir=str(out / "step_1")).finalize()
        cli.main(["clean", str(out)])
        seen["temps"] = temps
        seen["temps_after"] = [n for n in os.listdir(out / "step_1") if n in temps]
        store.set("cleaned", "1")
    handle.result(60)
    sets.finalize()
    return seen


def test_shared_directory_cleanup_spares_in_flight_members(tmp_path: Path) -> None:
    results = assert_ok(run_ranks(_shared_dir, 2, tmp_path))
    assert len(results[0]["temps"]) == 1
    assert results[0]["temps_after"] == results[0]["temps"]
    assert (tmp_path / "snapshots" / "step_1" / "complete").exists()


def test_bad_arguments() -> None:
    with pytest.raises(snapwriter.InvalidSnapshotArgument):
        snapwriter.RankSetWriter(rank=0, world_size=0)
    with pytest.raises(snapwriter.InvalidSnapshotArgument):
        snapwriter.RankSetWriter(snapwriter.ThreadWriter(keep_last=2), rank=0, world_size=2)
