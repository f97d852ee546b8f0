"""How one case is isolated: a child forked from the driver, a fresh interpreter, or none.

Each (writer, workload) pair runs on its own so memory figures are comparable and no
writer inherits another's threads, page cache pressure or allocator state.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

from . import REPO_ROOT
from .metrics import run_case

RESULT_PREFIX = "@@BENCH-RESULT "
ENTRY_POINT = os.path.join(REPO_ROOT, "benchmarks", "bench.py")


def run_guarded(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_case`, a failure reported as ``{"error": ...}``."""
    try:
        return run_case(**spec)
    except Exception as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The case in a fresh interpreter (``bench.py --worker SPEC``)."""
    cmd = [sys.executable, ENTRY_POINT, "--worker", json.dumps(spec)]
    try:
        # cwd: a writer that ignores out_dir (ppe's queue writers do) writes there.
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=spec["tmp_dir"]
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def run_forked(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The case in a child forked from this (single-threaded, torch-preloaded) process:
    as isolated as a fresh interpreter, without paying torch's import again."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, report, leave without running the parent's exit hooks
        status = 0
        try:
            os.close(read_fd)
            os.chdir(spec["tmp_dir"])  # a writer that ignores out_dir writes here
            result = run_guarded(spec)
            with os.fdopen(write_fd, "wb") as f:
                f.write(json.dumps(result).encode())
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_fd], [], [], remaining)[0]:
                os.kill(pid, signal.SIGKILL)
                return {"error": f"timed out after {timeout:.0f}s"}
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"error": f"case process ended with status {status} and no result"}
    received: dict[str, Any] = json.loads(b"".join(chunks))
    return received


def run_inprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """The case in this process (smoke tests; memory figures not comparable)."""
    try:
        return run_case(**spec)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def worker_main(spec_json: str) -> int:
    """``bench.py --worker SPEC``: run the case, print its result on one tagged line."""
    result = run_guarded(json.loads(spec_json))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0
