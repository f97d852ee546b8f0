"""Staging: take a consistent copy of a target at call time.

After :meth:`Stager.stage` returns, the staged value shares no mutable state with the
caller's target: containers are rebuilt, tensors are copied into staging buffers, NumPy
arrays are copied and any other object is deep-copied (through pickle when the save
function is :func:`torch.save`, which also proves it will serialize).

Staging buffers are *arenas*: one flat buffer per dtype (pinned host memory for CUDA
sources) with every tensor a view into it. An arena is reused by the next call whose
tensors have the same dtypes and shapes, so a warm writer allocates nothing per snapshot.
Because the staged tensors of one dtype share a storage, :func:`torch.save` writes one
record per dtype instead of one per tensor, which is what makes states of tens of
thousands of small tensors fast to write. The file still loads with plain
:func:`torch.load`; loaded tensors of one dtype are views of one storage.

Threading: ``stage`` runs in the caller's thread (it must, to be consistent). Arenas are
handed out under a lock; one arena is never used by two pending snapshots.
"""

from __future__ import annotations

import copy
import gc
import pickle
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ._exceptions import StagingError

try:  # NumPy is optional.
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is installed with torch in practice
    _np = None  # type: ignore[assignment]

__all__ = ("StagedTarget", "Stager")

_ALIGN_BYTES = 64
_IMMUTABLE_LEAVES: tuple[type, ...] = (
    int,
    float,
    complex,
    bool,
    str,
    bytes,
    type(None),
    torch.dtype,
    torch.device,
    torch.Size,
    torch.memory_format,
    torch.layout,
    range,
    slice,
    type(Ellipsis),
)

_Signature = tuple[tuple[torch.dtype, tuple[int, ...], bool], ...]


@dataclass
class _Arena:
    """Reusable staging buffers for one layout of tensors."""

    signature: _Signature = ()
    views: list[torch.Tensor] = field(default_factory=list)
    flats: dict[tuple[torch.dtype, bool], torch.Tensor] = field(default_factory=dict)
    allocations: int = 0  # how many times a flat buffer was (re)allocated

    def fit(self, sig: _Signature) -> list[torch.Tensor]:
        """Return one view per entry of ``sig``, reusing buffers when they fit."""
        if sig == self.signature:
            return self.views
        offsets: list[int] = []
        totals: dict[tuple[torch.dtype, bool], int] = {}
        for dtype, shape, pinned in sig:
            key = (dtype, pinned)
            start = totals.get(key, 0)
            numel = 1
            for dim in shape:
                numel *= dim
            itemsize = torch.empty((), dtype=dtype).element_size()
            align = max(1, _ALIGN_BYTES // itemsize)
            offsets.append(start)
            totals[key] = start + -(-numel // align) * align
        flats: dict[tuple[torch.dtype, bool], torch.Tensor] = {}
        for key, total in totals.items():
            old = self.flats.get(key)
            if old is not None and old.numel() == max(total, 1):
                flats[key] = old
            else:
                # Exactly sized: the whole buffer is what torch.save writes, so a bigger
                # one would carry stale bytes of an earlier snapshot into this file.
                # Zeroed once per allocation: the alignment gaps never hold old memory.
                dtype, pinned = key
                flats[key] = torch.zeros(max(total, 1), dtype=dtype, pin_memory=pinned)
                self.allocations += 1
        views = []
        for (dtype, shape, pinned), start in zip(sig, offsets, strict=True):
            numel = 1
            for dim in shape:
                numel *= dim
            views.append(flats[(dtype, pinned)][start : start + numel].view(shape))
        self.signature, self.views, self.flats = sig, views, flats
        return views


@dataclass
class StagedTarget:
    """The result of staging one target.

    Attributes:
        value: the staged copy, ready to hand to ``savefun`` once :meth:`wait` returned.
        tensor_bytes: bytes of tensor data copied into staging buffers.
        seconds: wall time the call spent staging.
    """

    value: Any
    tensor_bytes: int = 0
    seconds: float = 0.0
    _events: list[Any] = field(default_factory=list)
    _arena: _Arena | None = None

    def wait(self) -> None:
        """Block until asynchronous device-to-host copies have finished.

        Call from a worker thread, never from an event loop.
        """
        for event in self._events:
            event.synchronize()
        self._events.clear()


class Stager:
    """Stages targets into reusable buffers (one :class:`_Arena` per pending snapshot).

    Attributes:
        allocations: how many flat staging buffers were allocated so far; constant
            once the writer is warm.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[_Arena] = []
        self._streams: dict[torch.device, Any] = {}
        self.allocations = 0

    def stage(self, target: Any, *, check_pickle: bool = True) -> StagedTarget:
        """Copy ``target`` so later mutation of it cannot reach the snapshot.

        Args:
            target: any nesting of dicts, lists, tuples, tensors, arrays and objects.
            check_pickle: copy other objects through :mod:`pickle`, so one that cannot
                be serialized fails here, at call time; otherwise deep-copy them.

        Raises:
            StagingError: an object in the target cannot be copied or pickled. The
                original exception is chained.
        """
        start = time.perf_counter()
        # Staging makes a few Python objects per tensor; with tens of thousands of tensors
        # the cyclic collector would run several full passes during the call. None of
        # these objects form cycles: pause it for the call.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._stage(target, check_pickle, start)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _stage(self, target: Any, check_pickle: bool, start: float) -> StagedTarget:
        tensors: list[torch.Tensor] = []
        seen: dict[int, int] = {}
        try:
            skeleton = _collect(target, tensors, seen, check_pickle)
        except StagingError:
            raise
        except Exception as exc:
            raise StagingError(f"cannot stage target: {type(exc).__name__}: {exc}") from exc
        arena = self._take_arena()
        staged: list[torch.Tensor] = []
        events: list[Any] = []
        try:
            staged, events = self._copy(tensors, arena)
        except Exception as exc:
            self.release_arena(arena)
            raise StagingError(f"cannot copy tensors: {type(exc).__name__}: {exc}") from exc
        value = _fill(skeleton, staged)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return StagedTarget(
            value=value,
            tensor_bytes=nbytes,
            seconds=time.perf_counter() - start,
            _events=events,
            _arena=arena,
        )

    def release(self, staged: StagedTarget) -> None:
        """Give the staged buffers back for reuse; the staged value must not be used after."""
        arena, staged._arena = staged._arena, None
        if arena is not None:
            self.release_arena(arena)

    def release_arena(self, arena: _Arena) -> None:
        with self._lock:
            self._free.append(arena)

    def _take_arena(self) -> _Arena:
        with self._lock:
            return self._free.pop() if self._free else _Arena()

    def _copy(
        self, tensors: list[torch.Tensor], arena: _Arena
    ) -> tuple[list[torch.Tensor], list[Any]]:
        """Copy ``tensors`` into the arena (plain tensors) or fresh clones (others).

        Written for tens of thousands of tensors: per-tensor work is list comprehensions
        and one batched ``torch._foreach_copy_``.
        """
        types = {type(t) for t in tensors}
        dtypes = [t.dtype for t in tensors]
        on_cuda = [t.is_cuda for t in tensors]
        all_plain = (
            types <= _PLAIN_TYPES
            and {t.layout for t in tensors} <= {torch.strided}
            and not (set(dtypes) & _QUANTIZED)
            and all(c or t.is_cpu for c, t in zip(on_cuda, tensors, strict=True))
        )
        if all_plain:
            plain = list(range(len(tensors)))
            special: dict[int, torch.Tensor] = {}
        else:
            plain = [i for i, t in enumerate(tensors) if _plain_tensor(t)]
            special = {i: t.detach().clone() for i, t in enumerate(tensors) if not _plain_tensor(t)}
        sig: _Signature = tuple(
            zip(
                [dtypes[i] for i in plain] if special else dtypes,
                [tensors[i].size() for i in plain],
                [on_cuda[i] for i in plain] if special else on_cuda,
                strict=True,
            )
        )
        before = arena.allocations
        views = arena.fit(sig)
        self.allocations += arena.allocations - before
        srcs = [tensors[i] for i in plain] if special else tensors
        events: list[Any] = []
        with torch.no_grad():
            if not any(on_cuda):
                if srcs:
                    torch._foreach_copy_(views, srcs)
            else:
                cpu_pairs = [(v, t) for v, t in zip(views, srcs, strict=True) if not t.is_cuda]
                if cpu_pairs:
                    torch._foreach_copy_([v for v, _ in cpu_pairs], [t for _, t in cpu_pairs])
                by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
                for v, t in zip(views, srcs, strict=True):
                    if t.is_cuda:
                        by_device.setdefault(t.device, []).append((v, t))
                for device, pairs in by_device.items():
                    events.append(self._copy_from_device(device, pairs))
        if not special and torch.nn.Parameter not in types:
            return list(views), events
        out: list[torch.Tensor] = []
        it = iter(views)
        for i, t in enumerate(tensors):
            staged = special[i] if i in special else next(it)
            if type(t) is torch.nn.Parameter:
                staged = torch.nn.Parameter(staged, requires_grad=t.requires_grad)
            out.append(staged)
        return out, events

    def _copy_from_device(
        self, device: torch.device, pairs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> Any:
        """Copy CUDA tensors into pinned buffers on a side stream; return the event."""
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)  # the copy sees every kernel queued so far
        with torch.cuda.stream(stream):
            for dst, src in pairs:
                dst.copy_(src.detach(), non_blocking=True)
                src.record_stream(stream)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        # Kernels the caller queues next (an optimizer step) wait for the copy on the GPU,
        # so they cannot tear it; the host does not wait.
        current.wait_stream(stream)
        return event


_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
_QUANTIZED = frozenset(
    getattr(torch, name)
    for name in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")
    if hasattr(torch, name)
)


def _plain_tensor(t: torch.Tensor) -> bool:
    """Whether ``t`` can be staged into a flat arena buffer (strided, CPU or CUDA)."""
    return (
        type(t) in _PLAIN_TYPES
        and t.layout == torch.strided
        and t.dtype not in _QUANTIZED
        and (t.is_cpu or t.is_cuda)
    )


class _Slot:
    """Placeholder for the n-th collected tensor inside a skeleton."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _collect(
    obj: Any, tensors: list[torch.Tensor], seen: dict[int, int], check_pickle: bool
) -> Any:
    """Rebuild containers with tensors replaced by slots; copy every other leaf."""
    cls = type(obj)
    if cls in _IMMUTABLE_LEAVES:
        return obj
    if cls in _PLAIN_TYPES or isinstance(obj, torch.Tensor):
        return _slot(obj, tensors, seen)
    if cls is dict:  # the hot path: a state_dict of many tensors
        out = {}
        for k, v in obj.items():
            vcls = type(v)
            if vcls in _PLAIN_TYPES:
                out[k] = _slot(v, tensors, seen)
            elif vcls in _IMMUTABLE_LEAVES:
                out[k] = v
            else:
                out[k] = _collect(v, tensors, seen, check_pickle)
        return out
    if isinstance(obj, dict):  # OrderedDict (with state_dict's _metadata), defaultdict...
        new = copy.copy(obj)
        for k, v in obj.items():
            new[k] = _collect(v, tensors, seen, check_pickle)
        return new
    if cls is list:
        return [_collect(v, tensors, seen, check_pickle) for v in obj]
    if cls is tuple:
        return tuple(_collect(v, tensors, seen, check_pickle) for v in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return cls(*(_collect(v, tensors, seen, check_pickle) for v in obj))
    if _np is not None and isinstance(obj, _np.ndarray):
        if obj.dtype.hasobject:
            return copy.deepcopy(obj)
        return obj.copy()
    if _np is not None and isinstance(obj, _np.generic):
        return obj
    if check_pickle:
        try:
            return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as exc:
            raise StagingError(
                f"cannot stage an object of type {cls.__module__}.{cls.__qualname__}: "
                f"it does not pickle ({type(exc).__name__}: {exc})"
            ) from exc
    try:
        return copy.deepcopy(obj)
    except Exception as exc:
        raise StagingError(
            f"cannot stage an object of type {cls.__module__}.{cls.__qualname__}: "
            f"it cannot be deep-copied ({type(exc).__name__}: {exc})"
        ) from exc


def _slot(t: torch.Tensor, tensors: list[torch.Tensor], seen: dict[int, int]) -> _Slot:
    index = seen.get(id(t))
    if index is None:
        index = seen[id(t)] = len(tensors)
        tensors.append(t)
    return _Slot(index)


def _fill(skeleton: Any, staged: list[torch.Tensor]) -> Any:
    """Replace slots in a skeleton by staged tensors (skeleton containers are ours)."""
    cls = type(skeleton)
    if cls is _Slot:
        return staged[skeleton.index]
    if cls in _IMMUTABLE_LEAVES:
        return skeleton
    if isinstance(skeleton, dict):
        for k, v in skeleton.items():
            if type(v) is _Slot:
                skeleton[k] = staged[v.index]
            elif type(v) not in _IMMUTABLE_LEAVES:
                skeleton[k] = _fill(v, staged)
        return skeleton
    if cls is list:
        for i, v in enumerate(skeleton):
            skeleton[i] = _fill(v, staged)
        return skeleton
    if cls is tuple:
        return tuple(_fill(v, staged) for v in skeleton)
    if isinstance(skeleton, tuple) and hasattr(skeleton, "_fields"):
        return cls(*(_fill(v, staged) for v in skeleton))
    return skeleton
