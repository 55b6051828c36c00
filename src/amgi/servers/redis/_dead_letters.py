"""Dead letters of the Redis server: the stream ``--dead-letter-stream`` (``{stream}.dlq``).

``list`` reads the dead-letter stream with ``XRANGE`` and changes nothing. A replay reads
a chunk the same way, ``XADD``s each message back to the stream it came from (pipelined,
each reply checked), then ``XDEL``s exactly the entries whose ``XADD`` Redis confirmed: a
replay killed between the two leaves those in both streams (at least once, never lost).

No consumer group on the dead-letter stream: a group would keep "listed" and "replayed"
in its own pending list while the entries stayed in the stream (what ``XLEN`` and other
tools show would disagree with ``list``), a replay would still need ``XDEL`` to remove
them, and a killed replay's pending entries would wait for a claim. With ``XRANGE`` and
``XDEL`` the stream itself is the whole truth. The price: two replays of one address
running at once may both send an entry (a duplicate, which at-least-once allows).

Several streams may share one dead-letter stream (a ``--dead-letter-stream`` without
``{address}``): list and replay of an address see only the entries dead-lettered from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

from amgi.errors import BrokerUnavailable, ConfigurationError, SendError
from amgi.servers.kit import ChunkedDeadLetters, DeadLetterChunk, stored_dead_letter
from amgi.servers.redis._fields import decode, encode
from amgi.transport import StoredDeadLetter

if TYPE_CHECKING:
    from amgi.servers.redis import RedisOptions

__all__ = ["DeadLetters"]

_CHUNK = 100
"""Entries read per ``XRANGE`` (and replayed per pipeline)."""


class DeadLetters(ChunkedDeadLetters):
    """The transport's ``list_dead_letters`` and ``replay_dead_letters`` on Redis."""

    config: RedisOptions
    _client: Any
    send_error: ClassVar[type[SendError]]

    def dead_letter_address(self, address: str) -> str:
        raise NotImplementedError  # pragma: no cover - the transport's

    def _trim(self, maxlen: int) -> tuple[Any, ...]:
        raise NotImplementedError  # pragma: no cover - the transport's

    async def replay_dead_letters(self, address: str, limit: int) -> int:
        """``XADD`` each back to ``address``, then ``XDEL`` the confirmed ones."""
        from redis import exceptions as redis_errors

        dlq = self.dead_letter_address(address)
        trim = self._trim(self.config.maxlen)
        moved = 0
        async for chunk in self._dead_letter_chunks(address, limit, replay=True):
            try:
                async with self._answer(), self._client.pipeline(transaction=False) as pipe:
                    for _, d in chunk:
                        pipe.execute_command(
                            "XADD", address, *trim, "*", *encode(d.headers, d.payload)
                        )
                    results = await pipe.execute(raise_on_error=False)
                sent = [i for (i, _), r in zip(chunk, results, strict=True) if _confirmed(r)]
                if sent:
                    async with self._answer():
                        await self._client.execute_command("XDEL", dlq, *sent)
            except (redis_errors.RedisError, TimeoutError) as exc:
                raise self.send_error(
                    f"redis: replay to {address!r} stopped after {moved} dead letter(s): "
                    f"{self._why(exc)}; the rest stay in {dlq!r}"
                ) from None
            moved += len(sent)
            if len(sent) < len(chunk):
                failure = next(r for r in results if not _confirmed(r))
                raise self.send_error(
                    f"redis: replay to {address!r} stopped after {moved} dead letter(s): "
                    f"{failure}; the rest stay in {dlq!r}"
                )
        return moved

    async def _dead_letter_chunks(
        self, address: str, limit: int, *, replay: bool
    ) -> AsyncIterator[DeadLetterChunk]:
        from redis import exceptions as redis_errors

        try:
            async with self._answer():
                dlq = await self._dead_letter_stream(address, replay=replay)
                newest = await self._client.execute_command("XREVRANGE", dlq, "+", "-", "COUNT", 1)
        except (redis_errors.RedisError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"redis: cannot look at {address!r}: {self._why(exc)}"
            ) from None
        if not newest:
            return
        end = newest[0][0]  # entries added after the start are left for the next run
        start = b"-"
        left = limit
        while left > 0:
            try:
                async with self._answer():
                    rows = await self._client.execute_command(
                        "XRANGE", dlq, start, end, "COUNT", _CHUNK
                    )
            except (redis_errors.RedisError, TimeoutError) as exc:
                raise BrokerUnavailable(f"redis: cannot read {dlq!r}: {self._why(exc)}") from None
            chunk = [
                (entry_id, d)
                for entry_id, fields in rows or ()
                if (d := _stored(entry_id, fields, address)).address == address
            ][:left]
            if chunk:
                left -= len(chunk)
                yield chunk
            if len(rows or ()) < _CHUNK:
                return
            start = _after(rows[-1][0])

    def _answer(self) -> asyncio.Timeout:
        """Bounds one exchange with Redis by ``--connect-timeout``: no hang on a silent
        server (the client itself waits for an answer forever)."""
        return asyncio.timeout(self.config.connect_timeout)

    def _why(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError) and not str(exc):
            return f"no answer within {self.config.connect_timeout:g} s"
        return str(exc)

    async def _dead_letter_stream(self, address: str, *, replay: bool) -> str:
        """The dead-letter stream of ``address``, after checking both keys' types."""
        if self._client is None:
            raise ConfigurationError("redis: not connected")
        dlq = self.dead_letter_address(address)
        if dlq == address:
            raise ConfigurationError(f"redis: {address!r} is its own dead-letter stream")
        if self.config.mode == "pubsub":
            if replay:
                raise ConfigurationError(
                    "redis: dead letters cannot be replayed to a Pub/Sub channel (it stores "
                    "nothing and carries no headers); list them, or replay in streams mode"
                )
        else:
            await self._expect_stream(address, missing=f"stream {address!r} does not exist")
        await self._expect_stream(dlq, missing=None)
        return dlq

    async def _expect_stream(self, key: str, missing: str | None) -> None:
        kind = await self._client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind == "none" and missing is not None:
            raise ConfigurationError(f"redis: {missing}")
        if kind not in ("none", "stream"):
            raise ConfigurationError(f"redis: key {key!r} is a {kind}, not a stream")


def _confirmed(reply: Any) -> bool:
    return not isinstance(reply, Exception)


def _after(entry_id: bytes) -> bytes:
    """The smallest entry id after ``entry_id`` (``XRANGE`` start, any Redis version)."""
    ms, _, seq = entry_id.partition(b"-")
    return b"%s-%d" % (ms, int(seq or b"0") + 1)


def _stored(entry_id: bytes, fields: list[bytes], address: str) -> StoredDeadLetter:
    headers, payload = decode(fields)
    ms = entry_id.partition(b"-")[0]
    dead_at = int(ms) / 1000 if ms.isdigit() else None
    return stored_dead_letter(entry_id.decode(), headers, payload, address=address, dead_at=dead_at)
