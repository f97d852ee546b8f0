"""Temporary names, clean-up of leftovers, discovery of the latest snapshot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import snapwriter
from snapwriter._paths import temp_name_for
from snapwriter._storage import LocalFileSystem, Storage


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


def test_temp_names() -> None:
    name = temp_name_for("snapshot_iter_10")
    assert name.startswith(".snapshot_iter_10") and snapwriter.is_temp_name(name)
    assert not name.endswith("10")  # prefix/suffix matchers (ppe) never take it
    assert not snapwriter.is_temp_name("snapshot_iter_10")
    assert not snapwriter.is_temp_name(".hidden.snapwriter-tmp-notapid-0123456789abcdef")


def test_initialize_removes_only_dead_leftovers(tmp_path: Path) -> None:
    dead = tmp_path / f".a.pt.snapwriter-tmp-{_dead_pid()}-{'0' * 16}"
    alive = tmp_path / temp_name_for("b.pt")  # a save in progress in this process
    lookalike = tmp_path / ".c.pt.snapwriter-tmp-"
    for p in (dead, alive, lookalike):
        p.write_bytes(b"x")
    w = snapwriter.StandardWriter(out_dir=str(tmp_path))
    w.initialize("")
    w.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, lookalike.name])
    removed = Storage(LocalFileSystem()).clean_temps(str(tmp_path), only_dead=False)
    assert removed == [str(alive)]


def test_find_latest_snapshot_ignores_temporaries(tmp_path: Path) -> None:
    assert snapwriter.find_latest_snapshot(str(tmp_path / "missing")) is None
    for i in range(3):
        torch.save(i, tmp_path / f"snap_{i}.pt")
        os.utime(tmp_path / f"snap_{i}.pt", (1000 + i, 1000 + i))
    newer_tmp = tmp_path / f".snap_9.pt.snapwriter-tmp-{os.getpid()}-{'2' * 16}"
    newer_tmp.write_bytes(b"partial")
    assert snapwriter.find_latest_snapshot(str(tmp_path)) == str(tmp_path / "snap_2.pt")
    entries = snapwriter.list_snapshots(str(tmp_path), "snap_*.pt")
    assert [e.temporary for e in entries] == [False, False, False, True]
    assert entries[0].name == "snap_0.pt" and entries[0].size > 0


def test_directory_fsync_and_replace_leave_only_final(tmp_path: Path) -> None:
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        for _ in range(3):
            w("same.pt", "", {"x": torch.ones(2)})
    assert os.listdir(tmp_path) == ["same.pt"]


def test_temp_owner_liveness_edge_cases(tmp_path: Path) -> None:
    from snapwriter._paths import temp_owner_alive

    mine = temp_name_for("x.pt")
    assert temp_owner_alive(mine)  # this process, this run: alive
    namesake = f".x.pt.snapwriter-tmp-{os.getpid()}-{'f' * 16}"  # same pid, earlier run
    assert snapwriter.is_temp_name(namesake) and not temp_owner_alive(namesake)
    assert not temp_owner_alive(f".x.pt.snapwriter-tmp-0-{'0' * 16}")
    huge = f".x.pt.snapwriter-tmp-99999999999999-{'0' * 16}"
    assert not temp_owner_alive(huge)
    (tmp_path / huge).write_bytes(b"x")
    (tmp_path / namesake).write_bytes(b"x")
    assert sorted(Storage(LocalFileSystem()).clean_temps(str(tmp_path))) == sorted(
        [str(tmp_path / huge), str(tmp_path / namesake)]
    )


def test_clean_temps_reports_only_what_it_removed(tmp_path: Path) -> None:
    class Stubborn(LocalFileSystem):
        def remove(self, file_path: str, recursive: bool = False) -> None:
            raise PermissionError(13, "Permission denied", file_path)

    leftover = tmp_path / f".a.pt.snapwriter-tmp-{_dead_pid()}-{'0' * 16}"
    leftover.write_bytes(b"x")
    assert Storage(Stubborn()).clean_temps(str(tmp_path)) == []
    assert leftover.exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_temp_of_a_killed_unreaped_process_is_removed(tmp_path: Path) -> None:
    """A saving process killed and not reaped yet (a zombie) owns nothing any more."""
    from snapwriter._paths import temp_owner_alive

    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    temp = f".snap.pt.snapwriter-tmp-{child.pid}-{'a' * 16}"
    (tmp_path / temp).write_bytes(b"partial")
    try:
        assert temp_owner_alive(temp)  # running: its file is left alone
        child.kill()
        # exited, not reaped: wait for the zombie state without reaping it
        info = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert info is not None and info.si_pid == child.pid
        assert not temp_owner_alive(temp)
        assert Storage(LocalFileSystem()).clean_temps(str(tmp_path)) == [str(tmp_path / temp)]
    finally:
        child.kill()
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
