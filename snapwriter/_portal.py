"""The portal: one background event loop per writer, and process-wide lifecycle hooks.

Each writer owns a :class:`Portal`, an anyio blocking portal (asyncio backend) running in
a daemon thread named ``snapwriter-portal-<n>``, started lazily on the first save. Sync
code hands it coroutines and gets :class:`concurrent.futures.Future` objects back.

Two process-wide hooks keep programs healthy:

* at interpreter exit, before Python joins non-daemon threads, every live writer is
  finalized so pending saves complete. A save still unfinished after
  ``SNAPWRITER_EXIT_TIMEOUT`` seconds (default 300) is reported as lost with an ERROR log
  line and a message on stderr, and the process exits with status 70 instead of hanging;
* after ``os.fork()`` the child marks inherited writers as unusable (their loop thread
  does not exist there); the child creates writers of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401 - see the at-exit registration below
import contextlib
import contextvars
import importlib
import itertools
import logging
import os
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

__all__ = (
    "EXIT_TIMEOUT_ENV",
    "Portal",
    "on_exit_give_up",
    "preload_background_imports",
    "register_for_exit",
)

T = TypeVar("T")
logger = logging.getLogger("snapwriter")

EXIT_TIMEOUT_ENV = "SNAPWRITER_EXIT_TIMEOUT"
DEFAULT_EXIT_TIMEOUT = 300.0
EXIT_STATUS_LOST = 70  # EX_SOFTWARE

_counter = itertools.count(1)


class Portal:
    """A lazily started background event loop (anyio blocking portal, asyncio backend).

    Thread-safe. Not usable in a child created by ``fork()`` after it started.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cm: contextlib.AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._thread_ident: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = False
        self._pid = os.getpid()
        self.name = f"snapwriter-portal-{next(_counter)}"

    @property
    def running(self) -> bool:
        return self._portal is not None and self._pid == os.getpid()

    def in_loop_thread(self) -> bool:
        """Whether the caller runs on this portal's event-loop thread."""
        return self._thread_ident is not None and threading.get_ident() == self._thread_ident

    def _get(self) -> BlockingPortal:
        with self._lock:
            if self._pid != os.getpid():
                raise RuntimeError("the portal belongs to the parent process")
            if self._stopped:
                raise RuntimeError("the writer's loop was stopped; it does not restart")
            if self._portal is None:
                cm = start_blocking_portal("asyncio", name=self.name)
                portal = cm.__enter__()
                self._cm, self._portal = cm, portal
                self._thread_ident = portal.call(threading.get_ident)
                self._loop = portal.call(asyncio.get_running_loop)
            return self._portal

    def start_task_soon(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> Future[T]:
        """Schedule ``fn(*args)`` on the loop and return its future, without waiting.

        Unlike :meth:`BlockingPortal.start_task_soon`, which waits for the loop to
        acknowledge the new task, this only queues it (``call_soon_threadsafe``), so a
        caller on another event loop is never blocked by a busy writer loop. The
        writer waits for these futures itself before stopping the loop.
        """
        self._get()
        loop = self._loop
        assert loop is not None
        future: Future[T] = Future()

        def spawn() -> None:
            if not future.set_running_or_notify_cancel():
                return
            task = loop.create_task(fn(*args))
            self._tasks.add(task)
            task.add_done_callback(finished)

        def finished(task: asyncio.Task[T]) -> None:
            self._tasks.discard(task)
            if task.cancelled():
                future.set_exception(asyncio.CancelledError("the writer's loop was stopped"))
            elif (exc := task.exception()) is not None:
                future.set_exception(exc)
            else:
                future.set_result(task.result())

        # A fresh context: the caller's (say, trio's sniffio marker) must not leak into
        # the writer's asyncio loop.
        loop.call_soon_threadsafe(spawn, context=contextvars.Context())
        return future

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop and wait for it (never from the loop thread)."""
        result: T = self._get().call(fn, *args)
        return result

    def stop(self) -> None:
        """Stop the loop and join its thread (writers first wait for their saves). Idempotent."""
        with self._lock:
            cm, self._cm, self._portal = self._cm, None, None
            self._stopped = True
        if cm is not None and self._pid == os.getpid():
            cm.__exit__(None, None, None)

    def forget(self) -> None:
        """Drop the loop without touching it (in a forked child, where it does not run).

        The portal's context manager would try to stop the loop when collected, and
        wait forever for a thread that does not exist in the child: mark the portal as
        not running first, so that clean-up fails fast and joins the (dead) thread.
        """
        self._lock = threading.Lock()
        portal = self._portal
        if portal is not None and hasattr(portal, "_event_loop_thread_id"):
            portal._event_loop_thread_id = None
        self._cm, self._portal, self._thread_ident, self._loop = None, None, None, None
        self._tasks = set()


_BACKGROUND_MODULES = (
    # anyio imports its backend (and, through it, its stream and socket modules) on the
    # loop thread; torch.save imports its serialization config on first use; starting
    # a child process imports its start method's popen module (absent ones are skipped).
    "anyio._backends._asyncio",
    "torch.utils.serialization.config",
    "multiprocessing.popen_fork",
    "multiprocessing.popen_spawn_posix",
    "multiprocessing.popen_forkserver",
)


def preload_background_imports() -> None:
    """Do, in the calling thread, the lazy initialisation the loop and worker threads
    would do: import their modules and compute ``tempfile.gettempdir()``.

    Such work holds a lock (a module's import lock, tempfile's); a ``fork()`` in the
    user's program at that moment leaves the child with a half-imported module or the
    lock held forever, and the child's own writer then fails or hangs.
    """
    for name in _BACKGROUND_MODULES:
        if name not in sys.modules:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
    tempfile.gettempdir()


class _ExitParticipant(Protocol):
    def _close_at_exit(self, timeout: float) -> list[str]: ...

    def _forget_after_fork(self) -> None: ...


_live: weakref.WeakSet[_ExitParticipant] = weakref.WeakSet()
_live_lock = threading.Lock()
_give_up_hooks: list[Callable[[], object]] = []


def on_exit_give_up(hook: Callable[[], object]) -> None:
    """Run ``hook`` when interpreter exit gives up on unfinished saves, before ``os._exit``
    (for example, to kill saving child processes that would outlive the program)."""
    _give_up_hooks.append(hook)


def register_for_exit(obj: _ExitParticipant) -> None:
    """Finalize ``obj`` at interpreter exit and disable it in forked children."""
    with _live_lock:
        _live.add(obj)


def _exit_timeout() -> float:
    raw = os.environ.get(EXIT_TIMEOUT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_EXIT_TIMEOUT
    except ValueError:
        return DEFAULT_EXIT_TIMEOUT


def _at_exit() -> None:
    with _live_lock:
        writers = list(_live)
    lost: list[str] = []
    for writer in writers:
        try:
            lost.extend(writer._close_at_exit(_exit_timeout()))
        except Exception:  # an error of a save is already logged; keep closing the others
            logger.exception("snapwriter: error while finalizing a writer at exit")
    if lost:
        message = (
            f"snapwriter: {len(lost)} snapshot(s) LOST at interpreter exit, still unfinished "
            f"after {EXIT_TIMEOUT_ENV}={_exit_timeout():g}s: {', '.join(lost)}"
        )
        logger.error(message)
        print(message, file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        for hook in _give_up_hooks:
            try:
                hook()
            except Exception:
                logger.exception("snapwriter: error while abandoning unfinished saves")
        # A save stuck in a worker thread would make Python wait forever.
        os._exit(EXIT_STATUS_LOST)


def _after_fork_in_child() -> None:
    global _live_lock
    _live_lock = threading.Lock()
    for writer in list(_live):
        writer._forget_after_fork()


# threading's own at-exit hooks run before non-daemon threads are joined; the atexit
# module runs too late (after the join), when a pending save would already hang exit.
# They run in reverse order of registration: concurrent.futures.thread (imported above)
# registered first, so executors still accept work while writers finalize.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_at_exit)
else:  # pragma: no cover - CPython always has it (3.9+)
    import atexit

    atexit.register(_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
# At import: normally in the main thread, before any fork of the user's.
preload_background_imports()
