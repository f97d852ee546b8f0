"""Run a function on N real rank processes joined by torch.distributed (gloo, CPU).

:func:`run_ranks` forks one process per rank (fork is cheap: torch is already imported),
each joins the process group through the rendezvous asked for and runs ``fn(ctx)``.
What ``fn`` returns (JSON) or raises comes back as a :class:`RankOutcome`; a process that
is killed (``kill -9``, say by a fault injected with :func:`kill_self`) shows up with its
negative exit code. Every wait is bounded: a rank still running past ``timeout`` is
killed and reported, never waited on forever.

Rendezvous kinds:
  ``"file"``   a FileStore in the test's directory;
  ``"tcp"``    ``tcp://127.0.0.1:<free port>``, the store hosted by rank 0 (it dies with it);
  ``"agent"``  a TCPStore hosted by the test process, as torchrun's agent hosts it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import multiprocessing
import os
import signal
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

#: Timeout of the gloo process group in the ranks: collectives with a dead peer fail
#: (they usually fail at once, the peer's sockets being closed) rather than hang.
PG_TIMEOUT = datetime.timedelta(seconds=40)


@dataclass
class RankContext:
    rank: int
    world_size: int
    root: Path  # the test's tmp_path: shared by every rank
    store: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.root / "snapshots"


@dataclass
class RankOutcome:
    rank: int
    exitcode: int | None
    result: Any = None
    error: str | None = None

    @property
    def killed(self) -> bool:
        return self.exitcode == -signal.SIGKILL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_self() -> None:
    """kill -9 this process, now (a fault injected at a precise point)."""
    os.kill(os.getpid(), signal.SIGKILL)


def _child(
    fn: Callable[[RankContext], Any],
    rank: int,
    world: int,
    root: Path,
    rendezvous: str,
    address: str,
    env: dict[str, str],
    extra: dict[str, Any],
) -> None:
    warnings.resetwarnings()  # pytest's "error" filter is for the test process
    warnings.simplefilter("ignore")
    os.environ.update(env)
    out = root / f".rank{rank}.json"
    try:
        if rendezvous == "file":
            store = dist.FileStore(address, world)
        elif rendezvous == "agent":
            host, port = address.split(":")
            store = dist.TCPStore(host, int(port), world, is_master=False, timeout=PG_TIMEOUT)
        else:
            host, port = address.split(":")
            store = dist.TCPStore(host, int(port), world, is_master=rank == 0, timeout=PG_TIMEOUT)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=PG_TIMEOUT
        )
        ctx = RankContext(rank, world, root, store, extra)
        result = fn(ctx)
        record = {"result": result}
        code = 0
    except BaseException as exc:
        record = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
        code = 1
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, out)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    os._exit(code)


def run_ranks(
    fn: Callable[[RankContext], Any],
    world: int,
    root: Path,
    *,
    rendezvous: str = "file",
    timeout: float = 90.0,
    env: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> list[RankOutcome]:
    """Run ``fn`` on ``world`` rank processes; return their outcomes in rank order."""
    ctx = multiprocessing.get_context("fork")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".rank*.json"):
        stale.unlink()
    server = None
    if rendezvous == "file":
        address = str(root / f".store-{time.monotonic_ns()}")
    elif rendezvous == "agent":
        server = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
        address = f"127.0.0.1:{server.port}"
    else:
        address = f"127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, r, world, root, rendezvous, address, env or {}, extra or {}),
            name=f"rank{r}",
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    outcomes = []
    for r, p in enumerate(procs):
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
            outcomes.append(RankOutcome(r, None, error=f"rank {r} still running after {timeout}s"))
            continue
        out = root / f".rank{r}.json"
        record = json.loads(out.read_text()) if out.exists() else {}
        outcomes.append(RankOutcome(r, p.exitcode, record.get("result"), record.get("error")))
    del server
    return outcomes


def assert_ok(outcomes: list[RankOutcome]) -> list[Any]:
    """Every rank exited 0; return their results."""
    problems = [o for o in outcomes if o.exitcode != 0]
    assert not problems, "\n".join(f"rank {o.rank}: exit {o.exitcode}: {o.error}" for o in problems)
    return [o.result for o in outcomes]
