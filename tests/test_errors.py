"""Failures reach the caller as SnapshotError with the cause; bad input is rejected early."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter
from tests.conftest import WriterFactory, load


def _boom(target: Any, f: Any) -> None:
    f.write(b"partial bytes")
    raise ValueError("boom")


def _write_previous(tmp_path: Path) -> None:
    torch.save({"previous": True}, tmp_path / "snap.pt")


def _assert_previous_intact(tmp_path: Path) -> None:
    assert load(tmp_path / "snap.pt") == {"previous": True}
    assert sorted(os.listdir(tmp_path)) == ["snap.pt"]  # the temporary file was removed


def test_failed_save_raised_by_handle(
    make_background_writer: WriterFactory, tmp_path: Path
) -> None:
    _write_previous(tmp_path)
    w = make_background_writer(out_dir=str(tmp_path), savefun=_boom)
    handle = w("snap.pt", "", {"x": 1})
    with pytest.raises(snapwriter.SnapshotWriteError) as info:
        handle.result(timeout=60)
    err = info.value
    assert isinstance(err, RuntimeError)
    assert str(tmp_path / "snap.pt") in str(err) and err.path == str(tmp_path / "snap.pt")
    assert isinstance(err.__cause__, ValueError) and str(err.__cause__) == "boom"
    assert isinstance(handle.exception(), snapwriter.SnapshotWriteError)
    w.finalize()  # the handle reported it: finalize does not raise it again
    _assert_previous_intact(tmp_path)


def test_failed_save_raised_by_finalize(make_writer: WriterFactory, tmp_path: Path) -> None:
    _write_previous(tmp_path)
    w = make_writer(out_dir=str(tmp_path), savefun=_boom)
    try:
        w("snap.pt", "", {"x": 1})
    except snapwriter.SnapshotWriteError:
        assert isinstance(w, snapwriter.SimpleWriter)  # the blocking writer raises at once
        w.finalize()
        _assert_previous_intact(tmp_path)
        return
    with pytest.raises(snapwriter.SnapshotWriteError) as info:
        w.finalize()
    assert isinstance(info.value.__cause__, ValueError)
    w.finalize()  # idempotent, and the failure is raised only once
    _assert_previous_intact(tmp_path)


def test_failed_save_raised_by_next_call(
    make_background_writer: WriterFactory, tmp_path: Path
) -> None:
    w = make_background_writer(out_dir=str(tmp_path))
    handle = w("bad.json", "", {"x": 1}, savefun=_boom)
    assert handle.exception(timeout=60) is not None  # wait (this reports it, so...)
    bad = w("bad2.json", "", {"x": 1}, savefun=_boom)
    while not bad.done():
        bad._future.exception()  # wait without reporting
    with pytest.raises(snapwriter.SnapshotWriteError) as info:
        w("good.pt", "", {"x": 2})
    assert "bad2.json" in str(info.value)
    assert not (tmp_path / "good.pt").exists()  # the failing call saved nothing
    w("good.pt", "", {"x": 2}).result(timeout=60)  # the writer keeps working
    w.finalize()
    assert load(tmp_path / "good.pt") == {"x": 2}


def test_several_failures_first_raised_others_named(tmp_path: Path) -> None:
    w = snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=_boom, max_pending=3)
    w("a.pt", "", 1)
    w("b.pt", "", 2)
    with pytest.raises(snapwriter.SnapshotWriteError) as info:
        w.finalize()
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "a.pt" in str(info.value) and "b.pt" in notes


def test_failure_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=_boom)
    w("snap.pt", "", 1).exception()
    w.finalize()
    errors = [r for r in caplog.records if r.name == "snapwriter" and r.levelname == "ERROR"]
    assert errors and "snap.pt" in errors[0].getMessage() and errors[0].exc_info is not None


def test_unpicklable_in_savefun_surfaces_with_cause(tmp_path: Path) -> None:
    class Unpicklable:
        def __reduce__(self) -> Any:
            raise TypeError("no pickling for you")

    # stage=False skips the call-time pickle check: the failure happens while writing.
    with snapwriter.StandardWriter(out_dir=str(tmp_path), stage=False) as w:
        h = w("snap.pt", "", {"x": Unpicklable()})
        with pytest.raises(snapwriter.SnapshotWriteError) as info:
            h.result()
    assert isinstance(info.value.__cause__, TypeError)
    assert not (tmp_path / "snap.pt").exists()


def test_oserror_keeps_errno(tmp_path: Path) -> None:
    def eio(target: Any, f: Any) -> None:
        raise OSError(errno.EIO, "injected I/O error")

    with (
        snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=eio) as w,
        pytest.raises(snapwriter.SnapshotWriteError) as info,
    ):
        w("snap.pt", "", 1).result()
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EIO


def test_process_writer_failure_keeps_original_type(tmp_path: Path) -> None:
    w = snapwriter.ProcessWriter(out_dir=str(tmp_path), savefun=_boom, mp_context="fork")
    with pytest.raises(snapwriter.SnapshotWriteError) as info:
        w("snap.pt", "", 1).result(timeout=60)
    assert isinstance(info.value.__cause__, ValueError)
    w.finalize()


@pytest.mark.parametrize(
    ("filename", "message"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("../escape.pt", "escapes"),
        ("a/../../escape.pt", "escapes"),
        ("..", "escapes"),
        ("bad\x00name", "NUL"),
        ("dir/", "directory"),
        (b"bytes.pt", "bytes"),
        (42, "str"),
    ],
)
def test_bad_filenames_rejected_at_call_time(
    make_writer: WriterFactory, tmp_path: Path, filename: Any, message: str
) -> None:
    out = tmp_path / "out"
    w = make_writer(out_dir=str(out))
    with pytest.raises(snapwriter.InvalidSnapshotArgument, match=message):
        w(filename, "", {"x": 1})
    assert isinstance(snapwriter.InvalidSnapshotArgument("x"), ValueError)
    w.finalize()
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing written anywhere


def test_symlinked_directory_escape_rejected(tmp_path: Path) -> None:
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "link").symlink_to(outside)
    w = snapwriter.StandardWriter(out_dir=str(out))
    with pytest.raises(snapwriter.InvalidSnapshotArgument, match="symbolic link"):
        w("link/snap.pt", "", {"x": 1}).result(timeout=30)
    w.finalize()
    assert list(outside.iterdir()) == []


def test_existing_directory_name_rejected(tmp_path: Path) -> None:
    (tmp_path / "snap.pt").mkdir()
    w = snapwriter.StandardWriter(out_dir=str(tmp_path))
    with pytest.raises(snapwriter.InvalidSnapshotArgument, match="existing directory"):
        w("snap.pt", "", {"x": 1}).result(timeout=30)
    w.finalize()
    assert (tmp_path / "snap.pt").is_dir() and list((tmp_path / "snap.pt").iterdir()) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_pending": 0},
        {"max_pending": "2"},
        {"stage": "yes"},
        {"durable": 1},
        {"keep_last": 0},
        {"out_dir": 5},
        {"savefun": "torch.save"},
    ],
)
def test_invalid_options(kwargs: dict[str, Any]) -> None:
    with pytest.raises(snapwriter.InvalidSnapshotArgument):
        snapwriter.StandardWriter(**kwargs)


def test_invalid_call_arguments(tmp_path: Path) -> None:
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        with pytest.raises(snapwriter.InvalidSnapshotArgument, match="append"):
            w("a.pt", "", 1, append="yes")  # type: ignore[arg-type]
        with pytest.raises(snapwriter.InvalidSnapshotArgument, match="savefun"):
            w("a.pt", "", 1, savefun=3)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_call_after_finalize(make_writer: WriterFactory, tmp_path: Path) -> None:
    w = make_writer(out_dir=str(tmp_path))
    w("a.pt", "", 1)
    w.finalize()
    with pytest.raises(snapwriter.WriterClosedError):
        w("b.pt", "", 1)
    assert not (tmp_path / "b.pt").exists()
    assert w.closed


def test_finalize_twice_and_with_nothing_pending(make_writer: WriterFactory) -> None:
    w = make_writer()
    w.finalize()  # nothing pending, never started
    w.finalize()
    assert w.closed and w.pending() == 0


def test_context_manager_finalizes(make_writer: WriterFactory, tmp_path: Path) -> None:
    w = make_writer(out_dir=str(tmp_path))
    with w:
        w("a.pt", "", {"x": torch.ones(3)})
    assert w.closed
    assert torch.equal(load(tmp_path / "a.pt")["x"], torch.ones(3))


def test_finalize_timeout_reports_lost(tmp_path: Path) -> None:
    import threading

    release = threading.Event()

    def slow(target: Any, f: Any) -> None:
        assert release.wait(60)
        torch.save(target, f)

    w = snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=slow)
    w("slow.pt", "", 1)
    with pytest.raises(snapwriter.SnapshotLostError) as info:
        w.finalize(timeout=0.05)
    assert info.value.paths == (str(tmp_path / "slow.pt"),)
    with pytest.raises(snapwriter.WriterClosedError):
        w("other.pt", "", 2)  # closing: no new saves
    release.set()
    w.finalize()  # a later finalize waits for what is left
    assert w.closed and load(tmp_path / "slow.pt") == 1


def test_url_out_dir_in_a_call_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    w = snapwriter.StandardWriter()
    with pytest.raises(snapwriter.InvalidSnapshotArgument, match="constructor"):
        w("a.pt", "memory://run", {"x": 1})
    with pytest.raises(snapwriter.InvalidSnapshotArgument, match="constructor"):
        w.initialize("s3://bucket/run")
    w.finalize()
    assert list(tmp_path.iterdir()) == []  # no stray local "s3:" directory


def test_savefun_that_writes_nothing_is_refused(tmp_path: Path) -> None:
    _write_previous(tmp_path)

    def nothing(target: Any, f: Any) -> None:
        pass

    with snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=nothing) as w:
        with pytest.raises(snapwriter.SnapshotWriteError, match="wrote nothing") as info:
            w("snap.pt", "", {"x": 1}).result()
        assert isinstance(info.value.__cause__, ValueError)
    _assert_previous_intact(tmp_path)


def test_errno_survives_torch_save_wrapping(tmp_path: Path) -> None:
    """torch.save turns a failed write into RuntimeError; the OSError (errno) is what surfaces."""
    import io as _io

    class Failing(snapwriter.LocalFileSystem):
        def open(self, file_path: str, mode: str = "r", buffering: int = -1, **kw: Any) -> Any:
            f = super().open(file_path, mode, buffering, **kw)
            if "w" not in mode:
                return f

            class Broken(_io.BufferedWriter):
                def write(self, b: Any) -> int:
                    raise OSError(errno.EIO, "injected EIO")

            f.close()
            return Broken(_io.FileIO(file_path, "w"))

    state = {"p": torch.nn.Parameter(torch.ones(100))}  # a Parameter: plain torch.save runs
    with (
        snapwriter.StandardWriter(out_dir=str(tmp_path), fs=Failing()) as w,
        pytest.raises(snapwriter.SnapshotWriteError) as info,
    ):
        w("snap.pt", "", state).result()
    cause = info.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.EIO
    assert not (tmp_path / "snap.pt").exists()


def test_bogus_mp_context_rejected_at_construction() -> None:
    for cls in (snapwriter.ProcessWriter, snapwriter.ProcessQueueWriter):
        with pytest.raises(snapwriter.InvalidSnapshotArgument, match="start method"):
            cls(mp_context="bogus")
        with pytest.raises(snapwriter.InvalidSnapshotArgument):
            cls(mp_context=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("what", ["finalize", "call"])
def test_savefun_calling_its_own_writer_is_refused(tmp_path: Path, what: str) -> None:
    """A savefun that calls back into its writer gets a SnapshotError (it would wait for
    its own save forever); the outer save then fails with that error as its cause."""
    box: dict[str, Any] = {}

    def savefun(target: Any, f: Any) -> None:
        torch.save(target, f)
        if what == "finalize":
            box["w"].finalize()
        else:
            box["w"]("inner.pt", "", {"inner": 1})

    w = snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=savefun)
    box["w"] = w
    handle = w("outer.pt", "", {"outer": 1})
    with pytest.raises(snapwriter.SnapshotWriteError) as info:
        handle.result(timeout=60)
    cause = info.value.__cause__
    assert isinstance(cause, snapwriter.SnapshotError)
    assert "inside one of this writer's own saves" in str(cause)
    w.finalize()
    assert sorted(os.listdir(tmp_path)) == []  # the outer save failed: nothing committed


def test_finalize_racing_a_call_never_leaves_a_save_behind(tmp_path: Path) -> None:
    """finalize() while a call is still staging: the call is refused with
    WriterClosedError, or its save is complete when finalize returns; the loop never
    restarts afterwards."""
    import threading

    entered, gate = threading.Event(), threading.Event()

    class SlowToStage:
        def __reduce__(self) -> Any:
            entered.set()
            gate.wait(30)
            return (dict, ())

    w = snapwriter.StandardWriter(out_dir=str(tmp_path))
    w("warm.pt", "", {"x": torch.ones(3)}).result(timeout=60)
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["handle"] = w("race.pt", "", {"x": torch.ones(3), "slow": SlowToStage()})
        except BaseException as exc:
            box["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    assert entered.wait(30)
    finalizer = threading.Thread(target=w.finalize)
    finalizer.start()
    while not w.closed:  # finalize() has marked the writer closing
        finalizer.join(0.001)
    gate.set()
    finalizer.join(60)
    caller.join(60)
    assert not finalizer.is_alive() and not caller.is_alive()
    assert isinstance(box.get("error"), snapwriter.WriterClosedError), box
    assert sorted(os.listdir(tmp_path)) == ["warm.pt"]
    loop_thread = w._portal.name
    assert not [t for t in threading.enumerate() if t.name == loop_thread]
