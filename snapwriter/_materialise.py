"""Proving that every tensor of a loaded snapshot can be used (``snapwriter verify``).

``torch.load`` succeeding is not enough: a tensor may load and still be unusable (a
quantized tensor that lost its quantizer, a sparse tensor with out-of-range indices).
:func:`materialise_all` walks the loaded object graph and computes every tensor's values
in their plain form, so such a file is reported damaged.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ("materialise", "materialise_all")


def materialise(t: torch.Tensor) -> torch.Tensor:
    """The plain dense values of ``t``, computed (raises if they cannot be)."""
    if t.is_quantized:
        t = t.dequantize()  # needs the quantizer: scale(s), zero point(s)
    if t.is_nested:
        return torch.cat([materialise(part).reshape(-1) for part in t.unbind()])
    if t.layout is not torch.strided:
        if t.layout is torch.sparse_coo:
            t = t.coalesce()  # checks the indices against the shape
        t = t.to_dense()
    if t.is_meta:
        return t
    return t.resolve_conj().resolve_neg().contiguous().clone()


def materialise_all(obj: Any) -> int:
    """Materialise every tensor reachable from ``obj``; return how many there were.

    Walks dicts, lists, tuples, sets and object ``__dict__`` s without recursion (a
    self-referencing state is fine).

    Raises:
        Whatever computing a tensor's values raised.
    """
    seen: set[int] = set()
    stack = [obj]
    count = 0
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, (str, bytes, int, float, type(None))):
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            materialise(item)
            count += 1
            stack.extend(getattr(item, "__dict__", {}).values())
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            stack.extend(vars(item).values())
    return count
