"""Pub/Sub mode of the Redis server: at-most-once, retries held in memory."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from amgi.servers.kit import DueList
from amgi.servers.redis._client import raise_if_cancelled
from amgi.transport import Batch, Message

if TYPE_CHECKING:
    from amgi.transport import Settlement

__all__ = ["PubSub"]

logger = logging.getLogger("amgi.servers.redis")


class PubSub:
    """A subscription to channels; a nacked message waits here for its retry."""

    def __init__(self, client: Any, channels: Sequence[str], batch_size: int) -> None:
        self.client = client
        self.channels = list(channels)
        self.batch_size = batch_size
        self._pubsub: Any = None  # redis.asyncio.client.PubSub
        self._retries: DueList[tuple[str, Message]] = DueList()
        self._ids = itertools.count(1)
        self._received: dict[str, list[Message]] = {}
        """Per channel, messages read from Redis and not returned yet: a read or hand-over
        cancelled meanwhile leaves them to the next, or for :meth:`stop` to count lost."""
        self._waiting: asyncio.Timeout | None = None
        """The deadline of the wait for messages in flight: a retry due sooner brings it
        forward (:meth:`settle`)."""

    async def start(self) -> None:
        self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(*self.channels)

    async def hand_over(self, wait: float) -> list[Batch]:
        """At the stop: unsubscribe, and return the messages Redis sent before it
        confirmed that no read took yet (Redis never sends them again), in batches of
        ``batch_size``; the confirmation is waited for at most ``wait`` seconds."""
        pubsub = self._pubsub
        if pubsub is None:
            return []
        try:
            async with asyncio.timeout(wait):
                await pubsub.unsubscribe()
                while pubsub.subscribed:  # until every channel's confirmation came
                    self._add(await pubsub.get_message(timeout=wait) or {})
        except Exception as exc:
            logger.warning(
                "unsubscribing at the stop failed (%s): messages Redis sent meanwhile are "
                "lost (Pub/Sub delivers at most once)",
                str(exc) or type(exc).__name__,
            )
        received, self._received = self._received, {}
        size = self.batch_size
        return [
            Batch(channel, messages[i : i + size], key=channel)
            for channel, messages in received.items()
            for i in range(0, len(messages), size)
        ]

    async def stop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        retries = len(self._retries)
        received = sum(map(len, self._received.values()))  # (a hand-over cut off)
        self._retries.clear()
        self._received.clear()
        if retries + received:
            logger.warning(
                "%d message(s) waiting in memory (%d delivered, %d for a retry) are lost as "
                "the server stops (Pub/Sub delivers at most once)",
                retries + received,
                received,
                retries,
            )
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def read(self) -> list[Batch]:
        pubsub = self._pubsub
        assert pubsub is not None
        loop = asyncio.get_running_loop()
        while True:
            if self._received:  # read by a read that was cancelled: handed out first
                return self._take()
            now = loop.time()
            due = self._retries.pop_due(now)
            if due:
                grouped: dict[str, list[Message]] = {}
                for channel, message in due:
                    message.attempt += 1
                    grouped.setdefault(channel, []).append(message)
                return [Batch(c, msgs, key=c) for c, msgs in grouped.items()]
            next_due = self._retries.next_due()
            raise_if_cancelled()
            first = await self._first(pubsub, now + 1.0 if next_due is None else next_due)
            if first is None:
                continue
            self._add(first)
            for _ in range(self.batch_size - 1):
                more = await pubsub.get_message(timeout=0.0)
                if more is None:
                    break
                self._add(more)
            return self._take()

    def _take(self) -> list[Batch]:
        """The messages read and not returned yet, a batch per channel."""
        received, self._received = self._received, {}
        return [Batch(c, msgs, key=c) for c, msgs in received.items()]

    async def _first(self, pubsub: Any, until: float) -> dict[str, Any] | None:
        """The next message Redis sends, or ``None`` at ``until`` (redis-py's read timeout)
        or as soon as a retry settled meanwhile falls due (:meth:`settle` sets a deadline
        on the wait; cut short there, redis-py's parser keeps a message half read for the
        next read, as its own read timeouts need)."""
        wait = max(0.0, until - asyncio.get_running_loop().time())
        try:
            async with asyncio.timeout(None) as self._waiting:
                message: dict[str, Any] | None = await pubsub.get_message(timeout=wait)
                return message
        except TimeoutError:
            if self._waiting is None or not self._waiting.expired():
                raise  # not the deadline's
            return None
        finally:
            self._waiting = None

    def _add(self, raw: dict[str, Any]) -> None:
        """Keep a message Redis sent (a confirmation is none) until it is returned."""
        if raw.get("type") != "message":
            return
        channel = raw["channel"].decode()
        data = raw["data"]
        mid = str(next(self._ids))
        self._received.setdefault(channel, []).append(
            Message(mid, [], data, {"redis": {"channel": channel}}, 1, None)
        )

    async def settle(
        self, channel: str, settlement: Settlement, dead: list[tuple[str, list[bytes]]]
    ) -> None:
        now = asyncio.get_running_loop().time()
        for r in settlement.retry:
            self._retries.add(now + r.delay, (channel, r.message))
        waiting, due = self._waiting, self._retries.next_due()
        if waiting is not None and due is not None:
            when = waiting.when()
            if when is None or due < when:  # the read waiting for messages ends when it is due
                waiting.reschedule(due)
        if dead:
            try:
                async with self.client.pipeline(transaction=True) as pipe:
                    for target, fields in dead:
                        pipe.execute_command("XADD", target, "*", *fields)
                    results = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                results = [exc] * len(dead)
            for d, result in zip(settlement.dead, results, strict=True):
                if isinstance(result, Exception):  # a channel message cannot come back
                    d.not_stored(result, lost=True)
