"""Fixtures and options of the fault-injection suite.

``--long`` (or ``SNAPWRITER_FAULTS_LONG=1``) runs the heavy sweeps: at least 50 timed
kill points per writer, every write syscall crashed, the spawn variants in full.
``--fault-seed N`` (or ``SNAPWRITER_FAULTS_SEED``) changes the seed of the random
schedules (the seed is printed in failures, so a failing schedule can be replayed).

Note: pytest reads ``pytest_addoption`` only from "initial" conftest files. This one is
initial when the run names ``tests/faults`` (``pytest tests/faults --long``); for a
plain ``pytest --long`` the option must be registered in ``tests/conftest.py``. The
environment variables work either way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import stats
from .harness import Zygote, cleanup_live, kill_group


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("snapwriter faults")
    # tests/conftest.py may register them too (so that a plain ``pytest --long`` works)
    with contextlib.suppress(ValueError):
        group.addoption(
            "--long",
            action="store_true",
            default=False,
            help="run the long fault-injection sweeps (>= 50 kill points per writer)",
        )
    with contextlib.suppress(ValueError):
        group.addoption(
            "--fault-seed",
            action="store",
            type=int,
            default=None,
            help="seed of the fault-injection schedules",
        )


def _long(config: pytest.Config) -> bool:
    return bool(_option(config, "--long", False)) or os.environ.get(
        "SNAPWRITER_FAULTS_LONG", ""
    ) not in ("", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long sweeps outgrow the suite's 120 s per-test timeout (each child run has a
    hard timeout of its own): give this directory's tests 30 minutes with ``--long``."""
    if not _long(config):
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.timeout(1800))


def _option(config: pytest.Config, name: str, default: Any) -> Any:
    try:
        return config.getoption(name)
    except ValueError:  # option not registered (this conftest was not an initial one)
        return default


@pytest.fixture(scope="session")
def long_run(pytestconfig: pytest.Config) -> bool:
    return _long(pytestconfig)


@pytest.fixture(scope="session")
def fault_seed(pytestconfig: pytest.Config) -> int:
    seed = _option(pytestconfig, "--fault-seed", None)
    if seed is None:
        seed = int(os.environ.get("SNAPWRITER_FAULTS_SEED", "20240607"))
    return int(seed)


@pytest.fixture(scope="session")
def fault_root() -> Iterator[Path]:
    """A world-traversable scratch root (privilege-dropped children must reach it)."""
    root = Path(tempfile.mkdtemp(prefix="snapwriter-faults-"))
    root.chmod(0o755)
    yield root
    if os.environ.get("SNAPWRITER_FAULTS_KEEP", "") in ("", "0"):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def work(fault_root: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh directory for one test, under :func:`fault_root` (mode 0755)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in request.node.name)[:120]
    d = fault_root / safe
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


@pytest.fixture(scope="session")
def zygote(fault_root: Path) -> Iterator[Zygote]:
    z = Zygote(fault_root / "_zygote")
    yield z
    z.close()


@pytest.fixture
def reaper() -> Iterator[list[int]]:
    """Process groups registered here are SIGKILLed after the test (no leaks)."""
    groups: list[int] = []
    yield groups
    cleanup_live()
    for pgid in groups:
        kill_group(pgid)


@pytest.fixture(scope="session")
def fault_stats(pytestconfig: pytest.Config) -> stats.Stats:
    """Counters reported in the terminal summary (kill points tried/survived...)."""
    return stats.of(pytestconfig)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its counters to the controller (see ``stats.py``)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[stats.WORKER_KEY] = stats.dump(session.config)
