"""Core NATS mode of the NATS server: queue-group subscriptions, at-most-once."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from amgi.servers.kit import DueList
from amgi.servers.nats._client import Refusals
from amgi.servers.nats._dead_letter_streams import DeadLetterStreams
from amgi.servers.nats._headers import decode, over_max_payload
from amgi.transport import Batch, Message

if TYPE_CHECKING:
    from amgi.servers.nats import NatsOptions

__all__ = ["Subscriptions"]

logger = logging.getLogger("amgi.servers.nats")

_CHECK = 1.0
"""Seconds an idle read waits before it looks whether the connection is still open."""

_MAX_BUFFERED = 512 * 1024
_MAX_BUFFERED_BYTES = 128 * 1024 * 1024
"""Messages (and payload bytes) received and not fetched yet, or waiting for their retry,
that are held at most (nats-py's own limits per subscription): beyond, an app slower than
the publishers (or nacking them all) would grow the process without bound, so a message
that arrives then is dropped, as NATS drops a slow consumer's."""

_DROPS_EVERY = 10.0
"""Seconds between two lines counting the messages dropped."""


class Subscriptions:
    """Subscriptions in one queue group; a nacked message waits here for its retry."""

    def __init__(
        self,
        client: Any,
        subjects: Sequence[str],
        options: NatsOptions,
        dead_letter_streams: DeadLetterStreams,
        refusals: Refusals,
    ) -> None:
        self.client = client
        self.dead_letter_streams = dead_letter_streams
        self.refusals = refusals
        self.subjects = list(subjects)
        self.options = options
        self._subs: list[Any] = []
        self._draining: set[asyncio.Future[None]] = set()
        """The drains :meth:`hand_over` started (cancelled at the stop if still going)."""
        self._buffer: deque[tuple[str, Any]] = deque()
        self._buffered_bytes = 0
        self._dropped = 0
        """Messages dropped since the last line said so."""
        self._dropped_said = float("-inf")
        self._arrived = asyncio.Event()
        refusals.wake = self._arrived.set
        self._retries: DueList[tuple[str, Message]] = DueList()
        self._retry_bytes = 0
        """The payload bytes of the retries waiting: they count towards the limits, or an
        app that nacks everything would grow the process with arrivals x retry delay."""
        self._ids = itertools.count(1)

    async def start(self) -> None:
        for subject in self.subjects:
            self._subs.append(
                await self.client.subscribe(
                    subject, queue=self.options.queue, cb=self._receiver(subject)
                )
            )

    def _receiver(self, subject: str) -> Any:
        async def on_message(msg: Any) -> None:
            size = len(msg.data)
            if (
                len(self._buffer) + len(self._retries) >= _MAX_BUFFERED
                or self._buffered_bytes + self._retry_bytes + size > _MAX_BUFFERED_BYTES
            ):
                self._dropped += 1
                return
            self._buffer.append((subject, msg))
            self._buffered_bytes += size
            self._arrived.set()

        return on_message

    def _say_dropped(self, now: float) -> None:
        """One line, at most every ``_DROPS_EVERY`` seconds, counting the drops since."""
        if not self._dropped or now < self._dropped_said + _DROPS_EVERY:
            return
        logger.warning(
            "%d message(s) dropped: the app is slower than they arrive and %d already wait "
            "in memory (a slow consumer; core NATS delivers at most once)",
            self._dropped,
            len(self._buffer),
        )
        self._dropped, self._dropped_said = 0, now

    async def hand_over(self) -> list[Batch]:
        """At the stop: unsubscribe, letting what the server sent before arrive (drain),
        and return the messages received that no batch took, for the runtime to process
        (core NATS never delivers them again).

        The drains run together, waited for at most ``--connect-timeout``: each waits for
        the server's answer (nats-py's flush, 10 s), and one after the other, from a
        server that stopped answering, they outlasted the stop's deadline and what had
        already arrived was lost. A drain still going is left to the stop."""
        subs, self._subs = self._subs, []
        drains = [asyncio.ensure_future(self._drain(sub)) for sub in subs]
        self._draining.update(drains)
        if drains:
            await asyncio.wait(drains, timeout=self.options.connect_timeout)
        return self._take(len(self._buffer))

    @staticmethod
    async def _drain(sub: Any) -> None:
        try:
            await sub.drain()
        except Exception as exc:
            logger.debug("draining a subscription failed: %s", exc)

    async def stop(self) -> None:
        draining, self._draining = self._draining, set()
        for task in draining:
            task.cancel()
        await asyncio.gather(*draining, return_exceptions=True)
        subs, self._subs = self._subs, []
        lost = len(self._buffer) + len(self._retries)
        self._retries.clear()
        self._retry_bytes = 0
        self._buffer.clear()
        self._buffered_bytes = 0
        self._say_dropped(float("inf"))
        if lost:
            logger.warning(
                "%d message(s) received or waiting in memory for a retry are lost as the "
                "server stops (core NATS delivers at most once)",
                lost,
            )
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                logger.debug("unsubscribe failed: %s", exc)

    async def read(self) -> list[Batch]:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            self._say_dropped(now)
            due = self._retries.pop_due(now)
            grouped: dict[str, list[Message]] = {}
            for subject, message in due:
                message.attempt += 1
                self._retry_bytes -= len(message.payload or b"")
                grouped.setdefault(subject, []).append(message)
            for subject, messages in self._grouped(self.options.batch_size).items():
                grouped.setdefault(subject, []).extend(messages)
            if grouped:
                return [Batch(s, msgs, key=s) for s, msgs in grouped.items()]
            self.refusals.check()  # a subscription refused: nothing arrives any more
            if self.client.is_closed:  # closed for good: nothing arrives any more
                raise ConnectionError("nats: the connection is closed")
            self._arrived.clear()
            next_due = self._retries.next_due()
            # At most a second: a connection closed for good wakes nothing.
            timeout = _CHECK if next_due is None else min(_CHECK, max(0.0, next_due - now))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()

    def _grouped(self, count: int) -> dict[str, list[Message]]:
        """The next ``count`` messages received (at most), per subject."""
        grouped: dict[str, list[Message]] = {}
        buffer = self._buffer
        for _ in range(min(len(buffer), count)):
            subject, msg = buffer.popleft()
            self._buffered_bytes -= len(msg.data)
            grouped.setdefault(subject, []).append(self._message(msg))
        return grouped

    def _take(self, count: int) -> list[Batch]:
        """The next ``count`` messages received (at most) as batches of ``--batch-size``."""
        size = self.options.batch_size
        return [
            Batch(subject, messages[i : i + size], key=subject)
            for subject, messages in self._grouped(count).items()
            for i in range(0, len(messages), size)
        ]

    def _message(self, msg: Any) -> Message:
        headers, msg_id = decode(msg.headers)
        binding: dict[str, Any] = {"subject": msg.subject}
        if msg_id is not None:
            binding["msgId"] = msg_id
        return Message(str(next(self._ids)), headers, msg.data, {"nats": binding}, 1, None)

    async def settle(
        self, settlement: Any, dead: list[tuple[Message, str, dict[str, str]]], subject: str
    ) -> None:
        now = asyncio.get_running_loop().time()
        for r in settlement.retry:
            self._retries.add(now + r.delay, (subject, r.message))
            self._retry_bytes += len(r.message.payload or b"")
        if settlement.retry:
            self._arrived.set()  # the reader sleeps until its next due time: wake it
        if not dead:
            return
        js = self.client.jetstream(timeout=self.options.publish_timeout)
        streams = self.dead_letter_streams
        unfit = await streams.check(t for _, t, _ in dead)
        for d, (m, target, headers) in zip(settlement.dead, dead, strict=True):
            try:  # stored if a stream captures the subject and keeps it, otherwise lost: say so
                problem = unfit[target]
                if problem is not None:
                    raise problem
                too_big = over_max_payload(self.client.max_payload, m.payload or b"", headers)
                if too_big:  # published, the server would close the connection
                    raise ValueError(too_big)
                publishing = js.publish(target, m.payload or b"", headers=headers)
                await self.refusals.publishing(target, publishing)
            except Exception as exc:
                streams.forget(target)
                logger.error("could not dead-letter message %s to %r: %s", m.id, target, exc)
                d.not_stored(exc, lost=True)
