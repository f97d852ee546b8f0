"""Rank sets in one process: two ranks' writers sharing one in-memory store.

The coordination only needs a store, a rank and a world size, so its logic (every
member reported before the marker, failures reported at once, timeouts naming the
missing ranks, generations of a re-saved set, retention of whole sets) is tested here
cheaply; tests/distributed runs it across real processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import snapwriter
import snapwriter._cli as cli
from snapwriter import _coordination, _manifest


def _pair(out: Path, store: Any = None, **kw: Any) -> list[snapwriter.RankSetWriter]:
    store = store if store is not None else dist.HashStore()
    return [
        snapwriter.RankSetWriter(
            snapwriter.ThreadWriter(out_dir=str(out)), store=store, rank=r, world_size=2, **kw
        )
        for r in (0, 1)
    ]


def _finalize(*writers: snapwriter.RankSetWriter) -> None:
    for w in writers:
        with contextlib.suppress(snapwriter.SnapshotError):  # the test asserted on it
            w.finalize()


def test_set_commits_when_both_ranks_saved(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    ha = a("step_1", {"x": torch.zeros(3)})
    assert not (tmp_path / "step_1" / "complete").exists() or ha.done()
    hb = b("step_1", {"x": torch.ones(3)})
    ra, rb = ha.result(30), hb.result(30)
    assert ra.manifest == rb.manifest and ra.path == str(tmp_path / "step_1")
    assert [m.rank for m in ra.manifest.members] == [0, 1]
    assert ra.member.path == str(tmp_path / "step_1" / "0")
    names = sorted(os.listdir(tmp_path / "step_1"))
    assert names == [".snapwriter-set", "0", "1", "complete", "snapwriter-set.json"]
    assert torch.load(tmp_path / "step_1" / "complete", weights_only=True) == {}
    status = _manifest.set_status(snapwriter.LocalFileSystem(), str(tmp_path / "step_1"))
    assert status is not None and status.intact and status.members == ("0", "1")
    _finalize(a, b)


def test_missing_rank_times_out_naming_it(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, timeout=0.5)
    start = time.monotonic()
    handle = a("step_1", {"x": torch.zeros(3)})
    with pytest.raises(snapwriter.IncompleteSetError) as info:
        handle.result(30)
    assert time.monotonic() - start < 10
    assert info.value.missing_ranks == (1,)
    assert "rank(s) 1 did not commit" in str(info.value)
    assert not (tmp_path / "step_1" / "complete").exists()
    assert snapwriter.find_latest_snapshot(str(tmp_path)) is None
    a.finalize()  # the handle reported it: finalize() does not raise it a second time
    _finalize(b)


def test_unobserved_set_failure_raises_from_finalize(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, timeout=0.3)
    a("step_1", {"x": torch.zeros(3)})
    with pytest.raises(snapwriter.IncompleteSetError, match="rank"):
        a.finalize()
    _finalize(b)


def test_failed_member_fails_the_set_at_once(tmp_path: Path) -> None:
    store = dist.HashStore()

    def broken(obj: object, f: object) -> None:
        raise OSError(28, "No space left on device")

    a = snapwriter.RankSetWriter(
        snapwriter.ThreadWriter(out_dir=str(tmp_path)),
        store=store,
        rank=0,
        world_size=2,
        timeout=60,
    )
    b = snapwriter.RankSetWriter(
        snapwriter.ThreadWriter(savefun=broken, out_dir=str(tmp_path)),
        store=store,
        rank=1,
        world_size=2,
        timeout=60,
    )
    start = time.monotonic()
    ha = a("step_1", {"x": torch.zeros(3)})
    hb = b("step_1", {"x": torch.zeros(3)})
    with pytest.raises(snapwriter.SnapshotWriteError) as own:
        hb.result(30)
    assert isinstance(own.value.__cause__, OSError)
    with pytest.raises(snapwriter.IncompleteSetError) as info:
        ha.result(30)
    assert time.monotonic() - start < 30  # long before the 60 s timeout
    assert info.value.failed_ranks == (1,)
    assert "No space left" in str(info.value)
    assert not (tmp_path / "step_1" / "complete").exists()
    _finalize(a, b)


def test_resaving_a_set_pairs_calls_by_generation(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    for value in (1.0, 2.0):
        ha = a("step_1", {"x": torch.full((2,), value)})
        hb = b("step_1", {"x": torch.full((2,), value)})
        ha.result(30), hb.result(30)
    assert torch.equal(
        snapwriter.load_rank_shard(str(tmp_path / "step_1"), 1)["x"], torch.full((2,), 2.0)
    )
    _finalize(a, b)


def test_keep_last_keeps_whole_newest_sets(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, keep_last=2)
    (tmp_path / "notes.txt").write_text("not a set")
    for step in range(1, 5):
        ha = a(f"step_{step}", {"s": step})
        hb = b(f"step_{step}", {"s": step})
        ha.result(30), hb.result(30)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "step_3", "step_4"]
    _finalize(a, b)


def test_incomplete_sets_are_hidden_from_recursive_listings(tmp_path: Path) -> None:
    fs = snapwriter.LocalFileSystem()
    for name, marker in (("done_1", True), ("broken_2", False)):
        d = tmp_path / name
        _manifest.write_tag(fs, str(d))
        (d / "0").write_bytes(b"x")
        if marker:
            (d / "complete").write_bytes(b"x")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "0").write_bytes(b"x")  # not a set: never hidden
    names = set(fs.list(str(tmp_path), recursive=True))
    assert {"done_1/0", "done_1/complete", "plain/0", "broken_2"} <= names
    assert not any(n.startswith("broken_2/") for n in names)
    entries = {e.name: e for e in snapwriter.list_snapshots(str(tmp_path), include_sets=True)}
    assert entries["broken_2"].kind == "set" and not entries["broken_2"].complete
    assert "plain" not in entries
    # snapwriter writes the manifest before the marker: a tagged set with a marker and
    # no manifest is damaged, not complete (ppe's listing shows it: ppe trusts markers)
    assert entries["done_1"].kind == "set" and not entries["done_1"].complete


def test_fsspec_recursive_listing_hides_incomplete_sets() -> None:
    fsspec = pytest.importorskip("fsspec")
    fs = snapwriter.FsspecFileSystem(fsspec.filesystem("memory"))
    names = ["a/.snapwriter-set", "a/0", "b/.snapwriter-set", "b/0", "b/complete", "c.pt"]
    for n in names:
        with fs.open(f"/rs-test/{n}", "wb") as f:
            f.write(b"x")
    try:
        listed = list(fs.list("/rs-test", recursive=True))
        assert listed == ["a", "b", "b/.snapwriter-set", "b/0", "b/complete", "c.pt"]
    finally:
        fs.remove("/rs-test", recursive=True)


def test_manifest_round_trip_and_bad_format() -> None:
    m = snapwriter.SetManifest(
        2, (snapwriter.MemberRecord(0, "0", 3, "ab"), snapwriter.MemberRecord(1, "1", 4, "cd"))
    )
    assert snapwriter.SetManifest.from_json(m.to_json()) == m
    with pytest.raises(ValueError, match="unknown format"):
        snapwriter.SetManifest.from_json(b'{"format": 99}')


def test_plain_calls_are_not_rank_set_members(tmp_path: Path) -> None:
    with snapwriter.ThreadWriter(out_dir=str(tmp_path)) as w:
        w("dir/0", "", {"x": 1}).result(30)
        w("dir/complete", "", {}).result(30)
    assert sorted(os.listdir(tmp_path / "dir")) == ["0", "complete"]  # no tag, no manifest


def test_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(snapwriter.SET_TIMEOUT_ENV, "12.5")
    assert _coordination.set_timeout() == 12.5
    assert _coordination.set_timeout(3) == 3.0
    monkeypatch.setenv(snapwriter.SET_TIMEOUT_ENV, "soon")
    assert _coordination.set_timeout() == _coordination.DEFAULT_SET_TIMEOUT


def test_arguments_are_checked() -> None:
    with pytest.raises(snapwriter.InvalidSnapshotArgument, match="world_size"):
        snapwriter.RankSetWriter(store=dist.HashStore(), rank=0, world_size=0)
    with pytest.raises(snapwriter.InvalidSnapshotArgument, match="rank"):
        snapwriter.RankSetWriter(store=dist.HashStore(), rank=2, world_size=2)
    with pytest.raises(snapwriter.InvalidSnapshotArgument, match="keep_last"):
        snapwriter.RankSetWriter(
            snapwriter.ThreadWriter(keep_last=1), store=dist.HashStore(), rank=0, world_size=2
        )
    with pytest.raises(snapwriter.InvalidSnapshotArgument, match=r"torch\.distributed"):
        snapwriter.RankSetWriter()


def _committed_pair(tmp_path: Path, savefun: Any = None) -> Path:
    a, b = _pair(tmp_path)
    kw = {} if savefun is None else {"savefun": savefun}
    ha = a("step_1", {"x": torch.arange(1000.0)}, **kw)
    hb = b("step_1", {"x": torch.arange(1000.0) + 1}, **kw)
    ha.result(30), hb.result(30)
    _finalize(a, b)
    return tmp_path / "step_1"


def _verify(path: Path) -> int:
    return cli.main(["verify", str(path)])


def test_member_digest_of_an_archive_is_its_directory_of_crcs(tmp_path: Path) -> None:
    """A torch.save member is identified by its zip directory (every record's CRC-32):
    a copy has the same digest; another save (torch.save gives every archive its own
    serialization id) and other content have others."""
    fs = snapwriter.LocalFileSystem()
    one, copy, again, other = (tmp_path / n for n in ("one.pt", "copy.pt", "again.pt", "o.pt"))
    torch.save({"x": torch.arange(10.0)}, one)
    copy.write_bytes(one.read_bytes())
    torch.save({"x": torch.arange(10.0)}, again)
    torch.save({"x": torch.arange(10.0) + 1}, other)
    size, digest = _manifest.file_digest(fs, str(one))
    assert size == one.stat().st_size and digest.startswith("zip-directory:")
    assert _manifest.file_digest(fs, str(copy)) == (size, digest)
    assert _manifest.file_digest(fs, str(again))[1] != digest
    assert _manifest.file_digest(fs, str(other))[1] != digest
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"not a zip")
    expected = "sha256:" + hashlib.sha256(b"not a zip").hexdigest()
    assert _manifest.file_digest(fs, str(raw)) == (9, expected)


def test_verify_catches_a_flipped_byte_the_digest_does_not_cover(tmp_path: Path) -> None:
    """The digest covers the directory; a damaged record is caught by its CRC-32."""
    set_dir = _committed_pair(tmp_path)
    assert _verify(set_dir) == 0
    member = set_dir / "1"
    data = bytearray(member.read_bytes())
    offset = data.rindex(b"data/0") + 200  # inside the tensor record's bytes
    data[offset] ^= 0xFF
    member.write_bytes(bytes(data))
    assert _verify(set_dir) == 1


def test_verify_catches_a_member_replaced_by_another_archive(tmp_path: Path) -> None:
    set_dir = _committed_pair(tmp_path)
    member = set_dir / "0"
    size = member.stat().st_size
    buffer = io.BytesIO()
    torch.save({"x": torch.arange(1000.0) + 5}, buffer)  # same size, other CRCs
    member.write_bytes(buffer.getvalue())
    assert member.stat().st_size == size
    assert _verify(set_dir) == 1


def test_custom_savefun_members_get_a_content_digest(tmp_path: Path) -> None:
    def pickle_save(obj: Any, f: Any) -> None:
        pickle.dump({k: v.tolist() for k, v in obj.items()}, f)

    set_dir = _committed_pair(tmp_path, savefun=pickle_save)
    manifest = _manifest.read_manifest(snapwriter.LocalFileSystem(), str(set_dir))
    assert manifest is not None
    for m in manifest.members:
        data = (set_dir / m.name).read_bytes()
        assert m.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    (set_dir / "1").write_bytes((set_dir / "1").read_bytes()[:-1] + b".")
    assert _verify(set_dir) == 1


def test_format_1_manifests_still_verify(tmp_path: Path) -> None:
    """Sets committed by an earlier snapwriter recorded the SHA-256 of each member."""
    set_dir = _committed_pair(tmp_path)
    path = set_dir / _manifest.MANIFEST_NAME
    record = json.loads(path.read_bytes())
    record["format"] = 1
    for m in record["members"]:
        m["sha256"] = hashlib.sha256((set_dir / m["name"]).read_bytes()).hexdigest()
        del m["digest"]
    path.write_text(json.dumps(record))
    manifest = _manifest.read_manifest(snapwriter.LocalFileSystem(), str(set_dir))
    assert manifest is not None and all(m.digest.startswith("sha256:") for m in manifest.members)
    assert _verify(set_dir) == 0
    (set_dir / "0").write_bytes(b"x" * (set_dir / "0").stat().st_size)
    assert _verify(set_dir) == 1
