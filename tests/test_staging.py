"""A call takes a consistent snapshot: mutation after the call never reaches the file."""

from __future__ import annotations

import collections
import socket
import threading
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

import snapwriter
from snapwriter._staging import Stager
from tests.conftest import WriterFactory, assert_same, clone_state, load, make_state, mutate_all


class _Gate:
    """A savefun that waits until the test opens the gate, so the save is surely in flight."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, target: Any, f: Any) -> None:
        self.entered.set()
        assert self.release.wait(60)
        torch.save(target, f)


def test_no_tearing_when_every_tensor_is_mutated(
    make_background_writer: WriterFactory, tmp_path: Path
) -> None:
    state = make_state(n=8, size=20000)
    expected = clone_state(state)
    w = make_background_writer(out_dir=str(tmp_path))
    handle = w("snap.pt", "", state)
    mutate_all(state)  # right after the call, while the save is pending
    mutate_all(state)
    handle.result(timeout=60)
    assert_same(expected, load(tmp_path / "snap.pt"))


def test_mutation_while_savefun_runs_does_not_tear(tmp_path: Path) -> None:
    gate = _Gate()
    state = make_state()
    expected = clone_state(state)
    with snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=gate) as w:
        h = w("snap.pt", "", state)
        assert gate.entered.wait(30)
        mutate_all(state)
        state["model"]["extra"] = torch.zeros(3)  # containers were copied too
        state["optimizer"]["param_groups"].append({"lr": 1.0})
        gate.release.set()
        h.result()
    assert_same(expected, load(tmp_path / "snap.pt"))


def test_stage_false_hands_the_target_itself(tmp_path: Path) -> None:
    gate = _Gate()
    state = {"t": torch.zeros(4)}
    with snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=gate, stage=False) as w:
        h = w("snap.pt", "", state)
        assert gate.entered.wait(30)
        state["t"].add_(1)  # breaking the promise shows: the file sees it
        gate.release.set()
        h.result()
    assert torch.equal(load(tmp_path / "snap.pt")["t"], torch.ones(4))


def test_per_call_stage_override(tmp_path: Path) -> None:
    gate = _Gate()
    state = {"t": torch.zeros(4)}
    with snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=gate, stage=False) as w:
        h = w("snap.pt", "", state, stage=True)
        assert gate.entered.wait(30)
        state["t"].add_(1)
        gate.release.set()
        h.result()
    assert torch.equal(load(tmp_path / "snap.pt")["t"], torch.zeros(4))


class Point(NamedTuple):
    x: torch.Tensor
    y: int


class Custom:
    def __init__(self) -> None:
        self.values = [1, 2, 3]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.values == self.values


def test_containers_and_objects_are_copied() -> None:
    shared = torch.arange(5.0)
    od: collections.OrderedDict[str, Any] = collections.OrderedDict(w=torch.ones(2))
    od._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    target = {
        "od": od,
        "tuple": (torch.ones(2), 3),
        "named": Point(torch.zeros(2), 4),
        "np": np.arange(6).reshape(2, 3),
        "np_scalar": np.float32(2.5),
        "custom": Custom(),
        "a": shared,
        "b": shared,  # the same tensor twice stays one tensor
        "param": torch.nn.Parameter(torch.ones(3)),
        "dtype": torch.float16,
        "size": torch.Size([2, 3]),
        "none": None,
    }
    stager = Stager()
    staged = stager.stage(target)
    value = staged.value
    target["np"][0, 0] = 99
    target["custom"].values.append(4)
    shared.add_(1)
    od["w"].add_(1)
    assert type(value["od"]) is collections.OrderedDict
    assert value["od"]._metadata == {"": {"version": 1}}
    assert torch.equal(value["od"]["w"], torch.ones(2))
    assert isinstance(value["named"], Point) and value["named"].y == 4
    assert value["np"][0, 0] == 0
    assert value["custom"] == Custom()
    assert value["a"] is value["b"] and torch.equal(value["a"], torch.arange(5.0))
    assert isinstance(value["param"], torch.nn.Parameter)
    assert value["dtype"] is torch.float16 and value["size"] == torch.Size([2, 3])
    assert staged.tensor_bytes > 0


def test_non_contiguous_and_special_tensors() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    target = {
        "t": base.t(),  # non-contiguous view
        "sparse": torch.eye(3).to_sparse(),
        "empty": torch.empty(0),
        "scalar": torch.tensor(5),
        "bool": torch.tensor([True, False]),
        "complex": torch.tensor([1 + 2j]),
    }
    expected = clone_state(target)
    staged = Stager().stage(target)
    base.add_(100)
    assert torch.equal(staged.value["t"], expected["t"])
    assert torch.equal(staged.value["sparse"].to_dense(), torch.eye(3))
    for k in ("empty", "scalar", "bool", "complex"):
        assert torch.equal(staged.value[k], expected[k])


def test_warm_writer_reuses_staging_buffers(tmp_path: Path) -> None:
    state = make_state(n=10)
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        w("a.pt", "", state).result()
        warm = w._stager.allocations
        for i in range(3):
            mutate_all(state)
            w(f"b{i}.pt", "", state).result()
        assert w._stager.allocations == warm  # no new staging memory once warm
    assert_same(state, load(tmp_path / "b2.pt"))


def test_changed_layout_gets_fresh_buffers_and_stays_correct(tmp_path: Path) -> None:
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        w("a.pt", "", {"x": torch.ones(10)}).result()
        w("b.pt", "", {"x": torch.ones(1000), "y": torch.zeros(3, dtype=torch.int32)}).result()
        w("c.pt", "", {"x": torch.full((5,), 2.0)}).result()
    assert torch.equal(load(tmp_path / "b.pt")["x"], torch.ones(1000))
    assert torch.equal(load(tmp_path / "c.pt")["x"], torch.full((5,), 2.0))


def test_many_small_tensors_round_trip(tmp_path: Path) -> None:
    state = {f"p{i}": torch.full((16,), float(i)) for i in range(20000)}
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        h = w("many.pt", "", state)
        mutate_all(state)
        h.result()
    loaded = load(tmp_path / "many.pt")
    assert len(loaded) == 20000
    assert torch.equal(loaded["p19999"], torch.full((16,), 19999.0))


@pytest.mark.parametrize(
    "bad",
    [lambda: None, "socket", "file"],
    ids=["lambda", "socket", "open-file"],
)
def test_unpicklable_target_fails_at_call_time(bad: Any, tmp_path: Path) -> None:
    resources: list[Any] = []
    if bad == "socket":
        bad = socket.socket()
        resources.append(bad)
    elif bad == "file":
        bad = open(tmp_path / "f.txt", "w")  # noqa: SIM115
        resources.append(bad)
    try:
        with snapwriter.StandardWriter(out_dir=str(tmp_path / "out")) as w:
            with pytest.raises(snapwriter.StagingError) as info:
                w("snap.pt", "", {"ok": torch.ones(1), "bad": bad})
            assert info.value.__cause__ is not None
        assert not (tmp_path / "out" / "snap.pt").exists()
    finally:
        for r in resources:
            r.close()


def test_staging_error_releases_the_slot(tmp_path: Path) -> None:
    with snapwriter.StandardWriter(out_dir=str(tmp_path), max_pending=1) as w:
        for _ in range(3):  # would block forever if the failed call kept its slot
            with pytest.raises(snapwriter.StagingError):
                w("snap.pt", "", {"bad": lambda: None})
        w("snap.pt", "", {"ok": 1}).result()
    assert load(tmp_path / "snap.pt") == {"ok": 1}


def test_small_snapshot_after_big_one_carries_no_stale_bytes(tmp_path: Path) -> None:
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        w("big.pt", "", {"x": torch.full((1_000_000,), 7.0)}).result()
        w("small.pt", "", {"x": torch.full((10,), 2.0)}).result()
    assert (tmp_path / "small.pt").stat().st_size < 64 * 1024
    raw = (tmp_path / "small.pt").read_bytes()
    assert torch.tensor(7.0).numpy().tobytes() * 4 not in raw  # nothing of the big state
    assert torch.equal(load(tmp_path / "small.pt")["x"], torch.full((10,), 2.0))
