"""Items held back until a due time (in-memory retry schedules, e.g. Redis Pub/Sub and core NATS).

No tasks: the owner's fetch loop asks what is due and how long until the next item.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["DueList"]

T = TypeVar("T")


class DueList(Generic[T]):
    """Items ordered by due time (``loop.time()`` seconds)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, due: float, item: T) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), item))

    def pop_due(self, now: float) -> list[T]:
        """Remove and return every item due at ``now``, earliest first."""
        heap = self._heap
        out: list[T] = []
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        return out

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def items(self) -> list[T]:
        return [item for _, _, item in self._heap]

    def discard(self, predicate: Callable[[T], bool]) -> None:
        """Drop the items for which ``predicate`` holds."""
        kept = [entry for entry in self._heap if not predicate(entry[2])]
        if len(kept) != len(self._heap):
            heapq.heapify(kept)
            self._heap = kept

    def clear(self) -> None:
        self._heap.clear()
