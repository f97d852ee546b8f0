"""What the rank processes of the distributed tests run (module level: fork-friendly)."""

from __future__ import annotations

import os
from typing import Any

import torch
from pytorch_pfn_extras.training import ExtensionsManager, extensions
from pytorch_pfn_extras.training.extensions import SnapshotMode

import snapwriter
from tests.conftest import FACTORIES
from tests.distributed.ranks import RankContext, kill_self

ITERS = 4


def rank_model(rank: int) -> torch.nn.Module:
    torch.manual_seed(100 + rank)  # every rank's shard differs
    return torch.nn.Linear(4, 3)


def train_ppe(ctx: RankContext) -> dict[str, Any]:
    """ppe training with a snapshot extension in ``extra["mode"]``, then a report.

    With ``extra["resume"]`` the same processes then start over with a fresh writer,
    model and manager that autoload (a restart, without paying for new processes).
    """
    first = _train_ppe(ctx, ctx.extra)
    if not ctx.extra.get("resume"):
        return first
    import torch.distributed as dist

    dist.barrier()  # the first job is over on every rank (finalized) before the restart
    second = _train_ppe(ctx, {**ctx.extra, "autoload": True, "seed": 7})
    return {"first": first, "second": second}


def _train_ppe(ctx: RankContext, extra: dict[str, Any]) -> dict[str, Any]:
    model = rank_model(ctx.rank + extra.get("seed", 0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = FACTORIES[extra["writer"]](out_dir=str(ctx.out))
    mode = SnapshotMode[extra.get("mode", "SHARDED")]
    snap = extensions.snapshot(
        writer=writer,
        n_retains=extra.get("n_retains", -1),
        autoload=extra.get("autoload", False),
        snapshot_mode=mode,
        saver_rank=extra.get("saver_rank", 0),
        snapshot_on_error=extra.get("on_error", False),
    )
    manager = ExtensionsManager(
        model,
        optimizer,
        max_epochs=1,
        iters_per_epoch=extra.get("iters", ITERS),
        out_dir=str(ctx.out),
    )
    manager.extend(snap, trigger=(1, "iteration"))
    loaded = snap.initialize(manager) if extra.get("autoload") else None
    start = manager.iteration
    loaded_weight = model.weight.detach().flatten().tolist()
    fault = extra.get("fault")
    error = None
    try:
        while not manager.stop_trigger:
            if (
                fault is not None
                and ctx.rank == fault["rank"]
                and manager.iteration + 1 == fault["at"]
            ):
                arm_fault(fault["point"], f"snapshot_iter_{fault['at']}")
            with manager.run_iteration():
                if extra.get("raise_at") == manager.iteration:
                    raise ValueError("training failed")
                optimizer.zero_grad()
                model(torch.ones(2, 4)).sum().backward()
                optimizer.step()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, snapwriter.IncompleteSetError):
            # a set's failure reaches the next call first (then finalize() does not
            # repeat it): report it like finalize's
            error = {
                "type": type(exc).__name__,
                "message": str(exc),
                "missing": list(exc.missing_ranks),
            }
    final_error = None
    try:
        writer.finalize()
    except snapwriter.SnapshotError as exc:
        final_error = {
            "type": type(exc).__name__,
            "message": str(exc),
            "missing": list(getattr(exc, "missing_ranks", ())),
        }
    return {
        "start": start,
        "iteration": manager.iteration,
        "loaded": loaded,
        "loaded_weight": loaded_weight,
        "error": error,
        "finalize_error": final_error,
        "weight": model.weight.detach().flatten().tolist(),
    }


def arm_fault(point: str, where: str) -> None:
    """Make this rank kill -9 itself at ``point`` of its save of set ``where``.

    Fault injection in the victim's own process: the patched functions die only for
    paths of that set (saves of earlier sets may still be in flight in the background).
    """
    from snapwriter import _coordination, _staging, _storage

    def hit(path: Any) -> bool:
        return where in str(path)

    if point == "staging":
        stage = _staging.Stager.stage
        _staging.Stager.stage = lambda self, *a, **k: kill_self()  # type: ignore[method-assign]
        _ = stage  # staging happens in the call of that very set
    elif point == "write":
        original = _storage.Storage.write_temp

        def write_half(self: Any, dest: Any, savefun: Any, target: Any, kwds: Any) -> Any:
            if not hit(dest.path):
                return original(self, dest, savefun, target, kwds)

            def partial(obj: Any, f: Any, **kw: Any) -> None:
                f.write(b"\0" * 4096)  # a temporary file, half written
                f.flush()
                kill_self()

            return original(self, dest, partial, target, kwds)

        _storage.Storage.write_temp = write_half  # type: ignore[method-assign]
    elif point == "before_commit":
        commit = _storage.Storage.acommit

        async def no_commit(self: Any, tmp: str, dest: Any) -> None:
            if hit(dest.path):
                kill_self()
            await commit(self, tmp, dest)

        _storage.Storage.acommit = no_commit  # type: ignore[method-assign]
    elif point == "after_commit":
        publish = _coordination.SetRole._publish_member

        async def no_report(self: Any, record: Any) -> None:
            if hit(self.set_dir):
                kill_self()
            await publish(self, record)

        _coordination.SetRole._publish_member = no_report  # type: ignore[method-assign]
    elif point == "before_marker":
        write = _coordination._write_manifest

        def no_manifest(fs: Any, path: str, *args: Any) -> None:
            if hit(path):
                kill_self()
            write(fs, path, *args)

        _coordination._write_manifest = no_manifest
    else:  # pragma: no cover
        raise ValueError(point)


def native_sets(ctx: RankContext) -> dict[str, Any]:
    """The native API: ``extra["sets"]`` sets of a rank-specific shard."""
    extra = ctx.extra
    writer = FACTORIES[extra.get("writer", "ThreadWriter")](out_dir=str(ctx.out))
    sets = snapwriter.RankSetWriter(
        writer, keep_last=extra.get("keep_last"), timeout=extra.get("timeout")
    )
    results = []
    fault = extra.get("fault")
    for step in range(1, extra.get("sets", 2) + 1):
        if fault is not None and ctx.rank == fault["rank"] and step == fault["at"]:
            arm_fault(fault["point"], f"step_{step}")
        shard = {"w": torch.full((64,), float(ctx.rank * 1000 + step)), "step": step}
        handle = sets(f"step_{step}", shard)
        shard["w"].add_(1)  # staged: the set holds the values at the call
        try:
            r = handle.result(60)
            results.append(
                {
                    "path": r.path,
                    "members": [m.size for m in r.manifest.members],
                    "digest": [m.digest for m in r.manifest.members],
                }
            )
        except snapwriter.SnapshotError as exc:
            results.append(
                {
                    "error": type(exc).__name__,
                    "message": str(exc),
                    "missing": list(getattr(exc, "missing_ranks", ())),
                }
            )
    final = None
    try:
        sets.finalize()
    except snapwriter.SnapshotError as exc:
        final = {"type": type(exc).__name__, "missing": list(getattr(exc, "missing_ranks", ()))}
    return {"results": results, "finalize_error": final, "pid": os.getpid()}
