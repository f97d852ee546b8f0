"""Save the corpus with one writer and with ``torch.save``, side by side.

One writer instance saves the whole corpus, so process writers start few processes.
``ProcessWriter`` starts a child per save, which under ``spawn`` costs seconds: that
writer saves the corpus as two combined targets instead (the entries with special
tensors, and the rest: one kind that breaks cannot hide the others), and the tests
compare entry by entry inside them. Entries torch.save refuses are not saved by it (its
staging is the fork variant's, which checks them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import snapwriter

from .corpus import CORPUS

__all__ = ("COMBINED", "GROUPS", "WRITERS", "CorpusRun", "EntryResult", "save_corpus")

WriterFactory = Callable[..., snapwriter.Writer]

#: Every writer of the family, with the options the differential suite runs it with.
WRITERS: dict[str, WriterFactory] = {
    "SimpleWriter": lambda **kw: snapwriter.SimpleWriter(**kw),
    "StandardWriter": lambda **kw: snapwriter.StandardWriter(**kw),
    "StandardWriter-nostage": lambda **kw: snapwriter.StandardWriter(stage=False, **kw),
    "ThreadWriter": lambda **kw: snapwriter.ThreadWriter(**kw),
    "ProcessWriter-fork": lambda **kw: snapwriter.ProcessWriter(mp_context="fork", **kw),
    "ProcessWriter-spawn": lambda **kw: snapwriter.ProcessWriter(mp_context="spawn", **kw),
    "ProcessWriter-forkstaging": lambda **kw: snapwriter.ProcessWriter(staging="fork", **kw),
    "QueueWriter": lambda **kw: snapwriter.QueueWriter(**kw),
    "ThreadQueueWriter": lambda **kw: snapwriter.ThreadQueueWriter(**kw),
    "ProcessQueueWriter-fork": lambda **kw: snapwriter.ProcessQueueWriter(mp_context="fork", **kw),
    "ProcessQueueWriter-spawn": lambda **kw: snapwriter.ProcessQueueWriter(
        mp_context="spawn", **kw
    ),
}

#: Writers that save the corpus as one combined target (a child process per save).
COMBINED = frozenset({"ProcessWriter-spawn"})
#: The combined files such a writer writes.
GROUPS = ("combined_plain", "combined_special")


@dataclasses.dataclass
class EntryResult:
    """One entry saved both ways.

    Attributes:
        ref, snap: the files (``None`` when that save raised).
        ref_error, snap_error: what ``torch.save`` / the writer raised.
        key: the entry's key inside a combined file, ``None`` for a file of its own.
    """

    ref: Path | None = None
    snap: Path | None = None
    ref_error: BaseException | None = None
    snap_error: BaseException | None = None
    key: str | None = None
    _loaded: dict[tuple[str, bool], Any] = dataclasses.field(default_factory=dict)

    def load(self, which: str, weights_only: bool) -> Any:
        """Load ``"ref"`` or ``"snap"`` (cached; combined files give the entry's part)."""
        cache_key = (which, weights_only)
        if cache_key not in self._loaded:
            path = self.ref if which == "ref" else self.snap
            assert path is not None
            self._loaded[cache_key] = torch.load(path, weights_only=weights_only)
        value = self._loaded[cache_key]
        return value if self.key is None else value[self.key]


@dataclasses.dataclass
class CorpusRun:
    writer: str
    results: dict[str, EntryResult]
    finalize_error: BaseException | None = None


def _save_ref(target: Any, path: Path, result: EntryResult) -> None:
    try:
        # into an open file, as ppe's writers call their savefun (torch.save names the
        # archive after the file when given a path, "archive" when given a file object)
        with open(path, "wb") as f:
            torch.save(target, f)
    except Exception as exc:
        result.ref_error = exc
    else:
        result.ref = path


def save_corpus(writer_name: str, directory: Path) -> CorpusRun:
    """Save every corpus entry with a new ``writer_name`` writer and with torch.save."""
    ref_dir, snap_dir = directory / "ref", directory / "snap"
    ref_dir.mkdir(parents=True)
    snap_dir.mkdir()
    writer = WRITERS[writer_name](out_dir=str(snap_dir))
    results: dict[str, EntryResult] = {name: EntryResult() for name in CORPUS}
    handles: dict[str, Any] = {}
    targets: list[Any] = []  # alive until the writer is done (stage=False reads them late)

    def call(name: str, target: Any) -> None:
        """Call the writer, retrying once if it reported an earlier save's failure."""
        for attempt in (0, 1):
            try:
                handles[name] = writer(f"{name}.pt", str(snap_dir), target)
                return
            except Exception as exc:
                earlier = [h for h in handles.values() if h.done() and h.exception()]
                if attempt == 0 and earlier:
                    continue
                results[name].snap_error = exc
                return

    combined: dict[str, dict[str, Any]] = {"combined_plain": {}, "combined_special": {}}
    for name, entry in CORPUS.items():
        result = results[name]
        if writer_name in COMBINED:
            if entry.torch_save_fails:
                result.snap_error = result.ref_error = _NotRun("combined writers skip it")
                continue
            target = entry.build()
            targets.append(target)
            combined["combined_special" if entry.special else "combined_plain"][name] = target
            result.key = name
            continue
        target = entry.build()
        targets.append(target)
        _save_ref(target, ref_dir / f"{name}.pt", result)
        call(name, target)
        if result.ref_error is not None and name in handles:
            _wait(handles.pop(name), result)  # a failure is attributed to its own entry
            if result.snap_error is None:
                result.snap = snap_dir / f"{name}.pt"
    groups = {group: members for group, members in combined.items() if members}
    for group, members in groups.items():
        results[group] = EntryResult()
        _save_ref(members, ref_dir / f"{group}.pt", results[group])
        call(group, members)
    for name, handle in handles.items():
        _wait(handle, results[name])
        if results[name].snap_error is None:
            results[name].snap = snap_dir / f"{name}.pt"
    for group, members in groups.items():
        whole = results[group]
        for name in members:
            r = results[name]
            r.ref, r.ref_error = whole.ref, whole.ref_error
            r.snap, r.snap_error = whole.snap, whole.snap_error
    run = CorpusRun(writer_name, results)
    try:
        writer.finalize()
    except Exception as exc:
        run.finalize_error = exc
    del targets
    return run


class _NotRun(Exception):
    """Stands for a save a combined writer does not make."""


def _wait(handle: Any, result: EntryResult) -> None:
    try:
        handle.result()
    except Exception as exc:
        result.snap_error = exc
