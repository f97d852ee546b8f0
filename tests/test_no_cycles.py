"""Saves leave no reference cycles behind.

A save of tens of thousands of tensors makes a few objects per tensor (staged tensors,
records, memo entries). Held in a cycle, they would be freed only by a full collection of
the cyclic collector, a pass over every object of the trainer, at whatever step of the
training loop it happens to run, and the staged storages would outlive their save.
These tests run saves with the collector saving everything it finds
(``gc.DEBUG_SAVEALL``) and check that nothing of snapwriter's or torch's was in a cycle.
"""

from __future__ import annotations

import collections
import contextlib
import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter
from snapwriter._staging import Stager


@contextlib.contextmanager
def _recording() -> Iterator[Callable[[], list[Any]]]:
    """Record cyclic garbage; call the result for what of ours was found since."""
    gc.collect()
    gc.garbage.clear()
    gc.set_debug(gc.DEBUG_SAVEALL)

    def found() -> list[Any]:
        gc.collect()
        return [o for o in gc.garbage if _ours(o)]

    try:
        yield found
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def _ours(obj: Any) -> bool:
    """Whether ``obj`` is a tensor, a storage, or an object or function of snapwriter."""
    if isinstance(obj, torch.Tensor | torch.UntypedStorage):
        return True
    module = getattr(obj, "__module__", None) or type(obj).__module__ or ""
    return module.startswith("snapwriter")


def _state() -> dict[str, Any]:
    model = collections.OrderedDict(
        (f"layer{i}.weight", torch.full((8,), float(i))) for i in range(200)
    )
    return {"model": model, "optimizer": {"step": torch.tensor(3.0), "lr": 0.1}, "iteration": 7}


WRITERS: dict[str, Callable[[str], Any]] = {
    "SimpleWriter": lambda d: snapwriter.SimpleWriter(out_dir=d),
    "StandardWriter": lambda d: snapwriter.StandardWriter(out_dir=d),
    "ThreadWriter": lambda d: snapwriter.ThreadWriter(out_dir=d),
    "ProcessWriter": lambda d: snapwriter.ProcessWriter(out_dir=d),
    "ProcessWriter(fork)": lambda d: snapwriter.ProcessWriter(out_dir=d, staging="fork"),
    "QueueWriter": lambda d: snapwriter.QueueWriter(out_dir=d),
    "ThreadQueueWriter": lambda d: snapwriter.ThreadQueueWriter(out_dir=d),
    "ProcessQueueWriter": lambda d: snapwriter.ProcessQueueWriter(out_dir=d),
}


def _wait(result: Any) -> None:
    if hasattr(result, "result"):
        result.result(timeout=120)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", WRITERS)
def test_saves_leave_no_cycles(tmp_path: Path, name: str) -> None:
    """Per save (the cold one and warm ones, layout reused): the writer itself, made
    once, is out of the window."""
    state = _state()
    writer = WRITERS[name](str(tmp_path))
    try:
        _wait(writer("snapshot_0.pt", str(tmp_path), state))
        with _recording() as found:
            for i in range(1, 4):
                _wait(writer(f"snapshot_{i}.pt", str(tmp_path), state))
            ours = found()
    finally:
        writer.finalize()
    for i in range(4):
        loaded = torch.load(tmp_path / f"snapshot_{i}.pt", weights_only=True)
        assert torch.equal(loaded["model"]["layer9.weight"], state["model"]["layer9.weight"])
    assert ours == []


def test_staging_leaves_no_cycles() -> None:
    """The staging walk itself (cold and warm): its staged storages go with the arena."""
    state = _state()
    stager = Stager()
    with _recording() as found:
        first = stager.stage(state)
        second = stager.stage(state)
        stager.release(first)
        third = stager.stage(state)
        stager.release(second)
        stager.release(third)
        stager.close()
        del first, second, third
        ours = found()
    assert ours == []
