"""A short GIL switch interval while staging hands copies to helper threads.

Staging walks the target in the caller's thread and hands the copies it plans, a batch
at a time, to a copying thread (:mod:`snapwriter._copier`). That thread needs the GIL
for a moment between two batches, and a thread that asks for it waits until the holder
is made to let go: the interpreter's *switch interval*, 5 ms by default, longer than a
batch takes to copy. :func:`fast_switching` lowers the interval to
:data:`SWITCH_SECONDS` for the duration, so the copying thread waits a fraction of a
millisecond and copies beside the walk instead of after it.

Safe to nest and to enter from several threads at once: the interval is set back when the
last one leaves, to what it was when the first one entered (unless someone else changed
it meanwhile, which is then kept).

Threading note for users: while a save stages, ``sys.getswitchinterval()`` is at most
:data:`SWITCH_SECONDS` in every thread of the process.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

__all__ = ("SWITCH_SECONDS", "fast_switching")

#: The switch interval while staging.
SWITCH_SECONDS = 0.0002

_lock = threading.Lock()
_depth = 0
_before = 0.0
_ours = 0.0


@contextlib.contextmanager
def fast_switching() -> Iterator[None]:
    """Run the block with a switch interval of at most :data:`SWITCH_SECONDS`."""
    global _depth, _before, _ours
    with _lock:
        if _depth == 0:
            _before = sys.getswitchinterval()
            if _before > SWITCH_SECONDS:
                sys.setswitchinterval(SWITCH_SECONDS)
            _ours = sys.getswitchinterval()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and sys.getswitchinterval() == _ours:
                sys.setswitchinterval(_before)
