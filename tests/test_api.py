"""The public surface: exports, hierarchy, signatures compatible with ppe."""

from __future__ import annotations

import inspect

import pytest

import snapwriter


def test_all_matches_exports() -> None:
    public = {n for n in dir(snapwriter) if not n.startswith("_")}
    assert set(snapwriter.__all__) - {"__version__"} == public
    assert len(snapwriter.__all__) == len(set(snapwriter.__all__))


def test_exception_hierarchy() -> None:
    for name in (
        "InvalidSnapshotArgument",
        "StagingError",
        "SnapshotWriteError",
        "SnapshotLostError",
        "WriterClosedError",
        "ChildProcessFailure",
    ):
        cls = getattr(snapwriter, name)
        assert issubclass(cls, snapwriter.SnapshotError)
    assert issubclass(snapwriter.SnapshotError, RuntimeError)
    assert issubclass(snapwriter.InvalidSnapshotArgument, ValueError)


ppe_writing = pytest.importorskip("pytorch_pfn_extras.writing")


@pytest.mark.parametrize(
    "name",
    [
        "Writer",
        "SimpleWriter",
        "StandardWriter",
        "ThreadWriter",
        "ProcessWriter",
        "QueueWriter",
        "ThreadQueueWriter",
        "ProcessQueueWriter",
    ],
)
def test_signatures_accept_ppes_arguments(name: str) -> None:
    """Every parameter of ppe's constructor and __call__ exists here, in the same order."""
    ours, theirs = getattr(snapwriter, name), getattr(ppe_writing, name)
    for method in ("__init__", "__call__"):
        mine = inspect.signature(getattr(ours, method)).parameters
        ref = inspect.signature(getattr(theirs, method)).parameters
        positional = [p for p, v in ref.items() if v.kind is v.POSITIONAL_OR_KEYWORD]
        assert [p for p in mine if p in positional] == positional, (name, method)
        for p, v in ref.items():
            assert p in mine, (name, method, p)
            if v.default is not inspect.Parameter.empty and p != "savefun":
                assert mine[p].default == v.default, (name, method, p)
    for method in ("initialize", "finalize", "save", "_add_cleanup_hook"):
        assert callable(getattr(ours, method))
