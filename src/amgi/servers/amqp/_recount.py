"""Attempts the broker miscounts, put right by the message's stable id (private).

A classic queue counts no delivery: a message whose channel the broker closed while the
application held it (``consumer_timeout``: the call took longer than the broker allows)
comes back at the same attempt, for good. A quorum queue counts every return in
``x-delivery-count``, also of deliveries the server had buffered and dropped unseen at a
reconnect: they came back with an attempt the application never used. The server knows
both sets of ids: it adds the first, and takes the second off, when they come back.
Messages the application acked, or handed back unseen, after a lost or rebuilt connection
took their channel come back counted too: they join the second set (not when the broker
closed their channel over them, which is an attempt).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from amgi.servers.kit import Uncounted
from amgi.transport import Message

if TYPE_CHECKING:
    from aiormq.abc import DeliveredMessage

_DELIVERY_COUNT = "x-delivery-count"

_LIMIT = 100_000
"""Ids kept in each count; the oldest go first (their message settled elsewhere)."""


def base_id(message: Message) -> str:
    """The stable id of ``message`` without the ``#2`` ... a batch adds to repeats."""
    return message.id.partition("#")[0]


def _add(counts: dict[str, int], ids: Iterable[str]) -> None:
    for i in ids:
        counts[i] = counts.pop(i, 0) + 1  # moved to the end: the newest
        if len(counts) > _LIMIT:
            del counts[next(iter(counts))]


class Recount:
    """Per stable id: returns the broker counted though they were no attempt of the
    application (``unseen``, the kit's :class:`Uncounted`), and returns it did not count
    though the application had the delivery (``held``)."""

    __slots__ = ("held", "unseen")

    def __init__(self) -> None:
        self.unseen = Uncounted(_LIMIT)
        self.held: dict[str, int] = {}

    def dropped(self, ids: Iterable[str]) -> None:
        """Deliveries the server dropped unseen (the broker puts them back)."""
        self.unseen.release(ids)

    def lost(self, ids: Iterable[str]) -> None:
        """Deliveries in the application's hands when the broker closed their channel."""
        _add(self.held, ids)

    def forget(self, messages: Iterable[Message]) -> None:
        """``messages`` are settled: a later delivery of the same id is another message
        (a retry copy carries the corrected attempt in its header)."""
        if not (self.unseen or self.held):
            return  # the common case: nothing to look up per message
        ids = [base_id(m) for m in messages]
        self.unseen.forget(ids)
        for i in ids:
            self.held.pop(i, None)

    def correct(self, message: Message, delivered: DeliveredMessage, counts: bool) -> None:
        """Put the attempt of a redelivered ``message`` right (``counts``: whether an
        ``x-delivery-count`` header is the broker's count, :func:`._codec.broker_counted`)."""
        headers = delivered.header.properties.headers or {}
        counted = headers.get(_DELIVERY_COUNT) if counts else None
        if isinstance(counted, int) and counted > 0:  # the broker counts returns
            self.unseen.correct(message)
        elif self.held:
            message.attempt += self.held.get(message.id, 0)
