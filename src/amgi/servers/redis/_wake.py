"""A private stream that cuts a blocking ``XREADGROUP`` short when a retry falls due first.

Ending another connection's blocked read takes ``CLIENT UNBLOCK``, an admin command; an
entry added to a stream the read waits on needs no rights beyond the streams'. So each
consumer reads one more stream, ``{first stream}.wake.{consumer}``, into which a
settlement whose retry falls due before the read in flight ends adds an entry.
"""

from __future__ import annotations

import logging
from typing import Any

from amgi.servers.redis._client import raise_if_cancelled

__all__ = ["Wake"]

logger = logging.getLogger("amgi.servers.redis")

_REFRESH = 60.0
"""Seconds between two looks that the stream and its group are there."""

_TTL_MS = 600_000
"""The stream's expiry: a crashed process's goes by itself; a live one pushes it back."""


class Wake:
    """The wake-up stream of one consumer of one group."""

    def __init__(self, client: Any, key: str, group: str, consumer: str) -> None:
        self.client = client
        self.key = key.encode()
        self.group = group
        self.consumer = consumer
        self.ready = False
        """Whether the stream and its group exist (refused, e.g. by an ACL: no wake-ups,
        a retry waits for the read in flight to end, as before)."""
        self._next_look = 0.0
        self._until: float | None = None
        """When the read in flight ends at the latest (``None``: no read in flight)."""
        self._rung = False
        self._said = False

    async def look(self, now: float, *, again: bool = False) -> None:
        """Every minute (or ``again``: it vanished): create the stream and its group when
        missing, drop the wake-ups read (``DELCONSUMER``: no ``XACK`` per wake-up), push
        its expiry back. No read is in flight meanwhile."""
        if now < self._next_look and not again:
            return
        self._next_look = now + _REFRESH
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.execute_command("XGROUP CREATE", self.key, self.group, "$", "MKSTREAM")
                pipe.execute_command("XGROUP DELCONSUMER", self.key, self.group, self.consumer)
                pipe.execute_command("PEXPIRE", self.key, _TTL_MS)
                created, _, expiring = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # (the connection: the read that follows says so)
            raise_if_cancelled()
            self.ready = False
            self._next_look = now + 1.0
            logger.debug("the wake-up stream was not looked at: %s", exc)
            return
        refused: Exception | None = None
        if isinstance(created, Exception) and not str(created).startswith("BUSYGROUP"):
            refused = created
        elif isinstance(expiring, Exception):
            refused = expiring
        self.ready = refused is None
        if refused is not None and not self._said:
            self._said = True
            logger.info(
                "no wake-up stream %r (%s): a retry settled during a read is handed out "
                "when that read ends (at most --block seconds late)",
                self.key.decode(),
                refused,
            )

    def streams(self) -> tuple[bytes, ...]:
        """The stream a read waits on besides its own (none when not ready)."""
        return (self.key,) if self.ready else ()

    def reading(self, until: float | None) -> None:
        """A read that ends at ``until`` at the latest is under way (``None``: it ended)."""
        self._until = until
        self._rung = False

    async def ring(self, due: float) -> None:
        """Wake the read in flight when something falls due (``due``) before it ends:
        one entry (the stream kept to one), once per read."""
        if self._until is None or self._rung or due >= self._until or not self.ready:
            return
        self._rung = True
        try:
            await self.client.execute_command("XADD", self.key, "MAXLEN", "1", "*", "w", "")
        except Exception as exc:  # the read ends at its time: the retry is late, not lost
            raise_if_cancelled()
            logger.debug("the read in flight was not woken: %s", exc)

    async def close(self) -> None:
        """Delete the stream (no read is in flight any more)."""
        if self.ready:
            self.ready = False
            try:
                await self.client.execute_command("DEL", self.key)
            except Exception:  # it expires by itself
                raise_if_cancelled()
