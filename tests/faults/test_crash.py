"""Case 1: kill -9 at any point of a save.

(a) a seeded schedule of timed kills of the whole process group during a big save;
(b) a kill at each file-system syscall of the save (``strace -e inject=...:signal=
SIGKILL``), so every step of the protocol (open, write, fsync, close of the temporary
file; rename; open, fsync, close of the directory) is crashed once;
(c) for process writers, kills of the saving child alone: the parent must report it and
keep working.

After each kill: the snapshot at the final name loads and equals the previous one (or,
for a kill after the rename, the new one); nothing but temporary names is left; the next
writer that opens the directory removes the leftovers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from snapwriter import _paths

from . import faultlib
from .harness import (
    SPAWN_SLOW,
    StraceRun,
    Syscall,
    assert_write_error,
    judge_dir,
    kill_group,
    long_only,
    saving_children,
    temps_in,
    wait_dead,
    wait_group_gone,
)

KINDS = list(faultlib.WRITERS)
PROCESS_KINDS = [k for k in KINDS if k in faultlib.PROCESS_KINDS]
BIG = 4_000_000  # float64 elements: a 32 MB tensor, so a save spans many milliseconds
SMALL = 64


def _points(kind: str, long_run: bool) -> int:
    if long_run:
        return 50
    return 2 if kind == "process-spawn" else 10


def _check_cleanup(zygote: Any, work: Path, kind: str, out_dir: Path, how: str) -> None:
    """A fresh writer opens ``out_dir``: every dead save's temporary file must go."""
    leftovers = temps_in(out_dir)
    outcome = zygote.run(
        work / f"cleanup-{how}",
        "cleanup_probe",
        {"kind": kind, "out_dir": str(out_dir), "how": how, "probe": [99, SMALL]},
        timeout=90,
    )
    assert outcome.exitcode == 0, outcome.describe()
    res = outcome.result
    assert res is not None
    assert sorted(res["before"]) == leftovers
    assert res["after"] == [], f"temporary leftovers not removed by {how}: {res['after']}"
    assert res["finalize"]["ok"], res


@pytest.mark.parametrize("kind", KINDS)
def test_timed_kills(kind, zygote, work, long_run, fault_seed, fault_stats, reaper):
    """Seeded random kill -9 of the saving process group while a 32 MB snapshot saves."""
    out_dir = work / "out"
    out_dir.mkdir()
    seed = f"{fault_seed}-{kind}"
    rng = random.Random(seed)
    cal = zygote.run(
        work / "calibrate",
        "crash_timed",
        {"kind": kind, "out_dir": str(out_dir), "prev": [1, SMALL], "new": [2, BIG]},
        timeout=120,
    )
    assert cal.exitcode == 0 and cal.result and cal.result["save"]["ok"], cal.describe()
    span = cal.result["save_s"] * 1.25 + 0.002
    judge_dir(out_dir, {"snap.pt": [(2, BIG)]}, allow_temps=False)
    stats = fault_stats[f"timed-kill[{kind}]"]
    n = _points(kind, long_run)
    for i in range(n):
        prev, new = (10 * i + 11, SMALL), (10 * i + 12, BIG)
        child = zygote.start(
            work / f"k{i}",
            "crash_timed",
            {"kind": kind, "out_dir": str(out_dir), "prev": list(prev), "new": list(new)},
        )
        reaper.append(child.pid)
        clean = child.wait_event("CLEAN", 90)
        assert clean["temps"] == [], (
            f"point {i}: the first save of a new writer left old temporary files "
            f"{clean['temps']} (seed {seed})"
        )
        child.wait_event("GO", 90)
        delay = rng.uniform(0, span)
        time.sleep(delay)  # the point of the test: a kill at a random instant
        child.kill(signal.SIGKILL)
        outcome = child.wait(60)
        where = f"{kind} point {i} (delay {delay * 1000:.1f} ms of {span * 1000:.0f}, seed {seed})"
        assert not outcome.timed_out, f"{where}: {outcome.describe()}"
        # A killed saving process may still be in an fsync (uninterruptible): until it is
        # gone its temporary file is rightly kept. The next point's writer starts after.
        survivors = wait_group_gone(child.pid, 60)
        assert not survivors, f"{where}: processes of the killed group still run: {survivors}"
        stats["tried"] += 1
        if outcome.signal == signal.SIGKILL:
            stats["killed"] += 1
        else:
            assert outcome.exitcode == 0, f"{where}: {outcome.describe()}"
            stats["finished_before_kill"] += 1
        try:
            j = judge_dir(out_dir, {"snap.pt": [prev, new]})
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
        phase = "new" if j.versions["snap.pt"] == new else "prev"
        stats[f"found_{phase}{'+temp' if j.temps else ''}"] += 1
        stats["survived"] += 1
    _check_cleanup(zygote, work, kind, out_dir, "initialize")
    judge_dir(
        out_dir,
        {"snap.pt": [(10 * (n - 1) + 11, SMALL), (10 * (n - 1) + 12, BIG)]},
        allow_temps=False,
    )


# -- (b) a kill (or an error) at each syscall --------------------------------------------

TOKEN = "5eedfa17c0ffee00"

#: Steps of the protocol and the syscall that performs each.
TMP_STEPS = ("open-tmp", "write-tmp", "fsync-tmp", "close-tmp", "rename")
DIR_STEPS = ("mkdir-dir", "open-dir", "fsync-dir", "close-dir")
AFTER_RENAME = {"open-dir", "fsync-dir", "close-dir"}


def classify(call: Syscall, tmp: str, out_dir: str) -> str:
    text = call.text
    if call.name == "rename" or call.name.startswith("renameat"):
        return "rename" if tmp in text else "rename-other"
    if tmp in text:
        return {
            "openat": "open-tmp",
            "open": "open-tmp",
            "write": "write-tmp",
            "pwrite64": "write-tmp",
            "writev": "write-tmp",
            "fsync": "fsync-tmp",
            "fdatasync": "fsync-tmp",
            "close": "close-tmp",
            "unlink": "unlink-tmp",
            "unlinkat": "unlink-tmp",
        }.get(call.name, f"{call.name}-tmp")
    if f'"{out_dir}"' in text or f"<{out_dir}>" in text:
        return {
            "mkdir": "mkdir-dir",
            "mkdirat": "mkdir-dir",
            "openat": "open-dir",
            "fsync": "fsync-dir",
            "fdatasync": "fsync-dir",
            "close": "close-dir",
        }.get(call.name, f"{call.name}-dir")
    return f"{call.name}-other"


def _plan(calls: list[Syscall]) -> list[tuple[str, int]]:
    """The (syscall, per-thread index) pairs that hit each call first, in order."""
    seen: set[tuple[str, int]] = set()
    plan = []
    for c in calls:
        key = (c.name, c.index)
        if key not in seen:
            seen.add(key)
            plan.append(key)
    return plan


@dataclasses.dataclass
class SweepRun:
    outcome: Any
    calls: list[Syscall]
    killed: list[int]  # tids strace saw killed by SIGKILL
    tmp: str  # the (predictable) temporary path of the save
    prev: tuple[int, int]
    new: tuple[int, int]


class SyscallSweep:
    """Runs ``crash_strace`` scenarios under strace for one writer kind."""

    def __init__(self, zygote: Any, work: Path, kind: str, reaper: list[int]) -> None:
        self.zygote = zygote
        self.work = work
        self.kind = kind
        self.reaper = reaper
        self.out_dir = work / "out"
        self.out_dir.mkdir(exist_ok=True)
        self.runs = 0
        self.version = 100

    def tmp_path(self, pid: int) -> str:
        host = f"{_paths.HOST_ID}-{_paths.BOOT_ID}"  # the child runs on this host and boot
        return f"{self.out_dir}/.snap.pt.snapwriter-tmp-{host}-{pid}-{TOKEN}"

    def run(self, label: str, group: str, inject: str | None, *, recover: bool = False) -> SweepRun:
        self.runs += 1
        self.version += 10
        prev, new = (self.version + 1, SMALL), (self.version + 2, 5000)
        params: dict[str, Any] = {
            "kind": self.kind,
            "out_dir": str(self.out_dir),
            "prev": list(prev),
            "new": list(new),
        }
        if recover:
            params["recover"] = [self.version + 3, SMALL]
        child = self.zygote.start(
            self.work / label, "crash_strace", params, env={"FAULTS_FIXED_TMP": TOKEN}
        )
        self.reaper.append(child.pid)
        child.wait_event("READY", 120)
        assert temps_in(self.out_dir) == [], "first save of a new writer left temporary files"
        tmp = self.tmp_path(child.pid)
        paths = {"tmp": [tmp], "dir": [str(self.out_dir)], "both": [tmp, str(self.out_dir)]}
        pids = [child.pid, *child.descendants()]
        st = StraceRun(pids, self.work / label / "strace.log", paths=paths[group], inject=inject)
        try:
            st.wait_attached()
        except BaseException:
            st.proc.kill()
            child.kill()
            raise
        child.send("GO")
        if recover:
            child.wait_event("SAVED", 120)
            st.detach()
            child.send("RECOVER")
        outcome = child.wait(120)
        if outcome.signal == signal.SIGKILL:
            kill_group(child.pid)  # strace stays attached to surviving children otherwise
        calls, killed = st.finish()
        return SweepRun(outcome, calls, killed, tmp, prev, new)


def _dry_run(sweep: SyscallSweep) -> tuple[list[Syscall], str]:
    run = sweep.run("dry", "both", None)
    outcome, calls, tmp = run.outcome, run.calls, run.tmp
    assert outcome.exitcode == 0 and outcome.result["save"]["ok"], outcome.describe()
    assert not run.killed
    judge_dir(sweep.out_dir, {"snap.pt": [run.new]}, allow_temps=False)
    steps = [classify(c, tmp, str(sweep.out_dir)) for c in calls]
    # The protocol, in order: temporary file written, fsynced, closed; renamed; dir fsynced.
    order = [s for s in steps if s in TMP_STEPS + DIR_STEPS and s != "mkdir-dir"]
    squashed = [s for i, s in enumerate(order) if i == 0 or order[i - 1] != s]
    assert squashed == [
        "open-tmp",
        "write-tmp",
        "fsync-tmp",
        "close-tmp",
        "rename",
        "open-dir",
        "fsync-dir",
        "close-dir",
    ], f"{sweep.kind}: unexpected protocol order {steps}"
    return calls, tmp


def _group_calls(calls: list[Syscall], tmp: str, out_dir: str, group: str) -> list[Syscall]:
    """The calls strace would count under the -P filter of ``group`` (indices recounted)."""
    out: list[Syscall] = []
    counts: dict[tuple[int, str], int] = {}
    for c in calls:
        step = classify(c, tmp, out_dir)
        in_tmp = step in TMP_STEPS or step.endswith("-tmp")
        in_dir = step in DIR_STEPS or step.endswith("-dir")
        if (group == "tmp" and in_tmp) or (group == "dir" and in_dir):
            key = (c.tid, c.name)
            counts[key] = counts.get(key, 0) + 1
            out.append(Syscall(c.tid, c.name, c.text, c.result, counts[key]))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_kill_at_each_syscall(kind, zygote, work, long_run, fault_stats, reaper):
    """kill -9 at each file-system syscall of a save; judge the disk after each."""
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    sweep = SyscallSweep(zygote, work, kind, reaper)
    calls, tmp_dry = _dry_run(sweep)
    stats = fault_stats[f"syscall-kill[{kind}]"]
    crashed: dict[str, int] = {}
    failures = []
    for group in ("tmp", "dir"):
        for name, index in _plan(_group_calls(calls, tmp_dry, str(sweep.out_dir), group)):
            label = f"kill-{group}-{name}-{index}"
            run = sweep.run(label, group, f"{name}:signal=SIGKILL:when={index}")
            outcome, got, killed, tmp, prev, new = (
                run.outcome,
                run.calls,
                run.killed,
                run.tmp,
                run.prev,
                run.new,
            )
            stats["tried"] += 1
            where = f"{kind} {label}"
            if outcome.timed_out:
                failures.append(f"{where}: hung\n{outcome.describe()}")
                continue
            hit = [c for c in got if c.result == "= ?" and c.tid in killed]
            if not hit:
                failures.append(f"{where}: the injection did not fire ({outcome.describe()})")
                continue
            step = classify(hit[-1], tmp, str(sweep.out_dir))
            crashed[step] = crashed.get(step, 0) + 1
            expect = [new] if step in AFTER_RENAME else [prev]
            try:
                judge_dir(sweep.out_dir, {"snap.pt": expect})
            except AssertionError as exc:
                failures.append(f"{where} (crashed at {step}: {hit[-1].text}): {exc}")
                continue
            if kind in faultlib.PROCESS_KINDS and outcome.signal != signal.SIGKILL:
                # only the saving child died: the parent must have reported it and exited
                res = outcome.result
                if outcome.exitcode != 0 or res is None:
                    failures.append(f"{where}: parent did not survive\n{outcome.describe()}")
                    continue
                err = res["save"]["error"]
                if res["save"]["ok"] or "SnapshotWriteError" not in err["mro"]:
                    failures.append(f"{where}: the child's death was not reported: {res}")
                    continue
                if "ChildProcessFailure" not in err["cause"]["mro"]:
                    failures.append(f"{where}: the child's death is reported as {err['cause']}")
                    continue
                stats["child_killed_parent_reported"] += 1
            stats["survived"] += 1
    _check_cleanup(zygote, work, kind, sweep.out_dir, "initialize")
    required = set(TMP_STEPS) | (set(DIR_STEPS) - {"mkdir-dir"})
    missing = required - set(crashed)
    for step, count in crashed.items():
        stats[f"step:{step}"] += count
    assert not failures, "\n\n".join(failures)
    assert not missing, f"{kind}: protocol steps never crashed: {sorted(missing)} ({crashed})"


@pytest.mark.parametrize("kind", KINDS)
def test_eio_at_each_syscall(kind, zygote, work, long_run, fault_stats, reaper):
    """EIO from each write/fsync/close/rename/dir syscall of a real local save.

    The caller gets a SnapshotWriteError naming the file with the OSError (errno EIO)
    chained; the previous snapshot is intact (or, when the error hits the directory
    fsync after the rename, the new one is complete); no temporary file is left; the
    same writer saves again successfully.
    """
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    if kind in ("thread", "queue", "threadqueue"):
        long_only(long_run, "same save path as StandardWriter")
    sweep = SyscallSweep(zygote, work, kind, reaper)
    calls, tmp_dry = _dry_run(sweep)
    stats = fault_stats[f"syscall-eio[{kind}]"]
    failures = []
    targets = {"write-tmp", "fsync-tmp", "close-tmp", "rename", "open-tmp", "open-dir", "fsync-dir"}
    for group in ("tmp", "dir"):
        gcalls = _group_calls(calls, tmp_dry, str(sweep.out_dir), group)
        done_steps: set[str] = set()
        for c in gcalls:
            step = classify(c, tmp_dry, str(sweep.out_dir))
            if step not in targets or (step in done_steps and not long_run):
                continue
            done_steps.add(step)
            label = f"eio-{group}-{c.name}-{c.index}"
            outcome = sweep.run(
                label, group, f"{c.name}:error=EIO:when={c.index}", recover=True
            ).outcome
            stats["tried"] += 1
            where = f"{kind} {label} ({step})"
            res = outcome.result
            if outcome.exitcode != 0 or res is None:
                failures.append(f"{where}: scenario failed\n{outcome.describe()}")
                continue
            err = res["save"]["error"]
            path = str(sweep.out_dir / "snap.pt")
            try:
                assert_write_error(err, path, errno_=5, where=where)
            except AssertionError as exc:
                failures.append(str(exc))
            if res["temps_after_recover"]:
                failures.append(f"{where}: temporary files left: {res['temps_after_recover']}")
            if not res["recover"]["ok"]:
                failures.append(f"{where}: the writer did not recover: {res['recover']}")
            try:
                judge_dir(sweep.out_dir, {"snap.pt": [(sweep.version + 3, SMALL)]})
            except AssertionError as exc:
                failures.append(f"{where}: {exc}")
            if res["finalize"]["ok"] is False:
                failures.append(f"{where}: finalize raised again: {res['finalize']}")
            stats[f"step:{step}"] += 1
    assert not failures, "\n\n".join(failures)


# -- (c) kill only the saving child of a process writer -----------------------------------


@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_kill_saving_child(kind, zygote, work, long_run, fault_seed, fault_stats, reaper):
    """SIGKILL the child process that saves; the parent reports it and keeps working."""
    out_dir = work / "out"
    out_dir.mkdir()
    rng = random.Random(f"{fault_seed}-child-{kind}")
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    stats = fault_stats[f"child-kill[{kind}]"]
    n = 20 if long_run else 5
    for i in range(n):
        prev, new, after = (10 * i + 1, SMALL), (10 * i + 2, BIG), (10 * i + 3, SMALL)
        child = zygote.start(
            work / f"c{i}",
            "kill_saving_child",
            {
                "kind": kind,
                "out_dir": str(out_dir),
                "prev": list(prev),
                "new": list(new),
                "after": list(after),
            },
        )
        reaper.append(child.pid)
        child.wait_event("GO", 90)
        # Wait for the saving child to exist, then kill it after a random delay.
        deadline = time.monotonic() + 60
        victims: list[int] = []
        while not victims and time.monotonic() < deadline:
            victims = saving_children(child.pid)
            if not victims:
                time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.15))
        for v in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(v, signal.SIGKILL)
        for v in victims:  # dead before the next save starts (else that save races it)
            assert wait_dead(v, 30), f"saving child {v} survived SIGKILL"
        child.wait_event("SAVED", 90)
        child.send("CONTINUE")
        outcome = child.wait(90)
        where = f"{kind} child-kill {i}"
        assert not outcome.timed_out, f"{where}: parent hung\n{outcome.describe()}"
        assert outcome.exitcode == 0 and outcome.result, f"{where}: {outcome.describe()}"
        res = outcome.result
        stats["tried"] += 1
        if res["save"]["ok"]:
            stats["finished_before_kill"] += 1
        else:
            err = res["save"]["error"]
            assert "SnapshotWriteError" in err["mro"], f"{where}: {err}"
            assert "ChildProcessFailure" in err["cause"]["mro"], (
                f"{where}: the child's death is reported as {err['cause']['type']}: "
                f"{err['cause']['message']}, not as a ChildProcessFailure"
            )
            stats["reported"] += 1
        assert res["after"]["ok"], f"{where}: writer unusable after a child died: {res}"
        assert res["finalize"]["ok"], f"{where}: {res['finalize']}"
        judge_dir(out_dir, {"snap.pt": [prev, new], "after.pt": [after]})
        stats["survived"] += 1
    _check_cleanup(zygote, work, kind, out_dir, "initialize")
