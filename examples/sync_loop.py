"""A plain training loop that snapshots in the background with snapwriter.

Every ``--every`` steps the loop calls the writer, which copies (stages) the state and
returns at once; the file is written, fsynced and renamed into place in the background
while training goes on. ``finalize()`` (here: leaving the ``with`` block) waits for the
last save. The script ends by loading the newest snapshot into a fresh model and
checking that it holds exactly the state of the step it was taken at.

Run::

    python examples/sync_loop.py [--out DIR] [--steps N] [--every K]
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from torch import nn

import snapwriter


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 1))


def assert_same(actual: Any, expected: Any, where: str = "state") -> None:
    """Assert that two nested states (dicts, lists, tensors, numbers) are equal."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out/sync_loop", help="snapshot directory")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--every", type=int, default=25, help="snapshot every K steps")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(512, 32)
    y = x.sum(dim=1, keepdim=True).sin()

    last_state: dict[str, Any] = {}
    with snapwriter.StandardWriter(out_dir=args.out) as writer:
        for step in range(1, args.steps + 1):
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % args.every == 0 or step == args.steps:
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                }
                handle = writer(f"snapshot_{step:06d}.pt", args.out, state)
                last_state = copy.deepcopy(state)  # only to check the round trip below
                print(
                    f"step {step:4d}  loss {loss.item():.4f}  "
                    f"snapshot staged in {handle.stage_seconds * 1e3:.2f} ms"
                )
    # The with block called writer.finalize(): every snapshot is now durable.
    stats = writer.stats()
    print(f"{stats.committed} snapshots committed, {stats.bytes_written / 1e6:.2f} MB")

    latest = snapwriter.find_latest_snapshot(args.out, "snapshot_*.pt")
    assert latest is not None, "no snapshot found"
    loaded = torch.load(latest, weights_only=True)
    assert_same(loaded, last_state)
    resumed = make_model()
    resumed.load_state_dict(loaded["model"])
    assert torch.equal(resumed(x), model(x))
    print(f"resumed from {latest} at step {loaded['step']}: state round-trips")


if __name__ == "__main__":
    main()
