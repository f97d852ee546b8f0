"""Staging: take a copy of a target at call time that *is* the target, as torch.save sees it.

After :meth:`Stager.stage` returns, the staged value shares no mutable state with the
caller's target, and ``torch.save`` of it writes what ``torch.save`` of the target would
have written at the call: the same object graph and the same records.

How each kind of object is copied (one function each, below):

- **containers** (dict, list, tuple; any other object through its pickle reduction:
  OrderedDict with ``_metadata``, defaultdict, namedtuple, set, dataclasses, plain
  objects): rebuilt by one memoised walk, so an object reached twice is copied once and
  cycles are kept, as :func:`copy.deepcopy` does.
- **plain tensors** (strided CPU/CUDA tensors of class ``Tensor``, ``Parameter`` or a
  subclass without its own ``__torch_dispatch__``): each distinct *storage* is copied once
  into a pooled staged storage of the same size (:class:`~snapwriter._pool.Arena`), and
  every tensor is rebuilt over it with its class, storage offset, size, stride,
  conjugate/negative bits, ``requires_grad`` and Python state. Tensors that shared a
  storage still share one; expanded views stay expanded; tied weights stay tied.
- **special tensors** (quantized, sparse, nested, wrapper subclasses, other devices):
  copied by torch's own ``__deepcopy__`` (same memo, so sharing is kept), or where torch
  has none, by a ``torch.save``/``torch.load`` round trip in memory.
- **other leaves** (objects with ``__deepcopy__`` such as NumPy arrays and Enums):
  their own deep copy. Functions and classes are kept as references, as pickle keeps
  them; with ``check_pickle`` they and every reduced object are checked to pickle.

CUDA sources are copied into pinned host memory on a side stream with
``non_blocking=True``; :meth:`StagedTarget.wait` waits for the copy, and
:attr:`StagedTarget.device_tags` lets the write phase record the source device so the
file says ``cuda:N`` exactly as torch.save's does.

The walk also records the target's *layout* (:mod:`snapwriter._layout`): tokens that
determine ``data.pkl``, so that a save repeating the previous one's layout is not
pickled again (:attr:`StagedTarget.layout`).

Threading: ``stage`` runs in the caller's thread (it must, to be consistent). Arenas are
handed out under a lock; one arena is never used by two pending snapshots.
"""

from __future__ import annotations

import collections
import copy
import copyreg
import io
import itertools
import operator
import pickle
import struct
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ._copier import CHUNK_COPIES, Copier, CopyBatch
from ._exceptions import StagingError
from ._gcpause import collector_paused
from ._layout import Layout, LayoutMemory
from ._pickle_emit import CPU as _CPU_TAG
from ._pickle_emit import STORAGE_TAG as _STORAGE_TAG
from ._pool import Allocator, Arena, ManyAllocator, StagedStorage, bytes_of
from ._switch import fast_switching
from ._tensorstate import metadata_of, set_metadata, set_state, state_of, storage_address

try:  # NumPy is optional.
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is installed with torch in practice
    _np = None  # type: ignore[assignment]

__all__ = ("StagedTarget", "Stager")

#: Values that are immutable and copied by reference, as copy.deepcopy does.
_ATOMIC: frozenset[type] = frozenset(
    {
        type(None),
        int,
        float,
        bool,
        complex,
        str,
        bytes,
        range,
        slice,
        type(Ellipsis),
        type(NotImplemented),
        torch.dtype,
        torch.device,
        torch.Size,
        torch.memory_format,
        torch.layout,
        torch.qscheme,
    }
)
#: Kept by reference too, but pickled by name: ``check_pickle`` proves the name resolves.
_BY_NAME: tuple[type, ...] = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.CodeType,
    weakref.ref,
    property,
)
#: A planned copy: destination, source.
_Copy = tuple[torch.Tensor, torch.Tensor]

# Layout tokens (see snapwriter._layout): markers that no user value can equal.
# Tokens are appended flat (markers followed by fields), so that a layout adds no
# objects for the collector to track beyond the list itself.
_DICT, _ODICT, _LIST, _TUPLE, _TENSOR, _REF, _TRUE, _FALSE = (object() for _ in range(8))
_STORAGE_NEW, _STORAGE_AGAIN, _CONJ_NEG = (object() for _ in range(3))
_pack_double = struct.Struct(">d").pack
#: Strings the serializer itself puts in data.pkl: a user string that is the very same
#: object pickles as a memo reference to it, so they open every layout's string list.
_SERIALIZER_STRINGS = (_STORAGE_TAG, _CPU_TAG)


@dataclass
class StagedTarget:
    """The result of staging one target.

    Attributes:
        value: the staged copy, ready to hand to ``savefun`` once :meth:`wait` returned.
        tensor_bytes: bytes of storage data copied into staging buffers.
        storages: how many storages were staged.
        seconds: wall time the call spent staging.
        device_tags: ``(staged storage, "cuda:N")`` for every storage staged from a
            CUDA tensor, for :func:`snapwriter._pool.device_tags` while writing.
        layout: makes (or, when the layout repeats the arena's previous save, already
            holds) ``data.pkl`` of ``value``; see :mod:`snapwriter._layout`.
    """

    value: Any
    tensor_bytes: int = 0
    storages: int = 0
    seconds: float = 0.0
    device_tags: list[tuple[torch.UntypedStorage, str]] = field(default_factory=list)
    layout: Layout | None = None
    _events: list[Any] = field(default_factory=list)
    _arena: Arena | None = None

    def wait(self) -> None:
        """Block until asynchronous device-to-host copies have finished.

        Call from a worker thread, never from an event loop.
        """
        for event in self._events:
            event.synchronize()
        self._events.clear()


class Stager:
    """Stages targets into reusable staging storages (one :class:`Arena` per pending save).

    Args:
        allocate: makes each staged storage (default: private host memory,
            :func:`~snapwriter._pool.allocate_host`); e.g. shared memory for a saving
            process.
        allocate_many: makes several at once, as ``allocate`` would each (default:
            ``allocate`` of each): the first save of a big state dict asks for a run of
            storages at a time.

    Attributes:
        allocations: how many staged storages were allocated so far; constant once the
            writer is warm and the layout of what it saves does not change.
    """

    def __init__(
        self, allocate: Allocator | None = None, allocate_many: ManyAllocator | None = None
    ) -> None:
        self._allocate = allocate
        self._allocate_many = allocate_many
        self._lock = threading.Lock()
        self._free: list[Arena] = []
        self._streams: dict[torch.device, Any] = {}
        self._copier = Copier()
        self._closed = False
        self.allocations = 0

    def stage(self, target: Any, *, check_pickle: bool = True) -> StagedTarget:
        """Copy ``target`` so later mutation of it cannot reach the snapshot.

        Args:
            target: any object ``torch.save`` accepts.
            check_pickle: prove at call time that every non-tensor object pickles (the
                save function is ``torch.save``), so one that cannot fails here.

        Returns:
            The staged copy; give it back with :meth:`release` once written.

        Raises:
            StagingError: an object in the target cannot be copied or pickled. The
                original exception is chained.
        """
        start = time.perf_counter()
        arena = self._take_arena()
        allocated_before = arena.allocations
        # a few Python objects per tensor, none of them garbage: no collector passes;
        # the copying thread takes the GIL between batches without a 5 ms wait
        with collector_paused(), fast_switching():
            batch = self._copier.batch()
            try:
                walk = _Walk(arena, check_pickle, batch)
                try:
                    value = walk.stage(target)
                except StagingError:
                    raise
                except RecursionError as exc:
                    raise StagingError("cannot stage target: it is nested too deeply") from exc
                except Exception as exc:
                    raise StagingError(f"cannot stage target: {type(exc).__name__}: {exc}") from exc
                try:
                    events = self._copy(batch, walk.device_copies, walk.copies)
                except Exception as exc:
                    raise StagingError(f"cannot copy tensors: {type(exc).__name__}: {exc}") from exc
                # Drop the walk's per-tensor bookkeeping before the collector is back on:
                # alive then, it would be moved to the old generation and make the next
                # full collection (a pass over every object of the process) come sooner.
                walk.copies = walk.device_copies = []
                memory = arena.layout
                if memory is None:
                    memory = arena.layout = LayoutMemory()
                slots = walk.storages.values()
                layout = memory.layout(walk.tokens, walk.strings, [slot.storage for slot in slots])
                walk.forget()
            except BaseException:
                batch.abandon()  # no copy still writing into the arena given back
                arena.finish()
                self.release_arena(arena)
                raise
        arena.finish(walk.storages, walk.runs)
        with self._lock:
            self.allocations += arena.allocations - allocated_before
        return StagedTarget(
            value=value,
            tensor_bytes=sum(slot.nbytes for slot in slots),
            storages=len(slots),
            seconds=time.perf_counter() - start,
            device_tags=walk.device_tags,
            layout=layout,
            _events=events,
            _arena=arena,
        )

    def release(self, staged: StagedTarget) -> None:
        """Give the staged storages back for reuse; the staged value must not be used after."""
        arena, staged._arena = staged._arena, None
        if arena is not None:
            self.release_arena(arena)

    def release_arena(self, arena: Arena) -> None:
        with self._lock:
            if not self._closed:
                self._free.append(arena)
                return
        arena.clear()

    def close(self) -> None:
        """Free all staging memory: idle arenas now, arenas still in use when released.

        Called by the writer's ``finalize()``/``aclose()``. A closed stager can still
        stage (it then allocates afresh and frees on release).
        """
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for arena in free:
            arena.clear()
        self._copier.close()

    def _take_arena(self) -> Arena:
        with self._lock:
            return self._free.pop() if self._free else Arena(self._allocate, self._allocate_many)

    def _copy(self, batch: CopyBatch, device_copies: list[_Copy], host: list[_Copy]) -> list[Any]:
        """Run the copies the walk planned and has not started; return the CUDA events
        to wait on.

        Host sources: batched ``torch._foreach_copy_`` calls shared between the caller
        and the copier's threads (:mod:`snapwriter._copier`), all finished on return.
        CUDA sources: a side stream per device, so the call returns before the copy
        finishes.
        """
        by_device: dict[torch.device, list[_Copy]] = {}
        for d, s in device_copies:
            by_device.setdefault(s.device, []).append((d, s))
        events: list[Any] = []
        try:
            with torch.no_grad():
                for device, pairs in by_device.items():
                    events.append(self._copy_from_device(device, pairs))
        finally:
            batch.finish(host)
        return events

    def _copy_from_device(
        self, device: torch.device, pairs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> Any:
        """Copy CUDA storages into pinned buffers on a side stream; return the event."""
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)  # the copy sees every kernel queued so far
        with torch.cuda.stream(stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                src.record_stream(stream)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        # Kernels the caller queues next (an optimizer step) wait for the copy on the GPU,
        # so they cannot tear it; the host does not wait.
        current.wait_stream(stream)
        return event


_MISSING = object()


class _Walk:
    """One staging pass over a target: a memoised copy of its object graph.

    ``memo`` maps ``id(original)`` to its copy and is also the memo handed to
    ``__deepcopy__`` methods, so objects they copy and objects this walk copies are
    shared; ``memo["torch"]`` maps source storages to staged ones for torch's own
    tensor ``__deepcopy__``, so a special tensor over a staged storage shares it too.
    """

    def __init__(self, arena: Arena, check_pickle: bool, batch: CopyBatch) -> None:
        self.arena = arena
        #: host copies started while the walk goes on (each CHUNK_COPIES planned)
        self.batch = batch
        #: copies from CUDA, made once the walk is over (on a side stream)
        self.device_copies: list[_Copy] = []
        self.check_pickle = check_pickle
        self.memo: dict[Any, Any] = {}
        self.keep: list[Any] = []  # originals whose ids are memo keys stay alive
        arena.generation += 1
        self.generation = arena.generation
        self.storages: dict[int, StagedStorage] = {}
        self.by_source = arena.by_source
        #: runs of dict items staged whole: the previous walk's, and this walk's
        self._last_runs: dict[int, _Run] = arena.runs
        self.runs: dict[int, _Run] = {}
        #: host copies planned and not started yet
        self.copies: list[_Copy] = []
        self.device_tags: list[tuple[torch.UntypedStorage, str]] = []
        self._torch_memo: dict[int, torch.UntypedStorage] = {}
        self.memo["torch"] = self._torch_memo
        #: the layout (snapwriter._layout): None once the graph holds anything else
        self.tokens: list[Any] | None = []
        self._first: dict[int, int] = {}  # id of a container/tuple/tensor -> its token
        #: every string met, in order (values are in the tokens; identities from these)
        self.strings: list[str] = list(_SERIALIZER_STRINGS)
        self._storage_index: dict[int, int] = {}  # staged storages, in staging order
        self._indexed = 0  # storages indexed so far (deferred ones included)
        #: runs' entries of _first and _storage_index, made only if ever looked up (a
        #: tensor or storage met again): (ids, first token, each tensor's first token
        #: from there, source storages, their first index)
        self._deferred: list[tuple[list[int], int, list[int], list[int], int]] = []

    def forget(self) -> None:
        """Drop what only the walk itself needed (memo, tokens, indexes)."""
        self.memo = {}
        self.keep = []
        self.tokens = None
        self._first = {}
        self.strings = []
        self._storage_index = {}
        self._deferred = []

    def stage(self, obj: Any) -> Any:
        """The staged copy of ``obj`` (memoised)."""
        cls = type(obj)
        if cls in _ATOMIC:
            if self.tokens is not None:
                self._atom(obj)
            return obj
        key = id(obj)
        done = self.memo.get(key, _MISSING)
        if done is not _MISSING:
            if self.tokens is not None:
                first = self._first_of(key)
                if first is None:
                    self.tokens = None
                else:
                    self.tokens += (_REF, first)
            return done
        copier = _DISPATCH.get(cls)
        if copier is not None:
            return copier(self, obj)
        self.tokens = None  # outside the fast serializer's graphs: no layout reuse
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if issubclass(cls, _BY_NAME):
            return self._by_name(obj)
        if _np is not None and cls is _np.ndarray and not obj.dtype.hasobject:
            return self._array(obj)
        return self._object(obj)

    # -- layout tokens (snapwriter._layout) -------------------------------------------

    def _first_of(self, key: int) -> int | None:
        """The first token of the container, tuple or tensor of id ``key``, if any."""
        return self._looked_up(self._first, key)

    def _index_of(self, cdata: int) -> int | None:
        """The staging index of the source storage ``cdata``, if staged."""
        return self._looked_up(self._storage_index, cdata)

    def _looked_up(self, table: dict[int, int], key: int) -> int | None:
        """``table[key]`` (``_first`` or ``_storage_index``), the deferred entries made
        first if it is not there yet; None if it is not there at all."""
        found = table.get(key)
        if found is None and self._deferred:
            self._undefer()
            found = table.get(key)
        return found

    def _undefer(self) -> None:
        """Make the runs' deferred entries of ``_first`` and ``_storage_index``."""
        for ids, start, firsts, addrs, at in self._deferred:
            self._first.update(zip(ids, map(start.__add__, firsts), strict=True))
            self._storage_index.update(zip(addrs, range(at, at + len(addrs)), strict=True))
        self._deferred = []

    def _atom(self, value: Any) -> None:
        """Append the token of an immutable value (switch tokens off for other kinds)."""
        tokens = self.tokens
        assert tokens is not None
        cls = type(value)
        if cls is str:
            tokens.append(value)
            self.strings.append(value)
        elif cls is int or value is None:
            tokens.append(value)
        elif cls is float:
            tokens.append(_pack_double(value))
        elif cls is bool:
            tokens.append(_TRUE if value else _FALSE)
        else:
            self.tokens = None

    def _open(self, marker: object, obj: Any) -> None:
        """Append the token of a container met for the first time."""
        tokens = self.tokens
        if tokens is not None:
            self._first[id(obj)] = len(tokens)
            tokens += (marker, len(obj))

    def _remember(self, original: Any, copied: Any) -> None:
        self.memo[id(original)] = copied
        self.keep.append(original)

    # -- containers ------------------------------------------------------------------

    def _dict(self, obj: dict[Any, Any]) -> dict[Any, Any]:
        """A plain dict: rebuilt key by key (memoised first, so it may contain itself)."""
        out: dict[Any, Any] = {}
        self._remember(obj, out)
        self._open(_DICT, obj)
        self._fill(out, obj)
        return out

    def _ordered_dict(self, obj: collections.OrderedDict[Any, Any]) -> Any:
        """An OrderedDict (a module's state_dict): what its pickle reduction rebuilds, an
        empty one with the instance's attributes (``_metadata``) and then the items."""
        out: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._remember(obj, out)
        self._open(_ODICT, obj)
        if self.tokens is not None:
            self.tokens.append(bool(obj.__dict__))
        if obj.__dict__:
            out.__dict__.update(self.stage(obj.__dict__))
        self._fill(out, obj)
        return out

    def _fill(self, out: dict[Any, Any], obj: dict[Any, Any]) -> None:
        """Put the staged items of ``obj`` into ``out``, in order (plain tensors, the
        common value, without a trip through :meth:`stage`).

        A big dict (a module's state_dict) is taken :data:`BULK_ITEMS` items at a time:
        a run of string keys and plain tensors is checked and staged by whole-list
        operations (:meth:`_bulk_repeat` when the previous save staged the same run,
        :meth:`_bulk_warm` when it saved its tensors, :meth:`_bulk_cold` in the arena's
        first save), any other run item by item.
        """
        if len(obj) < BULK_ITEMS:
            self._fill_items(out, obj.items())
            return
        bulk = self._bulk_warm if self.by_source else self._bulk_cold
        keys, values = list(obj), list(obj.values())
        for i in range(0, len(keys), BULK_ITEMS):
            ks, vs = keys[i : i + BULK_ITEMS], values[i : i + BULK_ITEMS]
            checked = self._bulk_run(ks, vs)
            if checked is None or not (
                self._bulk_repeat(out, ks, vs, *checked) or bulk(out, ks, vs, *checked)
            ):
                self._fill_items(out, zip(ks, vs, strict=True))

    def _bulk_run(
        self, keys: list[Any], values: list[Any]
    ) -> tuple[list[int], list[int], list[int]] | None:
        """What every bulk path (:meth:`_bulk_repeat`, :meth:`_bulk_warm`,
        :meth:`_bulk_cold`) needs of a run, checked once, or None: every key
        a string, every value a distinct plain dense CPU tensor or Parameter (the exact
        dispatch keys of one) without Python state and over a storage of its own, none
        of them reached before in this walk. Returns the values' ids, storage addresses
        and storage sizes."""
        if set(map(type, keys)) != _STR or not set(map(type, values)) <= _WARM_CLASSES:
            return None
        n = len(values)
        ids = list(map(id, values))
        if len(set(ids)) != n or not self.memo.keys().isdisjoint(ids):
            return None
        if not all(map(_PLAIN_CPU_KEYS.__eq__, map(_dispatch_keys, values))):
            return None
        addrs = list(map(storage_address, values))
        if (
            len(set(addrs)) != n
            or not self.storages.keys().isdisjoint(addrs)
            or any(map(_DICT_OF, values))
        ):
            return None
        nbytes = list(map(torch.UntypedStorage.nbytes, map(torch.Tensor.untyped_storage, values)))
        return ids, addrs, nbytes

    def _bulk_repeat(
        self,
        out: dict[Any, Any],
        keys: list[Any],
        values: list[Any],
        ids: list[int],
        addrs: list[int],
        nbytes: list[int],
    ) -> bool:
        """:meth:`_bulk_warm` of a run the previous walk staged whole (the same keys,
        over the same source storages, in the same order), all or nothing.

        Applies to a run :meth:`_bulk_run` accepted (``ids``, ``addrs`` and ``nbytes``
        are what it returned). The same checks as :meth:`_bulk_warm`, each one property
        of the whole run compared at once with what the previous walk recorded
        (:class:`_Run`); then the run's staged tensors, copy destinations and layout
        tokens are reused as they are. False, with nothing staged, when any check fails.
        """
        if self.tokens is None:
            return False
        run = self._last_runs.get(addrs[0])
        if run is None or run.addrs != addrs or run.keys != keys:
            return False
        classes, dtypes, offsets, sizes, strides, grads, storage_sizes = run.checks
        if (
            list(map(type, values)) != classes
            or list(map(_DTYPE_OF, values)) != dtypes
            or list(map(torch.Tensor.storage_offset, values)) != offsets
            or list(map(torch.Tensor.size, values)) != sizes
            or list(map(torch.Tensor.stride, values)) != strides
            or list(map(_REQUIRES_GRAD_OF, values)) != grads
            or nbytes != storage_sizes
            # the previous walk's staged storages for these (by_source: the run's slots),
            # free for this one
            or not self.arena.reclaim_all(run.slots)
        ):
            return False
        generation = self.generation
        for slot in run.slots:
            slot.view_generation = generation  # its view is taken for this walk
        self.storages.update(run.by_address)
        copies = self.copies
        copies.extend(zip(run.dsts, values, strict=True))
        if len(copies) >= CHUNK_COPIES:
            self._start_copies()
        tokens = self.tokens
        self._deferred.append((ids, len(tokens), run.firsts, addrs, self._indexed))
        self._indexed += len(addrs)
        tokens += run.tokens
        self.strings.extend(keys)
        self.memo.update(zip(ids, run.outs, strict=True))
        self.keep.extend(values)
        out.update(zip(keys, run.outs, strict=True))
        self.runs[addrs[0]] = run
        return True

    def _bulk_warm(
        self,
        out: dict[Any, Any],
        keys: list[Any],
        values: list[Any],
        ids: list[int],
        addrs: list[int],
        nbytes: list[int],
    ) -> bool:
        """:meth:`_warm` of a run of dict items at once, all or nothing.

        Applies to a run :meth:`_bulk_run` accepted (``ids``, ``addrs`` and ``nbytes``
        are what it returned) where :meth:`_warm` applies to every value. The same
        checks, as whole-list operations: False, with nothing staged, when any one fails.
        """
        found = list(map(self.by_source.get, addrs))
        if None in found:
            return False
        slots = cast("list[StagedStorage]", found)
        warms = list(map(_WARM_OF, slots))
        if None in warms:
            return False
        checks = zip(
            map(type, values),
            map(_DTYPE_OF, values),
            map(torch.Tensor.storage_offset, values),
            map(torch.Tensor.size, values),
            map(torch.Tensor.stride, values),
            map(_REQUIRES_GRAD_OF, values),
            nbytes,
            strict=True,
        )
        if list(checks) != list(map(_CHECK_OF, warms)) or not self.arena.reclaim_all(slots):
            return False
        # every check passed: stage the run as _warm does, item by item
        generation = self.generation
        for slot in slots:
            slot.view_generation = generation  # its view is taken for this walk
        outs = list(map(_OUT_OF, warms))
        dsts = list(map(_DST_OF, warms))
        self._commit_run(out, keys, values, ids, addrs, slots, outs, dsts, warms)
        return True

    def _bulk_cold(
        self,
        out: dict[Any, Any],
        keys: list[Any],
        values: list[Any],
        ids: list[int],
        addrs: list[int],
        nbytes: list[int],
    ) -> bool:
        """:meth:`_plain_tensor` of a run of dict items at once, in the arena's first save.

        Applies to a run :meth:`_bulk_run` accepted (``ids``, ``addrs`` and ``nbytes``
        are what it returned) whose tensors each cover their
        storage exactly (offset 0, contiguous, as many bytes as the storage): each gets
        a new staged storage of its size, a staged tensor over it with its class, size,
        stride and ``requires_grad``, and the warm record :meth:`_warm` repeats next
        time. False, with nothing staged, when any check fails.
        """
        if (
            any(map(torch.Tensor.storage_offset, values))
            or not all(map(torch.Tensor.is_contiguous, values))
            or list(map(_NBYTES_OF, values)) != nbytes
        ):
            return False
        tokens = self.tokens
        generation = self.generation
        slots = self.arena.take_many(nbytes)
        outs: list[torch.Tensor] = []
        dsts: list[torch.Tensor] = []
        empty = torch.empty
        for t, size_of, slot in zip(values, nbytes, slots, strict=True):
            cls = type(t)
            dtype, size, stride = t.dtype, t.size(), t.stride()
            geometry = (dtype, 0, size, stride)
            requires_grad = t.requires_grad
            dst = empty(0, dtype=dtype).set_(slot.storage, 0, size, stride)
            slot.view, slot.view_geometry, slot.view_generation = dst, geometry, generation
            slot.dense = geometry
            staged = _with_class(dst, cls, requires_grad)
            if tokens is None:
                slot.warm = None
            else:
                # its layout tokens as _tensor_token makes them: the tensor, then its
                # storage's record
                token = (_TENSOR, cls, dtype, 0, len(size), *size, *stride, requires_grad)
                token += (_STORAGE_NEW, size_of, None)
                slot.warm = _warm_record(cls, geometry, requires_grad, size_of, staged, dst, token)
            outs.append(staged)
            dsts.append(dst)
        warms = list(map(_WARM_OF, slots))
        self._commit_run(out, keys, values, ids, addrs, slots, outs, dsts, warms)
        return True

    def _commit_run(
        self,
        out: dict[Any, Any],
        keys: list[Any],
        values: list[Any],
        ids: list[int],
        addrs: list[int],
        slots: list[StagedStorage],
        outs: list[torch.Tensor],
        dsts: list[torch.Tensor],
        warms: list[Any],
    ) -> None:
        """Record a run :meth:`_bulk_warm` or :meth:`_bulk_cold` staged, as
        :meth:`_warm` records one tensor: its storages, copies (into ``dsts``), layout
        tokens (each item's key, then its tensor's, from its warm record in ``warms``)
        and memo entries; put its staged tensors ``outs`` into ``out``; keep the run
        (:class:`_Run`) for the next walk's :meth:`_bulk_repeat`."""
        self.storages.update(zip(addrs, slots, strict=True))
        copies = self.copies
        copies.extend(zip(dsts, values, strict=True))
        if len(copies) >= CHUNK_COPIES:
            self._start_copies()
        tokens = self.tokens
        if tokens is not None:
            # each tensor's first token, from the run's start: one more (its key's) each
            firsts = list(itertools.accumulate(map(_STEP_OF, warms), initial=1))
            firsts.pop()
            start = len(tokens)
            self._deferred.append((ids, start, firsts, addrs, self._indexed))
            self._indexed += len(addrs)
            toks = map(_TOKEN_OF, warms)
            tokens.extend(_flatten(_flatten(zip(zip(keys), toks, strict=True))))
            self.strings.extend(keys)
            checks = [list(check) for check in zip(*map(_CHECK_OF, warms), strict=True)]
            self.runs[addrs[0]] = _Run(
                keys, addrs, slots, checks, outs, dsts, tokens[start:], firsts
            )
        self.memo.update(zip(ids, outs, strict=True))
        self.keep.extend(values)
        out.update(zip(keys, outs, strict=True))

    def _fill_items(self, out: dict[Any, Any], items: Any) -> None:
        """:meth:`_fill` item by item."""
        stage, tensor, memo, atom = self.stage, self._cold_tensor, self.memo, self._atom
        warm = self._warm if self.by_source else None
        for k, v in items:
            # atomic keys and values bypass stage(), so their layout tokens are added
            # here (stage() and tensor() add their own)
            if type(k) in _ATOMIC:
                if self.tokens is not None:
                    atom(k)
            else:
                k = stage(k)
            vcls = type(v)
            if vcls in _ATOMIC:
                if self.tokens is not None:
                    atom(v)
                out[k] = v
            elif vcls is torch.Tensor and id(v) not in memo:
                staged = None if warm is None else warm(v)
                out[k] = tensor(v) if staged is None else staged
            else:
                out[k] = stage(v)

    def _list(self, obj: list[Any]) -> list[Any]:
        """A plain list: rebuilt item by item (memoised first, so it may contain itself)."""
        out: list[Any] = []
        self._remember(obj, out)
        self._open(_LIST, obj)
        stage = self.stage
        out.extend(stage(v) for v in obj)
        return out

    def _tuple(self, obj: tuple[Any, ...]) -> tuple[Any, ...]:
        """A tuple: kept when nothing in it changed, as deepcopy does (same identities)."""
        tokens = self.tokens
        if tokens is not None:
            first = self._first_of(id(obj))
            if first is not None:  # the same tuple again: pickle writes a memo reference
                tokens += (_REF, first)
                self.tokens = None  # its items were tokenised the first time
                try:
                    return self._tuple_items(obj)
                finally:
                    self.tokens = tokens
            self._open(_TUPLE, obj)
        return self._tuple_items(obj)

    def _tuple_items(self, obj: tuple[Any, ...]) -> tuple[Any, ...]:
        items = [self.stage(v) for v in obj]
        done = self.memo.get(id(obj), _MISSING)
        if done is not _MISSING:  # reached again through a cycle while copying its items
            return done  # type: ignore[no-any-return]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        out = tuple(items)
        self._remember(obj, out)
        return out

    def _set(self, obj: set[Any] | frozenset[Any]) -> set[Any] | frozenset[Any]:
        """A set: ``copy()`` of it (a frozenset: itself) when its items are unchanged by
        staging, which keeps its hash table and so the order pickle writes the items in;
        otherwise rebuilt from the staged items."""
        self.tokens = None  # the fast serializer does not take sets
        items = [self.stage(v) for v in obj]
        out: set[Any] | frozenset[Any]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            out = obj if type(obj) is frozenset else obj.copy()
        else:
            out = type(obj)(items)
        self._remember(obj, out)
        return out

    def _array(self, obj: Any) -> Any:
        """A NumPy array of plain values: ``copy(order="K")``, the layout pickle sees."""
        out = obj.copy(order="K")
        self._remember(obj, out)
        return out

    def _object(self, obj: Any) -> Any:
        """Any other object: its own ``__deepcopy__``, or rebuilt from its pickle reduction.

        The reduction is what pickle (and so torch.save) writes of the object, so the
        staged object pickles the same; its parts are staged by this walk.
        """
        cls = type(obj)
        deepcopy = getattr(obj, "__deepcopy__", None)
        if deepcopy is not None and not isinstance(obj, type):
            out = deepcopy(self.memo)
            self._remember(obj, out)
            if self.check_pickle:
                self._check_pickles(obj)
            return out
        reductor = copyreg.dispatch_table.get(cls)
        try:
            rv = reductor(obj) if reductor is not None else obj.__reduce_ex__(4)
        except Exception as exc:
            raise _unstageable(obj, "it does not pickle", exc) from exc
        if isinstance(rv, str):  # a global, pickled by name
            return self._by_name(obj)
        return self._reconstruct(obj, *rv)

    def _reconstruct(
        self,
        obj: Any,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        state: Any = None,
        listiter: Any = None,
        dictiter: Any = None,
        *_rest: Any,
    ) -> Any:
        """Mirror of :func:`copy._reconstruct` with this walk as the deep copier."""
        if self.check_pickle:
            self._check_pickles(func)
        out = func(*[self.stage(a) for a in args])
        self._remember(obj, out)
        if state is not None:
            state = self.stage(state)
            if hasattr(out, "__setstate__"):
                out.__setstate__(state)
            else:
                slotstate = None
                if isinstance(state, tuple) and len(state) == 2:
                    state, slotstate = state
                if state:
                    out.__dict__.update(state)
                if slotstate:
                    for k, v in slotstate.items():
                        setattr(out, k, v)
        if listiter is not None:
            for item in listiter:
                out.append(self.stage(item))
        if dictiter is not None:
            for k, v in dictiter:
                out[self.stage(k)] = self.stage(v)
        return out

    def _by_name(self, obj: Any) -> Any:
        """Functions, classes and the like: kept by reference; checked to pickle by name."""
        if self.check_pickle:
            self._check_pickles(obj)
        return obj

    def _check_pickles(self, obj: Any) -> None:
        try:
            _NullPickler().dump(obj)
        except Exception as exc:
            raise _unstageable(obj, "it does not pickle", exc) from exc

    # -- tensors ---------------------------------------------------------------------

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        if self.by_source:
            out = self._warm(t)
            if out is not None:
                return out
        return self._cold_tensor(t)

    def _cold_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """:meth:`_tensor` where the warm path (:meth:`_warm`) does not apply."""
        cls = type(t)
        if _dispatch_keys(t) == _PLAIN_CPU_KEYS:
            # dense strided CPU memory, neither quantized nor nested, no conj/neg bits
            if (
                cls is torch.Tensor
                or cls is torch.nn.Parameter
                or (_plain_subclass(cls) and _has_storage(t))
            ):
                return self._plain_tensor(t, cls, _NO_METADATA)
        elif (
            t.layout is torch.strided
            and not t.is_quantized
            and not t.is_nested
            and (t.is_cpu or t.is_cuda)
            and (cls is torch.Tensor or (_plain_subclass(cls) and _has_storage(t)))
        ):
            return self._plain_tensor(t, cls, metadata_of(t))
        if t.is_quantized and cls is torch.Tensor:
            return self._quantized_tensor(t)
        return self._special_tensor(t)

    def _plain_tensor(self, t: torch.Tensor, cls: type, metadata: dict[str, bool]) -> torch.Tensor:
        """Rebuilt over its staged storage with everything ``Tensor.__reduce_ex__`` saves:
        class, storage offset, size, stride, conj/neg bits, requires_grad, Python state.

        Written for tens of thousands of tensors: one method, each tensor property read
        once. Warm (the same source storages as the arena's previous save), a storage
        takes back its staged storage and the tensor built over it last time, and its
        copy is planned without another look at the source.
        """
        cdata = storage_address(t)
        slot = self.storages.get(cdata)
        previous = None if slot is not None else self.by_source.get(cdata)
        geometry = (t.dtype, t.storage_offset(), t.size(), t.stride())
        requires_grad = t.requires_grad
        new_storage = slot is None
        if slot is None:
            nbytes = t.untyped_storage().nbytes()
            # the dispatch-key path (no metadata object) has seen a CPU tensor already
            on_cuda = metadata is not _NO_METADATA and not t.is_cpu
            slot = previous
            if slot is None or not self.arena.take_back(slot, nbytes, on_cuda):
                slot = self.arena.take(nbytes, on_cuda)
            self.storages[cdata] = slot
        if metadata:
            out = slot.new_view(geometry)
            set_metadata(out, metadata)
        elif slot.view_geometry == geometry and slot.view_generation != self.generation:
            out = slot.view  # type: ignore[assignment]
            slot.view_generation = self.generation
        else:
            out = slot.new_view(geometry)
            slot.view, slot.view_geometry, slot.view_generation = out, geometry, self.generation
        if new_storage:
            if slot.dense == geometry and not metadata and not slot.pinned:
                self.copies.append((out, t))  # as planned last time: see _plan_copy
            else:
                self._plan_copy(slot, t, out, geometry, metadata)
            if len(self.copies) >= CHUNK_COPIES:
                self._start_copies()
        dst = out
        tokens = self.tokens
        start = -1 if tokens is None else len(tokens)
        if tokens is not None:
            self._tensor_token(t, cls, cdata, slot, new_storage, geometry, requires_grad, metadata)
        out = _with_class(out, cls, requires_grad)
        self.memo[id(t)] = out
        self.keep.append(t)
        state = None if cls is torch.Tensor and not t.__dict__ else state_of(t)
        if new_storage:
            # repeatable next time as is: see _warm
            slot.warm = (
                _warm_record(cls, geometry, requires_grad, slot.nbytes, out, dst, tokens[start:])
                if (
                    tokens is not None
                    and self.tokens is tokens
                    and metadata is _NO_METADATA
                    and slot.dense == geometry
                    and not slot.pinned
                    and not state
                    and (cls is torch.Tensor or cls is torch.nn.Parameter)
                )
                else None
            )
        if state:
            self.tokens = None  # tensors with attributes: torch.save writes those
            set_state(out, self.stage(state))
        return out

    def _warm(self, t: torch.Tensor) -> torch.Tensor | None:
        """The warm path of :meth:`_tensor`, for tens of thousands of tensors a save.

        Applies to ``t`` when it is a plain dense CPU tensor or Parameter (the exact
        dispatch keys of one), the first tensor of this walk over its source storage, and
        the first tensor over that storage in the previous walk was staged by the plain
        path (no Python state, no conj/neg bits, covering its storage exactly) with the
        same class, dtype, offset, size, stride and ``requires_grad``, over a storage of
        the same size, whose staged storage is still free. Then everything that walk
        built is reused: the staged tensor, its copy's destination and its layout
        tokens. Returns None (nothing done) otherwise: the plain path runs.
        """
        if _dispatch_keys(t) != _PLAIN_CPU_KEYS:
            return None
        cdata = storage_address(t)
        slot = self.by_source.get(cdata)
        if slot is None:
            return None
        warm = slot.warm
        if warm is None or cdata in self.storages:
            return None
        check, out, dst, token, _ = warm
        if (
            (
                type(t),
                t.dtype,
                t.storage_offset(),
                t.size(),
                t.stride(),
                t.requires_grad,
                t.untyped_storage().nbytes(),
            )
            != check
            or t.__dict__
            or not self.arena.reclaim(slot)
        ):
            return None
        self.storages[cdata] = slot
        slot.view_generation = self.generation  # its view is taken for this walk
        copies = self.copies
        copies.append((dst, t))
        if len(copies) >= CHUNK_COPIES:
            self._start_copies()
        tokens = self.tokens
        if tokens is not None:
            self._first[id(t)] = len(tokens)
            self._storage_index[cdata] = self._indexed
            self._indexed += 1
            tokens += token
        self.memo[id(t)] = out
        self.keep.append(t)
        return out  # type: ignore[no-any-return]

    def _tensor_token(
        self,
        t: torch.Tensor,
        cls: type,
        cdata: int,
        slot: StagedStorage,
        new_storage: bool,
        geometry: Any,
        requires_grad: bool,
        metadata: dict[str, bool],
    ) -> None:
        """Append the layout token of a plain tensor (switch tokens off for subclasses)."""
        tokens = self.tokens
        assert tokens is not None
        if cls is not torch.Tensor and cls is not torch.nn.Parameter:
            self.tokens = None
            return
        self._first[id(t)] = len(tokens)
        # flat: sizes and strides as ints, no tuple kept alive for the collector to track
        dtype, offset, size, stride = geometry
        tokens += (_TENSOR, cls, dtype, offset, len(size), *size, *stride, requires_grad)
        if new_storage:
            self._storage_index[cdata] = self._indexed
            self._indexed += 1
            # the storage's record: its size and the device pickled as its location
            device = t.device.index if slot.pinned else None
            tokens += (_STORAGE_NEW, slot.nbytes, device)
        else:
            index = self._index_of(cdata)
            if index is None:
                self.tokens = None
                return
            tokens += (_STORAGE_AGAIN, index)
        if metadata:
            tokens += (_CONJ_NEG, str(sorted(metadata.items())))

    def _start_copies(self) -> None:
        """Start the host copies planned so far (see :mod:`snapwriter._copier`)."""
        copies, self.copies = self.copies, []
        self.batch.start(copies)

    def _plan_copy(
        self,
        slot: StagedStorage,
        t: torch.Tensor,
        out: torch.Tensor,
        geometry: Any,
        metadata: dict[str, bool],
    ) -> None:
        """Plan the copy of a newly staged storage from the first tensor seen over it.

        A storage that tensor covers exactly (the usual case) is copied as that tensor,
        into ``out``, and the geometry is remembered on the slot (:attr:`StagedStorage.dense`);
        any other storage as raw bytes.
        """
        on_cuda = t.is_cuda
        copies = self.device_copies if on_cuda else self.copies
        if (
            geometry[1] == 0
            and not metadata
            and t.is_contiguous()
            and t.numel() * t.element_size() == slot.nbytes
        ):
            copies.append((out, t))
            slot.dense = geometry
        else:
            copies.append((slot.raw, bytes_of(t.untyped_storage())))
            slot.dense = None
        if on_cuda:
            self.device_tags.append((slot.storage, f"cuda:{t.device.index or 0}"))

    def _quantized_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``clone()`` keeps the quantizer: qscheme, scale(s), zero point(s) and axis.

        A clone is a dense copy; a quantized view whose storage it would not reproduce
        (an offset, a bigger storage, strides clone cannot keep) is copied by torch.save.
        """
        self.tokens = None  # torch.save writes quantized tensors
        out = t.clone(memory_format=torch.preserve_format)
        if (
            out.stride() != t.stride()
            or t.storage_offset() != 0
            or out.untyped_storage().nbytes() != t.untyped_storage().nbytes()
        ):
            out = _round_trip(t)
        self._remember(t, out)
        if t.__dict__:
            set_state(out, self.stage(state_of(t)))
        return out

    def _special_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Quantized, sparse, nested, wrapper subclasses, other devices, non-leaf tensors.

        torch's own ``__deepcopy__`` keeps quantization parameters, sparse indices and
        subclass state (and shares storages through the memo); where it refuses (nested
        tensors, non-leaf tensors requiring grad), ``torch.save`` itself copies the tensor.
        """
        self.tokens = None  # torch.save writes these
        # torch's __deepcopy__ of a tensor over a staged CPU storage reuses the copy
        for cdata, slot in self.storages.items():
            if slot.storage.device.type == "cpu":
                self._torch_memo[cdata] = slot.storage
        try:
            out = copy.deepcopy(t, self.memo)
        except Exception:
            out = _round_trip(t)
        self._remember(t, out)
        return out


_has_storage: Callable[[torch.Tensor], bool] = getattr(torch._C, "_has_storage")  # noqa: B009
_dispatch_keys: Callable[[torch.Tensor], Any] = getattr(torch._C, "_dispatch_keys")  # noqa: B009
#: The dispatch keys of a dense CPU tensor without conj/neg bits (any dtype, with or
#: without requires_grad, a view or not): one C call tells the common case apart.
_PLAIN_CPU_KEYS = _dispatch_keys(torch.empty(0))

#: How _Walk.stage copies each container and tensor type (functions of the walk, not
#: bound methods: a walk holding its own methods would be a reference cycle, and all
#: it references, tens of thousands of objects, would wait for a full collection).
_DISPATCH: dict[type, Callable[[_Walk, Any], Any]] = {
    dict: _Walk._dict,
    collections.OrderedDict: _Walk._ordered_dict,
    list: _Walk._list,
    tuple: _Walk._tuple,
    set: _Walk._set,
    frozenset: _Walk._set,
    torch.Tensor: _Walk._tensor,
    torch.nn.Parameter: _Walk._tensor,
}
_NO_METADATA: dict[str, bool] = {}


def _with_class(view: torch.Tensor, cls: type, requires_grad: bool) -> torch.Tensor:
    """The staged tensor over ``view``: of class ``cls`` (what Parameter.__new__ and
    torch's rebuild of a subclass do) with ``requires_grad``."""
    if cls is not torch.Tensor:
        return torch.Tensor._make_subclass(cls, view, requires_grad)
    return view.detach().requires_grad_(True) if requires_grad else view


def _warm_record(
    cls: type,
    geometry: Any,
    requires_grad: bool,
    nbytes: int,
    staged: torch.Tensor,
    dst: torch.Tensor,
    token: Any,
) -> tuple[Any, ...]:
    """The warm record of a storage (:attr:`StagedStorage.warm`) whose first tensor was
    staged as ``staged`` with its copy into ``dst``: what :meth:`_Walk._warm` checks
    (class, dtype, offset, size, stride, requires_grad, storage size), the staged
    tensor, the copy's destination, the tensor's layout tokens, and their number plus
    one (with its key's token, what a dict item adds)."""
    token = tuple(token)
    return ((cls, *geometry, requires_grad, nbytes), staged, dst, token, len(token) + 1)


class _Run:
    """A run of dict items staged whole (:meth:`_Walk._commit_run`), as the next walk's
    :meth:`_Walk._bulk_repeat` checks and reuses it.

    Attributes:
        keys: the items' keys.
        addrs: their tensors' source storages (addresses, distinct).
        slots: the staged storage of each.
        by_address: ``addrs`` -> ``slots``.
        checks: what the warm records check, one list per property over the run:
            classes, dtypes, offsets, sizes, strides, ``requires_grad`` and storage sizes.
        outs: the staged tensors; dsts: their copies' destinations.
        tokens: the run's layout tokens (each key, then its tensor's).
        firsts: each tensor's first token, counted from the run's first.
    """

    __slots__ = (
        "addrs",
        "by_address",
        "checks",
        "dsts",
        "firsts",
        "keys",
        "outs",
        "slots",
        "tokens",
    )

    def __init__(
        self,
        keys: list[str],
        addrs: list[int],
        slots: list[StagedStorage],
        checks: list[list[Any]],
        outs: list[torch.Tensor],
        dsts: list[torch.Tensor],
        tokens: list[Any],
        firsts: list[int],
    ) -> None:
        self.keys = keys
        self.addrs = addrs
        self.slots = slots
        self.by_address = dict(zip(addrs, slots, strict=True))
        self.checks = checks
        self.outs = outs
        self.dsts = dsts
        self.tokens = tokens
        self.firsts = firsts


#: Dicts from this many items on are staged in runs of this many (see _Walk._fill).
BULK_ITEMS = 256
_STR = frozenset({str})
_WARM_CLASSES = frozenset({torch.Tensor, torch.nn.Parameter})
_flatten = itertools.chain.from_iterable
# the fields of a tensor's warm record (StagedStorage.warm, made by _warm_record)
_CHECK_OF = operator.itemgetter(0)
_OUT_OF = operator.itemgetter(1)
_DST_OF = operator.itemgetter(2)
_TOKEN_OF = operator.itemgetter(3)
_STEP_OF = operator.itemgetter(4)
_WARM_OF = operator.attrgetter("warm")
_DTYPE_OF = operator.attrgetter("dtype")
_REQUIRES_GRAD_OF = operator.attrgetter("requires_grad")
_DICT_OF = operator.attrgetter("__dict__")
_NBYTES_OF = operator.attrgetter("nbytes")


def _plain_subclass(cls: type) -> bool:
    """A subclass whose instances are ordinary tensors with Python state (not wrappers)."""
    return getattr(cls, "__torch_dispatch__", None) is torch.Tensor.__torch_dispatch__


def _round_trip(t: torch.Tensor) -> torch.Tensor:
    """``torch.load(torch.save(t))`` in memory: torch's own serializer makes the copy."""
    buffer = io.BytesIO()
    torch.save(t, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        # torch's own loader of quantized tensors uses the TypedStorage it deprecates
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        out: torch.Tensor = torch.load(buffer, weights_only=False)
    return out


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)


class _NullPickler(pickle.Pickler):
    """Pickles into nothing, standing tensors and storages in by reference (no data)."""

    def __init__(self) -> None:
        super().__init__(_Discard(), protocol=pickle.HIGHEST_PROTOCOL)

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, (torch.Tensor, torch.UntypedStorage, torch.storage.TypedStorage)):
            return id(obj)
        return None


def _unstageable(obj: Any, why: str, exc: BaseException) -> StagingError:
    cls = type(obj)
    return StagingError(
        f"cannot stage an object of type {cls.__module__}.{cls.__qualname__}: "
        f"{why} ({type(exc).__name__}: {exc})"
    )
