"""Shared fixtures: writer factories over the whole family, state helpers."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter

WriterFactory = Callable[..., snapwriter.Writer]


def _factories() -> dict[str, WriterFactory]:
    return {
        "SimpleWriter": lambda **kw: snapwriter.SimpleWriter(**kw),
        "StandardWriter": lambda **kw: snapwriter.StandardWriter(**kw),
        "ThreadWriter": lambda **kw: snapwriter.ThreadWriter(**kw),
        "ProcessWriter-fork": lambda **kw: snapwriter.ProcessWriter(mp_context="fork", **kw),
        "QueueWriter": lambda **kw: snapwriter.QueueWriter(**kw),
        "ThreadQueueWriter": lambda **kw: snapwriter.ThreadQueueWriter(**kw),
        "ProcessQueueWriter-fork": lambda **kw: snapwriter.ProcessQueueWriter(
            mp_context="fork", **kw
        ),
    }


FACTORIES = _factories()
#: Writers whose call returns before the save is done (everything but SimpleWriter).
BACKGROUND = [name for name in FACTORIES if name != "SimpleWriter"]


def _writers_of(name: str) -> Iterator[WriterFactory]:
    """Yield a factory of ``name`` writers; every writer it made is finalized after."""
    made: list[snapwriter.Writer] = []

    def make(**kw: Any) -> snapwriter.Writer:
        w = FACTORIES[name](**kw)
        made.append(w)
        return w

    yield make
    for w in made:
        with contextlib.suppress(snapwriter.SnapshotError):  # the test asserted on it
            w.finalize()


@pytest.fixture(params=list(FACTORIES))
def make_writer(request: pytest.FixtureRequest) -> Iterator[WriterFactory]:
    """Every writer of the family."""
    yield from _writers_of(request.param)


@pytest.fixture(params=BACKGROUND)
def make_background_writer(request: pytest.FixtureRequest) -> Iterator[WriterFactory]:
    """Every writer whose call returns before the save finishes."""
    yield from _writers_of(request.param)


def make_state(n: int = 6, size: int = 1000, seed: int = 0) -> dict[str, Any]:
    """A state_dict-like target: tensors of several dtypes and shapes, plus metadata."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {f"layer{i}.weight": torch.randn(size // (i + 1), generator=g) for i in range(n)},
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(10, 10, generator=g)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "ints": torch.arange(17, dtype=torch.int64),
        "half": torch.randn(8, generator=g).half(),
        "iteration": 12,
        "note": "hello",
    }


def assert_same(a: Any, b: Any) -> None:
    """Deep equality of nested containers with tensors (exact, dtype included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def clone_state(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [clone_state(v) for v in state]
    if isinstance(state, tuple):
        return tuple(clone_state(v) for v in state)
    return state


def mutate_all(state: Any) -> None:
    """Change every tensor in place (what an optimizer step does)."""
    if isinstance(state, torch.Tensor):
        if state.dtype.is_floating_point:
            state.add_(1.5)
        else:
            state.add_(7)
    elif isinstance(state, dict):
        for v in state.values():
            mutate_all(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            mutate_all(v)


def load(path: Any) -> Any:
    return torch.load(path, weights_only=False)


@pytest.fixture(autouse=True)
def _quiet_snapwriter_errors(caplog: pytest.LogCaptureFixture) -> None:
    """Failures are logged at ERROR by design; keep them in caplog, not on stderr."""
    caplog.set_level(logging.INFO, logger="snapwriter")


# -- the fault suite's counters (tests/faults/stats.py), merged across xdist workers --


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    from tests.faults import stats

    text = getattr(node, "workeroutput", {}).get(stats.WORKER_KEY)
    if text:
        stats.merge(node.config, text)  # the controller's config


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.faults import stats

    stats.report(terminalreporter)


ROOT = Path(__file__).resolve().parents[1]


def torch_save_bytes(obj: Any) -> bytes:
    """What ``torch.save(obj, f)`` writes into an open file object (the reference)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def run_python(
    code: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports this checkout's snapwriter."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )
