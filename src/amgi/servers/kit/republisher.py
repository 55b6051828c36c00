"""Republish a nacked message after its retry delay, from tasks the server owns.

For brokers without delayed redelivery (MQTT), a retry is "wait, publish a copy with the
next attempt number, then acknowledge the original". Those waits must not outlive the
server: :meth:`DelayedRepublisher.close` cancels the ones still waiting (their originals
stay unacknowledged, so the broker redelivers them) and waits for the ones already
publishing, so no copy is half-sent when the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

__all__ = ["DelayedRepublisher"]

logger = logging.getLogger("amgi.servers.kit")


class DelayedRepublisher:
    """Runs ``send()`` after ``delay`` seconds, in tasks it owns until :meth:`close`.

    ``send`` is a coroutine function that publishes the copy and acknowledges the
    original; it handles its own send errors (an exception escaping it is logged with
    ``name``). ``schedule`` after ``close`` is refused with :class:`RuntimeError`.
    """

    __slots__ = ("_closed", "_sending", "_tasks", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[None]] = set()
        self._sending: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pending(self) -> int:
        """Retries scheduled and not finished (waiting or publishing)."""
        return len(self._tasks)

    def schedule(self, delay: float, send: Callable[[], Awaitable[None]]) -> None:
        """Call ``await send()`` after ``delay`` seconds."""
        if self._closed:
            raise RuntimeError(f"{self.name}: the republisher is closed")
        task = asyncio.create_task(self._run(delay, send), name=f"{self.name}-retry")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def _run(self, delay: float, send: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(delay)
        task = asyncio.current_task()
        assert task is not None
        self._sending.add(task)
        try:
            await send()
        except Exception:
            logger.exception("%s: a delayed republish failed", self.name)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._sending.discard(task)

    async def close(self, timeout: float | None = None) -> None:
        """Cancel the retries still waiting; wait for those publishing (at most ``timeout``).

        Retries still publishing after ``timeout`` seconds are cancelled too. Returns
        when every task has ended; later :meth:`schedule` calls are refused.
        """
        self._closed = True
        waiting = [t for t in self._tasks if t not in self._sending]
        for task in waiting:
            task.cancel()
        tasks = list(self._tasks)
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
