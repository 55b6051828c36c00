"""In-memory server: a broker inside the process, for tests and benchmarks.

How AMGI maps onto it:

=================  ==============================================================
address            a queue name; queues spring into being on first use
batch              up to ``batch_size`` ready messages of one queue
ordering key       the queue: batches of one queue run one after another
ack                forget the message
nack (retry)       back in its queue after the runtime's delay, attempt + 1
nack (dead)        appended to ``MemoryBroker.dead[address]`` with the reason
send               append to the queue of ``address``
close / crash      unsettled messages go back to the front of their queue
=================  ==============================================================

Servers and test code meet through :meth:`MemoryBroker.named`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from amgi.errors import ConfigurationError, SendError
from amgi.options import option
from amgi.transport import (
    Batch,
    Bindings,
    HeaderList,
    Message,
    Settlement,
    StoredDeadLetter,
    Transport,
)

__all__ = ["MemoryBroker", "MemoryOptions", "MemorySendError", "MemoryTransport"]


class MemorySendError(SendError):
    """A send to the in-memory broker failed."""


class MemoryBroker:
    """Queues, delayed redeliveries and dead letters of one in-process broker."""

    _named: ClassVar[dict[str, MemoryBroker]] = {}

    def __init__(self) -> None:
        self.queues: dict[str, deque[Message]] = {}
        self.dead: dict[str, list[tuple[Message, str]]] = {}
        self._delayed: list[tuple[float, int, str, Message]] = []
        self._ids = itertools.count(1)
        self._order = itertools.count()
        self._waiters: set[asyncio.Future[None]] = set()

    @classmethod
    def named(cls, name: str = "default") -> MemoryBroker:
        """The broker called ``name`` in this process, created on first use."""
        broker = cls._named.get(name)
        if broker is None:
            broker = cls._named[name] = cls()
        return broker

    @classmethod
    def reset(cls, name: str = "default") -> MemoryBroker:
        """Replace the broker called ``name`` with an empty one and return it."""
        broker = cls._named[name] = cls()
        return broker

    def put(
        self,
        address: str,
        headers: HeaderList,
        payload: bytes | None,
        bindings: Bindings | None = None,
    ) -> str:
        """Append a message to ``address`` and return its id."""
        message_id = str(next(self._ids))
        message = Message(message_id, headers, payload, bindings if bindings is not None else {})
        self.queue(address).append(message)
        self.wake()
        return message_id

    def pending(self, address: str) -> int:
        """Messages of ``address`` waiting (ready or delayed), not counting those in flight."""
        ready = len(self.queues.get(address, ()))
        return ready + sum(1 for _, _, a, _ in self._delayed if a == address)

    def queue(self, address: str) -> deque[Message]:
        """The ready messages of ``address`` (created empty on first use)."""
        queue = self.queues.get(address)
        if queue is None:
            queue = self.queues[address] = deque()
        return queue

    def put_later(self, address: str, message: Message, delay: float) -> None:
        """Make ``message`` ready on ``address`` after ``delay`` seconds (a retry)."""
        due = time.monotonic() + delay
        heapq.heappush(self._delayed, (due, next(self._order), address, message))
        self.wake()

    def promote_due(self) -> float | None:
        """Move due delayed messages to their queues; seconds until the next one is due."""
        delayed = self._delayed
        now = time.monotonic()
        while delayed and delayed[0][0] <= now:
            _, _, address, message = heapq.heappop(delayed)
            self.queue(address).append(message)
        return delayed[0][0] - now if delayed else None

    def wake(self) -> None:
        """Wake every consumer waiting in :meth:`wait`."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait(self, timeout: float | None) -> None:
        """Wait until a message arrives or ``timeout`` seconds pass."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)


@dataclass(slots=True)
class MemoryOptions:
    """Options of the in-memory server."""

    broker: str = option("default", "name of the in-process broker")
    batch_size: int = option(100, "most messages per batch", ge=1)


class MemoryTransport(Transport):
    """The AMGI transport of :class:`MemoryBroker`."""

    name = "memory"
    options = MemoryOptions
    send_error = MemorySendError
    stable_ids = True
    counts_deliveries = True
    outlives_process = False
    single_process_reason = "its broker lives inside one process"

    def __init__(self, addresses: Sequence[str], options: MemoryOptions | None = None) -> None:
        super().__init__(addresses, options or MemoryOptions())
        self.config: MemoryOptions
        self.broker = MemoryBroker.named(self.config.broker)
        self._in_flight: dict[str, tuple[str, Message]] = {}
        self._closed = False

    async def connect(self) -> None:
        self.check()
        for address in self.addresses:
            if not address:
                raise ConfigurationError("an address must be a non-empty queue name")
        self._closed = False

    async def fetch(self) -> Sequence[Batch]:
        broker = self.broker
        size = self.config.batch_size
        in_flight = self._in_flight
        while True:
            next_due = broker.promote_due()
            batches = []
            for address in self.addresses:
                queue = broker.queues.get(address)
                if not queue:
                    continue
                take = min(size, len(queue))
                messages = [queue.popleft() for _ in range(take)]
                for m in messages:
                    in_flight[m.id] = (address, m)
                batches.append(Batch(address, messages, key=address))
            if batches:
                return batches
            await broker.wait(next_due)

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        in_flight = self._in_flight
        for m in settlement.acked:
            in_flight.pop(m.id, None)
        for r in settlement.retry:
            if in_flight.pop(r.message.id, None) is not None:
                # A copy: the runtime reports the settled message's attempt afterwards.
                attempt = r.message.attempt + (0 if r.uncounted else 1)
                again = replace(r.message, attempt=attempt)
                self.broker.put_later(batch.address, again, r.delay)
        for d in settlement.dead:
            if in_flight.pop(d.message.id, None) is not None:
                self.broker.dead.setdefault(batch.address, []).append((d.message, d.reason))
            else:
                d.not_stored("the server closed and gave the message back to its queue")

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        if self._closed:
            raise MemorySendError(f"memory: cannot send to {address!r}: the server is closed")
        self.broker.put(address, list(headers), payload, dict(bindings))

    def backlog(self) -> dict[str, int]:
        """Ready and delayed messages of each consumed queue."""
        return {address: self.broker.pending(address) for address in self.addresses}

    async def list_dead_letters(self, address: str, limit: int) -> list[StoredDeadLetter]:
        """The entries of ``MemoryBroker.dead[address]``."""
        return [
            StoredDeadLetter(m.id, address, list(m.headers), m.payload, m.bindings, m.attempt, r)
            for m, r in self.broker.dead.get(address, [])[:limit]
        ]

    async def replay_dead_letters(self, address: str, limit: int) -> int:
        """Back to the end of the queue as new first attempts."""
        dead = self.broker.dead.get(address, [])
        taken, dead[:limit] = dead[:limit], []
        for m, _ in taken:
            bindings = {k: v for k, v in m.bindings.items() if k != "amgi"}
            self.broker.put(address, list(m.headers), m.payload, bindings)
        return len(taken)

    async def close(self) -> None:
        """Give unsettled messages back to their queues, as a broker does on disconnect."""
        self._closed = True
        returned: dict[str, list[Message]] = {}
        for address, m in self._in_flight.values():
            m.attempt += 1
            returned.setdefault(address, []).append(m)
        self._in_flight.clear()
        for address, messages in returned.items():
            self.broker.queue(address).extendleft(reversed(messages))
        if returned:
            self.broker.wake()
