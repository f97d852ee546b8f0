"""Staging's host copies on several threads (snapwriter._copier): the staged state is the
state at the call, whatever thread copied which tensor, and nothing copies after the call."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter
import snapwriter._copier
from snapwriter._copier import CHUNK_COPIES, SPLIT_BYTES, Copier, _split
from snapwriter._staging import Stager


def _torch_save(obj: Any) -> bytes:
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


def _pairs(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)) for n in sizes]


@pytest.mark.parametrize(
    "sizes",
    [[], [1], [SPLIT_BYTES], [1] * 10, [SPLIT_BYTES] * 2, [SPLIT_BYTES, 1, 1, 1], [1 << 20] * 9],
)
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_split_keeps_every_copy_once_in_order(sizes: list[int], threads: int) -> None:
    pairs = _pairs(sizes)
    parts = _split(pairs, threads)
    flat = [pair for part in parts for pair in part]
    assert [id(d) for d, _ in flat] == [id(d) for d, _ in pairs]
    assert len(parts) <= max(1, threads) and all(parts)
    if threads > 1 and sum(sizes) >= SPLIT_BYTES and len(sizes) > 1:
        assert len(parts) > 1  # big enough: shared


def test_split_balances_bytes() -> None:
    parts = _split(_pairs([1 << 20] * 8), 2)
    assert [sum(d.nbytes for d, _ in part) for part in parts] == [4 << 20, 4 << 20]


def _state(count: int) -> dict[str, Any]:
    """Many tensors (copies started during the walk), big ones (split at the end),
    views first (raw copies), shared storages, parameters requiring grad."""
    base = torch.randn(3 << 20)
    state: dict[str, Any] = {"view_first": base[10:20], "base": base}
    state.update({f"t{i}": torch.full((7,), float(i)) for i in range(count)})
    state["param"] = torch.nn.Parameter(torch.randn(5, 3))
    state["alias"] = state["t3"][2:]
    state["big"] = [torch.randn(1 << 20) for _ in range(4)]
    state["step"] = 4
    return state


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_staged_bytes_are_torch_saves_at_the_call(threads: int) -> None:
    stager = Stager()
    stager._copier = Copier(threads)
    try:
        state = _state(3 * CHUNK_COPIES + 17)
        expected = _torch_save(state)
        staged = stager.stage(state)
        for value in state.values():  # the caller moves on: nothing reaches the staged copy
            if isinstance(value, torch.Tensor):
                with torch.no_grad():
                    value.add_(1)
        value = staged.value
        assert value["param"].grad_fn is None and value["param"].requires_grad
        assert all(value[f"t{i}"].grad_fn is None for i in range(10))
        assert _torch_save(value) == expected
        stager.release(staged)
    finally:
        stager.close()


def test_a_failed_copy_fails_the_call_after_every_copy_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One chunk's copy raises: the call raises StagingError, and no other copy is still
    running when it does; the stager works afterwards."""
    real = snapwriter._copier._copy
    running = 0
    lock = threading.Lock()
    calls = 0

    def copy(pairs: Any) -> None:
        nonlocal running, calls
        with lock:
            calls += 1
            mine = calls
            running += 1
        try:
            if mine == 2:
                raise RuntimeError("copy failed")
            real(pairs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(snapwriter._copier, "_copy", copy)
    stager = Stager()
    stager._copier = Copier(2)
    try:
        with pytest.raises(snapwriter.StagingError, match="copy failed"):
            stager.stage(_state(3 * CHUNK_COPIES))
        assert running == 0
        monkeypatch.setattr(snapwriter._copier, "_copy", real)
        state = _state(3 * CHUNK_COPIES)
        staged = stager.stage(state)
        assert _torch_save(staged.value) == _torch_save(state)
        stager.release(staged)
    finally:
        stager.close()


def _copy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("snapwriter-copy")]


def test_finalize_stops_the_copy_threads(tmp_path: Path) -> None:
    before = set(_copy_threads())
    w = snapwriter.StandardWriter(out_dir=str(tmp_path))
    w._stager._copier = Copier(2)
    state = _state(CHUNK_COPIES + 1)
    w("a.pt", "", state).result(timeout=60)
    assert set(_copy_threads()) - before  # started on first use
    w.finalize()
    assert set(_copy_threads()) <= before
    assert (tmp_path / "a.pt").read_bytes() == _torch_save(state)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_stages_with_threads_of_its_own() -> None:
    """The helper threads do not survive fork(): a child that stages starts its own.
    (Small tensors in the child: torch's own OpenMP pool is not usable after a fork
    once the parent ran parallel copies, whoever copies.)"""
    stager = Stager()
    stager._copier = Copier(2)
    try:
        stager.release(stager.stage(_state(CHUNK_COPIES + 1)))  # threads started
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: stage, report, leave without cleanup
            code = 1
            try:
                state = {f"t{i}": torch.full((7,), float(i)) for i in range(CHUNK_COPIES + 5)}
                ok = _torch_save(stager.stage(state).value) == _torch_save(state)
                code = 0 if ok else 2
            finally:
                os.write(write, bytes([code]))
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            assert f.read() == b"\0"
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        stager.close()


class _Interrupts:
    """Stops a walk with a BaseException (as Ctrl-C would), once copies are running."""

    def __init__(self, started: threading.Event) -> None:
        self.started = started

    def __deepcopy__(self, memo: Any) -> Any:
        assert self.started.wait(timeout=30)
        raise KeyboardInterrupt


def test_an_interrupted_walk_waits_for_the_copies_it_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A BaseException in the walk (KeyboardInterrupt) gives the staging memory back
    only after every copy already started has ended."""
    real = snapwriter._copier._copy
    started = threading.Event()
    release = threading.Event()
    running = 0

    def copy(pairs: Any) -> None:
        nonlocal running
        running += 1
        started.set()
        try:
            assert release.wait(timeout=30)
            real(pairs)
        finally:
            running -= 1

    monkeypatch.setattr(snapwriter._copier, "_copy", copy)
    stager = Stager()
    stager._copier = Copier(2)
    state: dict[str, Any] = {f"t{i}": torch.full((3,), float(i)) for i in range(CHUNK_COPIES)}
    state["stop"] = _Interrupts(started)
    timer = threading.Timer(0.2, release.set)  # lets the copy end once the walk has raised
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            stager.stage(state)
        assert running == 0  # waited for, not left writing into a released arena
    finally:
        release.set()
        timer.join()
        stager.close()
