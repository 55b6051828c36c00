"""Where pushed requests wait for the runtime: parcels in, batches out, answers back.

A request becomes one or more parcels (its messages of one address) and one future (the
message's token when it holds one message, else a counter around it). The runtime's
``fetch`` takes every parcel on hand (up to the batch size, a request's parcel never
split), grouped into one batch per address; ``settle`` counts each message off its
request, and when the last is settled the request's future gets the nack reasons (an
empty list: every message acked). At shutdown the parcels no batch took are answered
"unavailable" (future result ``None``) and new requests are refused the same way.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque

from amgi.transport import Batch, Bindings, HeaderList, Message, Settlement

__all__ = ["Inbox", "Item"]

Item = tuple[str, HeaderList, "bytes | None", Bindings, int]
"""``(address, headers, payload, bindings, attempt)`` of one pushed message."""


_NONE: list[str] = []
"""The reasons of an acked single-message request (never modified)."""


class _Request:
    __slots__ = ("future", "left", "reasons")

    def __init__(self, future: asyncio.Future[list[str] | None], left: int) -> None:
        self.future = future
        self.left = left
        self.reasons: list[str] = []


class Inbox:
    """The queue between the HTTP front and the runtime (one event loop)."""

    def __init__(self) -> None:
        self._parcels: deque[tuple[str, list[Message]]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        """Set at shutdown: no request is taken any more."""

    def _future(self) -> asyncio.Future[list[str] | None]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[list[str] | None] = loop.create_future()
        if self.closed:
            future.set_result(None)
        return future

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def submit_one(
        self,
        address: str,
        headers: HeaderList,
        payload: bytes | None,
        bindings: Bindings | None = None,
        attempt: int = 1,
    ) -> asyncio.Future[list[str] | None]:
        """Queue a request of one message (its future is the message's token)."""
        future = self._future()
        if not self.closed:
            message = Message(
                str(next(self._ids)), headers, payload, {} if bindings is None else bindings,
                attempt, future,
            )  # fmt: skip
            self._parcels.append((address, [message]))
            self._wake()
        return future

    def submit(self, items: list[Item]) -> asyncio.Future[list[str] | None]:
        """Queue one request's messages; the future resolves when all are settled."""
        if len(items) == 1:
            return self.submit_one(*items[0])
        future = self._future()
        if not self.closed:
            request = _Request(future, len(items))
            grouped: dict[str, list[Message]] = {}
            for address, headers, payload, bindings, attempt in items:
                message = Message(
                    str(next(self._ids)), headers, payload, bindings, attempt, request
                )
                grouped.setdefault(address, []).append(message)
            self._parcels.extend(grouped.items())
            self._wake()
        return future

    async def take(self, limit: int) -> list[Batch]:
        """Wait for parcels; return them as one batch per address (at most ``limit``)."""
        parcels = self._parcels
        while not parcels:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        address, messages = parcels.popleft()
        if not parcels:
            return [Batch(address, messages)]
        batches = {address: Batch(address, messages)}
        count = len(messages)
        while parcels and count + len(parcels[0][1]) <= limit:
            address, messages = parcels.popleft()
            count += len(messages)
            batch = batches.get(address)
            if batch is None:
                batches[address] = Batch(address, messages)
            else:
                batch.messages.extend(messages)
        return list(batches.values())

    @staticmethod
    def settle(settlement: Settlement) -> None:
        """Count the settled messages off their requests; answer the finished ones."""
        for message in settlement.acked:
            token = message.token
            if type(token) is _Request:
                token.left -= 1
                if token.left == 0 and not token.future.done():
                    token.future.set_result(token.reasons)
            elif not token.done():
                token.set_result(_NONE)
        nacked = [(r.message, r.reason) for r in settlement.retry]
        nacked += [(d.message, d.reason) for d in settlement.dead]
        for message, reason in nacked:
            token = message.token
            if type(token) is _Request:
                token.reasons.append(reason)
                token.left -= 1
                if token.left == 0 and not token.future.done():
                    token.future.set_result(token.reasons)
            elif not token.done():
                token.set_result([reason])

    def close(self) -> None:
        """Refuse new requests and answer the queued ones "unavailable"."""
        self.closed = True
        while self._parcels:
            _, messages = self._parcels.popleft()
            for message in messages:
                token = message.token
                future = token.future if type(token) is _Request else token
                if not future.done():
                    future.set_result(None)
