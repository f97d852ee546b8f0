"""snapwriter demo: snapshot a training run without stalling it.

Trains a small MLP on synthetic data twice, in a plain loop and in an asyncio trainer,
snapshotting every few steps with snapwriter. At each snapshot it also saves the same
state the usual way, a blocking ``torch.save`` followed by ``fsync``, and shows how long
each one stalls training. Then it resumes from the newest snapshot of each run and
checks that model and optimizer state round-trip exactly.

Run::

    python examples/demo.py [--out DIR] [--steps N] [--every K] [--quick]

With ``rich`` installed (``pip install 'snapwriter[demo]'``) and a terminal, progress is
shown live; otherwise (or with ``--display plain``) the demo prints plain lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import snapwriter

IN_FEATURES = 256
BATCH = 64
SAMPLES = 4096
HEARTBEAT_SECONDS = 0.005
MODES = {"sync": "plain loop", "asyncio": "asyncio trainer"}
BASELINE_NAME = "torch_save_baseline.pt"


# -- training ---------------------------------------------------------------------------


class Trainer:
    """An MLP with Adam on a fixed synthetic regression task (same data for every seed)."""

    def __init__(self, hidden: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(
            nn.Linear(IN_FEATURES, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, IN_FEATURES),
        )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        data = torch.Generator().manual_seed(1234)
        self.x = torch.randn(SAMPLES, IN_FEATURES, generator=data)
        self.y = torch.sin(self.x @ torch.randn(IN_FEATURES, IN_FEATURES, generator=data) / 16)

    def step(self, step: int) -> float:
        start = (step * BATCH) % SAMPLES
        x, y = self.x[start : start + BATCH], self.y[start : start + BATCH]
        loss = nn.functional.mse_loss(self.model(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def state(self, step: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": step,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def state_bytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def assert_same(actual: Any, expected: Any, where: str = "state") -> None:
    """Assert that two nested states are equal, tensors bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), f"{where}: keys differ"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def blocking_save(state: Any, path: str) -> float:
    """The usual way: ``torch.save`` then ``fsync``, training waits. Returns seconds."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


# -- bookkeeping shared by both trainers and the displays -------------------------------


@dataclass
class Snap:
    """One snapshot point: both stalls, and snapwriter's handle.

    ``snapwriter_stall`` is the time the loop waited for room (the previous save still in
    flight, ``max_pending=1``) plus the call itself, which stages the state.
    """

    step: int
    name: str
    snapwriter_stall: float
    torch_save_stall: float
    handle: snapwriter.SnapshotHandle
    reported: bool = False

    def status(self) -> str:
        if not self.handle.done():
            return "in flight"
        exc = self.handle.exception()
        return "committed" if exc is None else f"FAILED: {exc}"


@dataclass
class Run:
    """What one trainer did, as the display shows it."""

    mode: str
    steps: int
    every: int
    directory: str
    step: int = 0
    loss: float = math.nan
    state_mb: float = 0.0
    snaps: list[Snap] = field(default_factory=list)
    loop_ticks_while_saving: int = 0
    loop_max_gap_while_saving: float = 0.0
    resume: str = ""

    @property
    def title(self) -> str:
        return MODES[self.mode]

    def in_flight(self) -> int:
        return sum(not s.handle.done() for s in self.snaps)

    def committed(self) -> int:
        return sum(s.handle.done() and s.handle.exception() is None for s in self.snaps)

    def medians(self) -> tuple[float, float]:
        return (
            statistics.median(s.snapwriter_stall for s in self.snaps),
            statistics.median(s.torch_save_stall for s in self.snaps),
        )


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def prepare_directory(out: str, mode: str) -> str:
    directory = os.path.join(out, mode)
    os.makedirs(directory, exist_ok=True)
    for old in glob.glob(os.path.join(directory, "snapshot_*.pt")):
        os.remove(old)  # a previous run's files would confuse the resume check
    return directory


# -- displays ---------------------------------------------------------------------------


class PlainDisplay:
    """One line per event: readable in logs and CI."""

    @contextlib.contextmanager
    def showing(self, run: Run) -> Iterator[None]:
        """Show ``run`` while the body trains it."""
        self.begin(run)
        try:
            yield
        finally:
            self.end(run)

    def begin(self, run: Run) -> None:
        print(
            f"== {run.title}: {run.steps} steps, a snapshot of about {run.state_mb:.0f} MB "
            f"(model + Adam state) every {run.every} steps, into {run.directory}",
            flush=True,
        )

    def snapshot(self, run: Run, snap: Snap) -> None:
        print(
            f"[{run.mode}] step {run.step:4d}/{run.steps}  loss {run.loss:.5f}  {snap.name}: "
            f"stall snapwriter {ms(snap.snapwriter_stall)} | torch.save+fsync "
            f"{ms(snap.torch_save_stall)}",
            flush=True,
        )

    def progress(self, run: Run) -> None:
        for snap in run.snaps:
            if snap.reported or not snap.handle.done():
                continue
            snap.reported = True
            if snap.status() == "committed":
                result = snap.handle.result()
                print(
                    f"[{run.mode}]   committed {snap.name} in the background: write "
                    f"{ms(result.write_seconds)}, commit {ms(result.commit_seconds)}",
                    flush=True,
                )
            else:
                print(f"[{run.mode}]   {snap.name}: {snap.status()}", flush=True)

    def end(self, run: Run) -> None:
        self.progress(run)

    def summary(self, runs: list[Run]) -> None:
        print("\nsummary: stall = time training waits at a snapshot")
        rows = [("mode", "snapshots", "snapwriter", "torch.save+fsync", "ratio")]
        for run in runs:
            sw, ts = run.medians()
            rows.append((run.mode, str(len(run.snaps)), ms(sw), ms(ts), ratio(sw, ts)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print(
                "  ".join(
                    c.rjust(w) if i else c.ljust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
        for line in notes(runs):
            print(line)


def ratio(snapwriter_stall: float, torch_save_stall: float) -> str:
    if snapwriter_stall <= 0:
        return "-"
    times = torch_save_stall / snapwriter_stall
    return f"{times:.1f}x" if times < 10 else f"{times:.0f}x"


def notes(runs: list[Run]) -> list[str]:
    lines = [
        "(medians; snapwriter's stall is waiting for room + staging the state; the first call "
        "also starts the writer's loop and allocates its staging buffers)"
    ]
    for run in runs:
        if run.mode == "asyncio":
            lines.append(
                f"asyncio: the event loop ticked {run.loop_ticks_while_saving} times while "
                f"snapwriter saves were in flight (longest gap {ms(run.loop_max_gap_while_saving)}"
                "); each torch.save blocked it throughout"
            )
    lines += [run.resume for run in runs]
    return lines


class LiveDisplay(PlainDisplay):
    """A live view with rich: progress, loss, snapshots in flight and their stalls."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console()
        self.live: Any = None

    def begin(self, run: Run) -> None:
        from rich.live import Live

        self.live = Live(
            get_renderable=lambda: self.render(run),
            console=self.console,
            refresh_per_second=10,
            redirect_stdout=False,
        )
        self.live.start()

    def render(self, run: Run) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        head = Table.grid(padding=(0, 2))
        head.add_row(
            Text(run.title, style="bold cyan"),
            ProgressBar(total=run.steps, completed=run.step, width=40),
            f"step {run.step}/{run.steps}",
            f"loss {run.loss:.5f}",
            f"state {run.state_mb:.1f} MB",
        )
        counts = Text.assemble(
            "snapshots: ",
            (f"{run.committed()} committed", "green"),
            ", ",
            (f"{run.in_flight()} in flight", "yellow"),
        )
        table = Table(box=None, pad_edge=False)
        for column in ("step", "file"):
            table.add_column(column)
        table.add_column("snapwriter stall", justify="right", style="green")
        table.add_column("torch.save+fsync", justify="right", style="red")
        table.add_column("status")
        for snap in run.snaps[-8:]:
            status = snap.status()
            style = {"in flight": "yellow", "committed": "green"}.get(status, "bold red")
            table.add_row(
                str(snap.step),
                snap.name,
                ms(snap.snapwriter_stall),
                ms(snap.torch_save_stall),
                Text(status, style=style),
            )
        parts: list[Any] = [head, counts, table]
        if run.mode == "asyncio":
            parts.append(
                Text(
                    f"event loop: {run.loop_ticks_while_saving} heartbeats while saves were in "
                    f"flight, longest gap {ms(run.loop_max_gap_while_saving)}",
                    style="dim",
                )
            )
        return Group(*parts, Text(""))

    def snapshot(self, run: Run, snap: Snap) -> None:
        pass  # the live view shows it

    def progress(self, run: Run) -> None:
        pass

    def end(self, run: Run) -> None:
        self.live.refresh()
        self.live.stop()

    def summary(self, runs: list[Run]) -> None:
        from rich.table import Table

        table = Table(title="stall = time training waits at a snapshot (median)")
        table.add_column("mode")
        table.add_column("snapshots", justify="right")
        table.add_column("snapwriter", justify="right", style="green")
        table.add_column("torch.save+fsync", justify="right", style="red")
        table.add_column("ratio", justify="right", style="bold")
        for run in runs:
            sw, ts = run.medians()
            table.add_row(run.mode, str(len(run.snaps)), ms(sw), ms(ts), ratio(sw, ts))
        self.console.print(table)
        for line in notes(runs):
            self.console.print(line, highlight=False)


def make_display(choice: str) -> PlainDisplay:
    if choice == "plain" or (choice == "auto" and not sys.stdout.isatty()):
        return PlainDisplay()
    try:
        return LiveDisplay()
    except ImportError:
        if choice == "live":
            raise SystemExit("--display live needs rich: pip install 'snapwriter[demo]'") from None
        return PlainDisplay()


# -- the two trainers -------------------------------------------------------------------


@dataclass
class Config:
    out: str
    steps: int
    every: int
    hidden: int

    def snapshot_due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.steps


def snapshot_both_ways(
    run: Run, writer: snapwriter.StandardWriter, state: dict[str, Any], waited: float
) -> Snap:
    """At one snapshot point: the blocking ``torch.save`` first, then the snapwriter call.

    Args:
        waited: how long the trainer already waited for room in the writer.
    """
    run.state_mb = state_bytes(state) / 1e6
    torch_save_stall = blocking_save(state, os.path.join(run.directory, BASELINE_NAME))
    name = f"snapshot_{run.step:06d}.pt"
    start = time.perf_counter()
    handle = writer(name, run.directory, state)  # stages the state and returns
    snap = Snap(run.step, name, waited + time.perf_counter() - start, torch_save_stall, handle)
    run.snaps.append(snap)
    return snap


def run_sync(cfg: Config, display: PlainDisplay) -> tuple[Run, Trainer]:
    """The plain loop: snapshot, keep training; ``with`` finalizes the writer."""
    trainer = Trainer(cfg.hidden, seed=0)
    run = Run("sync", cfg.steps, cfg.every, prepare_directory(cfg.out, "sync"))
    run.state_mb = state_bytes(trainer.state(0)["model"]) * 3 / 1e6  # weights + Adam's two
    with display.showing(run), snapwriter.StandardWriter(out_dir=run.directory) as writer:
        for step in range(1, cfg.steps + 1):
            run.loss, run.step = trainer.step(step), step
            if cfg.snapshot_due(step):
                start = time.perf_counter()
                if run.snaps:  # max_pending=1: a call waits for the previous save
                    run.snaps[-1].handle.result()
                waited = time.perf_counter() - start
                snap = snapshot_both_ways(run, writer, trainer.state(step), waited)
                display.snapshot(run, snap)
            display.progress(run)
    os.remove(os.path.join(run.directory, BASELINE_NAME))
    return run, trainer


class LoopMonitor:
    """Ticks on the event loop; measures how it fares while snapwriter saves run."""

    def __init__(self, run: Run, writer: snapwriter.StandardWriter) -> None:
        self.run = run
        self.writer = writer
        self.blocked = False  # set while a blocking torch.save holds the loop

    async def tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            now = time.perf_counter()
            gap, last = now - last, now
            if self.blocked:  # this gap is torch.save's, not snapwriter's
                self.blocked = False
            elif self.writer.pending():
                self.run.loop_ticks_while_saving += 1
                self.run.loop_max_gap_while_saving = max(self.run.loop_max_gap_while_saving, gap)


async def run_asyncio(cfg: Config, display: PlainDisplay) -> tuple[Run, Trainer]:
    """The asyncio trainer: compute in a thread, snapshots fired from the loop."""
    trainer = Trainer(cfg.hidden, seed=0)
    run = Run("asyncio", cfg.steps, cfg.every, prepare_directory(cfg.out, "asyncio"))
    run.state_mb = state_bytes(trainer.state(0)["model"]) * 3 / 1e6  # weights + Adam's two
    with display.showing(run):
        async with snapwriter.StandardWriter(out_dir=run.directory) as writer:
            monitor = LoopMonitor(run, writer)
            ticker = asyncio.create_task(monitor.tick())
            for step in range(1, cfg.steps + 1):
                # Compute in a thread: the loop stays free for I/O (data, metrics, RPC).
                run.loss, run.step = await asyncio.to_thread(trainer.step, step), step
                if cfg.snapshot_due(step):
                    start = time.perf_counter()
                    await writer.wait_for_room()  # the trainer waits; the loop runs on
                    waited = time.perf_counter() - start
                    monitor.blocked = True  # torch.save is about to block the loop
                    snap = snapshot_both_ways(run, writer, trainer.state(step), waited)
                    display.snapshot(run, snap)
                display.progress(run)
            ticker.cancel()
        # `async with` awaited writer.aclose(): every snapshot is durable now.
    os.remove(os.path.join(run.directory, BASELINE_NAME))
    return run, trainer


def check_resume(cfg: Config, run: Run, trainer: Trainer) -> str:
    """Resume from the newest snapshot into a differently seeded trainer; compare."""
    latest = snapwriter.find_latest_snapshot(run.directory, "snapshot_*.pt")
    assert latest is not None, f"no snapshot in {run.directory}"
    state = torch.load(latest, weights_only=True)
    resumed = Trainer(cfg.hidden, seed=1)
    resumed.load(state)
    assert state["step"] == cfg.steps
    assert_same(resumed.state(cfg.steps), trainer.state(cfg.steps))
    next_loss = trainer.step(cfg.steps + 1)
    resumed_loss = resumed.step(cfg.steps + 1)
    # The states are equal bit for bit (above); the step's matmuls need not be: a BLAS
    # may pick another kernel for buffers at other addresses (MKL without CBWR), which
    # moves the last bits. A real divergence (a torn or stale snapshot) is far larger.
    assert math.isclose(resumed_loss, next_loss, rel_tol=1e-5, abs_tol=1e-7), (
        f"the resumed run diverged: {resumed_loss!r} != {next_loss!r}"
    )
    return (
        f"{run.mode}: resumed from {latest} (step {state['step']}): model and optimizer "
        f"state round-trip bit for bit; the next step's loss matches ({next_loss:.6f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out/demo", help="where snapshots go")
    parser.add_argument("--steps", type=int, help="training steps per trainer (120)")
    parser.add_argument("--every", type=int, help="snapshot every K steps (15)")
    parser.add_argument("--hidden", type=int, help="hidden width of the MLP (1024)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a run of seconds, for tests: defaults of 30 steps, every 10, width 128",
    )
    parser.add_argument(
        "--display",
        choices=("auto", "live", "plain"),
        default="auto",
        help="live needs rich; auto: live when stdout is a terminal and rich is installed",
    )
    args = parser.parse_args(argv)
    steps, every, hidden = (30, 10, 128) if args.quick else (120, 15, 1024)
    cfg = Config(args.out, args.steps or steps, args.every or every, args.hidden or hidden)
    display = make_display(args.display)

    sync_run, sync_trainer = run_sync(cfg, display)
    async_run, async_trainer = asyncio.run(run_asyncio(cfg, display))
    sync_run.resume = check_resume(cfg, sync_run, sync_trainer)
    async_run.resume = check_resume(cfg, async_run, async_trainer)
    display.summary([sync_run, async_run])
    return 0


if __name__ == "__main__":
    sys.exit(main())
