"""The cases issue 9 names, each a test of its own, against plain torch.save."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter

from .compare import compare_files, compare_objects, storages_of, tensors_of
from .corpus import (
    TORCH_WARNING_FILTERS,
    PlainObject,
    TiedLM,
    TinyNet,
    TrainState,
    build_quantized_model,
    quantized_engine_set,
)
from .runner import WRITERS

pytestmark = [pytest.mark.filterwarnings(f) for f in TORCH_WARNING_FILTERS]

#: Writers whose call returns before the save is done and that stage the target. Staging
#: runs in the caller's process, so the spawn variants add nothing here but seconds.
STAGING_BACKGROUND = [
    n
    for n in WRITERS
    if n not in ("SimpleWriter", "StandardWriter-nostage") and not n.endswith("-spawn")
]


def _save(target: Any, directory: Path, name: str = "snap.pt", **options: Any) -> Path:
    """Save ``target`` with a default StandardWriter (``options`` added); wait; return path."""
    with snapwriter.StandardWriter(out_dir=str(directory), **options) as writer:
        writer(name, str(directory), target).result()
    return directory / name


def _reference(target: Any, directory: Path, name: str = "ref.pt") -> Path:
    path = directory / name
    torch.save(target, path)
    return path


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=False)


def _close_in_size(snap: Path, ref: Path) -> None:
    a, b = snap.stat().st_size, ref.stat().st_size
    assert abs(a - b) <= max(16 * 1024, 0.02 * b), f"snapwriter {a} bytes, torch.save {b} bytes"


def test_quantized_model_loads_into_module(tmp_path: Path) -> None:
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    with quantized_engine_set():
        model = build_quantized_model(seed=0)
        path = _save(model.state_dict(), tmp_path)
        fresh = build_quantized_model(seed=1)
        assert not torch.equal(fresh(x), model(x))  # the load below is what makes them equal
        fresh.load_state_dict(_load(path))
        assert torch.equal(fresh(x), model(x))


def test_resave_one_loaded_tensor_has_torch_save_size(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    state = {
        "model": {f"w{i}": torch.randn(100_000, generator=g) for i in range(10)},
        "some": torch.arange(4.0),
    }
    snap = _load(_save(state, tmp_path))
    ref = _load(_reference(state, tmp_path))
    sizes = []
    for loaded in (ref, snap):
        buffer = io.BytesIO()
        torch.save(loaded["some"], buffer)
        sizes.append(len(buffer.getvalue()))
    assert sizes[0] < 4096
    assert sizes[1] == sizes[0], f"re-saving one 4-float tensor: {sizes[1]} bytes, not {sizes[0]}"


def test_resize_of_loaded_tensor_never_changes_another(tmp_path: Path) -> None:
    state = {
        "a": torch.arange(4.0),
        "b": torch.arange(4.0) + 10,
        "c": torch.arange(8.0) - 5,
        "n": torch.arange(4),
    }
    refused = {}
    for path in (_reference(state, tmp_path), _save(state, tmp_path)):
        loaded = _load(path)
        before = {k: v.clone() for k, v in loaded.items()}
        try:
            loaded["a"].resize_(20).fill_(0)
        except RuntimeError as exc:  # torch.load's storages are not resizable (torch 2.13)
            refused[path.name] = str(exc)
        changed = [k for k in loaded if k != "a" and not torch.equal(loaded[k], before[k])]
        assert not changed, f"{path.name}: resizing 'a' changed {changed}"
    assert ("ref.pt" in refused) == ("snap.pt" in refused), f"resize_ refused only by {refused}"


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = TiedLM(vocab=1000, dim=256)
    state = {"lm": lm.state_dict(), "params": [lm.embed.weight, lm.head.weight]}
    ref_path, snap_path = _reference(state, tmp_path), _save(state, tmp_path)
    snap = _load(snap_path)
    assert snap["params"][0] is snap["params"][1], "the same Parameter came back as two"
    embed, head = snap["lm"]["embed.weight"], snap["lm"]["head.weight"]
    assert embed.untyped_storage()._cdata == head.untyped_storage()._cdata, "tie lost"
    assert snap["params"][0].untyped_storage()._cdata == embed.untyped_storage()._cdata
    assert len(storages_of(snap)) == 1
    _close_in_size(snap_path, ref_path)
    assert compare_objects(_load(ref_path), snap) == []


def test_expanded_view_is_stored_once(tmp_path: Path) -> None:
    state = {"e": torch.randn(1000, generator=torch.Generator().manual_seed(0)).expand(1000, 1000)}
    ref_path, snap_path = _reference(state, tmp_path), _save(state, tmp_path)
    assert ref_path.stat().st_size < 8 * 1024
    _close_in_size(snap_path, ref_path)
    assert snap_path.stat().st_size < 16 * 1024, f"{snap_path.stat().st_size} bytes"
    loaded = _load(snap_path)
    assert loaded["e"].stride() == (0, 1)
    assert loaded["e"].untyped_storage().nbytes() == 4000


def test_keeping_model_does_not_keep_optimizer_alive(tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 64))
        optim = torch.optim.Adam(model.parameters())
        model(torch.randn(4, 256)).sum().backward()
        optim.step()
    state = {"model": model.state_dict(), "optim": optim.state_dict()}
    model_bytes = sum(storages_of(state["model"]).values())
    for path in (_reference(state, tmp_path), _save(state, tmp_path)):
        kept = sum(storages_of(_load(path)["model"]).values())
        assert kept == model_bytes, (
            f"{path.name}: loaded['model'] keeps {kept} bytes alive, the model is {model_bytes}"
        )


# -- mutation right after the call -----------------------------------------------------------


def _mutable_target() -> Any:
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyNet()
    base = torch.randn(6, 4, generator=g)
    shared = {"shared": torch.ones(3)}
    return {
        "model": model.state_dict(),
        "list": [torch.randn(3, generator=g), 1, [2, torch.zeros(2, dtype=torch.int64)]],
        "nested": {
            "d": {"t": torch.randn(2, generator=g), "flags": torch.ones(2, dtype=torch.bool)}
        },
        "obj": PlainObject(torch.randn(2, generator=g)),
        "train": TrainState(step=1, lr=0.1, weights=torch.randn(3, generator=g), history=[0.5]),
        "base": base,
        "view": base[1:3],
        "a": shared,
        "b": shared,
        "big": torch.randn(200_000, generator=g),
    }


def _mutate_everything(obj: Any, seen: set[int] | None = None) -> None:
    """Change every tensor in place, grow every list and dict, set attributes of objects."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (int, float, str, bytes, type(None))):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        with torch.no_grad():
            if obj.dtype == torch.bool:
                obj.logical_not_()
            else:
                obj.add_(7)
    elif isinstance(obj, dict):
        for v in list(obj.values()):
            _mutate_everything(v, seen)
        obj["__mutated__"] = torch.full((2,), 9.0)
    elif isinstance(obj, list):
        for v in list(obj):
            _mutate_everything(v, seen)
        obj.append("mutated")
    elif isinstance(obj, tuple):
        for v in obj:
            _mutate_everything(v, seen)
    elif hasattr(obj, "__dict__"):
        for k, v in list(vars(obj).items()):
            _mutate_everything(v, seen)
            if isinstance(v, (int, float, str)):
                setattr(obj, k, "mutated")
        obj.mutated = True


@pytest.mark.parametrize("writer_name", STAGING_BACKGROUND)
def test_mutation_after_call_never_reaches_the_file(writer_name: str, tmp_path: Path) -> None:
    target = _mutable_target()
    ref_path = _reference(copy.deepcopy(target), tmp_path)
    writer = WRITERS[writer_name](out_dir=str(tmp_path))
    try:
        handle = writer("snap.pt", str(tmp_path), target)
        _mutate_everything(target)
        handle.result()
    finally:
        writer.finalize()
    diffs = compare_objects(_load(ref_path), _load(tmp_path / "snap.pt"))
    assert not diffs, "\n".join([f"{writer_name}: the mutation reached the file", *diffs[:20]])
    assert compare_files(ref_path, tmp_path / "snap.pt") == []


def test_mutation_helper_mutates_everything() -> None:
    """The mutation above must change every tensor, list, dict and object it is given."""
    target = _mutable_target()
    before = copy.deepcopy(target)
    _mutate_everything(target)
    assert len(compare_objects(before, target)) >= len(tensors_of(before))


# -- CUDA sources --------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stage", [True, False])
def test_cuda_device_tag_like_torch_save(stage: bool, tmp_path: Path) -> None:
    state = {"w": torch.randn(4, 4, device="cuda"), "b": torch.arange(3, device="cuda")}
    ref_path, snap_path = _reference(state, tmp_path), _save(state, tmp_path, stage=stage)
    for path in (ref_path, snap_path):
        locations: list[str] = []

        def record(storage: Any, location: str, seen: list[str] = locations) -> Any:
            seen.append(location)
            return storage

        torch.load(path, weights_only=True, map_location=record)
        assert locations and set(locations) == {"cuda:0"}, f"{path.name}: {locations}"
    ref, snap = _load(ref_path), _load(snap_path)
    assert snap["w"].device == ref["w"].device == torch.device("cuda", 0)
    assert compare_objects(ref, snap) == []
