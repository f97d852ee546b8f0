"""Feature detection for the platform and library versions snapwriter supports.

Each function here picks the newer API when it exists and a public fallback otherwise;
a test simulates the older API for every fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ("HAS_FORK_HOOKS", "register_at_fork")

#: Whether this platform runs hooks after ``fork()`` (POSIX). Where there is no
#: ``os.register_at_fork`` there is no ``fork()`` either, so nothing needs resetting.
HAS_FORK_HOOKS = hasattr(os, "register_at_fork")


def register_at_fork(*, after_in_child: Callable[[], object]) -> None:
    """``os.register_at_fork(after_in_child=...)`` where the platform has it, else nothing."""
    register = getattr(os, "register_at_fork", None)
    if register is not None:
        register(after_in_child=after_in_child)
