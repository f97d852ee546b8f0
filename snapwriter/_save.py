"""One save, end to end: the *write* then the *commit* of a staged target.

:func:`execute_save` is the single implementation. Writers run it on their portal loop;
child processes (``ProcessWriter``, ``ProcessQueueWriter``) and blocking callers without a
loop run it through :func:`execute_save_blocking`, which starts a private loop.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import torch

from ._fastsave import (
    Pickled,
    SaveOptions,
    fast_torch_save,
    pickle_state,
    save_options,
    using_save_options,
)
from ._layout import Layout
from ._paths import Destination
from ._pool import device_tags
from ._portal import DaemonExecutor
from ._storage import Storage
from ._transfer import decode, encode

__all__ = ("SaveRequest", "WriteOutcome", "execute_save", "execute_save_blocking")


@dataclass
class SaveRequest:
    """Everything needed to save one snapshot; picklable when its parts are.

    Attributes:
        dest: where the file goes.
        target: the (already staged) object handed to ``savefun``.
        savefun: called as ``savefun(target, file_object, **kwds)``.
        kwds: extra keyword arguments of ``savefun``.
        append: append to the final file instead of replacing it (not atomic).
        fs: the file system (:class:`LocalFileSystem` or a ppe/PFIO-style one).
        durable: ``fsync`` the file and the directory.
        device_tags: source devices of storages staged from CUDA tensors, recorded
            in the file while writing (see :func:`snapwriter._pool.device_tags`).
        layout: the staged target's layout (:mod:`snapwriter._layout`): its
            ``data.pkl`` when it repeats the previous save's; stays in this process.
        options: torch.save's options (CRC-32s, storage alignment) as the thread that
            made the request had them (torch keeps them per thread): the file is
            written under them, wherever it is written.
    """

    dest: Destination
    target: Any
    savefun: Callable[..., Any]
    kwds: dict[str, Any] = field(default_factory=dict)
    append: bool = False
    fs: Any = None
    durable: bool = True
    device_tags: list[tuple[torch.UntypedStorage, str]] = field(default_factory=list)
    layout: Layout | None = None
    options: SaveOptions = field(default_factory=save_options)

    @property
    def plain_torch_save(self) -> bool:
        """Whether ``savefun`` is ``torch.save`` without keyword arguments: the file can
        then be written by :func:`fast_torch_save` (the same bytes)."""
        return self.savefun is torch.save and not self.kwds

    def writing_function(self) -> Callable[..., Any]:
        """What writes the file: :func:`fast_torch_save` in place of a plain ``torch.save``
        (same file, less time holding the GIL), else ``savefun``."""
        if not self.plain_torch_save:
            fun: Callable[..., Any] = self.savefun
        elif self.layout is None:
            fun = fast_torch_save
        else:
            fun = functools.partial(fast_torch_save, layout=self.layout)
        return functools.partial(_with_options, self.options, fun)

    def pickle_target(self) -> Pickled | None:
        """``data.pkl`` and the storage records of a plain ``torch.save`` of the target
        (reused from the previous save when its layout repeats), or None when only
        ``torch.save`` itself can write it. Holds the GIL while pickling."""
        if self.layout is not None:
            return self.layout.pickle(self.target)
        return pickle_state(self.target)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled only to reach another process: carry the target as torch.save sees it.
        state = dict(self.__dict__)
        state["target"] = encode((self.target, self.device_tags))
        del state["device_tags"]
        state["layout"] = None  # its storages are this process's
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["target"], state["device_tags"] = decode(state["target"])
        self.__dict__.update(state)


def _with_options(options: SaveOptions, fun: Callable[..., Any], *args: Any, **kwds: Any) -> Any:
    with using_save_options(options):
        return fun(*args, **kwds)


@dataclass(frozen=True)
class WriteOutcome:
    """What the write and commit phases measured."""

    nbytes: int
    write_seconds: float
    commit_seconds: float


async def execute_save(request: SaveRequest) -> WriteOutcome:
    """Write ``request.target`` to a temporary file in a worker thread, then commit it.

    Never blocks the event loop: ``savefun`` and ``fsync`` run in worker threads, the
    rename and the directory ``fsync`` through :mod:`aiofiles`. A plain ``torch.save``
    (no extra keyword arguments) is replaced by :func:`fast_torch_save`, which writes
    the same file (byte for byte on its fast path; through ``torch.save`` otherwise).

    Raises:
        Whatever ``savefun`` or the file system raised. The final file is untouched and
        the temporary file removed (except with ``append=True``).
    """
    storage = Storage(request.fs, durable=request.durable)
    savefun = request.writing_function()
    start = time.perf_counter()
    with device_tags(request.device_tags):
        if request.append:
            nbytes = await anyio.to_thread.run_sync(
                storage.write_append, request.dest, savefun, request.target, request.kwds
            )
            return WriteOutcome(nbytes, time.perf_counter() - start, 0.0)
        tmp, nbytes = await anyio.to_thread.run_sync(
            storage.write_temp, request.dest, savefun, request.target, request.kwds
        )
    written = time.perf_counter()
    await storage.acommit(tmp, request.dest)
    return WriteOutcome(nbytes, written - start, time.perf_counter() - written)


async def _execute_save_on_private_loop(request: SaveRequest) -> WriteOutcome:
    # aiofiles runs in the loop's default executor: one that still works at exit
    asyncio.get_running_loop().set_default_executor(DaemonExecutor())
    return await execute_save(request)


def execute_save_blocking(request: SaveRequest) -> WriteOutcome:
    """Run :func:`execute_save` on a private event loop (callers with no loop of theirs:
    child processes, ppe-style consumers and workers), also during interpreter exit."""
    return anyio.run(_execute_save_on_private_loop, request, backend="asyncio")
