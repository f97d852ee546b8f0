"""Case 3: bad input.

Filenames that are empty, absolute, escape ``out_dir`` (``..``, a symlinked directory),
contain NUL or name an existing directory; targets that cannot be staged or pickled;
save functions that raise, write nothing or close the file; wrong argument types. Each
gets a clear error at call time, and the whole tree around ``out_dir`` (a parent
directory holding ``out_dir`` and a sibling "outside" directory) is byte-for-byte the
same afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from . import faultlib
from .harness import SPAWN_SLOW, judge_dir, long_only, tree, tree_diff

KINDS = list(faultlib.WRITERS)


def _layout(work: Path) -> tuple[Path, Path, Path]:
    base = work / "base"
    out = base / "out"
    outside = base / "outside"
    out.mkdir(parents=True)
    outside.mkdir()
    torch.save(faultlib.payload(1), out / "snap.pt")
    torch.save(faultlib.payload(666), outside / "victim.pt")
    (out / "existing_dir").mkdir()
    (out / "existing_dir" / "keep.txt").write_text("keep")
    os.symlink("../outside", out / "link")
    os.symlink("../outside/victim.pt", out / "flink")
    return base, out, outside


BAD_FILENAMES: dict[str, Any] = {
    "empty": "",
    "dotdot": "../outside/escape.pt",
    "dotdot_nested": "sub/../../outside/escape.pt",
    "dotdot_only": "..",
    "dot": ".",
    "symlinked_dir": "link/escape.pt",
    "symlinked_dir_nested": "link/deeper/escape.pt",
    "nul": "a\x00b.pt",
    "existing_dir": "existing_dir",
    "trailing_slash": "newdir/",
    "bytes": {"type": "bytes", "value": "x.pt"},
    "int": {"type": "int", "value": "5"},
    "none": {"type": "none", "value": ""},
}


#: Checks that need the file system (symlinks resolved, existing directory) run just
#: before the write, not in the call (a call must not do file I/O on an event loop):
#: their error comes from the handle, still before anything is written.
FS_CHECKED = {"symlinked_dir", "symlinked_dir_nested", "existing_dir"}


def _assert_call_error(
    label: str, res: dict[str, Any], *types: str, background_ok: bool = False
) -> None:
    assert not res["ok"], f"{label}: accepted (no error)"
    if not background_ok:
        assert res["phase"] == "call", f"{label}: error only in the background: {res}"
    mro = res["error"]["mro"]
    assert any(t in mro for t in types), f"{label}: expected {types}, got {res['error']}"
    assert res["error"]["message"], f"{label}: empty message"


@pytest.mark.parametrize("mode", ["ctor_out_dir", "call_out_dir"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_filenames(kind, mode, zygote, work, long_run, fault_stats):
    if mode == "call_out_dir" and kind not in ("standard", "simple", "processqueue"):
        pytest.skip("call-time out_dir: a few writers suffice (same validation code)")
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    base, out, outside = _layout(work)
    names = dict(BAD_FILENAMES)
    names["absolute"] = str(outside / "abs.pt")  # an absolute name inside out_dir is valid
    before = tree(base)
    res = zygote.result(
        work / "run",
        "bad_filenames",
        {
            "kind": kind,
            "out_dir": str(out),
            "ctor_out_dir": str(out) if mode == "ctor_out_dir" else "",
            # ppe's rule: without a constructor out_dir, the current directory is the
            # writer's (the call's out_dir only confines absolute names)
            "chdir": str(out) if mode == "call_out_dir" else "",
            "filenames": names,
        },
        timeout=90,
    )
    problems = []
    for label in names:
        fault_stats["bad-input"]["filename"] += 1
        try:
            _assert_call_error(
                label, res[label], "InvalidSnapshotArgument", background_ok=label in FS_CHECKED
            )
        except AssertionError as exc:
            problems.append(str(exc))
    diff = tree_diff(before, tree(base))
    if diff:
        problems.append(f"the tree changed: {diff}")
    assert res["_finalize"]["ok"], res["_finalize"]
    assert not problems, f"{kind}/{mode}:\n" + "\n".join(problems)


@pytest.mark.parametrize("kind", ["standard", "simple", "process-fork", "processqueue"])
def test_tricky_but_valid_filenames(kind, zygote, work):
    """``a/../b.pt`` stays inside; a final name that is a symlink to a file outside is
    replaced (rename does not follow it): the outside file is never written."""
    _base, out, outside = _layout(work)
    victim = tree(outside)
    res = zygote.result(
        work / "run",
        "bad_filenames",
        {
            "kind": kind,
            "out_dir": str(out),
            "filenames": {"normalised": "a/../b.pt", "file_symlink": "flink", "sub": "sub/c.pt"},
        },
        timeout=90,
    )
    for label in ("normalised", "file_symlink", "sub"):
        assert res[label]["ok"], f"{label}: {res[label]}"
    assert tree(outside) == victim, tree_diff(victim, tree(outside))
    assert not (out / "flink").is_symlink()
    judge_dir(
        out,
        {"b.pt": [(5, 64)], "flink": [(5, 64)], "snap.pt": [(1, 64)]},
        allow_extra=("existing_dir", "link", "sub", "a"),
        allow_temps=False,
    )
    assert not (out / "a").exists(), "a/../b.pt created directory a"
    faultlib.which_version(str(out / "sub" / "c.pt"), [(5, 64)])


TARGETS = ["lambda", "socket", "open_file", "lock", "generator", "nested_lambda_in_list"]


@pytest.mark.parametrize("kind", KINDS)
def test_unstageable_targets(kind, zygote, work, fault_stats):
    base, out, _outside = _layout(work)
    before = tree(base)
    res = zygote.result(
        work / "run",
        "bad_targets",
        {"kind": kind, "out_dir": str(out), "targets": TARGETS},
        timeout=120,
    )
    problems = []
    for label in TARGETS:
        fault_stats["bad-input"]["target"] += 1
        try:
            if kind == "simple":
                # SimpleWriter does not stage: pickling fails while writing, in the call
                _assert_call_error(label, res[label], "SnapshotError")
            elif kind == "process-cow":
                # a forked call stages nothing: the child's pickling fails, and the
                # handle raises it (the first call into a directory stages: StagingError)
                _assert_call_error(
                    label, res[label], "StagingError", "SnapshotWriteError", background_ok=True
                )
                cause = res[label]["error"]["cause"]
                assert res[label]["phase"] == "call" or cause["type"] in (
                    "TypeError",
                    "AttributeError",
                    "PicklingError",
                ), f"{label}: {res[label]}"
            else:
                _assert_call_error(label, res[label], "StagingError")
        except AssertionError as exc:
            problems.append(str(exc))
        if not res[label]["finalize"]["ok"]:
            problems.append(f"{label}: finalize raised: {res[label]['finalize']}")
    diff = tree_diff(before, tree(base))
    if diff:
        problems.append(f"the tree changed: {diff}")
    assert not problems, f"{kind}:\n" + "\n".join(problems)


FAILING_SAVEFUNS = ["raising_savefun", "partial_then_raise_savefun", "closing_savefun"]


def _run_savefuns(kind, savefuns, zygote, work, fault_stats) -> tuple[dict[str, Any], list[str]]:
    base, out, _outside = _layout(work)
    before = tree(base)
    results = zygote.result(
        work / "run",
        "bad_savefuns",
        {"kind": kind, "out_dir": str(out), "savefuns": savefuns},
        timeout=120,
    )
    problems = []
    for savefun in savefuns:
        fault_stats["bad-input"]["savefun"] += 1
        res = results[savefun]
        where = f"{kind}/{savefun}"
        if res["ok"]:
            problems.append(f"{where}: the save succeeded")
            continue
        err = res["error"]
        if "SnapshotWriteError" not in err["mro"] or err["path"] != str(out / "snap.pt"):
            problems.append(f"{where}: expected a SnapshotWriteError naming snap.pt: {err}")
        elif err["cause"] is None:
            problems.append(f"{where}: no cause chained: {err}")
        elif savefun != "closing_savefun" and "ValueError" not in err["cause"]["mro"]:
            problems.append(f"{where}: the savefun's ValueError is not the cause: {err}")
        if res["temps"]:
            problems.append(f"{where}: temporary files left: {res['temps']}")
        if not res["finalize"]["ok"]:
            problems.append(f"{where}: finalize raised again: {res['finalize']}")
    diff = tree_diff(before, tree(base))
    if diff:
        problems.append(f"the tree changed (previous snapshot not intact?): {diff}")
    return results, problems


@pytest.mark.parametrize("kind", KINDS)
def test_failing_savefuns(kind, zygote, work, long_run, fault_stats):
    """A savefun that raises, writes half then raises, or closes the file itself: the
    save fails with SnapshotWriteError naming the file (the savefun's exception
    chained), the previous snapshot is untouched and no temporary file is left."""
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    _res, problems = _run_savefuns(kind, FAILING_SAVEFUNS, zygote, work, fault_stats)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", KINDS)
def test_savefun_writing_nothing(kind, zygote, work, long_run, fault_stats):
    """A savefun that returns without writing: committing the empty file would replace
    a good snapshot by a file ``torch.load`` cannot read (ppe's ``autoload`` then
    crashes on it). Expected: the save fails, the previous snapshot stays."""
    if kind == "process-spawn":
        long_only(long_run, SPAWN_SLOW)
    _res, problems = _run_savefuns(kind, ["nowrite_savefun"], zygote, work, fault_stats)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_argument_types(kind, zygote, work, fault_stats):
    base, out, _outside = _layout(work)
    before = tree(base)
    res = zygote.result(
        work / "run", "bad_arguments", {"kind": kind, "out_dir": str(out)}, timeout=120
    )
    problems = []
    for label, r in res.items():
        if label.startswith("_"):
            continue
        fault_stats["bad-input"]["argument"] += 1
        try:
            _assert_call_error(label, r, "InvalidSnapshotArgument")
        except AssertionError as exc:
            problems.append(str(exc))
    diff = tree_diff(before, tree(base))
    if diff:
        problems.append(f"the tree changed: {diff}")
    assert not problems, f"{kind}:\n" + "\n".join(problems)
