"""Issue 12: a true drop-in. One test per guarantee, named for it.

One directory for writes, retention and autoload (ppe's docstring example run, then
resumed by a new process, against ppe's own writer); retention that only touches its
own files; the durability and symlink guarantees on every local file system; shared
directories; exit; honest floors; no blocked event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter
from snapwriter import _paths, _portal
from snapwriter._paths import FOREIGN_TEMP_SECONDS
from snapwriter._process import ProcessWorker
from snapwriter._save import SaveRequest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
    )


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- 2. one directory ------------------------------------------------------------------

_DOCSTRING_EXAMPLE = """
    import json, os, sys, torch
    from pytorch_pfn_extras import training, writing
    from pytorch_pfn_extras.training import extensions
    import snapwriter
    NAMES = ("SimpleWriter", "StandardWriter", "ThreadWriter", "ProcessWriter")
    PPE = {name: getattr(writing, name) for name in NAMES}
    epochs = int(sys.argv[1])
    for lib, cwd in zip(("ppe", "snapwriter"), sys.argv[2:]):
        os.chdir(cwd)
        for name in NAMES:  # snapwriter: bound into ppe, as a user's monkeypatch does
            setattr(writing, name, PPE[name] if lib == "ppe" else getattr(snapwriter, name))
        torch.manual_seed(epochs)  # the resumed run starts from other weights
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        manager = training.ExtensionsManager(
            model, optimizer, epochs, iters_per_epoch=2, out_dir="result"
        )
        # ppe's docstring example: a writer without out_dir, given to the extension only
        writer = writing.ProcessWriter()
        manager.extend(
            extensions.snapshot(writer=writer, n_retains=2, autoload=True), trigger=(1, "epoch")
        )
        start = manager.iteration  # starts the extensions: autoload
        loaded = model.weight.tolist()
        while not manager.stop_trigger:
            with manager.run_iteration():
                optimizer.zero_grad()
                model(torch.ones(1, 3)).sum().backward()
                optimizer.step()
        out = {"lib": lib, "start": start, "loaded": loaded, "weight": model.weight.tolist()}
        print(json.dumps(out), flush=True)
"""


def test_ppe_docstring_example_resumes_in_a_new_process(tmp_path: Path) -> None:
    """``snapshot(writer=writing.ProcessWriter())`` with n_retains and autoload, run then
    resumed by a new process: snapwriter writes, keeps and restores exactly what ppe's
    own ProcessWriter does (the writer's own directory, the cwd: the call's out_dir is
    ignored by both)."""
    dirs = [tmp_path / "ppe", tmp_path / "snapwriter"]
    for d in dirs:
        d.mkdir()
    first = _run(_DOCSTRING_EXAMPLE, "3", *map(str, dirs))
    assert first.returncode == 0, first.stderr
    after_first = [sorted(os.listdir(d)) for d in dirs]
    resumed = _run(_DOCSTRING_EXAMPLE, "4", *map(str, dirs))
    assert resumed.returncode == 0, resumed.stderr
    runs = [[json.loads(line) for line in p.stdout.splitlines()] for p in (first, resumed)]
    for one, two in zip(*runs, strict=True):
        assert two["start"] == 6, two["lib"]  # autoload found the run's last snapshot
        assert two["loaded"] == one["weight"], two["lib"]  # and restored its weights
    assert runs[1][0]["weight"] == runs[1][1]["weight"]  # ppe and snapwriter: same run
    assert after_first == [["result", "snapshot_iter_4", "snapshot_iter_6"]] * 2
    assert [sorted(os.listdir(d)) for d in dirs] == [
        ["result", "snapshot_iter_6", "snapshot_iter_8"]
    ] * 2
    assert [os.listdir(d / "result") for d in dirs] == [[], []]


def test_one_directory_for_writes_retention_and_autoload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call's out_dir (the manager's) is ignored; a constructor out_dir wins; and
    ``writer.out_dir`` is where files are, before the writer was ever called."""
    monkeypatch.chdir(tmp_path)
    with snapwriter.StandardWriter(keep_last=1) as w:
        w("s_1.pt", "elsewhere", {"i": 1})
        w("s_2.pt", "elsewhere", {"i": 2})
    assert sorted(os.listdir(tmp_path)) == ["s_2.pt"]
    with snapwriter.ThreadWriter(out_dir="own") as w:
        w("s_3.pt", "elsewhere", {"i": 3})
    assert os.listdir(tmp_path / "own") == ["s_3.pt"]
    fresh = snapwriter.StandardWriter(out_dir="own")  # never called nor initialized
    assert snapwriter.find_latest_snapshot(fresh.out_dir or ".", "s_*.pt", fs=fresh.fs)
    fresh.finalize()
    assert not (tmp_path / "elsewhere").exists()


# -- 4. retention ----------------------------------------------------------------------

LOOKALIKES = (
    "model_best.pt",
    "model_3_ema.pt",
    "model_3.pt.bak",
    "model_final_backup.pt",
    "notes.txt",
    "model_.pt",
)


def test_retention_never_touches_lookalikes(tmp_path: Path) -> None:
    """keep_last=2 over model_1..5.pt: only model_1..3 go; every look-alike stays (ppe's
    prefix/suffix n_retains would take model_best.pt and two others: README)."""
    for name in LOOKALIKES:
        (tmp_path / name).write_text("precious")
    with snapwriter.StandardWriter(out_dir=str(tmp_path), keep_last=2) as w:
        for i in range(1, 6):
            w(f"model_{i}.pt", "", {"i": i}).result()
    assert sorted(os.listdir(tmp_path)) == sorted([*LOOKALIKES, "model_4.pt", "model_5.pt"])
    assert all((tmp_path / n).read_text() == "precious" for n in LOOKALIKES)

    from pytorch_pfn_extras.training.extensions._snapshot import _find_stale_snapshots

    fs = snapwriter.LocalFileSystem()
    ppe_would = set(_find_stale_snapshots("model_{}.pt", str(tmp_path), 2, fs))
    assert {"model_best.pt", "model_3_ema.pt"} & ppe_would  # the hazard the default avoids


# -- 5. guarantees on every local file system ------------------------------------------


@contextlib.contextmanager
def _fsynced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record the paths every ``os.fsync`` reaches (the real fsync still runs)."""
    paths: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        with contextlib.suppress(OSError):
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    yield paths


def test_new_parent_directories_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save into run/a/b (none of them existing): each new directory and the existing
    one above them are fsynced, so the first snapshot survives a power loss."""
    with _fsynced(monkeypatch) as paths, snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        w("run/a/b/snap.pt", "", {"x": 1}).result()
    for d in (tmp_path, tmp_path / "run", tmp_path / "run" / "a", tmp_path / "run" / "a" / "b"):
        assert str(d) in paths, (d, paths)
    assert any(snapwriter.is_temp_name(p) for p in paths)  # the file, before its rename


def test_ppe_posix_fs_gets_directory_fsync_and_symlink_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytorch_pfn_extras.writing._writer_base import _PosixFileSystem

    out, outside = tmp_path / "run", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    os.symlink(outside, out / "link")
    fs = _PosixFileSystem(root=str(tmp_path))
    with _fsynced(monkeypatch) as paths, snapwriter.StandardWriter(fs=fs, out_dir="run") as w:
        w("snap.pt", "", {"x": 1}).result()
        with pytest.raises(snapwriter.InvalidSnapshotArgument, match="symbolic link"):
            w("link/evil.pt", "", {"x": 2}).result()
    assert str(out) in paths  # the directory, after the rename
    assert any(snapwriter.is_temp_name(p) and p.startswith(str(out)) for p in paths)
    assert os.listdir(outside) == []
    assert torch.load(out / "snap.pt") == {"x": 1}


def test_append_refuses_symlinked_final_name(tmp_path: Path) -> None:
    out, victim = tmp_path / "run", tmp_path / "victim.log"
    out.mkdir()
    victim.write_bytes(b"outside out_dir")
    os.symlink(victim, out / "log.pt")
    with snapwriter.StandardWriter(out_dir=str(out)) as w:
        with pytest.raises(snapwriter.InvalidSnapshotArgument, match="symbolic link") as info:
            w("log.pt", "", {"x": 1}, append=True).result()
        assert isinstance(info.value.__cause__, OSError)
        w("real.pt", "", {"x": 1}, append=True).result()
        w("real.pt", "", {"x": 2}, append=True).result()
    assert victim.read_bytes() == b"outside out_dir"
    assert (out / "real.pt").stat().st_size > 0


# test_s3_commit_after_copy_is_not_a_failure lives in tests/test_backends.py, next to
# the S3 server it needs.


# -- 6. shared directories -------------------------------------------------------------


def _host_a_saves(out: str, started: Any, release: Any) -> None:
    _paths.HOST_ID = "aaaaaaaa"  # this child plays another host

    def slow(target: Any, f: Any) -> None:
        started.set()  # its temporary file exists
        release.wait(60)
        torch.save(target, f)

    with snapwriter.StandardWriter(out_dir=out, savefun=slow) as w:
        w("a.pt", "", {"host": "A"})


def test_two_hosts_share_a_directory_without_removing_in_flight_temps(tmp_path: Path) -> None:
    """Host A saves into a shared directory; host B opens it and saves too. B removes its
    own dead temps and A's old ones, never A's in-flight temp (its pid means nothing
    on B), and A's snapshot commits."""
    assert _paths.HOST_ID != "aaaaaaaa"
    ctx = multiprocessing.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    host_a = ctx.Process(target=_host_a_saves, args=(str(tmp_path), started, release))
    host_a.start()
    try:
        assert started.wait(30)
        (in_flight,) = (n for n in os.listdir(tmp_path) if snapwriter.is_temp_name(n))
        assert in_flight.split("-tmp-")[1].startswith("aaaaaaaa-")
        dead = _dead_pid()
        token = "0" * 16
        fresh_foreign = f".x.pt{_paths.TEMP_MARKER}aaaaaaaa-{_paths.BOOT_ID}-{dead}-{token}"
        old_foreign = f".y.pt{_paths.TEMP_MARKER}aaaaaaaa-{_paths.BOOT_ID}-{dead}-{token}"
        own_dead = f".z.pt{_paths.TEMP_MARKER}{_paths.HOST_ID}-{_paths.BOOT_ID}-{dead}-{token}"
        own_old_boot = f".w.pt{_paths.TEMP_MARKER}{_paths.HOST_ID}-ffffff-{os.getpid()}-{token}"
        for name in (fresh_foreign, old_foreign, own_dead, own_old_boot):
            (tmp_path / name).write_bytes(b"leftover")
        long_ago = time.time() - FOREIGN_TEMP_SECONDS - 60
        os.utime(tmp_path / old_foreign, (long_ago, long_ago))
        with snapwriter.StandardWriter(out_dir=str(tmp_path)) as host_b:
            host_b("b.pt", "", {"host": "B"}).result()
        names = set(os.listdir(tmp_path))
        assert {in_flight, fresh_foreign} <= names
        assert not {old_foreign, own_dead, own_old_boot} & names
    finally:
        release.set()
        host_a.join(60)
    assert host_a.exitcode == 0
    assert torch.load(tmp_path / "a.pt") == {"host": "A"}
    assert torch.load(tmp_path / "b.pt") == {"host": "B"}
    assert in_flight not in os.listdir(tmp_path)


# -- 7. exit and lifecycle -------------------------------------------------------------


def test_unreported_failure_at_exit_exits_nonzero(tmp_path: Path) -> None:
    proc = _run(
        """
        import sys, snapwriter
        def broken(target, f):
            raise OSError(5, "disk on fire")
        w = snapwriter.StandardWriter(savefun=broken, out_dir=sys.argv[1])
        w("last.pt", "", {"x": 1})  # no finalize(), no look at the handle
        """,
        str(tmp_path),
    )
    assert proc.returncode == 1, proc.stderr
    assert "last.pt" in proc.stderr and "disk on fire" in proc.stderr
    assert "never reported" in proc.stderr


def test_unreported_failure_keeps_programs_own_status(tmp_path: Path) -> None:
    proc = _run(
        """
        import sys, snapwriter
        def broken(target, f):
            raise OSError(5, "disk on fire")
        w = snapwriter.StandardWriter(savefun=broken, out_dir=sys.argv[1])
        w("last.pt", "", {"x": 1})
        raise KeyboardInterrupt  # Python ends this one through SIGINT
        """,
        str(tmp_path),
    )
    assert proc.returncode == -2, proc.stderr  # the program's status, kept
    assert "last.pt" in proc.stderr and "exiting with status" not in proc.stderr


def test_save_from_atexit_handler_commits(tmp_path: Path) -> None:
    proc = _run(
        """
        import atexit, queue, sys, torch, snapwriter
        class PpeQueue(snapwriter.QueueWriter):  # ppe's queue design, drained at exit
            def create_queue(self):
                return queue.Queue()
        w = snapwriter.StandardWriter(out_dir=sys.argv[1])
        q = PpeQueue(out_dir=sys.argv[1])
        w("early.pt", "", {"when": "run"})
        def last_words():
            w("late.pt", "", {"when": "atexit"})
            q("queued.pt", "", {"when": "atexit"})
        atexit.register(last_words)
        """,
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert torch.load(tmp_path / "late.pt") == {"when": "atexit"}
    assert torch.load(tmp_path / "queued.pt") == {"when": "atexit"}
    assert sorted(os.listdir(tmp_path)) == ["early.pt", "late.pt", "queued.pt"]


def _blocking_save(target: Any, f: Any, *, gate: Any) -> None:
    gate.wait(60)
    torch.save(target, f)


def test_process_worker_join_honours_timeout(tmp_path: Path) -> None:
    gate = multiprocessing.get_context("fork").Event()
    dest = _paths.resolve_destination(str(tmp_path), "slow.pt")
    request = SaveRequest(
        dest, {"x": 1}, _blocking_save, {"gate": gate}, fs=snapwriter.LocalFileSystem()
    )
    worker = ProcessWorker(request, "fork")
    assert isinstance(worker, multiprocessing.Process)
    worker.start()
    begin = time.monotonic()
    worker.join(0.3)
    assert time.monotonic() - begin < 5 and worker.exitcode is None
    gate.set()
    worker.join(60)
    assert worker.exitcode == 0 and worker.outcome is not None
    assert torch.load(tmp_path / "slow.pt") == {"x": 1}


# -- 8. honest floors ------------------------------------------------------------------


def test_declared_floors_are_what_ci_runs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    deps = {d.split(">=")[0]: d.split(">=")[1] for d in project["dependencies"]}
    assert deps["torch"] == "2.13"
    assert sys.version_info[:2] == (3, 11) or sys.version_info >= (3, 11)
    assert torch.__version__.split("+")[0].startswith(deps["torch"])
    assert {"Operating System :: POSIX :: Linux", "Operating System :: MacOS"} <= set(
        project["classifiers"]
    )


def test_import_without_register_at_fork(tmp_path: Path) -> None:
    """A platform without ``os.register_at_fork`` (no fork): import and save still work."""
    proc = _run(
        """
        import os, sys
        import torch, anyio, aiofiles  # these pick their own path on such platforms
        del os.register_at_fork, os.fork  # a platform without fork (Windows)
        import snapwriter
        with snapwriter.StandardWriter(out_dir=sys.argv[1]) as w:
            w("a.pt", "", {"x": 1})
        print("ok")
        """,
        str(tmp_path),
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert (tmp_path / "a.pt").exists()


def test_portal_without_thread_name_argument(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """anyio < 4.10 has no ``start_blocking_portal(name=...)``: the fallback names the
    loop thread itself."""
    real = _portal.start_blocking_portal

    def old_anyio(backend: str = "asyncio", backend_options: Any = None) -> Any:
        return real(backend, backend_options)

    monkeypatch.setattr(_portal, "start_blocking_portal", old_anyio)
    assert not _portal._portal_takes_name()
    names: list[str] = []

    def savefun(target: Any, f: Any) -> None:
        torch.save(target, f)

    with snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=savefun) as w:
        w("a.pt", "", {"x": 1}).result()
        names = [t.name for t in threading.enumerate()]
        assert any(n == w._portal.name for n in names), names
    assert torch.load(tmp_path / "a.pt") == {"x": 1}


# -- 9. never block the event loop -----------------------------------------------------


def test_sync_call_on_a_running_loop_raises_when_full(tmp_path: Path) -> None:
    gate = threading.Event()

    def held(target: Any, f: Any) -> None:
        gate.wait(60)
        torch.save(target, f)

    async def main() -> float:
        w = snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=held, max_pending=1)
        first = w("a.pt", "", {"x": 1})
        begin = time.monotonic()
        with pytest.raises(snapwriter.WriterBusyError, match="wait_for_room"):
            w("b.pt", "", {"x": 2})  # would block the loop until a.pt is done
        refused_in = time.monotonic() - begin
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, gate.set)  # the loop keeps running meanwhile
        await w.wait_for_room()
        await first
        await w.asave("b.pt", "", {"x": 2})
        await w.aclose()
        return refused_in

    assert asyncio.run(main()) < 0.5
    assert torch.load(tmp_path / "b.pt") == {"x": 2}
