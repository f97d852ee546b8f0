"""A direct emitter of torch.save's ``data.pkl`` for plain tensor states.

:func:`emit` writes pickle protocol 2 opcodes itself, with no :class:`pickle.Pickler`
and no per-object Python callbacks, producing **exactly the bytes** that
``pickle.Pickler(f, protocol=2)`` writes in torch.save (and that
:class:`snapwriter._fastsave._Pickler` writes): the same opcodes, the same memo indices,
the same persistent ids, the same storage keys in the same order.

It accepts object graphs made only of exact ``dict``, ``collections.OrderedDict`` (with
or without instance attributes, such as a state dict's ``_metadata``), ``list``,
``tuple``, ``str``, ``int``, ``float``, ``bool`` and ``None``, plain ``torch.Tensor``
objects (no Python attributes, strided, on the CPU, of a dtype with a legacy typed
storage, conjugate/negative bits allowed) and attribute-free ``nn.Parameter`` objects
over such data. Shared and self-referencing objects are memoised as pickle does.

For anything else it gives up (returns ``None``) and the caller runs the pickler-based
tier. Types are checked first, by a walk over the containers at C speed per item (about
2% of emitting), so an object of any other type anywhere costs next to nothing; a tensor
that this tier cannot take (CUDA, sparse, with attributes...) is found while emitting,
and costs the work done up to it.

Mirrored from the C pickler (protocol 2): ``PROTO 2``/``STOP``; the memo (``BINPUT`` or
``LONG_BINPUT`` for every str, non-empty tuple, list, dict, reduced object and global;
``BINGET``/``LONG_BINGET`` for objects seen before, by identity); ``GLOBAL`` for
functions and classes; ``BININT1``/``BININT2``/``BININT``/``LONG1``/``LONG4``;
``NEWTRUE``/``NEWFALSE``; ``BINFLOAT``; ``BINUNICODE``; ``TUPLE1``-``TUPLE3`` or
``MARK``...``TUPLE`` (with the ``POP`` dance for tuples that contain themselves);
``SETITEMS``/``APPENDS`` in batches of 1000 with the exact-dict, exact-list and
dict-items-iterator batch rules; ``BINPERSID`` after the persistent id tuple.
"""

from __future__ import annotations

import collections
import copyreg
import pickle
import struct
import time
from collections.abc import Iterable
from itertools import chain, islice
from typing import Any

import torch

from ._gcpause import collector_paused
from ._pool import staged_device
from ._tensorstate import metadata_of
from ._tensorstate import storage_address as _storage_address_of_tensor

__all__ = (
    "CHECK_EVERY",
    "CPU",
    "REBUILD_PARAMETER",
    "REBUILD_TENSOR",
    "STORAGE_TAG",
    "STORAGE_TYPES",
    "YIELD_SECONDS",
    "emit",
)

#: Storage type (``torch.FloatStorage``...) of every dtype torch.save writes as a
#: legacy typed storage.
STORAGE_TYPES: dict[torch.dtype, Any] = {
    dtype: getattr(torch, name)
    for dtype, name in torch.storage._dtype_to_storage_type_map().items()
}
REBUILD_TENSOR = torch._utils._rebuild_tensor_v2
REBUILD_PARAMETER = torch._utils._rebuild_parameter
#: The objects put in every persistent id: both tiers use these very objects, since
#: whether pickle writes a fresh copy or a memo reference depends on identity.
STORAGE_TAG = "storage"
CPU = "cpu"

#: Every this many tensors, pickling hands the GIL over if it held it this long
#: (``time.sleep(0)`` costs ~0.1 ms on some machines: not after every few tensors).
CHECK_EVERY = 16
YIELD_SECONDS = 0.001

_BATCH = 1000  # pickle's batch size for SETITEMS / APPENDS
_OrderedDict = collections.OrderedDict
_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_STRIDED = torch.strided
_QUANTIZED = {torch.qint8, torch.qint32, torch.quint8, torch.quint4x2, torch.quint2x4}

_pack_u32 = struct.Struct("<I").pack
_pack_i32 = struct.Struct("<i").pack
_pack_double = struct.Struct(">d").pack
_pack_op_u32 = struct.Struct("<BI").pack  # an opcode and a 4-byte argument
_PUT = [b"q" + bytes((i,)) for i in range(256)]
_GET = [b"h" + bytes((i,)) for i in range(256)]
_SMALL_INT = [b"K" + bytes((i,)) for i in range(256)]
_TUPLE_N = (b")", b"\x85", b"\x86", b"\x87")  # EMPTY_TUPLE, TUPLE1, TUPLE2, TUPLE3


class _GiveUp(Exception):
    """Raised while emitting when the graph is outside what this tier handles."""


def _global_bytes(obj: Any) -> bytes:
    """The ``GLOBAL`` opcode protocol 2 writes for ``obj`` (the memo put excluded)."""
    data = pickle.dumps(obj, protocol=2)
    assert data.startswith(b"\x80\x02c") and data.endswith(b"q\x00."), data
    return data[2:-3]


_GLOBALS: dict[int, bytes] = {
    id(g): _global_bytes(g)
    for g in (REBUILD_TENSOR, REBUILD_PARAMETER, _OrderedDict, *STORAGE_TYPES.values())
}


#: dtype -> (storage type, element size), for the dtypes a plain tensor may have here
_DTYPES: dict[torch.dtype, tuple[Any, int]] = {
    dtype: (storage_type, dtype.itemsize)
    for dtype, storage_type in STORAGE_TYPES.items()
    if dtype not in _QUANTIZED
}


def _put(i: int) -> bytes:
    return _PUT[i] if i < 256 else b"r" + _pack_u32(i)


def _get(i: int) -> bytes:
    return _GET[i] if i < 256 else b"j" + _pack_u32(i)


def _int(v: int) -> bytes:
    """An int as protocol 2 writes it (``save_long``)."""
    if 0 <= v < 256:
        return _SMALL_INT[v]
    if 0 <= v <= 0xFFFF:
        return b"M" + v.to_bytes(2, "little")
    if -0x80000000 <= v <= 0x7FFFFFFF:
        return b"J" + v.to_bytes(4, "little", signed=True)
    size = (v.bit_length() >> 3) + 1
    data = v.to_bytes(size, "little", signed=True)
    if v < 0 and size > 1 and data[-1] == 0xFF and data[-2] & 0x80:
        data = data[:-1]  # the minimal two's complement form
    if len(data) < 256:
        return b"\x8a" + bytes((len(data),)) + data
    return b"\x8b" + _pack_i32(len(data)) + data


def _ints_tuple(values: tuple[int, ...]) -> bytes:
    """A tuple of ints, without its memo put (``EMPTY_TUPLE`` alone for ``()``)."""
    body = b"".join([_int(v) for v in values])
    if len(values) <= 3:
        return body + _TUPLE_N[len(values)]
    return b"(" + body + b"t"


_CONTAINERS = frozenset({dict, _OrderedDict, list, tuple})
_ACCEPTED = _CONTAINERS | {str, int, float, bool, type(None), _Tensor, _Parameter}


def _plain(root: Any) -> bool:
    """Whether every object of the graph from ``root`` is of a type :func:`emit` takes.

    Types only, at C speed per item (``map(type, ...)``), each container walked once:
    a few percent of emitting, so an unsupported object anywhere gives up early.
    """
    seen: set[int] = set()
    stack = [root]
    while stack:
        x = stack.pop()
        cls = type(x)
        if cls not in _CONTAINERS:
            if cls not in _ACCEPTED:
                return False
            continue
        if id(x) in seen:
            continue
        seen.add(id(x))
        items: Iterable[Any] = x if cls is list or cls is tuple else chain(x, x.values())
        if cls is _OrderedDict and x.__dict__:
            stack.append(x.__dict__)
        types = set(map(type, items))
        if not types <= _ACCEPTED:
            return False
        if not types.isdisjoint(_CONTAINERS):
            items = x if cls is list or cls is tuple else x.values()
            keys = () if cls is list or cls is tuple else x.keys()
            stack.extend(v for v in chain(items, keys) if type(v) in _CONTAINERS)
    return True


class _Record:
    """A run of opcodes whose only variable parts are consecutive memo puts.

    Built from pieces: bytes, or ``None`` for a LONG_BINPUT whose index is the next one
    from a base. :meth:`at` gives the bytes for a base as the little-endian digits of
    ``const + base * weight`` (``const`` holds the constant bytes and the offsets
    ``0, 1, 2...`` of the indices, ``weight`` a one at the first byte of each index):
    one multiplication instead of a pack per put.
    """

    __slots__ = ("const", "length", "puts", "weight")

    def __init__(self, pieces: list[bytes | None]) -> None:
        const = bytearray()
        weight = puts = 0
        for piece in pieces:
            if piece is None:
                const += _pack_op_u32(0x72, puts)
                weight += 1 << (8 * (len(const) - 4))
                puts += 1
            else:
                const += piece
        self.const = int.from_bytes(const, "little")
        self.weight = weight
        self.length = len(const)
        self.puts = puts

    def at(self, base: int) -> bytes:
        """The bytes with memo indices ``base``, ``base + 1``... (``256 <= base < 2**32``)."""
        return (self.const + base * self.weight).to_bytes(self.length, "little")


def _tensor_tail(
    offset: int, shape: tuple[int, ...], stride: tuple[int, ...], grad: bool, hooks: bytes
) -> list[bytes | None]:
    """A tensor record from the end of its persistent id: TUPLE, put, BINPERSID, offset,
    size and stride tuples, requires_grad, the hook table, TUPLE, put, REDUCE, put."""
    pieces: list[bytes | None] = [b"t", None, b"Q", _int(offset), _ints_tuple(shape)]
    if shape:
        pieces.append(None)
    pieces.append(_ints_tuple(stride))
    if stride:
        pieces.append(None)
    pieces += [b"\x88" if grad else b"\x89", hooks, None, b"t", None, b"R", None]
    return pieces


def _unbound(*_args: Any) -> None:
    """What :func:`emit`'s nested functions are rebound to once it is done (see there)."""


_UNBOUND: Any = _unbound


def emit(obj: Any) -> tuple[bytes, list[tuple[str, torch.UntypedStorage]]] | None:
    """``data.pkl`` for ``obj`` and its ``(key, storage)`` records, or ``None``.

    The bytes are exactly those torch.save's pickler writes for ``obj``; ``None`` when
    ``obj`` holds anything outside the types in the module docstring (then nothing is
    left behind). Holds the GIL while it runs, handing it over every millisecond or so,
    and keeps the cyclic garbage collector off meanwhile (as it was before, after).
    """
    if copyreg._extension_registry or _OrderedDict in copyreg.dispatch_table:  # type: ignore[attr-defined]
        return None  # pickle would write EXT opcodes or a custom reduction
    if not _plain(obj):
        return None
    chunks: list[bytes] = [b"\x80\x02"]
    out = chunks.append
    op_u32 = _pack_op_u32
    dtypes = _DTYPES
    strided = _STRIDED
    storage_address = _storage_address_of_tensor
    memo: dict[int, int] = {}  # id -> memo index, for objects that stay alive
    n = 0  # next memo index
    keep: list[Any] = []  # transient objects whose ids are in the memo
    storages: list[tuple[str, torch.UntypedStorage]] = []
    # storage cdata -> its dtype, key's memo index, location, numel
    refs: dict[int, tuple[torch.dtype, int, str, int]] = {}
    ptr_dtypes: dict[int, torch.dtype] = {}  # by data pointer, as torch.save checks
    records: dict[tuple[Any, ...], _Record] = {}  # by geometry (and numel for new storages)
    # Once the first tensors wrote them: BINGET _rebuild_tensor_v2 and two MARKs, the
    # hook table (BINGET OrderedDict, EMPTY_TUPLE, REDUCE), BINGET "cpu", and per dtype
    # BINGET "storage" and BINGET of its storage type.
    rebuild = hooks = cpu = b""
    heads: dict[torch.dtype, bytes] = {}
    starts: dict[torch.dtype, bytes] = {}  # BINGET _rebuild_tensor_v2, MARKs, head
    count = 0
    yielded = time.perf_counter()

    def hand_over() -> None:
        nonlocal yielded
        now = time.perf_counter()
        if now - yielded >= YIELD_SECONDS:
            time.sleep(0)  # hand the GIL over (see _fastsave._Pickler)
            yielded = time.perf_counter()

    def save_global(g: Any) -> None:
        nonlocal n
        i = memo.get(id(g))
        if i is not None:
            out(_get(i))
            return
        out(_GLOBALS[id(g)])
        memo[id(g)] = n
        out(_put(n))
        n += 1

    def save_str(s: str) -> None:
        nonlocal n
        i = memo.get(id(s))
        if i is not None:
            out(_get(i))
            return
        data = s.encode("utf-8", "surrogatepass")
        memo[id(s)] = n
        out(op_u32(0x58, len(data)) + data + _put(n))  # BINUNICODE, put
        n += 1

    def save_pairs(pairs: Iterable[tuple[Any, Any]]) -> None:
        """Keys and values, str keys and tensor values inline."""
        nonlocal n
        for k, v in pairs:
            if type(k) is str:
                i = memo.get(id(k))
                if i is None:
                    data = k.encode("utf-8", "surrogatepass")
                    memo[id(k)] = n
                    out(op_u32(0x58, len(data)) + data + (_PUT[n] if n < 256 else op_u32(0x72, n)))
                    n += 1
                else:
                    out(_GET[i] if i < 256 else op_u32(0x6A, i))
            else:
                save(k)
            if type(v) is _Tensor:
                save_tensor(v, True)
            else:
                save(v)

    def save_tensor(t: torch.Tensor, alive: bool) -> None:
        """What ``_Pickler._reduce_tensor`` reduces ``t`` to, then REDUCE and its put.

        ``alive``: ``t`` is in the graph (memoised by identity), not a fresh
        ``Parameter.data``.
        """
        nonlocal n, count
        if alive:
            i = memo.get(id(t))
            if i is not None:
                out(_GET[i] if i < 256 else op_u32(0x6A, i))
                return
        dtype = t.dtype
        spec = dtypes.get(dtype)
        if spec is None or t.__dict__ or not t.is_cpu or t.layout is not strided or t.is_nested:
            raise _GiveUp
        count += 1
        if not count % CHECK_EVERY:
            hand_over()
        cdata = storage_address(t)
        ref = refs.get(cdata)
        pid = b""
        if ref is None:  # a new storage (as _Pickler._ref)
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr_dtypes.setdefault(ptr, dtype) is not dtype:
                raise _GiveUp  # views of one memory with different dtypes
            key = str(len(storages))
            storages.append((key, storage))
            location = staged_device(cdata) or CPU
            if location is not CPU:
                keep.append(location)
            numel = storage.nbytes() // spec[1]
        elif ref[0] is not dtype:
            raise _GiveUp  # views of one storage with different dtypes
        else:  # its pid tuple's items are all in the memo now
            pid = heads[dtype] + _get(ref[1]) + _get(memo[id(ref[2])]) + _int(ref[3])
        offset: int = t.storage_offset()  # type: ignore[assignment]  # never symbolic here
        shape = t.shape
        stride = t.stride()
        grad = t.requires_grad
        metadata = metadata_of(t)
        start = starts.get(dtype)
        if start and n >= 256 and not metadata:  # the common case: a few chunks
            if ref is None:
                if location is CPU and cpu:  # only the key is new in this pid
                    record = records.get((offset, shape, stride, grad, numel))
                    if record is None:
                        pieces = [
                            None,
                            cpu,
                            _int(numel),
                            *_tensor_tail(offset, shape, stride, grad, hooks),
                        ]
                        record = records[(offset, shape, stride, grad, numel)] = _Record(pieces)
                    data = key.encode()
                    out(start + op_u32(0x58, len(data)) + data)
                    out((record.const + n * record.weight).to_bytes(record.length, "little"))
                    memo[id(key)] = n
                    refs[cdata] = (dtype, n, location, numel)
                    n += record.puts
                    if alive:
                        memo[id(t)] = n - 1
                    return
            else:
                record = records.get((offset, shape, stride, grad))
                if record is None:
                    record = records[(offset, shape, stride, grad)] = _Record(
                        _tensor_tail(offset, shape, stride, grad, hooks)
                    )
                out(rebuild + pid)
                out(record.at(n))
                n += record.puts
                if alive:
                    memo[id(t)] = n - 1
                return
        # the first tensors, new dtypes or locations, conj/neg bits: opcode by opcode
        if not pid:
            tensor_opcodes(dtype, spec[0], (key, location, numel), offset, shape, stride, grad)
            refs[cdata] = (dtype, memo[id(key)], location, numel)
        else:
            tensor_opcodes(dtype, spec[0], pid, offset, shape, stride, grad)
        if metadata:
            keep.append(metadata)
            save(metadata)
        if alive:
            memo[id(t)] = n + 1
        out(b"t" + _put(n) + b"R" + _put(n + 1))  # TUPLE, put, REDUCE, put
        n += 2

    def tensor_opcodes(
        dtype: torch.dtype,
        storage_type: Any,
        pid: bytes | tuple[str, str, int],
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        grad: bool,
    ) -> None:
        """A tensor record up to its hook table's put, writing any object it is first to."""
        nonlocal n, rebuild, hooks, cpu
        save_global(REBUILD_TENSOR)
        rebuild = _get(memo[id(REBUILD_TENSOR)]) + b"(("
        out(b"((")  # the arguments tuple, the persistent id tuple
        if isinstance(pid, bytes):
            out(pid)
        else:
            key, location, numel = pid
            save_str(STORAGE_TAG)
            save_global(storage_type)
            save_str(key)
            save_str(location)
            out(_int(numel))
            heads[dtype] = _get(memo[id(STORAGE_TAG)]) + _get(memo[id(storage_type)])
            starts[dtype] = rebuild + heads[dtype]
            if location is CPU:
                cpu = _get(memo[id(CPU)])
        out(b"t" + _put(n) + b"Q" + _int(offset) + _ints_tuple(shape))
        n += 1
        if shape:
            out(_put(n))
            n += 1
        out(_ints_tuple(stride))
        if stride:
            out(_put(n))
            n += 1
        out(b"\x88" if grad else b"\x89")
        save_global(_OrderedDict)
        hooks = _get(memo[id(_OrderedDict)]) + b")R"
        out(b")R" + _put(n))
        n += 1

    def save(x: Any) -> None:
        nonlocal n
        cls = type(x)
        if x is None:
            out(b"N")
            return
        if cls is bool:
            out(b"\x88" if x else b"\x89")
            return
        if cls is int:
            out(_int(x))
            return
        if cls is float:
            out(b"G" + _pack_double(x))
            return
        i = memo.get(id(x))
        if i is not None:
            out(_get(i))
            return
        if cls is str:
            save_str(x)
        elif cls is dict:
            out(b"}")
            memo[id(x)] = n
            out(_put(n))
            n += 1
            size = len(x)
            if size == 1:
                save_pairs(x.items())
                out(b"s")
            elif size:
                items = iter(x.items())
                for _ in range(size // _BATCH + 1):  # a full last batch is followed by
                    out(b"(")  # an empty one, as the C pickler writes exact dicts
                    save_pairs(islice(items, _BATCH))
                    out(b"u")
        elif cls is list:
            out(b"]")
            memo[id(x)] = n
            out(_put(n))
            n += 1
            if len(x) == 1:
                save(x[0])
                out(b"a")
            else:
                for start in range(0, len(x), _BATCH):
                    out(b"(")
                    for item in x[start : start + _BATCH]:
                        save(item)
                    out(b"e")
        elif cls is tuple:
            size = len(x)
            if not size:
                out(b")")
                return
            if size > 3:
                out(b"(")
            for item in x:
                save(item)
            i = memo.get(id(x))
            if i is not None:  # it holds itself: drop what was written, fetch it back
                out(b"1" if size > 3 else b"0" * size)
                out(_get(i))
                return
            out(b"t" if size > 3 else _TUPLE_N[size])
            memo[id(x)] = n
            out(_put(n))
            n += 1
        elif cls is _Tensor:
            save_tensor(x, True)
        elif cls is _Parameter:
            if x.__dict__:
                raise _GiveUp
            save_global(REBUILD_PARAMETER)
            save_tensor(x.data, False)
            save(x.requires_grad)
            save_global(_OrderedDict)
            out(b")R" + _put(n))  # the hook table, then the arguments tuple
            out(b"\x87" + _put(n + 1) + b"R")
            memo[id(x)] = n + 2
            out(_put(n + 2))
            n += 3
        elif cls is _OrderedDict:
            reduced = x.__reduce__()
            if reduced[0] is not _OrderedDict or reduced[1] != () or reduced[3] is not None:
                raise _GiveUp
            save_global(_OrderedDict)
            out(b")R")
            memo[id(x)] = n
            out(_put(n))
            n += 1
            size = len(x)
            items = iter(x.items())
            for start in range(0, size, _BATCH):
                if size - start == 1:
                    save_pairs(items)
                    out(b"s")
                else:
                    out(b"(")
                    save_pairs(islice(items, _BATCH))
                    out(b"u")
            state = reduced[2]
            if state is not None:
                keep.append(state)
                save(state)
                out(b"b")
        else:
            raise _GiveUp

    # Pickling allocates a few objects per tensor that live until the end (storages,
    # their records): enough to set off full collections, which walk every tensor of
    # the process (a third of the time or more here). The nested functions call each
    # other (a reference cycle through their cells, holding the memo, the records and
    # every storage): deleted at the end, so all of it goes by reference counting.
    try:
        with collector_paused():
            save(obj)
    except (_GiveUp, RecursionError):
        return None
    finally:
        # the names, not the functions: rebinding them empties the cells that close the cycle
        save = save_pairs = save_tensor = save_str = _UNBOUND
        save_global = hand_over = tensor_opcodes = _UNBOUND
    out(b".")
    return b"".join(chunks), storages
