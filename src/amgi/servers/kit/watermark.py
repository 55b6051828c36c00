"""Acknowledge up to the highest contiguous settled position, never past an unsettled one.

Brokers that acknowledge cumulatively (a Kafka offset commit, AMQP ``basic.ack`` with
``multiple``) must not acknowledge a message the application has not finished with,
even when later batches finish first. A :class:`Watermark` knows the order positions
were handed out in and reports, as they settle, the last position before which
everything is settled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["Watermark"]


class Watermark:
    """The settled prefix of positions handed out in increasing order.

    Two ways to say what was handed out:

    * ``Watermark(first=1)``: the positions are the consecutive integers from ``first``
      (AMQP delivery tags of a channel); nothing to record.
    * ``Watermark()``: :meth:`add` each position as it is handed out (the offset after
      each Kafka batch, which has gaps); a position added twice (a refetch) must be
      settled twice.

    ``settle(positions)`` returns the highest position such that it and every position
    handed out before it are settled, or ``None`` if that did not move: acknowledge or
    commit up to it.
    """

    __slots__ = ("_counts", "_next", "_order", "_settled")

    def __init__(self, first: int | None = None) -> None:
        self._next = first
        self._settled: set[int] = set()
        self._order: deque[int] = deque()
        self._counts: dict[int, int] = {}

    def add(self, position: int) -> None:
        """Record ``position`` as handed out (not ``>`` every earlier one only after a refetch)."""
        if self._next is not None:
            raise TypeError("a Watermark(first=...) numbers its positions itself")
        self._order.append(position)

    def settle(self, positions: Iterable[int]) -> int | None:
        """Mark ``positions`` settled; the new contiguous high mark, or None if unchanged."""
        nxt = self._next
        if nxt is not None:
            settled = self._settled
            settled.update(positions)
            start = nxt
            while nxt in settled:
                settled.discard(nxt)
                nxt += 1
            if nxt == start:
                return None
            self._next = nxt
            return nxt - 1
        counts = self._counts
        for p in positions:
            counts[p] = counts.get(p, 0) + 1
        order = self._order
        mark: int | None = None
        while order and counts.get(order[0], 0):
            mark = order.popleft()
            left = counts[mark] - 1
            if left:
                counts[mark] = left
            else:
                del counts[mark]
        return mark

    @property
    def outstanding(self) -> int:
        """Positions added and not yet below the high mark (settled ones above it, in
        ``first`` mode)."""
        return len(self._order) if self._next is None else len(self._settled)

    def clear(self) -> None:
        """Forget everything (the channel or assignment that issued the positions is gone)."""
        self._order.clear()
        self._counts.clear()
        self._settled.clear()
