"""The targets: PASS / FAIL / NOT RUN verdicts from the warm medians.

:func:`evaluate_targets` holds the original targets for the default writer;
:func:`evaluate_writer_targets` the issue's per-writer ones (every asynchronous snapwriter
writer on 0.5 GiB and 5k, the best of them on the many-tensor workloads).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import DEFAULT_WRITER, MiB
from .contenders import SNAP_ASYNC, SNAP_BEST
from .report import median


def _target(name: str, ok: bool | None, detail: str) -> dict[str, Any]:
    verdict = "NOT RUN" if ok is None else ("PASS" if ok else "FAIL")
    return {"target": name, "verdict": verdict, "detail": detail}


def evaluate_targets(report: dict[str, Any], writer: str = DEFAULT_WRITER) -> list[dict[str, Any]]:
    """The issue's targets for the default writer, from the medians of the warm reps."""
    out = []

    def med(w: str, wl: str, m: str) -> float | None:
        return median(report, w, wl, m)

    def versus(name: str, wl: str, metric: str, baseline: str, bound: float) -> dict[str, Any]:
        """Target ``name``: the writer's ``metric`` <= ``bound`` x the baseline's."""
        value, ref = med(writer, wl, metric), med(baseline, wl, metric)
        ok = None if value is None or ref is None else value <= bound * ref
        label = metric.removesuffix("_s")
        detail = (
            "not run"
            if ok is None
            else f"{label} {value:.3f}s vs {baseline} {ref:.3f}s = {value / ref:.2f}x "
            f"(<= {bound:.1f}x)"
        )
        return _target(f"{name} [{wl}]", ok, detail)

    for wl in ("0.5GiB-190", "2GiB-400"):
        out.append(versus("lost <= 1.3x memcpy", wl, "lost_s", "memcpy", 1.3))
    for wl in ("0.5GiB-190", "2GiB-400"):
        out.append(
            versus(
                "durable done <= 1.0x torch.save+fsync", wl, "durable_s", "torch.save+fsync", 1.0
            )
        )
    wl = "50k-small"
    lost = med(writer, wl, "lost_s")
    out.append(
        _target(
            f"lost <= 0.1 s [{wl}]",
            None if lost is None else lost <= 0.1,
            "not run" if lost is None else f"lost {lost:.3f}s",
        )
    )
    out.append(versus("durable done <= 0.5x sync torch.save", wl, "durable_s", "torch.save", 0.5))
    case = report["cases"].get(f"{writer}|{wl}", {})
    loadable = case.get("summary", {}).get("loadable")
    out.append(
        _target(f"file loadable by plain torch.load [{wl}]", loadable, f"loadable={loadable}")
    )
    for wl in ("0.5GiB-190", "2GiB-400", "50k-small"):
        py, mm = med(writer, wl, "slowdown_py"), med(writer, wl, "slowdown_compute")
        ok = None if py is None or mm is None else max(py, mm) <= 1.05
        detail = (
            "not run" if ok is None else f"python loop {py:.2f}x, compute loop {mm:.2f}x (<= 1.05x)"
        )
        out.append(_target(f"loop slowdown <= 1.05x [{wl}]", ok, detail))
    for wl in ("0.5GiB-190", "2GiB-400", "50k-small"):
        ratio = med(writer, wl, "peak_extra_ratio")
        peak = med(writer, wl, "peak_extra_bytes")
        ok = None if ratio is None else ratio <= 1.1
        detail = (
            "not run"
            if ok is None or peak is None
            else f"peak extra {peak / MiB:.0f} MiB = {ratio:.2f}x state (<= 1.1x)"
        )
        out.append(_target(f"peak extra memory <= 1.1x state [{wl}]", ok, detail))
    for wl in ("0.5GiB-190", "2GiB-400", "50k-small"):
        case = report["cases"].get(f"{writer}|{wl}")
        reused = None if not case or "summary" not in case else case["summary"]["staging_reused"]
        allocs = None if not case or "allocations" not in case else case["allocations"]
        out.append(
            _target(
                f"warm saves allocate no staging memory [{wl}]",
                reused,
                f"allocations after each save: {allocs}",
            )
        )
    fits = report.get("sweep_fits", {})
    for group in ("sweep-size", "sweep-count"):
        keys = [f"{writer}|{group}|lost_s", f"{writer}|{group}|durable_s"]
        if not all(k in fits for k in keys):
            out.append(_target(f"linear scaling [{group}]", None, "run with --sweep"))
            continue
        lo, du = fits[keys[0]], fits[keys[1]]
        ok = lo["r2"] >= 0.9 and du["r2"] >= 0.9
        detail = (
            f"lost {lo['slope']:.3f} {lo['unit']} (R2 {lo['r2']:.3f}), "
            f"durable {du['slope']:.3f} {du['unit']} (R2 {du['r2']:.3f}); PASS if R2 >= 0.9"
        )
        out.append(_target(f"linear scaling [{group}]", ok, detail))
    return out


#: One writer's check: (ok, what it measured), or None when its inputs were not run.
Check = Callable[[str], tuple[bool, str] | None]


def _every(report: dict[str, Any], name: str, wl: str, check: Check) -> dict[str, Any]:
    """``name`` holds for every asynchronous snapwriter writer run on ``wl``."""
    results: list[tuple[bool, str]] = []
    not_run = []
    for writer in SNAP_ASYNC:
        case = report["cases"].get(f"{writer}|{wl}")
        if case is not None and "error" in case:
            results.append((False, f"{writer} ERROR"))
            continue
        got = check(writer) if case is not None else None
        if got is None:
            not_run.append(writer)
        else:
            results.append((got[0], f"{writer} {got[1]}"))
    ok = None if not results else all(r[0] for r in results)
    detail = "; ".join(r[1] for r in results) if results else "not run"
    if results and not_run:
        detail += f" (not run: {', '.join(not_run)})"
    return _target(f"every snapwriter writer: {name} [{wl}]", ok, detail)


def _versus(
    report: dict[str, Any], wl: str, metric: str, baseline: str, bound: float, plus: float = 0.0
) -> Check:
    def check(writer: str) -> tuple[bool, str] | None:
        value, ref = median(report, writer, wl, metric), median(report, baseline, wl, metric)
        if value is None or ref is None:
            return None
        return value <= bound * ref + plus, f"{value:.3f}s = {value / ref:.2f}x {baseline}"

    return check


def _slowdown(report: dict[str, Any], wl: str) -> Check:
    def check(writer: str) -> tuple[bool, str] | None:
        py = median(report, writer, wl, "slowdown_py")
        mm = median(report, writer, wl, "slowdown_compute")
        if py is None or mm is None:
            return None
        return max(py, mm) <= 1.05, f"{py:.2f}x/{mm:.2f}x"

    return check


def _figure(report: dict[str, Any], wl: str, metric: str, bound: float, fmt: str) -> Check:
    """``metric`` <= ``bound``; ``fmt`` formats the figure (a format spec, then a unit)."""
    spec, _, unit = fmt.partition(" ")

    def check(writer: str) -> tuple[bool, str] | None:
        value = median(report, writer, wl, metric)
        return None if value is None else (value <= bound, format(value, spec) + unit)

    return check


def _best(report: dict[str, Any], wl: str) -> list[dict[str, Any]]:
    """The best asynchronous snapwriter writer (least lost) on a many-tensor workload."""
    lost = {w: v for w in SNAP_BEST if (v := median(report, w, wl, "lost_s")) is not None}
    best = min(lost, key=lambda w: lost[w]) if lost else None
    ppe = median(report, "ppe.Process", wl, "lost_s")
    prefix = "best snapwriter writer"
    if best is None:
        return [
            _target(f"{prefix}: {name} [{wl}]", None, "not run")
            for name in (
                "lost <= 0.1 s and < ppe.Process",
                "loop slowdown <= 1.05x",
                "durable done <= 0.5x sync torch.save",
            )
        ]
    value = lost[best]
    if ppe is None:
        lost_target = _target(
            f"{prefix}: lost <= 0.1 s and < ppe.Process [{wl}]", None, "ppe.Process not run"
        )
    else:
        lost_target = _target(
            f"{prefix}: lost <= 0.1 s and < ppe.Process [{wl}]",
            value <= 0.1 and value < ppe,
            f"{best} lost {value:.3f}s, ppe.Process {ppe:.3f}s",
        )
    slow = _slowdown(report, wl)(best)
    durable = _versus(report, wl, "durable_s", "torch.save", 0.5)(best)
    return [
        lost_target,
        _target(
            f"{prefix}: loop slowdown <= 1.05x [{wl}]",
            None if slow is None else slow[0],
            "not run" if slow is None else f"{best} {slow[1]}",
        ),
        _target(
            f"{prefix}: durable done <= 0.5x sync torch.save [{wl}]",
            None if durable is None else durable[0],
            "torch.save not run" if durable is None else f"{best} {durable[1]}",
        ),
    ]


def evaluate_writer_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for every asynchronous snapwriter writer (``SNAP_ASYNC``)."""
    wl = "0.5GiB-190"
    out = [
        _every(report, "lost <= 1.3x memcpy", wl, _versus(report, wl, "lost_s", "memcpy", 1.3)),
        _every(report, "loop slowdown <= 1.05x", wl, _slowdown(report, wl)),
        _every(
            report,
            "durable done <= 1.0x torch.save+fsync",
            wl,
            _versus(report, wl, "durable_s", "torch.save+fsync", 1.0),
        ),
        _every(
            report,
            "peak extra memory <= 1.1x state",
            wl,
            _figure(report, wl, "peak_extra_ratio", 1.1, ".2f x state"),
        ),
    ]
    for many in ("50k-small", "50k-adam"):
        out += _best(report, many)
    wl = "5k"
    out += [
        _every(
            report,
            "lost <= 1.3x memcpy + 20 ms",
            wl,
            _versus(report, wl, "lost_s", "memcpy", 1.3, plus=0.020),
        ),
        _every(report, "first save <= 2 s", wl, _figure(report, wl, "first_s", 2.0, ".3f s")),
    ]
    return out
