"""Pull requests to JetStream consumers, each answered into its own inbox.

Each consumer has at most one open pull request (``batch`` messages, ``expires``); the
messages land in its inbox subscription, whose callback queues them, so taking a batch touches no
per-message task. A request closes when its last message arrived or JetStream ends it
with a status (404 no messages, 408 expired); one refused or cut short (409, e.g. too many
waiting, the consumer deleted) and one that the server never ends count as closed after
its expiry, and the latter is reported to ``unanswered``
(JetStream answers every request, so silence means a lost connection or a deleted
consumer). The next read opens a new one, so at most ``batch`` messages wait here
unasked-for: JetStream's ack wait runs for them from their delivery, so they are leased
with the batches the runtime holds (:meth:`Puller.waiting`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from amgi.errors import ConfigurationError

__all__ = ["Puller"]

logger = logging.getLogger("amgi.servers.nats")

_FOR_GOOD = {
    "Exceeded MaxRequestBatch": "--batch-size",
    "Exceeded MaxRequestExpires": "--fetch-expiry",
}
"""409 answers to a request over the consumer's own limits, with the option that sizes
it: asked again, every request would be refused the same way."""

_SLACK = 0.5
"""Seconds after its expiry that an unanswered request counts as closed."""


@dataclass(slots=True, eq=False)
class _Request:
    api: str
    """``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``."""
    reply: str
    open_until: float = 0.0
    remaining: int = 0
    answered: bool = False


class Puller:
    """Open pull requests for consumers and hand out what arrived, per consumer."""

    def __init__(
        self,
        client: Any,
        batch: int,
        expires: float,
        unanswered: Callable[[int], Awaitable[None]],
        check: Callable[[], Awaitable[None]],
    ) -> None:
        self.client = client
        self.unanswered = unanswered
        self.check = check
        """Awaited on every turn of :meth:`take` (before asking and handing out); it may
        raise to end the fetch."""
        self.batch = batch
        self.expires = expires
        self._requests: list[_Request] = []
        self._arrived: list[deque[Any]] = []
        self._ready = asyncio.Event()
        self._subs: list[Any] = []
        self._refused = ""
        """Why the consumer refuses every request as it is asked (``_FOR_GOOD``), or ""."""
        # A little under ``expires``, so JetStream's answer comes before our deadline; but
        # never close to nothing: a request that expires at once is asked again at once.
        nanoseconds = int(expires * 1e9)
        expires_ns = max(1, nanoseconds - min(10_000_000, nanoseconds // 10))
        self._payload = json.dumps({"batch": batch, "expires": expires_ns}).encode()

    def add(self, stream: str, consumer: str) -> int:
        """Register a consumer; returns its index."""
        index = len(self._requests)
        api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._requests.append(_Request(api, self.client.new_inbox()))
        self._arrived.append(deque())
        return index

    async def start(self) -> None:
        for index, request in enumerate(self._requests):
            self._subs.append(await self.client.subscribe(request.reply, cb=self._receiver(index)))

    async def hand_over(self) -> list[tuple[int, list[Any]]]:
        """Stop asking, wait for the open pull requests to end (at most ``expires``
        seconds), and return what arrived but was never handed out, per consumer in runs
        of ``batch``.

        JetStream cannot call a pull request off. Unsubscribed while it is open, the
        message it is sending at that moment can reach the inbox after the unsubscribe:
        lost to this process, it comes again with its delivery count, the attempt, raised
        by one. So can every message given back at :meth:`stop` (``-NAK``).
        """
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            open_until = max((r.open_until for r in self._requests), default=0.0)
            if open_until <= now:
                break
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(open_until - now):
                    await self._ready.wait()
        taken: list[tuple[int, list[Any]]] = []
        for index, arrived in enumerate(self._arrived):
            while arrived:
                n = min(self.batch, len(arrived))
                taken.append((index, [arrived.popleft() for _ in range(n)]))
        return taken

    async def stop(self) -> None:
        """Unsubscribe; messages that arrived but were never handed out go back at once."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for arrived in self._arrived:
            while arrived:
                with contextlib.suppress(Exception):
                    await arrived.popleft().nak()

    def waiting(self) -> list[Any]:
        """The messages that arrived and no batch took yet (the runtime leases them)."""
        return [msg for arrived in self._arrived for msg in arrived]

    def _receiver(self, index: int) -> Any:
        async def on_message(msg: Any) -> None:
            self._on_message(index, msg)

        return on_message

    def _on_message(self, index: int, msg: Any) -> None:
        request = self._requests[index]
        request.answered = True
        if msg.reply:  # a message; a status has no reply subject
            self._arrived[index].append(msg)
            request.remaining -= 1
            if request.remaining <= 0:
                request.open_until = 0.0
            self._ready.set()
            return
        status = (msg.headers or {}).get("Status", "")
        if status in ("404", "408"):
            request.open_until = 0.0
            self._ready.set()
        elif status == "409":
            # Refused or cut short (too many waiting requests, the consumer deleted):
            # asked again at once, a refusal would be asked again thousands of times a
            # second. The next request waits for this one's expiry instead; one over the
            # consumer's own limits would be refused for ever: that ends the fetch.
            description = (msg.headers or {}).get("Description", "")
            option = next((o for d, o in _FOR_GOOD.items() if description.startswith(d)), None)
            if option is not None and not self._refused:
                *_, stream, consumer = request.api.split(".")
                self._refused = (
                    f"nats: consumer {consumer!r} of stream {stream!r} refuses every pull "
                    f"request ({description}); lower {option} or raise that limit of the "
                    "consumer, or pick another --durable"
                )
                self._ready.set()
                return
            logger.warning("pull request on %s ended: %s", request.api, description)

    async def take(self) -> tuple[int, list[Any]]:
        """Wait until a consumer has messages; return its index and up to ``batch`` of them."""
        loop = asyncio.get_running_loop()
        count = len(self._requests)
        turn = 0
        while True:
            await self.check()
            if self._refused:
                raise ConfigurationError(self._refused)
            now = loop.time()
            for index, request in enumerate(self._requests):
                if request.open_until <= now:
                    if request.open_until and not request.answered:
                        await self.unanswered(index)
                    await self._ask(request, now)
            for step in range(count):
                index = (turn + step) % count
                arrived = self._arrived[index]
                if arrived:
                    n = min(self.batch, len(arrived))
                    return index, [arrived.popleft() for _ in range(n)]
            turn += 1
            self._ready.clear()
            wait = min(r.open_until for r in self._requests) - now
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation
            # that comes as the event is set, and the stop would wait for the next one.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.001, wait)):
                    await self._ready.wait()

    def wake(self) -> None:
        """Make :meth:`take` run its next turn (and :attr:`check`) now."""
        self._ready.set()

    async def _ask(self, request: _Request, now: float) -> None:
        request.remaining = self.batch
        request.answered = False
        request.open_until = now + self.expires + _SLACK
        await self.client.publish(request.api, self._payload, reply=request.reply)
