"""A process-wide interpreter setting changed while any thread is inside a block.

Staging and pickling change two settings of the whole interpreter for as long as they
run (:mod:`snapwriter._gcpause`, :mod:`snapwriter._switch`). Several threads may stage or
pickle at once, and blocks nest: :class:`Held` changes the setting when the first block
is entered and puts it back when the last one is left, whatever the order threads leave
in.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ("Held",)


class Held:
    """A setting changed while any thread is inside :meth:`block`.

    Args:
        change: changes the setting; returns what ``restore`` needs to put it back.
        restore: puts the setting back, given what ``change`` returned.
    """

    def __init__(self, change: Callable[[], Any], restore: Callable[[Any], None]) -> None:
        self._change = change
        self._restore = restore
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: Any = None

    @contextlib.contextmanager
    def block(self) -> Iterator[None]:
        """Run the block with the setting changed (nestable, from any thread)."""
        with self._lock:
            if self._depth == 0:
                self._saved = self._change()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    saved, self._saved = self._saved, None
                    self._restore(saved)
