"""Deliveries a broker counted that the application never had (:class:`Uncounted`).

A server hands back a message the application never had (``Retry.uncounted``: the stop
came before its call, the call ended first, a FIFO group held it behind a failure). A
broker that keeps the attempt itself can be told not to count that delivery; JetStream's
delivery count and SQS's ``ApproximateReceiveCount`` count every one, and rise with each
such release until the message reaches ``--max-attempts`` through no fault of its own.
The server remembers its releases by message id and takes them off the count when the
message comes back to this process.
"""

from __future__ import annotations

from collections.abc import Iterable

from amgi.transport import Message

__all__ = ["Uncounted"]

_MOST = 100_000
"""Ids remembered at most; the oldest go first (settled elsewhere, or long gone)."""


class Uncounted:
    """Per message id, the deliveries this process handed back uncounted."""

    __slots__ = ("_counts", "_most")

    def __init__(self, most: int = _MOST) -> None:
        self._counts: dict[str, int] = {}
        self._most = most

    def __bool__(self) -> bool:
        """Whether any release is remembered (a cheap test for hot paths)."""
        return bool(self._counts)

    def release(self, ids: Iterable[str]) -> None:
        """The messages ``ids`` were handed back uncounted: the broker counts the
        delivery that brings each back."""
        counts = self._counts
        for i in ids:
            counts[i] = counts.pop(i, 0) + 1  # moved to the end: the newest
            if len(counts) > self._most:
                del counts[next(iter(counts))]

    def correct(self, message: Message) -> None:
        """Take the deliveries handed back uncounted off ``message.attempt``."""
        if self._counts:
            released = self._counts.get(message.id)
            if released:
                message.attempt = max(1, message.attempt - released)

    def forget(self, ids: Iterable[str]) -> None:
        """The messages ``ids`` are settled for good (acked, dead-lettered)."""
        if self._counts:
            for i in ids:
                self._counts.pop(i, None)
