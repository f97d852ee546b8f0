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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from ._crc import crc32

__all__ = ("ArchivePlan", "fits", "head_records", "read_record", "write_archive")

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header (30 bytes)
_DESCRIPTOR = struct.Struct("<IIII")  # data descriptor: signature, crc, sizes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory header (46 bytes)
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
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


def _combine(seed: int, value: int) -> int:
    """c10's ``hash_combine`` on 64-bit values."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _MASK64)) & _MASK64


def _nbytes(data: Any) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


def _full(records: Sequence[tuple[str, Any]], plan: ArchivePlan) -> list[tuple[str, Any]]:
    names = {name for name, _ in records}
    out = list(records)
    if "version" not in names and ".data/version" not in names:
        out.append(("version", plan.version))
    if "byteorder" not in names:
        out.append(("byteorder", b"little"))
    return out


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


def write_archive(f: IO[bytes], records: Sequence[tuple[str, Any]], plan: ArchivePlan) -> int:
    """Write ``records`` (name, bytes-like), in order, as torch's zip writer would.

    ``f`` is a binary file positioned at the archive's start (empty). Returns the
    archive's size. Raises whatever ``f.write`` raises (``OSError`` with its errno);
    the caller removes the partial file. Call :func:`fits` first.
    """
    prefix = plan.prefix.encode() + b"/"
    alignment = plan.alignment
    entries: list[tuple[bytes, int, int, int]] = []  # name, crc, size, header offset
    pending = bytearray()
    offset = 0
    crc_hash = 0
    for name, data in [*_full(records, plan), (SERIALIZATION_ID, None)]:
        if data is None:  # the serialization id: names' hash, then the CRCs'
            data = f"{plan.name_hash:020d}{crc_hash:020d}".encode()
        full = prefix + name.encode()
        start = offset + _LOCAL.size + len(full) + 4
        pad = -start % alignment
        size = _nbytes(data)
        crc = crc32(data)
        # an empty record has no data descriptor (and no CRC in the serialization id)
        flags = _FLAGS if size else _UTF8
        pending += _LOCAL.pack(0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(full), 4 + pad)
        pending += full
        pending += b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
        if size >= _DIRECT_BYTES:
            f.write(pending)
            pending.clear()
            f.write(data)
        else:
            pending += data
        if size:
            pending += _DESCRIPTOR.pack(0x08074B50, crc, size, size)
            crc_hash = _combine(crc_hash, crc)
        if len(pending) >= _GATHER_BYTES:
            f.write(pending)
            pending.clear()
        entries.append((full, crc, size, offset))
        offset = start + pad + size + (_DESCRIPTOR.size if size else 0)
    directory_at = offset
    directory_size = 0
    for full, crc, size, at in entries:
        pending += _CENTRAL.pack(
            0x02014B50,
            0,
            0,
            _FLAGS if size else _UTF8,
            0,
            0,
            0,
            crc,
            size,
            size,
            len(full),
            0,
            0,
            0,
            0,
            0,
            at,
        )
        pending += full
        directory_size += _CENTRAL.size + len(full)
        if len(pending) >= _GATHER_BYTES:
            f.write(pending)
            pending.clear()
    count = len(entries)
    zip64_at = directory_at + directory_size
    pending += _ZIP64_END.pack(
        0x06064B50, 44, 0x031E, 0x002D, 0, 0, count, count, directory_size, directory_at
    )
    pending += _ZIP64_LOCATOR.pack(0x07064B50, 0, zip64_at, 1)
    short = min(count, _U16)
    pending += _END.pack(0x06054B50, 0, 0, short, short, directory_size, directory_at, 0)
    f.write(pending)
    return zip64_at + _ZIP64_END.size + _ZIP64_LOCATOR.size + _END.size
