"""Case 4: misuse and concurrency.

Misuse: finalize twice, finalize with nothing pending, calls after finalize / ``with`` /
``aclose`` (``WriterClosedError``), finalize racing calls from another thread, a save
function calling back into its writer. Concurrency: threads x saves and many coroutines
on one writer with distinct and repeated names; every final file equals the last save
issued for its name and loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from . import faultlib
from .harness import SPAWN_SLOW, judge_dir, long_only

KINDS = list(faultlib.WRITERS)


def _closed(label: str, r: dict[str, Any]) -> str | None:
    if r.get("ok"):
        return f"{label}: accepted after close"
    if "WriterClosedError" not in r["error"]["mro"]:
        return f"{label}: expected WriterClosedError, got {r['error']}"
    if r.get("phase") != "call":
        return f"{label}: raised only in the background: {r}"
    return None


@pytest.mark.parametrize("kind", KINDS)
def test_misuse(kind, zygote, work, long_run, fault_stats):
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    out = work / "out"
    out.mkdir()
    r = zygote.result(work / "run", "misuse", {"kind": kind, "out_dir": str(out)}, timeout=120)
    problems = []
    for label in (
        "finalize_empty",
        "finalize_empty_again",
        "finalize_pending",
        "finalize_pending_again",
        "handle_after_finalize",
        "finalize_racing",
    ):
        if not r[label]["ok"]:
            problems.append(f"{label}: {r[label]}")
    for label in ("call_after_finalize", "call_after_finalize2", "call_after_with"):
        why = _closed(label, r[label])
        if why:
            problems.append(why)
    why = _closed("call_after_aclose", r["aclose"]["call"])
    if why:
        problems.append(why)
    why = _closed("save_after_finalize", r["save_after_finalize"])
    if why:
        problems.append(why + " (Writer.save() restarts the closed writer's loop)")
    if r["racing_errors"] or r["racing_thread_alive"]:
        problems.append(f"racing caller: {r['racing_errors']} alive={r['racing_thread_alive']}")
    fault_stats["misuse"][kind] += 1
    assert not problems, f"{kind}:\n" + "\n".join(problems)


@pytest.mark.parametrize("kind", KINDS)
def test_finalize_racing_calls(kind, zygote, work, long_run, fault_seed):
    """finalize() from one thread while another keeps calling: when finalize returns,
    every accepted save is finished (none escaped it) and the loop thread is gone."""
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    out = work / "out"
    out.mkdir()
    rounds = 30 if long_run else 4
    res = zygote.result(
        work / "run",
        "finalize_race",
        {
            "kind": kind,
            "out_dir": str(out),
            "rounds": rounds,
            "seed": fault_seed,
            "numel": 500_000,
        },
        timeout=120,
    )
    problems = []
    for i, rd in enumerate(res["rounds"]):
        if not rd["finalize"]["ok"]:
            problems.append(f"round {i}: finalize raised {rd['finalize']}")
        if rd["errors"] or rd["thread_alive"]:
            problems.append(f"round {i}: caller errors {rd['errors']} alive={rd['thread_alive']}")
        if rd["escaped"]:
            problems.append(
                f"round {i}: saves accepted but not finished by finalize: {rd['escaped']}"
            )
        if rd["portal_threads_after"]:
            problems.append(
                f"round {i}: the writer's loop thread runs again after finalize: "
                f"{rd['portal_threads_after']} (a call racing finalize restarted the portal)"
            )
    assert not problems, f"{kind}:\n" + "\n".join(problems)


@pytest.mark.parametrize("kind", KINDS)
def test_finalize_during_a_call(kind, zygote, work, long_run):
    """Deterministic version of the race above: finalize() lands while a call is held
    between its closed-check and its submit (see ``scenarios.finalize_during_call``)."""
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    out = work / "out"
    out.mkdir()
    r = zygote.result(
        work / "run", "finalize_during_call", {"kind": kind, "out_dir": str(out)}, timeout=40
    )
    assert not r["finalizer_alive"] and not r["caller_alive"], f"{kind}: hung: {r}"
    problems = []
    if not r["finalize"].get("ok"):
        problems.append(f"finalize raised {r['finalize']}")
    if r["accepted"]:
        if not r["done_when_finalize_returned"]:
            problems.append("the call's save was accepted but finalize() did not wait for it")
        if not r["handle"]["ok"]:
            problems.append(f"the accepted save failed: {r['handle']['error']}")
    elif "WriterClosedError" not in r["call_error"]["mro"]:
        problems.append(
            f"the call failed with {r['call_error']['type']}: {r['call_error']['message']} "
            "(expected WriterClosedError)"
        )
    if r["portal_threads_after"]:
        problems.append(f"the writer's loop thread runs again: {r['portal_threads_after']}")
    assert not problems, f"{kind}:\n" + "\n".join(problems)


@pytest.mark.parametrize("what", ["finalize", "call"])
@pytest.mark.parametrize("kind", [k for k in KINDS if k not in faultlib.PROCESS_KINDS])
def test_savefun_reenters_writer(kind, what, zygote, work, reaper):
    """A save function that calls ``finalize()`` or the writer itself: an error or a
    completed save, never a deadlock."""
    out = work / "out"
    out.mkdir()
    child = zygote.start(
        work / "run", "reentrant", {"kind": kind, "out_dir": str(out), "what": what}
    )
    reaper.append(child.pid)
    child.wait_event("CALLING", 60)
    try:
        child.wait_event("RETURNED", 5)
    except AssertionError as exc:
        raise AssertionError(
            f"{kind}: a savefun calling writer.{what if what == 'finalize' else '__call__'}() "
            f"deadlocks the writer:\n{exc}"
        ) from None
    outcome = child.wait(60)
    assert outcome.exitcode == 0, outcome.describe()


def _judge_last(out: Path, res: dict[str, Any], kind: str) -> None:
    last = res["last"]
    assert last, res
    judge_dir(out, {name: [(v, 16)] for name, v in last.items()}, allow_temps=False)


def _sizes(kind: str, long_run: bool) -> tuple[int, int, int]:
    """(threads, saves per thread, coroutines)."""
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
        return 8, 10, 16
    return 8, 50, 50


@pytest.mark.parametrize("kind", KINDS)
def test_threads_hammer_one_writer(kind, zygote, work, long_run, fault_seed, fault_stats):
    threads, saves, _ = _sizes(kind, long_run)
    out = work / "out"
    out.mkdir()
    res = zygote.result(
        work / "run",
        "concurrency_threads",
        {"kind": kind, "out_dir": str(out), "threads": threads, "saves": saves, "seed": fault_seed},
        timeout=300 if kind == "process-spawn" else 110,
    )
    assert not res["errors"], res["errors"]
    assert not res["failed"], res["failed"]
    assert res["finalize"]["ok"], res["finalize"]
    assert res["n_handles"] == threads * saves
    _judge_last(out, res, kind)
    fault_stats["concurrency"][f"thread-saves[{kind}]"] += threads * saves


@pytest.mark.parametrize("kind", KINDS)
def test_coroutines_share_one_writer(kind, zygote, work, long_run, fault_seed, fault_stats):
    _, _, coroutines = _sizes(kind, long_run)
    out = work / "out"
    out.mkdir()
    res = zygote.result(
        work / "run",
        "concurrency_async",
        {"kind": kind, "out_dir": str(out), "coroutines": coroutines, "seed": fault_seed},
        timeout=300 if kind == "process-spawn" else 110,
    )
    assert not res["errors"], res["errors"]
    assert res["run"]["ok"], res["run"]
    _judge_last(out, res, kind)
    fault_stats["concurrency"][f"coroutine-saves[{kind}]"] += coroutines
