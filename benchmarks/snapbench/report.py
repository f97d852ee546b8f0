"""Summaries of the reps, sweep fits, and the markdown report (``--compare`` tables too)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from . import DEFAULT_WRITER, GiB, MiB
from .contenders import COMPARE_WRITERS
from .workloads import WORKLOADS

SUMMARY_METRICS = (
    "lost_s",
    "stall_s",
    "step_extra_s",
    "loop_extra_s",
    "durable_s",
    "slowdown_py",
    "slowdown_compute",
)


def _stat(values: Sequence[float | None]) -> dict[str, Any] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarize_case(case: dict[str, Any]) -> dict[str, Any]:
    """Median/min/max per metric over the warm reps, consistency, staging reuse, memory
    and the first (cold) save's call -> durable time."""
    reps = case["reps"]
    summary: dict[str, Any] = {m: _stat([r[m] for r in reps]) for m in SUMMARY_METRICS}
    checks = [r["check"] for r in reps if "check" in r]
    if not checks:
        summary["consistency"] = "n/a"
    elif not all(c["loadable"] for c in checks):
        summary["consistency"] = "UNLOADABLE"
    elif all(c["consistent"] for c in checks):
        summary["consistency"] = f"ok {len(checks)}/{len(checks)}"
    else:
        bad = sum(not c["consistent"] for c in checks)
        summary["consistency"] = f"TORN {bad}/{len(checks)}"
    summary["loadable"] = all(c["loadable"] for c in checks) if checks else None
    allocs = case["allocations"]
    staged = allocs[0] is not None and allocs[0] > 0  # None/0: this writer stages nothing
    summary["staging_reused"] = all(a == allocs[0] for a in allocs[1:]) if staged else None
    summary["peak_extra_bytes"] = case["cold"]["peak_extra_bytes"]
    summary["peak_extra_ratio"] = case["cold"]["peak_extra_bytes"] / case["state_bytes"]
    summary["first_s"] = case["cold"]["durable_s"]
    return summary


def median(report: dict[str, Any], writer: str, workload: str, metric: str) -> float | None:
    """The summary figure of one cell (a stat's median), None if not run or failed."""
    case = report["cases"].get(f"{writer}|{workload}")
    if not case or "summary" not in case:
        return None
    stat = case["summary"].get(metric)
    if isinstance(stat, dict):
        return float(stat["median"])
    return None if stat is None else float(stat)


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    n = len(xs)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx if sxx else math.nan
    intercept = my - slope * mx
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot else 1.0
    return {"slope": slope, "intercept": intercept, "r2": r2, "points": n}


def sweep_fits(report: dict[str, Any]) -> dict[str, Any]:
    fits: dict[str, Any] = {}
    for group, unit, scale in (("sweep-size", "s/GiB", GiB), ("sweep-count", "s/1k tensors", 1000)):
        names = [w.name for w in WORKLOADS.values() if w.group == group]
        if group == "sweep-count":
            names.append("50k-small")
        for writer in report["writers"]:
            for metric in ("lost_s", "durable_s"):
                pts = []
                for name in names:
                    y = median(report, writer, name, metric)
                    if y is not None:
                        wl = WORKLOADS[name]
                        x = wl.state_bytes / scale if group == "sweep-size" else wl.count / scale
                        pts.append((x, y))
                if len(pts) >= 3:
                    fit: dict[str, Any] = dict(linear_fit([p[0] for p in pts], [p[1] for p in pts]))
                    fit["unit"] = unit
                    fits[f"{writer}|{group}|{metric}"] = fit
    return fits


def _fmt_stat(stat: dict[str, Any] | None, digits: int = 3, unit: str = "") -> str:
    if stat is None:
        return "—"
    m, lo, hi = stat["median"], stat["min"], stat["max"]
    return f"{m:.{digits}f}{unit} [{lo:.{digits}f}-{hi:.{digits}f}]"


def _fmt(value: float | str | None, fmt: str) -> str:
    if isinstance(value, str):
        return value
    return "—" if value is None else format(value, fmt)


def _ratio(value: float | None, ref: float | None) -> str:
    return "—" if value is None or ref is None or ref <= 0 else f"{value / ref:.2f}x"


def _mem(summary: dict[str, Any]) -> str:
    return f"{summary['peak_extra_bytes'] / MiB:.0f} MiB ({summary['peak_extra_ratio']:.2f}x)"


def _workload_table(report: dict[str, Any], wl_name: str) -> list[str]:
    lines = [
        "",
        f"## {wl_name}: {WORKLOADS[wl_name].description}",
        "",
        "| writer | lost s | stall s | durable s | first s | slowdown py | slowdown mm | mem "
        "| consistent | staging reused | durability |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for writer in report["writers"]:
        case = report["cases"].get(f"{writer}|{wl_name}")
        if case is None:
            continue
        if "error" in case:
            lines.append(f"| {writer} | ERROR: {case['error'][:80]} ||||||||||")
            continue
        s = case["summary"]
        reused = {None: "—", True: "yes", False: "NO"}[s["staging_reused"]]
        lines.append(
            f"| {writer} | {_fmt_stat(s['lost_s'])} | {_fmt_stat(s['stall_s'])} | "
            f"{_fmt_stat(s['durable_s'])} | {s['first_s']:.3f} | "
            f"{_fmt_stat(s['slowdown_py'], 2)} | {_fmt_stat(s['slowdown_compute'], 2)} | "
            f"{_mem(s)} | {s['consistency']} | {reused} | {case['durability']} |"
        )
    return lines


def compare_table(report: dict[str, Any], wl_name: str) -> list[str]:
    """``--compare``: ours beside ppe's and DCP's, with ratios to memcpy and torch.save."""
    memcpy = median(report, "memcpy", wl_name, "lost_s")
    sync = median(report, "torch.save+fsync", wl_name, "durable_s")
    lines = [
        "",
        f"### {wl_name}: {WORKLOADS[wl_name].description}",
        "",
        "| writer | lost s | lost / memcpy | durable s | durable / torch.save+fsync | first s "
        "| slowdown | mem | consistent | durability |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = [w for w in COMPARE_WRITERS if w in report["writers"]]
    order += [w for w in report["writers"] if w not in order]
    for writer in order:
        case = report["cases"].get(f"{writer}|{wl_name}")
        if case is None:
            continue
        if "error" in case:
            lines.append(f"| {writer} | ERROR: {case['error'][:80]} |||||||||")
            continue
        s = case["summary"]
        lost = median(report, writer, wl_name, "lost_s")
        durable = median(report, writer, wl_name, "durable_s")
        slow = [v for v in (s["slowdown_py"], s["slowdown_compute"]) if v is not None]
        slowdown = f"{max(v['median'] for v in slow):.2f}x" if slow else None
        lines.append(
            f"| {writer} | {_fmt(lost, '.3f')} | {_ratio(lost, memcpy)} | "
            f"{_fmt(durable, '.3f')} | {_ratio(durable, sync)} | {s['first_s']:.3f} | "
            f"{_fmt(slowdown, '.2f')} | {_mem(s)} | {s['consistency']} | "
            f"{case['durability']} |"
        )
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"# snapwriter benchmark — {meta['date']}",
        "",
        f"`{meta['command']}`  ",
        f"{meta['machine']['summary']}; torch {meta['torch']}, "
        f"ppe {meta['ppe']}, snapwriter {meta['snapwriter']}; "
        f"CRC-32 {meta.get('crc32', '?')}, staging copies on {meta.get('copy_threads', '?')} "
        "threads; "
        f"{meta['reps']} warm reps per cell (median [min-max]); "
        f"torch threads {meta['threads']}; wall {meta['wall_seconds']:.0f}s",
        "",
        "lost = stall + extra step time + extra loop time while in flight (s). "
        "durable = call → file fsync'd and renamed (ppe and torch.save: call → done, no fsync). "
        "first = durable of the cold (first) save. "
        "slowdown = in-flight chunk time / idle chunk time. mem = peak extra PSS of the process "
        "tree during the cold save, x state size.",
    ]
    for wl_name in report["workloads"]:
        lines += _workload_table(report, wl_name)
    if meta.get("compare"):
        lines += [
            "",
            "## Comparison: snapwriter, ppe and DCP",
            "",
            "Medians; lost / memcpy and durable / torch.save+fsync are ratios of medians; "
            "slowdown is the worse of the two loops.",
        ]
        for wl_name in report["workloads"]:
            lines += compare_table(report, wl_name)
    if report.get("sweep_fits"):
        lines += [
            "",
            "## Sweeps: linear fits of the medians",
            "",
            "| writer | sweep | metric | slope | intercept s | R2 |",
            "|---|---|---|---|---|---|",
        ]
        for key, fit in report["sweep_fits"].items():
            writer, group, metric = key.split("|")
            lines.append(
                f"| {writer} | {group} | {metric} | {fit['slope']:.4f} {fit['unit']} | "
                f"{fit['intercept']:.4f} | {fit['r2']:.3f} |"
            )
    lines += ["", f"## Targets ({DEFAULT_WRITER})", ""]
    for t in report["targets"]:
        lines.append(f"- **{t['verdict']}** {t['target']}: {t['detail']}")
    lines += ["", "## Targets (every asynchronous snapwriter writer)", ""]
    for t in report.get("writer_targets", []):
        lines.append(f"- **{t['verdict']}** {t['target']}: {t['detail']}")
    return "\n".join(lines) + "\n"
