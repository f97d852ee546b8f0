"""The torch-free archive writer (snapwriter._ziparchive) against torch's own zip writer:
the same records through both must give the same bytes."""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils.serialization

import snapwriter
from snapwriter._fastsave import (
    _file_writer,
    _view,
    _write_with,
    archive_plan,
    archive_records,
    pickle_state,
    pure_archives,
)
from snapwriter._fastsave import write_archive as fast_write_archive
from snapwriter._ziparchive import ArchivePlan, ArchiveSkeleton, fits, read_record, write_archive


def _ours(obj: Any) -> bytes:
    pickled = pickle_state(obj)
    assert pickled is not None
    records = archive_records(pickled.data, [(k, _view(s)) for k, s in pickled.storages])
    plan = archive_plan([name for name, _ in records])
    assert fits(((name, len(data)) for name, data in records), plan)
    out = io.BytesIO()
    size = write_archive(out, records, plan)
    assert size == len(out.getvalue())
    return out.getvalue()


def _torch_save(obj: Any) -> bytes:
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


SIZES = [0, 1, 3, 15, 16, 17, 63, 64, 65, 1000, 20_000]


def _random_state(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    count = rng.choice([1, 2, 5, 17, 100, 1000])
    state: dict[str, Any] = {
        f"t{i}": torch.randn(rng.choice(SIZES), generator=torch.Generator().manual_seed(i))
        for i in range(count)
    }
    state["ints"] = torch.arange(rng.randrange(1, 50), dtype=torch.int64)
    state["view"] = state["ints"][1:]  # shares a storage: one record
    state["scalar"] = torch.tensor(3.5)
    state["meta"] = {"step": seed, "name": "é"}
    return state


@pytest.mark.parametrize("seed", range(12))
def test_states_are_torch_saves_bytes(seed: int) -> None:
    state = _random_state(seed)
    assert _ours(state) == _torch_save(state)


def test_empty_records_have_no_data_descriptor() -> None:
    state = {"a": torch.zeros(0), "b": torch.ones(2), "c": torch.zeros(0, 3)}
    assert _ours(state) == _torch_save(state)


def test_more_records_than_a_classic_zip_directory_counts() -> None:
    # past 65,535 entries the classic end record says 0xFFFF; the zip64 one the count
    state = [torch.full((1,), float(i)) for i in range(66_000)]
    assert _ours(state) == _torch_save(state)


def test_a_large_record() -> None:
    state = {"big": torch.randn(20_000_000), "small": torch.ones(3)}
    assert _ours(state) == _torch_save(state)


@pytest.fixture
def alignment_4096() -> Iterator[None]:
    config = torch.utils.serialization.config.save
    before = config.storage_alignment
    config.storage_alignment = 4096
    try:
        yield
    finally:
        config.storage_alignment = before


def test_another_storage_alignment(alignment_4096: None) -> None:
    state = {"a": torch.ones(5), "b": torch.arange(100)}
    data = _ours(state)
    assert data == _torch_save(state)
    assert archive_plan(["x"]).alignment == 4096


@pytest.mark.parametrize(
    "records",
    [
        [("one", b"1")],
        [("version", b"3\n"), ("x", b"")],  # a version record given: none added
        [("byteorder", b"little"), ("data/0", bytes(range(256)) * 9)],
        [(f"r{i}", os.urandom(i * 7)) for i in range(40)],
    ],
    ids=["one", "version-given", "byteorder-given", "forty"],
)
def test_any_records_as_torchs_zip_writer_writes_them(records: list[tuple[str, bytes]]) -> None:
    expected = io.BytesIO()
    names = [name for name, _ in records]
    _write_with(_file_writer(expected), list(records), [len(data) for _, data in records])
    ours = io.BytesIO()
    write_archive(ours, records, archive_plan(names))
    assert ours.getvalue() == expected.getvalue()


def _torch_writes(records: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    _write_with(_file_writer(out), list(records), [len(data) for _, data in records])
    return out.getvalue()


def test_one_skeleton_writes_every_content_of_its_records() -> None:
    # the same names and sizes, new bytes each time (a warm save): the CRCs in the
    # descriptors, the central directory and the serialization id must all follow
    sizes = [0, 3, 70_000, 64, 0, 1 << 20, 5]  # empty, small, direct, gathered
    names = [f"data/{i}" for i in range(len(sizes))]
    skeleton = ArchiveSkeleton(names, sizes, archive_plan(names))
    for seed in range(3):
        rng = random.Random(seed)
        records = [(n, rng.randbytes(size)) for n, size in zip(names, sizes, strict=True)]
        ours = io.BytesIO()
        buffers = [memoryview(data) for _, data in records]
        assert skeleton.write(ours, buffers) == skeleton.nbytes == len(ours.getvalue())
        assert ours.getvalue() == _torch_writes(records)


def test_a_skeleton_refuses_buffers_of_other_records() -> None:
    names = ["data/0", "data/1"]
    skeleton = ArchiveSkeleton(names, [4, 8], archive_plan(names))
    out = io.BytesIO()
    with pytest.raises(ValueError, match="1 buffers for an archive of 2 records"):
        skeleton.write(out, [b"abcd"])
    with pytest.raises(ValueError, match="sizes"):
        skeleton.write(out, [b"abcd", b"1234567"])
    assert out.getvalue() == b""  # refused before a byte is written


def test_a_warm_save_writes_from_its_prepared_records(tmp_path: Path) -> None:
    # fast_torch_save of one Pickled, twice with new values: the prepared records (the
    # skeleton and views) are reused and the file is torch.save's each time
    state = {"w": torch.randn(300, 7), "b": torch.zeros(9), "n": 3}
    pickled = pickle_state(state)
    assert pickled is not None
    skeletons = set()
    for step in range(2):
        for _, storage in pickled.storages:
            torch.empty(0, dtype=torch.uint8).set_(storage).random_(0, 255)
        out = tmp_path / f"s{step}.pt"
        with open(out, "wb") as f:
            fast_write_archive(f, pickled)
        rebuilt = torch.load(out, weights_only=True)
        expected = io.BytesIO()
        torch.save(rebuilt, expected)
        assert out.read_bytes() == expected.getvalue()
        plan = pickled.archive.pure_plan()
        assert plan is not None
        skeletons.add(id(pickled.archive.skeleton(plan)))
    assert len(skeletons) == 1


def test_archives_that_need_zip64_headers_are_left_to_torch() -> None:
    plan = ArchivePlan("archive", 64, b"3\n", 0)
    assert fits([("data.pkl", 100), ("data/0", 1 << 20)], plan)
    assert not fits([("data/0", (1 << 32) - 1)], plan)
    assert not fits([("data/0", 1 << 31), ("data/1", 1 << 31)], plan)


def test_plans_are_kept_by_key() -> None:
    names = ["data.pkl", "data/0"]
    assert archive_plan(names, key=("test", 2)) is archive_plan(names, key=("test", 2))


@pytest.fixture
def no_crc() -> Iterator[None]:
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(True)


def test_without_crc32_the_saving_process_writes_with_torch(tmp_path: Path, no_crc: None) -> None:
    state = {"w": torch.randn(30), "step": 3}
    with snapwriter.ProcessWriter(out_dir=str(tmp_path)) as w:
        w("a.pt", "", state).result(timeout=120)
    assert (tmp_path / "a.pt").read_bytes() == _torch_save(state)


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


@pytest.mark.parametrize("writer", ["ProcessWriter", "ProcessQueueWriter"])
def test_the_saving_process_loads_torch_only_for_a_custom_savefun(
    tmp_path: Path, writer: str
) -> None:
    assert pure_archives()
    state = {"w": torch.randn(1000), "b": [torch.ones(3)], "step": 1}
    with getattr(snapwriter, writer)(out_dir=str(tmp_path)) as w:
        w("plain.pt", "", state).result(timeout=120)
        stats = w.saver_stats()
        assert stats is not None and stats.pid is not None
        assert "libtorch" not in _maps(stats.pid)
        w("custom.pt", "", state, savefun=torch.save).result(timeout=120)  # same function
        assert "libtorch" not in _maps(stats.pid)
        w("kw.pt", "", state, savefun=_save_with_protocol).result(timeout=120)
        assert "libtorch" in _maps(stats.pid)  # a custom savefun gets real tensors
        assert w.saver_stats().starts == 1  # type: ignore[union-attr]
    expected = _torch_save(state)
    assert (tmp_path / "plain.pt").read_bytes() == expected
    assert (tmp_path / "custom.pt").read_bytes() == expected
    assert (tmp_path / "kw.pt").read_bytes() == expected


def _save_with_protocol(obj: Any, f: Any) -> None:
    torch.save(obj, f, pickle_protocol=2)


WRITERS = [
    ("SimpleWriter", None),
    ("StandardWriter", None),
    ("ThreadWriter", None),
    ("ProcessWriter", None),
    ("ProcessWriter", "spawn"),
    ("QueueWriter", None),
    ("ThreadQueueWriter", None),
    ("ProcessQueueWriter", None),
]


@pytest.mark.parametrize(("writer", "context"), WRITERS)
def test_the_callers_torch_save_options_are_the_files(
    tmp_path: Path, writer: str, context: str | None, no_crc: None, alignment_4096: None
) -> None:
    """torch keeps torch.save's options per thread: a background save must write under
    the caller's (no CRC-32s, 4 KiB alignment here), as torch.save in its place would."""
    kwargs: dict[str, Any] = {"out_dir": str(tmp_path)}
    if context is not None:
        kwargs["mp_context"] = context
    many = {f"p{i}": torch.full((4,), float(i)) for i in range(80)}  # by-name archives too
    states = [{"w": torch.randn(50), "step": 7}, many]
    with getattr(snapwriter, writer)(**kwargs) as w:
        for i, state in enumerate(states):
            w(f"s{i}.pt", "", state).result(timeout=120)
    for i, state in enumerate(states):
        assert (tmp_path / f"s{i}.pt").read_bytes() == _torch_save(state), i


def test_read_record_finds_a_record_by_its_local_header() -> None:
    records = [("version2", b"not it"), ("data/10", b"ten"), ("data/1", b"one"), ("version", b"")]
    out = io.BytesIO()
    write_archive(out, records, archive_plan([name for name, _ in records]))
    archive = out.getvalue()
    assert read_record(archive, "data/1") == b"one"  # not data/10, nor a directory entry
    assert read_record(archive, "version2") == b"not it"
    assert read_record(archive, "version") == b""
    assert len(read_record(archive, ".data/serialization_id")) == 40
    with pytest.raises(KeyError):
        read_record(archive, "data/2")
