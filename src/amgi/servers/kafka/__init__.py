"""AMGI over Kafka, with confluent-kafka (librdkafka).

======================  ===============================================================
AMGI                    Kafka
======================  ===============================================================
address                 topic (``^regex`` addresses subscribe to a topic pattern)
batch                   one partition's records from one fetch (``consume``)
``Batch.key``           ``(topic, partition)``: partitions run concurrently, in order
ack                     the highest contiguous settled offset + 1 of each partition
                        (never past an unsettled record), committed before the next
                        fetch in one request for all partitions, never per message;
                        synchronously at close
nack -> retry           republished to ``retry_topic`` with ``amgi-attempt`` and a due
                        time; the retry topic's partition pauses until the head is due
nack -> dead            republished to ``dead_letter_topic`` with the reason header
refused copy            a retry copy refused (too large ...) is dead-lettered instead; a
                        refused dead letter is tried again with backoff in the
                        background; the partition goes on but commits nothing past it
                        (``amgi.servers.kit.move_aside``)
bindings in             ``kafka``: key, partition, offset, timestamp
bindings out            ``kafka``: key (bytes or str), partition (int)
send failure            :class:`KafkaSendError`
rebalance               revoked partitions stop being fetched; the revoke waits (up to
                        ``rebalance_timeout``) for their batches to settle and commit
dead letters (CLI)      list: the dead-letter topic from the ``amgi-dead-letters``
                        group's offsets; replay: produced back, then that group commits
backlog (metrics)       high watermark as last fetched minus the offset processed up to
======================  ===============================================================

librdkafka calls block. One thread at a time drives the consumer (fetch, seek, pause,
rebalance callbacks, commits): the event loop takes the records on hand once every batch
handed out is settled (a busy application's records are then made and read on one thread),
a dedicated consumer thread waits for records, and fetches while the application awaits
something; producer delivery reports are served by a second thread (a third serves the
mover's: retry copies, dead letters and replays go with ``acks=all`` whatever
``--acks``). The event loop awaits their results once per fetch, never once per message.
Commits are sent by the driving thread before each ``consume``: one asynchronous request
for every partition whose settled offset moved. librdkafka blocks commits from other
threads while a rebalance callback runs and lets them land after the callback's own
commit, so committing only from the thread driving the consumer is what keeps a revoked
partition's last commit last.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import re
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from amgi.errors import ConfigurationError, SendError
from amgi.servers.kafka._client import (
    _TOPIC_NAME,
    KafkaSendError,
    _BatchContext,
    _escape,
    _strip_anchors,
    _template_regex,
)
from amgi.servers.kafka._consumer import Consuming
from amgi.servers.kafka._dead_letters import DeadLetters
from amgi.servers.kafka._producer import Producing
from amgi.servers.kafka.options import KafkaOptions
from amgi.servers.kit import DelayedRepublisher, redact, unmoved, whole_number
from amgi.transport import Batch, Bindings, HeaderList, Settlement, Transport

_MAX_PARTITION = 2**31 - 1
"""Partitions are numbered by a signed 32-bit int on the wire."""

_CLOSE_FLUSH = 3.0
"""Most seconds a close waits for the records still queued. Every send is awaited by its
caller, and a caller the shutdown cut off settled nothing (its records come back), so a
record still queued is no one's to count: waiting --delivery-timeout-ms (30 s) for a
broker that is gone only held the close past the runtime's bound, which then left the
client running and the process exiting 1."""

__all__ = ["KafkaOptions", "KafkaSendError", "KafkaTransport"]

logger = logging.getLogger("amgi.servers.kafka")


class KafkaTransport(Consuming, DeadLetters, Producing, Transport):
    """The ``kafka`` server: consumes topics with a consumer group, produces records;
    lists and replays dead letters (:mod:`._dead_letters`), reports lag (``backlog``)."""

    name: ClassVar[str] = "kafka"
    options: ClassVar[type[Any]] = KafkaOptions
    send_error: ClassVar[type[SendError]] = KafkaSendError
    requires: ClassVar[tuple[str, ...]] = ("confluent_kafka",)
    extra: ClassVar[str] = "kafka"
    stable_ids = True
    """``topic/partition/offset``: the crash ledger bounds a record that kills the process."""

    config: KafkaOptions

    def __init__(self, addresses: Sequence[str], options: KafkaOptions) -> None:
        super().__init__(addresses, options)
        self._init_client()
        self._moves = DelayedRepublisher("kafka")
        """Copies the broker refused, tried again in the background (kit ``move_aside``)."""

    def ledger_namespace(self) -> str:
        """The cluster and the consumer group: each group consumes every record."""
        return f"kafka {self.config.bootstrap_servers} {self.config.group_id}"

    def check(self) -> None:
        """The options, then the topic patterns (``^regex``) of the addresses and topics."""
        super().check()
        for source in [*self.addresses, *self.config.topics]:
            if source.startswith("^"):
                try:
                    re.compile(source)
                except re.error as exc:
                    raise ConfigurationError(
                        f"{source!r} is not a valid topic pattern: {exc}"
                    ) from None

    # -- lifecycle -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Check the options, reach the broker, then subscribe to the addresses.

        A connect that fails closes every client it created and stops their threads, so
        nothing keeps reconnecting (and logging) after it.
        """
        self.check()
        self._loop = asyncio.get_running_loop()
        self._moves = DelayedRepublisher("kafka")
        self._closing = False
        self._stopping.clear()
        try:
            await self._open_clients()
        except BaseException:
            await self.close()
            raise

    async def _open_clients(self) -> None:
        from confluent_kafka import Consumer, KafkaException

        assert self._loop is not None
        self._start_producers()
        self._sources = list(dict.fromkeys([*self.addresses, *self.config.topics]))
        if not self._sources:
            await self._prepare_subscription()
            return
        # Created now, so that it reaches the broker while the metadata is asked for.
        try:
            consumer = Consumer(self._consumer_config())
        except (KafkaException, ValueError, TypeError) as exc:
            why = redact(str(exc), self.config)
            raise ConfigurationError(f"invalid Kafka consumer option: {why}") from None
        self._consumer = consumer
        self._poll_thread = concurrent.futures.ThreadPoolExecutor(1, "amgi-kafka-consumer")
        subscription = await self._prepare_subscription()
        try:
            await self._loop.run_in_executor(
                self._poll_thread,
                lambda: consumer.subscribe(
                    subscription,
                    on_assign=self._on_assign,
                    on_revoke=self._on_revoke,
                    on_lost=self._on_lost,
                ),
            )
        except KafkaException as exc:
            raise ConfigurationError(f"cannot subscribe to {subscription}: {exc}") from None

    async def _prepare_subscription(self) -> list[str]:
        """Check the literal topics exist, create the retry and dead-letter topics, and
        return what to subscribe to (topics and patterns)."""
        metadata = await self._metadata(self._producer)
        if not self._sources:
            return []
        literal = [t for t in self._sources if not t.startswith("^")]
        missing = [t for t in literal if t not in metadata.topics]
        if missing:
            names = ", ".join(repr(t) for t in missing)
            raise ConfigurationError(
                f"Kafka topic {names} does not exist on {self.config.bootstrap_servers}"
            )
        for t in literal:
            for name in (self._retry_name(t), self._dead_name(t)):
                if not _TOPIC_NAME.fullmatch(name):
                    raise ConfigurationError(
                        f"the retry or dead-letter topic of {t!r} would be {name[:60]!r}"
                        f"{'...' if len(name) > 60 else ''} ({len(name)} characters), not a "
                        "valid Kafka topic name (at most 249 of a-z A-Z 0-9 . _ -): "
                        "set --retry-topic / --dead-letter-topic"
                    )
        self._retry_topics = {self._retry_name(t): t for t in literal}
        self._prepared = set(literal)
        self._dead_re = re.compile(
            "|".join(_template_regex(self.config.dead_letter_topic, _escape(t)) for t in literal)
            or "(?!)"
        )
        patterns = [_strip_anchors(p) for p in self._sources if p.startswith("^")]
        subscription = [*literal, *self._retry_topics]
        if patterns:
            body = "|".join(f"({p})" for p in patterns)
            retry_pattern = _template_regex(self.config.retry_topic, body)
            dead_pattern = _template_regex(self.config.dead_letter_topic, body)
            self._retry_re = re.compile(retry_pattern)
            self._dead_re = re.compile(f"{self._dead_re.pattern}|{dead_pattern}")
            subscription += [f"^({p})$" for p in patterns] + [retry_pattern]
        if self.config.create_topics:
            await self._create_topics(metadata, literal)
        return subscription

    async def close(self) -> None:
        """Commit what is settled, leave the group, flush sends, stop the threads."""
        self._closing = True
        with self._lock:
            self._lock.notify_all()
        await self._moves.close(timeout=1.0)  # their records stay uncommitted
        preparing = set(self._preparing.values())
        for task in preparing:
            task.cancel()
        if preparing:
            await asyncio.wait(preparing)
        loop = asyncio.get_running_loop()
        if self._poll_future is not None:
            await asyncio.wait([self._poll_future])
            self._poll_future = None
        consumer, self._consumer = self._consumer, None
        if consumer is not None and self._poll_thread is not None:
            try:
                await loop.run_in_executor(
                    self._poll_thread, functools.partial(self._send_commits, consumer, final=True)
                )
                await loop.run_in_executor(self._poll_thread, consumer.close)
            except Exception as exc:  # closing must not hide the caller's error
                logger.warning("kafka consumer close: %s", exc)
        if self._poll_thread is not None:
            self._poll_thread.shutdown(wait=True)
            self._poll_thread = None
        producers = [p for p in (self._producer, self._mover) if p is not None]
        self._producer = self._mover = None
        if self._retiring:  # failed producers being closed: before their threads are joined
            await asyncio.wait(set(self._retiring))
        await asyncio.gather(*(self._flush_at_close(p) for p in producers))
        self._stopping.set()
        threads, self._delivery_threads = self._delivery_threads, []
        for thread in threads:
            await loop.run_in_executor(None, thread.join)
        self._producer_threads.clear()
        # The client's threads end now, not when its last reference goes (a traceback
        # of a failed connect holds one). Older confluent-kafka releases lack close().
        for producer in producers:
            close = getattr(producer, "close", None)
            if close is not None:
                await loop.run_in_executor(None, close)

    async def _flush_at_close(self, producer: Any) -> None:
        """Wait a little for the records still queued, then fail their sends."""
        loop = asyncio.get_running_loop()
        given = self.config.delivery_timeout_ms / 1000  # 0: librdkafka waits for ever
        timeout = min(given, _CLOSE_FLUSH) if given else _CLOSE_FLUSH
        remaining = await loop.run_in_executor(None, producer.flush, timeout)
        if remaining:
            why = self._client_errors.latest
            logger.warning(
                "%d Kafka record(s) were not delivered before close%s: their sends fail",
                remaining,
                f" (the client's latest error: {why})" if why else "",
            )
            producer.purge()
            producer.poll(0)  # their delivery reports: a send still awaited fails now

    # -- consuming (the consumer thread) -------------------------------------------------

    async def fetch(self) -> Sequence[Batch]:
        """Wait for records; return one batch per partition that had some."""
        if self._consumer is None or self._poll_thread is None:
            raise ConfigurationError("no Kafka topic to consume: give an ADDRESS or --topics")
        loop = asyncio.get_running_loop()
        while True:
            # Records on hand are taken on the event loop, once every batch handed out is
            # settled: a rebalance callback run by that consume then has nothing to wait
            # for. Waiting for records, or while the application awaits something, the
            # consumer thread drives the consumer. Never both at once.
            # A lookup of retry partitions' starts is due: the consumer thread makes it.
            lookup = self._start_lookup_due(time.monotonic())
            if self._poll_future is None and not lookup and await self._settled_while_busy():
                batches = self._poll(wait=False)
                if batches:
                    return batches
            if self._poll_future is None:
                self._poll_future = loop.run_in_executor(self._poll_thread, self._poll)
            # Shielded: a cancelled fetch leaves the consume call's batches for the next one.
            try:
                batches = await asyncio.shield(self._poll_future)
            except Exception:  # not a cancellation: the poll failed, the next one polls again
                self._poll_future = None
                raise
            self._poll_future = None
            if batches:
                return batches

    # -- settling ------------------------------------------------------------------------

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        """Republish retries and dead letters, then commit what is contiguous."""
        ctx: _BatchContext = batch.context
        if settlement.retry or settlement.dead:
            since = time.monotonic()
            stranded = await self._republish(batch.address, settlement, lambda: True, since)
            if stranded:
                # Tried again in the background; the partition's later batches go on, but
                # nothing is committed past this batch until its copies are on the broker.
                left = unmoved(settlement, stranded)
                with self._lock:
                    ctx.state.moving += 1
                    self._lock.notify_all()  # a revoke waits for this partition no more
                self._wake_settled()  # nor does a fetch
                later = functools.partial(self._move_later, batch, left, since)
                self._moves.schedule(0, later)
                return
        self._commit(ctx)

    async def _move_later(self, batch: Batch, left: Settlement, since: float) -> None:
        ctx: _BatchContext = batch.context

        def gone() -> bool:  # revoked, rewound or closing: the records come back anyway
            with self._lock:
                current = self._partitions.get(ctx.tp) is ctx.state
                return self._closing or not current or ctx.state.epoch != ctx.epoch

        try:
            moved = not await self._republish(batch.address, left, gone, since)
        finally:
            with self._lock:
                ctx.state.moving -= 1
        if moved:
            self._commit(ctx)

    def _commit(self, ctx: _BatchContext) -> None:
        """Mark the batch settled; commit what is contiguous (before the next consume)."""
        with self._lock:
            self._settle_to(ctx.tp, ctx.state, ctx.next_offset)
            self._lock.notify_all()
        self._wake_settled()

    # -- producing -----------------------------------------------------------------------

    async def publish(
        self,
        address: str,
        headers: HeaderList,
        payload: bytes | None,
        bindings: Bindings,
    ) -> None:
        """Produce one record and wait for the broker's acknowledgement."""
        kafka = bindings.get("kafka") or {}
        key = kafka.get("key")
        partition = kafka.get("partition")
        if key is not None and not isinstance(key, (bytes, str)):
            raise KafkaSendError(
                f"cannot send to {address!r}: kafka.key must be bytes or str, "
                f"not {type(key).__name__}"
            )
        if isinstance(key, str):
            try:
                key = key.encode()
            except UnicodeEncodeError as exc:  # a lone surrogate, as from a file name
                raise KafkaSendError(
                    f"cannot send to {address!r}: kafka.key is not valid text "
                    f"({exc.reason} at character {exc.start})"
                ) from None
        if partition is not None:
            try:
                whole_number("kafka", "partition", partition, 0, _MAX_PARTITION)
            except ValueError as exc:
                raise KafkaSendError(f"cannot send to {address!r}: {exc}") from None
        await self._produce(address, list(headers), payload, key, partition)
