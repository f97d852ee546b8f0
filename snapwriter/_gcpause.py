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
import threading
from collections.abc import Iterator

__all__ = ("collector_paused",)

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector off inside the block (see the module doc)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
