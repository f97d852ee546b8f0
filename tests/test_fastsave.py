"""fast_torch_save writes what torch.load reads exactly like torch.save's output."""

from __future__ import annotations

import collections
import errno
import io
import os
import pickle
import subprocess
import sys
import tempfile
from typing import Any

import pytest
import torch

from snapwriter._fastsave import BY_NAME_MIN_RECORDS, _Pickler, fast_torch_save
from snapwriter._staging import Stager
from tests.conftest import assert_same, make_state


def _round_trip(obj: Any, **load_kw: Any) -> Any:
    buf = io.BytesIO()
    fast_torch_save(obj, buf)
    buf.seek(0)
    return torch.load(buf, **load_kw)


def _reference(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("weights_only", [True, False])
def test_state_round_trips_like_torch_save(weights_only: bool) -> None:
    state = make_state()
    assert_same(_reference(state), _round_trip(state, weights_only=weights_only))


def test_staged_state_keeps_one_storage_per_original_storage() -> None:
    state = {f"p{i}": torch.full((3, 5), float(i)) for i in range(100)}
    state["i"] = torch.arange(7)
    state["view"] = state["p3"][1]
    staged = Stager().stage(state).value
    loaded = _round_trip(staged, weights_only=True)
    assert_same(state, loaded)
    ptr = loaded["p0"].untyped_storage().data_ptr()
    assert loaded["p99"].untyped_storage().data_ptr() != ptr
    assert loaded["p0"].untyped_storage().nbytes() == 15 * 4
    assert loaded["view"].untyped_storage().data_ptr() == loaded["p3"].untyped_storage().data_ptr()


def _torch_save_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _fast_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    fast_torch_save(obj, buf)
    return buf.getvalue()


def test_fast_path_is_byte_identical_to_torch_save() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    base = torch.arange(20.0)
    obj = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "params": list(model.parameters()),
        "view": base[2:8:2],
        "base": base,
        "expanded": torch.ones(10).expand(10, 10),
        "grad": torch.ones(2, requires_grad=True),
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
        "bf16": torch.ones(3, dtype=torch.bfloat16),
        "empty": torch.empty(0),
        "scalar": torch.tensor(3.0),
        "py": [1, (2, "x"), {"k": None}],
    }
    pickler = _Pickler(io.BytesIO())
    pickler.dump(obj)  # takes the fast path (raises _Fallback otherwise)
    assert _fast_bytes(obj) == _torch_save_bytes(obj)
    staged = Stager().stage(obj).value
    assert _fast_bytes(staged) == _torch_save_bytes(obj)


def test_shared_and_strided_views_keep_their_layout() -> None:
    base = torch.arange(24.0).reshape(4, 6)
    obj = {"base": base, "t": base.t(), "row": base[1], "slice": base[:, ::2]}
    loaded = _round_trip(obj, weights_only=True)
    for k, v in obj.items():
        assert torch.equal(loaded[k], v) and loaded[k].stride() == v.stride()
    loaded["base"][0, 0] = 100.0  # views still share storage, as with torch.save
    assert loaded["t"][0, 0] == 100.0


def test_ordered_dict_metadata_and_python_objects() -> None:
    sd = torch.nn.Linear(3, 2).state_dict()
    loaded = _round_trip({"sd": sd, "x": [1, (2, "a")], "none": None})
    assert type(loaded["sd"]) is collections.OrderedDict
    assert loaded["sd"]._metadata == sd._metadata  # type: ignore[attr-defined]
    assert_same(dict(sd), dict(loaded["sd"]))
    assert loaded["x"] == [1, (2, "a")]


@pytest.mark.parametrize(
    "special",
    [
        torch.nn.Parameter(torch.ones(3)),
        torch.ones(3, requires_grad=True),
        torch.tensor([1 + 2j]).conj(),
        torch.eye(3).to_sparse(),
    ],
    ids=["parameter", "requires-grad", "conj", "sparse"],
)
def test_special_tensors_fall_back_to_torch_save(special: torch.Tensor) -> None:
    loaded = _round_trip({"t": special, "plain": torch.ones(2)}, weights_only=False)
    expected = _reference({"t": special})["t"]
    assert type(loaded["t"]) is type(expected)
    assert torch.equal(loaded["t"].resolve_conj().to_dense(), expected.resolve_conj().to_dense())
    assert loaded["t"].requires_grad == expected.requires_grad


def test_mixed_dtype_views_of_one_storage_raise_like_torch_save() -> None:
    base = torch.zeros(4)
    obj = {"f": base, "i": base.view(torch.int32)}
    with pytest.raises(RuntimeError, match="different types"):
        fast_torch_save(obj, io.BytesIO())


def test_unpicklable_raises_like_torch_save() -> None:
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        fast_torch_save({"f": lambda: 1}, io.BytesIO())


def test_attribute_carrying_tensor_falls_back() -> None:
    t = torch.ones(2)
    t.note = "kept"  # type: ignore[attr-defined]
    loaded = _round_trip({"t": t}, weights_only=False)
    assert loaded["t"].note == "kept"


def test_loaded_tensors_do_not_share_hook_tables() -> None:
    loaded = _round_trip({"a": torch.ones(2), "b": torch.ones(2)}, weights_only=True)
    a = loaded["a"].requires_grad_()
    b = loaded["b"].requires_grad_()
    fired: list[str] = []
    a.register_hook(lambda g: fired.append("a") or g)
    (b * 2).sum().backward()
    assert fired == []  # a hook on `a` never fires for a backward through `b`
    (a * 2).sum().backward()
    assert fired == ["a"]


def test_write_failure_raises_and_never_aborts_the_process() -> None:
    """A disk-full error in the middle must surface as OSError, not abort in a destructor."""
    import gc

    class Full(io.RawIOBase):
        def __init__(self) -> None:
            self.written = 0

        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            if self.written + len(b) > 100:  # room for 100 bytes
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(b)
            return len(b)

    state = {"a": torch.ones(1000), "b": torch.zeros(1000)}
    with pytest.raises(OSError, match="No space"):
        fast_torch_save(state, Full())  # type: ignore[arg-type]
    gc.collect()  # the writer's destructor runs here: the process must survive it


def _many_records() -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((4,), float(i)) for i in range(BY_NAME_MIN_RECORDS + 10)}


def _archive_dirs() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("snapwriter-archive-")}


def test_many_records_written_by_name_are_torch_save_bytes(tmp_path: Any) -> None:
    """Past BY_NAME_MIN_RECORDS torch's writer opens the file itself: same bytes, the
    file object left at the end, no private directory left behind."""
    state = _many_records()
    before = _archive_dirs()
    path = tmp_path / "s.pt"
    with open(path, "wb") as f:
        fast_torch_save(state, f)
        assert f.tell() == path.stat().st_size
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert path.read_bytes() == buffer.getvalue()
    assert _archive_dirs() == before


def test_many_records_appended_keep_what_the_file_held(tmp_path: Any) -> None:
    """append=True hands over a file that is not empty: it is written through the
    file object, never reopened (which would truncate it)."""
    path = tmp_path / "log.pt"
    path.write_bytes(b"earlier")
    with open(path, "ab") as f:
        fast_torch_save(_many_records(), f)
    data = path.read_bytes()
    buffer = io.BytesIO()
    torch.save(_many_records(), buffer)
    assert data == b"earlier" + buffer.getvalue()


_FSIZE_CHILD = """
import errno, resource, signal, sys, torch
sys.path[:0] = [sys.argv[2]]
from snapwriter._fastsave import fast_torch_save
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
state = {f"t{i}": torch.full((64,), float(i)) for i in range(200)}
try:
    with open(sys.argv[1], "wb") as f:
        fast_torch_save(state, f)
except OSError as exc:
    print("errno", exc.errno)
else:
    print("no error")
"""


def test_many_records_a_failed_write_raises_the_os_error(tmp_path: Any) -> None:
    """torch's own file writer reports a failed write without errno: the archive is
    written again through the file object, which raises the OSError itself (EFBIG)."""
    out = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD, str(tmp_path / "s.pt"), os.getcwd()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["errno", str(errno.EFBIG)], out
