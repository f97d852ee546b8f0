"""Child processes of ppe's designs (``ProcessWriter.create_worker``, a
``ProcessQueueWriter`` with a custom ``task``), and what every writer child shares.

The writers' own saves go to their persistent saving process instead
(:mod:`snapwriter._saver`). Here: :class:`ProcessWorker` (one child per save) and
:class:`ConsumerProcess` (a long-lived child running a custom task), the tracking of live
children that interpreter exit kills when it gives up, and context helpers.

Spawn-safe: the child runs module-level functions and receives a :class:`SaveRequest`
(or ppe-style task arguments); no closure or writer object is pickled. A child reports
its outcome, or its exception, over a pipe, so the parent raises the original error
rather than a bare exit code. Under ``fork`` the staged target is inherited; under
``spawn`` and ``forkserver`` it travels through torch's shared-memory reductions.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.context import BaseContext
from typing import Any

from ._compat import register_at_fork
from ._exceptions import ChildProcessFailure, InvalidSnapshotArgument
from ._portal import on_exit_give_up
from ._save import SaveRequest, WriteOutcome, execute_save_blocking
from ._saver_child import send_outcome

__all__ = (
    "ConsumerProcess",
    "ProcessWorker",
    "check_context",
    "get_context",
    "kill_live_children",
)

MpContext = BaseContext | str | None

#: How often a consumer process checks that its parent still lives (seconds).
PARENT_POLL_SECONDS = 0.25

#: Child processes started by writers and not yet joined (killed if exit gives up).
_live_children: weakref.WeakSet[Any] = weakref.WeakSet()
_live_lock = threading.Lock()


def get_context(context: MpContext) -> BaseContext:
    """Return a multiprocessing context from a name, a context or ``None`` (default)."""
    if context is None or isinstance(context, str):
        return multiprocessing.get_context(context)
    return context


def _track(process: Any) -> None:
    with _live_lock:
        _live_children.add(process)


def _untrack(process: Any) -> None:
    with _live_lock:
        _live_children.discard(process)


def kill_live_children() -> list[int]:
    """SIGKILL every child process a writer started and has not joined; return their pids.

    Used when interpreter exit gives up on unfinished saves: a saving child left alive
    would outlive the program. Its temporary file stays, recognisable, and the next
    writer that opens the directory removes it.
    """
    with _live_lock:
        children = list(_live_children)
        _live_children.clear()
    killed = []
    for process in children:
        pid = getattr(process, "pid", None)
        if pid is None or pid == os.getpid():
            continue
        with contextlib.suppress(Exception):
            if process.is_alive():
                process.kill()
                process.join(5)
                killed.append(pid)
    return killed


def check_context(context: Any) -> MpContext:
    """Validate a writer's ``mp_context`` option at construction.

    Raises:
        InvalidSnapshotArgument: not ``None``, a start-method name of this platform or a
            multiprocessing context.
    """
    if context is None or isinstance(context, BaseContext):
        return context
    if isinstance(context, str):
        try:
            multiprocessing.get_context(context)
        except ValueError as exc:
            methods = ", ".join(multiprocessing.get_all_start_methods())
            raise InvalidSnapshotArgument(
                f"mp_context {context!r} is not a start method here (one of: {methods})"
            ) from exc
        return context
    raise InvalidSnapshotArgument(
        f"mp_context must be None, a start-method name or a multiprocessing context, "
        f"not {type(context).__name__}"
    )


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _run_one(request: SaveRequest | None, task: Any, args: tuple[Any, ...]) -> WriteOutcome:
    if request is not None:
        return execute_save_blocking(request)
    start = time.perf_counter()
    filename, out_dir, target, savefun, append = args
    task(filename, out_dir, target, savefun=savefun, append=append)
    return WriteOutcome(0, time.perf_counter() - start, 0.0)


def _child_save(request: SaveRequest, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a ``ProcessWriter`` child: one save, outcome sent back."""
    try:
        outcome = execute_save_blocking(request)
    except BaseException as exc:
        send_outcome(conn, "error", exc)
        raise SystemExit(1) from None
    else:
        send_outcome(conn, "ok", outcome)
    finally:
        conn.close()


def _child_consume(conn: multiprocessing.connection.Connection, task: Any, parent_pid: int) -> None:
    """Entry point of a ``ProcessQueueWriter`` consumer: saves until told to stop.

    Exits when told to (``None``), when the pipe closes, or when the parent process is
    gone (a forked consumer holds a copy of the parent's end of the pipe, so a parent
    killed by a signal would never close it).
    """
    while True:
        try:
            while not conn.poll(PARENT_POLL_SECONDS):
                if os.getppid() != parent_pid:
                    return
            message = conn.recv()
        except (EOFError, OSError):
            return
        except Exception as exc:  # a message that does not unpickle here
            send_outcome(
                conn,
                "error",
                ChildProcessFailure(f"the consumer process could not receive the save: {exc!r}"),
            )
            continue
        if message is None:
            return
        request, args = message
        try:
            outcome = _run_one(request, task, args)
        except Exception as exc:
            send_outcome(conn, "error", exc)
        else:
            send_outcome(conn, "ok", outcome)


class ProcessWorker(multiprocessing.Process):
    """The worker ``ProcessWriter.create_worker`` returns: one child process, one save.

    A :class:`multiprocessing.Process` (ppe's worker type) started with the writer's
    context. ppe's worker contract: :meth:`start`, :meth:`join`, :attr:`exitcode`.
    After :meth:`join`, :attr:`outcome` holds the figures on success and :attr:`error`
    the child's exception on failure.
    """

    runs_hooks = False  # the parent runs clean-up hooks after a successful child

    def __init__(self, request: SaveRequest, context: MpContext = None) -> None:
        ctx = get_context(context)
        recv, send = ctx.Pipe(duplex=False)
        super().__init__(target=_child_save, args=(request, send), name="snapwriter-save")
        self._start_method = ctx.get_start_method()
        self._recv: multiprocessing.connection.Connection | None = recv
        self._send: multiprocessing.connection.Connection | None = send
        self.outcome: WriteOutcome | None = None
        self.error: BaseException | None = None

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        # Start the child with the writer's context, not the default one.
        method = process_obj._start_method
        return multiprocessing.get_context(method).Process._Popen(process_obj)

    def __getstate__(self) -> dict[str, Any]:
        # What spawn/forkserver pickle for the child: its target and arguments (the
        # child's end of the pipe among them), never the parent's end.
        state = dict(self.__dict__)
        state["_recv"] = None
        state["_send"] = None
        return state

    def start(self) -> None:
        super().start()
        _track(self)
        if self._send is not None:
            self._send.close()
            self._send = None

    def join(self, timeout: float | None = None) -> None:
        """Wait for the child's report and its exit, at most ``timeout`` seconds.

        Returns with :attr:`exitcode` ``None`` when the child is still running then.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        recv = self._recv
        if recv is not None and self.outcome is None and self.error is None:
            try:
                ready = recv.poll(timeout)
            except (EOFError, OSError):
                ready = True
            if ready:
                try:
                    kind, payload = recv.recv()
                except (EOFError, OSError):
                    pass
                else:
                    if kind == "ok":
                        self.outcome = payload
                    else:
                        self.error = payload
                recv.close()
                self._recv = None
            else:
                return  # the child is still saving
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        super().join(left)
        code = self.exitcode
        if code is not None:
            _untrack(self)
        if self.outcome is None and self.error is None and code is not None:
            self.error = ChildProcessFailure(
                f"the saving process {_describe_exit(code)} before reporting a result"
            )


class ConsumerProcess:
    """One long-lived child process that runs saves sent to it, in order.

    ``task`` (ppe's ``QueueWriter(task=...)``) replaces snapwriter's own save when
    given; it must be picklable under ``spawn``/``forkserver``. A consumer that dies is
    replaced by a new one for the next save. Thread-safe; one save at a time.
    """

    def __init__(self, context: MpContext = None, task: Callable[..., Any] | None = None) -> None:
        self._ctx = get_context(context)
        #: the custom task run by the consumer, or None for snapwriter's own save
        self.task = task
        self._lock = threading.Lock()
        self._conn: multiprocessing.connection.Connection | None = None
        self._process: Any = None

    def _ensure(self) -> multiprocessing.connection.Connection:
        if self._conn is None or self._process is None or not self._process.is_alive():
            self._close_quietly()
            parent, child = self._ctx.Pipe(duplex=True)
            self._process = self._ctx.Process(  # type: ignore[attr-defined]
                target=_child_consume,
                args=(child, self.task, os.getpid()),
                name="snapwriter-consumer",
                # Never joined forever at exit: writers are finalized before that (an
                # idle consumer of a writer dropped without finalize is terminated).
                daemon=True,
            )
            self._process.start()
            _track(self._process)
            child.close()
            self._conn = parent
        return self._conn

    def run(self, request: SaveRequest | None, args: tuple[Any, ...] = ()) -> WriteOutcome:
        """Send one save to the consumer and block until it reports.

        Raises:
            The child's exception (or :class:`ChildProcessFailure` with its traceback).
        """
        with self._lock:
            conn = self._ensure()
            try:
                conn.send((request, args))
            except OSError:
                # The consumer died while idle: this save never reached it. Start a
                # new one and hand it the save; a second failure is reported.
                self._close_quietly()
                conn = self._ensure()
                try:
                    conn.send((request, args))
                except OSError as exc:
                    self._close_quietly()
                    raise ChildProcessFailure(
                        f"could not hand the save to a new consumer process: {exc!r}"
                    ) from exc
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):  # closed, or reset by the dying consumer
                self._process.join()
                code = self._process.exitcode
                self._close_quietly()
                raise ChildProcessFailure(
                    f"the consumer process {_describe_exit(code)} during a save"
                ) from None
        if kind == "ok":
            return payload  # type: ignore[no-any-return]
        raise payload

    def close(self) -> None:
        """Tell the consumer to exit and wait for it."""
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.send(None)
            if self._process is not None:
                self._process.join()
            self._close_quietly()

    def _close_quietly(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            _untrack(self._process)
        self._conn = None
        self._process = None


def _after_fork_in_child() -> None:
    """A plain ``os.fork()`` in the user's program (not one by multiprocessing).

    The parent's children are not the child's to kill. multiprocessing's fd sharer
    (used when a consumer receives staged tensors through shared memory) keeps the
    parent's listener and cache; multiprocessing resets them in its own children
    only, so the forked child would hand its consumers the parent's address.
    """
    global _live_lock
    _live_lock = threading.Lock()
    _live_children.clear()
    sharer_module = sys.modules.get("multiprocessing.resource_sharer")
    sharer = getattr(sharer_module, "_resource_sharer", None)
    reset = getattr(sharer, "_afterfork", None)
    if reset is not None:
        with contextlib.suppress(Exception):
            reset()


on_exit_give_up(kill_live_children)
register_at_fork(after_in_child=_after_fork_in_child)
