"""Case 5: process life.

Interpreter exit with saves in flight and no finalize (files complete, bounded time);
``SNAPWRITER_EXIT_TIMEOUT`` with a save that never finishes (exit status 70, the lost
file named on stderr, nothing left running); SIGTERM during a save (with and without a
handler); ``os.fork()`` in the user's program while a writer saves; process writers
under the fork, spawn and forkserver start methods.
"""

from __future__ import annotations

import random
import signal
import time
from typing import Any

import pytest

from . import faultlib
from .harness import SPAWN_SLOW, judge_dir, long_only, run_fresh, temps_in, wait_group_gone

KINDS = list(faultlib.WRITERS)
BIG = 2_000_000


@pytest.mark.parametrize("how", ["fall_off", "raise", "sys.exit"])
@pytest.mark.parametrize("kind", KINDS)
def test_exit_with_saves_in_flight(kind, how, zygote, work, long_run, fault_stats):
    if kind == "process-spawn" and how != "fall_off":
        long_only(long_run, SPAWN_SLOW)
    if how != "fall_off" and kind not in ("standard", "simple", "processqueue"):
        long_only(long_run, "the other exit paths on three writers by default")
    out = work / "out"
    out.mkdir()
    saves = [[i + 1, 500_000] for i in range(3)]
    t0 = time.monotonic()
    outcome = zygote.run(
        work / "run",
        "exit_inflight",
        {"kind": kind, "out_dir": str(out), "saves": saves, "how": how},
        timeout=90,
    )
    elapsed = time.monotonic() - t0
    expected_code = {"fall_off": 0, "raise": 1, "sys.exit": 3}[how]
    assert not outcome.timed_out, f"exit hung:\n{outcome.describe()}"
    assert outcome.exitcode == expected_code, outcome.describe()
    judge_dir(
        out,
        {f"inflight{i}.pt": [tuple(s)] for i, s in enumerate(saves)},
        allow_temps=False,
    )
    fault_stats["process-life"][f"exit-inflight[{kind}]"] += 1
    assert elapsed < 60


@pytest.mark.parametrize("kind", ["standard", "process-fork", "processqueue"])
def test_exit_with_saves_in_flight_fresh_interpreter(kind, work):
    """Same, in a brand-new interpreter (``python child.py``), not a zygote fork."""
    out = work / "out"
    out.mkdir()
    saves = [[i + 1, 500_000] for i in range(3)]
    outcome = run_fresh(
        work / "run",
        "exit_inflight",
        {"kind": kind, "out_dir": str(out), "saves": saves},
        timeout=90,
    )
    assert outcome.exitcode == 0, outcome.describe()
    judge_dir(out, {f"inflight{i}.pt": [tuple(s)] for i, s in enumerate(saves)}, allow_temps=False)


@pytest.mark.parametrize("kind", KINDS)
def test_exit_timeout_reports_lost_save(kind, zygote, work, reaper, fault_stats):
    """A save that never finishes: exit gives up after SNAPWRITER_EXIT_TIMEOUT with
    status 70 and names the file on stderr; no process of the program keeps running."""
    if kind == "simple":
        pytest.skip("SimpleWriter blocks in the call: the program never reaches its exit")
    out = work / "out"
    out.mkdir()
    t0 = time.monotonic()
    child = zygote.start(
        work / "run",
        "exit_blocked",
        {"kind": kind, "out_dir": str(out)},
        env={"SNAPWRITER_EXIT_TIMEOUT": "2"},
    )
    reaper.append(child.pid)
    outcome = child.wait(60)
    elapsed = time.monotonic() - t0
    assert not outcome.timed_out, f"exit hung:\n{outcome.describe()}"
    assert outcome.exitcode == 70, outcome.describe()
    assert str(out / "stuck.pt") in outcome.stderr, outcome.stderr
    assert "LOST" in outcome.stderr or "lost" in outcome.stderr, outcome.stderr
    assert elapsed < 40, f"exit took {elapsed:.1f}s with a 2s exit timeout"
    assert not (out / "stuck.pt").exists()
    survivors = wait_group_gone(child.pid, 8)
    fault_stats["process-life"][f"exit-timeout[{kind}]"] += 1
    assert not survivors, (
        f"{kind}: processes of the program still run after it exited with status 70: "
        f"{survivors} (the saving child blocked in savefun is left behind, holding its "
        f"temporary file {temps_in(out)})"
    )


@pytest.mark.parametrize("handler", [False, True], ids=["default", "handler"])
@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_during_save(
    kind, handler, zygote, work, long_run, fault_seed, reaper, fault_stats
):
    """SIGTERM to the program during a 16 MB save.

    Default disposition: the process dies; the previous snapshot is intact (or the new
    one complete); leftovers are removed by the next writer. With a handler that calls
    ``sys.exit``: interpreter exit completes the pending save.
    """
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    if handler and kind not in ("standard", "simple", "process-fork", "processqueue"):
        long_only(long_run, "the handler variant on four writers by default")
    out = work / "out"
    out.mkdir()
    rng = random.Random(f"{fault_seed}-sigterm-{kind}-{handler}")
    prev, new = (1, 64), (2, BIG)
    child = zygote.start(
        work / "run",
        "sigterm",
        {
            "kind": kind,
            "out_dir": str(out),
            "prev": list(prev),
            "new": list(new),
            "handler": handler,
        },
    )
    reaper.append(child.pid)
    n = len(child.events)
    child.wait_event("GO", 90)
    if handler:
        child.wait_event("ISSUED", 90, after=n)
    time.sleep(rng.uniform(0, 0.05))  # somewhere in the save
    child.kill(signal.SIGTERM, group=False)
    outcome = child.wait(90)
    assert not outcome.timed_out, outcome.describe()
    survivors = wait_group_gone(child.pid, 15)
    assert not survivors, (
        f"{kind}: processes of the program still run 15 s after it died of SIGTERM: "
        f"{survivors} (they are its saving children)"
    )
    if handler:
        assert outcome.exitcode == 143, outcome.describe()
        judge_dir(out, {"snap.pt": [new]}, allow_temps=False)
    else:
        assert outcome.signal == signal.SIGTERM or outcome.exitcode == 0, outcome.describe()
        judge_dir(out, {"snap.pt": [prev, new]})
        clean = zygote.run(
            work / "cleanup",
            "cleanup_probe",
            {"kind": kind, "out_dir": str(out), "how": "initialize"},
            timeout=60,
        )
        assert clean.exitcode == 0 and clean.result["after"] == [], clean.describe()
    fault_stats["process-life"][f"sigterm[{kind}]"] += 1


@pytest.mark.parametrize("kind", KINDS)
def test_user_fork_while_saving(kind, zygote, work, long_run, fault_seed, fault_stats):
    """The user's program forks repeatedly while a thread saves through the writer.

    In each child the inherited writer raises WriterClosedError (finalize is a no-op)
    and a new writer works; no child deadlocks; the parent's writer keeps working.
    """
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    out = work / "out"
    out.mkdir()
    forks = 20 if long_run else 4
    child_timeout = 20
    if kind == "process-spawn":
        # each forked child starts a fresh interpreter to save: 20 at once overload two
        # cores past the children's hang timeout
        forks, child_timeout = 6, 60
    outcome = zygote.run(
        work / "run",
        "user_fork",
        {
            "kind": kind,
            "out_dir": str(out),
            "forks": forks,
            "numel": 200_000,
            "seed": fault_seed,
            "child_timeout": child_timeout,
        },
        timeout=115,
    )
    assert outcome.exitcode == 0 and outcome.result, outcome.describe()
    res = outcome.result
    bad = {k: s for k, s in res["statuses"].items() if s != 0}
    assert not bad, (
        "forked children failed or hung (exit status 1: the inherited writer accepted a "
        f"call or faulthandler's hang timeout fired; 2: an error): {bad}\n"
        f"{outcome.stderr[-12000:]}"
    )
    assert not res["bg_errors"], res["bg_errors"]
    assert res["after"]["ok"] and res["finalize"]["ok"], res
    expected: dict[str, list[tuple[int, int]]] = {
        f"child{k}.pt": [(2000 + k, 64)] for k in range(forks)
    }
    expected["parent-after.pt"] = [(3000, 64)]
    n_bg = res["bg_saves"]
    for b in (0, 1):
        cands = [(1000 + i, 200_000) for i in range(b, n_bg + 1, 2)]
        if cands:
            expected[f"bg{b}.pt"] = cands
    judge_dir(out, expected, allow_missing=("bg0.pt", "bg1.pt"), allow_temps=False)
    fault_stats["process-life"][f"user-forks[{kind}]"] += forks


@pytest.mark.parametrize("kind", KINDS)
def test_no_lazy_initialisation_in_background_threads(kind, zygote, work, long_run):
    """Deterministic companion of the fork test above: the writer's loop and worker
    threads must not import modules (or compute ``tempfile.gettempdir()``) during the
    first saves. A ``fork()`` in the program during such an import leaves the child
    with a half-initialised module or an import lock held forever: its first writer
    then fails or hangs (seen in test_user_fork_while_saving)."""
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    out = work / "out"
    out.mkdir()
    r = zygote.result(
        work / "run", "background_imports", {"kind": kind, "out_dir": str(out)}, timeout=60
    )
    assert r["first"]["ok"] and r["second"]["ok"] and r["finalize"]["ok"], r
    problems = []
    if r["imports"]:
        mods = sorted({name for name, _thread in r["imports"]})
        threads = sorted({thread for _name, thread in r["imports"]})
        problems.append(f"modules imported by background threads {threads}: {mods}")
    if r["tempdir_computed_in_background"]:
        problems.append("tempfile.gettempdir() first computed (under its lock) during a save")
    assert not problems, f"{kind}:\n" + "\n".join(problems)


@pytest.mark.parametrize("kind", ["standard", "queue", "process-fork", "processqueue"])
def test_user_fork_child_exits_normally(kind, zygote, work):
    """A forked child leaves through the normal interpreter exit with its own pending
    save and the inherited writer: no deadlock, its save completes."""
    out = work / "out"
    out.mkdir()
    res = zygote.result(
        work / "run",
        "user_fork_exit",
        {"kind": kind, "out_dir": str(out), "numel": 1_000_000, "child_timeout": 60},
        timeout=100,
    )
    assert res["status"] == 0, res
    assert res["parent"]["ok"] and res["finalize"]["ok"], res
    judge_dir(out, {"parent.pt": [(1, 1_000_000)], "child.pt": [(2, 64)]}, allow_temps=False)


START_METHOD_KINDS = [
    "process-fork",
    "process-spawn",
    "process-forkserver",
    "processqueue-fork",
    "processqueue-spawn",
    "processqueue-forkserver",
]


@pytest.mark.parametrize("kind", START_METHOD_KINDS)
def test_process_writers_start_methods(kind, zygote, work, fault_stats):
    """Saves, a failing savefun (its exception type crosses back), an exception that
    does not pickle (ChildProcessFailure with its text), a closure savefun (works under
    fork where nothing is pickled, a clear error otherwise); the writer keeps going."""
    out = work / "out"
    out.mkdir()
    r: dict[str, Any] = zygote.result(
        work / "run", "mp_contexts", {"kind": kind, "out_dir": str(out)}, timeout=115
    )
    assert r["ok1"]["ok"] and r["ok2"]["ok"], r
    assert "SnapshotWriteError" in r["raises"]["error"]["mro"], r["raises"]
    assert "ValueError" in r["raises"]["error"]["cause"]["mro"], r["raises"]
    err = r["unpicklable_error"]["error"]
    assert "SnapshotWriteError" in err["mro"], err
    cause = err["cause"]
    assert "ChildProcessFailure" in cause["mro"] or "UnpicklableError" in cause["mro"], cause
    assert "custom failure that does not pickle" in cause["message"], cause
    closure = r["closure"]
    pickled = kind != "process-fork"
    if pickled:
        assert not closure["ok"] and "SnapshotError" in closure["error"]["mro"], closure
    else:
        assert closure["ok"], closure
    assert r["finalize"]["ok"], r["finalize"]
    expected = {"one.pt": [(1, 1000)], "five.pt": [(5, 1000)]}
    if not pickled:
        expected["four.pt"] = [(4, 64)]
    judge_dir(out, expected, allow_temps=False)
    fault_stats["process-life"][f"start-method[{kind}]"] += 1
