"""The command line, run as ``python -m snapwriter`` on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from snapwriter import LocalFileSystem, StandardWriter
from snapwriter import _cli as cli
from snapwriter._cli import main

DEAD_PID = 2**22 + 12345  # above Linux's pid_max: no process has it


def run_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapwriter", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def temp_leftover(directory: Path, final_name: str, pid: int) -> Path:
    path = directory / f".{final_name}.snapwriter-tmp-{pid}-0123456789abcdef"
    path.write_bytes(b"half a snapshot")
    return path


@pytest.fixture
def snapdir(tmp_path: Path) -> Path:
    """Three good snapshots (mtimes 1000, 2000, 3000), a truncated one (4000), a leftover."""
    directory = tmp_path / "run"
    with StandardWriter(out_dir=str(directory)) as writer:
        for i in range(3):
            writer(f"snapshot_iter_{i}.pt", "", {"w": torch.full((256,), float(i)), "step": i})
    good = (directory / "snapshot_iter_2.pt").read_bytes()
    (directory / "snapshot_iter_3.pt").write_bytes(good[: len(good) // 2])
    for i in range(4):
        os.utime(directory / f"snapshot_iter_{i}.pt", (1000.0 * (i + 1),) * 2)
    temp_leftover(directory, "snapshot_iter_4.pt", DEAD_PID)
    return directory


def test_ls_table(snapdir: Path) -> None:
    proc = run_cli("ls", snapdir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "MODIFIED", "STATUS"]
    names = [line.split()[0] for line in lines[1:]]
    assert names[:4] == [f"snapshot_iter_{i}.pt" for i in range(4)]  # oldest first
    assert lines[1].endswith("complete")
    assert lines[1].split()[3].startswith(("1970-01-01T", "1969-12-31T"))  # mtime 1000, local
    leftover = next(line for line in lines if line.startswith(".snapshot_iter_4.pt"))
    assert leftover.endswith("temp leftover")


def test_ls_json_and_pattern(snapdir: Path) -> None:
    (snapdir / "log").write_text("[]")
    proc = run_cli("ls", snapdir, "--json", "--pattern", "snapshot_iter_*")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    by_name = {r["name"]: r for r in records}
    assert "log" not in by_name
    first = by_name["snapshot_iter_0.pt"]
    assert first["size"] == (snapdir / "snapshot_iter_0.pt").stat().st_size
    assert first["status"] == "complete"
    assert first["timestamp"] == 1000.0
    assert first["mtime"].startswith(("1970-01-01T", "1969-12-31T"))
    statuses = [r["status"] for r in records if r["name"].startswith(".")]
    assert statuses == ["temp leftover"]


def test_ls_marks_temp_of_running_writer_in_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    temp_leftover(tmp_path, "a.pt", os.getppid())  # our parent process is alive
    assert main(["ls", str(tmp_path), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in records] == ["in progress"]


def test_verify_directory_reports_damaged(snapdir: Path) -> None:
    proc = run_cli("verify", snapdir)
    assert proc.returncode == 1
    status = {line.split()[1]: line.split()[0] for line in proc.stdout.splitlines()[:-1]}
    assert status == {
        "snapshot_iter_0.pt": "OK",
        "snapshot_iter_1.pt": "OK",
        "snapshot_iter_2.pt": "OK",
        "snapshot_iter_3.pt": "DAMAGED",
    }  # the temporary leftover is skipped, not reported damaged
    assert proc.stdout.splitlines()[-1] == "4 checked: 3 OK, 1 damaged"
    assert "skipping 1 temporary file" in proc.stderr

    (snapdir / "snapshot_iter_3.pt").unlink()
    proc = run_cli("verify", snapdir)
    assert proc.returncode == 0, proc.stdout
    assert "loaded" in proc.stdout


def test_verify_quick_catches_flipped_bit(snapdir: Path) -> None:
    path = snapdir / "snapshot_iter_1.pt"
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + 100] ^= 0xFF  # inside the tensor bytes
    path.write_bytes(bytes(data))
    proc = run_cli("verify", snapdir, "--quick", "--pattern", "snapshot_iter_[012].pt")
    assert proc.returncode == 1
    damaged = [line for line in proc.stdout.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1
    assert "snapshot_iter_1.pt" in damaged[0]
    assert "CRC" in damaged[0]
    assert "loaded" not in proc.stdout


def test_verify_single_file(snapdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok = run_cli("verify", snapdir / "snapshot_iter_0.pt")
    assert ok.returncode == 0
    assert ok.stdout.startswith("OK")
    assert main(["verify", "--quick", str(snapdir / "snapshot_iter_3.pt")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DAMAGED")
    assert "not a zip archive" in out


def test_verify_loads_legacy_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert main(["verify", str(path)]) == 0
    assert "legacy" in capsys.readouterr().out


def test_latest(snapdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = run_cli("latest", snapdir, "--pattern", "snapshot_iter_*")
    assert proc.returncode == 0
    assert proc.stdout.strip() == str(snapdir / "snapshot_iter_3.pt")  # newest, temp ignored
    assert main(["latest", str(snapdir), "--pattern", "snapshot_iter_*", "--verified"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(snapdir / "snapshot_iter_2.pt")  # newest intact one
    assert "skipping damaged" in err


def test_latest_none(snapdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["latest", str(snapdir), "--pattern", "model_*"]) == 1
    assert capsys.readouterr().out == ""


def test_clean_dry_run_then_clean(snapdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = snapdir / f".snapshot_iter_4.pt.snapwriter-tmp-{DEAD_PID}-0123456789abcdef"
    live = temp_leftover(snapdir, "snapshot_iter_5.pt", os.getppid())  # a live process

    assert main(["clean", str(snapdir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove  {dead}" in out
    assert f"kept  {live}" in out
    assert dead.exists()

    proc = run_cli("clean", snapdir)
    assert proc.returncode == 0
    assert f"removed  {dead}" in proc.stdout
    assert f"kept  {live}" in proc.stdout
    assert not dead.exists()
    assert live.exists()
    assert sorted(p.name for p in snapdir.iterdir() if not p.name.startswith(".")) == [
        f"snapshot_iter_{i}.pt" for i in range(4)
    ]

    assert main(["clean", str(snapdir), "--all"]) == 0
    assert f"removed  {live}" in capsys.readouterr().out
    assert not live.exists()


def test_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_cli("verify", tmp_path / "nope")
    assert proc.returncode == 2
    assert "no such file or directory" in proc.stderr


def test_no_command_is_a_usage_error() -> None:
    proc = run_cli()
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


# In-process: argument handling of main() itself.


@pytest.mark.parametrize("command", ["ls", "verify", "latest", "clean"])
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert f"usage: snapwriter {command}" in capsys.readouterr().out


def test_bad_option_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "--bogus", "x"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["ls", "latest", "clean"])
def test_missing_directory_in_process(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_unreachable_store_is_a_clean_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    assert main(["ls", "s3://bucket/run"]) == 2
    err = capsys.readouterr().err
    # s3fs either raises (reported as "cannot read") or reports the prefix missing
    assert err.startswith("snapwriter ls: error: ")
    assert "cannot read" in err or "no such directory" in err
    assert "Traceback" not in err


def test_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(tmp_path)]) == 0
    assert main(["verify", str(tmp_path)]) == 0
    assert main(["latest", str(tmp_path)]) == 1
    assert main(["clean", str(tmp_path)]) == 0
    assert main(["ls", "--json", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "[]"


def test_clean_reports_what_it_could_not_remove(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class ReadOnlyFileSystem(LocalFileSystem):
        def remove(self, file_path: str, recursive: bool = False) -> None:
            raise PermissionError(13, "Permission denied", file_path)

    monkeypatch.setattr(cli, "_filesystem", lambda location: (ReadOnlyFileSystem(), location))
    leftover = temp_leftover(tmp_path, "a.pt", DEAD_PID)
    assert main(["clean", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert f"could not remove  {leftover}" in err
    assert out.splitlines()[-1] == "0 removed, 0 kept, 1 failed"
    assert leftover.exists()


def test_commands_accept_fsspec_urls(capsys: pytest.CaptureFixture[str]) -> None:
    """ls / latest / verify / clean on a memory:// URL (in-process: memory is per process)."""
    import snapwriter

    with snapwriter.StandardWriter(out_dir="memory://cli-run") as w:
        for i in range(3):
            w(f"snapshot_{i}.pt", "", {"i": torch.tensor(i)})
    assert main(["ls", "memory://cli-run", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == [f"snapshot_{i}.pt" for i in range(3)]
    assert {r["status"] for r in records} == {"complete"}
    assert main(["latest", "memory://cli-run"]) == 0
    assert capsys.readouterr().out.strip().endswith("cli-run/snapshot_2.pt")
    assert main(["verify", "memory://cli-run"]) == 0
    assert main(["clean", "memory://cli-run"]) == 0
    assert main(["ls", "memory://no-such-run"]) == 2


class _QuantizedWithoutQuantizer:
    """Pickles as a qint8 tensor rebuilt without scale or zero point (loads, unusable)."""

    def __reduce__(self) -> object:
        storage = torch.storage.TypedStorage(
            wrap_storage=torch.zeros(4, dtype=torch.int8).untyped_storage(),
            dtype=torch.qint8,
            _internal=True,
        )
        return (torch._utils._rebuild_tensor_v2, (storage, 0, (4,), (1,), False, {}))


@pytest.mark.filterwarnings(
    "ignore:TypedStorage is deprecated:UserWarning", "ignore:.*quantize.*:UserWarning"
)
def test_verify_reports_a_tensor_that_loads_but_cannot_be_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.pt"
    torch.save({"w": _QuantizedWithoutQuantizer(), "ok": torch.ones(2)}, path)
    loaded = torch.load(path, weights_only=False)  # torch.load alone is fooled
    assert loaded["w"].dtype == torch.qint8
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr()
    assert "cannot be used" in out.out + out.err


@pytest.mark.filterwarnings(
    "ignore:.*quantize.*:UserWarning",
    "ignore:.*nested.*:UserWarning",
    "ignore:Sparse CSR:UserWarning",
)
def test_verify_materialises_special_tensors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = {
        "q": torch.quantize_per_tensor(torch.randn(4), 0.1, 2, torch.qint8),
        "sparse": torch.eye(3).to_sparse(),
        "csr": torch.eye(3).to_sparse_csr(),
        "nested": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        "conj": torch.randn(2, dtype=torch.complex64).conj(),
    }
    state["cycle"] = [state]
    with StandardWriter(out_dir=str(tmp_path)) as w:
        w("snap.pt", "", state).result()
    assert main(["verify", str(tmp_path / "snap.pt")]) == 0
    assert "5 tensors materialised" in capsys.readouterr().out
