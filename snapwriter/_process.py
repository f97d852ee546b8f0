"""Saving in child processes (``ProcessWriter``, ``ProcessQueueWriter``).

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
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.context import BaseContext
from typing import Any

from ._exceptions import ChildProcessFailure, InvalidSnapshotArgument
from ._save import SaveRequest, WriteOutcome, execute_save_blocking

__all__ = ("ConsumerProcess", "ProcessWorker", "check_context", "get_context")

MpContext = BaseContext | str | None


def get_context(context: MpContext) -> BaseContext:
    """Return a multiprocessing context from a name, a context or ``None`` (default)."""
    if context is None or isinstance(context, str):
        return multiprocessing.get_context(context)
    return context


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


def _send_outcome(conn: multiprocessing.connection.Connection, kind: str, payload: Any) -> None:
    try:
        conn.send((kind, payload))
    except Exception:  # the exception itself does not pickle: send its text
        if isinstance(payload, BaseException):
            text = "".join(traceback.format_exception(payload))
            conn.send((kind, ChildProcessFailure(f"{type(payload).__name__}: {payload}\n{text}")))
        else:
            raise


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
        _send_outcome(conn, "error", exc)
        raise SystemExit(1) from None
    else:
        _send_outcome(conn, "ok", outcome)
    finally:
        conn.close()


def _child_consume(conn: multiprocessing.connection.Connection, task: Any) -> None:
    """Entry point of a ``ProcessQueueWriter`` consumer: saves until told to stop."""
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        request, args = message
        try:
            outcome = _run_one(request, task, args)
        except Exception as exc:
            _send_outcome(conn, "error", exc)
        else:
            _send_outcome(conn, "ok", outcome)


class ProcessWorker:
    """The worker ``ProcessWriter.create_worker`` returns: one child process, one save.

    ppe's worker contract: :meth:`start`, :meth:`join`, :attr:`exitcode`. After
    :meth:`join`, :attr:`outcome` holds the figures on success and :attr:`error` the
    child's exception on failure.
    """

    runs_hooks = False  # the parent runs clean-up hooks after a successful child

    def __init__(self, request: SaveRequest, context: MpContext = None) -> None:
        ctx = get_context(context)
        self._recv, self._send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(  # type: ignore[attr-defined]
            target=_child_save, args=(request, self._send), name="snapwriter-save"
        )
        self.outcome: WriteOutcome | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._process.start()
        self._send.close()

    def join(self, timeout: float | None = None) -> None:
        if self.outcome is None and self.error is None:
            try:
                kind, payload = self._recv.recv()
            except EOFError:
                pass
            else:
                if kind == "ok":
                    self.outcome = payload
                else:
                    self.error = payload
            finally:
                self._recv.close()
        self._process.join(timeout)
        if self.outcome is None and self.error is None and self._process.exitcode is not None:
            self.error = ChildProcessFailure(
                f"the saving process {_describe_exit(self._process.exitcode)} "
                "before reporting a result"
            )

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode  # type: ignore[no-any-return]


class ConsumerProcess:
    """One long-lived child process that runs saves sent to it, in order.

    ``task`` (ppe's ``QueueWriter(task=...)``) replaces snapwriter's own save when
    given; it must be picklable under ``spawn``/``forkserver``. A consumer that dies is
    replaced by a new one for the next save. Thread-safe; one save at a time.
    """

    def __init__(self, context: MpContext = None, task: Callable[..., Any] | None = None) -> None:
        self._ctx = get_context(context)
        self._task = task
        self._lock = threading.Lock()
        self._conn: multiprocessing.connection.Connection | None = None
        self._process: Any = None

    def _ensure(self) -> multiprocessing.connection.Connection:
        if self._conn is None or self._process is None or not self._process.is_alive():
            self._close_quietly()
            parent, child = self._ctx.Pipe(duplex=True)
            self._process = self._ctx.Process(  # type: ignore[attr-defined]
                target=_child_consume, args=(child, self._task), name="snapwriter-consumer"
            )
            self._process.start()
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
            conn.send((request, args))
            try:
                kind, payload = conn.recv()
            except EOFError:
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
        self._conn = None
        self._process = None
