"""ProcessWriter(staging="fork"): a copy-on-write snapshot per call, checked against
torch.save of the state at the call."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter
from snapwriter._cow import AUTO_MIN_STORAGES, unforkable
from snapwriter._save import SaveRequest
from tests.conftest import load, make_state


def _torch_save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _forked(w: snapwriter.ProcessWriter) -> int:
    stats = w.saver_stats()
    assert stats is not None
    return stats.forked


def test_files_are_torch_saves_of_the_state_at_the_call(tmp_path: Path) -> None:
    model = {f"p{i}": torch.full((64,), float(i)) for i in range(300)}
    state = {"model": model, "extra": make_state(), "step": 0}
    with snapwriter.ProcessWriter(out_dir=str(tmp_path), staging="fork") as w:
        expected = []
        for i in range(3):
            state["step"] = i
            expected.append(_torch_save(state))
            handle = w(f"s{i}.pt", "", state)
            for t in model.values():  # the next optimizer step, before the write is done
                t.add_(100.0)
            handle.result(timeout=120)
        assert _forked(w) == 3
        assert w._stager.allocations == 0  # nothing was staged
    for i in range(3):
        assert (tmp_path / f"s{i}.pt").read_bytes() == expected[i]


def test_many_small_tensors(tmp_path: Path) -> None:
    state = {f"p{i}": torch.randn(16) for i in range(5000)}
    with snapwriter.ProcessWriter(out_dir=str(tmp_path), staging="fork") as w:
        expected = _torch_save(state)
        w("a.pt", "", state).result(timeout=120)
        w("b.pt", "", state).result(timeout=120)
        assert _forked(w) == 2
    assert (tmp_path / "a.pt").read_bytes() == expected
    assert (tmp_path / "b.pt").read_bytes() == expected


def test_calls_a_fork_cannot_save_are_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {"w": torch.randn(10)}
    with snapwriter.ProcessWriter(out_dir=str(tmp_path), staging="fork") as w:
        w.initialize(str(tmp_path))
        w("a.pt", "", state, append=True).result(timeout=120)  # append: in place
        assert _forked(w) == 0
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        w("b.pt", "", state).result(timeout=120)  # device memory is not forked
        assert _forked(w) == 0
        request = SaveRequest(w._destination("x.pt", ""), {}, torch.save, fs=w.fs)
        assert "cuda" in str(unforkable(request))
    assert (tmp_path / "b.pt").read_bytes() == _torch_save(state)


def test_a_failing_savefun_fails_the_handle_with_its_exception(tmp_path: Path) -> None:
    def failing(obj: Any, f: Any) -> None:
        f.write(b"partial")
        raise ValueError("no room for this one")

    (tmp_path / "a.pt").write_bytes(_torch_save({"generation": 0}))
    with snapwriter.ProcessWriter(out_dir=str(tmp_path), staging="fork") as w:
        w.initialize(str(tmp_path))
        handle = w("a.pt", "", {"x": 1}, savefun=failing)  # a closure: forks need no pickle
        with pytest.raises(snapwriter.SnapshotWriteError) as info:
            handle.result(timeout=120)
        assert isinstance(info.value.__cause__, ValueError)
        assert "a.pt" in str(info.value)
        w("b.pt", "", {"x": 2}).result(timeout=120)
    assert load(tmp_path / "a.pt") == {"generation": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]


def test_a_killed_child_fails_its_save_and_leaves_the_previous_snapshot(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    out.mkdir()
    (out / "snap.pt").write_bytes(_torch_save({"generation": 0}))

    def blocking(obj: Any, f: Any) -> None:
        with open(fifo, "wb") as pipe:
            pipe.write(f"{os.getpid()}\n".encode())
            pipe.flush()
            pipe.write(b"y" * (1 << 20))  # blocks: the test reads one line only

    with snapwriter.ProcessWriter(out_dir=str(out), staging="fork") as w:
        w.initialize(str(out))
        handle = w("snap.pt", "", {"generation": 1}, savefun=blocking)
        with open(fifo, "rb") as reader:
            pid = int(reader.readline())
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(snapwriter.SnapshotWriteError) as info:
                handle.result(timeout=60)
        cause = info.value.__cause__
        assert isinstance(cause, snapwriter.ChildProcessFailure)
        assert "snap.pt" in str(cause) and "SIGKILL" in str(cause)
        w("after.pt", "", {"generation": 2}).result(timeout=120)
    assert load(out / "snap.pt") == {"generation": 0}
    assert load(out / "after.pt") == {"generation": 2}
    # the writer removed the dead child's temporary file itself
    assert sorted(p.name for p in out.iterdir()) == ["after.pt", "snap.pt"]


def test_staging_must_be_shared_or_fork() -> None:
    with pytest.raises(snapwriter.InvalidSnapshotArgument, match="staging"):
        snapwriter.ProcessWriter(staging="copy")


def test_auto_forks_once_a_save_showed_many_small_storages(tmp_path: Path) -> None:
    small = {f"p{i}": torch.full((8,), float(i)) for i in range(AUTO_MIN_STORAGES)}
    large = {"w": torch.randn(64, 1024), "b": torch.randn(4096)}
    with snapwriter.ProcessWriter(out_dir=str(tmp_path), staging="auto") as w:
        w("l0.pt", "", large).result(timeout=120)  # the first save forks, and learns
        assert _forked(w) == 1
        w("l1.pt", "", large).result(timeout=120)
        assert _forked(w) == 1  # few large storages: staged
        w("s0.pt", "", small).result(timeout=120)  # staged: that is how it learns
        assert _forked(w) == 1
        for i in (1, 2):
            expected = _torch_save(small)
            handle = w(f"s{i}.pt", "", small)
            small["p0"].add_(1.0)  # after the call: not in the file
            handle.result(timeout=120)
            assert (tmp_path / f"s{i}.pt").read_bytes() == expected
        assert _forked(w) == 3
        w("l2.pt", "", large).result(timeout=120)  # forked: the child says it was large
        w("l3.pt", "", large).result(timeout=120)
        assert _forked(w) == 4
        w("c0.pt", "", small, savefun=_save_with_pickle_protocol_2).result(timeout=120)
        assert _forked(w) == 4  # after large: staged, and learns small again
        w("c1.pt", "", small, savefun=_save_with_pickle_protocol_2).result(timeout=120)
        assert _forked(w) == 5  # forked: a custom savefun's child cannot say
        w("c2.pt", "", small).result(timeout=120)
        assert _forked(w) == 5  # so this one stages
    assert (tmp_path / "l3.pt").read_bytes() == _torch_save(large)


def test_auto_decision_rule() -> None:
    from snapwriter._cow import many_small_storages

    assert not many_small_storages(None)
    assert many_small_storages((50_000, 50_000 * 1024))
    assert not many_small_storages((AUTO_MIN_STORAGES - 1, 1024 * (AUTO_MIN_STORAGES - 1)))
    assert many_small_storages((AUTO_MIN_STORAGES, 1024 * AUTO_MIN_STORAGES))
    assert not many_small_storages((190, 512 << 20))
    assert not many_small_storages((5000, 5000 * 13_000))


def _ppe_run(writer: Any, out: Path, epochs: int) -> tuple[list[str], Any]:
    from pytorch_pfn_extras import training
    from pytorch_pfn_extras.training import extensions

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = training.ExtensionsManager(
        model, optimizer, epochs, iters_per_epoch=2, out_dir=str(out)
    )
    manager.extend(
        extensions.snapshot(writer=writer, n_retains=2, autoload=True), trigger=(1, "epoch")
    )
    while not manager.stop_trigger:
        with manager.run_iteration():
            optimizer.zero_grad()
            model(torch.ones(1, 3)).sum().backward()
            optimizer.step()
    writer.finalize()
    names = sorted(os.listdir(out))
    return names, torch.load(out / names[-1], weights_only=False)


def test_ppe_snapshot_extension_against_ppes_own_process_writer(tmp_path: Path) -> None:
    """ppe's snapshot extension (n_retains, autoload) with a forking snapwriter writer
    keeps and writes what it keeps with ppe's own ProcessWriter."""
    pytest.importorskip("pytorch_pfn_extras")
    from pytorch_pfn_extras import writing

    ours = _ppe_run(
        snapwriter.ProcessWriter(out_dir=str(tmp_path / "ours"), staging="fork"),
        tmp_path / "ours",
        4,
    )
    theirs = _ppe_run(writing.ProcessWriter(out_dir=str(tmp_path / "ppe")), tmp_path / "ppe", 4)
    assert ours[0] == theirs[0] == ["snapshot_iter_6", "snapshot_iter_8"]
    for key in ("models", "optimizers"):
        a, b = ours[1][key]["main"], theirs[1][key]["main"]
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], torch.Tensor):
                assert torch.equal(a[name], b[name]), name
            else:
                assert a[name] == b[name], name


def _save_with_pickle_protocol_2(obj: Any, f: Any) -> None:
    torch.save(obj, f, pickle_protocol=2)
