"""Every writer saves, and the file loads back equal."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter
from tests.conftest import WriterFactory, assert_same, load, make_state


def test_round_trip(make_writer: WriterFactory, tmp_path: Path) -> None:
    state = make_state()
    w = make_writer(out_dir=str(tmp_path))
    handle = w("snap.pt", "", state)
    result = handle.result(timeout=60)
    w.finalize()
    assert result.path == str(tmp_path / "snap.pt")
    assert result.nbytes == os.path.getsize(tmp_path / "snap.pt")
    assert_same(state, load(tmp_path / "snap.pt"))
    assert os.listdir(tmp_path) == ["snap.pt"]  # no temporary file left behind


def test_overwrite_keeps_last(make_writer: WriterFactory, tmp_path: Path) -> None:
    w = make_writer(out_dir=str(tmp_path))
    for i in range(4):
        w("snap.pt", "", {"i": i, "t": torch.full((3,), float(i))})
    w.finalize()
    got = load(tmp_path / "snap.pt")
    assert got["i"] == 3 and torch.equal(got["t"], torch.full((3,), 3.0))


def test_subdirectory_filename(make_writer: WriterFactory, tmp_path: Path) -> None:
    w = make_writer(out_dir=str(tmp_path))
    w("run/a/snap.pt", "", {"x": torch.ones(2)})
    w.finalize()
    assert torch.equal(load(tmp_path / "run" / "a" / "snap.pt")["x"], torch.ones(2))


def test_constructor_out_dir_takes_precedence(make_writer: WriterFactory, tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    w = make_writer(out_dir=str(mine))
    w("snap.pt", str(theirs), {"x": 1})
    w.finalize()
    assert (mine / "snap.pt").exists()
    assert not theirs.exists()


def test_call_out_dir_ignored_like_ppe(
    make_writer: WriterFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ppe writes relative to the writer's out_dir (the cwd when empty), never the call's:
    the one directory that n_retains and autoload read."""
    monkeypatch.chdir(tmp_path)
    w = make_writer()
    w("snap.pt", str(tmp_path / "call"), {"x": 1})
    w.finalize()
    assert load(tmp_path / "snap.pt") == {"x": 1}
    assert not (tmp_path / "call").exists()


def _json_save(target: Any, f: Any, *, indent: int = 0) -> None:
    f.write(json.dumps(target, indent=indent).encode())


def test_custom_savefun_and_kwargs(make_writer: WriterFactory, tmp_path: Path) -> None:
    w = make_writer(out_dir=str(tmp_path), savefun=_json_save, indent=2)
    w("state.json", "", {"a": [1, 2, 3]})
    w.finalize()
    text = (tmp_path / "state.json").read_text()
    assert json.loads(text) == {"a": [1, 2, 3]}
    assert "\n  " in text  # the keyword argument reached savefun


def test_per_call_savefun(make_writer: WriterFactory, tmp_path: Path) -> None:
    w = make_writer(out_dir=str(tmp_path))
    w("state.json", "", {"a": 1}, savefun=_json_save)
    w.finalize()
    assert json.loads((tmp_path / "state.json").read_text()) == {"a": 1}


def _line_save(target: Any, f: Any) -> None:
    f.write(f"{target}\n".encode())


def test_append_mode(make_writer: WriterFactory, tmp_path: Path) -> None:
    w = make_writer(out_dir=str(tmp_path), savefun=_line_save)
    for i in range(3):
        w("log.txt", "", i, append=True)
    w.finalize()
    assert (tmp_path / "log.txt").read_text() == "0\n1\n2\n"


def test_durable_false_still_writes(make_writer: WriterFactory, tmp_path: Path) -> None:
    w = make_writer(out_dir=str(tmp_path), durable=False)
    w("snap.pt", "", {"x": torch.arange(4)})
    w.finalize()
    assert torch.equal(load(tmp_path / "snap.pt")["x"], torch.arange(4))


def test_file_loads_with_plain_torch_load_from_bytes(tmp_path: Path) -> None:
    state = {f"t{i}": torch.randn(256) for i in range(500)}
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        w("many.pt", "", state)
    raw = (tmp_path / "many.pt").read_bytes()
    assert_same(state, torch.load(io.BytesIO(raw)))


def test_loads_with_weights_only(tmp_path: Path) -> None:
    """The staged file holds only plain tensors and containers: weights_only loads it."""
    model = torch.nn.Linear(4, 3)
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        w("model.pt", "", model.state_dict())
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    fresh = torch.nn.Linear(4, 3)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.weight, model.weight)


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
@pytest.mark.parametrize("cls", [snapwriter.ProcessWriter, snapwriter.ProcessQueueWriter])
def test_process_writers_other_start_methods(
    cls: type[snapwriter.StandardWriter], start_method: str, tmp_path: Path
) -> None:
    state = make_state(n=3)
    w = cls(out_dir=str(tmp_path), mp_context=start_method)
    w("a.pt", "", state)
    w("b.pt", "", {"x": torch.ones(3)})
    w.finalize()
    assert_same(state, load(tmp_path / "a.pt"))
    assert torch.equal(load(tmp_path / "b.pt")["x"], torch.ones(3))


def test_handle_figures(tmp_path: Path) -> None:
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        h = w("snap.pt", "", {"x": torch.ones(1000)})
        r = h.result()
        assert h.done() and h.exception() is None
        assert h.nbytes == r.nbytes > 4000
        assert r.stage_seconds >= 0 and r.write_seconds > 0 and r.commit_seconds >= 0
        assert r.total_seconds >= r.write_seconds
        assert "committed" in repr(h)
        stats = w.stats()
        assert stats.committed == 1 and stats.bytes_written == r.nbytes and stats.last == r


def test_handle_done_callback(tmp_path: Path) -> None:
    seen: list[snapwriter.SnapshotHandle] = []
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        h = w("snap.pt", "", {"x": 1})
        h.result()
        h.add_done_callback(seen.append)  # already done: called at once
    assert seen == [h]


def test_commit_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        w("snap.pt", "", {"x": torch.ones(10)})
    lines = [r.getMessage() for r in caplog.records if r.name == "snapwriter"]
    assert any("committed" in m and "snap.pt" in m and "MB/s" in m for m in lines)
