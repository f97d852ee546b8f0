"""The scripts in examples/ run to completion and check their own results."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import snapwriter

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(script: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=cwd,
        env=env,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def complete_snapshots(directory: Path, pattern: str = "*") -> list[str]:
    return [e.name for e in snapwriter.list_snapshots(str(directory), pattern)]


def test_sync_loop(tmp_path: Path) -> None:
    out = tmp_path / "snaps"
    proc = run_example("sync_loop.py", "--out", out, "--steps", "40", "--every", "10", cwd=tmp_path)
    assert "state round-trips" in proc.stdout
    assert complete_snapshots(out) == [f"snapshot_{s:06d}.pt" for s in (10, 20, 30, 40)]


def test_asyncio_trainer(tmp_path: Path) -> None:
    out = tmp_path / "snaps"
    proc = run_example(
        "asyncio_trainer.py", "--out", out, "--steps", "20", "--every", "5", cwd=tmp_path
    )
    assert "state round-trips" in proc.stdout
    assert proc.stdout.count("committed") == 4
    assert complete_snapshots(out) == [f"snapshot_{s:05d}.pt" for s in (5, 10, 15, 20)] + [
        "final.pt"
    ]


def test_ppe_manager(tmp_path: Path) -> None:
    out = tmp_path / "snaps"
    proc = run_example("ppe_manager.py", "--out", out, "--epochs", "4", cwd=tmp_path)
    assert "resumed at iteration 16" in proc.stdout
    assert "ends exactly where uninterrupted training does" in proc.stdout
    assert complete_snapshots(out, "snapshot_iter_*") == [
        f"snapshot_iter_{i}" for i in (16, 24, 32)
    ]  # n_retains=3


def test_demo_quick_plain(tmp_path: Path) -> None:
    proc = run_example("demo.py", "--quick", "--out", tmp_path / "demo", cwd=tmp_path)
    lines = proc.stdout.splitlines()
    assert any(line.startswith("[sync] step   10/30") for line in lines)
    assert any(line.startswith("[asyncio]   committed snapshot_000030.pt") for line in lines)
    table = lines[lines.index("mode     snapshots  snapwriter  torch.save+fsync  ratio") :]
    assert table[1].split()[:2] == ["sync", "3"]
    assert table[2].split()[:2] == ["asyncio", "3"]
    assert proc.stdout.count("round-trip bit for bit") == 2
    for mode in ("sync", "asyncio"):
        assert complete_snapshots(tmp_path / "demo" / mode) == [
            f"snapshot_{s:06d}.pt" for s in (10, 20, 30)
        ]  # the torch.save baseline file is gone


@pytest.mark.skipif(importlib.util.find_spec("rich") is None, reason="rich is not installed")
def test_demo_quick_live(tmp_path: Path) -> None:
    proc = run_example(
        "demo.py", "--quick", "--display", "live", "--out", tmp_path / "demo", cwd=tmp_path
    )
    assert "torch.save+fsync" in proc.stdout
    assert proc.stdout.count("round-trip bit for bit") == 2
