"""CUDA staging: pinned buffers, a side stream, non-blocking copies (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import snapwriter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_state() -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return {f"w{i}": torch.randn(1 << 20, device="cuda", generator=g) for i in range(8)}


def test_cuda_tensors_are_staged_consistently(tmp_path: Path) -> None:
    state = _cuda_state()
    expected = {k: v.cpu() for k, v in state.items()}
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        h = w("gpu.pt", "", state)
        for v in state.values():  # queued on the current stream right after the call
            v.mul_(-1).add_(3)
        h.result()
        flats = [f for arena in w._stager._free for f in arena.flats.values()]
        assert flats and all(f.is_pinned() for f in flats)
    loaded = torch.load(tmp_path / "gpu.pt")
    for k, v in expected.items():
        assert loaded[k].device.type == "cpu"
        assert torch.equal(loaded[k], v)


def test_cuda_staging_reuses_pinned_buffers(tmp_path: Path) -> None:
    state = _cuda_state()
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        w("a.pt", "", state).result()
        warm = w._stager.allocations
        for i in range(3):
            for v in state.values():
                v.add_(1)
            w(f"b{i}.pt", "", state).result()
        assert w._stager.allocations == warm
    assert torch.equal(torch.load(tmp_path / "b2.pt")["w0"], state["w0"].cpu())


def test_mixed_cpu_and_cuda(tmp_path: Path) -> None:
    state = {"gpu": torch.ones(10, device="cuda"), "cpu": torch.zeros(10), "step": 3}
    with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        h = w("mixed.pt", "", state)
        state["gpu"].add_(1)
        state["cpu"].add_(1)
        h.result()
    loaded = torch.load(tmp_path / "mixed.pt")
    assert torch.equal(loaded["gpu"], torch.ones(10))
    assert torch.equal(loaded["cpu"], torch.zeros(10))
    assert loaded["step"] == 3
