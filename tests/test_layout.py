"""Layout reuse (snapwriter._layout): a repeated layout reuses data.pkl, and every change
that alters torch.save's bytes is seen as a new layout.

Differential: each case stages state A, writes it, then stages state B through the same
stager and compares the file written for B byte for byte with ``torch.save(B)``.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch

import snapwriter
from snapwriter._fastsave import fast_torch_save
from snapwriter._staging import Stager

pytestmark = pytest.mark.timeout(120)


def _torch_save_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write(stager: Stager, obj: Any) -> tuple[bytes, bool]:
    staged = stager.stage(obj)
    try:
        assert staged.layout is not None
        buffer = io.BytesIO()
        fast_torch_save(staged.value, buffer, layout=staged.layout)
        return buffer.getvalue(), staged.layout.reused
    finally:
        stager.release(staged)


def _model() -> dict[str, Any]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}


def _joined(*parts: str) -> str:
    return "".join(parts)  # an equal string that is a new object


def _with_attr(t: torch.Tensor) -> torch.Tensor:
    t.note = "x"  # type: ignore[attr-defined]
    return t


def _cycle() -> list[Any]:
    x: list[Any] = [torch.zeros(2)]
    x.append(x)
    return x


_shared_tuple = (1, 2)
_shared_dict = {"k": 1}

# name -> (A, B, whether B reuses A's layout)
CASES: dict[str, tuple[Callable[[], Any], Callable[[], Any], bool]] = {
    "values only": (
        lambda: {"w": torch.zeros(3), "b": torch.ones(2)},
        lambda: {"w": torch.full((3,), 7.0), "b": torch.ones(2) * 2},
        True,
    ),
    "training state, one more step": (_model, _model, True),
    "float hyper-parameter": (lambda: {"lr": 0.1}, lambda: {"lr": 0.01}, False),
    "negative zero": (lambda: {"x": 0.0}, lambda: {"x": -0.0}, False),
    "True and 1": (lambda: {"x": True}, lambda: {"x": 1}, False),
    "1 and 1.0": (lambda: {"x": 1}, lambda: {"x": 1.0}, False),
    "int value": (lambda: {"step": 1}, lambda: {"step": 2}, False),
    "big int": (lambda: {"n": 2**70}, lambda: {"n": 2**70 + 1}, False),
    "None and False": (lambda: [None], lambda: [False], False),
    "string value": (lambda: {"k": "abc"}, lambda: {"k": "abd"}, False),
    "one string twice, then two equal strings": (
        lambda: (lambda s: {"a": s, "b": s})(_joined("ab", "cd")),
        lambda: {"a": _joined("ab", "cd"), "b": _joined("ab", "cd")},
        False,
    ),
    "key equal to the serializer's 'storage'": (
        lambda: {"storage": torch.zeros(2)},
        lambda: {_joined("stor", "age"): torch.zeros(2)},
        False,
    ),
    "key equal to the serializer's 'cpu'": (
        lambda: {_joined("c", "pu"): torch.zeros(2)},
        lambda: {"cpu": torch.zeros(2)},
        False,
    ),
    "key order": (lambda: {"a": 1, "b": 2}, lambda: {"b": 2, "a": 1}, False),
    "int and str key": (lambda: {1: 0}, lambda: {"1": 0}, False),
    "dict and OrderedDict": (
        lambda: {"a": 1},
        lambda: collections.OrderedDict(a=1),
        False,
    ),
    "state dict metadata": (
        lambda: torch.nn.Linear(2, 2).state_dict(),
        lambda: (lambda sd: (sd._metadata.update({"": {"version": 2}}), sd)[1])(  # type: ignore[attr-defined]
            torch.nn.Linear(2, 2).state_dict()
        ),
        False,
    ),
    "list and tuple": (lambda: {"x": [1, 2]}, lambda: {"x": (1, 2)}, False),
    "one tuple twice, then two equal tuples": (
        lambda: [_shared_tuple, _shared_tuple],
        lambda: [(1, 2), tuple([1, 2])],
        False,
    ),
    "one dict twice, then two equal dicts": (
        lambda: [_shared_dict, _shared_dict],
        lambda: [{"k": 1}, {"k": 1}],
        False,
    ),
    "list length": (lambda: [torch.zeros(1)] * 2, lambda: [torch.zeros(1)] * 3, False),
    "shape": (lambda: {"w": torch.zeros(2, 3)}, lambda: {"w": torch.zeros(3, 2)}, False),
    "stride": (
        lambda: {"w": torch.zeros(2, 3)},
        lambda: {"w": torch.zeros(3, 2).t()},
        False,
    ),
    "dtype": (
        lambda: {"w": torch.zeros(4)},
        lambda: {"w": torch.zeros(4, dtype=torch.int32)},
        False,
    ),
    "requires_grad": (
        lambda: {"w": torch.zeros(2)},
        lambda: {"w": torch.zeros(2, requires_grad=True)},
        False,
    ),
    "Parameter and Tensor": (
        lambda: {"w": torch.zeros(2)},
        lambda: {"w": torch.nn.Parameter(torch.zeros(2))},
        False,
    ),
    "tied weights, then untied": (
        lambda: (lambda t: {"a": t, "b": t})(torch.zeros(2)),
        lambda: {"a": torch.zeros(2), "b": torch.zeros(2)},
        False,
    ),
    "views of one storage, then of two": (
        lambda: (lambda t: {"a": t[:2], "b": t[2:]})(torch.zeros(4)),
        lambda: {"a": torch.zeros(4)[:2], "b": torch.zeros(4)[2:]},
        False,
    ),
    "storage offset": (
        lambda: {"a": torch.zeros(4)[:2]},
        lambda: {"a": torch.zeros(4)[2:]},
        False,
    ),
    "storage size": (
        lambda: {"a": torch.zeros(4)[:2]},
        lambda: {"a": torch.zeros(6)[:2]},
        False,
    ),
    "conjugate bit": (
        lambda: {"z": torch.zeros(2, dtype=torch.complex64)},
        lambda: {"z": torch.zeros(2, dtype=torch.complex64).conj()},
        False,
    ),
    "a set (not a fast-path graph) each time": (
        lambda: {"s": {1, 2}},
        lambda: {"s": {1, 2}},
        False,
    ),
    "a tensor with attributes each time": (
        lambda: {"t": _with_attr(torch.zeros(2))},
        lambda: {"t": _with_attr(torch.zeros(2))},
        False,
    ),
    "self-referencing list, same shape": (_cycle, _cycle, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_second_save_is_torch_save_bytes(name: str) -> None:
    make_a, make_b, reused = CASES[name]
    stager = Stager()
    a = make_a()
    first, first_reused = _write(stager, a)
    assert not first_reused
    assert first == _torch_save_bytes(a)
    b = make_b()
    second, second_reused = _write(stager, b)
    assert second == _torch_save_bytes(b), name
    assert second_reused is reused, name


def test_back_and_forth_between_two_layouts() -> None:
    """Each save compares with the previous one only: A, B, A, A reuses on the last."""
    stager = Stager()
    a = {"w": torch.zeros(3)}
    b = {"w": torch.zeros(3), "extra": 1}
    reused = []
    for state in (a, b, a, a):
        data, hit = _write(stager, state)
        assert data == _torch_save_bytes(state)
        reused.append(hit)
    assert reused == [False, False, False, True]


def test_reused_layout_over_new_source_tensors() -> None:
    """Same structure, every tensor a new object over new storage: still reused."""
    stager = Stager()
    for step in range(3):
        state = _model()
        state["model"] = {k: v.clone() + step for k, v in state["model"].items()}
        data, hit = _write(stager, state)
        assert data == _torch_save_bytes(state)
        assert hit is (step > 0)


def _assert_repeated_saves_are_torch_saves(
    writer_cls: Any,
    tmp_path: Any,
    state: dict[str, Any],
    saves: int,
    step: Any = None,
) -> None:
    """Save ``state`` ``saves`` times with one writer, its model's tensors stepped in
    place before each call (then ``step()``); each file must be torch.save's bytes of
    the state at its call."""
    expected = []
    writer = writer_cls(out_dir=str(tmp_path))
    try:
        for i in range(saves):
            with torch.no_grad():
                for v in state["model"].values():
                    v.add_(1.0)
            if step is not None:
                step()
            expected.append(_torch_save_bytes(state))
            handle = writer(f"s{i}.pt", str(tmp_path), state)
            if handle is not None:
                handle.result(timeout=60)
    finally:
        writer.finalize()
    for i, data in enumerate(expected):
        assert (tmp_path / f"s{i}.pt").read_bytes() == data


@pytest.mark.parametrize(
    "writer_cls",
    [snapwriter.StandardWriter, snapwriter.ProcessWriter, snapwriter.ProcessQueueWriter],
)
def test_writers_reuse_the_layout_and_write_torch_save_bytes(
    writer_cls: Any, tmp_path: Any
) -> None:
    state = _model()

    def step() -> None:
        state["epoch"] = 3  # unchanged value: same layout

    _assert_repeated_saves_are_torch_saves(writer_cls, tmp_path, state, 4, step)


def test_a_layout_sent_to_another_process_arrives_as_none() -> None:
    """A save function carrying a layout (rank-set hashing wraps one) pickles; the
    receiving process gets no layout and pickles the state itself."""
    import functools
    import pickle

    stager = Stager()
    staged = stager.stage({"w": torch.zeros(2)})
    fn = functools.partial(fast_torch_save, layout=staged.layout)
    again = pickle.loads(pickle.dumps(fn))
    assert again.keywords == {"layout": None}
    buffer = io.BytesIO()
    again(staged.value, buffer)
    assert buffer.getvalue() == _torch_save_bytes({"w": torch.zeros(2)})


@pytest.mark.parametrize(
    "writer_cls",
    [snapwriter.StandardWriter, snapwriter.ProcessWriter, snapwriter.ProcessQueueWriter],
)
def test_many_small_tensors_repeated_saves_are_torch_save_bytes(
    writer_cls: Any, tmp_path: Any
) -> None:
    """The path of 50k-tensor states at small scale: a reused layout and an archive
    written by torch's writer on its own file handle (>= BY_NAME_MIN_RECORDS records),
    through each writer, byte for byte torch.save's file at every call."""
    from snapwriter._fastsave import BY_NAME_MIN_RECORDS

    state = {
        "model": {f"w{i}": torch.full((16,), float(i)) for i in range(2 * BY_NAME_MIN_RECORDS)},
        "step": 0,
    }
    _assert_repeated_saves_are_torch_saves(writer_cls, tmp_path, state, 3)
