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
from amgi.servers.nats._dead_letters import dead_letter_subjects
from amgi.servers.nats._headers import decode, over_max_payload
from amgi.transport import Batch, Message

if TYPE_CHECKING:
    from amgi.servers.nats import NatsOptions

__all__ = ["Subscriptions"]

logger = logging.getLogger("amgi.servers.nats")

_CHECK = 1.0
"""Seconds an idle read waits before it looks whether the connection is still open."""


class Subscriptions:
    """Subscriptions in one queue group; a nacked message waits here for its retry."""

    def __init__(self, client: Any, subjects: Sequence[str], options: NatsOptions) -> None:
        self.client = client
        self.subjects = list(subjects)
        self.options = options
        self._subs: list[Any] = []
        self._buffer: deque[tuple[str, Any]] = deque()
        self._arrived = asyncio.Event()
        self._retries: DueList[tuple[str, Message]] = DueList()
        self._ids = itertools.count(1)

    async def start(self) -> None:
        for subject in self.subjects:
            self._subs.append(
                await self.client.subscribe(
                    subject, queue=self.options.queue, cb=self._receiver(subject)
                )
            )

    def _receiver(self, subject: str) -> Any:
        buffer, arrived = self._buffer, self._arrived

        async def on_message(msg: Any) -> None:
            buffer.append((subject, msg))
            arrived.set()

        return on_message

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        self._retries.clear()
        self._buffer.clear()
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                logger.debug("unsubscribe failed: %s", exc)

    async def read(self) -> list[Batch]:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            due = self._retries.pop_due(now)
            grouped: dict[str, list[Message]] = {}
            for subject, message in due:
                message.attempt += 1
                grouped.setdefault(subject, []).append(message)
            buffer = self._buffer
            for _ in range(min(len(buffer), self.options.batch_size)):
                subject, msg = buffer.popleft()
                grouped.setdefault(subject, []).append(self._message(msg))
            if grouped:
                return [Batch(s, msgs, key=s) for s, msgs in grouped.items()]
            if self.client.is_closed:  # closed for good: nothing arrives any more
                raise ConnectionError("nats: the connection is closed")
            self._arrived.clear()
            next_due = self._retries.next_due()
            # At most a second: a connection closed for good wakes nothing.
            timeout = _CHECK if next_due is None else min(_CHECK, max(0.0, next_due - now))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()

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
        if settlement.retry:
            self._arrived.set()  # the reader sleeps until its next due time: wake it
        if not dead:
            return
        js = self.client.jetstream(timeout=self.options.publish_timeout)
        jsm = self.client.jsm(timeout=self.options.publish_timeout)
        unfit = await dead_letter_subjects(jsm, (t for _, t, _ in dead))
        for d, (m, target, headers) in zip(settlement.dead, dead, strict=True):
            try:  # stored if a stream captures the subject and keeps it, otherwise lost: say so
                problem = unfit[target]
                if problem is not None:
                    raise problem
                too_big = over_max_payload(self.client.max_payload, m.payload or b"", headers)
                if too_big:  # published, the server would close the connection
                    raise ValueError(too_big)
                await js.publish(target, m.payload or b"", headers=headers)
            except Exception as exc:
                logger.error("could not dead-letter message %s to %r: %s", m.id, target, exc)
                d.not_stored(exc, lost=True)
