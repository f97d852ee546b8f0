"""Case 2: disk full and I/O errors.

ENOSPC on a size-limited tmpfs, EFBIG through RLIMIT_FSIZE, and OSError(EIO) injected
by a PFIO-style file-system wrapper at open, write, flush, close, rename and makedirs
(``test_crash.test_eio_at_each_syscall`` injects EIO into the real syscalls of a local
save instead). In every case the caller gets a ``SnapshotWriteError`` naming the file
with the ``OSError`` chained (errno preserved), the previous snapshot is intact, no
partial or temporary file is left and the same writer saves again once the fault is
gone.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from . import faultlib
from .harness import SPAWN_SLOW, assert_write_error, judge_dir, long_only, tmpfs

KINDS = list(faultlib.WRITERS)


#: Writers whose target crosses to another process through torch's shared memory: a
#: file-size limit already fails the transfer, with torch's RuntimeError (no OSError).
SHM_TRANSFER = {"process-spawn", "processqueue"}


def _check(
    kind: str, res: dict[str, Any], out_dir: Path, err: int, v1, v3, *, shm_ok: bool = False
) -> None:
    path = str(out_dir / "snap.pt")
    where = f"{kind}"
    assert res["v1"]["ok"], f"{where}: first save failed: {res['v1']}"
    problems = []
    try:
        error = res["v2"]["error"]
        cause = (error or {}).get("cause") or {}
        if shm_ok and "OSError" not in cause.get("mro", []):
            # the transfer to the saving process failed first (torch shared memory)
            assert_write_error(error, path, cause_type="RuntimeError", where=where)
            assert os.strerror(err) in cause["message"], cause
        else:
            assert_write_error(error, path, errno_=err, where=where)
    except AssertionError as exc:
        problems.append(str(exc))
    if res["temps_after_failure"]:
        problems.append(f"temporary files left after the failure: {res['temps_after_failure']}")
    if res["after_failure"] != list(v1):
        problems.append(f"previous snapshot not intact after the failure: {res['after_failure']}")
    if not res["v3"]["ok"]:
        problems.append(f"the writer did not recover: {res['v3']}")
    if not res["finalize"]["ok"] or not res["finalize_again"]["ok"]:
        problems.append(f"finalize raised a failure already reported: {res['finalize']}")
    try:
        judge_dir(out_dir, {"snap.pt": [v3]}, allow_temps=False)
    except AssertionError as exc:
        problems.append(str(exc))
    assert not problems, f"{where}:\n" + "\n".join(problems)


@pytest.fixture
def small_tmpfs(work: Path):
    mnt = work / "tmpfs"
    try:
        cm = tmpfs(mnt, "8m")
        cm.__enter__()
    except PermissionError as exc:
        pytest.skip(f"ENOSPC cases need a tmpfs mount, not permitted here: {exc}")
    try:
        yield mnt
    finally:
        cm.__exit__(None, None, None)


@pytest.mark.parametrize("kind", KINDS)
def test_enospc(kind, zygote, small_tmpfs, work, fault_stats):
    out_dir = small_tmpfs / "out"
    out_dir.mkdir()
    v1, v2, v3 = (1, 64), (2, 300_000), (3, 300_000)
    res = zygote.result(
        work / "run",
        "io_fault",
        {
            "kind": kind,
            "out_dir": str(out_dir),
            "fault": "enospc",
            "filler": str(small_tmpfs / "filler"),
            "v1": v1,
            "v2": v2,
            "v3": v3,
        },
        timeout=120,
    )
    assert res.get("filler_errno") == errno.ENOSPC, res
    fault_stats["io-faults"][f"enospc[{kind}]"] += 1
    _check(kind, res, out_dir, errno.ENOSPC, v1, v3)


@pytest.mark.parametrize("kind", KINDS)
def test_efbig(kind, zygote, work, long_run, fault_stats):
    """RLIMIT_FSIZE in the child (SIGXFSZ ignored): writes past it fail with EFBIG."""
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    out_dir = work / "out"
    out_dir.mkdir()
    v1, v2, v3 = (1, 64), (2, 500_000), (3, 64)
    res = zygote.result(
        work / "run",
        "io_fault",
        {
            "kind": kind,
            "out_dir": str(out_dir),
            "fault": "efbig",
            "fsize_limit": 1 << 20,
            "v1": v1,
            "v2": v2,
            "v3": v3,
        },
        timeout=120,
    )
    fault_stats["io-faults"][f"efbig[{kind}]"] += 1
    _check(kind, res, out_dir, errno.EFBIG, v1, v3, shm_ok=kind in SHM_TRANSFER)


FS_FAULTS = ["open", "flush", "close", "rename", "makedirs", "write"]


@pytest.mark.parametrize("kind", KINDS)
def test_fs_wrapper_eio(kind, zygote, work, long_run, fault_stats):
    """A PFIO-style fs wrapper raises OSError(EIO) from open, write, flush, close,
    rename, makedirs in turn, one save each; the same writer saves between them."""
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    out_dir = work / "out"
    out_dir.mkdir()
    outcome = zygote.run(
        work / "run",
        "fs_faults",
        {
            "kind": kind,
            "out_dir": str(out_dir),
            "control": str(work / "armed"),
            "ops": FS_FAULTS,
            "v1": [1, 64],
            "v2": [2, 50_000],
        },
        timeout=120,
    )
    res = outcome.result or {}
    if outcome.exitcode != 0:
        done = [op for op in FS_FAULTS if op in res]
        when = next(
            (f"during the save failing at {op!r}" for op in FS_FAULTS if op not in res),
            "after the last fault (when the failed save's state was freed)",
        )
        raise AssertionError(
            f"{kind}: the program died {when}; faults done: {done}\n{outcome.describe()}"
        )
    assert res["v1"]["ok"], res["v1"]
    path = str(out_dir / "snap.pt")
    problems = []
    good = [1, 64]
    for k, op in enumerate(FS_FAULTS):
        fault_stats["io-faults"][f"fs-eio-{op}[{kind}]"] += 1
        r = res[op]
        where = f"{kind}/{op}"
        try:
            assert_write_error(r["v2"]["error"], path, errno_=errno.EIO, where=where)
        except AssertionError as exc:
            problems.append(str(exc))
        if r["temps_after_failure"]:
            problems.append(f"{where}: temporary files left: {r['temps_after_failure']}")
        if r["after_failure"] != good:
            problems.append(f"{where}: previous snapshot not intact: {r['after_failure']}")
        if r["v3"]["ok"]:
            good = [2000 + k, 64]
        else:
            problems.append(f"{where}: the writer did not recover: {r['v3']}")
    if not res["finalize"]["ok"] or not res["finalize_again"]["ok"]:
        problems.append(f"finalize raised a failure already reported: {res['finalize']}")
    try:
        judge_dir(out_dir, {"snap.pt": [tuple(res["last_good"])]}, allow_temps=False)
    except AssertionError as exc:
        problems.append(str(exc))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", ["simple", "standard", "process-fork", "processqueue"])
def test_fs_wrapper_eio_through_torch_save(kind, zygote, work, fault_stats):
    """The same EIO from write, when the snapshot goes through ``torch.save`` itself
    (a target with an ``nn.Parameter``): ``torch.save`` turns the failed write into a
    ``RuntimeError``; the caller must still get the ``OSError`` (errno) as the cause."""
    out_dir = work / "out"
    out_dir.mkdir()
    v1, v2, v3 = (1, 64), (2, 50_000), (3, 64)
    res = zygote.result(
        work / "run",
        "io_fault",
        {
            "kind": kind,
            "out_dir": str(out_dir),
            "fault": "fs:write",
            "control": str(work / "armed"),
            "after_bytes": 1000,
            "torch_save_path": True,
            "v1": v1,
            "v2": v2,
            "v3": v3,
        },
        timeout=120,
    )
    fault_stats["io-faults"][f"fs-eio-write-torch.save[{kind}]"] += 1
    _check(kind, res, out_dir, errno.EIO, v1, v3)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "simple"])
def test_unobserved_failure_raised_by_next_call(kind, zygote, work, long_run):
    """A failure nobody looked at is raised by the next call, then not again."""
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    out_dir = work / "out"
    out_dir.mkdir()
    v1, v2, v3 = (1, 64), (2, 1000), (3, 64)
    res = zygote.result(
        work / "run",
        "io_fault",
        {
            "kind": kind,
            "out_dir": str(out_dir),
            "fault": "fs:rename",
            "control": str(work / "armed"),
            "unobserved": True,
            "v1": v1,
            "v2": v2,
            "v3": v3,
        },
        timeout=120,
    )
    assert res["v2_done"], res
    assert_write_error(
        res["next_call"].get("error"), str(out_dir / "snap.pt"), errno_=errno.EIO, where=kind
    )
    assert res["v3"]["ok"], res
    assert res["finalize"]["ok"], f"finalize raised the failure a second time: {res['finalize']}"
    judge_dir(out_dir, {"snap.pt": [v3]}, allow_temps=False)


@pytest.mark.parametrize("kind", KINDS)
def test_small_save_after_big_one_stays_small(kind, zygote, work, long_run):
    """Found by test_efbig: a small snapshot saved after a big one through the same
    writer must not carry the big one's staging buffer (file size, stale data)."""
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    out_dir = work / "out"
    out_dir.mkdir()
    res = zygote.result(
        work / "run",
        "arena_reuse",
        {"kind": kind, "out_dir": str(out_dir), "big": [1, 1_000_000], "small": [2, 10]},
        timeout=120,
    )
    assert res["big"]["ok"] and res["small"]["ok"], res
    judge_dir(out_dir, {"big.pt": [(1, 1_000_000)], "small.pt": [(2, 10)]}, allow_temps=False)
    assert res["small.pt"] < 64 * 1024, (
        f"{kind}: small.pt (10 float64 elements) is {res['small.pt']} bytes on disk: it "
        f"holds the big snapshot's staging buffer ({res['big.pt']} bytes)"
    )
