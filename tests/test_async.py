"""The async API, on asyncio and trio; the caller's loop is never blocked."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import sniffio
import torch

import snapwriter
from tests.conftest import assert_same, load, make_state, mutate_all

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_await_call_until_durable(tmp_path: Path, anyio_backend: str) -> None:
    assert sniffio.current_async_library() == anyio_backend
    state = make_state()
    expected = {k: v for k, v in state.items()}
    async with snapwriter.StandardWriter(out_dir=str(tmp_path)) as w:
        result = await w("snap.pt", "", state)
        assert result.path == str(tmp_path / "snap.pt")
        assert (tmp_path / "snap.pt").exists()  # durable when the await returns
    assert_same(expected, load(tmp_path / "snap.pt"))
    assert w.closed


async def test_fire_and_forget_then_aclose(tmp_path: Path) -> None:
    state = make_state()
    w = snapwriter.StandardWriter(out_dir=str(tmp_path), max_pending=4)
    expected = []
    for i in range(4):
        expected.append(
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        )
        w(f"s{i}.pt", "", state)
        mutate_all(state)
    await w.aclose()
    await w.aclose()  # idempotent
    for i in range(4):
        got = load(tmp_path / f"s{i}.pt")
        assert torch.equal(got["ints"], expected[i]["ints"])


async def test_failure_raised_by_await_and_aclose(tmp_path: Path) -> None:
    def boom(target: Any, f: Any) -> None:
        raise KeyError("nope")

    w = snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=boom)
    with pytest.raises(snapwriter.SnapshotWriteError) as info:
        await w("a.pt", "", 1)
    assert isinstance(info.value.__cause__, KeyError)
    w("b.pt", "", 1)
    with pytest.raises(snapwriter.SnapshotWriteError, match=r"b\.pt"):
        await w.aclose()
    with pytest.raises(snapwriter.WriterClosedError):
        w("c.pt", "", 1)


async def test_loop_keeps_ticking_while_a_slow_save_runs(tmp_path: Path) -> None:
    entered = threading.Event()
    release = threading.Event()

    def slow(target: Any, f: Any) -> None:
        entered.set()
        assert release.wait(60)
        torch.save(target, f)

    async with snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=slow) as w:
        handle = w("slow.pt", "", {"x": torch.ones(3)})
        ticks = 0
        while not entered.is_set() or ticks < 50:  # the loop runs while savefun blocks
            await anyio.sleep(0.001)
            ticks += 1
        assert not handle.done()
        release.set()
        result = await handle
    assert ticks >= 50 and result.nbytes > 0


async def test_asave_and_wait_for_room(tmp_path: Path) -> None:
    release = threading.Event()

    def gated(target: Any, f: Any) -> None:
        assert release.wait(60)
        torch.save(target, f)

    async with snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=gated, max_pending=1) as w:
        first = w("a.pt", "", {"i": 0})
        async with anyio.create_task_group() as tg:
            results: list[snapwriter.SnapshotResult] = []

            async def second() -> None:
                results.append(await w.asave("b.pt", "", {"i": 1}))

            tg.start_soon(second)
            await anyio.sleep(0)  # let it start waiting for room
            assert not first.done()
            release.set()
        assert results[0].path.endswith("b.pt")
        assert (await first).path.endswith("a.pt")
    assert load(tmp_path / "b.pt") == {"i": 1}


async def test_cancelled_await_does_not_cancel_the_save(tmp_path: Path) -> None:
    release = threading.Event()

    def gated(target: Any, f: Any) -> None:
        assert release.wait(60)
        torch.save(target, f)

    w = snapwriter.StandardWriter(out_dir=str(tmp_path), savefun=gated)
    handle = w("a.pt", "", {"x": 1})
    with anyio.move_on_after(0.01):
        await handle
    release.set()
    await w.aclose()
    assert load(tmp_path / "a.pt") == {"x": 1}


async def test_fifty_concurrent_coroutines(tmp_path: Path) -> None:
    async with snapwriter.StandardWriter(out_dir=str(tmp_path), max_pending=8) as w:

        async def one(i: int) -> None:
            await w.asave(f"c{i % 10}/s{i}.pt", "", {"i": i, "t": torch.full((100,), float(i))})

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
    for i in range(50):
        got = load(tmp_path / f"c{i % 10}" / f"s{i}.pt")
        assert got["i"] == i and torch.equal(got["t"], torch.full((100,), float(i)))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_no_blocking_calls_on_any_event_loop(tmp_path: Path) -> None:
    """blockbuster fails any blocking file or socket call, or sleep, made on a thread
    running an event loop: the caller's loop and the writer's own loop alike."""
    from blockbuster import blockbuster_ctx

    state = make_state()
    w = snapwriter.StandardWriter(out_dir=str(tmp_path), max_pending=2)
    await w("warm.pt", "", state)  # starting the loop thread happens once, outside
    with blockbuster_ctx() as bb:
        bb.functions["threading.Lock.acquire"].deactivate()  # uncontended bookkeeping
        bb.functions["threading.Lock.acquire_lock"].deactivate()
        for i in range(5):
            mutate_all(state)
            await w(f"s{i}.pt", "", state)
        h = w("append.txt", "", b"x", savefun=lambda t, f: f.write(t), append=True)
        await h
    await w.aclose()
    assert load(tmp_path / "s4.pt")["iteration"] == 12
