"""A figure a server reads from its broker now and then for metrics (consumer lag, depth).

``Refreshed(name, every, read)``: :meth:`~Refreshed.get` returns the last value read
(``None`` before the first read) and, on its first call, starts a task that runs
``await read()`` every ``every`` seconds. So nothing is asked of the broker while
metrics are off, a busy application does not stop the refresh (it does not wait for a
fetch), and the server owns the task: it calls :meth:`~Refreshed.close` in its ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["Refreshed"]

logger = logging.getLogger("amgi.servers.kit")

T = TypeVar("T")


class Refreshed(Generic[T]):
    """The last value of ``read()``, refreshed every ``every`` seconds once asked for."""

    def __init__(self, name: str, every: float, read: Callable[[], Awaitable[T]]) -> None:
        self.name = name
        self.every = every
        self._read = read
        self._value: T | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def get(self) -> T | None:
        """The value as last read; starts the refreshing task on the first call."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)
        return self._value

    async def _run(self) -> None:
        while True:
            try:
                self._value = await self._read()
            except Exception as exc:  # a failing read keeps the last value
                logger.debug("%s: reading failed: %s", self.name, exc)
            await asyncio.sleep(self.every)

    async def close(self) -> None:
        """Stop refreshing (cancel the task and wait for it)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
