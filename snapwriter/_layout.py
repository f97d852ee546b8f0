"""Layout reuse: ``data.pkl`` of a save whose object graph repeats the previous one's.

A training loop saves the same structure over and over: the same dict keys, the same
tensor shapes, the same optimizer hyper-parameters; only the tensors' *values* change.
``data.pkl`` depends on the structure alone, so pickling it again (tens of microseconds a
tensor, holding the GIL) is wasted on every save after the first.

While staging, :class:`~snapwriter._staging.Stager` writes a *layout*: a flat list of
tokens that determines ``data.pkl`` completely. It is built only for graphs the fast
serializer takes whole (exact ``dict``/``OrderedDict``/``list``/``tuple``, ``str``,
``int``, ``float``, ``bool``, ``None``, plain tensors and attribute-free Parameters);
any other object switches it off for that save. The tokens record

- every scalar by type and exact value (floats by their bytes, so ``-0.0 != 0.0``);
- every string by value and by *identity*: pickle memoises by identity, so two equal
  strings that are one object pickle differently from two that are not;
- every container by type and length, and every object met again (containers,
  tuples, tensors) as a reference to its first occurrence;
- every tensor's class, dtype, storage offset, size, stride, ``requires_grad``,
  conjugate/negative bits and device, and its storage as "new, of n bytes" or as a
  reference to an earlier one.

Equal token lists therefore mean isomorphic graphs with equal scalars and equal
storage partitions, which pickle to the same bytes with the storages in the same order.
:class:`Layout` keeps, per staging arena, the previous save's tokens, its ``data.pkl``
and the order of its storage records; a save with the same tokens reuses both
(``tests/test_layout.py`` checks the reused file against ``torch.save`` after every
kind of change that must not reuse it).
"""

from __future__ import annotations

import operator
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ._fastsave import Pickled, pickle_state

__all__ = ("Layout", "LayoutMemory")


@dataclass
class _Remembered:
    tokens: list[Any]
    order: list[int]  # for each storage record, in file order: its index in staging order
    pickled: Pickled
    storages: list[torch.UntypedStorage]  # in staging order


class LayoutMemory:
    """What one staging arena remembers of its previous save's layout.

    Thread-safety: used by one save at a time (the arena's owner); the lock only makes
    a hand-over between the staging thread and the writing thread explicit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: _Remembered | None = None

    def layout(
        self,
        tokens: list[Any] | None,
        strings: list[str],
        storages: list[torch.UntypedStorage],
    ) -> Layout:
        """The :class:`Layout` of a staging call that made ``tokens`` (None: switched off),
        met ``strings`` (in order, the serializer's own first) and staged ``storages``
        (in staging order)."""
        hit = None
        if tokens is not None:
            # pickle memoises strings by identity: each string's first occurrence
            first: dict[int, int] = {}
            tokens.append([first.setdefault(id(s), i) for i, s in enumerate(strings)])
        with self._lock:
            last = self._last
            if tokens is not None and last is not None and last.tokens == tokens:
                if len(storages) == len(last.storages) and all(
                    map(operator.is_, storages, last.storages)
                ):
                    hit = last.pickled  # warm: the very same staged storages
                else:
                    hit = Pickled(
                        last.pickled.data,
                        [(str(i), storages[j]) for i, j in enumerate(last.order)],
                    )
                    self._last = _Remembered(tokens, last.order, hit, storages)
            elif tokens is None:
                self._last = None
        return Layout(self, tokens, storages, hit)

    def remember(
        self,
        tokens: list[Any],
        order: list[int],
        pickled: Pickled,
        storages: list[torch.UntypedStorage],
    ) -> None:
        with self._lock:
            self._last = _Remembered(tokens, order, pickled, storages)

    def forget(self) -> None:
        with self._lock:
            self._last = None


def _no_layout() -> None:
    return None


class Layout:
    """The layout of one staged target: its ``data.pkl`` when known, else made once.

    Attributes:
        reused: whether ``data.pkl`` is the previous save's (no pickling at all).
    """

    def __init__(
        self,
        memory: LayoutMemory,
        tokens: list[Any] | None,
        storages: list[torch.UntypedStorage],
        hit: Pickled | None,
    ) -> None:
        self._memory = memory
        self._tokens = tokens
        self._storages = storages
        self._pickled = hit
        self.reused = hit is not None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # Sent to another process (inside a save function): its storages are this
        # process's, so it arrives as "no layout" and the receiver pickles afresh.
        return (_no_layout, ())

    def pickle(self, obj: Any) -> Pickled | None:
        """``data.pkl`` and the storage records of ``obj`` (the staged value this layout
        was made for), as :func:`~snapwriter._fastsave.pickle_state` makes them; None
        when only ``torch.save`` can write it.

        Threading: call from the writing thread; pickles (holding the GIL) only when the
        layout is new, and then remembers the result for the next save.
        """
        if self._pickled is not None:
            return self._pickled
        pickled = pickle_state(obj)
        if pickled is None or self._tokens is None:
            return pickled
        index = {storage._cdata: i for i, storage in enumerate(self._storages)}
        order = [index.get(storage._cdata, -1) for _, storage in pickled.storages]
        if -1 in order or len(order) != len(index):
            self._memory.forget()  # storages the walk did not stage: not reusable
        else:
            self._memory.remember(self._tokens, order, pickled, self._storages)
        self._pickled = pickled
        return pickled
