"""Driving the consumer: assignment, rebalance, fetching batches, commits (private).

One thread at a time drives it (see the transport's ``fetch``): the event loop while
records are on hand and no batch is unsettled, the consumer thread otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Hashable, Iterable
from typing import Any

from amgi.errors import BrokerUnavailable
from amgi.servers.kafka._client import KafkaClient, TopicPartition, _BatchContext, _Partition
from amgi.servers.kafka.records import messages_from_records, retry_messages_from_records
from amgi.transport import Batch

logger = logging.getLogger("amgi.servers.kafka")

_IDLE_SLICE = 0.02
"""Seconds of one wait for records when none are on hand; commits go out between them."""
_IDLE_SLICES = 5
_IDLE_PASS_CPU = 100e-6
"""Seconds of CPU under which a pass of the event loop counts as idle: it ran nothing but
its own bookkeeping (the batches handed out await something)."""
_BUSY_WAIT_MAX = 1.0
"""Seconds a fetch waits at most for busy batches to settle before the consumer thread
fetches meanwhile: librdkafka leaves the group when ``consume`` is not called for
``max.poll.interval.ms``, and a long CPU-bound batch must not make it."""
_START_OFFSETS_TIMEOUT = 5.0
"""Seconds the lookups at assignment (committed offsets, then log start or end) may take
together before librdkafka's own lookup takes over."""
_START_LOOP_TIMEOUT = 0.5
"""Seconds the lookups at assignment may take together when the event loop drives the
consumer: about a millisecond each with a broker that answers, and the loop waits no
longer than this on one that does not (the retry partitions are then held as when a
lookup fails)."""
_START_LOOKUP_FLOOR = 0.1
"""Seconds the second lookup at assignment is given at least, whatever the first left: a
partition whose log end is not looked up starts where librdkafka resolves ``latest`` some
0.1 s later, past the records produced meanwhile."""
_HELD_WARN_INTERVAL = 60.0
"""Seconds between two warnings that retry partitions are still held (lookups failing)."""
_START_RETRY_TIMEOUT = 2.0
_START_RETRY_INTERVAL = 1.0
"""Seconds a later lookup of a retry partition's start may take (both requests, on the
consumer thread), and seconds between two of them."""


def _wait_ms(record: Any, due_ms: int | None, now_ms: float) -> float:
    """Milliseconds a retry copy still waits: until its due time, and never longer than
    the delay it was given (its due time less its own timestamp, both from the clock of
    the server that made it). A due time set by a clock ahead of this one (another host,
    or this one before it was set back) paused its partition, and every copy behind it,
    for as long as that clock was ahead. (Read again after its pause, the copy waits no
    more than what was left of it: ``_Partition.waited``.)"""
    if due_ms is None or due_ms <= now_ms:
        return 0.0
    wait = due_ms - now_ms
    kind, stamp = record.timestamp()
    if kind and stamp > 0:
        wait = min(wait, due_ms - stamp)
    return wait


def _names(keys: Iterable[TopicPartition]) -> str:
    """``topic[partition], ...`` for a log line."""
    return ", ".join(f"{topic}[{partition}]" for topic, partition in keys)


def _seek(consumer: Any, tp: Any) -> bool:
    """Seek partition ``tp`` to its offset; a failure is a warning (``False``)."""
    try:
        consumer.seek(tp)
    except Exception as exc:
        logger.warning("kafka seek %s[%d] to %d failed: %s", tp.topic, tp.partition, tp.offset, exc)
        return False
    return True


class Consuming(KafkaClient):
    """What runs on the thread driving the consumer (the consumer thread, or the event
    loop when no batch is unsettled)."""

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        from confluent_kafka import OFFSET_BEGINNING

        with self._lock:
            for tp in partitions:
                self._epoch += 1
                key = (tp.topic, tp.partition)
                self._partitions[key] = _Partition(self._epoch)
                self._rewind.pop(key, None)
        # A retry partition paused under an earlier assignment must not stay paused.
        live = [tp for tp in partitions if not self._is_dead_letter_topic(tp.topic)]
        dead = [tp for tp in partitions if self._is_dead_letter_topic(tp.topic)]
        # Now, so that pause and resume apply to them; with explicit start offsets. A
        # cooperative assignor hands out only the partitions added to the assignment.
        # The event loop waits on the broker only briefly: a rebalance served by its
        # consume (records on hand, nothing unsettled) whose lookup takes longer leaves the
        # retry partitions' starts to the consumer thread.
        timeout = _START_LOOP_TIMEOUT if self._driver_is_loop else _START_OFFSETS_TIMEOUT
        starts = self._start_offsets(consumer, partitions, timeout)
        logger.debug(
            "kafka: assigned %s, %s",
            _names((tp.topic, tp.partition) for tp in partitions) or "nothing",
            "starts looked up" if starts is not None else "start lookup failed",
        )
        unknown: list[Any] = []
        if starts is None:
            # librdkafka resolves the starts itself: the committed offset, else the
            # --auto-offset-reset end, which is wrong for a retry partition the group
            # never committed on (with latest, its end: the copies waiting there would be
            # skipped). Those are held paused at their log start (no lookup of its own by
            # librdkafka, which a later seek could race) until a lookup tells where.
            starts = partitions
            unknown = [tp for tp in live if self._is_retry_topic(tp.topic)]
            with self._lock:
                for tp in unknown:
                    tp.offset = OFFSET_BEGINNING
                    self._partitions[(tp.topic, tp.partition)].start_unknown = True
                self._starts_unknown = self._starts_unknown or bool(unknown)
            live = [tp for tp in live if not self._is_retry_topic(tp.topic)]
            if unknown:
                self._held_warned = time.monotonic()
                logger.warning(
                    "kafka: the committed offsets of %d assigned partition(s) could not be "
                    "looked up (%s); retry partitions %s are held until a lookup answers",
                    len(partitions),
                    self._start_lookup_error,
                    _names((tp.topic, tp.partition) for tp in unknown),
                )
        if self._cooperative:
            consumer.incremental_assign(starts)
        else:
            consumer.assign(starts)
        if live:
            consumer.resume(live)
        if dead or unknown:
            consumer.pause(dead + unknown)
        if self._retry_re is not None:  # a pattern address: topics may join at any time
            self._matched_assigned([tp.topic for tp in partitions])

    def _matched_assigned(self, topics: list[str]) -> None:
        """Partitions of ``topics`` were assigned (the thread driving the consumer): the
        source topics among them that a pattern address matched and that are new get
        their retry and dead-letter topics made, on the event loop."""
        new = [
            t
            for t in dict.fromkeys(topics)
            if t not in self._prepared
            and not self._is_retry_topic(t)
            and not self._is_dead_letter_topic(t)
        ]
        loop = self._loop
        if not new or loop is None:
            return
        self._prepared.update(new)
        with contextlib.suppress(RuntimeError):  # a closed loop: nothing is consumed now
            loop.call_soon_threadsafe(self._prepare_matched_soon, new)

    def _start_offsets(
        self, consumer: Any, partitions: list[Any], timeout: float
    ) -> list[Any] | None:
        """The partitions at their committed offsets, else at the reset end, as numbers;
        ``None`` when the committed offsets could not be had within ``timeout``, which
        both lookups share (the second gets at least ``_START_LOOKUP_FLOOR``).

        Left to itself, librdkafka assigns a partition without a committed offset, then
        waits ~0.1 s before it asks for the reset offset, and it resolves each partition's
        start in a request of its own: a fetch for the first partitions ready (an empty
        retry topic's) then holds the others back for ``fetch.wait.max.ms``. Asked here,
        in two requests (the committed offsets, then the log start or end of the rest in
        one ListOffsets), every partition starts at a number and the first fetch goes out
        at once for all. Should the first question fail, the caller decides (see
        ``_on_assign``); should the second, the logical start or end is the start.
        """
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka import TopicPartition as TP

        deadline = time.monotonic() + timeout
        try:
            committed = consumer.committed(partitions, timeout=timeout)
        except KafkaException as exc:
            logger.debug("kafka: committed offsets not fetched: %s", exc)
            error = exc.args[0] if exc.args else None
            self._start_lookup_error = error.str() if isinstance(error, KafkaError) else str(exc)
            return None
        failed = [tp for tp in committed if tp.error is not None]
        if failed:
            self._start_lookup_error = (
                f"{failed[0].topic}[{failed[0].partition}]: {failed[0].error.str()}"
            )
            return None
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END

        given = OFFSET_BEGINNING if self.config.auto_offset_reset == "earliest" else OFFSET_END

        def reset(topic: str) -> int:
            # A retry topic holds only what the group owes: all of it, whatever the option.
            return OFFSET_BEGINNING if self._is_retry_topic(topic) else given

        missing = [TP(tp.topic, tp.partition, reset(tp.topic)) for tp in committed if tp.offset < 0]
        found: dict[TopicPartition, int] = {}
        if missing:
            left = max(deadline - time.monotonic(), min(timeout, _START_LOOKUP_FLOOR))
            # A ListOffsets "timestamp" of -2 asks for the log start, -1 for its end.
            try:
                ends = consumer.offsets_for_times(missing, timeout=left)
            except KafkaException as exc:
                logger.debug("kafka: log start or end offsets not fetched: %s", exc)
                ends = []
            found = {
                (tp.topic, tp.partition): tp.offset
                for tp in ends
                if tp.error is None and tp.offset >= 0
            }
        for tp in committed:
            if tp.offset < 0:
                tp.offset = found.get((tp.topic, tp.partition), reset(tp.topic))
        self._commit_starts(consumer, found)
        return list(committed)

    def _commit_starts(self, consumer: Any, found: dict[TopicPartition, int]) -> None:
        """Commit where the partitions the group has no offset for start, when a later
        owner would not find it by itself: a retry partition's log start, and with
        ``--auto-offset-reset latest`` a topic partition's log end as it is now.

        Nothing else is committed before a batch settles. A member killed or dropped from
        the group before then left no offset, and with ``latest`` the next owner started
        at the end as it was by then, past every record produced meanwhile (lost); so did
        librdkafka's own lookup (when the one at assignment fails) for a retry partition,
        past the copies waiting there.
        """
        from confluent_kafka import KafkaException
        from confluent_kafka import TopicPartition as TP

        latest = self.config.auto_offset_reset == "latest"
        starts = [
            TP(t, p, offset)
            for (t, p), offset in found.items()
            if self._is_retry_topic(t) or (latest and not self._is_dead_letter_topic(t))
        ]
        if not starts:
            return
        try:
            consumer.commit(offsets=starts, asynchronous=True)
        except KafkaException as exc:  # the next assignment's lookup tries again
            logger.debug("kafka: start offsets not committed: %s", exc)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        """Let the revoked partitions' batches settle, commit them here, then forget them.

        Commits are only sent by the thread driving the consumer (``_send_commits``,
        between ``consume`` calls), which is the one running this callback, and only for
        partitions not yet forgotten, so this commit is the last one of each revoked
        partition. On the event loop there is nothing to wait for: it drives the consumer
        only while no batch is unsettled; nor does it wait for the broker's answer, which
        may never come (a coordinator that stops answering froze the loop for minutes):
        the commit is sent asynchronously, still the last one (a commit lost means only
        redelivery to the next owner).
        """
        from confluent_kafka import KafkaException
        from confluent_kafka import TopicPartition as TP

        keys = [(tp.topic, tp.partition) for tp in partitions]
        deadline = time.monotonic() + self.config.rebalance_timeout
        with self._lock:
            while not self._closing:
                # A partition with a batch whose copies are tried again in the background
                # commits nothing past it: its records go to the next owner anyway.
                busy = [
                    k
                    for k in keys
                    if (s := self._partitions.get(k)) is not None
                    and s.settled.outstanding
                    and not s.moving
                ]
                remaining = deadline - time.monotonic()
                if not busy or remaining <= 0:
                    if busy:
                        logger.warning("revoking %s with batches still in flight", busy)
                    break
                self._lock.wait(remaining)
            offsets = [
                TP(k[0], k[1], s.commit_to)
                for k in keys
                if (s := self._partitions.get(k)) is not None and s.commit_to is not None
            ]
            # Forgotten under the lock: _send_commits sends nothing more for them.
            self._forget(keys)
        if offsets and not self._closing:
            try:
                consumer.commit(offsets=offsets, asynchronous=self._driver_is_loop)
            except KafkaException as exc:
                logger.warning("kafka commit on revoke failed: %s", exc)

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        with self._lock:
            self._forget([(tp.topic, tp.partition) for tp in partitions])

    def backlog(self) -> dict[str, int] | None:
        """Per topic: the partitions' high watermarks (as last fetched, no broker call)
        minus the offset processed up to (the offset to commit, else the fetch position).
        Retry topics count towards their topic."""
        from confluent_kafka import KafkaException
        from confluent_kafka import TopicPartition as TP

        consumer = self._consumer
        if consumer is None:
            return None
        with self._lock:
            done = {
                key: s.commit_to if s.commit_to is not None else s.committed
                for key, s in self._partitions.items()
            }
        lag: dict[str, int] = {}
        for (topic, partition), offset in done.items():
            if self._is_dead_letter_topic(topic):
                continue
            try:
                _, high = consumer.get_watermark_offsets(TP(topic, partition), cached=True)
                if offset is None:
                    offset = consumer.position([TP(topic, partition)])[0].offset
            except KafkaException:
                continue
            if high is None or high < 0 or offset is None or offset < 0:
                continue
            address = self._retry_topics.get(topic, topic)
            lag[address] = lag.get(address, 0) + max(0, high - offset)
        return lag

    def _forget(self, keys: list[TopicPartition]) -> None:
        for key in keys:
            self._partitions.pop(key, None)
            self._rewind.pop(key, None)
            self._revoked_in_call.add(key)

    def _is_dead_letter_topic(self, topic: str) -> bool:
        return self._dead_re is not None and self._dead_re.match(topic) is not None

    def _is_retry_topic(self, topic: str) -> bool:
        if topic in self._retry_topics:
            return True
        return self._retry_re is not None and self._retry_re.match(topic) is not None

    def _prepare_poll(self, consumer: Any, *, lookups: bool = False) -> None:
        """Apply rewinds and resume retry partitions that are due (the driving thread);
        with ``lookups`` (the consumer thread: it may wait on the broker), look up the
        starts of retry partitions the assignment could not tell."""
        from confluent_kafka import TopicPartition as TP

        now = time.monotonic()
        if lookups and self._start_lookup_due(now):
            with self._lock:
                unknown = [k for k, s in self._partitions.items() if s.start_unknown]
                self._starts_unknown = bool(unknown)  # none left: revoked, or told
            if unknown:
                self._next_start_lookup = now + _START_RETRY_INTERVAL
                self._resolve_starts(consumer, unknown)
        with self._lock:
            rewinds = list(self._rewind.items())
            self._rewind.clear()
            due = [k for k, s in self._partitions.items() if s.resume_at and s.resume_at <= now]
            for key in due:
                self._partitions[key].resume_at = None
            for key, _ in rewinds:
                # Batches fetched before the rewind commit nothing any more.
                self._epoch += 1
                self._partitions[key] = _Partition(self._epoch)
        for (topic, partition), offset in rewinds:
            _seek(consumer, TP(topic, partition, offset))
        if due:
            consumer.resume([TP(t, p) for t, p in due])

    def _start_lookup_due(self, now: float) -> bool:
        """Whether a retry partition waits for its start and a lookup may be made now."""
        return self._starts_unknown and now >= self._next_start_lookup

    def _resolve_starts(self, consumer: Any, keys: list[TopicPartition]) -> None:
        """Look up where the retry partitions ``keys`` start (their committed offset, else
        their log start), seek them there and resume them. A lookup that fails leaves
        them paused for the next one."""
        from confluent_kafka import TopicPartition as TP

        starts = self._start_offsets(consumer, [TP(t, p) for t, p in keys], _START_RETRY_TIMEOUT)
        if starts is None:
            logger.debug("kafka: retry partitions %s still wait for their start", keys)
            now = time.monotonic()
            if now - self._held_warned >= _HELD_WARN_INTERVAL:
                self._held_warned = now
                logger.warning(
                    "kafka: retry partitions %s are still held: their committed offsets "
                    "cannot be looked up (%s); their copies wait on the broker, and a "
                    "lookup is tried every %.0fs",
                    _names(keys),
                    self._start_lookup_error,
                    _START_RETRY_INTERVAL,
                )
            return
        resumed = []
        for tp in starts:
            key = (tp.topic, tp.partition)
            with self._lock:
                state = self._partitions.get(key)
                waiting = state is not None and state.start_unknown
            if state is None or not waiting:
                continue  # revoked meanwhile
            if not _seek(consumer, tp):
                continue  # asked again by the next poll
            with self._lock:
                state.start_unknown = False
            resumed.append(TP(*key))
        with self._lock:  # none left: the event loop may fetch again
            self._starts_unknown = any(s.start_unknown for s in self._partitions.values())
        if resumed:
            consumer.resume(resumed)
            logger.info(
                "kafka: retry partitions %s resumed at their start",
                _names((tp.topic, tp.partition) for tp in resumed),
            )

    def _poll(self, wait: bool = True) -> list[Batch]:
        """One ``consume`` call turned into batches, one per partition.

        Runs on whichever thread drives the consumer now (see ``fetch``): with ``wait``
        on the consumer thread, without it on the event loop (what is on hand only).
        """
        consumer = self._consumer
        if consumer is None or self._closing:
            return []
        error, self._poll_error = self._poll_error, None
        if error is not None:  # met by the last call, which handed its records out first
            raise error
        self._driver_is_loop = not wait
        self._prepare_poll(consumer, lookups=wait)
        self._revoked_in_call.clear()
        self._send_commits(consumer)
        limit = self.config.max_batch_size
        # Take what is on hand without waiting; otherwise wait for one record only, so that
        # a trickle is handed out at once instead of after the whole timeout. The wait is
        # cut in short slices so that offsets settled meanwhile are committed promptly.
        records = consumer.consume(limit, 0)
        if not records and wait:
            for _ in range(_IDLE_SLICES):
                records = consumer.consume(1, _IDLE_SLICE)
                if records or self._closing:
                    break
                self._send_commits(consumer)
            if not records:
                return []
            if limit > 1:
                records += consumer.consume(limit - 1, 0)
        # An error event among the records (librdkafka mixes them in) is raised after
        # the records of this call are handed out: they are off the consumer already,
        # and a later batch of their partition would commit past them.
        groups: dict[TopicPartition, list[Any]] = {}
        group: list[Any] = []
        last: tuple[Any, Any] = (None, None)
        for record in records:
            if record.error() is not None:
                try:
                    self._record_error(record)
                except BrokerUnavailable as exc:
                    error = error or exc
                continue
            # Records come in runs of one partition: look the group up once per run.
            partition = record.partition()
            topic = record.topic()
            if partition != last[1] or topic != last[0]:
                last = (topic, partition)
                group = groups.setdefault((topic, partition), [])  # type: ignore[arg-type]
            group.append(record)
        batches: list[Batch] = []
        for key, group in groups.items():
            try:
                batch = self._make_batch(consumer, key, group)
            except Exception as exc:  # a lookup, seek or pause the broker failed
                self._take_again(consumer, key, group[0].offset())
                error = error or BrokerUnavailable(
                    f"kafka: could not take the records of {_names([key])}: {exc}"
                )
                continue
            if batch is not None:
                batches.append(batch)
        if error is not None:
            if not batches:
                raise error
            self._poll_error = error
        return batches

    def _take_again(self, consumer: Any, key: TopicPartition, offset: int) -> None:
        """Records of ``key`` from ``offset`` were taken off the consumer and no batch made
        of them: seek back so they are fetched again. Should the seek fail too, the
        partition commits nothing from there on (a position that never settles): its
        next owner gets them, after a rebalance or a restart."""
        from confluent_kafka import TopicPartition as TP

        if not _seek(consumer, TP(key[0], key[1], offset)):
            with self._lock:
                state = self._partitions.get(key)
                if state is not None:
                    state.settled.add(offset)

    def _record_error(self, record: Any) -> None:
        from confluent_kafka import KafkaError, KafkaException

        err = record.error()
        if err.fatal():
            raise BrokerUnavailable(f"Kafka consumer failed: {err.str()}")
        if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            logger.warning("kafka: %s", err.str())
        elif err.code() in (
            KafkaError.TOPIC_AUTHORIZATION_FAILED,
            KafkaError.GROUP_AUTHORIZATION_FAILED,
        ):
            raise BrokerUnavailable(f"Kafka refused access: {err.str()}") from KafkaException(err)
        else:
            logger.warning("kafka consumer: %s", err.str())

    def _make_batch(self, consumer: Any, key: TopicPartition, records: list[Any]) -> Batch | None:
        from confluent_kafka import TopicPartition as TP

        topic, partition = key
        with self._lock:
            state = self._partitions.get(key)
            revoked = key in self._revoked_in_call
        if state is not None and state.start_unknown:
            return None  # fetched before the pause took hold: fetched again after the seek
        if state is None or revoked:
            if state is not None:
                # Revoked and assigned again within one consume call: the records seen
                # may predate the new assignment, so fetch again from the commit.
                committed = consumer.committed([TP(topic, partition)], timeout=10)[0].offset
                with self._lock:
                    self._rewind[key] = committed if committed >= 0 else records[0].offset()
            return None
        address = topic
        first = records[0].offset()
        next_offset = records[-1].offset() + 1
        to_messages = messages_from_records
        if self._is_retry_topic(topic):
            to_messages = retry_messages_from_records
            records, address, next_offset = self._due_records(consumer, key, state, records)
            if not records:
                if next_offset > first:  # only other groups' copies: passed over, settled
                    with self._lock:
                        state.settled.add(next_offset)
                        self._settle_to(key, state, next_offset)
                return None
        elif self._is_dead_letter_topic(topic):
            return None
        messages = to_messages(topic, partition, records)
        with self._lock:
            if self._partitions.get(key) is not state:
                return None
            state.settled.add(next_offset)
        context = _BatchContext(key, state, state.epoch, next_offset, records[0].offset())
        batch_key: Hashable = key
        return Batch(address, messages, batch_key, context)

    def _settle_to(self, key: TopicPartition, state: _Partition, next_offset: int) -> None:
        """Mark the records of ``key`` below ``next_offset`` settled and commit what is
        contiguous (sent before the next consume). Holds the lock."""
        commit = state.settled.settle([next_offset])
        if commit is not None and self._partitions.get(key) is state and key not in self._rewind:
            state.commit_to = commit

    def _due_records(
        self, consumer: Any, key: TopicPartition, state: _Partition, records: list[Any]
    ) -> tuple[list[Any], str, int]:
        """Keep a retry partition's records that are due and this group's (another group's
        copies are passed over); pause it at the first that is not due. Returns them,
        their address and the offset the partition goes on from."""
        from confluent_kafka import TopicPartition as TP

        from amgi.servers.kafka.records import split_internal_headers

        now_ms = time.time() * 1000
        group = self.config.group_id.encode()
        address: str | None = None
        kept: list[Any] = []
        for record in records:
            info = split_internal_headers(record.headers())
            if info.group is not None and info.group != group:
                continue
            if address is None:
                address = info.original_address or self._retry_topics.get(key[0], key[0])
            elif (info.original_address or address) != address:
                # One address per batch: the rest comes again with the next fetch.
                consumer.seek(TP(key[0], key[1], record.offset()))
                return kept, address, record.offset()
            wait_ms = _wait_ms(record, info.due_ms, now_ms)
            offset, now = record.offset(), time.monotonic()
            waited = state.waited
            if wait_ms > 0 and waited is not None and waited[0] == offset:
                wait_ms = min(wait_ms, (waited[1] - now) * 1000)  # read again: not longer
            if wait_ms > 0:
                consumer.seek(TP(key[0], key[1], offset))
                consumer.pause([TP(key[0], key[1])])
                with self._lock:
                    state.resume_at = now + wait_ms / 1000
                    state.waited = (offset, state.resume_at)
                return kept, address, offset
            kept.append(record)
        return kept, address or key[0], records[-1].offset() + 1

    def _unsettled(self) -> bool:
        """Whether a batch handed out is not settled yet, in a partition a revoke would
        wait for (one whose copies are tried again in the background it does not)."""
        with self._lock:
            return any(s.settled.outstanding and not s.moving for s in self._partitions.values())

    async def _settled_while_busy(self) -> bool:
        """Wait until every batch handed out is settled, while the event loop is busy
        running them: True once they are; False after two idle passes of the loop in a
        row (the application awaits something), after ``_BUSY_WAIT_MAX`` or when the
        transport closes.

        A CPU-bound application then fetches on the event loop, in one thread with the
        application (records made on one core and read on another, and two Python threads
        taking turns, cost up to half the throughput on some machines); one that waits on
        I/O gets its next batches from the consumer thread as soon as the loop idles.
        Each pass is measured in the event loop's own CPU time, so a pass in which the OS
        ran another thread instead does not count as idle.
        """
        if not self._unsettled():
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._settled_waiter = waiter
        deadline = time.monotonic() + _BUSY_WAIT_MAX
        idle = 0
        last = time.thread_time()

        def after_pass() -> None:  # runs once per pass of the loop until the wait ends
            nonlocal idle, last
            if waiter.done():
                return
            cpu = time.thread_time()
            idle = idle + 1 if cpu - last < _IDLE_PASS_CPU else 0
            last = cpu
            if idle >= 2 or self._closing or time.monotonic() > deadline:
                waiter.set_result(False)
            else:
                loop.call_soon(after_pass)

        loop.call_soon(after_pass)
        try:
            return await waiter
        finally:
            self._settled_waiter = None

    def _wake_settled(self) -> None:
        """Tell ``_settled_while_busy`` that the last unsettled batch settled (event loop)."""
        waiter = self._settled_waiter
        if waiter is not None and not waiter.done() and not self._unsettled():
            waiter.set_result(True)

    def _send_commits(self, consumer: Any, *, final: bool = False) -> None:
        """Commit every partition whose settled offset moved, in one request (by the
        thread driving the consumer).

        Nothing waits for the broker's answer: each offset is the highest contiguous
        settled one, so a commit that fails or is lost in a crash only means redelivery,
        and the next commit (or the revoke's, or the one at close) covers it. ``final``
        (at close) commits every settled offset again and waits for the answer.

        Commits go out at most every ``commit_interval_ms``: a backlog drained in small
        fetches would otherwise send the coordinator one request per fetch (measured at 250
        records a fetch: about a tenth of the drain's speed). A commit put
        off goes out with the next fetch, or the next idle slice (``_IDLE_SLICE``).
        """
        from confluent_kafka import KafkaException
        from confluent_kafka import TopicPartition as TP

        now = time.monotonic()
        if not final and now < self._commit_due:
            return
        with self._lock:
            offsets = []
            for k, s in self._partitions.items():
                offset = s.commit_to
                if offset is None or k in self._rewind or (offset == s.committed and not final):
                    continue
                offsets.append(TP(k[0], k[1], offset))
                s.committed = offset
        if not offsets:
            return
        self._commit_due = now + self.config.commit_interval_ms / 1000
        try:
            consumer.commit(offsets=offsets, asynchronous=not final)
        except KafkaException as exc:
            logger.warning("kafka commit%s failed: %s", " at close" if final else "", exc)
