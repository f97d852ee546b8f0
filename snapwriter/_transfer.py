"""Handing a staged target to a saving process without changing what it saves.

multiprocessing pickles what it sends to a child (spawn and forkserver arguments, every
request on a pipe) with torch's *sharing* reducers, which rebuild tensors their own way
(quantized tensors lose their quantizer, attributes are dropped). :func:`encode` instead
pickles the target with the reducers ``torch.save`` uses (``Tensor.__reduce_ex__``), and
lifts every storage out of the stream: the storages travel beside it, through shared
memory, once each; :func:`decode` puts them back. So the child holds the very object
graph the parent staged, and writes the file the parent would have written.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

__all__ = ("Encoded", "decode", "encode")

#: The pickled object graph and the storages it refers to, by index.
Encoded = tuple[bytes, list[torch.UntypedStorage]]


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.storages: list[torch.UntypedStorage] = []
        self._index: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is torch.UntypedStorage:
            return ("untyped", self._add(obj))
        if isinstance(obj, torch.storage.TypedStorage):
            return ("typed", self._add(obj._untyped_storage), obj.dtype)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor) or obj.dtype not in _V3_DTYPES:
            return NotImplemented
        # torch.save reduces tensors of the newer dtypes over a bare UntypedStorage and
        # torch.load hands the rebuild a uint8 TypedStorage: do as the loader does
        rv = obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)  # type: ignore[no-untyped-call]
        return _wrap_v3(rv)

    def _add(self, storage: torch.UntypedStorage) -> int:
        index = self._index.get(storage._cdata)
        if index is None:
            index = self._index[storage._cdata] = len(self.storages)
            self.storages.append(storage)
        return index


_V3_DTYPES = frozenset(torch.storage._new_dtypes())


def _wrap_v3(rv: Any) -> Any:
    """``rv`` with the UntypedStorage argument of ``_rebuild_tensor_v3`` typed as uint8."""
    func, args = rv[0], rv[1]
    if func is torch._utils._rebuild_tensor_v3:
        storage = torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
            wrap_storage=args[0], dtype=torch.uint8, _internal=True
        )
        return (func, (storage, *args[1:]), *rv[2:])
    if func is torch._tensor._rebuild_from_type_v2:
        inner, cls, inner_args, state = args
        inner_func, wrapped = _wrap_v3((inner, inner_args))
        return (func, (inner_func, cls, wrapped, state), *rv[2:])
    return rv


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, storages: list[torch.UntypedStorage]) -> None:
        super().__init__(file)
        self._storages = storages

    def persistent_load(self, pid: Any) -> Any:
        if pid[0] == "typed":
            return torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
                wrap_storage=self._storages[pid[1]], dtype=pid[2], _internal=True
            )
        return self._storages[pid[1]]


def encode(obj: Any) -> Encoded:
    """Pickle ``obj`` with torch.save's reducers, its storages lifted out (see module doc)."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.storages


def decode(encoded: Encoded) -> Any:
    """The object :func:`encode` was given, over the storages that travelled with it."""
    data, storages = encoded
    return _Unpickler(io.BytesIO(data), storages).load()
