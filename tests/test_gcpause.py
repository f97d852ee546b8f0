"""The collector pause shared by staging (caller's thread) and pickling (writer's thread)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from snapwriter._gcpause import collector_paused


@pytest.fixture(autouse=True)
def _collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_nested_pauses_turn_it_back_on_once() -> None:
    with collector_paused():
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()


def test_overlapping_pauses_in_two_threads() -> None:
    entered, release, left = threading.Event(), threading.Event(), threading.Event()

    def other() -> None:
        with collector_paused():
            entered.set()
            release.wait(10)
        left.set()

    with collector_paused():
        thread = threading.Thread(target=other)
        thread.start()
        assert entered.wait(10)
    # this thread left first: the other one's pause still holds
    assert not gc.isenabled()
    release.set()
    assert left.wait(10)
    thread.join(10)
    assert gc.isenabled()


def test_a_collector_off_at_entry_stays_off() -> None:
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


def test_exceptions_still_end_the_pause() -> None:
    with pytest.raises(ValueError, match="boom"), collector_paused():
        raise ValueError("boom")
    assert gc.isenabled()
