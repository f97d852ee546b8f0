"""The warm path of staging (a save of the same source tensors as the previous one reuses
what that walk built): every in-place change of a tensor between two saves must reach the
second file exactly as torch.save of the state at the second call writes it."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch

from snapwriter._fastsave import fast_torch_save
from snapwriter._staging import BULK_ITEMS, Stager, _Walk


def _torch_save(obj: Any) -> bytes:
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


def _staged_bytes(stager: Stager, obj: Any) -> bytes:
    """What a writer writes for ``obj``: its staged copy, through the fast serializer
    (which reuses the previous data.pkl when the staged layout repeats)."""
    staged = stager.stage(obj)
    try:
        out = io.BytesIO()
        fast_torch_save(staged.value, out, layout=staged.layout)
        return out.getvalue()
    finally:
        stager.release(staged)


def _calls(monkeypatch: pytest.MonkeyPatch, method: str, took: Callable[[Any], bool]) -> list[bool]:
    """Whether each call of ``_Walk.<method>`` took its path (``took`` of what it
    returned), in call order."""
    calls: list[bool] = []
    real = getattr(_Walk, method)

    def spy(self: _Walk, *args: Any) -> Any:
        out = real(self, *args)
        calls.append(took(out))
        return out

    monkeypatch.setattr(_Walk, method, spy)
    return calls


def _state() -> dict[str, Any]:
    return {
        "w": torch.arange(12.0).reshape(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "p": torch.nn.Parameter(torch.ones(2, 2)),
        "g": torch.zeros(3, requires_grad=True),
        "step": 1,
    }


def _set_storage_view(s: dict[str, Any]) -> None:
    with torch.no_grad():
        s["w"].set_(s["w"].untyped_storage(), 4, (2, 2), (1, 2))


def _grow_storage(s: dict[str, Any]) -> None:
    s["b"].untyped_storage().resize_(8 * 9)


def _add_attribute(s: dict[str, Any]) -> None:
    s["w"].note = "tagged"


def _swap_data(s: dict[str, Any]) -> None:
    s["w"].data = torch.full((3, 4), 7.0)


def _same_storage_as_parameter(s: dict[str, Any]) -> None:
    s["b"] = torch.nn.Parameter(s["b"], requires_grad=False)  # same storage and geometry


def _rename_in_place(s: dict[str, Any]) -> None:
    items = [("w2" if k == "w" else k, v) for k, v in s.items()]
    s.clear()
    s.update(items)


def _swap_two(s: dict[str, Any]) -> None:
    s["w"], s["b"] = s["b"], s["w"]


def _conjugate(s: dict[str, Any]) -> None:
    s["c"] = torch.ones(2, dtype=torch.complex64)
    s["c"] = s["c"].conj()


CHANGES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "values (an optimizer step)": lambda s: [
        t.data.add_(1) for t in s.values() if torch.is_tensor(t)
    ],
    "nothing": lambda s: None,
    "resize_": lambda s: s["w"].resize_(2, 6),
    "transposed in place": lambda s: s["w"].t_(),
    "as_strided_ to an offset view": lambda s: s["w"].as_strided_((2, 2), (4, 1), 2),
    "set_ to another view of its storage": _set_storage_view,
    "storage grown": _grow_storage,
    "requires_grad switched on": lambda s: s["w"].requires_grad_(True),
    "requires_grad switched off": lambda s: s["g"].requires_grad_(False),
    "an attribute added": _add_attribute,
    ".data swapped": _swap_data,
    "a Parameter over the same storage": _same_storage_as_parameter,
    "a Parameter over another storage": lambda s: s.__setitem__(
        "b", torch.nn.Parameter(s["b"].double())
    ),
    "the same tensor twice": lambda s: s.__setitem__("again", s["w"]),
    "a view of it added": lambda s: s.__setitem__("view", s["w"][1:]),
    "a conjugate tensor added": _conjugate,
    "parameter becomes a plain tensor": lambda s: s.__setitem__("p", s["p"].detach()),
    "a key renamed in place": _rename_in_place,
    "two values swapped": _swap_two,
    "a new tensor over the same storage": lambda s: s.__setitem__("w", s["w"].view_as(s["w"])),
}


_PADS_BEFORE, _PADS_AFTER = 100, 2 * BULK_ITEMS


def _big_state() -> dict[str, Any]:
    """:func:`_state` among enough tensors that the changed ones are staged in a run (the
    first :data:`BULK_ITEMS` items: :meth:`_Walk._bulk_repeat`, else
    :meth:`_Walk._bulk_warm`)."""
    small = _state()
    state: dict[str, Any] = {f"a{i}": torch.full((4,), float(i)) for i in range(_PADS_BEFORE)}
    state.update((k, v) for k, v in small.items() if k != "step")
    state.update((f"z{i}", torch.full((2, 3), float(i))) for i in range(_PADS_AFTER))
    state["step"] = small["step"]
    return state


def _keep_additions_in_the_first_run(state: dict[str, Any]) -> None:
    """Move items a change added (at the end) next to the changed ones, in the first run."""
    items = list(state.items())
    cut = _PADS_BEFORE + 4
    added = [(k, v) for k, v in items if k not in _BIG_KEYS]
    kept = [(k, v) for k, v in items if k in _BIG_KEYS]
    state.clear()
    state.update(kept[:cut] + added + kept[cut:])


_BIG_KEYS = frozenset(_big_state())


@pytest.mark.parametrize("size", ["small", "big"])
@pytest.mark.parametrize("name", list(CHANGES))
def test_an_in_place_change_reaches_the_next_file(name: str, size: str) -> None:
    stager = Stager()
    try:
        state = _state() if size == "small" else _big_state()
        assert _staged_bytes(stager, state) == _torch_save(state)
        assert _staged_bytes(stager, state) == _torch_save(state)  # warm from here on
        CHANGES[name](state)
        if size == "big":
            _keep_additions_in_the_first_run(state)
        assert _staged_bytes(stager, state) == _torch_save(state), name
        CHANGES["values (an optimizer step)"](state)
        assert _staged_bytes(stager, state) == _torch_save(state), name
    finally:
        stager.close()


def test_unchanged_saves_take_the_warm_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a test of speed: that the path the differential cases above exercise is the
    warm one (every tensor of a repeated save), and not for a cold one."""
    taken = _calls(monkeypatch, "_warm", lambda out: out is not None)
    stager = Stager()
    try:
        state = {f"t{i}": torch.full((3,), float(i)) for i in range(50)}
        state["p"] = torch.nn.Parameter(torch.ones(2))
        _staged_bytes(stager, state)
        assert taken == []  # cold: nothing to repeat
        for t in state.values():
            t.data.mul_(2)
        assert _staged_bytes(stager, state) == _torch_save(state)
        assert taken == [True] * 51
        taken.clear()
        state["t7"].resize_(4)
        assert _staged_bytes(stager, state) == _torch_save(state)
        assert taken.count(False) == 1 and len(taken) == 51
    finally:
        stager.close()


def test_big_dicts_take_the_bulk_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a test of speed: that a warm big dict is staged in whole runs (repeated as the
    previous walk staged them, else checked tensor by tensor against their warm
    records), and that a run with a changed tensor falls back to the item-by-item path,
    byte for byte right."""
    accepted = _calls(monkeypatch, "_bulk_run", lambda checked: checked is not None)
    repeats = _calls(monkeypatch, "_bulk_repeat", bool)
    warms = _calls(monkeypatch, "_bulk_warm", bool)

    def paths() -> tuple[list[bool], list[bool], list[bool]]:
        taken = (list(accepted), list(repeats), list(warms))
        for calls in (accepted, repeats, warms):
            calls.clear()
        return taken

    stager = Stager()
    try:
        model = {f"layer{i}.weight": torch.full((2, 2), float(i)) for i in range(3 * BULK_ITEMS)}
        state = {"model": model, "iteration": 0}
        _staged_bytes(stager, state)
        assert paths() == ([True] * 3, [False] * 3, [])  # cold: nothing to repeat
        for t in model.values():
            t.add_(1)
        state["iteration"] = 1
        assert _staged_bytes(stager, state) == _torch_save(state)
        assert paths() == ([True] * 3, [True] * 3, [])
        model[f"layer{BULK_ITEMS + 5}.weight"].resize_(4)  # the second run
        model["layer3.weight"] = model["layer2.weight"]  # tied, in the first
        assert _staged_bytes(stager, state) == _torch_save(state)
        # the tied pair fails the run's common checks: item by item; the resized
        # tensor fails the repeat's and the warm path's checks
        assert paths() == ([False, True, True], [False, True], [False])
        assert _staged_bytes(stager, state) == _torch_save(state)
        # the first run still holds the tied pair; the resized one, staged item by item
        # last time, is warm again, then repeated
        assert paths() == ([False, True, True], [False, True], [True])
        assert _staged_bytes(stager, state) == _torch_save(state)
        assert paths() == ([False, True, True], [True, True], [])
    finally:
        stager.close()


def _varied(i: int) -> torch.Tensor:
    """Tensors of every kind a run of a big state dict may hold, by position."""
    kind = i % 7
    if kind == 0:
        return torch.full((3, 2), float(i))
    if kind == 1:
        return torch.nn.Parameter(torch.full((4,), float(i)))
    if kind == 2:
        return torch.arange(i, i + 5, dtype=torch.int64)
    if kind == 3:
        return torch.full((2,), float(i), requires_grad=True)
    if kind == 4:
        return torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64), requires_grad=False)
    if kind == 5:
        return torch.ones(1, 4).expand(3, 4)  # not dense: its run is staged item by item
    return torch.tensor(float(i), dtype=torch.bfloat16)


@pytest.mark.parametrize("dense_only", [True, False])
def test_a_cold_big_dict_is_staged_as_torch_save_writes_it(
    dense_only: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The arena's first save of a big dict (runs of :meth:`_Walk._bulk_cold`), then warm
    saves of it (:meth:`_Walk._bulk_warm`, from the warm records the cold runs left),
    each byte for byte the file torch.save writes."""
    runs = _calls(monkeypatch, "_bulk_cold", bool)
    n = 3 * BULK_ITEMS
    model = {f"m.{i}": _varied(i) for i in range(n) if not (dense_only and i % 7 == 5)}
    state = {"model": model, "iteration": 3}
    stager = Stager()
    try:
        for _ in range(3):
            assert _staged_bytes(stager, state) == _torch_save(state)
            with torch.no_grad():
                for t in model.values():
                    if t.dtype.is_floating_point and t.dim() and t.stride(0):
                        t.add_(1)
        assert runs == ([True] * 3 if dense_only else [False] * 3)
    finally:
        stager.close()


@pytest.mark.parametrize("again", ["the same tensor", "a view of its storage"])
def test_tensors_of_a_run_met_again_later_keep_the_layout(
    monkeypatch: pytest.MonkeyPatch, again: str
) -> None:
    """A tensor of a bulk run met again after the run (tied elsewhere in the state), or
    a view of a run's storage, is pickled as a reference to its first occurrence: the
    files are torch.save's and the repeated layout is reused."""
    repeats = _calls(monkeypatch, "_bulk_repeat", bool)
    stager = Stager()
    try:
        model = {f"layer{i}.weight": torch.full((2, 3), float(i)) for i in range(2 * BULK_ITEMS)}
        state: dict[str, Any] = {"model": model, "step": 0}
        if again == "the same tensor":
            state["tied"] = model["layer5.weight"]
        else:
            state["view"] = model[f"layer{BULK_ITEMS + 7}.weight"][1:]
        for step in range(3):
            for t in model.values():
                t.add_(1)
            staged = stager.stage(state)
            try:
                out = io.BytesIO()
                fast_torch_save(staged.value, out, layout=staged.layout)
                assert out.getvalue() == _torch_save(state), step
                assert staged.layout.reused == (step > 0), step
            finally:
                stager.release(staged)
        assert repeats == [False, False, True, True, True, True]
    finally:
        stager.close()
