"""The consumer-group machinery of the Redis server: read, claim, retry, acknowledge."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.servers.kit import DueList
from amgi.servers.redis._client import execute_packed, pack, raise_if_cancelled
from amgi.servers.redis._wake import Wake

if TYPE_CHECKING:
    from amgi.servers.redis import RedisOptions
    from amgi.transport import Settlement

__all__ = ["Streams"]

logger = logging.getLogger("amgi.servers.redis")

Entries = list[Any]
"""``[[entry_id, [field, value, ...]], ...]`` as Redis sends it."""
Reply = tuple[str, Entries, "dict[bytes, int] | None"]
"""One stream's entries and their attempts (``None``: all first deliveries)."""

_DELETE_IF_IDLE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
    return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""
"""Delete the consumer ``ARGV[2]`` of group ``ARGV[1]`` on stream ``KEYS[1]`` only when
nothing is pending on it (-1 otherwise)."""

_RENEW_OWN = """
local mine = {}
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[2])
for _, row in ipairs(rows) do
    mine[row[1]] = true
end
local owned, lost = {}, {}
for i = 6, #ARGV do
    if mine[ARGV[i]] then
        owned[#owned + 1] = ARGV[i]
    else
        lost[#lost + 1] = ARGV[i]
    end
end
for i = 1, #owned, 4000 do
    local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
    for j = i, math.min(i + 3999, #owned) do
        claim[#claim + 1] = owned[j]
    end
    claim[#claim + 1] = 'JUSTID'
    redis.call(unpack(claim))
end
return lost
"""
"""Reset the idle time of the entries ``ARGV[6:]`` of stream ``KEYS[1]`` that are pending
on consumer ``ARGV[2]`` of group ``ARGV[1]``; return the others (acknowledged, or taken by
another consumer). One ``XPENDING`` of that consumer's entries between ``ARGV[3]`` and
``ARGV[4]`` (at most ``ARGV[5]``) finds them, and an ``XCLAIM ... JUSTID`` per 4000
renews them (Lua's ``unpack`` takes some 8000 values at most): looked up and renewed one
by one, 10 000 held entries kept Redis busy for a quarter of a second."""

_ALL = b"%d" % (2**62)
"""An ``XPENDING`` count that no pending list reaches."""


READ_AHEAD = 2
"""Batches of one stream in the runtime's hands before new entries of it are read again:
one in the application's call, one waiting for it (the stream is the ordering key, so a
third would only wait too, and hold its entries and memory longer)."""


class Streams:
    """One consumer of one group on several streams."""

    def __init__(
        self, client: Any, streams: Sequence[str], options: RedisOptions, consumer: str
    ) -> None:
        self.client = client
        self.streams = list(streams)
        self.group = options.group
        self.consumer = consumer
        self.options = options
        self._read_args = (
            b"XREADGROUP", b"GROUP", self.group.encode(), consumer.encode(),
            b"COUNT", b"%d" % options.batch_size,
        )  # fmt: skip
        self._names = {s: s.encode() for s in self.streams}
        self._wake = Wake(client, f"{self.streams[0]}.wake.{consumer}", self.group, consumer)
        """Added to a blocking read: a retry settled meanwhile that falls due before the
        read ends wakes it (before, it came up to --block late)."""
        self._seen = dict.fromkeys(self.streams, b"0-0")
        """Per stream, the last entry id a read of new entries (``>``) brought here: those
        a read whose reply was lost brought come after it."""
        self._unseen: dict[str, tuple[bytes, bytes]] = {}
        """Per stream, the range of ids (``XPENDING`` start and end) where entries a read
        whose reply was lost left pending here are looked for (:meth:`_find_unseen`)."""
        self._out: dict[str, set[bytes]] = {}
        """Per stream, entries handed to the runtime and not settled: pending here, in
        flight (the sweep leaves them be, should their lease lapse), no lost read's."""
        self._xack = {s: (b"XACK", s.encode(), self.group.encode()) for s in self.streams}
        self._held = dict.fromkeys(self.streams, 0)
        """Per stream, batches handed to the runtime and not settled yet."""
        self._released = asyncio.Event()
        self._retries: DueList[tuple[str, bytes, int]] = DueList()
        self._claimed: list[Reply] = []
        """Entries taken (their delivery counted) and not handed out yet: a later step of
        the same read that fails (a lost group, a lost connection) leaves them for the next."""
        self._counting: dict[str, dict[bytes, int | None]] = {}
        """Per stream, entries taken onto this consumer whose delivery is not counted yet
        (:meth:`_count`), with the attempt to count (``None``: not read yet)."""
        self._cursors = dict.fromkeys(self.streams, b"0-0")
        self._next_sweep = 0.0
        self._next_touch = 0.0
        self._scripts = True
        """Whether Redis runs the renewal script (an ACL may deny ``EVAL``)."""
        # A consumer named on the command line may be a restart of itself: what is
        # pending on that name was left by its previous run and is taken back at once.
        self.stopping = False
        """Set at the stop: :meth:`read` returns after the read in flight, entries or not."""
        self._history: dict[str, bytes] = (
            dict.fromkeys(self.streams, b"-") if options.consumer else {}
        )
        """Per stream, where this consumer's earlier pending entries are read on from."""

    async def start(self, again: bool = False) -> None:
        """Create the groups missing: at ``--start``, or ``again`` (one vanished while
        running) at the stream's start: entries written since a deletion are new, and
        those a destroyed group held would be lost. The retries of a group created again
        went with the old one: the new group delivers their entries anew."""
        for stream in self.streams:
            if await self._create_group(stream, "0" if again else self.options.start):
                self._forget(stream)
        await self._wake.look(asyncio.get_running_loop().time(), again=True)

    def _forget(self, stream: str) -> None:
        """Drop what this consumer held of ``stream`` in a group that is new: retries,
        claims, counts and history of the old one, whose entries are gone with the stream
        or delivered anew by the new group (kept, they failed on it, or came twice)."""
        self._retries.discard(_of(stream))
        self._claimed = [reply for reply in self._claimed if reply[0] != stream]
        self._counting.pop(stream, None)
        self._out.pop(stream, None)
        self._history.pop(stream, None)
        self._unseen.pop(stream, None)
        self._seen[stream] = b"0-0"  # the new group delivers from the start
        self._cursors[stream] = b"0-0"

    async def _create_group(self, stream: str, start: str) -> bool:
        """Create the group of ``stream`` unless it exists; whether it was created."""
        from redis import exceptions as redis_errors

        try:
            await self.client.execute_command(
                "XGROUP CREATE", stream, self.group, start, "MKSTREAM"
            )
        except redis_errors.ResponseError as exc:
            text = str(exc)
            if text.startswith("BUSYGROUP"):
                return False
            if text.startswith("WRONGTYPE"):
                raise ConfigurationError(
                    f"redis: key {stream!r} exists and is not a stream"
                ) from None
            # A full Redis (maxmemory, noeviction) or a replica refuses the command before
            # it looks for the group: one that exists is used (reads and acks need no room).
            if await self._has_group(stream):
                return False
            if _refused_for_now(exc):
                raise BrokerUnavailable(
                    f"redis: the server refused to create group {self.group!r} on "
                    f"{stream!r} for now: {text}"
                ) from None
            raise ConfigurationError(f"redis: cannot create group on {stream!r}: {text}") from None
        return True

    async def _has_group(self, stream: str) -> bool:
        """Whether the group exists on ``stream`` (``XINFO GROUPS``, which writes nothing)."""
        from redis import exceptions as redis_errors

        try:
            rows = await self.client.execute_command("XINFO GROUPS", stream)
        except redis_errors.ResponseError:  # no such key
            return False
        group = self.group.encode()
        return any(
            dict(zip(row[::2], row[1::2], strict=True)).get(b"name") == group for row in rows
        )

    async def stop(self) -> None:
        """Forget this consumer in its groups when nothing is pending on it.

        The look and the deletion are one script, one step at Redis: ``XGROUP
        DELCONSUMER`` drops the consumer's pending entries from the group for good, and
        a process that shares the name (a restart overlapping the old run) could read
        entries onto it between two commands."""
        self._retries.clear()
        await self._wake.close()
        for stream in self.streams:
            with contextlib.suppress(Exception):
                await self.client.execute_command(
                    "EVAL", _DELETE_IF_IDLE, 1, stream, self.group, self.consumer
                )

    async def _pipelined(self, commands: Iterable[Sequence[Any]]) -> list[Any]:
        """The replies of ``commands``, sent in one round trip; the first error Redis
        answered is raised as it came (redis-py's raise rewrites it as ``Command # 1 (...)
        of pipeline caused error: ...``, which hid a ``NOGROUP`` from :meth:`read`)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    # -- reading --------------------------------------------------------------------------

    async def read(self) -> list[Reply]:
        """Wait for entries: due retries, entries of silent consumers, then new entries."""
        from redis import exceptions as redis_errors

        while True:
            try:
                replies = await self._read_once()
            except redis_errors.ResponseError as exc:
                # UNBLOCKED: the stream was deleted under a blocked read.
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                logger.warning("a stream or its group vanished (%s); creating it again", exc)
                await self.start(again=True)
                continue
            for stream, entries, _ in replies:  # known as this process's until settled
                self._out.setdefault(stream, set()).update(
                    e[0] for e in entries if e[1] is not None
                )
            if replies or self.stopping:
                return replies
            raise_if_cancelled()

    async def _read_once(self) -> list[Reply]:
        now = asyncio.get_running_loop().time()
        options = self.options
        if now >= self._next_touch:
            await self._touch_waiting()
            self._next_touch = now + options.claim_idle / 3
        await self._wake.look(now)
        for stream in list(self._counting):  # left by a lost connection: finished first
            await self._count(stream, {})
        if self._unseen:  # a read lost its reply: what it brought first, nothing new before
            await self._find_unseen()
            if self._unseen:
                replies, self._claimed = self._claimed, []
                return replies
        if self._history:
            await self._own_pending()
            if self._history:
                # Nothing else is taken onto this name until its history is read: an
                # entry claimed by the sweep (or read) meanwhile would be read again.
                replies, self._claimed = self._claimed, []
                return replies
        due = self._retries.pop_due(now)
        if due:
            await self._reclaim(due)
        if now >= self._next_sweep:
            await self._sweep(now)
        if self._claimed:
            replies, self._claimed = self._claimed, []
            return replies
        wake = min(self._next_sweep, self._next_touch)
        next_retry = self._retries.next_due()
        if next_retry is not None:
            wake = min(wake, next_retry)
        wait = min(options.block, wake - now)
        if self.stopping:  # the stop waits for this read: it takes what is there
            wait = 0.0
        held = self._held
        ready = [s for s in self.streams if held[s] < READ_AHEAD]
        if not ready:  # every stream has a batch waiting already
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.001)):
                    await self._released.wait()
            return []
        block = max(1, round(wait * 1000))
        # Known before the read is sent: a retry settled from here on wakes it.
        self._wake.reading(asyncio.get_running_loop().time() + block / 1000)
        try:
            raise_if_cancelled()
            return await self._read_new(ready, block)
        finally:
            self._wake.reading(None)

    async def _read_new(self, ready: list[str], block: int) -> list[Reply]:
        """``XREADGROUP ... >``: new entries, counted as delivered by Redis as it answers.

        Should the reply be lost (the connection fails under it, or redis-py sends it again
        and that finds nothing), those entries are pending here unseen: until the read has
        answered at first go, where they would be is kept for :meth:`_find_unseen`."""
        seen, names = self._seen, self._names
        for stream in ready:
            self._unseen[stream] = (b"(" + seen[stream], b"+")
        lost = False

        def failed() -> None:
            nonlocal lost
            lost = True

        keys = (*(names[s] for s in ready), *self._wake.streams())
        command = pack(
            (*self._read_args, b"BLOCK", b"%d" % block, b"STREAMS", *keys, *(b">" for _ in keys))
        )  # fmt: skip
        reply = await execute_packed(self.client, command, failed)
        replies: list[Reply] = []
        for name, entries in reply or ():
            if name == self._wake.key:  # a wake-up: the read is over, nothing to hand out
                continue
            stream = name.decode()
            if lost and entries:  # those of a read sent again come after the lost ones
                self._unseen[stream] = (self._unseen[stream][0], b"(" + entries[0][0])
            if entries:
                seen[stream] = entries[-1][0]
            replies.append((stream, entries, None))
        if not lost:
            for stream in ready:
                del self._unseen[stream]
        return replies

    async def wake(self) -> None:
        """End the read in flight now (the stop): its reply comes at once, not at --block."""
        await self._wake.ring(float("-inf"))

    async def backlog(self) -> dict[str, int]:
        """The group's ``lag`` (entries not yet delivered to it) plus ``pending`` (delivered,
        not acknowledged) per stream, from one pipelined ``XINFO GROUPS`` per stream."""
        async with self.client.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.execute_command("XINFO GROUPS", stream)
            results = await pipe.execute(raise_on_error=False)
        backlog: dict[str, int] = {}
        group = self.group.encode()
        for stream, groups in zip(self.streams, results, strict=True):
            for row in groups if isinstance(groups, list) else ():
                info = dict(zip(row[::2], row[1::2], strict=True))
                if info.get(b"name") == group and info.get(b"lag") is not None:
                    backlog[stream] = int(info[b"lag"]) + int(info.get(b"pending") or 0)
        return backlog

    def taken(self, stream: str) -> None:
        """A batch of ``stream`` went to the runtime."""
        self._held[stream] += 1

    def settled(self, stream: str, tokens: Iterable[bytes] = ()) -> None:
        """A batch of ``stream`` was settled: its stream may be read ahead again."""
        if self._held.get(stream):
            self._held[stream] -= 1
        out = self._out.get(stream)
        if out:
            out.difference_update(tokens)
        self._released.set()

    def _known(self, stream: str) -> set[bytes]:
        """Entries of ``stream`` pending here that this process knows of: in the
        runtime's hands, claimed and not handed out, being counted, waiting for a retry."""
        known = set(self._out.get(stream, ()))
        known.update(self._counting.get(stream, ()))
        for s, entries, _ in self._claimed:
            if s == stream:
                known.update(e[0] for e in entries)
        known.update(i for s, i, _ in self._retries.items() if s == stream)
        return known

    async def _find_unseen(self) -> None:
        """Hand out, as first attempts, the entries a read whose reply was lost left
        pending here: this consumer's entries (``XPENDING ... consumer``) in the range
        where they would be, of delivery count 1, that this process does not know of.

        Each is taken with ``XCLAIM`` of its idle time as the least idle time and
        ``RETRYCOUNT 1``: one another consumer claimed in between (its idle time reset)
        stays with it, and a claim whose reply was lost, sent again, finds it too fresh
        and leaves it for the next look, which finds it again. Once a page shows no such
        entry left (none in it, or each claimed), the look moves on, and ends with a
        short page."""
        unseen, size = self._unseen, self.options.batch_size
        pages = await self._pipelined(
            ("XPENDING", stream, self.group, start, end, size, self.consumer)
            for stream, (start, end) in unseen.items()
        )
        found: dict[str, list[tuple[bytes, int]]] = {}
        after: dict[str, tuple[bytes, bytes] | None] = {}  # where the next look starts
        for (stream, (_, end)), rows in zip(list(unseen.items()), pages, strict=True):
            known = self._known(stream)
            lost = [(r[0], int(r[2])) for r in rows if int(r[3]) == 1 and r[0] not in known]
            if lost:
                found[stream] = lost
            after[stream] = (b"(" + rows[-1][0], end) if len(rows) == size else None
        if found:
            claims = await self._pipelined(
                ("XCLAIM", stream, self.group, self.consumer, idle, entry_id, "RETRYCOUNT", 1)
                for stream, lost in found.items()
                for entry_id, idle in lost
            )
            results = iter(claims)
            for stream, lost in found.items():
                claimed = [e for _ in lost for e in next(results)]
                entries = [e for e in claimed if e[1] is not None]  # not deleted meanwhile
                if entries:
                    self._claimed.append((stream, entries, {e[0]: 1 for e in entries}))
                if len(claimed) < len(lost):  # one was not claimed: this page again
                    after[stream] = unseen[stream]
        for stream, where in after.items():
            if where is None:
                del unseen[stream]
            else:
                unseen[stream] = where

    async def _own_pending(self) -> None:
        """Entries pending on this consumer's name from before it started, batch by batch:
        their counters read (``XPENDING ... consumer``), then one more delivery counted."""
        history, size = self._history, self.options.batch_size
        results = await self._pipelined(
            ("XPENDING", stream, self.group, start, "+", size, self.consumer)
            for stream, start in history.items()
        )
        for stream, rows in zip(list(history), results, strict=True):
            if not rows:
                del history[stream]
                continue
            history[stream] = b"(" + rows[-1][0]
            await self._count(stream, {row[0]: int(row[3]) + 1 for row in rows})

    async def _reclaim(self, due: list[tuple[str, bytes, int]]) -> None:
        """Take back entries whose retry delay is over, their delivery counted: ``XCLAIM
        ... RETRYCOUNT n`` (pipelined, one per stream and attempt) sets the counter to the
        attempt handed out, so a claim whose reply was lost, which redis-py sends again,
        counts once (a plain ``XCLAIM`` counted twice: attempt 2 handed out, 3 in Redis)."""
        by_stream: dict[str, dict[int, list[bytes]]] = {}
        for stream, entry_id, attempt in due:
            by_stream.setdefault(stream, {}).setdefault(attempt + 1, []).append(entry_id)
        later = asyncio.get_running_loop().time() + 1.0
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for stream, by_attempt in by_stream.items():
                    for attempt, ids in by_attempt.items():
                        pipe.execute_command(
                            "XCLAIM", stream, self.group, self.consumer, 0, *ids,
                            "RETRYCOUNT", attempt,
                        )  # fmt: skip
                results = iter(await pipe.execute(raise_on_error=False))
        except Exception:  # all tried again a little later, counted as the same attempt
            for item in due:
                self._retries.add(later, item)
            raise
        failed: Exception | None = None
        for stream, by_attempt in by_stream.items():
            replies = [next(results) for _ in by_attempt]
            error = next((r for r in replies if isinstance(r, Exception)), None)
            if error is not None:  # a lost group (the read creates it again), ...
                failed = failed or error
                for attempt, ids in by_attempt.items():
                    for entry_id in ids:
                        self._retries.add(later, (stream, entry_id, attempt - 1))
                continue
            entries = [e for reply in replies for e in reply]
            attempts = {i: a for a, ids in by_attempt.items() for i in ids}
            gone = attempts.keys() - {e[0] for e in entries if e[1] is not None}
            if gone:
                logger.warning(
                    "%s of %s gone while waiting for a retry: deleted from the stream "
                    "(trimmed by MAXLEN or XTRIM, or XDEL), or acknowledged by another "
                    "consumer; not retried; e.g. %s",
                    _entries(len(gone)), stream, min(gone).decode(),
                )  # fmt: skip
            if entries:
                self._claimed.append((stream, entries, attempts))
        if failed is not None:
            raise failed

    async def _sweep(self, now: float) -> None:
        """``XAUTOCLAIM`` entries left pending on silent consumers (a crash, a lost ack).

        ``JUSTID`` takes them without counting a delivery: :meth:`_count` counts it."""
        idle = round(self.options.claim_idle * 1000)
        claimed = False
        again = False
        for stream in self.streams:
            cursor, ids, *deleted = await self.client.execute_command(
                "XAUTOCLAIM", stream, self.group, self.consumer, idle, self._cursors[stream],
                "COUNT", self.options.batch_size, "JUSTID",
            )  # fmt: skip
            self._cursors[stream] = cursor
            if deleted and deleted[0]:  # Redis 7 drops them from the group and says which
                logger.warning(
                    "%s of %s deleted while pending on a consumer that went silent "
                    "(trimmed by MAXLEN or XTRIM, or XDEL): lost unprocessed; e.g. %s",
                    _entries(len(deleted[0])), stream, deleted[0][0].decode(),
                )  # fmt: skip
            again = again or cursor != b"0-0"
            # XAUTOCLAIM takes this consumer's own entries too: one this process holds
            # (its lease lapsed, the event loop held up) would run twice at once. Taken
            # onto this consumer again, it is only renewed.
            known = self._known(stream)
            ids = [i for i in ids if i not in known]
            if not ids:
                continue
            self._retries.discard(_among(stream, set(ids)))
            await self._count(stream, dict.fromkeys(ids))
            claimed = True
        self._next_sweep = now if again and claimed else now + self.options.claim_idle / 2

    async def _count(self, stream: str, taken: Mapping[bytes, int | None]) -> None:
        """Count one delivery of entries pending on this consumer and queue them to be
        handed out: ``taken`` maps each to its attempt (``None``: its counter plus one).

        Every step may be made twice: ``XPENDING`` reads counters, ``XCLAIM ... RETRYCOUNT``
        sets them. Until Redis answered, the entries wait in ``_counting``, and a lost
        connection (or a lost reply, which redis-py sends again) leaves them for the next
        read to finish, counted once (counting as a claim or a read does, a second claim
        or read would count the delivery the application never had)."""
        counting = self._counting.setdefault(stream, {})
        leftover = len(counting) > 0
        for entry_id, attempt in taken.items():
            counting.setdefault(entry_id, attempt)
        check = [i for i, a in counting.items() if a is None or leftover]
        if check:  # left over: still ours? (another consumer may have claimed them since)
            results = await self._pipelined(
                ("XPENDING", stream, self.group, entry_id, entry_id, 1) for entry_id in check
            )
            owner = self.consumer.encode()
            for entry_id, rows in zip(check, results, strict=True):
                if not rows or rows[0][1] != owner:
                    del counting[entry_id]  # acknowledged, deleted, or taken by another
                elif counting[entry_id] is None:
                    counting[entry_id] = int(rows[0][3]) + 1
        counted = {i: a for i, a in counting.items() if a is not None}  # every one, now
        if not counted:
            del self._counting[stream]
            return
        by_attempt: dict[int, list[bytes]] = {}
        for entry_id, attempt in counted.items():
            by_attempt.setdefault(attempt, []).append(entry_id)
        results = await self._pipelined(
            ("XCLAIM", stream, self.group, self.consumer, 0, *ids, "RETRYCOUNT", attempt)
            for attempt, ids in by_attempt.items()
        )
        del self._counting[stream]
        entries = [e for claimed in results for e in claimed if e[1] is not None]
        if entries:
            self._claimed.append((stream, entries, {e[0]: counted[e[0]] for e in entries}))

    # -- holding and settling -------------------------------------------------------------

    async def touch(self, held: Mapping[str, list[bytes]]) -> None:
        """Reset the idle time of entries this consumer holds, so no one else claims them.

        Only those still pending on this consumer: one whose lease lapsed may have been
        claimed by another consumer since (this one looked gone), and a plain ``XCLAIM``
        took it back from there while it ran. A retry of an entry no longer this
        consumer's is dropped: its new holder settles it."""
        from redis import exceptions as redis_errors

        held = {s: ids for s, ids in held.items() if ids}
        if not held:
            return
        if self._scripts:
            try:
                replies = await self._pipelined(
                    ("EVAL", _RENEW_OWN, 1, stream, self.group, self.consumer,
                     *_span(ids), _ALL, *ids)
                    for stream, ids in held.items()
                )  # fmt: skip
            except redis_errors.NoPermissionError as exc:
                self._scripts = False
                logger.warning(
                    "Redis refused the lease renewal script (%s): entries are renewed with "
                    "XCLAIM, which takes back one another consumer claimed meanwhile",
                    exc,
                )
            else:
                for stream, lost in zip(held, replies, strict=True):
                    if lost:
                        self._retries.discard(_among(stream, set(lost)))
                return
        await self._pipelined(
            ("XCLAIM", stream, self.group, self.consumer, 0, *ids, "JUSTID")
            for stream, ids in held.items()
        )

    async def _touch_waiting(self, held: Mapping[str, list[bytes]] | None = None) -> None:
        """Touch the entries waiting for their retry or to be handed out, and ``held`` (in
        flight) with them."""
        entries: dict[str, list[bytes]] = {s: list(ids) for s, ids in (held or {}).items()}
        for stream, entry_id, _ in self._retries.items():
            entries.setdefault(stream, []).append(entry_id)
        for stream, claimed, _ in self._claimed:
            entries.setdefault(stream, []).extend(e[0] for e in claimed)
        for stream, counting in self._counting.items():
            entries.setdefault(stream, []).extend(counting)
        await self.touch(entries)

    async def hold(self, in_flight: Mapping[str, list[bytes]]) -> None:
        """The lease: keep in-flight entries and waiting retries from being claimed."""
        await self._touch_waiting(in_flight)
        self._next_touch = asyncio.get_running_loop().time() + self.options.claim_idle / 3

    async def settle(
        self, stream: str, settlement: Settlement, dead: list[tuple[str, list[bytes]]]
    ) -> None:
        if settlement.retry:  # they stay pending on this consumer until they are due
            now = asyncio.get_running_loop().time()
            uncounted: dict[int, list[bytes]] = {}
            for r in settlement.retry:  # reclaimed as attempt + 1: uncounted ones as the same
                attempt = r.message.attempt - r.uncounted
                self._retries.add(now + r.delay, (stream, r.message.token, attempt))
                if r.uncounted:
                    uncounted.setdefault(attempt, []).append(r.message.token)
            if uncounted:
                await self._set_counters(stream, uncounted)
            await self._wake.ring(now + min(r.delay for r in settlement.retry))
        from redis.exceptions import ResponseError

        ids = [m.token for m in settlement.acked]
        refused: ResponseError | None = None
        if dead:
            # Written first, and only those Redis confirmed are acked (in a MULTI, the XACK
            # ran even when an XADD failed, e.g. on a key that is no stream): an entry whose
            # dead letter was refused stays pending and is claimed again later.
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for target, fields in dead:
                        pipe.execute_command("XADD", target, "*", *fields)
                    results = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # not one of them known stored: all stay pending
                for d in settlement.dead:
                    d.not_stored(exc)
                raise
            for d, (target, _), result in zip(settlement.dead, dead, results, strict=True):
                if not isinstance(result, Exception):
                    ids.append(d.message.token)
                    continue
                d.not_stored(result)
                if refused is None:
                    refused = ResponseError(f"dead letter to {target!r} refused: {result}")
        if ids:
            await execute_packed(self.client, pack((*self._xack[stream], *ids)))
        if refused is not None:
            raise refused

    async def _set_counters(self, stream: str, counters: Mapping[int, list[bytes]]) -> None:
        """Set the delivery counters of entries handed back uncounted to what they were
        before that delivery, so that any later one (a reclaim here, a read of this
        consumer's history after a restart, another consumer's claim) counts right.

        Should Redis refuse, the counters stay one too high, as Redis counts them, and
        the entries are retried all the same."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for count, ids in counters.items():
                    pipe.execute_command(
                        "XCLAIM", stream, self.group, self.consumer, 0, *ids,
                        "RETRYCOUNT", count, "JUSTID",
                    )  # fmt: skip
                await pipe.execute()
        except Exception as exc:
            raise_if_cancelled()
            logger.warning(
                "could not set the delivery counter of %d entries of %s handed back "
                "unprocessed (%s); their next attempt counts one more",
                sum(map(len, counters.values())), stream, exc,
            )  # fmt: skip


def _span(ids: Iterable[bytes]) -> tuple[bytes, bytes]:
    """The first and the last of entry ids (``ms-seq``), in the stream's order."""
    order = sorted(ids, key=lambda i: tuple(map(int, i.split(b"-"))))
    return order[0], order[-1]


def _entries(count: int) -> str:
    return "1 entry" if count == 1 else f"{count} entries"


def _refused_for_now(exc: Exception) -> bool:
    """Whether Redis refused a write for a passing reason: full (``OOM``), a replica
    (``READONLY``), a failover, a background save that failed (``MISCONF``), a script."""
    from redis import exceptions as redis_errors

    passing = (
        redis_errors.OutOfMemoryError, redis_errors.ReadOnlyError, redis_errors.MasterDownError,
        redis_errors.TryAgainError, redis_errors.ClusterDownError,
    )  # fmt: skip
    return isinstance(exc, passing) or str(exc).startswith(("MISCONF", "BUSY ", "NOREPLICAS"))


def _of(stream: str) -> Callable[[tuple[str, bytes, int]], bool]:
    def test(item: tuple[str, bytes, int]) -> bool:
        return item[0] == stream

    return test


def _among(stream: str, ids: set[bytes]) -> Callable[[tuple[str, bytes, int]], bool]:
    def test(item: tuple[str, bytes, int]) -> bool:
        return item[0] == stream and item[1] in ids

    return test
