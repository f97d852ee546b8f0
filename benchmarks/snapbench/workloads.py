"""The workloads: training-state-like dicts of float32 tensors, and what is done to them.

Every tensor holds integers in [-2**20, 2**20) stored as float32 (Adam's ``step`` counters
hold small integers too), so the "optimizer step" — adding 1.0 to every tensor — is exact,
and a snapshot can be checked against the live state without keeping a second copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import GiB, MiB

#: The ``5k`` workload, one block repeated 100 times (50 tensors each): one 432x256
#: projection, nine 64x64 matrices and forty 512-float vectors (biases, norms, embeddings
#: rows) — 100 x (110,592 + 9 x 4,096 + 40 x 512) floats = 64.06 MiB in 5,000 tensors.
MIXED_BLOCK: tuple[int, ...] = (432 * 256,) + (64 * 64,) * 9 + (512,) * 40
MIXED_BLOCKS = 100

#: The ``50k-adam`` workload: 16,667 parameters of 256 floats, Adam's two moments for each
#: (50,001 tensors of 1 KiB, 48.8 MiB) and 16,667 scalar ``step`` tensors.
ADAM_PARAMS = 16_667
ADAM_NUMEL = 256


@dataclass(frozen=True)
class Workload:
    """A state dict of ``count`` float32 tensors holding about ``nbytes`` bytes together.

    ``kind`` is ``"uniform"`` (``count`` equal tensors under ``"model"``), ``"mixed"``
    (:data:`MIXED_BLOCK` sizes) or ``"adam"`` (a model's and its Adam optimizer's state:
    ``count // 4`` parameters of :data:`ADAM_NUMEL` floats, two moments and a ``step``
    scalar each).
    """

    name: str
    nbytes: int
    count: int
    group: str  # "main", "big", "sweep-size", "sweep-count" or "smoke"
    kind: str = "uniform"

    @property
    def numel_each(self) -> int:
        return max(1, self.nbytes // 4 // self.count)

    def numels(self) -> list[int]:
        """Element counts of the model's tensors, in order (adam: the parameters)."""
        if self.kind == "mixed":
            return list(MIXED_BLOCK) * MIXED_BLOCKS
        if self.kind == "adam":
            return [ADAM_NUMEL] * self.adam_params
        return [self.numel_each] * self.count

    @property
    def adam_params(self) -> int:
        return self.count // 4

    @property
    def state_bytes(self) -> int:
        """Bytes of tensor data in the state (adam: parameters, moments and steps)."""
        model = sum(self.numels()) * 4
        return 3 * model + 4 * self.adam_params if self.kind == "adam" else model

    @property
    def description(self) -> str:
        if self.kind == "adam":
            return (
                f"{self.state_bytes / MiB:.0f} MiB: {self.adam_params} parameters + Adam "
                f"moments ({3 * self.adam_params} tensors) + {self.adam_params} step scalars"
            )
        return f"{self.state_bytes / MiB:.0f} MiB in {self.count} tensors"


def _workloads() -> dict[str, Workload]:
    items = [
        Workload("tiny", 8 * MiB, 16, "smoke"),
        Workload("0.5GiB-190", 512 * MiB, 190, "main"),
        Workload("5k", 64 * MiB, len(MIXED_BLOCK) * MIXED_BLOCKS, "main", "mixed"),
        Workload("50k-small", 50_000 * 256 * 4, 50_000, "main"),
        Workload("50k-adam", 3 * ADAM_PARAMS * ADAM_NUMEL * 4, 4 * ADAM_PARAMS, "main", "adam"),
        Workload("2GiB-400", 2 * GiB, 400, "big"),
    ]
    items += [Workload(f"size-{m}MiB", m * MiB, 200, "sweep-size") for m in (64, 256, 1024, 2048)]
    items += [
        Workload(f"count-{k}k", k * 1000 * 256 * 4, k * 1000, "sweep-count")
        for k in (1, 5, 20)  # 50k-small closes the count sweep
    ]
    return {w.name: w for w in items}


WORKLOADS = _workloads()
#: Workloads of tens of thousands of tensors: every torch.save pickles for seconds.
MANY_TENSORS = ("50k-small", "50k-adam")


def _integers(numel: int, gen: torch.Generator) -> torch.Tensor:
    t = torch.empty(numel, dtype=torch.float32)
    return t.random_(-(2**20), 2**20, generator=gen)


class _AdamModel(torch.nn.Module):
    """Parameters only, in a ParameterList: quick to build even with 16,667 of them."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.layers = torch.nn.ParameterList(torch.nn.Parameter(t) for t in tensors)


def _adam_state(workload: Workload, gen: torch.Generator) -> dict[str, Any]:
    model = _AdamModel([_integers(n, gen) for n in workload.numels()])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # creates exp_avg, exp_avg_sq and step for every parameter
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # integer values again, so the consistency check stays exact
        for per_param in opt.state.values():
            per_param["exp_avg"].random_(-(2**20), 2**20, generator=gen)
            per_param["exp_avg_sq"].random_(0, 2**20, generator=gen)
        for p in model.parameters():
            p.random_(-(2**20), 2**20, generator=gen)
    # Both state dicts hold the live tensors (no copies), as a training script's would.
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": 1}


def build_state(workload: Workload, *, flat: bool = False, seed: int = 0) -> dict[str, Any]:
    """The target saved: ``{"model": OrderedDict(name -> tensor), "iteration"}`` (adam:
    ``{"model", "optimizer", "iteration"}``). ``flat`` puts all the bytes in one tensor
    (the physical baselines)."""
    gen = torch.Generator().manual_seed(seed)
    if flat:
        numel = workload.state_bytes // 4
        return {"model": OrderedDict(flat=_integers(numel, gen)), "iteration": 0}
    if workload.kind == "adam":
        return _adam_state(workload, gen)
    model: OrderedDict[str, torch.Tensor] = OrderedDict(
        (f"layer{i}.weight", _integers(n, gen)) for i, n in enumerate(workload.numels())
    )
    return {"model": model, "iteration": 0}


def iter_tensors(obj: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(path, tensor)`` for every tensor in a nested dict/list; keys as strings (DCP
    writes an int key back as a string)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, (*path, str(k)))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, (*path, str(i)))


def state_tensors(state: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor of the state, in a stable order."""
    return [t for _, t in iter_tensors(state)]


def optimizer_step(tensors: list[torch.Tensor]) -> None:
    """The "optimizer step": an in-place add of 1.0 on every tensor (foreach, like torch.optim)."""
    with torch.no_grad():
        torch._foreach_add_(tensors, 1.0)
