"""Drop-in use inside pytorch-pfn-extras: snapshot extension, n_retains, autoload."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter
from tests.conftest import FACTORIES

ppe = pytest.importorskip("pytorch_pfn_extras")
from pytorch_pfn_extras.training import ExtensionsManager, extensions  # noqa: E402


def _manager(model: torch.nn.Module, writer: Any, out: Path, *exts: Any) -> ExtensionsManager:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = ExtensionsManager(
        model, optimizer, max_epochs=1, iters_per_epoch=10, out_dir=str(out), writer=writer
    )
    for ext in exts:
        manager.extend(ext, trigger=(1, "iteration"))
    return manager


def _train(manager: ExtensionsManager, model: torch.nn.Module, steps: int) -> None:
    optimizer = manager._optimizers["main"]
    for _ in range(steps):
        with manager.run_iteration():
            optimizer.zero_grad()
            loss = model(torch.ones(2, 4)).sum()
            loss.backward()
            optimizer.step()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_snapshot_n_retains_and_autoload(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    writer = FACTORIES[name](out_dir=str(tmp_path))
    snap = extensions.snapshot(writer=writer, n_retains=3)
    manager = _manager(model, writer, tmp_path, snap)
    _train(manager, model, 10)
    writer.finalize()
    names = sorted(os.listdir(tmp_path), key=lambda n: int(n.rsplit("_", 1)[1]))
    assert names == [f"snapshot_iter_{i}" for i in (8, 9, 10)]
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    # A new run with autoload resumes from the newest snapshot.
    fresh = torch.nn.Linear(4, 3)
    writer2 = FACTORIES[name](out_dir=str(tmp_path))
    snap2 = extensions.snapshot(writer=writer2, n_retains=3, autoload=True)
    manager2 = _manager(fresh, writer2, tmp_path, snap2)
    loaded = snap2.initialize(manager2)
    assert loaded == "snapshot_iter_10"
    assert manager2.iteration == 10
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, trained[k])
    writer2.finalize()


def test_snapshot_object(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    writer = snapwriter.StandardWriter(out_dir=str(tmp_path))
    manager = _manager(
        model, writer, tmp_path, extensions.snapshot_object(model, "model_{.iteration}.pt")
    )
    _train(manager, model, 3)
    writer.finalize()
    loaded = torch.load(tmp_path / "model_3.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v)


def test_writer_in_manager_argument_only(tmp_path: Path) -> None:
    """ppe's manager finalizes the writer it was given; snapwriter must accept that."""
    model = torch.nn.Linear(4, 3)
    writer = snapwriter.ThreadWriter(out_dir=str(tmp_path))
    manager = _manager(model, writer, tmp_path, extensions.snapshot())
    _train(manager, model, 10)  # the manager finalizes at the end of training
    writer.finalize()
    assert os.path.exists(tmp_path / "snapshot_iter_10")


class CustomThreadWriter(snapwriter.ThreadWriter):
    """A ppe-style subclass overriding create_worker with a bare thread."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.workers = 0

    def create_worker(self, filename, out_dir, target, *, savefun=None, append=False, **kwds):  # type: ignore[no-untyped-def]
        self.workers += 1
        return threading.Thread(
            target=self.save, args=(filename, out_dir, target, savefun, append), kwargs=kwds
        )


def test_subclass_overriding_create_worker(tmp_path: Path) -> None:
    w = CustomThreadWriter(out_dir=str(tmp_path))
    state = {"x": torch.ones(3)}
    h = w("a.pt", "", state)
    state["x"].add_(1)  # still staged before the worker sees it
    h.result()
    w.finalize()
    assert w.workers == 1
    assert torch.equal(torch.load(tmp_path / "a.pt")["x"], torch.ones(3))


def test_create_worker_contract(tmp_path: Path) -> None:
    """create_worker() on its own returns a ppe-style worker (start/join/exitcode)."""
    for cls in (snapwriter.StandardWriter, snapwriter.ThreadWriter):
        w = cls(out_dir=str(tmp_path))
        worker = w.create_worker("w.pt", "", {"x": 1}, savefun=torch.save)
        worker.start()
        worker.join()
        assert worker.exitcode == 0
        w.finalize()
        assert torch.load(tmp_path / "w.pt") == {"x": 1}
    bad = snapwriter.StandardWriter(out_dir=str(tmp_path))
    worker = bad.create_worker("../x.pt", "", {"x": 1})
    worker.start()
    worker.join()
    assert worker.exitcode == 1 and isinstance(worker.error, snapwriter.InvalidSnapshotArgument)
    bad.finalize()
    pw = snapwriter.ProcessWriter(out_dir=str(tmp_path), mp_context="fork")
    worker = pw.create_worker("p.pt", "", {"x": 2})
    worker.start()
    worker.join()
    assert worker.exitcode == 0 and torch.load(tmp_path / "p.pt") == {"x": 2}
    pw.finalize()


def test_ppe_fs_interface_on_default_fs(tmp_path: Path) -> None:
    fs = snapwriter.StandardWriter().fs
    fs.makedirs(str(tmp_path / "d"), exist_ok=True)
    with fs.open(str(tmp_path / "d" / "f"), "wb") as f:
        f.write(b"abc")
    assert fs.exists(str(tmp_path / "d" / "f"))
    assert list(fs.list(str(tmp_path))) == ["d"]
    assert sorted(fs.list(str(tmp_path), recursive=True)) == ["d", os.path.join("d", "f")]
    assert fs.stat(str(tmp_path / "d" / "f")).size == 3
    fs.rename(str(tmp_path / "d" / "f"), str(tmp_path / "d" / "g"))
    fs.remove(str(tmp_path / "d" / "g"))
    fs.remove(str(tmp_path / "d"))
    assert list(fs.list(str(tmp_path))) == []


def test_ppe_posix_fs_is_accepted(tmp_path: Path) -> None:
    """A ppe/PFIO-style fs object (not snapwriter's) works through its own methods."""
    from pytorch_pfn_extras.writing._writer_base import _PosixFileSystem

    fs = _PosixFileSystem()  # its rename() ignores a root: use absolute paths
    with snapwriter.StandardWriter(fs=fs, out_dir=str(tmp_path / "run"), keep_last=2) as w:
        for i in range(4):
            w(f"s_{i}.pt", "", {"i": i})
    assert sorted(os.listdir(tmp_path / "run")) == ["s_2.pt", "s_3.pt"]
    assert torch.load(tmp_path / "run" / "s_3.pt") == {"i": 3}
