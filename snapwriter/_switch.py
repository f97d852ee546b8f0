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
from collections.abc import Iterator

from ._held import Held

__all__ = ("SWITCH_SECONDS", "fast_switching")

#: The switch interval while staging.
SWITCH_SECONDS = 0.0002


def _shorten() -> tuple[float, float]:
    before = sys.getswitchinterval()
    if before > SWITCH_SECONDS:
        sys.setswitchinterval(SWITCH_SECONDS)
    return before, sys.getswitchinterval()


def _restore(saved: tuple[float, float]) -> None:
    before, ours = saved
    if sys.getswitchinterval() == ours:  # else someone changed it meanwhile: theirs
        sys.setswitchinterval(before)


_held = Held(_shorten, _restore)


@contextlib.contextmanager
def fast_switching() -> Iterator[None]:
    """Run the block with a switch interval of at most :data:`SWITCH_SECONDS`."""
    with _held.block():
        yield
