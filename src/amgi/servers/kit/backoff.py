"""One doubling backoff for reconnect and retry loops."""

from __future__ import annotations

import asyncio

__all__ = ["Backoff", "doubling_delay"]


def doubling_delay(first: float, attempt: int, maximum: float) -> float:
    """``first`` doubled per attempt after the first, capped at ``maximum``.

    ``attempt`` counts from 1: ``doubling_delay(1, 1, 60) == 1``, ``(1, 3, 60) == 4``.
    Any attempt count is fine (``--max-attempts`` has no upper bound, and a foreign
    producer may write any count): the exponent stops where the delay is long capped.
    """
    doublings = min(max(0, attempt - 1), _MOST_DOUBLINGS)
    return float(min(first * 2.0**doublings, maximum))


_MOST_DOUBLINGS = 1000
"""Past this many, 2.0 ** n overflows (1024) while any real ``maximum`` was reached long before."""


class Backoff:
    """Delays that start at ``first`` and double up to ``maximum``; ``reset()`` on success.

    Both must be positive (a zero delay would make a hot loop); a ``maximum`` below
    ``first`` caps the first delay too.

    ``delay`` is the wait before the next try; ``failed()`` returns it and doubles it for
    the one after; ``await sleep()`` waits it out and doubles. A loop that retries a
    broker call::

        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                await connect()
            except OSError as exc:
                log.warning("connect failed: %s (next try in %.1fs)", exc, backoff.delay)
                await backoff.sleep()
                continue
            backoff.reset()
            break
    """

    __slots__ = ("_delay", "first", "maximum")

    def __init__(self, first: float, maximum: float) -> None:
        if not (first > 0 and maximum > 0):
            raise ValueError(f"backoff delays must be positive, got {first} and {maximum}")
        self.first = min(first, maximum)
        self.maximum = maximum
        self._delay = self.first

    @property
    def delay(self) -> float:
        """Seconds to wait before the next try."""
        return self._delay

    def failed(self) -> float:
        """The delay before the next try; the one after is twice as long (up to ``maximum``)."""
        delay = self._delay
        self._delay = min(delay * 2, self.maximum)
        return delay

    async def sleep(self) -> None:
        """Wait :attr:`delay` seconds, then double it."""
        await asyncio.sleep(self.failed())

    def reset(self) -> None:
        """Back to ``first`` (after a success)."""
        self._delay = self.first
