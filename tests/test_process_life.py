"""Process life: exit with saves in flight, kill -9 mid-save, fork while a writer exists."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import snapwriter
from tests.conftest import load
from tests.conftest import run_python as _run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "writer",
    [
        "StandardWriter(",
        "ProcessWriter(mp_context='fork', ",
        "ThreadQueueWriter(",
        "ProcessQueueWriter(mp_context='fork', ",
    ],
)
def test_exit_with_save_in_flight_completes_it(tmp_path: Path, writer: str) -> None:
    code = f"""
        import sys, time, torch, snapwriter
        def slow(target, f):
            time.sleep(0.5)  # the interpreter is exiting meanwhile
            torch.save(target, f)
        w = snapwriter.{writer}savefun=slow, out_dir=sys.argv[1])
        w("snap.pt", "", {{"x": torch.arange(1000)}})
        # no finalize(): the exit hook must complete the save
    """
    proc = _run(code, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load(tmp_path / "snap.pt")["x"], torch.arange(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["snap.pt"]


def test_exit_timeout_reports_lost_loudly(tmp_path: Path) -> None:
    code = """
        import sys, threading, snapwriter
        never = threading.Event()
        w = snapwriter.StandardWriter(savefun=lambda t, f: never.wait(), out_dir=sys.argv[1])
        w("stuck.pt", "", {"x": 1})
    """
    proc = _run(code, str(tmp_path), timeout=60, env={snapwriter.EXIT_TIMEOUT_ENV: "0.5"})
    assert proc.returncode == 70
    assert "LOST" in proc.stderr and "stuck.pt" in proc.stderr
    assert not (tmp_path / "stuck.pt").exists()


def test_kill_during_save_leaves_previous_loadable(tmp_path: Path) -> None:
    torch.save({"generation": 0}, tmp_path / "snap.pt")
    code = """
        import os, sys, torch, snapwriter
        def dying(target, f):
            f.write(b"half a snapshot")
            f.flush()
            os.kill(os.getpid(), 9)
        w = snapwriter.StandardWriter(savefun=dying, out_dir=sys.argv[1])
        w("snap.pt", "", {"generation": 1}).result()
    """
    proc = _run(code, str(tmp_path))
    assert proc.returncode == -signal.SIGKILL
    assert load(tmp_path / "snap.pt") == {"generation": 0}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "snap.pt"]
    assert len(leftovers) == 1 and snapwriter.is_temp_name(leftovers[0])
    # the next writer that opens the directory removes the leftover of the dead process
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        w("snap.pt", "", {"generation": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["snap.pt"]
    assert load(tmp_path / "snap.pt") == {"generation": 2}


def test_fork_child_uses_its_own_writer(tmp_path: Path) -> None:
    parent_writer = snapwriter.StandardWriter(out_dir=str(tmp_path))
    parent_writer("parent.pt", "", {"who": "parent"}).result()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status, never return to pytest
        status = 1
        try:
            try:
                parent_writer("inherited.pt", "", {"who": "child"})
            except snapwriter.WriterClosedError:
                status = 2
            if status == 2:
                with snapwriter.StandardWriter(out_dir=str(tmp_path)) as own:
                    own("child.pt", "", {"who": "child"})
                status = 0
        finally:
            os.write(write_end, b"x")
            os._exit(status)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    assert load(tmp_path / "child.pt") == {"who": "child"}
    assert not (tmp_path / "inherited.pt").exists()
    parent_writer("parent2.pt", "", {"who": "parent"}).result()  # the parent's still works
    parent_writer.finalize()


def test_forked_child_exits_cleanly_with_inherited_writer(tmp_path: Path) -> None:
    code = """
        import os, sys, snapwriter
        w = snapwriter.StandardWriter(out_dir=sys.argv[1])
        w("a.pt", "", {"x": 1}).result()
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a normal interpreter exit in the child must not hang
        _, status = os.waitpid(pid, 0)
        w.finalize()
        sys.exit(os.waitstatus_to_exitcode(status))
    """
    assert _run(code, str(tmp_path), timeout=60).returncode == 0


def test_consumer_killed_while_idle_is_replaced(tmp_path: Path) -> None:
    """A ProcessQueueWriter whose consumer died between saves starts a new one: the
    next save succeeds (it never reached the dead consumer)."""
    with snapwriter.ProcessQueueWriter(out_dir=str(tmp_path), mp_context="fork") as w:
        w("a.pt", "", {"v": torch.ones(2)}).result(timeout=60)
        consumer = w._consumer._process
        consumer.kill()
        consumer.join(30)
        assert consumer.exitcode == -signal.SIGKILL
        w("b.pt", "", {"v": torch.full((2,), 2.0)}).result(timeout=60)
        assert w._consumer._process is not consumer
    assert torch.equal(load(tmp_path / "b.pt")["v"], torch.full((2,), 2.0))


def test_consumer_exits_when_its_parent_dies(tmp_path: Path) -> None:
    """The consumer of a ProcessQueueWriter whose program was killed does not linger."""
    code = textwrap.dedent(
        f"""
        import os, sys, torch, snapwriter
        w = snapwriter.ProcessQueueWriter(out_dir={str(tmp_path)!r}, mp_context="fork")
        w("a.pt", "", {{"v": torch.ones(2)}}).result(timeout=60)
        print(w._consumer._process.pid, flush=True)
        sys.stdin.read()
        """
    )
    program = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert program.stdout is not None and program.stdin is not None
    consumer_pid = int(program.stdout.readline())
    program.kill()
    program.wait(60)
    program.stdin.close()
    program.stdout.close()
    # The consumer notices within its poll interval. It is not our child: wait on a
    # pidfd, which becomes readable when the process exits.
    try:
        pidfd = os.pidfd_open(consumer_pid)
    except ProcessLookupError:
        return  # already gone
    try:
        readable, _, _ = select.select([pidfd], [], [], 30)
    finally:
        os.close(pidfd)
    assert readable, "the consumer outlived its parent"
