"""Where pushed requests wait for the runtime: parcels in, batches out, answers back.

A request's messages wait per address; the request has one future (the message's token
when it holds one message, else a counter around it shared by its messages). The
runtime's ``fetch`` takes the messages of the address waiting longest as one batch (up to
the batch size, a request never split), one batch a fetch; ``settle`` counts each message off its
request, and when the last is settled the request's future gets the nack reasons (an
empty list: every message acked). At shutdown the messages no batch took are answered
"unavailable" (future result ``None``) and new requests are refused the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Collection
from typing import Protocol

from amgi.transport import Batch, Bindings, HeaderList, Message, Settlement

__all__ = ["Inbox", "Item", "Reply"]

logger = logging.getLogger("amgi.servers.http")

Item = tuple[str, HeaderList, "bytes | None", Bindings, int]
"""``(address, headers, payload, bindings, attempt)`` of one pushed message."""


_NONE: list[str] = []
"""The reasons of an acked single-message request (never modified)."""


class Reply(Protocol):
    """Where a request's outcome goes: an :class:`asyncio.Future`, or the listener's
    answer slot (which writes the HTTP answer as soon as it is set)."""

    def done(self) -> bool: ...

    def set_result(self, result: list[str] | None, /) -> None: ...


class _Request:
    __slots__ = ("future", "left", "reasons")

    def __init__(self, future: Reply, left: int) -> None:
        self.future = future
        self.left = left
        self.reasons: list[str] = []


class Inbox:
    """The queue between the HTTP front and the runtime (one event loop).

    Waiting messages are kept per address, in arrival order, so that taking them is one
    step per address, not per message.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, list[Message]] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._ids = itertools.count(1)
        self._create_future: Callable[[], Reply] | None = None
        self.closed = False
        """Set at shutdown: no request is taken any more."""

    @property
    def waiting(self) -> int:
        """How many messages wait for the runtime."""
        return sum(map(len, self._waiting.values()))

    def _queue(self, address: str, messages: list[Message]) -> None:
        waiting = self._waiting.get(address)
        if waiting is None:
            self._waiting[address] = messages
        else:
            waiting.extend(messages)
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
        *,
        reply: Reply | None = None,
    ) -> Reply:
        """Queue a request of one message; ``reply`` (default: a new future) is the
        message's token and gets the outcome."""
        future = reply
        if future is None:
            create_future = self._create_future
            if create_future is None:
                create_future = self._create_future = asyncio.get_running_loop().create_future
            future = create_future()
        if self.closed:
            future.set_result(None)
            return future
        message = Message(
            str(next(self._ids)), headers, payload, {} if bindings is None else bindings,
            attempt, future,
        )  # fmt: skip
        waiting = self._waiting.get(address)  # _queue, inlined: this is once per request
        if waiting is None:
            self._waiting[address] = [message]
        else:
            waiting.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return future

    def submit(self, items: list[Item], reply: Reply | None = None) -> Reply:
        """Queue one request's messages; ``reply`` (default: a new future) gets the
        outcome when all are settled."""
        if len(items) == 1:
            return self.submit_one(*items[0], reply=reply)
        future = reply if reply is not None else asyncio.get_running_loop().create_future()
        if self.closed:
            future.set_result(None)
            return future
        request = _Request(future, len(items))
        grouped: dict[str, list[Message]] = {}
        for address, headers, payload, bindings, attempt in items:
            message = Message(str(next(self._ids)), headers, payload, bindings, attempt, request)
            grouped.setdefault(address, []).append(message)
        for address, messages in grouped.items():
            self._queue(address, messages)
        return future

    async def take(self, limit: int) -> list[Batch]:
        """Wait for messages; return the batch of the address waiting longest.

        One batch a call: the runtime fetches only when a slot is free, so a batch
        returned starts at once, and the requests not taken stay here, where a client
        that goes away takes its requests with it (:meth:`withdraw`). Several batches
        returned at once would wait in the runtime for a slot, out of reach, and run
        for nobody after their clients left.

        A batch holds at most ``limit`` messages unless one request alone has more (a
        request's messages of one address are never split); the rest of that address
        waits behind the other addresses (round robin).
        """
        while not self._waiting:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        waiting = self._waiting
        address = next(iter(waiting))
        messages = waiting.pop(address)
        if len(messages) > limit:
            cut = _boundary(messages, limit)
            if cut < len(messages):
                waiting[address] = messages[cut:]
                messages = messages[:cut]
        return [Batch(address, messages)]

    @staticmethod
    def settle(settlement: Settlement, address: str = "") -> None:
        """Count the settled messages off their requests; answer the finished ones.

        A request whose reply is already done here lost its client while the app had
        it (the listener or the ASGI front saw it go): its outcome has nobody to go
        to. Nothing is answered, and one warning per call counts those requests: their
        senders, with no 2xx, push them again, so an acked one comes twice."""
        gone_acked = gone_nacked = 0
        for message in settlement.acked:
            token = message.token
            if type(token) is _Request:
                token.left -= 1
                if token.left == 0:
                    if not token.future.done():
                        token.future.set_result(token.reasons)
                    elif token.reasons:
                        gone_nacked += 1
                    else:
                        gone_acked += 1
            elif not token.done():
                token.set_result(_NONE)
            else:
                gone_acked += 1
        if settlement.retry or settlement.dead:
            nacked = [(r.message, r.reason) for r in settlement.retry]
            nacked += [(d.message, d.reason) for d in settlement.dead]
            for message, reason in nacked:
                token = message.token
                if type(token) is _Request:
                    token.reasons.append(reason)
                    token.left -= 1
                    if token.left == 0:
                        if not token.future.done():
                            token.future.set_result(token.reasons)
                        else:
                            gone_nacked += 1
                elif not token.done():
                    token.set_result([reason])
                else:
                    gone_nacked += 1
        if gone_acked or gone_nacked:
            logger.warning(
                "http: %d request(s) of %r settled after their client went away (%d acked, "
                "%d nacked): no answer was sent; their senders, having no 2xx, push them "
                "again (the acked ones reach the app twice)",
                gone_acked + gone_nacked,
                address,
                gone_acked,
                gone_nacked,
            )

    def withdraw(self, replies: Collection[Reply]) -> int:
        """Drop the waiting messages of the requests answered through ``replies`` (their
        client went away: nobody would get the answer, and the sender pushes them again),
        with a warning; return how many were dropped. Messages a batch already took stay
        with the runtime (:meth:`settle` says when their outcome finds nobody)."""
        if not self._waiting:
            return 0
        gone = set(replies)
        dropped = 0
        for address, messages in list(self._waiting.items()):
            kept = []
            for m in messages:
                token = m.token
                if type(token) is _Request:
                    if token.future in gone:
                        token.left -= 1  # (its messages a batch took still count down)
                        continue
                elif token in gone:
                    continue
                kept.append(m)
            if len(kept) == len(messages):
                continue
            dropped += len(messages) - len(kept)
            if kept:
                self._waiting[address] = kept
            else:
                del self._waiting[address]
        if dropped:
            logger.warning(
                "http: %d message(s) dropped before the app took them: their client went "
                "away while they waited for a slot (never run, never acked; the sender, "
                "having no 2xx, pushes them again)",
                dropped,
            )
        return dropped

    def close(self) -> None:
        """Refuse new requests and answer the queued ones "unavailable"."""
        self.closed = True
        waiting, self._waiting = self._waiting, {}
        for messages in waiting.values():
            for message in messages:
                token = message.token
                future = token.future if type(token) is _Request else token
                if not future.done():
                    future.set_result(None)


def _boundary(messages: list[Message], limit: int) -> int:
    """The first index at or after ``limit`` that does not split a request."""
    cut = max(1, limit)
    while cut < len(messages) and messages[cut].token is messages[cut - 1].token:
        cut += 1  # only a multi-message request shares its token between messages
    return cut
