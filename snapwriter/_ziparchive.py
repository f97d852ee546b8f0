"""torch.save's zip archive, written without torch (the saving process imports no torch).

torch's zip writer (``PyTorchStreamWriter`` over miniz) writes every record stored
(uncompressed), its data aligned by an ``FB`` extra field of ``Z`` bytes, its CRC-32 and
sizes in a data descriptor after the data, no timestamps; then a ``version`` record
(and ``byteorder``) unless the caller wrote them, a ``.data/serialization_id`` record,
the central directory, a zip64 end-of-central-directory record and locator, and the
classic end record. :func:`write_archive` writes those very bytes from any buffers
(shared-memory views in the saving process), given a :class:`ArchivePlan` that the
trainer derives from torch itself (:func:`snapwriter._fastsave.archive_plan`): the
alignment, the version record and the half of the serialization id that hashes the
record names through a C++ hash set. The other half is computed here, from the CRC-32s.

Limits: archives that need zip64 fields in their headers (a record or an offset past
4 GiB - 1) are not written here (:func:`fits` says so before a byte is written); the
caller writes those with torch. The checksums are the zip CRC-32 (the same polynomial
and value as torch's), computed here as the bytes are written (:mod:`snapwriter._crc`:
ISA-L's where installed, else zlib's).
"""

from __future__ import annotations

import struct
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain, compress, repeat
from typing import IO, Any

from ._crc import crc32

__all__ = (
    "ArchivePlan",
    "ArchiveSkeleton",
    "fits",
    "head_records",
    "read_record",
    "write_archive",
)

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header (30 bytes)
_DESCRIPTOR = struct.Struct("<IIII")  # data descriptor: signature, crc, sizes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory header (46 bytes)
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_U32_AT = struct.Struct("<I")  # a CRC patched into the central directory
_UTF8 = 0x0800  # general-purpose flag bit 11: UTF-8 names
_FLAGS = _UTF8 | 0x0008  # bit 3: CRC and sizes in a data descriptor after the data
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
#: Records at least this large are written from their own buffer (no copy); smaller
#: ones are gathered with the headers into one write.
_DIRECT_BYTES = 1 << 16
_GATHER_BYTES = 1 << 20
SERIALIZATION_ID = ".data/serialization_id"


@dataclass(frozen=True)
class ArchivePlan:
    """What torch's writer adds that depends on torch: read from torch by the trainer.

    Attributes:
        prefix: the records' folder (``"archive"`` for a file object).
        alignment: record data starts at a multiple of this (torch's storage alignment).
        version: the ``version`` record's bytes, written when the records lack one.
        name_hash: the first 20 digits of the serialization id (a hash of the record
            names as torch's writer iterates them).
    """

    prefix: str
    alignment: int
    version: bytes
    name_hash: int


def head_records(data: Any, alignment: int) -> list[tuple[str, Any]]:
    """The records torch.save writes before its storages: ``data.pkl`` (``data``),
    ``.format_version``, ``.storage_alignment`` and ``byteorder``."""
    return [
        ("data.pkl", data),
        (".format_version", b"1"),
        (".storage_alignment", str(alignment).encode()),
        ("byteorder", sys.byteorder.encode()),
    ]


def read_record(archive: bytes, name: str, prefix: str = "archive") -> bytes:
    """The bytes of record ``name`` of a stored (uncompressed) archive in ``archive``,
    found by its local header (no central-directory parse: a scratch archive of
    50,000 records is read in microseconds). Raises KeyError if there is none."""
    full = f"{prefix}/{name}".encode()
    at = archive.find(full)
    while at >= 0:
        header = at - _LOCAL.size
        if header >= 0 and archive[header : header + 4] == b"PK\x03\x04":
            fields = _LOCAL.unpack_from(archive, header)
            name_len, extra_len = fields[9], fields[10]
            if name_len == len(full):
                start = at + name_len + extra_len
                if fields[2] & 0x0008:  # sizes after the data: the next descriptor says
                    end = archive.index(b"PK\x07\x08", start)
                    size = _DESCRIPTOR.unpack_from(archive, end)[2]
                else:
                    size = fields[8]
                return archive[start : start + size]
        at = archive.find(full, at + 1)
    raise KeyError(name)


def fits(sizes: Iterable[tuple[str, int]], plan: ArchivePlan) -> bool:
    """Whether the archive of records of these (name, size) stays clear of zip64 header
    fields (every offset and size below 4 GiB - 1, with room for the headers and the
    records torch's writer adds): only then can :func:`write_archive` write it."""
    total = 0
    for name, size in sizes:
        if size >= _U32:
            return False
        total += size + 30 + 8 + len(plan.prefix) + len(name) + plan.alignment + 16 + 46
    return total + (1 << 16) < _U32


class ArchiveSkeleton:
    """Every byte of an archive that does not depend on its records' contents.

    A training loop writes archives of the same records (names and sizes) save after
    save: the headers, padding, central directory and end records are all known from
    ``names``, ``sizes`` and ``plan``; only the CRC-32s (in the data descriptors, the
    central directory and the serialization id) change. :meth:`write` fills those in
    with whole-list operations and writes the records' buffers among the headers,
    gathering small ones into one write: no Python work per record.

    Args:
        names: the records' names, in order (without the ``archive/`` prefix).
        sizes: their sizes in bytes.
        plan: what torch adds (:class:`ArchivePlan`).

    Call :func:`fits` first. Threading: immutable once made; :meth:`write` may run in
    several threads at once (each with its own buffers and file).
    """

    def __init__(self, names: Sequence[str], sizes: Sequence[int], plan: ArchivePlan) -> None:
        present = set(names)
        added: list[tuple[str, bytes]] = []  # records torch's writer adds, contents known
        if "version" not in present and ".data/version" not in present:
            added.append(("version", plan.version))
        if "byteorder" not in present:
            added.append(("byteorder", b"little"))
        self._added = [data for _, data in added]
        self._added_crcs = [crc32(data) for data in self._added]
        self._count = len(names)
        self._name_hash = plan.name_hash
        all_names = [*names, *(name for name, _ in added), SERIALIZATION_ID]
        all_sizes = [*sizes, *map(len, self._added), 40]  # the id: 40 digits
        self._sizes = all_sizes
        self._empty = [i for i, size in enumerate(all_sizes) if not size]
        prefix = plan.prefix.encode() + b"/"
        alignment = plan.alignment
        headers: list[bytes] = []
        directory = bytearray()
        crc_at: list[int] = []  # where each record's CRC goes in the directory
        offset = 0
        for name, size in zip(all_names, all_sizes, strict=True):
            full = prefix + name.encode()
            start = offset + _LOCAL.size + len(full) + 4
            pad = -start % alignment
            # an empty record has no data descriptor (and no CRC in the serialization id)
            flags = _FLAGS if size else _UTF8
            headers.append(
                _LOCAL.pack(0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(full), 4 + pad)
                + full
                + b"FB"
                + pad.to_bytes(2, "little")
                + b"Z" * pad
            )
            crc_at.append(len(directory) + 16)
            directory += _CENTRAL.pack(
                0x02014B50, 0, 0, flags, 0, 0, 0, 0, size, size, len(full), 0, 0, 0, 0, 0, offset
            )
            directory += full
            offset = start + pad + size + (_DESCRIPTOR.size if size else 0)
        count = len(all_names)
        zip64_at = offset + len(directory)
        directory += _ZIP64_END.pack(
            0x06064B50, 44, 0x031E, 0x002D, 0, 0, count, count, zip64_at - offset, offset
        )
        directory += _ZIP64_LOCATOR.pack(0x07064B50, 0, zip64_at, 1)
        short = min(count, _U16)
        directory += _END.pack(0x06054B50, 0, 0, short, short, zip64_at - offset, offset, 0)
        self._headers = headers
        self._directory = bytes(directory)
        self._crc_at = crc_at
        self.nbytes = offset + len(directory)
        self._groups = self._group(headers, all_sizes)

    @staticmethod
    def _group(headers: list[bytes], sizes: list[int]) -> list[tuple[int, int, int]]:
        """How :meth:`write` writes the pieces (header, data, descriptor of every record,
        three by three): ``(a, b, big)`` writes pieces ``a:b`` joined, then piece
        ``big`` (a large record's data, from its own buffer; -1: none)."""
        groups: list[tuple[int, int, int]] = []
        a = 0
        gathered = 0
        for i, (header, size) in enumerate(zip(headers, sizes, strict=True)):
            if size >= _DIRECT_BYTES:
                groups.append((a, 3 * i + 1, 3 * i + 1))
                a, gathered = 3 * i + 2, 0
                continue
            gathered += len(header) + size + _DESCRIPTOR.size
            if gathered >= _GATHER_BYTES:
                groups.append((a, 3 * i + 3, -1))
                a, gathered = 3 * i + 3, 0
        groups.append((a, 3 * len(sizes), -1))
        return groups

    def write(self, f: IO[bytes], buffers: Sequence[Any]) -> int:
        """Write the archive of ``buffers`` (``bytes``, or 1-D byte-format memoryviews:
        one per record of ``names``, of its size) into the binary file ``f``,
        positioned at the archive's start.

        Returns the archive's size. Raises ValueError when ``buffers`` do not match the
        skeleton, and whatever ``f.write`` raises (``OSError`` with its errno): the
        caller removes the partial file.
        """
        if len(buffers) != self._count:
            raise ValueError(f"{len(buffers)} buffers for an archive of {self._count} records")
        datas = [*buffers, *self._added]
        crcs = list(map(crc32, buffers))
        crcs += self._added_crcs
        sizes = self._sizes
        if list(map(len, datas)) != sizes[:-1]:  # bytes, or byte-format memoryviews
            raise ValueError("the buffers' sizes are not the archive's")
        seed = 0  # c10's hash_combine of the CRCs, on 64 bits
        mask = _MASK64
        for crc in compress(crcs, sizes):  # the empty records' are left out
            seed = (seed ^ ((crc + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & mask)) & mask
        ident = f"{self._name_hash:020d}{seed:020d}".encode()
        datas.append(ident)
        crcs.append(crc32(ident))
        descriptors = list(map(_DESCRIPTOR.pack, repeat(0x08074B50), crcs, sizes, sizes))
        for i in self._empty:
            descriptors[i] = b""
        pieces = list(chain.from_iterable(zip(self._headers, datas, descriptors, strict=True)))
        write, join = f.write, b"".join
        for a, b, big in self._groups:
            if b > a:
                write(join(pieces[a:b]))
            if big >= 0:
                write(pieces[big])
        directory = bytearray(self._directory)
        deque(map(partial(_U32_AT.pack_into, directory), self._crc_at, crcs), maxlen=0)
        write(directory)
        return self.nbytes


def write_archive(f: IO[bytes], records: Sequence[tuple[str, Any]], plan: ArchivePlan) -> int:
    """Write ``records`` (name, then ``bytes`` or a 1-D byte-format memoryview), in
    order, as torch's zip writer would.

    ``f`` is a binary file positioned at the archive's start (empty). Returns the
    archive's size. Raises whatever ``f.write`` raises (``OSError`` with its errno);
    the caller removes the partial file. Call :func:`fits` first. (One
    :class:`ArchiveSkeleton` per call: keep the skeleton to write the same records
    again.)
    """
    names = [name for name, _ in records]
    buffers = [data for _, data in records]
    return ArchiveSkeleton(names, list(map(len, buffers)), plan).write(f, buffers)
