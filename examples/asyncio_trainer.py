"""An asyncio trainer that snapshots without stalling its event loop.

Calling the writer stages the state (a quick copy) and returns a handle; writing,
fsync and the atomic rename run off the loop. This trainer fires snapshots and forgets
them (a reporter task awaits each handle), awaits the final one with ``asave``, and lets
``async with`` (``aclose``) wait for anything still pending. A heartbeat task ticks every
few milliseconds throughout, to show the loop keeps running while saves are in flight.
The script ends by loading the final snapshot into a fresh model and checking that the
state round-trips.

Run::

    python examples/asyncio_trainer.py [--out DIR] [--steps N] [--every K]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import snapwriter

HEARTBEAT_SECONDS = 0.002


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))


@dataclass
class Heartbeat:
    ticks: int = 0
    ticks_while_saving: int = 0


async def heartbeat(writer: snapwriter.StandardWriter, beat: Heartbeat) -> None:
    """Tick until cancelled, counting the ticks that happen while a save is in flight."""
    while True:
        await asyncio.sleep(HEARTBEAT_SECONDS)
        beat.ticks += 1
        if writer.pending():
            beat.ticks_while_saving += 1


async def report(handle: snapwriter.SnapshotHandle, called_at: float, stall: float) -> None:
    """Await one snapshot (without blocking the loop) and print its figures."""
    result = await handle
    print(
        f"  committed {result.path}: {result.nbytes / 1e6:.1f} MB, call stall "
        f"{stall * 1e3:.2f} ms, durable {(time.perf_counter() - called_at) * 1e3:.0f} ms "
        "after the call"
    )


async def train(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    x = torch.randn(64, 256)
    y = torch.roll(x, 1, dims=1)
    beat = Heartbeat()
    reporters: list[asyncio.Task[None]] = []

    async with snapwriter.StandardWriter(out_dir=args.out, max_pending=2) as writer:
        ticker = asyncio.create_task(heartbeat(writer, beat))
        for step in range(1, args.steps + 1):
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            await asyncio.sleep(0.001)  # stands for awaiting the next batch, metrics, RPCs
            if step % args.every == 0:
                await writer.wait_for_room()  # max_pending in flight: wait, loop keeps running
                state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
                start = time.perf_counter()
                handle = writer(f"snapshot_{step:05d}.pt", args.out, {**state, "step": step})
                stall = time.perf_counter() - start
                print(f"step {step:4d}  loss {loss.item():.4f}  snapshot fired")
                reporters.append(asyncio.create_task(report(handle, start, stall)))

        final_state = {
            "model": model.state_dict(),
            "optim": optimizer.state_dict(),
            "step": args.steps,
        }
        expected = copy.deepcopy(final_state)
        result = await writer.asave("final.pt", args.out, final_state)  # await durability
        print(f"final snapshot durable: {result.path}")
        await asyncio.gather(*reporters)
        ticker.cancel()
    # `async with` awaited writer.aclose(): nothing is pending any more.

    print(
        f"heartbeat: {beat.ticks} ticks, {beat.ticks_while_saving} of them while a save "
        "was in flight: the event loop kept running"
    )
    loaded = torch.load(result.path, weights_only=True)
    resumed = make_model()
    resumed.load_state_dict(loaded["model"])
    for name, tensor in expected["model"].items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert torch.equal(resumed(x), model(x))
    assert loaded["step"] == args.steps
    print("resumed from final.pt: state round-trips")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out/asyncio_trainer", help="snapshot directory")
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument("--every", type=int, default=10, help="snapshot every K steps")
    args: Any = parser.parse_args()
    asyncio.run(train(args))


if __name__ == "__main__":
    main()
