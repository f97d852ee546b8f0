"""A faster :func:`torch.save` for plain CPU tensors, byte-compatible with ``torch.load``.

``torch.save`` spends most of its time, for states of many tensors, in Python code run
per tensor (``Tensor.__reduce_ex__``, typed-storage wrappers, a ``persistent_id`` call
per pickled object), holding the GIL all along. :func:`fast_torch_save` writes the same
archive (``data.pkl``, ``.format_version``, ``.storage_alignment``, ``byteorder``,
``data/<key>`` records, through torch's own zip writer) with a lean reducer for plain
tensors. Anything it does not handle exactly like ``torch.save`` (tensor subclasses such
as ``nn.Parameter``, tensors requiring grad, non-CPU, non-strided, conjugated or
attribute-carrying tensors, raw storages, dtypes without a legacy storage type) makes it
fall back to ``torch.save`` as a whole, before a byte is written.

The resulting file loads with plain ``torch.load`` (``weights_only=True`` included).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import sys
import time
from typing import IO, Any

import torch
import torch.serialization

__all__ = ("fast_torch_save",)

_PROTOCOL = 2  # torch.save's default
_STORAGE_TYPE_NAMES: dict[torch.dtype, str] = torch.storage._dtype_to_storage_type_map()


class _Fallback(Exception):
    """Raised while pickling when ``torch.save`` must do the job."""


class _StorageRef:
    """Stands for one storage in the pickle stream (turned into a persistent id)."""

    __slots__ = ("dtype", "key", "location", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int, location: str) -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.location = location


#: Tensors pickled between two voluntary releases of the GIL (see ``reducer_override``).
_YIELD_EVERY = 16


class _Pickler(pickle.Pickler):
    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self._count = 0
        self.storages: dict[str, torch.UntypedStorage] = {}
        self._refs: dict[int, _StorageRef] = {}

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is _StorageRef:
            storage_type = getattr(torch, _STORAGE_TYPE_NAMES[obj.dtype])
            return ("storage", storage_type, obj.key, obj.location, obj.numel)
        if isinstance(obj, (torch.UntypedStorage, torch.storage.TypedStorage)):
            raise _Fallback("raw storage")
        return None

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not torch.Tensor:
            if isinstance(obj, torch.Tensor):
                raise _Fallback("tensor subclass")
            return NotImplemented
        if (
            obj.requires_grad
            or not obj.is_cpu
            or obj.layout != torch.strided
            or obj.dtype not in _STORAGE_TYPE_NAMES
            or obj.is_conj()
            or obj.is_neg()
            or obj.__dict__
        ):
            raise _Fallback("tensor that torch.save treats specially")
        self._count += 1
        if self._count % _YIELD_EVERY == 0:
            # Pickling runs under the GIL. Left alone, this thread keeps it for whole
            # switch intervals (5 ms) and a training loop that releases it in every
            # torch op waits that long each time; a short sleep hands it over now.
            time.sleep(0)
        return (
            torch._utils._rebuild_tensor_v2,
            (
                self._ref(obj),
                obj.storage_offset(),
                tuple(obj.size()),
                obj.stride(),
                False,
                None,  # backward hooks: what a fresh tensor has; never one shared table
            ),
        )

    def _ref(self, t: torch.Tensor) -> _StorageRef:
        storage = t.untyped_storage()
        ref = self._refs.get(storage._cdata)
        if ref is None:
            key = str(len(self._refs))
            ref = _StorageRef(key, t.dtype, storage.nbytes() // t.element_size(), "cpu")
            self._refs[storage._cdata] = ref
            self.storages[key] = storage
        elif ref.dtype != t.dtype:
            raise _Fallback("views of one storage with different dtypes")
        return ref


def fast_torch_save(obj: Any, f: IO[bytes]) -> None:
    """Save ``obj`` to the binary file ``f`` exactly as ``torch.save(obj, f)`` would load.

    Raises:
        Whatever ``torch.save`` raises for ``obj`` (the fallback runs it).
    """
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    try:
        pickler.dump(obj)
    except _Fallback:
        torch.save(obj, f)
        return
    data = buffer.getvalue()
    alignment = str(torch.serialization._get_storage_alignment())
    writer = torch._C.PyTorchFileWriter(f, torch.serialization.get_crc32_options(), int(alignment))
    try:
        writer.write_record("data.pkl", data, len(data))
        for name, text in (
            (".format_version", "1"),
            (".storage_alignment", alignment),
            ("byteorder", sys.byteorder),
        ):
            writer.write_record(name, text.encode(), len(text))
        for key, storage in pickler.storages.items():
            # the Storage overload copies and computes the CRC without holding the GIL
            writer.write_record(f"data/{key}", storage, storage.nbytes())  # type: ignore[arg-type]
        writer.write_end_of_file()
    except BaseException:
        # Mark the archive finished before the writer is collected: its C++ destructor
        # would otherwise retry the end of file, fail again (disk full...) and abort the
        # whole process from a destructor.
        with contextlib.suppress(Exception):
            writer.write_end_of_file()
        raise
    f.flush()
