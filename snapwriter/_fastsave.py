"""A faster :func:`torch.save` that writes the very same file.

``torch.save`` spends most of its time, for states of many tensors, in Python code run
per tensor (``Tensor.__reduce_ex__``, typed-storage wrappers, a ``persistent_id`` call
per pickled object, the device-tagger registry), holding the GIL all along.
:func:`fast_torch_save` writes the same ``data.pkl`` in one of two tiers, then the
archive, record by record in torch.save's order (see :func:`write_records` for which
zip writer writes it):

1. :func:`snapwriter._pickle_emit.emit` writes the pickle opcodes itself, with no
   :class:`pickle.Pickler`, for graphs made only of exact ``dict``, ``OrderedDict``,
   ``list``, ``tuple``, ``str``, ``int``, ``float``, ``bool``, ``None`` and the tensors
   below (a few microseconds a tensor);
2. otherwise a :class:`pickle.Pickler` with a lean reducer for those tensors pickles any
   other object graph (other objects reduced as pickle always does).

**What is byte-identical.** For every object either tier accepts, the file is byte for
byte the file ``torch.save(obj, f)`` writes (checked by the differential tests in
``tests/fidelity`` and ``tests/test_pickle_emit.py``). Both accept graphs whose tensors
are all

- plain ``torch.Tensor`` objects with no Python attributes, strided, on the CPU, of a
  dtype with a legacy typed storage (every dtype but the ``float8``/``uint16``-``uint64``/
  ``bits`` family), conjugate and negative bits included, ``requires_grad`` either way; or
- ``nn.Parameter`` objects with no Python attributes over such data,

and that hold no raw storage. Storages staged from CUDA tensors (pinned host copies)
are recorded with their source device, as ``torch.save`` of the source does; those files
load the same but are not byte-identical (torch's tagger makes a new device string per
reference, which pickle then cannot share).

**What falls back.** The first tier gives up on any other object (sets, custom classes,
subclasses of the built-in types, numpy arrays, ``torch.Size``...) and the second tier
runs. Anything the second cannot do — tensor subclasses, tensors with attributes,
quantized, sparse, nested, meta or non-CPU tensors, ``float8`` and other v3 dtypes, raw
storages, views of one storage under two dtypes — makes it call ``torch.save`` for the
whole object, before a byte is written.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import io
import os
import pickle
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import torch
import torch.serialization
import torch.utils.serialization

from ._gcpause import collector_paused
from ._pickle_emit import CHECK_EVERY as _CHECK_EVERY
from ._pickle_emit import CPU as _CPU
from ._pickle_emit import REBUILD_PARAMETER as _REBUILD_PARAMETER
from ._pickle_emit import REBUILD_TENSOR as _REBUILD_TENSOR
from ._pickle_emit import STORAGE_TAG as _STORAGE_TAG
from ._pickle_emit import STORAGE_TYPES as _STORAGE_TYPES
from ._pickle_emit import YIELD_SECONDS as _YIELD_SECONDS
from ._pickle_emit import emit
from ._pool import staged_device
from ._tensorstate import metadata_of
from ._ziparchive import (
    SERIALIZATION_ID,
    ArchivePlan,
    ArchiveSkeleton,
    fits,
    head_records,
    read_record,
)
from ._ziparchive import write_archive as write_pure

if TYPE_CHECKING:
    from ._layout import Layout

__all__ = (
    "ArchiveRecords",
    "Pickled",
    "SaveOptions",
    "archive_plan",
    "archive_records",
    "fast_torch_save",
    "pickle_state",
    "pure_archives",
    "save_and_measure",
    "save_options",
    "using_save_options",
    "write_archive",
    "write_records",
)

_PROTOCOL = 2  # torch.save's default


class _Fallback(Exception):
    """Raised while pickling when ``torch.save`` must do the job."""


class _StorageRef:
    """Stands for one storage in the pickle stream (turned into its persistent id)."""

    __slots__ = ("key", "location", "numel", "storage_type")

    def __init__(self, storage_type: Any, key: str, location: str, numel: int) -> None:
        self.storage_type = storage_type
        self.key = key
        self.location = location
        self.numel = numel


class _EmptyHooks:
    """Pickles as ``collections.OrderedDict()``, the empty hook table torch.save writes
    per tensor, without OrderedDict's own (slower) reduction. One per tensor, as
    torch.save makes one per tensor: a shared one would be memoised, changing bytes."""

    __slots__ = ()


_EMPTY_HOOKS_REDUCED = (collections.OrderedDict, ())


class _Pickler(pickle.Pickler):
    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self._count = 0
        self._yielded = time.perf_counter()
        self.storages: dict[str, torch.UntypedStorage] = {}
        self._refs: dict[int, tuple[_StorageRef, torch.dtype]] = {}
        self._dtypes: dict[int, torch.dtype] = {}  # by data pointer, as torch.save checks

    def persistent_id(self, obj: Any) -> Any:
        # called for every object pickled: keep it to one type check
        if type(obj) is _StorageRef:
            # a new tuple per reference, as torch.save makes: pickle memoises tuples, so
            # handing back one shared tuple would change the bytes of data.pkl
            return (_STORAGE_TAG, obj.storage_type, obj.key, obj.location, obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if cls is torch.Tensor:
            return self._reduce_tensor(obj)
        if cls is _EmptyHooks:
            return _EMPTY_HOOKS_REDUCED
        if isinstance(obj, (torch.UntypedStorage, torch.storage.TypedStorage)):
            raise _Fallback("raw storage")
        if cls is torch.nn.Parameter:
            # Parameter.__reduce_ex__ of a Parameter with no Python state
            if obj.__dict__:
                raise _Fallback("parameter with attributes")
            return (
                _REBUILD_PARAMETER,
                (obj.data, obj.requires_grad, _EmptyHooks()),
            )
        if isinstance(obj, torch.Tensor):
            raise _Fallback("tensor subclass")
        return NotImplemented

    def _reduce_tensor(self, t: torch.Tensor) -> Any:
        """Tensor.__reduce_ex__ of a plain strided CPU tensor with no Python state."""
        if (
            not t.is_cpu
            or t.layout is not torch.strided
            or t.is_nested
            or t.is_quantized
            or t.dtype not in _STORAGE_TYPES
            or t.__dict__
        ):
            raise _Fallback("tensor that torch.save treats specially")
        self._count += 1
        if self._count % _CHECK_EVERY == 0:
            now = time.perf_counter()
            if now - self._yielded >= _YIELD_SECONDS:
                # Pickling runs under the GIL. Left alone, this thread keeps it for
                # whole switch intervals (5 ms) and a training loop that releases it in
                # every torch op waits that long each time; a short sleep hands it over.
                time.sleep(0)
                self._yielded = time.perf_counter()
        args: tuple[Any, ...] = (
            self._ref(t),
            t.storage_offset(),
            tuple(t.size()),
            t.stride(),
            t.requires_grad,
            _EmptyHooks(),  # backward hooks: never saved, as torch.save does
        )
        metadata = metadata_of(t)
        if metadata:
            args = (*args, metadata)
        return (_REBUILD_TENSOR, args)

    def _ref(self, t: torch.Tensor) -> _StorageRef:
        storage = t.untyped_storage()
        cdata = storage._cdata
        known = self._refs.get(cdata)
        if known is not None:
            ref, dtype = known
            if dtype is not t.dtype:
                raise _Fallback("views of one storage with different dtypes")
            return ref
        ptr = storage.data_ptr()
        if ptr:
            seen = self._dtypes.setdefault(ptr, t.dtype)
            if seen is not t.dtype:
                raise _Fallback("views of one memory with different dtypes")
        key = str(len(self._refs))
        location = staged_device(cdata) or _CPU
        numel = storage.nbytes() // t.element_size()
        ref = _StorageRef(_STORAGE_TYPES[t.dtype], key, location, numel)
        self._refs[cdata] = (ref, t.dtype)
        self.storages[key] = storage
        return ref


@dataclass(frozen=True)
class Pickled:
    """An object graph as torch.save lays it out: ``data.pkl`` and its storage records.

    Attributes:
        data: the bytes of the ``data.pkl`` record.
        storages: ``(key, storage)`` for every ``data/<key>`` record, in file order.
    """

    data: bytes
    storages: list[tuple[str, torch.UntypedStorage]]

    @functools.cached_property
    def archive(self) -> ArchiveRecords:
        """Its records as torch.save writes them, prepared once: a warm save that reuses
        this object (:mod:`snapwriter._layout`) writes them without any work per record."""
        return ArchiveRecords(archive_records(self.data, self.storages))

    @functools.cached_property
    def storage_nbytes(self) -> int:
        """The bytes of its storage records."""
        return sum(storage.nbytes() for _, storage in self.storages)


def pickle_state(obj: Any) -> Pickled | None:
    """Pickle ``obj`` as torch.save does, or ``None`` when only torch.save can.

    ``None`` for anything outside the fast path (see the module docstring). Holds the
    GIL while it runs (handing it over every few milliseconds).
    """
    emitted = emit(obj)  # plain containers, scalars and tensors: no Pickler at all
    if emitted is not None:
        return Pickled(*emitted)
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    try:
        pickler.dump(obj)
    except _Fallback:
        return None
    return Pickled(buffer.getvalue(), list(pickler.storages.items()))


def archive_records(data: bytes, storages: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The records torch.save writes, in its order, for ``data.pkl``'s bytes and the
    ``(key, storage)`` pairs (storages, or anything standing for them)."""
    records = head_records(data, torch.serialization._get_storage_alignment())
    records += [(f"data/{key}", storage) for key, storage in storages]
    return records


def write_archive(f: IO[bytes], pickled: Pickled) -> None:
    """Write the zip archive torch.save writes for ``pickled`` into the binary file ``f``.

    Records in torch.save's order (see :func:`write_records`); storage bytes are
    written and checksummed without holding the GIL.
    """
    with collector_paused():  # tens of thousands of new objects, none of them garbage
        archive = pickled.archive
    _write_prepared(f, archive)


# -- torch.save's options -------------------------------------------------------------------

#: torch.save's own options that change its bytes: (compute CRC-32s, storage alignment).
#: torch keeps them per thread, so a save records the caller's and writes under them.
SaveOptions = tuple[bool, int]


def save_options() -> SaveOptions:
    """This thread's torch.save options (``torch.serialization.set_crc32_options``,
    ``torch.utils.serialization.config.save.storage_alignment``)."""
    return (
        bool(torch.serialization.get_crc32_options()),
        int(torch.serialization._get_storage_alignment()),
    )


@contextlib.contextmanager
def using_save_options(options: SaveOptions) -> Iterator[None]:
    """Run the block with ``options`` as this thread's torch.save options."""
    config = torch.utils.serialization.config.save
    before = (config.compute_crc32, config.storage_alignment)
    config.compute_crc32, config.storage_alignment = options
    try:
        yield
    finally:
        config.compute_crc32, config.storage_alignment = before


# -- the archive without torch (the saving process) ---------------------------------------

_plans: collections.OrderedDict[Any, ArchivePlan] = collections.OrderedDict()
_plans_lock = threading.Lock()
_PLANS_KEPT = 8


def archive_plan(names: list[str], *, key: Any = None) -> ArchivePlan:
    """What :func:`snapwriter._ziparchive.write_archive` needs from torch to write the
    archive of records named ``names`` (in order) as torch's own writer does: read from
    torch's writer itself, which writes the records empty into a scratch file (a few
    microseconds a record; the last :data:`_PLANS_KEPT` plans are kept, under ``key``
    when given, else under the names).

    Threading: safe from any thread.
    """
    alignment = torch.serialization._get_storage_alignment()
    cache_key = (alignment, key if key is not None else tuple(names))
    with _plans_lock:
        plan = _plans.get(cache_key)
        if plan is not None:
            _plans.move_to_end(cache_key)
            return plan
    empty: list[tuple[str, bytes | torch.UntypedStorage]] = [(name, b"") for name in names]
    try:
        with tempfile.TemporaryDirectory(prefix="snapwriter-plan-") as directory:
            path = os.path.join(directory, "archive")
            _write_with(_file_writer(path), empty, [0] * len(names))
            with open(path, "rb") as f:
                scratch = f.read()
    except (OSError, RuntimeError):
        # no room in the temporary directory (or a file-size limit): the same archive
        # through a file object in memory (torch's writer then calls back per piece)
        buffer = io.BytesIO()
        _write_with(_file_writer(buffer), empty, [0] * len(names))
        scratch = buffer.getvalue()
    version = read_record(scratch, "version") if "version" not in names else b""
    ident = read_record(scratch, SERIALIZATION_ID).decode()
    plan = ArchivePlan("archive", alignment, version, int(ident[:20]))
    with _plans_lock:
        _plans[cache_key] = plan
        while len(_plans) > _PLANS_KEPT:
            _plans.popitem(last=False)
    return plan


_pure: bool | None = None


def pure_archives() -> bool:
    """Whether :mod:`snapwriter._ziparchive` writes this torch's archives byte for byte
    (checked once, on a probe state, against ``torch.save`` with its default options;
    False where torch's format has changed from the one it follows)."""
    global _pure
    if _pure is None:
        probe: dict[str, Any] = {
            "w": torch.arange(70, dtype=torch.float32).view(7, 10),
            "b": [torch.zeros(0), torch.ones(3, dtype=torch.int64)[1:], 1.5],
        }
        probe["v"] = probe["w"][2:]
        expected = io.BytesIO()
        ours = io.BytesIO()
        with using_save_options((True, 64)):
            torch.save(probe, expected)
            pickled = pickle_state(probe)
            if pickled is not None:
                records = archive_records(
                    pickled.data, [(k, _view(s)) for k, s in pickled.storages]
                )
                names = [name for name, _ in records]
                write_pure(ours, records, archive_plan(names, key=("probe", len(names))))
        _pure = pickled is not None and ours.getvalue() == expected.getvalue()
    return _pure


#: From this many records on, of at most this many bytes each on average, where
#: :func:`write_records` needs torch's writer, it has torch's writer open the file itself (see
#: :func:`_named_archive`) rather than call ``f.write`` from C++. Measured here (two
#: cores, a matmul loop beside the save): 50,000 records of 1 KiB are written in 0.25 s
#: instead of 0.40 s with half the loop's slowdown; 190 records of 2.7 MiB slow the loop
#: 1.2-1.3x written by name and 1.01-1.04x through the file object.
BY_NAME_MIN_RECORDS = 64
BY_NAME_MAX_MEAN_BYTES = 1 << 20


class ArchiveRecords:
    """Records to write as torch.save's archive, with what writing them needs, worked out
    once (names, sizes, where the storages are, the plan and skeleton of
    :mod:`snapwriter._ziparchive`, memory views over the storages): each write of the
    same object only checksums and writes.

    Args:
        records: ``(name, bytes or storage)`` in file order. The storages must keep
            their size and memory while this object lives (staged storages do).

    Threading: safe to write from several threads at once.
    """

    def __init__(self, records: list[tuple[str, bytes | torch.UntypedStorage]]) -> None:
        self.records = records
        self.names = [name for name, _ in records]
        self.sizes = []
        self.host = True  # every storage in host memory
        for _, value in records:
            if isinstance(value, torch.UntypedStorage):
                self.sizes.append(value.nbytes())
                self.host = self.host and value.device.type == "cpu"
            else:
                self.sizes.append(len(value))
        self._plans: dict[int, ArchivePlan | None] = {}
        self._skeletons: dict[ArchivePlan, ArchiveSkeleton] = {}
        self._views: list[Any] | None = None

    def pure_plan(self) -> ArchivePlan | None:
        """How :mod:`snapwriter._ziparchive` writes these records under this thread's
        torch.save options, or None where torch's writer must (CRC-32s switched off,
        this torch's archives not reproduced, zip64, a storage not in host memory)."""
        if not self.host or not torch.serialization.get_crc32_options() or not pure_archives():
            return None
        alignment = torch.serialization._get_storage_alignment()
        if alignment not in self._plans:
            plan = archive_plan(self.names)
            fit = fits(zip(self.names, self.sizes, strict=True), plan)
            self._plans[alignment] = plan if fit else None
        return self._plans[alignment]

    def skeleton(self, plan: ArchivePlan) -> ArchiveSkeleton:
        """The records' :class:`~snapwriter._ziparchive.ArchiveSkeleton` under ``plan``."""
        skeleton = self._skeletons.get(plan)
        if skeleton is None:
            skeleton = self._skeletons[plan] = ArchiveSkeleton(self.names, self.sizes, plan)
        return skeleton

    def views(self) -> list[Any]:
        """The records' bytes without a copy (storages as memory views)."""
        if self._views is None:
            self._views = [_view(value) for _, value in self.records]
        return self._views


def write_records(f: IO[bytes], records: list[tuple[str, bytes | torch.UntypedStorage]]) -> None:
    """Write ``records`` (name, bytes or storage), in order, as the zip archive torch's
    writer makes into the binary file ``f``, with torch.save's alignment and checksums.

    See :func:`_write_prepared` for which zip writer writes them.
    """
    _write_prepared(f, ArchiveRecords(records))


def _write_prepared(f: IO[bytes], archive: ArchiveRecords) -> None:
    """:func:`write_records` of prepared records.

    Which writer: :mod:`snapwriter._ziparchive` (the same bytes, checksummed by
    :mod:`snapwriter._crc`, several times faster with ISA-L, and with no Python work
    per record once the records are prepared) wherever it reproduces this torch's
    archives (see :meth:`ArchiveRecords.pure_plan`); torch's own writer otherwise.

    Given a file object, torch's writer calls back into Python for every piece it
    writes (about seven per record), taking the GIL each time: with tens of thousands
    of records that stalls a training loop whose torch ops release the GIL. So for
    many small records (see :data:`BY_NAME_MIN_RECORDS`) on a local, empty, regular
    file, the writer opens the file itself through a path named ``archive`` (the name
    torch derives the archive's record prefix from, as for a file object) and writes
    without calling back; the bytes are the same. torch reports a failed write there
    without the OS error: the archive is then written again through ``f``, which
    either succeeds (a complete file) or raises the ``OSError`` itself.
    """
    with collector_paused():  # the first write of these records prepares them
        plan = archive.pure_plan()
        if plan is not None:
            skeleton, views = archive.skeleton(plan), archive.views()
    if plan is not None:
        skeleton.write(f, views)
        f.flush()
        return
    records, sizes = archive.records, archive.sizes
    if len(records) >= BY_NAME_MIN_RECORDS and sum(sizes) <= BY_NAME_MAX_MEAN_BYTES * len(records):
        with _named_archive(f) as name:
            if name is not None:
                try:
                    _write_with(_file_writer(name), records, sizes)
                except RuntimeError:
                    f.seek(0)
                    f.truncate()
                else:
                    f.seek(0, os.SEEK_END)
                    return
    _write_with(_file_writer(f), records, sizes)
    f.flush()


def _view(value: bytes | torch.UntypedStorage) -> Any:
    """The bytes of a record, without a copy (a host storage's memory, as a read-only
    memoryview: a slice of :data:`_MEMORY`)."""
    if not isinstance(value, torch.UntypedStorage):
        return value
    nbytes = value.nbytes()
    if not nbytes:
        return b""
    start = value.data_ptr()
    return _MEMORY[start : start + nbytes]


# The process's whole address space as one read-only byte view, made once: a storage's
# bytes are a slice of it (0.2 µs, where a memoryview of its own through ctypes costs
# 3 µs a call: 0.15 s for the 50,000 records of a first save). No ctypes array type is
# made per size either (each a class, freed only by a full collection).
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_memory_view.restype = ctypes.py_object
_PYBUF_READ = 0x100
_MEMORY: memoryview = _memory_view(None, sys.maxsize, _PYBUF_READ)


def _file_writer(f: IO[bytes] | str) -> Any:
    alignment = torch.serialization._get_storage_alignment()
    return torch._C.PyTorchFileWriter(f, torch.serialization.get_crc32_options(), alignment)


def _write_with(
    writer: Any, records: list[tuple[str, bytes | torch.UntypedStorage]], sizes: list[int]
) -> None:
    try:
        for (name, value), nbytes in zip(records, sizes, strict=True):
            writer.write_record(name, value, nbytes)
        writer.write_end_of_file()
    except BaseException:
        # Mark the archive finished before the writer is collected: its C++ destructor
        # would otherwise retry the end of file, fail again (disk full...) and abort the
        # whole process from a destructor.
        with contextlib.suppress(Exception):
            writer.write_end_of_file()
        raise
    finally:
        del writer  # a writer that opened the file closes it now


_FD_DIR = "/proc/self/fd"


@contextlib.contextmanager
def _named_archive(f: IO[bytes]) -> Iterator[str | None]:
    """A path named ``archive`` that opens ``f``'s own file (a symbolic link to
    ``/proc/self/fd/N`` in a private temporary directory, removed afterwards), or None
    where that cannot be had: no ``/proc``, not a regular local file, not empty or not
    at its start (``append=True``), or no temporary directory."""
    name = None
    try:
        fd = f.fileno()
        info = os.fstat(fd)
        if (
            stat.S_ISREG(info.st_mode)
            and info.st_size == 0
            and f.tell() == 0
            and "a" not in getattr(f, "mode", "a")
            and os.path.isdir(_FD_DIR)
        ):
            directory = tempfile.mkdtemp(prefix="snapwriter-archive-")
            name = os.path.join(directory, "archive")
            try:
                os.symlink(f"{_FD_DIR}/{fd}", name)
            except OSError:
                os.rmdir(directory)
                raise
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        name = None
    try:
        yield name
    finally:
        if name is not None:
            with contextlib.suppress(OSError):
                os.unlink(name)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(name))


def fast_torch_save(obj: Any, f: IO[bytes], *, layout: Layout | None = None) -> None:
    """Save ``obj`` to the binary file ``f``: the same bytes ``torch.save(obj, f)`` writes.

    See the module docstring for what takes the fast path and what falls back to
    ``torch.save``. Threading: safe to call from any thread; holds the GIL while
    pickling (handing it over every few tensors), not while copying storage bytes.

    Args:
        obj: what to save.
        f: a binary file object.
        layout: the layout staging made for ``obj`` (:mod:`snapwriter._layout`): its
            ``data.pkl`` is reused when it repeats the previous save's.

    Raises:
        Whatever ``torch.save`` raises for ``obj`` (the fallback runs it).
    """
    save_and_measure(obj, f, layout=layout)


def save_and_measure(
    obj: Any, f: IO[bytes], *, layout: Layout | None = None
) -> tuple[int, int] | None:
    """:func:`fast_torch_save`; returns the number of storage records and their bytes,
    or None when ``torch.save`` itself wrote the file."""
    pickled = layout.pickle(obj) if layout is not None else pickle_state(obj)
    if pickled is None:
        torch.save(obj, f)
        return None
    write_archive(f, pickled)
    return len(pickled.storages), pickled.storage_nbytes
