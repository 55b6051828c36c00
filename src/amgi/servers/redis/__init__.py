"""Redis server: streams with consumer groups (at-least-once), or Pub/Sub (at-most-once).

How AMGI maps onto Redis Streams (``--mode streams``, the default):

=================  ==================================================================
address            a stream; its consumer group is created if missing (``--start``)
batch              one ``XREADGROUP GROUP group consumer COUNT batch_size BLOCK block``
                   answer for one stream
ordering key       the stream
message id         the stream entry id (the same on every redelivery: the crash ledger
                   knows a message by its stream and id)
ack                one ``XACK`` per batch with every acked id
nack (retry)       the entry stays pending; after the retry delay it is taken back with
                   ``XCLAIM ... RETRYCOUNT n`` (n: the attempt handed out, so a claim
                   sent again counts once; one the app never had has its counter set
                   back first, ``XCLAIM ... RETRYCOUNT n JUSTID``); a blocked read
                   that would end after it is due is woken by an entry in this
                   consumer's private stream (``_wake``: ``CLIENT UNBLOCK`` is admin)
nack (dead)        ``XADD`` to ``{stream}.dlq`` (the reason, attempt and stream added as
                   fields), then ``XACK`` of those Redis confirmed
attempt            the entry's delivery counter
crash recovery     entries idle longer than ``--claim-idle`` on any consumer are taken
                   over with ``XAUTOCLAIM ... JUSTID``, then counted once with ``XCLAIM
                   ... RETRYCOUNT n`` (their counter read plus one: a step cut off is
                   made again, never counting twice), but for those this process holds
                   (in flight or waiting for a retry): kept fresh with ``XCLAIM ...
                   JUSTID`` in a script, while still pending on this consumer;
                   a ``--consumer`` named again after a restart reads its own
                   pending entries first (``XPENDING ... consumer``, counted so)
lost read          a read of new entries whose reply a failed connection lost: this
                   consumer's pending entries after the last id read, of delivery
                   count 1 and not held here, are taken (``XCLAIM`` of their idle
                   time, ``RETRYCOUNT 1``) and handed out as first attempts
stop               the read in flight is woken (its wake-up stream) and ends (at most
                   ``--block`` seconds; a fetch cancelled leaves it running) and what
                   it brought is processed, as are batches
                   still waiting for a slot (the runtime): left pending and
                   claimed later, their delivery counter would rise
send               ``XADD`` (``MAXLEN ~ maxlen`` when set); fields as in ``_fields``
bindings in        ``redis``: ``stream``, ``id``
backlog (metrics)  the group's ``lag`` plus ``pending`` from ``XINFO GROUPS``, read
                   once a second by an owned task once metrics ask for it
dead letters       list: ``XRANGE`` of the dead-letter stream; replay: ``XADD`` back
(CLI)              to the stream, then ``XDEL`` of the confirmed entries
=================  ==================================================================

``--mode pubsub``: addresses are channels (``SUBSCRIBE``); a batch is the messages on
hand; acks do nothing; a nack is retried in memory, then dead-lettered with ``XADD``. At
the stop the server unsubscribes and hands what Redis sent before it confirmed to the
runtime. A message published while the server is not subscribed, or waiting for a retry
when it stops (a warning counts those), is lost: this is Redis Pub/Sub's at-most-once
delivery. ``message.send`` is ``PUBLISH`` of the payload (a channel message has no
headers: sending headers raises).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from amgi.errors import ConfigurationError, SendError
from amgi.servers.kit import (
    ANSWER_SLACK,
    Refreshed,
    await_answers,
    dead_letter_headers,
    invalid,
    mask_url,
    option,
    userinfo_problem,
    whole_number,
)
from amgi.servers.redis._client import open_client
from amgi.servers.redis._dead_letters import DeadLetters
from amgi.servers.redis._fields import decode, encode
from amgi.servers.redis._pubsub import PubSub
from amgi.servers.redis._streams import Streams
from amgi.transport import Batch, Bindings, HeaderList, Message, Settlement, Transport

__all__ = ["RedisOptions", "RedisSendError", "RedisTransport"]


_MAX_MAXLEN = 2**63 - 1
"""The largest ``MAXLEN`` Redis takes (a signed 64-bit count)."""


_YEAR = 365 * 86400
"""The longest ``--claim-idle``, in seconds: longer is never, in effect."""


class RedisSendError(SendError):
    """Redis did not take a message (connection lost, wrong key type, headers on Pub/Sub)."""


@dataclass(slots=True)
class RedisOptions:
    """Options of the Redis server."""

    url: str = option(
        "redis://127.0.0.1:6379/0",
        "redis://[user:password@]host:port/db, rediss:// for TLS",
        secret=True,
    )
    mode: Literal["streams", "pubsub"] = option(
        "streams", "streams (consumer groups, at-least-once) or pubsub (at-most-once)"
    )
    group: str = option("amgi", "consumer group of the streams")
    consumer: str = option("", "consumer name in the group (default: host-pid-random)")
    batch_size: int = option(1000, "most entries per batch (XREADGROUP COUNT)", ge=1, le=100_000)
    block: float = option(1.0, "seconds one XREADGROUP waits for entries", ge=0.001, le=3600)
    claim_idle: float = option(
        30.0,
        "seconds an entry is pending on a silent consumer before it is taken",
        ge=0.1,
        le=_YEAR,  # (Redis refuses a min-idle-time past 64 bits of milliseconds)
    )
    start: str = option("0", "where a new group starts: 0 (whole stream), $ (new only), an id")
    dead_letter_stream: str = option("{address}.dlq", "stream of dead letters ({address})")
    maxlen: int = option(0, "trim streams to about this many entries on send (0: never)", ge=0)
    connect_timeout: float = option(10.0, "seconds to reach the server", gt=0)

    def check_together(self) -> None:
        problem = userinfo_problem(self.url)
        if problem:
            raise invalid(self, "url", problem)
        if not self.group:
            raise invalid(self, "group", "must not be empty")
        if self.start not in ("0", "$") and not _is_entry_id(self.start):
            raise invalid(self, "start", "must be 0, $ or an entry id like 1700000000000-0")
        if not self.dead_letter_stream:
            raise invalid(self, "dead_letter_stream", "must not be empty")


_REPLY_SLACK = 5.0
"""Seconds a reply may take beyond ``--block`` (the longest a command waits at Redis)
before the connection counts as lost."""


def _is_entry_id(text: str) -> bool:
    """``ms`` or ``ms-seq``, each a number Redis takes (ASCII digits, 64 bits unsigned)."""
    ms, dash, seq = text.partition("-")
    return all(
        part.isascii() and part.isdigit() and int(part) < 2**64
        for part in ((ms, seq) if dash else (ms,))
    )


class RedisTransport(DeadLetters, Transport):
    """The AMGI transport of Redis Streams (and Pub/Sub); lists and replays dead letters
    (:mod:`._dead_letters`)."""

    name = "redis"
    options = RedisOptions
    send_error = RedisSendError
    requires = ("redis",)
    extra = "redis"

    def __init__(self, addresses: Sequence[str], options: RedisOptions | None = None) -> None:
        super().__init__(addresses, options or RedisOptions())
        self.config: RedisOptions
        c = self.config
        self.consumer = c.consumer or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self._client: Any = None  # redis.asyncio.Redis (its commands are untyped)
        self._streams: Streams | None = None
        self._reading: asyncio.Future[list[Batch]] | None = None
        """The read in flight (streams): it outlives a cancelled fetch."""
        self._pubsub: PubSub | None = None
        self._backlog: Refreshed[dict[str, int]] | None = None
        self.at_most_once = c.mode == "pubsub"
        self.counts_deliveries = c.mode == "streams"
        """An entry's delivery counter (the attempt) rises when another consumer claims it."""
        self.stable_ids = c.mode == "streams"  # per instance
        """An entry id is the same on every delivery: the crash ledger recognises it (the
        ids of Pub/Sub messages are a count of this process's)."""
        if c.mode == "streams" and addresses:
            self.lease_interval = c.claim_idle / 3

    def ledger_namespace(self) -> str:
        """The server and database (the URL without its password) and the group: entry
        ids are unique within a stream, and each group delivers every entry."""
        return f"redis {mask_url(self.config.url)} {self.config.group}"

    def workers_refusal(self) -> str | None:
        """Pub/Sub hands every process every message; one ``--consumer`` name shared by
        processes lets each take back what the others hold."""
        if self.config.mode == "pubsub":
            return "--mode pubsub gives every process every message"
        if self.config.consumer:
            return (
                f"one --consumer name ({self.config.consumer!r}) shared by processes lets "
                "each take back what the others hold (leave --consumer unset)"
            )
        return None

    def dead_letter_address(self, address: str) -> str:
        return self.config.dead_letter_stream.replace("{address}", address)

    # -- lifecycle ------------------------------------------------------------------------

    def check(self) -> None:
        super().check()
        for address in self.addresses:
            if not address:
                raise ConfigurationError("redis: an address must not be empty")
            if self.dead_letter_address(address) in self.addresses:
                raise ConfigurationError(
                    f"redis: the dead-letter stream of {address!r} is consumed too"
                )

    async def connect(self) -> None:
        self.check()
        c = self.config
        self._client = await open_client(c.url, c.connect_timeout, c.block + _REPLY_SLACK)
        try:
            if not self.addresses:
                return
            if c.mode == "streams":
                self._streams = Streams(self._client, self.addresses, c, self.consumer)
                await self._streams.start()
                self._backlog = Refreshed("redis consumer lag", 1.0, self._streams.backlog)
            else:
                self._pubsub = PubSub(self._client, self.addresses, c.batch_size)
                await self._pubsub.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        reading, self._reading = self._reading, None
        if reading is not None:  # not handed over: what it read is claimed later
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
        streams, self._streams = self._streams, None
        pubsub, self._pubsub = self._pubsub, None
        client, self._client = self._client, None
        backlog, self._backlog = self._backlog, None
        if backlog is not None:
            await backlog.close()
        if streams is not None:
            await streams.stop()
        if pubsub is not None:
            await pubsub.stop()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- consuming ------------------------------------------------------------------------

    async def fetch(self) -> Sequence[Batch]:
        streams = self._streams
        if streams is not None:
            # A task of its own, shielded: a cancelled fetch leaves its read running, for
            # the next fetch or the hand-over. Cut off, a read whose answer was on its way
            # would leave its entries pending here, to be claimed with an attempt more.
            reading = self._reading
            if reading is None:
                reading = self._reading = asyncio.ensure_future(self._read(streams))
            try:
                batches = await asyncio.shield(reading)
            except asyncio.CancelledError:
                if reading.cancelled():  # (the read itself, not this fetch)
                    self._reading = None
                raise
            except Exception:  # the read failed: the next fetch reads again
                self._reading = None
                raise
            # (Cancelled as the read ended, its batches stay for the next fetch or the
            # hand-over: cleared then, they were never handed out.)
            self._reading = None
            return batches
        if self._pubsub is not None:
            return await self._pubsub.read()
        await asyncio.Event().wait()  # nothing to consume: wait until cancelled
        return []

    async def _read(self, streams: Streams) -> list[Batch]:
        batches = [
            self._batch(s, entries, attempts) for s, entries, attempts in await streams.read()
        ]
        for batch in batches:
            if batch.messages:  # the runtime settles every batch it is given but an empty one
                streams.taken(batch.address)
        return batches

    async def hand_over(self) -> Sequence[Batch]:
        """Streams: wake the read in flight, let it end (at most ``--block`` seconds and a
        little) and return what it brought, for the runtime to process before it stops. Pub/Sub:
        unsubscribe and return what Redis sent before it confirmed."""
        streams, reading = self._streams, self._reading
        if self._pubsub is not None:  # Redis sends a channel's message once: take it
            return await self._pubsub.hand_over(ANSWER_SLACK)
        if streams is None:
            return []
        streams.stopping = True
        if reading is None:
            return []
        await streams.wake()  # (a read that starts from here on blocks not)
        # Redis answers a read within --block; one still open after that (Redis gone,
        # a reconnect) is left to close, which cancels it.
        await await_answers([reading], self.config.block)
        if not reading.done():
            return []
        self._reading = None
        return reading.result()

    @staticmethod
    def _batch(stream: str, entries: list[Any], attempts: dict[bytes, int] | None) -> Batch:
        """Entries as messages; ``attempts`` by entry id (``None``: first deliveries)."""
        messages: list[Message] = []
        append = messages.append
        for entry_id, fields in entries:
            if fields is None:
                continue  # deleted while pending
            headers, payload = decode(fields)
            mid = entry_id.decode()
            attempt = 1 if attempts is None else attempts.get(entry_id, 1)
            binding = {"redis": {"stream": stream, "id": mid}}
            append(Message(mid, headers, payload, binding, attempt, entry_id))
        return Batch(stream, messages, key=stream)

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        dead = [
            (
                self.dead_letter_address(batch.address),
                encode(
                    dead_letter_headers(
                        d.message.headers,
                        attempt=d.message.attempt,
                        address=batch.address,
                        reason=d.reason,
                    ),
                    d.message.payload,
                ),
            )
            for d in settlement.dead
        ]
        if self._streams is not None:
            try:
                await self._streams.settle(batch.address, settlement, dead)
            finally:
                self._streams.settled(batch.address, (m.token for m in batch.messages))
        elif self._pubsub is not None:
            await self._pubsub.settle(batch.address, settlement, dead)

    def backlog(self) -> dict[str, int] | None:
        """Per stream, the group's ``lag`` plus ``pending`` (``XINFO GROUPS``), re-read
        every second by a task started on the first call; ``None`` before its first read."""
        return self._backlog.get() if self._backlog is not None else None

    async def extend(self, batches: Sequence[Batch]) -> None:
        if self._streams is not None:
            held: dict[str, list[bytes]] = {}
            for b in batches:
                held.setdefault(b.address, []).extend(m.token for m in b.messages)
            await self._streams.hold(held)

    # -- sending --------------------------------------------------------------------------

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        from redis import exceptions as redis_errors

        maxlen = (bindings.get("redis") or {}).get("maxlen")
        if maxlen is None:
            maxlen = self.config.maxlen
        else:
            try:
                whole_number("redis", "maxlen", maxlen, 0, _MAX_MAXLEN)
            except ValueError as exc:
                raise RedisSendError(f"redis: cannot send to {address!r}: {exc}") from None
        client = self._client
        if client is None:
            raise RedisSendError("redis: the server is not connected")
        try:
            if self.config.mode == "pubsub":
                if headers:
                    raise RedisSendError(
                        f"redis: cannot send headers on Pub/Sub channel {address!r} "
                        "(channel messages carry the payload only)"
                    )
                await client.execute_command("PUBLISH", address, payload or b"")
                return
            trim = self._trim(maxlen)
            await client.execute_command("XADD", address, *trim, "*", *encode(headers, payload))
        except redis_errors.RedisError as exc:
            raise RedisSendError(f"redis: could not send to {address!r}: {exc}") from None

    def _trim(self, maxlen: int) -> tuple[Any, ...]:
        """The ``XADD`` arguments that trim a stream to about ``maxlen`` entries (0: none)."""
        return ("MAXLEN", "~", maxlen) if maxlen else ()
