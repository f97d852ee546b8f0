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
from snapwriter._staging import Stager, _Walk


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
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_an_in_place_change_reaches_the_next_file(name: str) -> None:
    stager = Stager()
    try:
        state = _state()
        assert _staged_bytes(stager, state) == _torch_save(state)
        assert _staged_bytes(stager, state) == _torch_save(state)  # warm from here on
        CHANGES[name](state)
        assert _staged_bytes(stager, state) == _torch_save(state), name
        CHANGES["values (an optimizer step)"](state)
        assert _staged_bytes(stager, state) == _torch_save(state), name
    finally:
        stager.close()


def test_unchanged_saves_take_the_warm_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a test of speed: that the path the differential cases above exercise is the
    warm one (every tensor of a repeated save), and not for a cold one."""
    taken: list[bool] = []
    real = _Walk._warm

    def spy(self: _Walk, *args: Any) -> Any:
        out = real(self, *args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(_Walk, "_warm", spy)
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
