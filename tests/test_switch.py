"""The short GIL switch interval of staging (snapwriter._switch)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import SupportsIndex

import pytest
import torch

from snapwriter._staging import Stager
from snapwriter._switch import SWITCH_SECONDS, fast_switching


@pytest.fixture(autouse=True)
def _default_interval() -> Iterator[None]:
    was = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(was)


def test_nested_blocks_set_it_back_once() -> None:
    with fast_switching():
        with fast_switching():
            assert sys.getswitchinterval() == pytest.approx(SWITCH_SECONDS, abs=2e-6)
        assert sys.getswitchinterval() == pytest.approx(SWITCH_SECONDS, abs=2e-6)  # outer holds
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_overlapping_blocks_in_two_threads() -> None:
    entered, release, left = threading.Event(), threading.Event(), threading.Event()

    def other() -> None:
        with fast_switching():
            entered.set()
            release.wait(10)
        left.set()

    with fast_switching():
        thread = threading.Thread(target=other)
        thread.start()
        assert entered.wait(10)
    # this thread left first: the other one's block still holds
    assert sys.getswitchinterval() == pytest.approx(SWITCH_SECONDS, abs=2e-6)
    release.set()
    assert left.wait(10)
    thread.join(10)
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_a_shorter_interval_is_kept() -> None:
    sys.setswitchinterval(SWITCH_SECONDS / 2)
    with fast_switching():
        assert sys.getswitchinterval() == pytest.approx(SWITCH_SECONDS / 2, abs=2e-6)
    assert sys.getswitchinterval() == pytest.approx(SWITCH_SECONDS / 2, abs=2e-6)


def test_a_change_made_inside_the_block_is_kept() -> None:
    with fast_switching():
        sys.setswitchinterval(0.01)
    assert sys.getswitchinterval() == pytest.approx(0.01)


def test_staging_sets_it_back_also_when_it_fails() -> None:
    seen: list[float] = []

    class Probe:
        def __reduce_ex__(self, protocol: SupportsIndex) -> str:
            seen.append(sys.getswitchinterval())
            raise TypeError("not picklable")

    stager = Stager()
    try:
        staged = stager.stage({"w": torch.ones(3), "n": 1})
        stager.release(staged)
        assert sys.getswitchinterval() == pytest.approx(0.005)
        with pytest.raises(Exception, match="not picklable"):
            stager.stage({"w": torch.ones(3), "probe": Probe()})
        assert seen == [pytest.approx(SWITCH_SECONDS, abs=2e-6)]  # lowered while staging
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        stager.close()
