"""Early writeback (snapwriter._writeback): durable local saves kick the disk as they go.

Measured on real files through real syscalls: ``strace`` counts the kicks and injects
errors into them; the files are compared with torch.save's bytes.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snapwriter._writeback import WRITEBACK_BYTES, Writeback

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(STRACE is None, reason="strace is not installed")
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

#: A child that saves ~3 stretches of writeback with the writer named on its command
#: line (durable or not) over a file that already holds a good snapshot, then reports.
_CHILD = """
import sys, torch
sys.path[:0] = [sys.argv[1]]
import snapwriter
out_dir, writer_name, durable = sys.argv[2], sys.argv[3], sys.argv[4] == "1"
torch.manual_seed(0)
state = {f"w{i}": torch.randn(1024, 1024) for i in range(6)}  # 24 MiB
kwargs = {"staging": "fork"} if writer_name == "ProcessWriter-fork" else {}
cls = getattr(snapwriter, writer_name.split("-")[0])
writer = cls(out_dir=out_dir, durable=durable, **kwargs)
try:
    writer("snap.pt", out_dir, state)
    writer.finalize()
except Exception as exc:
    chain = []
    while exc is not None:
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__
    print("FAILED", " <- ".join(chain))
else:
    with open(out_dir + "/reference.pt", "wb") as f:  # as ppe's writers call it
        torch.save(state, f)
    print("SAVED")
"""

WRITERS = ["StandardWriter", "ProcessWriter", "ProcessWriter-fork", "ThreadQueueWriter"]


def _run(tmp_path: Path, writer: str, *strace_args: str, durable: bool = True) -> tuple[str, str]:
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    log = tmp_path / "strace.log"
    cmd = [sys.executable, "-c", _CHILD, os.getcwd(), str(out_dir), writer, "1" if durable else "0"]
    if strace_args:
        assert STRACE is not None
        cmd = [STRACE, "-f", "-qq", "-o", str(log), *strace_args, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=100, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip(), log.read_text() if log.exists() else ""


def _kicks(log: str) -> list[str]:
    return [line for line in log.splitlines() if "sync_file_range(" in line]


@needs_linux
@needs_strace
@pytest.mark.parametrize("writer", WRITERS)
def test_durable_saves_kick_writeback_and_write_torch_save_bytes(
    tmp_path: Path, writer: str
) -> None:
    out, log = _run(tmp_path, writer, "-e", "trace=sync_file_range,fsync")
    assert out == "SAVED"
    kicks = _kicks(log)
    # 24 MiB in stretches of 8 MiB: at least two kicks, each returning 0
    assert len(kicks) >= 24 * (1 << 20) // WRITEBACK_BYTES - 1, log
    assert all(line.rstrip().endswith("= 0") for line in kicks), kicks
    assert any("fsync(" in line for line in log.splitlines()), "the final fsync stays"
    snap = (tmp_path / "out" / "snap.pt").read_bytes()
    assert snap == (tmp_path / "out" / "reference.pt").read_bytes()


@needs_linux
@needs_strace
def test_saves_that_are_not_durable_do_not_kick(tmp_path: Path) -> None:
    out, log = _run(tmp_path, "StandardWriter", "-e", "trace=sync_file_range", durable=False)
    assert out == "SAVED"
    assert _kicks(log) == []


@needs_linux
@needs_strace
@pytest.mark.parametrize("writer", WRITERS)
def test_an_error_from_a_kick_fails_the_save_and_keeps_the_previous_snapshot(
    tmp_path: Path, writer: str
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    previous = {"epoch": 1, "w": torch.arange(10.0)}
    torch.save(previous, out_dir / "snap.pt")
    before = (out_dir / "snap.pt").read_bytes()
    out, _ = _run(
        tmp_path,
        writer,
        "-e",
        "trace=sync_file_range",
        "-e",
        "inject=sync_file_range:error=EIO:when=2",
    )
    assert out.startswith("FAILED"), out
    assert "snap.pt" in out and "Input/output error" in out, out
    assert (out_dir / "snap.pt").read_bytes() == before
    assert sorted(os.listdir(out_dir)) == ["snap.pt"], "the temporary file is removed"


@needs_linux
def test_a_file_that_refuses_kicks_is_written_without_them() -> None:
    """ESPIPE (a pipe) means "not supported here": no error, no more kicks."""
    read, write = os.pipe()
    try:
        wb = Writeback(write, every=4)
        wb.wrote(8)  # the kick fails with ESPIPE: switched off, no exception
        wb.wrote(8)
        assert wb._fn is None
    finally:
        os.close(read)
        os.close(write)


def test_writeback_needs_a_real_descriptor() -> None:
    assert Writeback.of(io.BytesIO()) is None


@needs_linux
def test_kicks_cover_the_whole_file(tmp_path: Path) -> None:
    """Every byte handed to the file is in some kicked range: each kick starts at or
    before the end of the file as the previous kick saw it, and runs to its end."""
    kicks: list[tuple[int, int]] = []  # (start, nbytes), the file's size at the kick
    sizes: list[int] = []
    path = tmp_path / "f"
    with open(path, "wb") as f:
        wb = Writeback(f.fileno(), every=1 << 20)
        real = wb._fn
        assert real is not None

        def record(fd: int, start: int, nbytes: int, flags: int) -> int:
            kicks.append((start, nbytes))
            sizes.append(os.fstat(fd).st_size)
            return real(fd, start, nbytes, flags)

        wb._fn = record
        written = 0
        for size in (700_000, 700_000, 3 << 20, 10, 2 << 20, 1 << 20):
            f.write(b"x" * size)
            written += size
            wb.wrote(size)
    assert len(kicks) >= 3
    assert kicks[0][0] == 0
    for (start, nbytes), seen_before in zip(kicks[1:], sizes, strict=False):
        assert nbytes == 0  # to the end of the file
        assert start <= seen_before
    assert path.stat().st_size == written
