"""Deep structural comparison of two loaded objects, and of two torch.save archives.

:func:`compare_objects` walks both graphs in parallel and returns every difference as a
readable line (``path: what differs``), never just a bool. It checks:

- exact types, and the *identity map*: an object reached twice in ``a`` (container,
  tensor, object; cycles included) is reached twice in ``b`` at the same paths, and
  objects distinct in ``a`` are distinct in ``b``;
- for every tensor: class, dtype, layout, device, shape, stride, storage offset,
  ``requires_grad``, ``is_leaf``, conj/neg bits, ``__dict__`` (recursively), quantization
  parameters, sparse indices/values and coalesced state, nested components, and
  bit-exact bytes of the whole storage (so NaN payloads and ``-0.0`` count);
- the storage partition: tensors sharing a storage in ``a`` share one in ``b`` and
  only those, and every storage has the same ``nbytes``.

:func:`compare_files` compares the archives themselves: the records (names without the
archive prefix, sizes), and the ``data/*`` storage records as a multiset of sizes.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ("PICKLE_RECORD", "compare_files", "compare_objects", "storages_of", "tensors_of")

#: Compared by value; identity among them is not part of the object graph.
_ATOMS: tuple[type, ...] = (
    int,
    float,
    complex,
    bool,
    str,
    bytes,
    type(None),
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
    torch.qscheme,
    type(Ellipsis),
)
_STORAGES = (torch.UntypedStorage, torch.storage.TypedStorage)
_SPARSE_COMPRESSED = {torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc}


def _storage_bytes(storage: torch.UntypedStorage) -> np.ndarray:
    """The storage's bytes as a uint8 array, whatever its device."""
    if storage.device.type == "meta":
        return np.zeros(0, dtype=np.uint8)
    if storage.device.type != "cpu":
        storage = storage.cpu()
    raw = torch.empty(0, dtype=torch.uint8)
    raw.set_(storage, 0, (storage.nbytes(),), (1,))
    return raw.numpy()


@dataclasses.dataclass
class _Walk:
    diffs: list[str] = dataclasses.field(default_factory=list)
    # identity: id in a -> (id in b, first path); id in b -> id in a
    a_to_b: dict[int, tuple[int, str]] = dataclasses.field(default_factory=dict)
    b_to_a: dict[int, tuple[int, str]] = dataclasses.field(default_factory=dict)
    # storage partition: storage key in a -> (key in b, first path), and back
    sa_to_sb: dict[int, tuple[int, str]] = dataclasses.field(default_factory=dict)
    sb_to_sa: dict[int, tuple[int, str]] = dataclasses.field(default_factory=dict)
    keep: list[Any] = dataclasses.field(default_factory=list)  # transient objects: ids stay unique

    def diff(self, path: str, what: str) -> None:
        self.diffs.append(f"{path}: {what}")

    # -- the walk ---------------------------------------------------------------------

    def walk(self, a: Any, b: Any, path: str) -> None:
        if type(a) is not type(b):
            self.diff(path, f"type {_tname(a)} != {_tname(b)}")
            return
        if isinstance(a, _ATOMS):
            if not _same_atom(a, b):
                self.diff(path, f"value {a!r} != {b!r}")
            return
        if isinstance(a, (type, types.FunctionType, types.BuiltinFunctionType, enum.Enum)):
            if a is not b:
                self.diff(path, f"global {a!r} is not {b!r}")
            return
        if not self._first_visit(a, b, path):
            return
        try:
            self.dispatch(a, b, path)
        except Exception as exc:  # a broken object (e.g. a tensor torch cannot read)
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            self.diff(path, f"comparing raised {type(exc).__name__}: {detail}")

    def dispatch(self, a: Any, b: Any, path: str) -> None:
        if isinstance(a, torch.Tensor):
            self.tensor(a, b, path)
        elif isinstance(a, _STORAGES):
            self.storage(a, b, path)
        elif isinstance(a, np.ndarray):
            self.ndarray(a, b, path)
        elif isinstance(a, np.generic):
            if a.dtype != b.dtype or a.tobytes() != b.tobytes():
                self.diff(path, f"numpy scalar {a!r} ({a.dtype}) != {b!r} ({b.dtype})")
        elif isinstance(a, dict):
            self.mapping(a, b, path)
        elif isinstance(a, (list, tuple)):
            self.sequence(a, b, path)
        elif isinstance(a, (set, frozenset)):
            if a != b:
                self.diff(path, f"set {sorted(map(repr, a))} != {sorted(map(repr, b))}")
            self.attributes(a, b, path)
        else:
            self.reduced(a, b, path)

    def _first_visit(self, a: Any, b: Any, path: str) -> bool:
        """Record ``a``↔``b`` in the identity map; False when either was seen before."""
        seen_a = self.a_to_b.get(id(a))
        seen_b = self.b_to_a.get(id(b))
        if seen_a is None and seen_b is None:
            self.a_to_b[id(a)] = (id(b), path)
            self.b_to_a[id(b)] = (id(a), path)
            return True
        if seen_a is not None and seen_a[0] != id(b):
            self.diff(
                path,
                f"identity: in A this is the object already reached at {seen_a[1]}, "
                "in B it is a different object",
            )
        elif seen_b is not None and seen_b[0] != id(a):
            self.diff(
                path,
                f"identity: in B this is the object already reached at {seen_b[1]}, "
                "in A it is a different object",
            )
        return False

    def mapping(self, a: dict[Any, Any], b: dict[Any, Any], path: str) -> None:
        ka, kb = list(a), list(b)
        if len(ka) != len(kb) or not all(_same_key(x, y) for x, y in zip(ka, kb, strict=False)):
            self.diff(path, f"keys {ka!r} != {kb!r}")
            common = [k for k in ka if not isinstance(k, torch.Tensor) and k in b]
            for k in common:
                self.walk(a[k], b[k], f"{path}[{k!r}]")
        else:
            for x, y in zip(ka, kb, strict=True):
                if not isinstance(x, _ATOMS):
                    self.walk(x, y, f"{path}.keys()[{x!r}]")
                self.walk(a[x], b[y], f"{path}[{x!r}]")
        if isinstance(a, collections.defaultdict):
            self.walk(a.default_factory, b.default_factory, f"{path}.default_factory")
        self.attributes(a, b, path)

    def sequence(self, a: list[Any] | tuple[Any, ...], b: Any, path: str) -> None:
        if len(a) != len(b):
            self.diff(path, f"length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            self.walk(x, y, f"{path}[{i}]")
        self.attributes(a, b, path)

    def attributes(self, a: Any, b: Any, path: str) -> None:
        """Instance ``__dict__`` of container subclasses (e.g. a state_dict's _metadata)."""
        da, db = getattr(a, "__dict__", None), getattr(b, "__dict__", None)
        if da is None and db is None:
            return
        if (da is None) != (db is None):
            self.diff(path, f"__dict__ {da!r} != {db!r}")
            return
        self.attr_dict(da, db, path)

    def attr_dict(self, da: dict[str, Any], db: dict[str, Any], path: str) -> None:
        if set(da) != set(db):
            self.diff(path, f"attributes {sorted(da)} != {sorted(db)}")
        for k in da:
            if k in db:
                self.walk(da[k], db[k], f"{path}.{k}")

    def reduced(self, a: Any, b: Any, path: str) -> None:
        """Any other object: compare what pickle would save of it (state and arguments)."""
        try:
            ra, rb = a.__reduce_ex__(4), b.__reduce_ex__(4)
        except Exception as exc:  # not reducible: equality is all we can ask
            if a != b:
                self.diff(path, f"{a!r} != {b!r} (not reducible: {exc})")
            return
        self.keep += [ra, rb]
        if isinstance(ra, str) or isinstance(rb, str):
            if a is not b:
                self.diff(path, f"global {a!r} is not {b!r}")
            return
        ra, rb = tuple(ra), tuple(rb)
        if ra[0] != rb[0]:
            self.diff(path, f"reconstructor {ra[0]!r} != {rb[0]!r}")
        for i, (x, y) in enumerate(zip(ra[1:], rb[1:], strict=False)):
            if i == 0:  # constructor arguments: a transient tuple
                self.keep += [x, y]
            if isinstance(x, Iterator) and isinstance(y, Iterator):  # list/dict items
                x, y = list(x), list(y)
                self.keep += [x, y]
            label = ("args", "state", "listitems", "dictitems", "setstate")[i]
            if i == 1 and isinstance(x, dict) and isinstance(y, dict):
                self.attr_dict(x, y, path)
            else:
                self.walk(x, y, f"{path}.<{label}>")

    # -- arrays and tensors -------------------------------------------------------------

    def ndarray(self, a: np.ndarray, b: np.ndarray, path: str) -> None:
        for what in ("dtype", "shape", "strides"):
            if getattr(a, what) != getattr(b, what):
                self.diff(path, f"ndarray {what} {getattr(a, what)} != {getattr(b, what)}")
                return
        if a.flags.c_contiguous != b.flags.c_contiguous:
            self.diff(path, "ndarray C-contiguity differs")
        if a.dtype.hasobject:
            self.walk(a.tolist(), b.tolist(), f"{path}.tolist()")
        elif a.tobytes() != b.tobytes():
            self.diff(path, "ndarray bytes differ")

    def storage(self, a: Any, b: Any, path: str) -> None:
        if isinstance(a, torch.storage.TypedStorage):
            if a.dtype != b.dtype:
                self.diff(path, f"storage dtype {a.dtype} != {b.dtype}")
            a, b = a._untyped_storage, b._untyped_storage
        self.shared_storage(a, b, path)

    def shared_storage(self, sa: torch.UntypedStorage, sb: torch.UntypedStorage, path: str) -> None:
        """Check the partition of storages; compare each distinct storage once."""
        if sa.device.type != sb.device.type or sa.device != sb.device:
            self.diff(path, f"storage device {sa.device} != {sb.device}")
        ka, kb = sa._cdata, sb._cdata
        seen_a, seen_b = self.sa_to_sb.get(ka), self.sb_to_sa.get(kb)
        if seen_a is None and seen_b is None:
            self.sa_to_sb[ka] = (kb, path)
            self.sb_to_sa[kb] = (ka, path)
            self.keep += [sa, sb]
            if sa.nbytes() != sb.nbytes():
                self.diff(path, f"storage nbytes {sa.nbytes()} != {sb.nbytes()}")
            elif not np.array_equal(_storage_bytes(sa), _storage_bytes(sb)):
                self.diff(path, f"storage bytes differ ({_first_difference(sa, sb)})")
            return
        if seen_a is not None and seen_a[0] != kb:
            self.diff(
                path,
                f"storage sharing: in A it shares the storage of {seen_a[1]}, in B it does not",
            )
        elif seen_b is not None and seen_b[0] != ka:
            self.diff(
                path,
                f"storage sharing: in B it shares the storage of {seen_b[1]}, in A it does not",
            )

    def tensor(self, a: torch.Tensor, b: torch.Tensor, path: str) -> None:
        facts = (
            ("dtype", lambda t: t.dtype),
            ("layout", lambda t: t.layout),
            ("device", lambda t: str(t.device)),
            ("shape", lambda t: tuple(t.shape) if not t.is_nested else None),
            ("requires_grad", lambda t: t.requires_grad),
            ("is_leaf", lambda t: t.is_leaf),
            ("is_nested", lambda t: t.is_nested),
            ("is_quantized", lambda t: t.is_quantized),
        )
        for what, get in facts:
            va, vb = get(a), get(b)
            if va != vb:
                self.diff(path, f"{what} {va} != {vb}")
                return
        if a.layout == torch.strided and not a.is_nested:
            for what, get in (
                ("is_conj", lambda t: t.is_conj()),
                ("is_neg", lambda t: t.is_neg()),
                ("stride", lambda t: t.stride()),
                ("storage_offset", lambda t: t.storage_offset()),
            ):
                va, vb = get(a), get(b)
                if va != vb:
                    self.diff(path, f"{what} {va} != {vb}")
        self.tensor_attributes(a, b, path)
        if a.is_quantized:
            self.quantized(a, b, path)
        elif a.is_nested:
            self.nested(a, b, path)
        elif a.layout == torch.sparse_coo:
            if a.is_coalesced() != b.is_coalesced():
                self.diff(path, f"is_coalesced {a.is_coalesced()} != {b.is_coalesced()}")
            self.part(a._indices(), b._indices(), f"{path}._indices()")
            self.part(a._values(), b._values(), f"{path}._values()")
            return
        elif a.layout in _SPARSE_COMPRESSED:
            compressed = a.layout in (torch.sparse_csr, torch.sparse_bsr)
            names = (
                ("crow_indices", "col_indices") if compressed else ("ccol_indices", "row_indices")
            )
            for name in (*names, "values"):
                self.part(getattr(a, name)(), getattr(b, name)(), f"{path}.{name}()")
            return
        if a.layout == torch.strided and not a.is_nested:
            self.shared_storage(a.untyped_storage(), b.untyped_storage(), path)

    def tensor_attributes(self, a: torch.Tensor, b: torch.Tensor, path: str) -> None:
        da, db = dict(vars(a)), dict(vars(b))
        if a.is_nested and a.layout == torch.jagged:  # components are compared in nested()
            da = {k: v for k, v in da.items() if not k.startswith("_")}
            db = {k: v for k, v in db.items() if not k.startswith("_")}
        self.keep += [da, db]
        self.attr_dict(da, db, path)

    def part(self, a: torch.Tensor, b: torch.Tensor, path: str) -> None:
        """A component tensor of a special tensor (indices, values...): a fresh object."""
        self.keep += [a, b]
        self.walk(a, b, path)

    def quantized(self, a: torch.Tensor, b: torch.Tensor, path: str) -> None:
        qa, qb = a.qscheme(), b.qscheme()
        if qa != qb:
            self.diff(path, f"qscheme {qa} != {qb}")
            return
        if qa in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            for what in ("q_scale", "q_zero_point"):
                va, vb = getattr(a, what)(), getattr(b, what)()
                if va != vb:
                    self.diff(path, f"{what} {va!r} != {vb!r}")
        else:
            if a.q_per_channel_axis() != b.q_per_channel_axis():
                self.diff(path, f"axis {a.q_per_channel_axis()} != {b.q_per_channel_axis()}")
            for what in ("q_per_channel_scales", "q_per_channel_zero_points"):
                self.part(getattr(a, what)(), getattr(b, what)(), f"{path}.{what}()")
        self.part(a.int_repr(), b.int_repr(), f"{path}.int_repr()")

    def nested(self, a: torch.Tensor, b: torch.Tensor, path: str) -> None:
        if a.layout == torch.jagged:
            for name in ("_values", "_offsets", "_lengths", "_metadata_cache"):
                va, vb = getattr(a, name), getattr(b, name)
                if (va is None) != (vb is None):
                    self.diff(path, f"{name} {va!r} != {vb!r}")
                elif va is not None:
                    self.walk(va, vb, f"{path}.{name}")
            if a._ragged_idx != b._ragged_idx:
                self.diff(path, f"_ragged_idx {a._ragged_idx} != {b._ragged_idx}")
            return
        for name in (
            "_nested_tensor_size",
            "_nested_tensor_strides",
            "_nested_tensor_storage_offsets",
            "values",
        ):
            self.part(getattr(a, name)(), getattr(b, name)(), f"{path}.{name}()")


def _tname(x: Any) -> str:
    cls = type(x)
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_atom(a: Any, b: Any) -> bool:
    if isinstance(a, float):
        return a.hex() == b.hex() if a == a else b != b  # NaN == NaN, -0.0 != 0.0
    if isinstance(a, complex):
        return _same_atom(a.real, b.real) and _same_atom(a.imag, b.imag)
    return bool(a == b)


def _same_key(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, torch.Tensor):
        return True  # compared by walking
    return _same_atom(x, y) if isinstance(x, _ATOMS) else bool(x == y)


def _first_difference(sa: torch.UntypedStorage, sb: torch.UntypedStorage) -> str:
    differ = np.flatnonzero(_storage_bytes(sa) != _storage_bytes(sb))
    return f"{differ.size} of {sa.nbytes()} bytes, first at byte {differ[0]}"


def compare_objects(a: Any, b: Any, root: str = "root") -> list[str]:
    """Every structural difference between ``a`` and ``b``; empty when they match."""
    walk = _Walk()
    walk.walk(a, b, root)
    return walk.diffs


# -- what a loaded graph keeps alive --------------------------------------------------------


def tensors_of(obj: Any) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` (containers, attributes, reduced state)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    keep: list[Any] = []

    def visit(x: Any) -> None:
        if isinstance(x, _ATOMS) or id(x) in seen:
            return
        seen.add(id(x))
        keep.append(x)
        if isinstance(x, torch.Tensor):
            found.append(x)
            for v in vars(x).values():
                visit(v)
        elif isinstance(x, dict):
            for k, v in x.items():
                visit(k)
                visit(v)
        elif isinstance(x, (list, tuple, set, frozenset)):
            for v in x:
                visit(v)
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            for v in vars(x).values():
                visit(v)

    visit(obj)
    return found


def storages_of(obj: Any) -> dict[int, int]:
    """The distinct storages of the strided tensors reachable from ``obj``: key -> nbytes."""
    out: dict[int, int] = {}
    for t in tensors_of(obj):
        if t.layout == torch.strided and not t.is_nested and not t.is_quantized:
            s = t.untyped_storage()
            out[s._cdata] = s.nbytes()
    return out


# -- file level ------------------------------------------------------------------------------


def _records(path: Path) -> dict[str, int]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename.split("/", 1)[1]: info.file_size for info in zf.infolist()}


#: The pickle stream: its size is compared only when asked (see :func:`compare_files`).
PICKLE_RECORD = "data.pkl"


def compare_files(a: Path, b: Path, *, pickle_size: bool = True) -> list[str]:
    """Differences between two torch.save archives: record names and sizes.

    ``data/<key>`` records are compared as a multiset of sizes (a writer may number the
    storages differently); every other record by name and size. ``pickle_size=False``
    leaves out the size of ``data.pkl``, which also differs when only pickle's memo does
    (a string or NumPy dtype shared in one target, separate copies in the other).
    """
    ra, rb = _records(Path(a)), _records(Path(b))
    if not pickle_size:
        for records in (ra, rb):
            if PICKLE_RECORD in records:
                records[PICKLE_RECORD] = -1
    diffs: list[str] = []
    others_a = {k: v for k, v in ra.items() if not k.startswith("data/")}
    others_b = {k: v for k, v in rb.items() if not k.startswith("data/")}
    for name in sorted(set(others_a) | set(others_b)):
        if name not in others_b:
            diffs.append(f"record {name}: only in A")
        elif name not in others_a:
            diffs.append(f"record {name}: only in B")
        elif others_a[name] != others_b[name]:
            diffs.append(f"record {name}: {others_a[name]} bytes != {others_b[name]} bytes")
    data_a = sorted(v for k, v in ra.items() if k.startswith("data/"))
    data_b = sorted(v for k, v in rb.items() if k.startswith("data/"))
    if len(data_a) != len(data_b):
        diffs.append(f"storage records: {len(data_a)} != {len(data_b)}")
    if data_a != data_b:
        diffs.append(f"storage record sizes: {data_a} != {data_b}")
    return diffs
