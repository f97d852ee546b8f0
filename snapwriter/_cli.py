"""The command line: ``python -m snapwriter`` (or the ``snapwriter`` script).

Sub-commands, each with ``--help``::

    ls DIR [--pattern GLOB] [--json]          snapshots with size, time and status
    verify PATH [--pattern GLOB] [--quick]    check that snapshots are intact
    latest DIR [--pattern GLOB] [--verified]  print the newest complete snapshot
    clean DIR [--dry-run] [--all]             remove temporary leftovers of crashed saves

Exit status: 0 success; 1 a problem was found (a damaged snapshot, no snapshot, a file
that could not be removed); 2 usage error or no such directory or file.

Every command reaches files through a file-system object with ppe's interface
(:func:`_filesystem` maps a location to one); only local paths are accepted today.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from ._discovery import SnapshotEntry, list_snapshots
from ._fsspec import resolve_filesystem
from ._manifest import file_digest, set_status
from ._paths import temp_owner_alive
from ._storage import Storage

__all__ = (
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_USAGE",
    "DamagedSnapshot",
    "check_archive",
    "load_snapshot",
    "main",
    "verify_file",
    "verify_set",
)

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2

#: How a file written by ``torch.save(..., _use_new_zipfile_serialization=False)`` starts:
#: the pickled magic number of the legacy format.
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_CHUNK_BYTES = 1 << 20


class UsageError(Exception):
    """Bad command-line input or missing path: exit status 2."""


class DamagedSnapshot(Exception):
    """A snapshot failed verification; the message says why."""


# -- file systems ---------------------------------------------------------------------


def _filesystem(location: str) -> tuple[Any, str]:
    """Return the file system holding ``location`` and the path within it.

    The one place that maps locations to file systems: a plain path is local, a URL
    (``s3://bucket/run``, ``memory://run``) goes through fsspec like a writer's
    ``out_dir``.

    Raises:
        UsageError: ``location`` is a URL and fsspec (or its backend) is missing.
    """
    try:
        return resolve_filesystem(None, location)
    except ImportError as exc:
        raise UsageError(str(exc)) from exc


def _require_dir(fs: Any, directory: str) -> None:
    if not fs.isdir(directory):
        what = "not a directory" if fs.exists(directory) else "no such directory"
        raise UsageError(f"{what}: {directory}")


# -- formatting -----------------------------------------------------------------------


def _human_size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{nbytes} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _iso_time(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.astimezone().isoformat(timespec="seconds")


def _status(entry: SnapshotEntry) -> str:
    if entry.kind == "set":
        return "complete set" if entry.complete else "incomplete set"
    if not entry.temporary:
        return "complete"
    return "in progress" if temp_owner_alive(entry.name) else "temp leftover"


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())


# -- verification ---------------------------------------------------------------------


def check_archive(fs: Any, path: str) -> str:
    """Check cheaply that ``path`` is an intact torch file, without unpickling it.

    A zip archive (what :func:`torch.save` writes) must have a readable central
    directory, a ``data.pkl`` record and records matching their CRC-32 (read in chunks,
    so memory stays small). A legacy-format file is only recognised by its header.

    Returns:
        A short description of what was checked.

    Raises:
        DamagedSnapshot: the file is not a torch file, is truncated or corrupt.
        OSError: the file could not be read.
    """
    with fs.open(path, "rb") as f:
        head = f.read(len(LEGACY_TORCH_MAGIC))
        if head == LEGACY_TORCH_MAGIC:
            return "legacy torch format, header only"
        f.seek(0)
        if not zipfile.is_zipfile(f):
            raise DamagedSnapshot("not a zip archive (truncated, or not written by torch.save)")
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as archive:
                infos = archive.infolist()
                if not any(i.filename.endswith("/data.pkl") for i in infos):
                    raise DamagedSnapshot("zip archive without a data.pkl record: not a torch file")
                unchecked = 0
                for info in infos:
                    if info.CRC == 0 and info.file_size > 0:
                        unchecked += 1  # torch.save(compute_crc32=False) records no CRC
                        continue
                    with archive.open(info) as record:
                        while record.read(_CHUNK_BYTES):
                            pass
        except (zipfile.BadZipFile, EOFError, ValueError, zlib.error) as exc:
            raise DamagedSnapshot(f"corrupt zip archive: {exc}") from exc
    detail = f"{len(infos)} records, CRC ok"
    return f"{detail} ({unchecked} without CRC)" if unchecked else detail


def load_snapshot(fs: Any, path: str) -> int:
    """Load ``path`` with :func:`torch.load` (``weights_only=False``, onto the CPU) and
    materialise every tensor in it (dequantize, densify), so a tensor that loads but
    cannot be used makes the file damaged.

    Returns:
        How many tensors were materialised.

    Warning: this unpickles the file, which can run arbitrary code: verify only files
    you trust.

    Raises:
        DamagedSnapshot: :func:`torch.load` failed.
    """
    import torch

    from ._materialise import materialise_all

    with fs.open(path, "rb") as f, warnings.catch_warnings():
        # torch's own loader of quantized tensors uses the TypedStorage it deprecates
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        try:
            loaded = torch.load(f, weights_only=False, map_location="cpu")
        except Exception as exc:
            raise DamagedSnapshot(f"torch.load failed: {type(exc).__name__}: {exc}") from exc
    try:
        return materialise_all(loaded)
    except Exception as exc:
        raise DamagedSnapshot(
            f"a tensor loads but cannot be used: {type(exc).__name__}: {exc}"
        ) from exc


def verify_file(fs: Any, path: str, *, quick: bool) -> str:
    """Verify one file: :func:`check_archive`, then (unless ``quick``) :func:`load_snapshot`.

    Returns:
        What was checked.

    Raises:
        DamagedSnapshot: the file is damaged or unreadable.
    """
    try:
        detail = check_archive(fs, path)
        if not quick:
            tensors = load_snapshot(fs, path)
            detail += f", loaded, {tensors} tensors materialised"
    except OSError as exc:
        raise DamagedSnapshot(f"cannot read: {exc}") from exc
    return detail


def verify_set(fs: Any, path: str, *, quick: bool) -> str:
    """Verify a rank set: its marker, then each member (manifest size and digest when
    there is a manifest, then :func:`verify_file`).

    Raises:
        DamagedSnapshot: the set is incomplete (no marker), or a member is missing,
            has another size or checksum than its manifest says, or is damaged.
    """
    status = set_status(fs, path)
    if status is None:
        raise DamagedSnapshot("not a rank set")
    if not status.complete:
        raise DamagedSnapshot(
            f"incomplete set: no marker ({len(status.members)} member(s) present)"
        )
    if status.manifest is None:
        if status.tagged:
            raise DamagedSnapshot("incomplete set: the marker is there but no manifest")
        names = list(status.members)  # a set written by ppe itself: no manifest
    else:
        names = []
        for record in status.manifest.members:
            member = os.path.join(path, record.name)
            if not fs.exists(member):
                raise DamagedSnapshot(
                    f"incomplete set: member {record.name} (rank {record.rank}) missing"
                )
            size, digest = file_digest(fs, member, like=record.digest)
            if (size, digest) != (record.size, record.digest):
                what = "size" if size != record.size else "digest"
                raise DamagedSnapshot(
                    f"member {record.name} (rank {record.rank}) differs from the manifest: "
                    f"{what} (size {size}, expected {record.size})"
                )
            names.append(record.name)
    if not names:
        raise DamagedSnapshot("set without members")
    for name in names:
        try:
            verify_file(fs, os.path.join(path, name), quick=quick)
        except DamagedSnapshot as exc:
            raise DamagedSnapshot(f"member {name}: {exc}") from exc
    checked = "size+digest+" if status.manifest is not None else ""
    return f"set of {len(names)} member(s), {checked}{'archive' if quick else 'loaded'} ok"


def _verify_any(fs: Any, path: str, *, quick: bool) -> str:
    if fs.isdir(path):
        return verify_set(fs, path, quick=quick)
    return verify_file(fs, path, quick=quick)


# -- commands -------------------------------------------------------------------------


def _cmd_ls(args: argparse.Namespace) -> int:
    fs, directory = _filesystem(args.dir)
    _require_dir(fs, directory)
    entries = list_snapshots(directory, args.pattern, fs=fs, include_sets=True)
    if args.json:
        records = [
            {
                "name": e.name,
                "path": e.path,
                "size": e.size,
                "mtime": _iso_time(e.mtime),
                "timestamp": e.mtime,
                "status": _status(e),
                "kind": e.kind,
            }
            for e in entries
        ]
        print(json.dumps(records, indent=2))
        return EXIT_OK
    if not entries:
        print(f"no snapshots in {directory}", file=sys.stderr)
        return EXIT_OK
    rows = [("NAME", "SIZE", "MODIFIED", "STATUS")]
    rows += [(e.name, _human_size(e.size), _iso_time(e.mtime), _status(e)) for e in entries]
    _print_table(rows)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    fs, location = _filesystem(args.path)
    if fs.isdir(location) and set_status(fs, location) is not None:
        files = [(location, location)]  # one rank set
    elif fs.isdir(location):
        entries = list_snapshots(location, args.pattern, fs=fs, include_sets=True)
        temps = sum(e.temporary for e in entries)
        files = [(e.name, e.path) for e in entries if not e.temporary]
        if temps:
            print(f"skipping {temps} temporary file(s); see: snapwriter ls", file=sys.stderr)
    elif fs.exists(location):
        files = [(location, location)]
    else:
        raise UsageError(f"no such file or directory: {location}")
    if not files:
        print(f"no snapshots to verify in {location}", file=sys.stderr)
        return EXIT_OK
    width = max(len(name) for name, _ in files)
    damaged = 0
    for name, path in files:
        try:
            detail = _verify_any(fs, path, quick=args.quick)
        except DamagedSnapshot as exc:
            damaged += 1
            print(f"DAMAGED  {name.ljust(width)}  {exc}", flush=True)
        else:
            print(f"OK       {name.ljust(width)}  {detail}", flush=True)
    print(f"{len(files)} checked: {len(files) - damaged} OK, {damaged} damaged")
    return EXIT_PROBLEM if damaged else EXIT_OK


def _cmd_latest(args: argparse.Namespace) -> int:
    fs, directory = _filesystem(args.dir)
    _require_dir(fs, directory)
    entries = list_snapshots(
        directory, args.pattern, fs=fs, include_temporary=False, include_sets=True
    )
    for entry in reversed(entries):
        if args.verified:
            try:
                _verify_any(fs, entry.path, quick=True)
            except DamagedSnapshot as exc:
                print(f"skipping damaged {entry.path}: {exc}", file=sys.stderr)
                continue
        print(entry.path)
        return EXIT_OK
    print(f"no complete snapshot in {directory}", file=sys.stderr)
    return EXIT_PROBLEM


def _cmd_clean(args: argparse.Namespace) -> int:
    fs, directory = _filesystem(args.dir)
    _require_dir(fs, directory)
    temps = [e for e in list_snapshots(directory, fs=fs) if e.temporary]
    kept = [] if args.all else [e for e in temps if temp_owner_alive(e.name)]
    failed: list[str] = []
    if args.dry_run:
        removed = [e.path for e in temps if e not in kept]
    else:
        removed = Storage(fs).clean_temps(directory, only_dead=not args.all)
        failed = [
            e.path for e in temps if e not in kept and e.path not in removed and fs.exists(e.path)
        ]
    for path in removed:
        print(f"{'would remove' if args.dry_run else 'removed'}  {path}")
    for path in failed:
        print(f"could not remove  {path}", file=sys.stderr)
    for e in kept:
        print(f"kept  {e.path}  (its writer process is running; --all removes it)")
    summary = f"{len(removed)} {'to remove' if args.dry_run else 'removed'}, {len(kept)} kept"
    print(summary + (f", {len(failed)} failed" if failed else ""))
    return EXIT_PROBLEM if failed else EXIT_OK


# -- entry point ----------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapwriter",
        description="Inspect, verify and tidy directories of PyTorch snapshots.",
        epilog="Exit status: 0 success, 1 problem found, 2 usage error or missing path.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pattern = argparse.ArgumentParser(add_help=False)
    pattern.add_argument(
        "--pattern",
        default="*",
        metavar="GLOB",
        help="only snapshots whose names match this glob (default: all files)",
    )

    ls = sub.add_parser(
        "ls",
        parents=[pattern],
        help="list snapshots with size, modification time and status",
        description="List the files of a snapshot directory, oldest first. Status is "
        "'complete', 'temp leftover' (a crashed save) or 'in progress' (a temporary "
        "file whose writer process still runs); rank sets (a directory of one file per "
        "rank) are 'complete set' or 'incomplete set' (no marker, or a member missing).",
    )
    ls.add_argument("dir", metavar="DIR", help="snapshot directory or URL (s3://bucket/run)")
    ls.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ls.set_defaults(run=_cmd_ls)

    verify = sub.add_parser(
        "verify",
        parents=[pattern],
        help="check that snapshots are intact (exit 1 if any is damaged)",
        description="Check every complete snapshot of a directory, or one file: the zip "
        "archive's structure and CRCs, then a full torch.load(weights_only=False, "
        "map_location='cpu'). Loading unpickles the file and can run arbitrary code: "
        "verify only files you trust, or use --quick.",
    )
    verify.add_argument("path", metavar="DIR_OR_FILE", help="snapshot directory or file")
    verify.add_argument(
        "--quick",
        action="store_true",
        help="check the archive's structure and CRCs only, without unpickling",
    )
    verify.set_defaults(run=_cmd_verify)

    latest = sub.add_parser(
        "latest",
        parents=[pattern],
        help="print the newest complete snapshot (exit 1 if none)",
        description="Print the path of the newest complete snapshot (by modification "
        "time), ignoring temporary files; exit 1 if there is none.",
    )
    latest.add_argument("dir", metavar="DIR", help="snapshot directory")
    latest.add_argument(
        "--verified",
        action="store_true",
        help="skip snapshots that fail the quick check of verify (newest intact one)",
    )
    latest.set_defaults(run=_cmd_latest)

    clean = sub.add_parser(
        "clean",
        help="remove temporary leftovers of crashed saves",
        description="Remove temporary files left by saves that never completed. By "
        "default those whose writer process still runs on this host are kept.",
    )
    clean.add_argument("dir", metavar="DIR", help="snapshot directory")
    clean.add_argument("--dry-run", action="store_true", help="only print what would go")
    clean.add_argument(
        "--all",
        action="store_true",
        help="also remove temporary files of running writers (their saves will fail)",
    )
    clean.set_defaults(run=_cmd_clean)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: :data:`EXIT_OK`, :data:`EXIT_PROBLEM` or :data:`EXIT_USAGE`
        (also for argparse's own errors; ``--help`` returns 0).
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UsageError as exc:
        print(f"snapwriter {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `snapwriter ls DIR | head`: stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return EXIT_PROBLEM
    except Exception as exc:  # the storage could not be reached (credentials, network...)
        print(
            f"snapwriter {args.command}: error: cannot read "
            f"{getattr(args, 'dir', None) or getattr(args, 'path', '')!r}: "
            f"{type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return EXIT_USAGE
