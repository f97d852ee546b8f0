"""Case 7: permission denied, as a non-root user.

The scenario child drops to uid/gid 65534 (nobody) before creating the writer, then
saves into a root-owned directory, over a root-owned snapshot, into a read-only
sub-directory and under a directory it cannot create. Each save fails with a
``SnapshotWriteError`` naming the file with the ``PermissionError`` (EACCES) chained;
nothing is lost or created; the same process still saves where it may.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch

from . import faultlib
from .harness import assert_write_error, judge_dir, tree, tree_diff

KINDS = list(faultlib.WRITERS)
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")


def _layout(work: Path) -> dict[str, Path]:
    ro = work / "ro"  # root-owned, 0755
    ro.mkdir(mode=0o755)
    torch.save(faultlib.payload(1), ro / "snap.pt")
    (ro / "snap.pt").chmod(0o644)
    rw = work / "rw"  # nobody's
    rw.mkdir()
    os.chown(rw, NOBODY, NOBODY)
    locked = rw / "locked"  # nobody's, but read-only
    locked.mkdir()
    os.chown(locked, NOBODY, NOBODY)
    torch.save(faultlib.payload(2), locked / "snap.pt")
    os.chown(locked / "snap.pt", NOBODY, NOBODY)
    locked.chmod(0o555)
    rootonly = work / "rootonly"
    rootonly.mkdir(mode=0o755)
    return {"ro": ro, "rw": rw, "locked": locked, "rootonly": rootonly}


def _reachable_by_others(path: str) -> bool:
    """Whether a non-root user can reach ``path`` (every parent has o+x)."""
    p = Path(path).resolve()
    return all(os.stat(parent).st_mode & 0o001 for parent in p.parents)


@pytest.mark.parametrize("kind", KINDS)
def test_permission_denied(kind, zygote, work, fault_stats):
    if kind == "process-spawn" and not _reachable_by_others(sys.executable):
        pytest.skip(f"nobody cannot run {sys.executable} (a parent directory is not o+x)")
    d = _layout(work)
    cases = {
        "over_root_snapshot": (str(d["ro"]), "snap.pt"),
        "new_in_root_dir": (str(d["ro"]), "new.pt"),
        "readonly_subdir": (str(d["rw"]), "locked/snap.pt"),
        "uncreatable_dir": (str(d["rootonly"] / "newsub"), "snap.pt"),
    }
    run_dir = work / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)  # the child writes its result there as nobody
    before = tree(work)
    res = zygote.result(
        run_dir,
        "permission",
        {"kind": kind, "cases": cases, "writable": str(d["rw"])},
        timeout=60,
    )
    assert res["uid"] == NOBODY
    problems = []
    for label, (out_dir, name) in cases.items():
        fault_stats["permissions"][kind] += 1
        r = res[label]
        try:
            assert_write_error(
                r.get("error"), os.path.join(out_dir, name), errno_=errno.EACCES, where=label
            )
        except AssertionError as exc:
            problems.append(str(exc))
        if not r["finalize"]["ok"]:
            problems.append(f"{label}: finalize raised a failure already reported: {r['finalize']}")
    if not res["writable"]["ok"]:
        problems.append(f"a save where nobody may write failed: {res['writable']}")
    diff = [
        line
        for line in tree_diff(before, tree(work))
        if not line.split()[1].startswith(("run", "rw/ok.pt"))
    ]
    if diff:
        problems.append(f"the tree changed: {diff}")
    assert not problems, f"{kind}:\n" + "\n".join(problems)
    judge_dir(d["ro"], {"snap.pt": [(1, 64)]}, allow_temps=False)
    judge_dir(d["locked"], {"snap.pt": [(2, 64)]}, allow_temps=False)
    judge_dir(d["rw"], {"ok.pt": [(3, 64)]}, allow_extra=("locked",), allow_temps=False)
