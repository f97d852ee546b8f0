"""keep_last: only committed files of this writer's pattern, never the newest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter
from snapwriter._paths import temp_name_for
from snapwriter._retention import default_pattern
from tests.conftest import WriterFactory


def test_default_pattern() -> None:
    owns = default_pattern("snapshot_iter_1200.pt").fullmatch
    assert owns("snapshot_iter_7.pt") and owns("snapshot_iter_1200.pt")
    assert not owns("snapshot_iter_best.pt") and not owns("snapshot_iter_7.pt.bak")
    assert default_pattern("model.pt").fullmatch("model.pt")
    assert not default_pattern("model.pt").fullmatch("model2.pt")
    odd = default_pattern("ep3[x]_10").fullmatch
    assert odd("ep12[x]_3") and not odd("ep12x_3")


def test_keep_last_keeps_newest_n(make_writer: WriterFactory, tmp_path: Path) -> None:
    (tmp_path / "other.txt").write_text("not a snapshot")
    (tmp_path / "snapshot_iter_x.pt.bak").write_text("no match either")
    w = make_writer(out_dir=str(tmp_path), keep_last=3)
    for i in range(1, 11):
        w(f"snapshot_iter_{i}.pt", "", {"i": i})
    w.finalize()
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(
        ["other.txt", "snapshot_iter_x.pt.bak"] + [f"snapshot_iter_{i}.pt" for i in (8, 9, 10)]
    )
    assert torch.load(tmp_path / "snapshot_iter_10.pt") == {"i": 10}


def test_temporary_files_do_not_count_and_are_not_deleted_by_retention(tmp_path: Path) -> None:
    live_tmp = tmp_path / temp_name_for("snapshot_1.pt")  # a save in progress here
    live_tmp.write_bytes(b"in progress elsewhere in this process")
    with snapwriter.StandardWriter(out_dir=str(tmp_path), keep_last=2) as w:
        for i in range(4):
            w(f"snapshot_{i}.pt", "", i)
    assert sorted(os.listdir(tmp_path)) == sorted([live_tmp.name, "snapshot_2.pt", "snapshot_3.pt"])


def test_failed_save_deletes_nothing(tmp_path: Path) -> None:
    def boom(target: Any, f: Any) -> None:
        raise OSError(28, "No space left on device")

    with snapwriter.StandardWriter(out_dir=str(tmp_path), keep_last=2) as w:
        for i in range(2):
            w(f"snapshot_{i}.pt", "", i)
        w.finalize()
    w2 = snapwriter.StandardWriter(out_dir=str(tmp_path), keep_last=2, savefun=boom)
    with pytest.raises(snapwriter.SnapshotWriteError):
        w2("snapshot_2.pt", "", 2).result()
    w2.finalize()
    assert sorted(os.listdir(tmp_path)) == ["snapshot_0.pt", "snapshot_1.pt"]


def test_explicit_pattern_and_overwrite_of_same_name(tmp_path: Path) -> None:
    with snapwriter.StandardWriter(out_dir=str(tmp_path), keep_last=1, keep_pattern="*.ckpt") as w:
        w("a.ckpt", "", 1)
        w("b.ckpt", "", 2)
        w("b.ckpt", "", 3)  # the newest is the file just committed, even if older names tie
        w("keep.pt", "", 4)  # not matched by the pattern: ignored, deletes nothing
    assert sorted(os.listdir(tmp_path)) == ["b.ckpt", "keep.pt"]
    assert torch.load(tmp_path / "b.ckpt") == 3


def test_keep_last_with_append_is_skipped(tmp_path: Path) -> None:
    def line(t: Any, f: Any) -> None:
        f.write(b"x")

    with snapwriter.StandardWriter(out_dir=str(tmp_path), keep_last=1, savefun=line) as w:
        w("log_1.txt", "", 0, append=True)
        w("log_2.txt", "", 0, append=True)
    assert sorted(os.listdir(tmp_path)) == ["log_1.txt", "log_2.txt"]
