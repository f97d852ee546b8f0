"""Every writer against plain torch.save, entry by entry over the corpus (contract §2a).

One writer instance per writer kind saves the whole corpus (module-scoped fixture); each
entry is also saved with ``torch.save``. Both are loaded and compared by the structural
comparator, both ways of loading (``weights_only=True`` wherever torch.save's file
allows it), and the archives are compared record by record.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

import snapwriter

from .compare import compare_files, compare_objects
from .corpus import CORPUS, TORCH_WARNING_FILTERS
from .runner import COMBINED, GROUPS, WRITERS, CorpusRun, EntryResult, save_corpus

pytestmark = [pytest.mark.filterwarnings(f) for f in TORCH_WARNING_FILTERS]

SAVED = [name for name, entry in CORPUS.items() if not entry.torch_save_fails]
REFUSED = [name for name, entry in CORPUS.items() if entry.torch_save_fails]
SIZE_SLACK_BYTES = 16 * 1024
SIZE_SLACK_RATIO = 0.02


@pytest.fixture(scope="module", params=list(WRITERS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CorpusRun:
    return save_corpus(request.param, tmp_path_factory.mktemp(request.param))


def _describe(exc: BaseException) -> str:
    parts = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 4:
        parts.append(f"{type(seen).__name__}: {str(seen).strip().splitlines()[0][:200]}")
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)


def _report(run: CorpusRun, name: str, diffs: list[str], limit: int = 25) -> str:
    lines = [f"{run.writer} / {name}: {len(diffs)} difference(s) from torch.save (A=torch.save)"]
    lines += [f"  {d}" for d in diffs[:limit]]
    if len(diffs) > limit:
        lines.append(f"  ... and {len(diffs) - limit} more")
    return "\n".join(lines)


def _saved(run: CorpusRun, name: str) -> EntryResult:
    result = run.results[name]
    assert result.ref_error is None, f"corpus bug: torch.save raised {result.ref_error!r}"
    if result.snap_error is not None:
        pytest.fail(f"{run.writer} could not save {name}: {_describe(result.snap_error)}")
    return result


@pytest.mark.parametrize("name", SAVED)
def test_loads_like_torch_save(run: CorpusRun, name: str) -> None:
    result = _saved(run, name)
    diffs = compare_objects(result.load("ref", False), result.load("snap", False))
    assert not diffs, _report(run, name, diffs)


@pytest.mark.parametrize("name", SAVED)
def test_weights_only_loads_like_torch_save(run: CorpusRun, name: str) -> None:
    result = _saved(run, name)
    try:
        ref = result.load("ref", True)
    except pickle.UnpicklingError:
        return  # torch.save's file does not load with weights_only either: nothing promised
    try:
        snap = result.load("snap", True)
    except pickle.UnpicklingError as exc:
        pytest.fail(
            f"{run.writer} / {name}: torch.save's file loads with weights_only=True, "
            f"this one does not: {str(exc).splitlines()[-1][:300]}"
        )
    diffs = compare_objects(ref, snap)
    assert not diffs, _report(run, name, diffs)


def _check_size(run: CorpusRun, name: str, ref: Path, snap: Path) -> None:
    ref_size, snap_size = ref.stat().st_size, snap.stat().st_size
    slack = max(SIZE_SLACK_BYTES, SIZE_SLACK_RATIO * ref_size)
    assert abs(snap_size - ref_size) <= slack, (
        f"{run.writer} / {name}: {snap_size} bytes, torch.save: {ref_size} bytes"
    )


def _own_files(run: CorpusRun, name: str) -> tuple[Path, Path]:
    result = _saved(run, name)
    if result.key is not None:
        pytest.skip(f"{run.writer} saves combined files: see test_combined_file")
    assert result.ref is not None and result.snap is not None
    return result.ref, result.snap


@pytest.mark.parametrize("name", SAVED)
def test_file_like_torch_save(run: CorpusRun, name: str) -> None:
    """The same records (names, sizes, one per storage) and a file size within the slack."""
    ref, snap = _own_files(run, name)
    diffs = compare_files(ref, snap, pickle_size=False)
    assert not diffs, _report(run, name, diffs)
    _check_size(run, name, ref, snap)


#: Writers whose child process receives the staged target through a pipe or as spawn
#: arguments (unpickled there), so that its data.pkl may differ from torch.save's by the
#: pickle memo (strings interned in the caller are separate objects in the child). None
#: since the process writers' saving process receives data.pkl's bytes, pickled in the
#: caller's process (snapwriter._saver): their files are torch.save's, byte for byte.
PIPED: frozenset[str] = frozenset()


@pytest.mark.parametrize("name", SAVED)
def test_pickle_stream_size_like_torch_save(run: CorpusRun, name: str) -> None:
    """``data.pkl`` has torch.save's size: also pickle's memo (shared strings, dtypes) kept."""
    ref, snap = _own_files(run, name)
    if run.writer in PIPED:
        pytest.skip(f"{run.writer} unpickles the target in its child (see PIPED)")
    diffs = compare_files(ref, snap)
    assert not diffs, _report(run, name, diffs)


@pytest.mark.parametrize("name", SAVED)
def test_file_is_byte_identical_to_torch_save(run: CorpusRun, name: str) -> None:
    """Writers that serialize the staged graph in the caller's process image write
    torch.save's very bytes (torch.save is deterministic: same graph, same file)."""
    ref, snap = _own_files(run, name)
    if run.writer in PIPED:
        pytest.skip(f"{run.writer} unpickles the target in its child (see PIPED)")
    assert snap.read_bytes() == ref.read_bytes(), f"{run.writer} / {name}: bytes differ"


@pytest.mark.parametrize("group", GROUPS)
def test_combined_file(run: CorpusRun, group: str) -> None:
    """Writers that saved the corpus as combined targets: each file's records and size."""
    if run.writer not in COMBINED:
        pytest.skip(f"{run.writer} saves one file per entry")
    combined = run.results[group]
    if combined.snap_error is not None:
        pytest.fail(f"{run.writer} could not save {group}: {_describe(combined.snap_error)}")
    assert combined.ref is not None and combined.snap is not None
    diffs = compare_files(combined.ref, combined.snap, pickle_size=False)
    assert not diffs, _report(run, group, diffs)
    _check_size(run, group, combined.ref, combined.snap)
    if run.writer not in PIPED:
        diffs = compare_files(combined.ref, combined.snap)
        assert not diffs, _report(run, group, diffs)  # data.pkl's size, checked last


@pytest.mark.parametrize("name", REFUSED)
def test_refuses_what_torch_save_refuses(run: CorpusRun, name: str) -> None:
    if run.writer in COMBINED:
        pytest.skip(f"{run.writer} stages like its fork variant, which checks this")
    result = run.results[name]
    assert result.ref_error is not None, "corpus bug: torch.save took it"
    assert result.snap_error is not None, (
        f"{run.writer} saved {name}, which torch.save refuses with {result.ref_error!r}"
    )
    assert isinstance(result.snap_error, snapwriter.SnapshotError), _describe(result.snap_error)
    chain: list[BaseException] = []
    seen: BaseException | None = result.snap_error
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    ref_message = str(result.ref_error)
    assert any(type(e) is type(result.ref_error) or ref_message in str(e) for e in chain), (
        f"{run.writer} / {name}: the error hides torch's reason: {_describe(result.snap_error)}"
    )


def test_writer_finalizes_cleanly(run: CorpusRun) -> None:
    """Every failure was reported by its handle; finalize has nothing left to raise."""
    if run.finalize_error is not None:
        pytest.fail(f"{run.writer}.finalize(): {_describe(run.finalize_error)}")
