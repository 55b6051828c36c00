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
bindings in             ``kafka``: key, partition, offset, timestamp
bindings out            ``kafka``: key (bytes or str), partition (int)
send failure            :class:`KafkaSendError`
rebalance               revoked partitions stop being fetched; the revoke waits (up to
                        ``rebalance_timeout``) for their batches to settle and commit
======================  ===============================================================

librdkafka calls block, so the consumer lives on one dedicated thread (fetch, seek,
pause, rebalance callbacks) and producer delivery reports are served by a second; the
event loop awaits their results once per fetch, never once per message. Commits are
sent from the consumer thread too, before each ``consume``: one asynchronous request for
every partition whose settled offset moved. librdkafka blocks commits from other threads
while a rebalance callback runs and lets them land after the callback's own commit, so
committing from that one thread is what keeps a revoked partition's last commit last.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from amgi.errors import BrokerUnavailable, ConfigurationError, SendError
from amgi.servers._kafka_client_log import CLIENT_LOGGER, ClientErrors
from amgi.servers._kafka_dead_letters import DeadLetterReader
from amgi.servers._kafka_records import RETRY_DUE_HEADER, messages_from_records
from amgi.transport import (
    ATTEMPT_HEADER,
    DEAD_LETTER_REASON_HEADER,
    ORIGINAL_ADDRESS_HEADER,
    Batch,
    Bindings,
    HeaderList,
    Settlement,
    StoredDeadLetter,
    Transport,
)

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Producer

__all__ = ["KafkaOptions", "KafkaSendError", "KafkaTransport"]

log = logging.getLogger("amgi.servers.kafka")

_METADATA_SLICE = 0.5
"""Seconds per metadata request while connecting (see ``_metadata``)."""

TopicPartition = tuple[str, int]

_IDLE_SLICE = 0.02
"""Seconds of one wait for records when none are on hand; commits go out between them."""
_IDLE_SLICES = 5


class KafkaSendError(SendError):
    """A record could not be produced to Kafka."""


@dataclass
class KafkaOptions:
    """Options of the Kafka server; each field is a ``--kebab-case`` flag."""

    bootstrap_servers: str = field(
        default="127.0.0.1:9092", metadata={"help": "comma-separated host:port list"}
    )
    group_id: str = field(default="amgi", metadata={"help": "consumer group id"})
    topics: list[str] = field(
        default_factory=list,
        metadata={"help": "topics to consume besides the addresses; '^regex' is a pattern"},
    )
    auto_offset_reset: str = field(
        default="earliest",
        metadata={"help": "where a group without committed offsets starts: earliest|latest"},
    )
    client_id: str = field(default="amgi", metadata={"help": "client id sent to the broker"})
    max_batch_size: int = field(
        default=2000, metadata={"help": "most records taken by one fetch (all partitions)"}
    )
    fetch_wait_max_ms: int = field(
        default=100, metadata={"help": "longest wait of the broker for fetch_min_bytes"}
    )
    fetch_min_bytes: int = field(default=1, metadata={"help": "fetch.min.bytes"})
    fetch_queue_backoff_ms: int = field(
        default=10,
        metadata={"help": "pause of a partition's fetching while its local queue is full"},
    )
    fetch_max_bytes: int = field(default=52428800, metadata={"help": "fetch.max.bytes"})
    max_partition_fetch_bytes: int = field(
        default=1048576, metadata={"help": "max.partition.fetch.bytes"}
    )
    session_timeout_ms: int = field(default=45000, metadata={"help": "group session timeout"})
    heartbeat_interval_ms: int = field(default=3000, metadata={"help": "group heartbeat interval"})
    max_poll_interval_ms: int = field(
        default=300000, metadata={"help": "longest gap between fetches before leaving the group"}
    )
    rebalance_timeout: float = field(
        default=30.0,
        metadata={"help": "seconds a revoke waits for in-flight batches to settle and commit"},
    )
    acks: str = field(default="all", metadata={"help": "producer acks: 0, 1 or all"})
    compression_type: str = field(
        default="none", metadata={"help": "producer compression: none|gzip|snappy|lz4|zstd"}
    )
    linger_ms: int = field(default=5, metadata={"help": "producer linger.ms"})
    enable_idempotence: bool = field(default=True, metadata={"help": "idempotent producer"})
    delivery_timeout_ms: int = field(
        default=30000, metadata={"help": "how long a send may take before it fails"}
    )
    retry_topic: str = field(
        default="{topic}.retry", metadata={"help": "retry topic of a topic ({topic} is replaced)"}
    )
    dead_letter_topic: str = field(
        default="{topic}.dlq", metadata={"help": "dead-letter topic ({topic} is replaced)"}
    )
    create_topics: bool = field(
        default=True, metadata={"help": "create missing retry and dead-letter topics at startup"}
    )
    connect_timeout: float = field(
        default=10.0, metadata={"help": "seconds to reach the broker at startup"}
    )
    security_protocol: str = field(
        default="plaintext", metadata={"help": "plaintext|ssl|sasl_plaintext|sasl_ssl"}
    )
    sasl_mechanism: str | None = field(
        default=None, metadata={"help": "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"}
    )
    sasl_username: str | None = field(default=None, metadata={"help": "SASL user name"})
    sasl_password: str | None = field(
        default=None, metadata={"help": "SASL password", "secret": True}
    )
    ssl_ca_location: str | None = field(default=None, metadata={"help": "CA certificate file"})
    ssl_certificate_location: str | None = field(
        default=None, metadata={"help": "client certificate file"}
    )
    ssl_key_location: str | None = field(default=None, metadata={"help": "client key file"})
    ssl_key_password: str | None = field(
        default=None, metadata={"help": "client key password", "secret": True}
    )
    ssl_check_hostname: bool = field(
        default=True, metadata={"help": "verify the broker's host name in its certificate"}
    )
    config: list[str] = field(
        default_factory=list,
        metadata={"help": "extra librdkafka setting NAME=VALUE (repeatable)", "secret": True},
    )


@dataclass(slots=True)
class _Pending:
    """A batch handed out and not yet settled: the offset to commit once it is."""

    next_offset: int
    done: bool = False


@dataclass(slots=True)
class _Partition:
    """What the transport tracks of one assigned partition."""

    epoch: int
    pending: deque[_Pending] = field(default_factory=deque)
    resume_at: float | None = None
    commit_to: int | None = None
    """The offset to commit: every batch before it is settled."""
    committed: int | None = None
    """The last offset queued for commit."""


@dataclass(slots=True)
class _BatchContext:
    tp: TopicPartition
    state: _Partition
    epoch: int
    pending: _Pending
    first_offset: int


def _escape(text: str) -> str:
    """Escape ``text`` for both Python's and librdkafka's (POSIX-like) regex engines."""
    return "".join("\\" + c if c in ".^$*+?()[]{}|\\" else c for c in text)


def _template_regex(template: str, body: str) -> str:
    """A regex for the names ``template`` gives to topics matching regex ``body``."""
    before, _, after = template.partition("{topic}")
    return "^" + _escape(before) + "(" + body + ")" + _escape(after) + "$"


def _strip_anchors(pattern: str) -> str:
    body = pattern[1:] if pattern.startswith("^") else pattern
    return body[:-1] if body.endswith("$") else body


class KafkaTransport(Transport):
    """The ``kafka`` server: consumes topics with a consumer group, produces records."""

    name: ClassVar[str] = "kafka"
    options: ClassVar[type[Any]] = KafkaOptions
    send_error: ClassVar[type[SendError]] = KafkaSendError
    requires: ClassVar[tuple[str, ...]] = ("confluent_kafka",)
    extra: ClassVar[str] = "kafka"

    config: KafkaOptions

    def __init__(self, addresses: Sequence[str], options: KafkaOptions) -> None:
        super().__init__(addresses, options)
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._client_errors = ClientErrors(log)
        self._poll_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._delivery_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._closing = False
        self._poll_future: asyncio.Future[list[Batch]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Partition state is shared by the consumer thread and the event loop.
        self._lock = threading.Condition()
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._epoch = 0
        self._revoked_in_call: set[TopicPartition] = set()
        self._rewind: dict[TopicPartition, int] = {}
        self._sources: list[str] = []
        self._retry_topics: dict[str, str] = {}
        self._retry_re: re.Pattern[str] | None = None
        self._dead_re: re.Pattern[str] | None = None

    # -- configuration -------------------------------------------------------------------

    def _common_config(self) -> dict[str, Any]:
        o = self.config
        conf: dict[str, Any] = {
            "bootstrap.servers": o.bootstrap_servers,
            "client.id": o.client_id,
            "security.protocol": o.security_protocol,
            "logger": CLIENT_LOGGER,
            "error_cb": self._client_errors,
        }
        optional = {
            "sasl.mechanism": o.sasl_mechanism,
            "sasl.username": o.sasl_username,
            "sasl.password": o.sasl_password,
            "ssl.ca.location": o.ssl_ca_location,
            "ssl.certificate.location": o.ssl_certificate_location,
            "ssl.key.location": o.ssl_key_location,
            "ssl.key.password": o.ssl_key_password,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        if not o.ssl_check_hostname:
            conf["ssl.endpoint.identification.algorithm"] = "none"
        for item in o.config:
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise ConfigurationError(f"--config expects NAME=VALUE, got {item!r}")
            conf[name.strip()] = value.strip()
        return conf

    def _consumer_config(self) -> dict[str, Any]:
        o = self.config
        conf = self._common_config()
        conf.update(
            {
                "group.id": o.group_id,
                "auto.offset.reset": o.auto_offset_reset,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": False,
                "session.timeout.ms": o.session_timeout_ms,
                "heartbeat.interval.ms": o.heartbeat_interval_ms,
                "max.poll.interval.ms": o.max_poll_interval_ms,
                "fetch.wait.max.ms": o.fetch_wait_max_ms,
                "fetch.min.bytes": o.fetch_min_bytes,
                # librdkafka's default (1000 ms) idles a partition for a second whenever
                # its prefetch queue fills: a 5x throughput loss when draining a backlog.
                "fetch.queue.backoff.ms": o.fetch_queue_backoff_ms,
                "fetch.max.bytes": o.fetch_max_bytes,
                "max.partition.fetch.bytes": o.max_partition_fetch_bytes,
                "on_commit": self._on_commit,
            }
        )
        return conf

    def _producer_config(self) -> dict[str, Any]:
        o = self.config
        conf = self._common_config()
        conf.update(
            {
                "acks": o.acks,
                "compression.type": o.compression_type,
                "linger.ms": o.linger_ms,
                "enable.idempotence": o.enable_idempotence,
                "delivery.timeout.ms": o.delivery_timeout_ms,
            }
        )
        return conf

    def _check_options(self) -> None:
        o = self.config
        if not o.bootstrap_servers.strip():
            raise ConfigurationError("--bootstrap-servers is empty")
        if o.auto_offset_reset not in ("earliest", "latest"):
            raise ConfigurationError(
                f"--auto-offset-reset must be earliest or latest, got {o.auto_offset_reset!r}"
            )
        if o.max_batch_size < 1:
            raise ConfigurationError("--max-batch-size must be at least 1")
        for name in ("retry_topic", "dead_letter_topic"):
            if "{topic}" not in getattr(o, name):
                flag = "--" + name.replace("_", "-")
                raise ConfigurationError(f"{flag} must contain {{topic}}")

    # -- lifecycle -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Check the options, reach the broker, then subscribe to the addresses."""
        from confluent_kafka import Consumer, KafkaException, Producer

        self._check_options()
        self._loop = asyncio.get_running_loop()
        try:
            self._producer = Producer(self._producer_config())
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigurationError(f"invalid Kafka producer option: {exc}") from None
        self._delivery_thread = threading.Thread(
            target=self._serve_deliveries, name="amgi-kafka-delivery", daemon=True
        )
        self._delivery_thread.start()
        metadata = await self._metadata(self._producer)

        self._sources = list(dict.fromkeys([*self.addresses, *self.config.topics]))
        if not self._sources:
            return
        literal = [t for t in self._sources if not t.startswith("^")]
        missing = [t for t in literal if t not in metadata.topics]
        if missing:
            names = ", ".join(repr(t) for t in missing)
            raise ConfigurationError(
                f"Kafka topic {names} does not exist on {self.config.bootstrap_servers}"
            )
        self._retry_topics = {self._retry_name(t): t for t in literal}
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
        try:
            consumer = Consumer(self._consumer_config())
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigurationError(f"invalid Kafka consumer option: {exc}") from None
        self._consumer = consumer
        self._poll_thread = concurrent.futures.ThreadPoolExecutor(1, "amgi-kafka-consumer")
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

    async def _metadata(self, client: Any) -> Any:
        from confluent_kafka import KafkaException

        loop = self._loop
        assert loop is not None
        timeout = self.config.connect_timeout
        deadline = loop.time() + timeout
        # Asked in slices, so that a refused certificate or refused credentials end the
        # wait at once instead of at the deadline.
        while True:
            slice_ = min(_METADATA_SLICE, max(deadline - loop.time(), 0.01))
            try:
                return await loop.run_in_executor(
                    None, functools.partial(client.list_topics, timeout=slice_)
                )
            except KafkaException as exc:
                hopeless = self._client_errors.hopeless()
                if hopeless is not None:
                    raise BrokerUnavailable(
                        f"cannot connect to Kafka at {self.config.bootstrap_servers}: {hopeless}"
                    ) from None
                if loop.time() >= deadline:
                    why = self._client_errors.latest or (
                        exc.args[0].str() if exc.args else str(exc)
                    )
                    raise BrokerUnavailable(
                        f"cannot reach Kafka at {self.config.bootstrap_servers} "
                        f"within {timeout:g} s: {why}"
                    ) from None

    async def _create_topics(self, metadata: Any, topics: list[str]) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient
        from confluent_kafka.cimpl import NewTopic

        assert self._loop is not None
        wanted: dict[str, int] = {}
        for topic in topics:
            partitions = len(metadata.topics[topic].partitions) or 1
            for derived in (self._retry_name(topic), self._dead_name(topic)):
                if derived not in metadata.topics:
                    wanted[derived] = partitions
        if not wanted:
            return
        admin = AdminClient(self._common_config())
        futures = admin.create_topics([NewTopic(t, n) for t, n in wanted.items()])
        for topic, fut in futures.items():
            try:
                await asyncio.wrap_future(fut)
            except KafkaException as exc:
                if exc.args and exc.args[0].name() == "TOPIC_ALREADY_EXISTS":
                    continue
                log.warning("could not create Kafka topic %r: %s", topic, exc)

    def _retry_name(self, topic: str) -> str:
        return self.config.retry_topic.replace("{topic}", topic)

    def _dead_name(self, topic: str) -> str:
        return self.config.dead_letter_topic.replace("{topic}", topic)

    async def close(self) -> None:
        """Commit what is settled, leave the group, flush sends, stop the threads."""
        self._closing = True
        with self._lock:
            self._lock.notify_all()
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
                log.warning("kafka consumer close: %s", exc)
        if self._poll_thread is not None:
            self._poll_thread.shutdown(wait=True)
            self._poll_thread = None
        producer, self._producer = self._producer, None
        if producer is not None:
            timeout = self.config.delivery_timeout_ms / 1000
            remaining = await loop.run_in_executor(None, producer.flush, timeout)
            if remaining:
                log.warning("%d Kafka record(s) were not delivered before close", remaining)
        self._stopping.set()
        if self._delivery_thread is not None:
            await loop.run_in_executor(None, self._delivery_thread.join)
            self._delivery_thread = None

    # -- consuming (the consumer thread) -------------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        with self._lock:
            for tp in partitions:
                self._epoch += 1
                key = (tp.topic, tp.partition)
                self._partitions[key] = _Partition(self._epoch)
                self._rewind.pop(key, None)
        # A retry partition paused under an earlier assignment must not stay paused.
        live = [tp for tp in partitions if not self._is_dead_letter_topic(tp.topic)]
        dead = [tp for tp in partitions if self._is_dead_letter_topic(tp.topic)]
        consumer.assign(partitions)  # now, so that pause and resume apply to them
        if live:
            consumer.resume(live)
        if dead:
            consumer.pause(dead)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        """Let the revoked partitions' batches settle, commit them here, then forget them.

        Commits are only sent from this thread (``_send_commits``, between ``consume``
        calls) and only for partitions not yet forgotten, so this commit is the last one
        of each revoked partition.
        """
        from confluent_kafka import KafkaException
        from confluent_kafka import TopicPartition as TP

        keys = [(tp.topic, tp.partition) for tp in partitions]
        deadline = time.monotonic() + self.config.rebalance_timeout
        with self._lock:
            while not self._closing:
                busy = [k for k in keys if k in self._partitions and self._partitions[k].pending]
                remaining = deadline - time.monotonic()
                if not busy or remaining <= 0:
                    if busy:
                        log.warning("revoking %s with batches still in flight", busy)
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
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                log.warning("kafka commit on revoke failed: %s", exc)

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        with self._lock:
            self._forget([(tp.topic, tp.partition) for tp in partitions])

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

    def _prepare_poll(self, consumer: Any) -> None:
        """Apply rewinds and resume retry partitions that are due (consumer thread)."""
        from confluent_kafka import TopicPartition as TP

        now = time.monotonic()
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
            try:
                consumer.seek(TP(topic, partition, offset))
            except Exception as exc:
                log.warning("kafka seek %s[%d] to %d failed: %s", topic, partition, offset, exc)
        if due:
            consumer.resume([TP(t, p) for t, p in due])

    def _poll(self) -> list[Batch]:
        """One ``consume`` call turned into batches, one per partition (consumer thread)."""
        consumer = self._consumer
        if consumer is None or self._closing:
            return []
        self._prepare_poll(consumer)
        self._revoked_in_call.clear()
        self._send_commits(consumer)
        limit = self.config.max_batch_size
        # Take what is on hand without waiting; otherwise wait for one record only, so that
        # a trickle is handed out at once instead of after the whole timeout. The wait is
        # cut in short slices so that offsets settled meanwhile are committed promptly.
        records = consumer.consume(limit, 0)
        if not records:
            for _ in range(_IDLE_SLICES):
                records = consumer.consume(1, _IDLE_SLICE)
                if records or self._closing:
                    break
                self._send_commits(consumer)
            if not records:
                return []
            if limit > 1:
                records += consumer.consume(limit - 1, 0)
        groups: dict[TopicPartition, list[Any]] = {}
        group: list[Any] = []
        last: tuple[Any, Any] = (None, None)
        for record in records:
            if record.error() is not None:
                self._record_error(record)
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
            batch = self._make_batch(consumer, key, group)
            if batch is not None:
                batches.append(batch)
        return batches

    def _record_error(self, record: Any) -> None:
        from confluent_kafka import KafkaError, KafkaException

        err = record.error()
        if err.fatal():
            raise BrokerUnavailable(f"Kafka consumer failed: {err.str()}")
        if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            log.warning("kafka: %s", err.str())
        elif err.code() in (
            KafkaError.TOPIC_AUTHORIZATION_FAILED,
            KafkaError.GROUP_AUTHORIZATION_FAILED,
        ):
            raise BrokerUnavailable(f"Kafka refused access: {err.str()}") from KafkaException(err)
        else:
            log.warning("kafka consumer: %s", err.str())

    def _make_batch(self, consumer: Any, key: TopicPartition, records: list[Any]) -> Batch | None:
        from confluent_kafka import TopicPartition as TP

        topic, partition = key
        with self._lock:
            state = self._partitions.get(key)
            revoked = key in self._revoked_in_call
        if state is None or revoked:
            if state is not None:
                # Revoked and assigned again within one consume call: the records seen
                # may predate the new assignment, so fetch again from the commit.
                committed = consumer.committed([TP(topic, partition)], timeout=10)[0].offset
                with self._lock:
                    self._rewind[key] = committed if committed >= 0 else records[0].offset()
            return None
        address = topic
        if self._is_retry_topic(topic):
            records, address = self._due_records(consumer, key, state, records)
            if not records:
                return None
        elif self._is_dead_letter_topic(topic):
            return None
        messages = messages_from_records(partition, records)
        pending = _Pending(records[-1].offset() + 1)
        with self._lock:
            if self._partitions.get(key) is not state:
                return None
            state.pending.append(pending)
        context = _BatchContext(key, state, state.epoch, pending, records[0].offset())
        batch_key: Hashable = key
        return Batch(address, messages, batch_key, context)

    def _due_records(
        self, consumer: Any, key: TopicPartition, state: _Partition, records: list[Any]
    ) -> tuple[list[Any], str]:
        """Keep a retry partition's records that are due; pause it at the first that is not."""
        from confluent_kafka import TopicPartition as TP

        from amgi.servers._kafka_records import split_internal_headers

        now_ms = time.time() * 1000
        address = key[0]
        for i, record in enumerate(records):
            info = split_internal_headers(record.headers())
            if i == 0:
                address = info.original_address or self._retry_topics.get(key[0], key[0])
            elif (info.original_address or address) != address:
                # One address per batch: the rest comes again with the next fetch.
                consumer.seek(TP(key[0], key[1], record.offset()))
                return records[:i], address
            if info.due_ms is not None and info.due_ms > now_ms:
                consumer.seek(TP(key[0], key[1], record.offset()))
                consumer.pause([TP(key[0], key[1])])
                with self._lock:
                    state.resume_at = time.monotonic() + (info.due_ms - now_ms) / 1000
                return records[:i], address
        return records, address

    async def fetch(self) -> Sequence[Batch]:
        """Wait for records; return one batch per partition that had some."""
        if self._consumer is None or self._poll_thread is None:
            raise ConfigurationError("no Kafka topic to consume: give an ADDRESS or --topics")
        loop = asyncio.get_running_loop()
        while True:
            if self._poll_future is None:
                self._poll_future = loop.run_in_executor(self._poll_thread, self._poll)
            # Shielded: a cancelled fetch leaves the consume call's batches for the next one.
            batches = await asyncio.shield(self._poll_future)
            self._poll_future = None
            if batches:
                return batches

    # -- settling ------------------------------------------------------------------------

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        """Republish retries and dead letters, then commit what is contiguous."""
        ctx: _BatchContext = batch.context
        try:
            await self._republish(batch.address, settlement)
        except KafkaSendError as exc:
            log.error("could not republish nacked records of %s: %s; rewinding", ctx.tp, exc)
            with self._lock:
                if self._partitions.get(ctx.tp) is ctx.state and ctx.state.epoch == ctx.epoch:
                    self._rewind[ctx.tp] = ctx.first_offset
                ctx.pending.done = True
                self._lock.notify_all()
            return
        with self._lock:
            ctx.pending.done = True
            pending = ctx.state.pending
            commit: int | None = None
            while pending and pending[0].done:
                commit = pending.popleft().next_offset
            if (
                commit is not None
                and self._partitions.get(ctx.tp) is ctx.state
                and ctx.tp not in self._rewind
            ):
                # Sent by the consumer thread before its next consume (_send_commits).
                ctx.state.commit_to = commit
            self._lock.notify_all()

    def _send_commits(self, consumer: Any, *, final: bool = False) -> None:
        """Commit every partition whose settled offset moved, in one request (consumer thread).

        Nothing waits for the broker's answer: each offset is the highest contiguous
        settled one, so a commit that fails or is lost in a crash only means redelivery,
        and the next commit (or the revoke's, or the one at close) covers it. ``final``
        (at close) commits every settled offset again and waits for the answer.
        """
        from confluent_kafka import KafkaException
        from confluent_kafka import TopicPartition as TP

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
        try:
            consumer.commit(offsets=offsets, asynchronous=not final)
        except KafkaException as exc:
            log.warning("kafka commit%s failed: %s", " at close" if final else "", exc)

    def _on_commit(self, err: Any, partitions: list[Any]) -> None:
        """The broker's answer to a commit (consumer thread)."""
        if err is not None:
            log.warning("kafka commit failed: %s", err)
            return
        for tp in partitions:
            if tp.error is not None:
                log.warning(
                    "kafka commit of %s[%d]@%d failed: %s",
                    tp.topic,
                    tp.partition,
                    tp.offset,
                    tp.error,
                )

    async def _republish(self, address: str, settlement: Settlement) -> None:
        if not settlement.retry and not settlement.dead:
            return
        waits = []
        now_ms = int(time.time() * 1000)
        original = address.encode()
        for retry in settlement.retry:
            m = retry.message
            headers = [
                *m.headers,
                (ATTEMPT_HEADER, str(m.attempt + 1).encode()),
                (ORIGINAL_ADDRESS_HEADER, original),
                (RETRY_DUE_HEADER, str(now_ms + int(retry.delay * 1000)).encode()),
            ]
            key = m.bindings.get("kafka", {}).get("key")
            waits.append(self._produce(self._retry_name(address), headers, m.payload, key, None))
        for dead in settlement.dead:
            m = dead.message
            headers = [
                *m.headers,
                (ATTEMPT_HEADER, str(m.attempt).encode()),
                (ORIGINAL_ADDRESS_HEADER, original),
                (DEAD_LETTER_REASON_HEADER, dead.reason.encode("utf-8", "replace")),
            ]
            key = m.bindings.get("kafka", {}).get("key")
            waits.append(self._produce(self._dead_name(address), headers, m.payload, key, None))
        await asyncio.gather(*waits)

    # -- producing -----------------------------------------------------------------------

    def _serve_deliveries(self) -> None:
        producer = self._producer
        while producer is not None and not self._stopping.is_set():
            producer.poll(0.1)

    def _produce(
        self,
        topic: str,
        headers: HeaderList,
        payload: bytes | None,
        key: Any,
        partition: int | None,
    ) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        producer = self._producer
        if producer is None:
            done.set_exception(KafkaSendError(f"cannot send to {topic!r}: not connected"))
            return done

        def settle_future(err: Any, record: Any) -> None:
            if done.done():
                return
            if err is None:
                done.set_result(None)
            else:
                done.set_exception(
                    KafkaSendError(f"Kafka did not take a record for {topic!r}: {err.str()}")
                )

        def on_delivery(err: Any, record: Any) -> None:
            loop.call_soon_threadsafe(settle_future, err, record)

        # Kafka header names are strings; the client would str() a bytes name.
        names = [
            (n.decode("utf-8", "replace") if isinstance(n, bytes) else n, v) for n, v in headers
        ]
        kwargs: dict[str, Any] = {"value": payload, "headers": names, "on_delivery": on_delivery}
        if key is not None:
            kwargs["key"] = key.encode() if isinstance(key, str) else key
        if partition is not None:
            kwargs["partition"] = partition
        try:
            producer.produce(topic, **kwargs)
        except BufferError:
            done.set_exception(
                KafkaSendError(f"Kafka producer queue is full (sending to {topic!r})")
            )
        except Exception as exc:
            done.set_exception(KafkaSendError(f"cannot send to {topic!r}: {exc}"))
        return done

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

    # -- dead letters (see _kafka_dead_letters) -------------------------------------------

    async def list_dead_letters(self, address: str, limit: int) -> list[StoredDeadLetter]:
        """Records of the dead-letter topic not yet replayed."""
        reader = await self._dead_letter_reader(address)
        try:
            found = await asyncio.to_thread(reader.read, limit)
        finally:
            await asyncio.to_thread(reader.close)
        return [d.stored for d in found]

    async def replay_dead_letters(self, address: str, limit: int) -> int:
        """Produce each record again to its topic, then commit it as replayed."""
        reader = await self._dead_letter_reader(address)
        moved = 0
        try:
            while moved < limit:
                chunk = await asyncio.to_thread(reader.read, min(500, limit - moved))
                if not chunk:
                    break
                sends = []
                for d in chunk:
                    target = d.stored.address or address
                    sends.append(
                        self._produce(target, d.stored.headers, d.stored.payload, d.key, None)
                    )
                await asyncio.gather(*sends)
                ends: dict[int, int] = {}
                for d in chunk:
                    ends[d.partition] = max(ends.get(d.partition, 0), d.offset + 1)
                await asyncio.to_thread(reader.commit, ends)
                moved += len(chunk)
        finally:
            await asyncio.to_thread(reader.close)
        return moved

    async def _dead_letter_reader(self, address: str) -> DeadLetterReader:
        assert self._producer is not None, "connect() first"
        metadata = await self._metadata(self._producer)
        if address not in metadata.topics:
            raise ConfigurationError(
                f"Kafka topic {address!r} does not exist on {self.config.bootstrap_servers}"
            )
        topic = self._dead_name(address)
        return await asyncio.to_thread(
            DeadLetterReader, self._common_config(), topic, self.config.connect_timeout
        )

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
            raise KafkaSendError(f"kafka.key must be bytes or str, got {type(key).__name__}")
        if partition is not None and (
            isinstance(partition, bool) or not isinstance(partition, int)
        ):
            raise KafkaSendError(f"kafka.partition must be an int, got {partition!r}")
        await self._produce(address, list(headers), payload, key, partition)
