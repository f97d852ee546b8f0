"""Run metadata: package versions, the machine, the file system and the git commit."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import subprocess
from typing import Any

from . import REPO_ROOT, GiB


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def fs_type(path: str) -> str:
    """The file system type of the mount holding ``path`` (``ext4``, ``tmpfs``...)."""
    path = os.path.realpath(path)
    best, fstype = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            under = len(parts) >= 3 and (
                path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")
            )
            if under and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def machine_info() -> dict[str, Any]:
    mem_total = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        m = re.search(r"MemTotal:\s+(\d+) kB", f.read())
        mem_total = int(m.group(1)) * 1024 if m else 0
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        m = re.search(r"model name\s*:\s*(.+)", f.read())
        cpu = m.group(1).strip() if m else cpu
    info = {
        "node": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_bytes": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }
    info["summary"] = (
        f"{info['cpus']} CPUs ({cpu}), {mem_total / GiB:.0f} GiB RAM, Linux {info['kernel']}"
    )
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", REPO_ROOT, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def crc_implementation() -> str:
    """Which CRC-32 snapwriter's archive writer uses here ("isal" with snapwriter[fast])."""
    from snapwriter import _crc

    return _crc.IMPLEMENTATION


def copy_threads() -> int:
    """How many threads copy a staging pass here (the caller's included)."""
    from snapwriter import _copier

    return _copier.COPY_THREADS
