"""The persistent saving process of the process writers (snapwriter._saver, _shm).

Default start method (the zygote interpreter) unless a test says otherwise; real files,
compared with torch.save's bytes.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter
from snapwriter._saver import SaverStats
from tests.conftest import load, run_python, torch_save_bytes

ROOT = Path(__file__).resolve().parents[1]
PROCESS_WRITERS = ["ProcessWriter", "ProcessQueueWriter"]


def _stats(writer: Any) -> SaverStats:
    stats = writer.saver_stats()
    assert stats is not None
    return stats  # type: ignore[no-any-return]


def _gone_within(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` (not necessarily our child) has exited within ``timeout``."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


@pytest.mark.parametrize("writer", PROCESS_WRITERS)
def test_many_small_tensors_with_few_file_descriptors(tmp_path: Path, writer: str) -> None:
    """20,000 tensors under a 256-descriptor limit: each file is torch.save's, byte for
    byte; one saving process; the warm save sends no segment and reuses data.pkl."""
    code = """
        import io, json, resource, sys, torch, snapwriter
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        def ref(obj):
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            return buffer.getvalue()
        state = {f"t{i}": torch.full((4,), float(i)) for i in range(20_000)}
        state["meta"] = {"step": 3, "name": "run"}
        out = {}
        with getattr(snapwriter, sys.argv[2])(out_dir=sys.argv[1]) as w:
            w("a.pt", "", state).result(timeout=200)
            out["a"] = open(sys.argv[1] + "/a.pt", "rb").read() == ref(state)
            first = w.saver_stats()
            state["t0"].add_(1)  # same layout, new values
            w("b.pt", "", state).result(timeout=200)
            out["b"] = open(sys.argv[1] + "/b.pt", "rb").read() == ref(state)
            second = w.saver_stats()
        out["first"], out["second"] = vars(first), vars(second)
        print(json.dumps(out))
    """
    proc = run_python(code, str(tmp_path), writer, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["a"] and out["b"], "not torch.save's bytes"
    first, second = out["first"], out["second"]
    assert first["starts"] == second["starts"] == 1
    assert first["pid"] == second["pid"]
    assert first["segments"] <= 2 and second["segments"] == first["segments"]
    assert second["segments_sent"] == first["segments_sent"]  # warm: nothing new sent
    assert second["blocks"] == first["blocks"]  # warm: nothing allocated
    assert second["same_pickle"] == first["same_pickle"] + 1


@pytest.mark.parametrize("writer", PROCESS_WRITERS)
def test_one_saving_process_and_finalize_stops_it(tmp_path: Path, writer: str) -> None:
    w = getattr(snapwriter, writer)(out_dir=str(tmp_path))
    pids = set()
    for i in range(3):
        state = {"w": torch.full((8,), float(i)), "step": i}
        w(f"s{i}.pt", "", state).result(timeout=120)
        assert (tmp_path / f"s{i}.pt").read_bytes() == torch_save_bytes(state)
        pids.add(_stats(w).pid)
    assert len(pids) == 1 and _stats(w).starts == 1
    (pid,) = pids
    assert pid is not None
    w.finalize()
    assert _gone_within(pid, 30), "the saving process outlived finalize()"
    assert _stats(w).pid is None


def test_killed_while_idle_next_save_starts_a_new_one(tmp_path: Path) -> None:
    with snapwriter.ProcessWriter(out_dir=str(tmp_path)) as w:
        w("a.pt", "", {"v": torch.ones(3)}).result(timeout=120)
        first = _stats(w).pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert _gone_within(first, 30)
        state = {"v": torch.full((3,), 2.0)}
        w("b.pt", "", state).result(timeout=120)
        stats = _stats(w)
        assert stats.starts == 2 and stats.pid not in (None, first)
        assert stats.segments_sent == 2  # the one segment, again for the new process
    assert (tmp_path / "b.pt").read_bytes() == torch_save_bytes(state)


def blocking_save(target: Any, f: Any) -> None:
    """A savefun that writes half a file, then blocks on a FIFO the test never reads."""
    f.write(b"half a snapshot")
    f.flush()
    with open(target["fifo"], "wb") as fifo:  # opens once the test opened it to read
        fifo.write(b"x")
        fifo.flush()
        fifo.write(b"y" * (1 << 20))  # blocks: the test reads one byte only


def test_killed_during_a_save(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    torch.save({"generation": 0}, out / "snap.pt")
    w = snapwriter.ProcessWriter(out_dir=str(out))
    w("warm.pt", "", {"x": 1}).result(timeout=120)
    handle = w("snap.pt", "", {"fifo": str(fifo)}, savefun=blocking_save)
    with open(fifo, "rb") as reader:
        assert reader.read(1) == b"x"  # the child is inside savefun now
        pid = _stats(w).pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(snapwriter.SnapshotWriteError) as info:
            handle.result(timeout=60)
    cause = info.value.__cause__
    assert isinstance(cause, snapwriter.ChildProcessFailure)
    assert "snap.pt" in str(cause) and "SIGKILL" in str(cause)
    assert load(out / "snap.pt") == {"generation": 0}
    assert any(snapwriter.is_temp_name(p.name) for p in out.iterdir())
    w("after.pt", "", {"x": 2}).result(timeout=120)  # a new saving process
    assert _stats(w).starts == 2
    w.finalize()
    with snapwriter.ProcessWriter(out_dir=str(out)) as fresh:
        fresh.initialize(str(out))
    assert sorted(p.name for p in out.iterdir()) == ["after.pt", "snap.pt", "warm.pt"]


@pytest.mark.parametrize("how", ["sigkill", "os_exit"])
def test_no_saving_process_outlives_the_trainer(tmp_path: Path, how: str) -> None:
    code = """
        import os, sys, torch, snapwriter, snapwriter._saver
        w = snapwriter.ProcessQueueWriter(out_dir=sys.argv[1])
        w("a.pt", "", {"v": torch.ones(2)}).result(timeout=200)
        print(w.saver_stats().pid, snapwriter._saver._zygote.pid, flush=True)
        if sys.argv[2] == "os_exit":
            os._exit(0)
        sys.stdin.read()
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    program = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert program.stdout is not None and program.stdin is not None
    saver, zygote = (int(x) for x in program.stdout.readline().split())
    if how == "sigkill":
        program.kill()
    program.wait(60)
    program.stdin.close()
    program.stdout.close()
    assert _gone_within(saver, 20), "the saving process outlived the trainer"
    assert _gone_within(zygote, 20), "the zygote outlived the trainer"


def test_fork_context_and_custom_savefun(tmp_path: Path) -> None:
    """mp_context='fork' is honoured; a custom savefun gets the object graph."""

    def closure(target: Any, f: Any) -> None:  # does not pickle: fork falls back
        torch.save(target, f)

    with snapwriter.ProcessWriter(out_dir=str(tmp_path), mp_context="fork") as w:
        state = {"t": torch.arange(5), "shared": [torch.ones(2)] * 2}
        w("a.pt", "", state).result(timeout=60)
        assert _stats(w).starts == 1
        w("b.pt", "", state, savefun=snapwriter_save).result(timeout=60)
        w("c.pt", "", state, savefun=closure).result(timeout=60)
        assert _stats(w).starts == 1
    assert (tmp_path / "a.pt").read_bytes() == torch_save_bytes(state)
    loaded = load(tmp_path / "b.pt")
    assert torch.equal(loaded["t"], state["t"]) and loaded["marker"] == "custom"
    assert loaded["shared"][0] is loaded["shared"][1]
    assert torch.equal(load(tmp_path / "c.pt")["t"], state["t"])


def snapwriter_save(target: Any, f: Any) -> None:
    torch.save({**target, "marker": "custom"}, f)


def test_create_worker_still_returns_a_process(tmp_path: Path) -> None:
    import multiprocessing

    w = snapwriter.ProcessWriter(out_dir=str(tmp_path))
    worker = w.create_worker("x.pt", "", {"x": 1})
    assert isinstance(worker, multiprocessing.Process)
    w.finalize()


@pytest.mark.parametrize("cls", ["ProcessWriter", "ProcessQueueWriter"])
def test_without_a_saving_process_the_per_save_paths_write_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cls: str
) -> None:
    """Where memfd segments and pidfds do not exist (not Linux), the process writers keep
    their per-save child and pipe-fed consumer, and still write torch.save's file."""
    monkeypatch.setattr("snapwriter._saver.SUPPORTED", False)
    state = {"w": torch.arange(12.0).reshape(3, 4), "step": 3}
    writer = getattr(snapwriter, cls)(out_dir=str(tmp_path), mp_context="fork")
    try:
        assert writer.saver_stats() is None
        writer("snap.pt", str(tmp_path), state).result(timeout=120)
    finally:
        writer.finalize()
    assert (tmp_path / "snap.pt").read_bytes() == torch_save_bytes(state)


def test_shared_staging_needs_no_numpy(tmp_path: Path) -> None:
    """NumPy is not a dependency: without it snapwriter imports, and a process writer
    stages into shared memory and writes torch.save's file."""
    code = """
        import io, sys
        sys.modules["numpy"] = None  # as if NumPy were not installed
        import torch, snapwriter
        state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5), "step": 7}
        writer = snapwriter.ProcessWriter(out_dir=sys.argv[1], mp_context="fork")
        writer("snap.pt", sys.argv[1], state).result(timeout=120)
        assert writer.saver_stats().blocks == 2, writer.saver_stats()
        writer.finalize()
        ref = io.BytesIO()
        torch.save(state, ref)
        with open(sys.argv[1] + "/snap.pt", "rb") as f:
            assert f.read() == ref.getvalue()
        print("same file")
    """
    proc = run_python(code, str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "same file" in proc.stdout


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd here")
def test_shared_blocks_come_back_when_their_storage_is_gone() -> None:
    """A staged storage that is dropped gives its block back (reused by the next one of
    that size); the allocator never grows for a layout that keeps changing."""
    import gc

    from snapwriter._shm import SharedMemory

    shm = SharedMemory()
    try:
        first = shm.allocate(1000)
        where = shm.locate(first)
        assert where is not None
        del first
        gc.collect()
        again = shm.allocate(1000)
        assert shm.locate(again) == where  # the same block
        for _ in range(200):  # churn: sizes come and go
            kept = [shm.allocate(1 << 16) for _ in range(50)]  # 640 MiB if never reused
            del kept
        assert shm.stats.segments == 1
        assert shm.stats.blocks == 2 + 200 * 50
    finally:
        shm.close()


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd here")
def test_a_block_stays_taken_while_a_tensor_over_it_lives() -> None:
    """Blocks are freed by the death of their storage's memory, not of one Python
    object over it: with the storage object dropped but a tensor (and a view of it)
    still over the block, the next allocation of that size gets another block, and the
    tensor's bytes are left alone; the block comes back once the last view is gone."""
    import gc

    from snapwriter import _shm
    from snapwriter._shm import SharedMemory

    assert _shm._PRESERVED  # this torch keeps a storage's object as long as its memory
    shm = SharedMemory()
    try:
        storage = shm.allocate(256)
        where = shm.locate(storage)
        tensor = torch.empty(0, dtype=torch.uint8).set_(storage).view(torch.float32)
        tensor.fill_(3.0)
        del storage
        gc.collect()
        other = shm.allocate(256)
        assert shm.locate(other) != where
        torch.empty(0, dtype=torch.uint8).set_(other).fill_(0xFF)
        assert torch.equal(tensor, torch.full((64,), 3.0))
        assert shm.locate(tensor.untyped_storage()) == where
        view = tensor[8:]
        del tensor
        gc.collect()
        assert shm.allocate(256) is not None and shm.stats.blocks == 3  # still taken
        third = shm.locate(shm.allocate(256))
        assert third != where
        del view
        gc.collect()
        assert shm.locate(shm.allocate(256)) == where  # back once the last view went
    finally:
        shm.close()


def test_a_forked_trainer_gets_its_own_zygote_not_a_fork_of_itself(tmp_path: Path) -> None:
    """A process forked from one that imported snapwriter (a launcher, a benchmark
    driver) still saves through a fresh, torch-free zygote: its saving process holds no
    copy of the trainer's memory (which the trainer's next writes would duplicate)."""
    code = """
        import os, sys, torch, snapwriter, snapwriter._saver
        state = {"v": torch.ones(1000)}
        pid = os.fork()
        if pid == 0:
            with snapwriter.ProcessWriter(out_dir=sys.argv[1]) as w:
                w("a.pt", "", state).result(timeout=200)
                saver = w.saver_stats().pid
                zygote = snapwriter._saver._zygote.pid
                with open(f"/proc/{saver}/maps") as f:
                    torch_in_saver = "libtorch" in f.read()
                with open(f"/proc/{zygote}/cmdline") as f:
                    fresh = "_saver_child" in f.read()
                print(os.getpid(), saver, zygote, torch_in_saver, fresh, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=200,
        check=True,
    )
    child, saver, zygote, torch_in_saver, fresh = proc.stdout.split()
    assert torch_in_saver == "False" and fresh == "True", proc.stdout
    assert saver != child and zygote != child
    assert torch.equal(load(tmp_path / "a.pt")["v"], torch.ones(1000))


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd here")
def test_many_blocks_at_once_are_allocate_s_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``allocate_many`` (the first save of a big state dict) carves the same blocks as
    one ``allocate`` each: located, exactly sized, freed when dropped; where no segment
    can be made, each is private memory, counted, as ``allocate`` makes it."""
    import gc

    from snapwriter import _shm
    from snapwriter._shm import SharedMemory

    shm = SharedMemory()
    try:
        sizes = [1000, 0, 64, 3 << 20, 1]
        many = shm.allocate_many(sizes)
        assert [s.nbytes() for s in many] == sizes
        places = [shm.locate(s) for s in many]
        assert all(p is not None for p in places)
        assert len({p[:2] for p in places if p is not None and p[2]}) == 4  # distinct blocks
        assert shm.stats.blocks == 4  # the empty storage takes no block
        first = places[0]
        del many
        gc.collect()
        assert shm.locate(shm.allocate(1000)) == first  # freed, and taken again
    finally:
        shm.close()

    def no_segment(*args: object) -> None:
        raise OSError(27, "File too large")

    monkeypatch.setattr(_shm.Segment, "__init__", no_segment)
    shm = SharedMemory()
    try:
        private = shm.allocate_many([100, 200])
        assert [s.nbytes() for s in private] == [100, 200]
        assert shm.stats.private_blocks == 2
        assert [shm.locate(s) for s in private] == [None, None]
    finally:
        shm.close()
