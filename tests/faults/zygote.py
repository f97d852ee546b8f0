"""A fork server for scenario children: import torch and snapwriter once, fork per run.

Starting a Python child that imports torch takes seconds; crash sweeps need hundreds of
children. The zygote imports everything once and forks one child per scenario. Each
child starts a new session (its pid is its process group, so a test can kill the whole
group), redirects its standard streams to files and runs the scenario script as
``__main__``, then leaves through the normal interpreter exit (so snapwriter's exit hook
runs exactly as in a plain ``python script.py``).

Protocol on stdin/stdout, one JSON object per line:

* request: ``{"script", "cwd", "env", "stdout", "stderr"}``;
* replies: ``{"pid": N}`` once forked, then ``{"pid": N, "status": S}`` (the raw
  ``waitpid`` status) once it exits. One scenario at a time.

The zygote is a child subreaper: orphans of a scenario (the saving children of a process
writer whose parent was killed) are reparented to it and reaped.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import traceback
import types


def _become_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:  # pragma: no cover - best effort
        pass


def _run_child(req: dict) -> None:  # type: ignore[type-arg]
    """In the forked child: never returns (raises SystemExit through the zygote)."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in (devnull, out, err):
        os.close(fd)
    for key, value in req.get("env", {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    os.chdir(req.get("cwd") or "/")
    import faulthandler
    import signal

    # the test sends SIGUSR1 to a child that timed out: every thread's stack to stderr
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    script = req["script"]
    sys.argv = [script, *req.get("argv", [])]
    module = types.ModuleType("__main__")
    module.__file__ = script
    module.__builtins__ = __builtins__  # type: ignore[attr-defined]
    sys.modules["__main__"] = module  # kept for the exit phase (spawn imports it)
    with open(script) as f:
        code = compile(f.read(), script, "exec")
    status: object = 0
    try:
        exec(code, module.__dict__)
    except SystemExit as exc:
        status = exc.code
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.exit(status)


def main() -> None:
    import torch  # noqa: F401 - the point: import once

    import snapwriter  # noqa: F401

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import faultlib  # noqa: F401

    _become_subreaper()
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(req)
        print(json.dumps({"pid": pid}), flush=True)
        while True:
            got, status = os.waitpid(-1, 0)
            if got == pid:
                break
        # Reap orphans that already exited; running ones are reaped by later waits.
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        print(json.dumps({"pid": pid, "status": status}), flush=True)


if __name__ == "__main__":
    main()
