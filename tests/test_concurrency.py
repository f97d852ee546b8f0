"""Many threads on one writer: every file intact and equal to its last save."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from tests.conftest import WriterFactory, load


def test_eight_threads_twenty_saves(make_writer: WriterFactory, tmp_path: Path) -> None:
    w = make_writer(out_dir=str(tmp_path))
    order_lock = threading.Lock()
    last_issued: dict[str, int] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(t: int) -> None:
        try:
            start.wait()
            state = {"w": torch.zeros(2000), "t": t}
            for i in range(20):
                state["w"].fill_(t * 100 + i)
                # distinct names per thread, plus a name shared by all threads
                for name in (f"thread{t}/s{i % 4}.pt", "shared.pt"):
                    with order_lock:  # the issue order is the call order
                        w(name, "", {"w": state["w"], "t": t, "i": i})
                        last_issued[name] = t * 100 + i
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    w.finalize()
    assert not errors
    assert len(last_issued) == 8 * 4 + 1
    for name, value in last_issued.items():
        got = load(tmp_path / name)
        assert got["t"] * 100 + got["i"] == value, name
        assert torch.equal(got["w"], torch.full((2000,), float(value)))
