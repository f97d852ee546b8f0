"""Shared-memory staging for the saving process of the process writers.

:class:`SharedMemory` is a staging :data:`~snapwriter._pool.Allocator`: every staged
storage is carved out of a few large shared segments (anonymous ``memfd`` files mapped
in the trainer). A segment crosses to the saving process once, as one file descriptor,
when a save first refers to it; the child maps it and closes the descriptor, so neither
side holds a descriptor per tensor (the trainer keeps one per segment, to hand the
segments to a restarted child). A save then only names ``(segment, offset, nbytes)``
per storage, and the child reads them from its own mappings
(:class:`snapwriter._saver_child.Mappings`).

Sizing: segments grow in chunks of at least :data:`CHUNK_BYTES` (64 MiB), each new
chunk as large as everything reserved so far (at most :data:`MAX_CHUNK_BYTES`), so a
state of any size takes a handful of segments; a storage larger than a chunk gets a
segment of its own. Offsets are aligned to :data:`ALIGNMENT` bytes. A freed block (its
storage collected) is reused by the next allocation of the same aligned size; the
:class:`~snapwriter._pool.Arena` already reuses staged storages by size, so a warm
save of the same layout allocates nothing and sends no segment.

Lifetime: each storage holds a reference to its segment's mapping (through the
memoryview its memory comes from), so a mapping lives as long as any storage carved from it,
even after :meth:`SharedMemory.close` dropped the allocator's own references.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._pool import allocate_host

__all__ = ("ALIGNMENT", "CHUNK_BYTES", "Segment", "SharedMemory", "ShmStats")

ALIGNMENT = 64
CHUNK_BYTES = 64 << 20
MAX_CHUNK_BYTES = 1 << 30
_PAGE = mmap.PAGESIZE

#: Where one storage lives: (segment id, offset, nbytes); segment -1 for empty storages.
Location = tuple[int, int, int]


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass
class ShmStats:
    """Counters of one :class:`SharedMemory` (and of the saving process that uses it).

    Attributes:
        segments: segments created so far.
        reserved_bytes: their total size.
        blocks: storages carved so far (reused blocks included).
        segments_sent: segments handed to a saving process (again after a restart).
        private_blocks: storages staged in private memory because no segment could
            be made (their saves fail, naming the OS error).
    """

    segments: int = 0
    reserved_bytes: int = 0
    blocks: int = 0
    segments_sent: int = 0
    private_blocks: int = 0


class Segment:
    """One shared segment: its id, size, descriptor and mapping in this process."""

    __slots__ = ("_view", "address", "fd", "id", "mapping", "pinned", "size", "storage", "used")

    def __init__(self, seg_id: int, size: int) -> None:
        self.id = seg_id
        self.size = size
        self.fd = os.memfd_create(f"snapwriter-{seg_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mapping = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.used = 0
        self.pinned = False
        #: the whole mapping as one storage (blocks are slices of it) and its address
        self.storage, self._view = _storage_over(self.mapping, 0, size)
        self.address = self.storage.data_ptr()

    def carve(self, offset: int, nbytes: int) -> tuple[torch.UntypedStorage, Any]:
        """A storage of exactly ``nbytes`` at ``offset``, and the object whose death says
        the block's memory is free again: the storage itself (a slice of the segment's
        storage, which keeps it alive) where torch keeps a storage's Python object as
        long as its memory (:data:`_PRESERVED`), else the memoryview it is made from."""
        if _PRESERVED:
            storage = _slice(self.storage, slice(offset, offset + nbytes))
            return storage, storage
        return _storage_over(self.mapping, offset, nbytes)

    def pin(self) -> None:
        """Page-lock the mapping for CUDA copies (``cudaHostRegister``).

        Untested here (no GPU on the machines this was written on): best effort, a
        failure leaves the segment pageable, which only makes device copies slower.
        """
        if self.pinned or not torch.cuda.is_available():
            return
        with contextlib.suppress(Exception):
            ptr = ctypes.addressof(ctypes.c_char.from_buffer(self.mapping))
            torch.cuda.cudart().cudaHostRegister(ptr, self.size, 0)  # type: ignore[no-untyped-call]
            self.pinned = True

    def close_fd(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _block_freer(
    lock: threading.RLock,
    blocks: dict[int, weakref.ref[Any]],
    owners: dict[int, tuple[int, int, int, int]],
    free: dict[int, list[tuple[int, int]]],
    closed: list[bool],
) -> Callable[[weakref.ref[Any]], None]:
    """The weak-reference callback of :class:`SharedMemory`'s blocks: a block whose
    owner died goes back to the free list of its aligned size (unless closed)."""

    def on_free(ref: weakref.ref[Any]) -> None:
        with lock:
            owner = owners.pop(id(ref), None)
            if owner is None:
                return
            seg_id, offset, nbytes, ptr = owner
            if blocks.get(ptr) is ref:
                del blocks[ptr]
            if not closed[0]:
                free.setdefault(_round_up(nbytes, ALIGNMENT), []).append((seg_id, offset))

    return on_free


def _storage_over(
    mapping: mmap.mmap, offset: int, nbytes: int
) -> tuple[torch.UntypedStorage, memoryview]:
    """An ``UntypedStorage`` of exactly ``nbytes`` over ``mapping[offset:]``, and the
    memoryview that owns it (the storage keeps the view until its memory is freed, the
    view keeps the mapping). No NumPy: it is not one of snapwriter's dependencies."""
    view = memoryview(mapping)[offset : offset + nbytes]
    return torch.frombuffer(view, dtype=torch.uint8).untyped_storage(), view


def _storage_objects_preserved() -> bool:
    """Whether a storage's Python object lives exactly as long as its memory (torch
    keeps it while any tensor uses the storage, and drops it with the last one): then a
    weak reference to a staged storage says when its block is free."""
    died: list[bool] = []
    base = torch.UntypedStorage(64)  # type: ignore[no-untyped-call]
    block = base[16:32]
    ref = weakref.ref(block, lambda _ref: died.append(True))
    tensor = torch.empty(0, dtype=torch.uint8).set_(block)
    del block
    alive = ref() is not None and not died
    same = tensor.untyped_storage() is ref()
    del tensor
    return alive and same and bool(died) and ref() is None


#: See :func:`_storage_objects_preserved` (checked once, at import).
_PRESERVED = _storage_objects_preserved()
#: A slice of a CPU storage: torch's own, without the Python wrapper's check for
#: storages on the meta device (a third of the cost).
_slice: Callable[[torch.UntypedStorage, slice], torch.UntypedStorage] = getattr(  # noqa: B009
    torch._C.StorageBase, "__getitem__"
)


class SharedMemory:
    """A staging allocator over shared segments (see the module docstring).

    Thread-safe: staging allocates in the caller's thread while a save describes its
    storages in the writer's loop thread; blocks are freed from whichever thread drops
    a storage's last reference.
    """

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._chunk = chunk_bytes
        self._lock = threading.RLock()
        self._segments: dict[int, Segment] = {}
        self._current: Segment | None = None
        self._free: dict[int, list[tuple[int, int]]] = {}  # aligned size -> [(seg, off)]
        # live blocks: data_ptr -> the weak reference (to the block's owner) that frees
        # it, and id(that reference) -> (segment, offset, nbytes, data_ptr)
        self._blocks: dict[int, weakref.ref[Any]] = {}
        self._owners: dict[int, tuple[int, int, int, int]] = {}
        self._closed: list[bool] = [False]  # shared with the freeing callback
        # one callback for every block (not a closure per block: with tens of thousands
        # of blocks, their cells and functions would be most of the objects a cold save
        # makes for the collector)
        self._on_free = _block_freer(
            self._lock, self._blocks, self._owners, self._free, self._closed
        )
        self.stats = ShmStats()

    def allocate(self, nbytes: int, pinned: bool = False) -> torch.UntypedStorage:
        """The :data:`~snapwriter._pool.Allocator`: a storage of exactly ``nbytes`` in a
        shared segment (page-locked segments for CUDA sources, when CUDA is there).

        Where no segment can be made (``RLIMIT_FSIZE``, a full ``/dev/shm``...), private
        memory: staging succeeds and the save then fails naming the OS error
        (:meth:`copy_in` raises it), as a write error of its file.
        """
        try:
            return self._allocate_shared(nbytes, pinned)
        except OSError:
            with self._lock:
                self.stats.private_blocks += 1
            return allocate_host(nbytes, pinned)

    def allocate_many(self, sizes: list[int], pinned: bool = False) -> list[torch.UntypedStorage]:
        """:meth:`allocate` of each of ``sizes``, under one lock (the
        :data:`~snapwriter._pool.ManyAllocator` of the first save of a big state)."""
        try:
            with self._lock:
                return [self._allocate_locked(nbytes, pinned) for nbytes in sizes]
        except OSError:  # no segment to be had: each one as allocate() makes it
            return [self.allocate(nbytes, pinned) for nbytes in sizes]

    def _allocate_shared(self, nbytes: int, pinned: bool) -> torch.UntypedStorage:
        with self._lock:
            return self._allocate_locked(nbytes, pinned)

    def _allocate_locked(self, nbytes: int, pinned: bool) -> torch.UntypedStorage:
        if nbytes == 0:
            return torch.UntypedStorage(0)  # type: ignore[no-untyped-call]
        if self._closed[0]:  # a staging call racing finalize(): private memory
            return allocate_host(nbytes, pinned)
        segment, offset = self._block(_round_up(nbytes, ALIGNMENT))
        if pinned:
            segment.pin()
        storage, owner = segment.carve(offset, nbytes)
        ptr = segment.address + offset
        # the block goes back to the free list when the storage is gone; a plain weak
        # reference (not weakref.finalize: twice the cost, 50,000 times)
        ref = weakref.ref(owner, self._on_free)
        self._blocks[ptr] = ref
        self._owners[id(ref)] = (segment.id, offset, nbytes, ptr)
        self.stats.blocks += 1
        return storage

    def _block(self, size: int) -> tuple[Segment, int]:
        spare = self._free.get(size)
        if spare:
            seg_id, offset = spare.pop()
            return self._segments[seg_id], offset
        current = self._current
        if current is not None and current.used + size <= current.size:
            offset = current.used
            current.used += size
            return current, offset
        chunk = min(max(self._chunk, self.stats.reserved_bytes), MAX_CHUNK_BYTES)
        if size > chunk:  # a storage larger than a chunk: a segment of its own
            segment = self._new_segment(_round_up(size, _PAGE))
            segment.used = size
            return segment, 0
        try:
            segment = self._new_segment(chunk)
        except OSError:  # a limit below a chunk: just the block, in a segment of its own
            segment = self._new_segment(_round_up(size, _PAGE))
            segment.used = size
            return segment, 0
        self._current = segment
        segment.used = size
        return segment, 0

    def _new_segment(self, size: int) -> Segment:
        segment = Segment(len(self._segments), size)
        self._segments[segment.id] = segment
        self.stats.segments += 1
        self.stats.reserved_bytes += size
        return segment

    def locate(self, storage: torch.UntypedStorage) -> Location | None:
        """Where ``storage`` lives, or None when it is not one of this allocator's (of
        another allocator, or a view into one of its blocks other than the whole)."""
        nbytes = storage.nbytes()
        if nbytes == 0:
            return (-1, 0, 0)
        # no lock (once a storage, on the hot path of every cold save): a block freed
        # meanwhile has no owner left, and ``ref`` held here keeps its id from reuse
        ref = self._blocks.get(storage.data_ptr())
        owner = None if ref is None else self._owners.get(id(ref))
        if owner is None or owner[2] != nbytes:
            return None
        return owner[:3]

    def copy_in(self, storage: torch.UntypedStorage) -> tuple[torch.UntypedStorage, Location]:
        """A shared copy of ``storage`` (one this allocator does not hold) and its place.
        Keep the copy alive until the save that names it is written."""
        nbytes = storage.nbytes()
        copy = self._allocate_shared(nbytes, False)  # OSError: no shared memory to be had
        if nbytes:
            copy.copy_(storage)  # a device storage: copied to host
        where = self.locate(copy)
        if where is None:
            raise RuntimeError("the writer's shared memory was released (writer finalized)")
        return copy, where

    def segment(self, seg_id: int) -> Segment:
        """The segment ``seg_id``."""
        with self._lock:
            return self._segments[seg_id]

    def close(self) -> None:
        """Drop the allocator's segments: close their descriptors, forget their mappings
        (a mapping goes when the last storage carved from it goes). Idempotent."""
        with self._lock:
            self._closed[0] = True
            segments = list(self._segments.values())
            self._segments.clear()
            self._free.clear()
            self._current = None
        for segment in segments:
            segment.close_fd()
