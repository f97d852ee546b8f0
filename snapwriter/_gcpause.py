"""Pausing Python's cyclic garbage collector while many objects are made at once.

Staging (in the caller's thread) and pickling (in a writer's thread) each make a few
Python objects per tensor, none of them garbage; with tens of thousands of tensors the
collector would run several full passes over every object of the process meanwhile.
:func:`collector_paused` turns it off for the duration, and is safe to nest and to enter
from several threads at once: the collector is turned back on when the last one leaves,
and only if it was on when the first one entered.

Threading note for users: while a save stages or pickles, ``gc.isenabled()`` is False
in every thread of the process.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

from ._held import Held

__all__ = ("collector_paused",)


def _pause() -> bool:
    was = gc.isenabled()
    gc.disable()
    return was


def _resume(was: bool) -> None:
    if was:
        gc.enable()


_held = Held(_pause, _resume)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector off inside the block (see the module doc)."""
    with _held.block():
        yield
