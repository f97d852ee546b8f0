"""Archive checksums (snapwriter._crc): whichever implementation computes them, the
values are zlib's (torch's), and the archives written with either are torch.save's bytes."""

from __future__ import annotations

import ctypes
import io
import os
import random
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter
import snapwriter._fastsave
import snapwriter._ziparchive
from snapwriter import _crc
from snapwriter._fastsave import _plans, archive_plan, fast_torch_save


def _torch_save(obj: Any) -> bytes:
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


def _buffers() -> list[bytes]:
    rng = random.Random(11)
    sizes = [0, 1, 2, 3, 7, 8, 15, 16, 17, 63, 64, 65, 255, 256, 4095, 4096, 65537, 1 << 20]
    return [rng.randbytes(n) for n in sizes] + [b"\0" * 100_000, b"\xff" * 4097]


def test_the_implementation_is_named() -> None:
    assert _crc.IMPLEMENTATION in ("isal", "zlib")
    assert (_crc.crc32 is zlib.crc32) == (_crc.IMPLEMENTATION == "zlib")


@pytest.mark.parametrize("index", range(len(_buffers())))
def test_values_are_zlibs(index: int) -> None:
    data = _buffers()[index]
    assert _crc.crc32(data) == zlib.crc32(data)
    assert _crc.crc32(memoryview(data)) == zlib.crc32(data)
    half = len(data) // 2
    chained = _crc.crc32(data[half:], _crc.crc32(data[:half]))
    assert chained == zlib.crc32(data)


def test_values_of_a_storages_memory_are_zlibs() -> None:
    """What the archive writer hands it: a memoryview over a storage's memory."""
    storage = torch.randn(300_001, dtype=torch.float64).untyped_storage()
    view = memoryview((ctypes.c_char * storage.nbytes()).from_address(storage.data_ptr()))
    assert _crc.crc32(view.cast("B")) == zlib.crc32(bytes(storage))


def test_isal_is_what_the_fast_extra_installs() -> None:
    """The dev install includes snapwriter[fast]: the faster path is the one tested."""
    pytest.importorskip("isal", reason="snapwriter[fast] is not installed")
    assert _crc.IMPLEMENTATION == "isal"


def _state() -> dict[str, Any]:
    base = torch.randn(3 << 18)  # 3 MiB: several writeback stretches of a file
    return {
        "big": base,
        "view": base[5:1000:3],
        "ints": torch.arange(1 << 16, dtype=torch.int64),
        "empty": torch.empty(0),
        "half": torch.randn(333, dtype=torch.float16),
        "step": 12,
    }


class _Counting:
    """A CRC-32 implementation that counts the bytes it checksummed."""

    def __init__(self, implementation: Any) -> None:
        self.implementation = implementation
        self.nbytes = 0

    def __call__(self, data: Any, value: int = 0) -> int:
        self.nbytes += memoryview(data).nbytes
        return int(self.implementation(data, value))


def _use(monkeypatch: pytest.MonkeyPatch, implementation: Any) -> _Counting:
    """Checksum archives with ``implementation`` from now on, as if it were the one
    installed (the once-per-process check of the archive writer runs again with it)."""
    counting = _Counting(implementation)
    monkeypatch.setattr(snapwriter._ziparchive, "crc32", counting)
    monkeypatch.setattr(snapwriter._fastsave, "_pure", None)
    return counting


@pytest.mark.parametrize("implementation", ["installed", "zlib"])
def test_archives_are_torch_save_bytes_with_either(
    implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = _use(monkeypatch, _crc.crc32 if implementation == "installed" else zlib.crc32)
    assert snapwriter._fastsave.pure_archives()
    state = _state()
    before = counting.nbytes
    out = io.BytesIO()
    fast_torch_save(state, out)
    assert out.getvalue() == _torch_save(state)
    assert counting.nbytes - before >= state["big"].nbytes + state["ints"].nbytes


def test_a_wrong_checksum_is_caught_before_any_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The archive writer is checked against torch.save before its first use: with
    checksums that are not torch's it is not used, and torch's writer writes the file."""
    counting = _use(monkeypatch, lambda data, value=0: 0)
    assert not snapwriter._fastsave.pure_archives()
    state = _state()
    before = counting.nbytes
    out = io.BytesIO()
    fast_torch_save(state, out)
    assert out.getvalue() == _torch_save(state)
    assert counting.nbytes == before


@pytest.mark.parametrize(
    ("writer", "context"),
    [("StandardWriter", None), ("ThreadQueueWriter", None), ("ProcessWriter", "fork")],
)
def test_writers_files_with_zlib_are_torch_save_bytes(
    tmp_path: Path, writer: str, context: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the extra (zlib), the writers still write torch.save's bytes (a forked
    saving process inherits the patched module)."""
    counting = _use(monkeypatch, zlib.crc32)
    assert snapwriter._fastsave.pure_archives()
    before = counting.nbytes
    state = _state()
    kwargs: dict[str, Any] = {"out_dir": str(tmp_path)}
    if context is not None:
        kwargs["mp_context"] = context
    with getattr(snapwriter, writer)(**kwargs) as w:
        w("a.pt", "", state).result(timeout=120)
    assert (tmp_path / "a.pt").read_bytes() == _torch_save(state)
    if context is None:  # checksummed in this process
        assert counting.nbytes - before >= state["big"].nbytes


def test_archive_plan_without_a_usable_temporary_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plan is probed through a scratch file; where that cannot be written, the
    same probe runs in memory and gives the same plan."""
    names = ["data.pkl", "byteorder", "data/0", "data/1", "version", ".data/serialization_id"]
    expected = archive_plan(names)
    _plans.clear()
    monkeypatch.setattr(tempfile, "tempdir", os.path.join(tempfile.gettempdir(), "no-such-dir"))
    assert archive_plan(names) == expected
    _plans.clear()
