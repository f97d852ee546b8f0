"""The portal: one background event loop per writer, and process-wide lifecycle hooks.

Each writer owns a :class:`Portal`, an anyio blocking portal (asyncio backend) running in
a daemon thread named ``snapwriter-portal-<n>``, started lazily on the first save. Sync
code hands it coroutines and gets :class:`concurrent.futures.Future` objects back.

Process-wide hooks keep programs healthy:

* at interpreter exit, in two steps. Before Python joins non-daemon threads, pending
  saves are waited for (a thread stuck on one would hang the join). Then, after the
  program's own ``atexit`` handlers (which may still save: the loop keeps running), every
  live writer is finalized. A save still unfinished after ``SNAPWRITER_EXIT_TIMEOUT``
  seconds (default 300) is reported as lost with an ERROR log line and a message on
  stderr, and the process exits with status 70 instead of hanging. A save that failed
  and was never reported (no handle, call or ``finalize()`` raised it) is named on stderr
  and the process exits with status 1, unless it already ends with an uncaught
  exception, whose status is kept;
* after ``os.fork()`` the child marks inherited writers as unusable (their loop thread
  does not exist there); the child creates writers of its own.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import concurrent.futures.thread
import contextlib
import contextvars
import importlib
import inspect
import itertools
import logging
import multiprocessing.util  # noqa: F401 - see the at-exit registration below
import os
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._compat import register_at_fork

__all__ = (
    "EXIT_TIMEOUT_ENV",
    "DaemonExecutor",
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
EXIT_STATUS_FAILED = 1

_counter = itertools.count(1)
_io_counter = itertools.count(1)


def _portal_takes_name() -> bool:
    """Whether ``start_blocking_portal`` names its thread (``name=``, anyio >= 4.10)."""
    try:
        return "name" in inspect.signature(start_blocking_portal).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return False


def _open_portal(name: str) -> contextlib.AbstractContextManager[BlockingPortal]:
    """``start_blocking_portal`` on asyncio, its thread named ``name`` (any anyio 4)."""
    if _portal_takes_name():
        return start_blocking_portal("asyncio", name=name)
    return start_blocking_portal("asyncio")  # older anyio: renamed once running


def _name_thread(name: str) -> int:
    threading.current_thread().name = name
    return threading.get_ident()


class DaemonExecutor(concurrent.futures.ThreadPoolExecutor):
    """The portal loop's default executor, where :mod:`aiofiles` runs the commit's
    rename and directory ``fsync``: one daemon thread per call (a few per save).

    Unlike its base class (which asyncio requires) it keeps working once the
    interpreter has begun to exit, so a save made from an ``atexit`` handler commits.
    """

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        name = f"snapwriter-io-{next(_io_counter)}"
        threading.Thread(target=run, name=name, daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing to stop: each call's thread ends with the call."""


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
                cm = _open_portal(self.name)
                portal = cm.__enter__()
                self._cm, self._portal = cm, portal
                self._thread_ident = portal.call(_name_thread, self.name)
                self._loop = portal.call(asyncio.get_running_loop)
                self._loop.set_default_executor(DaemonExecutor())
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
    def _wait_at_exit(self, timeout: float) -> list[str]: ...

    def _close_at_exit(self, timeout: float) -> tuple[list[str], list[BaseException]]: ...

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


def _give_up(lost: list[str]) -> None:
    """Report saves abandoned at exit, kill what still saves, and exit with status 70."""
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


def _exiting_with_uncaught_exception() -> bool:
    """Whether the program ends with an uncaught exception (Python set ``sys.last_*``
    when it printed it); its exit status is then already non-zero."""
    return getattr(sys, "last_value", None) is not None or (
        getattr(sys, "last_exc", None) is not None
    )


def _wait_before_thread_join() -> None:
    """Exit, step 1 (threading's hooks, before non-daemon threads are joined)."""
    with _live_lock:
        writers = list(_live)
    lost: list[str] = []
    for writer in writers:
        try:
            lost.extend(writer._wait_at_exit(_exit_timeout()))
        except Exception:
            logger.exception("snapwriter: error while waiting for a writer at exit")
    if lost:
        _give_up(lost)


def _at_exit() -> None:
    """Exit, step 2 (``atexit``, after the handlers the program registered later)."""
    with _live_lock:
        writers = list(_live)
    lost: list[str] = []
    failures: list[BaseException] = []
    for writer in writers:
        try:
            writer_lost, writer_failures = writer._close_at_exit(_exit_timeout())
        except Exception:  # an error of a save is already logged; keep closing the others
            logger.exception("snapwriter: error while finalizing a writer at exit")
            continue
        lost.extend(writer_lost)
        failures.extend(writer_failures)
    if lost:
        _give_up(lost)
    if not failures:
        return
    for failure in failures:
        message = f"snapwriter: a save failed and was never reported: {failure}"
        logger.error(message)
        print(message, file=sys.stderr, flush=True)
    if _exiting_with_uncaught_exception():
        return  # keep the program's own (non-zero) status
    print(
        f"snapwriter: exiting with status {EXIT_STATUS_FAILED}: {len(failures)} snapshot(s) "
        "failed (call finalize() to handle failures yourself)",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    logging.shutdown()  # os._exit skips the remaining handlers: flush the log files now
    os._exit(EXIT_STATUS_FAILED)


def _after_fork_in_child() -> None:
    global _live_lock
    _live_lock = threading.Lock()
    for writer in list(_live):
        writer._forget_after_fork()


# threading's own at-exit hooks run before non-daemon threads are joined: step 1 waits
# there for pending saves (a non-daemon worker thread stuck on one would hang the join).
# Step 2 is an atexit handler registered at import: handlers run last-registered first,
# so those the program registers after importing snapwriter run before it and may save;
# multiprocessing's (imported above) runs after it, once consumer processes are closed.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_wait_before_thread_join)
atexit.register(_at_exit)
register_at_fork(after_in_child=_after_fork_in_child)
# At import: normally in the main thread, before any fork of the user's.
preload_background_imports()
