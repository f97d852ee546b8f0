"""Child-side helpers of the fault-injection suite.

Imported by the scenario child processes (as the top-level module ``faultlib``: the
suite's directory is on their ``sys.path``) and, for payloads and judging, by the test
process (as ``faults.faultlib``). It must not import pytest.

Everything a ``ProcessWriter`` child may need under ``spawn`` (save functions, the
faulty file system) is defined at module level so that it pickles by reference.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

import snapwriter

# -- the writers -------------------------------------------------------------------

#: Every snapshot writer, as (id, class name, mp_context). ``processqueue`` forks its
#: saving process: the strace sweeps instrument the scenario process in Python
#: (``child_setup``), which a saving process started by the default method (a fresh
#: zygote interpreter, see snapwriter._saver) would not inherit; tests/test_saver.py
#: covers the default method.
WRITERS: dict[str, tuple[str, str | None]] = {
    "simple": ("SimpleWriter", None),
    "standard": ("StandardWriter", None),
    "thread": ("ThreadWriter", None),
    "process-fork": ("ProcessWriter", "fork"),
    "process-spawn": ("ProcessWriter", "spawn"),
    "process-cow": ("ProcessWriter", "fork"),
    "queue": ("QueueWriter", None),
    "threadqueue": ("ThreadQueueWriter", None),
    "processqueue": ("ProcessQueueWriter", "fork"),
}
#: Extra start methods used by the process-life tests.
EXTRA_WRITERS: dict[str, tuple[str, str | None]] = {
    "process-forkserver": ("ProcessWriter", "forkserver"),
    "processqueue-fork": ("ProcessQueueWriter", "fork"),
    "processqueue-spawn": ("ProcessQueueWriter", "spawn"),
    "processqueue-forkserver": ("ProcessQueueWriter", "forkserver"),
}
ALL_WRITERS = {**WRITERS, **EXTRA_WRITERS}
#: Constructor options of a kind beyond its class and start method.
WRITER_OPTIONS: dict[str, dict[str, Any]] = {
    # a copy-on-write snapshot per call: the trainer forks, the child writes the file
    "process-cow": {"staging": "fork"},
}
PROCESS_KINDS = {k for k, (cls, _ctx) in ALL_WRITERS.items() if cls.startswith("Process")}


def writer_class(kind: str) -> type[Any]:
    return getattr(snapwriter, ALL_WRITERS[kind][0])  # type: ignore[no-any-return]


def make_writer(kind: str, out_dir: str = "", **kwargs: Any) -> Any:
    """Create the writer ``kind`` (a key of :data:`ALL_WRITERS`).

    ``stage``/``max_pending`` are dropped for ``SimpleWriter``, which has neither.
    """
    cls_name, ctx = ALL_WRITERS[kind]
    cls = getattr(snapwriter, cls_name)
    if cls_name == "SimpleWriter":
        kwargs.pop("stage", None)
        kwargs.pop("max_pending", None)
    if ctx is not None:
        kwargs.setdefault("mp_context", ctx)
    for key, value in WRITER_OPTIONS.get(kind, {}).items():
        kwargs.setdefault(key, value)
    savefun = kwargs.pop("savefun", torch.save)
    fs = kwargs.pop("fs", None)
    return cls(savefun, fs, out_dir, **kwargs)


def supports_keep_last() -> bool:
    import inspect

    return "keep_last" in inspect.signature(snapwriter.Writer.__init__).parameters


# -- payloads ----------------------------------------------------------------------


def payload(version: int, numel: int = 64) -> dict[str, Any]:
    """A snapshot whose every byte depends on ``version`` (see :func:`check_payload`)."""
    t = torch.arange(numel, dtype=torch.float64)
    t.add_(version)
    return {
        "version": version,
        "numel": numel,
        "t": t,
        "small": torch.full((3,), float(version)),
        "meta": {"tag": f"v{version}", "list": [version, version + 1]},
    }


def check_payload(obj: Any, version: int, numel: int) -> str | None:
    """Return ``None`` if ``obj`` is exactly ``payload(version, numel)``, else why not."""
    if not isinstance(obj, dict):
        return f"not a dict: {type(obj).__name__}"
    if obj.get("version") != version or obj.get("numel") != numel:
        return f"version/numel {obj.get('version')}/{obj.get('numel')} != {version}/{numel}"
    t = obj.get("t")
    if not isinstance(t, torch.Tensor) or t.shape != (numel,) or t.dtype != torch.float64:
        return "tensor t has the wrong type or shape"
    expected = torch.arange(numel, dtype=torch.float64).add_(version)
    if not torch.equal(t, expected):
        return "tensor t differs"
    if not torch.equal(obj.get("small"), torch.full((3,), float(version))):
        return "tensor small differs"
    if obj.get("meta") != {"tag": f"v{version}", "list": [version, version + 1]}:
        return "meta differs"
    return None


def load(path: str) -> Any:
    return torch.load(path, weights_only=True)


def which_version(path: str, candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """Load ``path`` and return the (version, numel) of ``candidates`` it equals.

    Raises AssertionError naming the file when it does not load or equals none.
    """
    try:
        obj = load(path)
    except Exception as exc:
        raise AssertionError(f"{path} does not load: {type(exc).__name__}: {exc}") from exc
    reasons = []
    for version, numel in candidates:
        why = check_payload(obj, version, numel)
        if why is None:
            return version, numel
        reasons.append(f"v{version}: {why}")
    raise AssertionError(f"{path} matches no expected snapshot ({'; '.join(reasons)})")


# -- save functions (module level: picklable under spawn) ---------------------------


def raising_savefun(target: Any, f: Any, **kwds: Any) -> None:
    raise ValueError("savefun refuses to save")


def partial_then_raise_savefun(target: Any, f: Any, **kwds: Any) -> None:
    f.write(b"PARTIAL" * 1000)
    f.flush()
    raise ValueError("savefun failed half-way")


def nowrite_savefun(target: Any, f: Any, **kwds: Any) -> None:
    return None


def closing_savefun(target: Any, f: Any, **kwds: Any) -> None:
    torch.save(target, f)
    f.close()


def block_forever(target: Any, f: Any, **kwds: Any) -> None:
    """A save function that never returns (used with a small SNAPWRITER_EXIT_TIMEOUT)."""
    f.write(b"blocked")
    f.flush()
    threading.Event().wait()


def gated_savefun(target: Any, f: Any, **kwds: Any) -> None:
    """torch.save, but first wait until the file named by $FAULTS_GATE exists."""
    gate = os.environ["FAULTS_GATE"]
    notify("SAVING", pid=os.getpid())
    wait_for_path(gate, 120.0)
    torch.save(target, f)


class UnpicklableError(Exception):
    """An exception that cannot cross a process boundary."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def unpicklable_error_savefun(target: Any, f: Any, **kwds: Any) -> None:
    raise UnpicklableError("custom failure that does not pickle")


def wait_for_path(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)


# -- a faulty PFIO-style file system (not a LocalFileSystem subclass) ----------------


class _FaultyFile:
    """Wraps a real file; raises ``OSError(errno)`` at the configured operation."""

    def __init__(self, fs: FaultyFS, f: Any, path: str) -> None:
        self._fs = fs
        self._f = f
        self._path = path
        self._written = 0

    def write(self, data: Any) -> int:
        if self._fs.armed("write") and self._written + len(data) > self._fs.after_bytes:
            room = max(0, self._fs.after_bytes - self._written)
            if room:
                self._f.write(bytes(memoryview(data)[:room]))
                self._written += room
            raise OSError(self._fs.errno, os.strerror(self._fs.errno), self._path)
        n = self._f.write(data)
        self._written += n
        return n  # type: ignore[no-any-return]

    def flush(self) -> None:
        self._f.flush()
        if self._fs.armed("flush"):
            raise OSError(self._fs.errno, os.strerror(self._fs.errno), self._path)

    def fileno(self) -> int:
        return self._f.fileno()  # type: ignore[no-any-return]

    def tell(self) -> int:
        return self._f.tell()  # type: ignore[no-any-return]

    def seek(self, *args: Any) -> int:
        return self._f.seek(*args)  # type: ignore[no-any-return]

    def seekable(self) -> bool:
        return self._f.seekable()  # type: ignore[no-any-return]

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._f.closed  # type: ignore[no-any-return]

    @property
    def name(self) -> str:
        return self._path

    @property
    def mode(self) -> str:
        return "wb"

    def close(self) -> None:
        self._f.close()
        if self._fs.armed("close"):
            raise OSError(self._fs.errno, os.strerror(self._fs.errno), self._path)

    def __enter__(self) -> _FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FaultyFS:
    """A ppe/PFIO-style file system over the local one that injects ``OSError``.

    ``fault`` is one of ``open``, ``write``, ``flush``, ``close``, ``rename``,
    ``makedirs``; the fault is active only while the file ``control`` exists, so a test
    arms and disarms it for one save (the object may live in a child process). A
    non-empty control file names the operation to fail instead of ``fault``.
    """

    def __init__(self, control: str, fault: str, err: int = errno.EIO, after_bytes: int = 0):
        self.control = control
        self.fault = fault
        self.errno = err
        self.after_bytes = after_bytes
        self._local = snapwriter.LocalFileSystem()

    def armed(self, op: str) -> bool:
        try:
            with open(self.control) as f:
                named = f.read().strip()
        except FileNotFoundError:
            return False
        return op == (named or self.fault)

    def _raise(self, path: str) -> None:
        raise OSError(self.errno, os.strerror(self.errno), path)

    def open(self, path: str, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode or "a" in mode:
            if self.armed("open"):
                self._raise(path)
            return _FaultyFile(self, self._local.open(path, mode, *args, **kwargs), path)
        return self._local.open(path, mode, *args, **kwargs)

    def makedirs(self, path: str, mode: int = 0o777, exist_ok: bool = False) -> None:
        if self.armed("makedirs"):
            self._raise(path)
        self._local.makedirs(path, mode, exist_ok)

    def exists(self, path: str) -> bool:
        return self._local.exists(path)

    def isdir(self, path: str) -> bool:
        return self._local.isdir(path)

    def rename(self, src: str, dst: str) -> None:
        if self.armed("rename"):
            self._raise(dst)
        self._local.rename(src, dst)

    def remove(self, path: str, recursive: bool = False) -> None:
        self._local.remove(path, recursive)

    def list(self, path: str | None = None, recursive: bool = False) -> Any:
        return self._local.list(path, recursive)

    def stat(self, path: str) -> Any:
        return self._local.stat(path)

    def close(self) -> None:
        pass

    def __enter__(self) -> FaultyFS:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# -- talking to the test process ---------------------------------------------------

_events_fd: int | None = None
_commands_fd: int | None = None
_commands_buf = b""
_notify_lock = threading.Lock()


def open_channels() -> None:
    """Open the event and command FIFOs now (before dropping privileges, say)."""
    global _events_fd, _commands_fd
    if _events_fd is None and os.environ.get("FAULTS_EVENTS"):
        _events_fd = os.open(os.environ["FAULTS_EVENTS"], os.O_WRONLY)
    if _commands_fd is None and os.environ.get("FAULTS_COMMANDS"):
        # O_RDWR never blocks on a FIFO and keeps it open when the test closes its end.
        _commands_fd = os.open(os.environ["FAULTS_COMMANDS"], os.O_RDWR)


def notify(tag: str, **data: Any) -> None:
    """Send one event line (``tag`` and JSON data) to the test process."""
    open_channels()
    if _events_fd is None:
        return
    line = json.dumps({"tag": tag, "pid": os.getpid(), **data}) + "\n"
    with _notify_lock:
        os.write(_events_fd, line.encode())


def wait_command(expected: str, timeout: float = 120.0) -> dict[str, Any]:
    """Block until the test process sends the command ``expected``."""
    global _commands_buf
    open_channels()
    assert _commands_fd is not None, "no command channel"
    deadline = time.monotonic() + timeout
    while True:
        while b"\n" in _commands_buf:
            line, _commands_buf = _commands_buf.split(b"\n", 1)
            msg = json.loads(line)
            if msg.get("cmd") == expected:
                return msg  # type: ignore[no-any-return]
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {expected!r} command within {timeout}s")
        ready, _, _ = select.select([_commands_fd], [], [], left)
        if ready:
            _commands_buf += os.read(_commands_fd, 65536)


def write_result(result: dict[str, Any]) -> None:
    path = os.environ.get("FAULTS_RESULT")
    if not path:
        return
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(result, f, default=repr)
    os.replace(tmp, path)


def describe_error(exc: BaseException | None, depth: int = 0) -> dict[str, Any] | None:
    """A JSON-able description of an exception, its ``__cause__`` and ``__context__``."""
    if exc is None or depth > 4:
        return None
    cause = exc.__cause__
    return {
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc),
        "path": getattr(exc, "path", None),
        "errno": getattr(exc, "errno", None),
        "notes": list(getattr(exc, "__notes__", []) or []),
        "cause": describe_error(cause, depth + 1) if cause is not None else None,
        "context": (
            describe_error(exc.__context__, depth + 1)
            if exc.__context__ is not None and exc.__context__ is not cause and depth < 3
            else None
        ),
    }


def outcome_of(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn``; return ``{"ok": True}`` or ``{"ok": False, "error": ...}``."""
    try:
        fn()
    except BaseException as exc:
        return {"ok": False, "error": describe_error(exc)}
    return {"ok": True}


# -- set-up inside every child (also spawned writer children) ------------------------

_TEMP_TAIL = re.compile(r"-\d+-[0-9a-f]{16}$")


def child_setup() -> None:
    """Apply environment-driven instrumentation of the scenario process.

    ``FAULTS_FIXED_TMP`` (16 hex digits) and ``FAULTS_FIXED_TMP_PID`` make temporary
    names predictable, so that ``strace -P`` can target the temporary file's syscalls
    exactly. Only the random tail (pid and token) of the real name is replaced; the name
    keeps snapwriter's format. Used by the strace sweeps only.
    """
    token = os.environ.get("FAULTS_FIXED_TMP")
    pid = os.environ.get("FAULTS_FIXED_TMP_PID")
    if not token or not pid:
        return
    import snapwriter._storage as storage

    original = getattr(storage, "_faults_original_temp_name_for", None) or getattr(
        storage, "temp_name_for", None
    )
    if original is None:
        raise RuntimeError("snapwriter._storage.temp_name_for is gone: update faultlib")

    def fixed(basename: str) -> str:
        name = original(basename)
        return _TEMP_TAIL.sub(f"-{pid}-{token}", name)

    storage._faults_original_temp_name_for = original  # type: ignore[attr-defined]
    storage.temp_name_for = fixed  # type: ignore[attr-defined]


def drop_privileges(uid: int = 65534, gid: int = 65534) -> None:
    open_channels()
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)
