"""snapwriter inside pytorch-pfn-extras: snapshots, retention and autoload-resume.

``extensions.snapshot(writer=snapwriter.StandardWriter(out_dir=...), n_retains=3,
autoload=True)`` is all it takes: ppe builds the manager's state and calls the writer,
snapwriter stages it and writes it in the background, ppe's ``n_retains`` clean-up runs
after each commit, and ``autoload`` finds the newest snapshot through ``writer.fs`` and
``writer.out_dir``.

The script trains for a few epochs, "crashes" (stops), builds a fresh model, optimizer
and manager on the same directory, and checks that autoload restored the exact state
and iteration; then it finishes training.

Run::

    python examples/ppe_manager.py [--out DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
import glob
import os

import pytorch_pfn_extras as ppe
import pytorch_pfn_extras.training.extensions as extensions
import torch
from torch import nn

import snapwriter

ITERS_PER_EPOCH = 8
N_RETAINS = 3


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))


def make_manager(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    writer: snapwriter.StandardWriter | None,
    epochs: int,
) -> ppe.training.ExtensionsManager:
    """A manager that snapshots every epoch through ``writer`` and resumes from it.

    Without a writer: a manager with no extension (the uninterrupted reference run).
    """
    if writer is None:
        return ppe.training.ExtensionsManager(
            model, optimizer, epochs, iters_per_epoch=ITERS_PER_EPOCH, out_dir="."
        )  # ppe's default writer writes nothing unless asked to
    snapshot = extensions.snapshot(
        filename="snapshot_iter_{.iteration}",
        writer=writer,
        n_retains=N_RETAINS,
        autoload=True,
    )
    return ppe.training.ExtensionsManager(
        model,
        optimizer,
        epochs,
        iters_per_epoch=ITERS_PER_EPOCH,
        out_dir=writer.out_dir,
        extensions=[snapshot],  # snapshot() triggers once per epoch by default
    )


def train(
    manager: ppe.training.ExtensionsManager,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    stop_after_epochs: int | None = None,
    verbose: bool = True,
) -> None:
    """Run ``manager`` to its end (or stop early, as a crash would)."""
    while not manager.stop_trigger:
        for x, y in data:
            with manager.run_iteration():
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        if verbose:
            print(f"epoch {manager.epoch}  iteration {manager.iteration}  loss {loss.item():.4f}")
        if stop_after_epochs is not None and manager.epoch >= stop_after_epochs:
            return


def fresh_run(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = make_model()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out/ppe_manager", help="snapshot directory")
    parser.add_argument("--epochs", type=int, default=6, help="epochs in all")
    args = parser.parse_args()
    crash_epoch = args.epochs // 2
    os.makedirs(args.out, exist_ok=True)
    for old in glob.glob(os.path.join(args.out, "snapshot_iter_*")):
        os.remove(old)  # autoload would otherwise resume a previous run of this script

    torch.manual_seed(0)
    data = [(torch.randn(32, 16), torch.randint(0, 4, (32,))) for _ in range(ITERS_PER_EPOCH)]

    # Run 1 trains half the epochs, then stops as a crash would. Snapshots already handed
    # to the writer still complete (at the latest when the process exits); the process
    # lives on here, so wait for them explicitly.
    model, optimizer = fresh_run(seed=0)
    writer = snapwriter.StandardWriter(out_dir=args.out)
    manager = make_manager(model, optimizer, writer, args.epochs)
    train(manager, model, optimizer, data, stop_after_epochs=crash_epoch)
    writer.finalize()
    stopped_at = {k: v.clone() for k, v in model.state_dict().items()}
    files = sorted(f for f in os.listdir(args.out) if f.startswith("snapshot_iter_"))
    print(f"stopped after epoch {crash_epoch}; snapshots kept (n_retains={N_RETAINS}): {files}")
    assert len(files) == min(crash_epoch, N_RETAINS), files

    # Run 2, as a restarted process would do it: differently initialised, autoload
    # restores the newest snapshot (model, optimizer, iteration) when the manager starts.
    model, optimizer = fresh_run(seed=1)
    writer = snapwriter.StandardWriter(out_dir=args.out)
    manager = make_manager(model, optimizer, writer, args.epochs)
    assert manager.iteration == crash_epoch * ITERS_PER_EPOCH, manager.iteration
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, stopped_at[name]), f"{name} was not restored"
    print(f"resumed at iteration {manager.iteration}: model state round-trips")
    train(manager, model, optimizer, data)  # the manager finalizes the writer at the end
    latest = snapwriter.find_latest_snapshot(args.out, "snapshot_iter_*")
    print(f"finished at iteration {manager.iteration}; latest snapshot: {latest}")
    assert latest is not None
    assert latest.endswith(f"snapshot_iter_{args.epochs * ITERS_PER_EPOCH}")
    assert len([f for f in os.listdir(args.out) if f.startswith("snapshot_iter_")]) == N_RETAINS

    # The same training without interruption ends with identical weights: the resume
    # restored the optimizer's state too, not just the model's.
    reference, ref_optimizer = fresh_run(seed=0)
    ref_manager = make_manager(reference, ref_optimizer, None, args.epochs)
    train(ref_manager, reference, ref_optimizer, data, verbose=False)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), f"{name} differs after resume"
    print("crash + resume ends exactly where uninterrupted training does")


if __name__ == "__main__":
    main()
