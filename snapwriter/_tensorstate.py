"""What torch's tensor reducers save of a tensor besides its storage and geometry.

Typed access to the private torch helpers that ``Tensor.__reduce_ex__`` itself uses, so
staging and the serializer record exactly the same things: the conjugate/negative
bits (:data:`metadata_of`, empty for most tensors) and the Python state of a tensor
(``__dict__`` and slots).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch._utils

__all__ = ("metadata_of", "set_metadata", "set_state", "state_of", "storage_address")

#: The C function itself (no Python frame): called once per tensor on hot paths.
metadata_of: Callable[[torch.Tensor], dict[str, bool]] = getattr(  # noqa: B009
    torch._C, "_get_tensor_metadata"
)
_set_metadata: Any = getattr(torch._C, "_set_tensor_metadata")  # noqa: B009


def _storage_address_of() -> Callable[[torch.Tensor], int]:
    """A function giving a tensor's untyped storage's ``_cdata`` without making the
    storage object: torch's ``_storage_address`` where it agrees, else the slow way."""
    fast = getattr(torch._C, "_storage_address", None)
    probe = torch.zeros(4)
    if fast is not None and fast(probe[1:]) == probe.untyped_storage()._cdata:
        return fast  # type: ignore[no-any-return]
    return lambda t: t.untyped_storage()._cdata


#: The ``_cdata`` of a tensor's untyped storage (what identifies the storage), cheaply.
storage_address: Callable[[torch.Tensor], int] = _storage_address_of()
_get_state: Any = torch._utils._get_obj_state
_set_state: Any = torch._utils._set_obj_state


def set_metadata(t: torch.Tensor, metadata: dict[str, bool]) -> None:
    """Set the bits :func:`metadata_of` returned, as torch's rebuild does on load."""
    _set_metadata(t, metadata)


def state_of(t: torch.Tensor) -> Any:
    """The Python state pickled with a tensor subclass or a tensor with attributes."""
    return _get_state(t)


def set_state(t: torch.Tensor, state: Any) -> torch.Tensor:
    """Give ``t`` the Python state :func:`state_of` returned; returns ``t``."""
    out: torch.Tensor = _set_state(t, state)
    return out
