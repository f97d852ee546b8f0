"""The comparator itself: all green on torch.save vs torch.save, and it catches breakage."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from .compare import compare_files, compare_objects
from .corpus import CORPUS, TORCH_WARNING_FILTERS, MyTensor

pytestmark = [pytest.mark.filterwarnings(f) for f in TORCH_WARNING_FILTERS]

SAVED = [name for name, entry in CORPUS.items() if not entry.torch_save_fails]


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("name", SAVED)
def test_torch_save_twice_is_all_green(name: str, tmp_path: Path) -> None:
    target = CORPUS[name].build()
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(target, a)
    torch.save(target, b)
    assert (
        compare_objects(torch.load(a, weights_only=False), torch.load(b, weights_only=False)) == []
    )
    assert compare_files(a, b) == []


@pytest.mark.parametrize("name", SAVED)
def test_two_builds_are_identical(name: str) -> None:
    """Builders are deterministic (the RNG entry records live state, so it may differ)."""
    if name == "rng_states":
        pytest.skip("records the live generators")
    assert compare_objects(CORPUS[name].build(), CORPUS[name].build()) == []


def _storage_twin(t: torch.Tensor) -> torch.Tensor:
    """Same values, offset, size and stride as ``t``, over a copy of its storage."""
    storage = t.untyped_storage()
    copy = torch.UntypedStorage(storage.nbytes())
    copy.copy_(storage)
    out = torch.empty(0, dtype=t.dtype)
    out.set_(copy, t.storage_offset(), t.size(), t.stride())
    return out


def _flip_one_bit(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    out.view(torch.uint8).view(-1)[3] ^= 0x10
    return out


def _with_attr(t: torch.Tensor) -> torch.Tensor:
    t.foo = 1
    return t


def _cycle() -> list[Any]:
    lst: list[Any] = [1]
    lst.append(lst)
    return lst


def _broken_cycle() -> list[Any]:
    inner: list[Any] = [1]
    inner.append(inner)
    return [1, inner]


def _shared() -> dict[str, Any]:
    d = {"x": 1}
    return {"a": d, "b": d}


def _base_and_view(twin: bool) -> dict[str, torch.Tensor]:
    base = torch.arange(6.0)
    view = base[2:]
    return {"base": base, "view": _storage_twin(view) if twin else view}


BROKEN: dict[str, tuple[Callable[[], Any], Callable[[], Any], str, str]] = {
    # name: (A, B, path the report names, what it says)
    "stride": (
        lambda: {"x": torch.arange(6.0).view(2, 3)},
        lambda: {"x": torch.arange(6.0).view(2, 3).t().contiguous().t()},
        "root['x']",
        "stride (3, 1) != (1, 2)",
    ),
    "storage sharing lost": (
        lambda: _base_and_view(False),
        lambda: _base_and_view(True),
        "root['view']",
        "storage sharing",
    ),
    "storage sharing added": (
        lambda: _base_and_view(True),
        lambda: _base_and_view(False),
        "root['view']",
        "storage sharing",
    ),
    "storage size": (
        lambda: {"x": torch.arange(10.0)[:4]},
        lambda: {"x": torch.arange(4.0)},
        "root['x']",
        "storage nbytes 40 != 16",
    ),
    "class": (
        lambda: {"p": nn.Parameter(torch.ones(2))},
        lambda: {"p": torch.ones(2)},
        "root['p']",
        "type torch.nn.parameter.Parameter != torch.Tensor",
    ),
    "subclass": (
        lambda: {"t": torch.ones(2).as_subclass(MyTensor)},
        lambda: {"t": torch.ones(2)},
        "root['t']",
        "type",
    ),
    "missing attribute": (
        lambda: {"t": _with_attr(torch.ones(2))},
        lambda: {"t": torch.ones(2)},
        "root['t']",
        "attributes ['foo'] != []",
    ),
    "flipped bit": (
        lambda: {"t": torch.arange(4.0)},
        lambda: {"t": _flip_one_bit(torch.arange(4.0))},
        "root['t']",
        "storage bytes differ (1 of 16 bytes, first at byte 3)",
    ),
    "identity": (
        _shared,
        lambda: {"a": {"x": 1}, "b": {"x": 1}},
        "root['b']",
        "identity",
    ),
    "identity added": (
        lambda: {"a": {"x": 1}, "b": {"x": 1}},
        _shared,
        "root['b']",
        "identity",
    ),
    "cycle": (_cycle, _broken_cycle, "root[1]", "identity"),
    "requires_grad": (
        lambda: {"t": torch.ones(2).requires_grad_()},
        lambda: {"t": torch.ones(2)},
        "root['t']",
        "requires_grad True != False",
    ),
    "dtype": (
        lambda: {"t": torch.ones(2)},
        lambda: {"t": torch.ones(2, dtype=torch.float64)},
        "root['t']",
        "dtype",
    ),
    "negative zero": (lambda: [0.0], lambda: [-0.0], "root[0]", "value"),
    "quantization scale": (
        lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
        lambda: torch.quantize_per_tensor(torch.ones(3), 0.2, 0, torch.qint8),
        "root",
        "q_scale",
    ),
    "coalesced state": (
        lambda: torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.ones(2), (3,)),
        lambda: torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.ones(2), (3,)).coalesce(),
        "root",
        "is_coalesced",
    ),
    "key order": (lambda: {"a": 1, "b": 2}, lambda: {"b": 2, "a": 1}, "root", "keys"),
    "ordered dict metadata": (
        lambda: _od(True),
        lambda: _od(False),
        "root",
        "attributes ['_metadata'] != []",
    ),
    "numpy dtype": (
        lambda: np.zeros(3, dtype=np.float32),
        lambda: np.zeros(3, dtype=np.float64),
        "root",
        "ndarray dtype",
    ),
    "object state": (
        lambda: collections.Counter(a=1),
        lambda: collections.Counter(a=2),
        "root['a']",
        "value 1 != 2",
    ),
}


def _od(meta: bool) -> collections.OrderedDict[str, Any]:
    od: collections.OrderedDict[str, Any] = collections.OrderedDict(w=torch.ones(1))
    if meta:
        od._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    return od


@pytest.mark.parametrize("case", list(BROKEN))
def test_comparator_reports_breakage(case: str) -> None:
    make_a, make_b, path, what = BROKEN[case]
    diffs = compare_objects(make_a(), make_b())
    assert any(d.startswith(f"{path}:") and what in d for d in diffs), diffs


def test_breakage_survives_a_round_trip(tmp_path: Path) -> None:
    """The same checks on loaded files: a lost storage sharing and a flipped bit."""
    for case in ("storage sharing lost", "flipped bit", "identity", "cycle"):
        make_a, make_b, path, what = BROKEN[case]
        torch.save(make_a(), tmp_path / "a.pt")
        torch.save(make_b(), tmp_path / "b.pt")
        a = torch.load(tmp_path / "a.pt", weights_only=False)
        b = torch.load(tmp_path / "b.pt", weights_only=False)
        diffs = compare_objects(a, b)
        assert any(d.startswith(f"{path}:") and what in d for d in diffs), (case, diffs)


def test_file_comparator_counts_storage_records(tmp_path: Path) -> None:
    t = torch.ones(100)
    torch.save({"a": t, "b": t}, tmp_path / "a.pt")
    torch.save({"a": t, "b": t.clone()}, tmp_path / "b.pt")
    diffs = compare_files(tmp_path / "a.pt", tmp_path / "b.pt")
    assert "storage records: 1 != 2" in diffs, diffs


def test_file_comparator_sees_storage_sizes(tmp_path: Path) -> None:
    torch.save({"a": torch.arange(100.0)[:4]}, tmp_path / "a.pt")
    torch.save({"a": torch.arange(4.0)}, tmp_path / "b.pt")
    diffs = compare_files(tmp_path / "a.pt", tmp_path / "b.pt")
    assert "storage record sizes: [400] != [16]" in diffs, diffs


def test_every_difference_is_listed() -> None:
    a = {"x": torch.ones(2), "y": nn.Parameter(torch.ones(2)), "z": [1]}
    b = {"x": torch.zeros(2), "y": torch.ones(2), "z": [2]}
    diffs = compare_objects(a, b)
    assert len(diffs) == 3, diffs
