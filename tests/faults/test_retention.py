"""Case 6: retention under faults.

With retention on (snapwriter's ``keep_last`` or ppe's ``n_retains`` through
``_add_cleanup_hook``), a crash at any point or a failed save never leaves fewer
complete snapshots than configured, and the newest committed snapshot is never
deleted. Retention runs after the commit: a kill at the deletion itself leaves one
snapshot too many, never one too few.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest

from . import faultlib
from .harness import SPAWN_SLOW, StraceRun, judge_dir, kill_group, long_only, temps_in

KINDS = list(faultlib.WRITERS)
KEEP = 3
NUMEL = 300_000

pytestmark = pytest.mark.skipif(
    not faultlib.supports_keep_last(), reason="this snapwriter has no keep_last option"
)


def _complete(out: Path) -> dict[int, bool]:
    """iter number -> loads and equals payload(i) for every committed iter_*.pt."""
    found = {}
    for name in os.listdir(out):
        m = re.fullmatch(r"iter_(\d+)\.pt", name)
        if not m:
            continue
        i = int(m.group(1))
        try:
            faultlib.which_version(str(out / name), [(i, NUMEL)])
            found[i] = True
        except AssertionError:
            found[i] = False
    return found


def _check_invariant(out: Path, committed: int, where: str) -> dict[int, bool]:
    found = _complete(out)
    broken = [i for i, ok in found.items() if not ok]
    assert not broken, f"{where}: snapshots that do not load or differ: {broken}"
    if committed:
        assert committed in found, (
            f"{where}: the newest committed snapshot iter_{committed} was deleted ({sorted(found)})"
        )
    need = min(KEEP, committed)
    assert len(found) >= need, (
        f"{where}: {len(found)} complete snapshots left ({sorted(found)}), "
        f"keep={KEEP}, {committed} committed"
    )
    return found


def _points(kind: str, mode: str, long_run: bool) -> int:
    return 15 if long_run else 2


@pytest.mark.parametrize("mode", ["keep_last", "ppe"])
@pytest.mark.parametrize("kind", KINDS)
def test_retention_survives_kills(
    kind, mode, zygote, work, long_run, fault_seed, fault_stats, reaper
):
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    n = _points(kind, mode, long_run)
    if mode == "ppe" and kind != "standard":
        long_only(long_run, "ppe's n_retains: StandardWriter in the default run")
    rng = random.Random(f"{fault_seed}-retention-{kind}-{mode}")
    stats = fault_stats[f"retention-kill[{kind},{mode}]"]
    out = work / "out"
    out.mkdir()
    start = 1
    committed = 0
    for point in range(n):
        child = zygote.start(
            work / f"p{point}",
            "retention_loop",
            {
                "kind": kind,
                "out_dir": str(out),
                "keep": KEEP,
                "numel": NUMEL,
                "mode": mode,
                "start": start,
            },
        )
        reaper.append(child.pid)
        stop_after = rng.randint(1, 5)
        seen = 0
        last_ok = committed
        for _ in range(stop_after):
            ev = child.wait_event("SAVED", 90, after=seen)
            seen = child.events.index(ev) + 1
            assert ev["ok"], ev
            last_ok = ev["i"]
        time.sleep(rng.uniform(0, 0.08))  # into the next save, its commit or retention
        child.kill(signal.SIGKILL)
        outcome = child.wait(60)
        assert not outcome.timed_out
        # a SAVED event we did not read yet may exist: it only raises the bar
        for ev in child.events:
            if ev["tag"] == "SAVED" and ev["ok"]:
                last_ok = max(last_ok, ev["i"])
        found = _check_invariant(out, last_ok, f"{kind}/{mode} point {point}")
        committed = max(found) if found else last_ok
        start = committed + 1
        stats["tried"] += 1
        stats["survived"] += 1
    # temporary leftovers of the killed saves are removed by the next writer
    clean = zygote.run(
        work / "cleanup",
        "cleanup_probe",
        {"kind": kind, "out_dir": str(out), "how": "initialize"},
        timeout=60,
    )
    assert clean.exitcode == 0 and clean.result["after"] == [], clean.describe()


@pytest.mark.parametrize("mode", ["keep_last", "ppe"])
@pytest.mark.parametrize("kind", KINDS)
def test_failed_saves_do_not_count(kind, mode, zygote, work, long_run, fault_stats):
    """Every third save fails: retention keeps the last KEEP *committed* snapshots."""
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    if mode == "ppe" and kind not in ("standard", "processqueue"):
        long_only(long_run, "ppe's n_retains: two writers in the default run")
    out = work / "out"
    out.mkdir()
    res = zygote.result(
        work / "run",
        "retention_loop",
        {
            "kind": kind,
            "out_dir": str(out),
            "keep": KEEP,
            "numel": NUMEL,
            "mode": mode,
            "count": 10,
            "fail_every": 3,
        },
        timeout=110,
    )
    for i, o in res["outcomes"].items():
        assert o["ok"] == (int(i) % 3 != 0), (i, o)
    assert res["finalize"]["ok"], res["finalize"]
    found = _complete(out)
    assert all(found.values()), found
    assert sorted(found) == [7, 8, 10], f"{kind}/{mode}: kept {sorted(found)}"
    assert temps_in(out) == []
    fault_stats["retention"][f"failed-saves[{kind},{mode}]"] += 1


@pytest.mark.parametrize("mode", ["keep_last", "ppe"])
@pytest.mark.parametrize("kind", ["standard", "simple", "process-fork", "processqueue"])
def test_kill_at_retention_delete(kind, mode, zygote, work, long_run, reaper, fault_stats):
    """kill -9 exactly when retention deletes the oldest snapshot (strace): the new
    snapshot is already committed, nothing is lost; the next writer trims the extra."""
    if mode == "ppe" and kind != "standard":
        long_only(long_run, "ppe's n_retains: StandardWriter in the default run")
    out = work / "out"
    out.mkdir()
    child = zygote.start(
        work / "run",
        "retention_loop",
        {
            "kind": kind,
            "out_dir": str(out),
            "keep": KEEP,
            "numel": NUMEL,
            "mode": mode,
            "count": KEEP + 1,
            "pause_before": KEEP + 1,
        },
    )
    reaper.append(child.pid)
    child.wait_event("READY", 90)
    oldest = str(out / "iter_1.pt")
    st = StraceRun(
        [child.pid, *child.descendants()],
        work / "strace.log",
        paths=[oldest],
        inject="unlink,unlinkat:signal=SIGKILL:when=1",
    )
    st.wait_attached()
    child.send("GO")
    outcome = child.wait(90)
    kill_group(child.pid)  # a process writer's child may outlive the killed parent
    _calls, killed = st.finish()
    assert killed, f"retention never tried to delete {oldest}:\n{outcome.describe()}"
    found = _complete(out)
    assert sorted(found) == [1, 2, 3, 4] and all(found.values()), (
        f"{kind}/{mode}: after a kill at the delete: {found}"
    )
    # the next writer's first save applies retention again
    after = zygote.run(
        work / "after",
        "retention_loop",
        {
            "kind": kind,
            "out_dir": str(out),
            "keep": KEEP,
            "numel": NUMEL,
            "mode": mode,
            "start": 5,
            "count": 1,
        },
        timeout=90,
    )
    assert after.exitcode == 0, after.describe()
    found = _complete(out)
    assert sorted(found) == [3, 4, 5] and all(found.values()), found
    judge_dir(out, {f"iter_{i}.pt": [(i, NUMEL)] for i in (3, 4, 5)}, allow_temps=False)
    fault_stats["retention"][f"kill-at-delete[{kind},{mode}]"] += 1
