"""Acknowledge up to the highest contiguous settled position, never past an unsettled one.

Brokers that acknowledge cumulatively (a Kafka offset commit, AMQP ``basic.ack`` with
``multiple``) must not acknowledge a message the application has not finished with,
even when later batches finish first. A :class:`Watermark` records positions in the
order they were handed out and reports, as batches settle, the last position before
which everything is settled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["Watermark"]


class Watermark:
    """Positions handed out in increasing order; the settled prefix of them.

    ``add(p)`` when a position is handed out (a delivery tag, the offset after a Kafka
    batch); ``settle([p, ...])`` when those are settled, which returns the highest
    position such that it and every position handed out before it are settled, or
    ``None`` if that did not move. Settling a position that was not added is ignored.
    """

    __slots__ = ("_order", "_settled")

    def __init__(self) -> None:
        self._order: deque[int] = deque()
        self._settled: set[int] = set()

    def add(self, position: int) -> None:
        """Record ``position`` as handed out (greater than every position added before)."""
        self._order.append(position)

    def settle(self, positions: Iterable[int]) -> int | None:
        """Mark ``positions`` settled; the new contiguous high mark, or None if unchanged."""
        settled = self._settled
        settled.update(positions)
        order = self._order
        mark: int | None = None
        while order and order[0] in settled:
            mark = order.popleft()
            settled.discard(mark)
        return mark

    @property
    def outstanding(self) -> int:
        """How many positions were added and are not yet below the high mark."""
        return len(self._order)

    def clear(self) -> None:
        """Forget everything (the channel or partition assignment that issued them is gone)."""
        self._order.clear()
        self._settled.clear()
