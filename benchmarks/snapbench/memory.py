"""Memory figures: PSS of the process tree (fork- and shm-aware) and its peak while saving."""

from __future__ import annotations

import os
import re
import threading


def status_kib(field: str, pid: str = "self") -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``...), 0 if absent."""
    with open(f"/proc/{pid}/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(m.group(1)) if m else 0


def reset_hwm() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root`` (children, grandchildren...)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _system_shmem_bytes() -> int:
    """The machine's shared memory in use (``Shmem`` of ``/proc/meminfo``), 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^Shmem:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return 0
    return int(m.group(1)) * 1024 if m else 0


def tree_pss_bytes() -> int:
    """Proportional set size of this process and its descendants: pages shared by fork
    are counted once in total, copy-on-write copies count in full; shared memory
    (``/dev/shm``, ``memfd``) is the machine's ``Shmem``, counted once whoever maps it.

    Shared memory is not summed per process: the processes are read one after the
    other, and a page the saving process maps between two reads would count in full
    in the first and as a half in the second (on 0.5 GiB staged in shared memory, up
    to 0.15x of the state too much while the saving process reads it). The machine's
    counter has no such gap; other programs' shared memory changes it too, so run the
    benchmark on a quiet machine.
    """
    total = 0
    for pid in [os.getpid(), *descendants(os.getpid())]:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                rollup = f.read()
        except OSError:
            continue
        for field in ("Pss_Anon", "Pss_File"):
            m = re.search(rf"^{field}:\s+(\d+) kB", rollup, re.MULTILINE)
            if m:
                total += int(m.group(1)) * 1024
    return total + _system_shmem_bytes()


class PeakSampler(threading.Thread):
    """Samples :func:`tree_pss_bytes` until stopped; used on the cold save only."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(name="bench-pss-sampler", daemon=True)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, tree_pss_bytes())
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, tree_pss_bytes())
        return self.peak
