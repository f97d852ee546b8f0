"""Staging memory: reusable per-storage buffers, and the device tags of staged storages.

Staging copies *storages*, one staged storage per original storage, so the file carries
one record per storage with that storage's size, exactly as :func:`torch.save` writes it.
The staged storages of one pending snapshot form an :class:`Arena`; when the snapshot is
written the arena goes back to the :class:`~snapwriter._staging.Stager`, and the next
snapshot takes its storages by size: a warm writer saving the same layout allocates
nothing. Storages an arena no longer needs are dropped at the end of the next staging,
so what staging holds is bounded by ``max_pending`` snapshots' worth of storages.

Storages staged from a CUDA tensor live in pinned host memory. So that the file records
the *source* device, as ``torch.save`` of the original tensor would, the write phase
registers those storages' device tags (:func:`device_tags`) with a tagger that
:mod:`torch.serialization` consults before its own ``cpu`` tagger.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.serialization

__all__ = (
    "Allocator",
    "Arena",
    "StagedStorage",
    "allocate_host",
    "bytes_of",
    "device_tag_of",
    "device_tags",
    "staged_device",
)

_Key = tuple[int, bool]  # (nbytes, pinned)
_Geometry = tuple[torch.dtype, Any, torch.Size, tuple[int, ...]]  # dtype, offset, size, stride


def bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over the whole of ``storage`` (on its device)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class StagedStorage:
    """One staged storage, with the tensors over it that the walk can reuse when warm.

    Attributes:
        storage: the staged storage (CPU, pinned for CUDA sources).
        nbytes: its size.
        raw: a flat ``uint8`` tensor over all of it (the destination of byte copies).
        pinned: whether it is page-locked (staged from a CUDA tensor).
        dense: the geometry of a tensor that covers the storage exactly, as found by
            the last copy planned into it (such a copy runs as a tensor copy).
        view, view_geometry, view_generation: the last plain tensor built over it, its
            (dtype, offset, size, stride) and the staging call that last handed it out.
    """

    __slots__ = (
        "_raw",
        "dense",
        "nbytes",
        "pinned",
        "storage",
        "view",
        "view_generation",
        "view_geometry",
        "warm",
    )

    def __init__(self, storage: torch.UntypedStorage, nbytes: int, pinned: bool = False) -> None:
        self.storage = storage
        self.nbytes = nbytes
        self.pinned = pinned
        self.dense: _Geometry | None = None
        self._raw: torch.Tensor | None = None
        self.view: torch.Tensor | None = None
        self.view_geometry: _Geometry | None = None
        self.view_generation = 0
        #: how the walk staged the first tensor over this storage last time, when a
        #: warm save may repeat it as is (see snapwriter._staging._Walk._warm)
        self.warm: tuple[Any, ...] | None = None

    @property
    def raw(self) -> torch.Tensor:
        """A flat ``uint8`` tensor over all of the storage (made when first needed: most
        storages are copied as the tensor that covers them)."""
        raw = self._raw
        if raw is None:
            raw = self._raw = bytes_of(self.storage)
        return raw

    def new_view(self, geometry: _Geometry) -> torch.Tensor:
        """A new plain tensor over the storage with ``geometry``."""
        dtype, offset, size, stride = geometry
        return torch.empty(0, dtype=dtype).set_(self.storage, offset, size, stride)


#: Makes one staged storage: ``allocate(nbytes, pinned)``.
Allocator = Callable[[int, bool], torch.UntypedStorage]
#: Makes several at once (the first save of a big state): ``allocate_many(sizes, pinned)``.
ManyAllocator = Callable[[list[int], bool], list[torch.UntypedStorage]]


def allocate_host(nbytes: int, pinned: bool) -> torch.UntypedStorage:
    """The default :data:`Allocator`: a private host storage of exactly ``nbytes``.

    Exactly sized: the whole storage is what torch.save writes. Uninitialised is fine:
    every byte is overwritten by the copy of its source storage. Pinned for CUDA sources.
    """
    storage = torch.UntypedStorage(nbytes, device="cpu")  # type: ignore[no-untyped-call]
    return storage.pin_memory() if pinned else storage


class Arena:
    """The staged storages of one pending snapshot, reused by a later one of the same sizes.

    Not thread-safe: one arena is used by one staging call at a time (the
    :class:`~snapwriter._staging.Stager` hands arenas out under its lock).

    Attributes:
        allocations: how many staged storages this arena has allocated so far.
        generation: incremented by every staging call that uses the arena.
    """

    def __init__(
        self, allocate: Allocator | None = None, allocate_many: ManyAllocator | None = None
    ) -> None:
        self._allocate = allocate or allocate_host
        self._allocate_many = allocate_many
        # by id: a given one is taken back in O(1) (the warm path, once per storage)
        self._spare: dict[int, StagedStorage] = {}
        self._used: dict[int, StagedStorage] = {}
        # the spare ones by (nbytes, pinned), built when a call first needs any one of a
        # size (not at all in a warm save); entries taken back since are skipped
        self._sized: dict[_Key, list[StagedStorage]] | None = None
        #: source storage (StorageImpl address) -> the staged storage it was copied into
        #: by the previous staging call: a warm save takes back the same one, with the
        #: tensors over it that the walk built last time.
        self.by_source: dict[int, StagedStorage] = {}
        #: the runs of dict items the previous staging call staged whole, by the address
        #: of their first source storage (snapwriter._staging._Run): a warm save of the
        #: same items checks and reuses each run at once.
        self.runs: dict[int, Any] = {}
        self.allocations = 0
        self.generation = 0
        #: the previous save's layout (a snapwriter._layout.LayoutMemory, set by the Stager)
        self.layout: Any = None

    def take(self, nbytes: int, pinned: bool) -> StagedStorage:
        """A staged storage of exactly ``nbytes`` bytes (pinned host memory if asked)."""
        sized = self._sized
        if sized is None:
            sized = self._sized = {}
            for staged in self._spare.values():
                key = (staged.nbytes, staged.pinned)
                bucket = sized.get(key)
                if bucket is None:
                    sized[key] = [staged]
                else:
                    bucket.append(staged)
        bucket = sized.get((nbytes, pinned))
        spare = self._spare
        while bucket:
            staged = bucket.pop()
            if spare.pop(id(staged), None) is not None:  # else taken back already
                self._used[id(staged)] = staged
                return staged
        staged = StagedStorage(self._allocate(nbytes, pinned), nbytes, pinned)
        self.allocations += 1
        self._used[id(staged)] = staged
        return staged

    def take_many(self, sizes: list[int]) -> list[StagedStorage]:
        """:meth:`take` of unpinned storages of each of ``sizes`` (spare ones first; the
        rest made by one call of the arena's ``allocate_many`` where it has one)."""
        if self._spare or self._allocate_many is None:
            return [self.take(nbytes, False) for nbytes in sizes]
        made = self._allocate_many(sizes, False)
        staged = list(map(StagedStorage, made, sizes))
        self.allocations += len(staged)
        self._used.update(zip(map(id, staged), staged, strict=True))
        return staged

    def take_back(self, staged: StagedStorage, nbytes: int, pinned: bool) -> bool:
        """Take ``staged`` (from :attr:`by_source`: the staged storage a source storage
        was copied into by the previous staging call) again, if it is still free and of
        the size and kind asked."""
        if staged.nbytes != nbytes or staged.pinned != pinned:
            return False
        return self.reclaim(staged)

    def reclaim(self, staged: StagedStorage) -> bool:
        """Take ``staged`` again if it is still free (the caller checked its size and
        kind); False when this call has taken it already or it is not this arena's."""
        if self._spare.pop(id(staged), None) is None:
            return False
        self._used[id(staged)] = staged
        return True

    def reclaim_all(self, staged: list[StagedStorage]) -> bool:
        """:meth:`reclaim` of every one of ``staged`` (distinct storages), all or none:
        False, with nothing taken, when any one is not free."""
        spare = self._spare
        keys = list(map(id, staged))
        if not all(map(spare.__contains__, keys)):
            return False
        self._used.update(zip(keys, map(spare.pop, keys), strict=True))
        return True

    def finish(
        self,
        by_source: dict[int, StagedStorage] | None = None,
        runs: dict[int, Any] | None = None,
    ) -> None:
        """End a staging call: storages it did not take are freed, the rest kept for
        reuse; ``by_source`` (source storage address -> staged storage) is remembered
        for :meth:`take_back`, and ``runs`` (:attr:`runs`: of this call, over storages of
        ``by_source``) for the next call."""
        self._spare, self._used, self._sized = self._used, {}, None
        self.by_source = by_source if by_source is not None else {}
        self.runs = runs if runs is not None and by_source is not None else {}

    def clear(self) -> None:
        """Drop every storage (the arena allocates afresh next time)."""
        self._spare.clear()
        self._used.clear()
        self._sized = None
        self.by_source = {}
        self.runs = {}


# -- device tags of staged storages -------------------------------------------------------

_tags: dict[int, str] = {}
_tags_lock = threading.Lock()


def staged_device(cdata: int) -> str | None:
    """The source device (``"cuda:0"``...) of the staged storage ``cdata`` (a storage's
    ``_cdata``) while it is being written, or None for any other storage."""
    return _tags.get(cdata) if _tags else None


def device_tag_of(storage: Any) -> str | None:
    """torch.serialization tagger: :func:`staged_device` of a (typed or untyped) storage."""
    untyped = getattr(storage, "_untyped_storage", storage)
    return staged_device(untyped._cdata)


def _no_restore(obj: Any, location: str) -> None:
    """Loading is left to torch's own deserializers (``cuda`` tags go to CUDA)."""
    return None


# Priority 1: consulted before torch's cpu tagger (10), so a pinned staged copy of a
# CUDA storage is recorded with its source device, as torch.save of the source would.
torch.serialization.register_package(1, device_tag_of, _no_restore)


@contextlib.contextmanager
def device_tags(pairs: list[tuple[torch.UntypedStorage, str]]) -> Iterator[None]:
    """Record each staged storage of ``pairs`` with its source device while writing."""
    if not pairs:
        yield
        return
    keys = [(storage._cdata, tag) for storage, tag in pairs]
    with _tags_lock:
        _tags.update(keys)
    try:
        yield
    finally:
        with _tags_lock:
            for cdata, _tag in keys:
                _tags.pop(cdata, None)
