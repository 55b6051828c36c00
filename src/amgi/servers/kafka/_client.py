"""The Kafka client's state, librdkafka configuration and topic names (private)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from amgi.errors import BrokerUnavailable, SendError
from amgi.servers.kafka._client_log import CLIENT_LOGGER, ClientErrors, Repeats
from amgi.servers.kafka.options import KafkaOptions
from amgi.servers.kit import Watermark, invalid
from amgi.transport import Batch

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Producer

logger = logging.getLogger("amgi.servers.kafka")

TopicPartition = tuple[str, int]

_METADATA_SLICE = 0.5
"""Seconds per metadata request while connecting (see ``_metadata``)."""

_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
"""What a Kafka broker accepts as a topic name."""


class KafkaSendError(SendError):
    """A record could not be produced to Kafka."""

    for_now: bool = False
    """Whether the broker could not take it for now (timed out, unreachable, no leader,
    the producer's queue full), rather than refused it: no fault of the record's."""


@dataclass(slots=True)
class _Partition:
    """What the transport tracks of one assigned partition."""

    epoch: int
    settled: Watermark = field(default_factory=Watermark)
    """The offset after each batch handed out; its high mark is the offset to commit."""
    resume_at: float | None = None
    waited: tuple[int, float] | None = None
    """A retry copy this partition paused at: its offset and the time (monotonic) its
    wait ends, which a clock ahead of this one cannot push back (``_wait_ms``)."""
    commit_to: int | None = None
    """The offset to commit: every batch before it is settled."""
    committed: int | None = None
    """The last offset queued for commit."""
    moving: int = 0
    """Batches settled but for copies tried again in the background: nothing past the
    first is committed, so a revoke does not wait for the partition's batches."""
    start_unknown: bool = False
    """A retry partition whose start the lookup at assignment could not tell: paused
    until a later lookup does (``_resolve_starts``); its records are not handed out."""


@dataclass(slots=True)
class _BatchContext:
    tp: TopicPartition
    state: _Partition
    epoch: int
    next_offset: int
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


class KafkaClient:
    """State shared by the consumer thread, the producer and the event loop."""

    addresses: list[str]
    config: KafkaOptions

    def _init_client(self) -> None:
        """Set up the state (called by the transport's ``__init__``)."""
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._mover: Producer | None = None
        """The producer of retry copies, dead letters and replays when ``--acks`` is not
        ``all`` (``None`` otherwise: ``_producer`` sends them)."""
        self._client_errors = ClientErrors(logger)
        self._commit_failures = Repeats()
        """Commit failures logged in the last minute: a coordinator that stops answering
        fails every commit alike, one a fetch."""
        self._poll_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._delivery_threads: list[threading.Thread] = []
        """One per producer: each serves its producer's delivery reports."""
        self._producer_threads: dict[int, tuple[threading.Event, threading.Thread]] = {}
        """By ``id()`` of a producer: what retires its thread, and the thread."""
        self._replace_due: dict[str, float] = {}
        """By role: monotonic time before which a failed producer is not replaced again."""
        self._retiring: set[asyncio.Task[None]] = set()
        """Producers that failed for good being closed (``Producing._retire``)."""
        self._stopping = threading.Event()
        self._closing = False
        self._poll_future: asyncio.Future[list[Batch]] | None = None
        self._poll_error: Exception | None = None
        """An error the last ``consume`` call met, raised by the next ``_poll`` (the
        records of that call were handed out first)."""
        self._settled_waiter: asyncio.Future[bool] | None = None
        self._commit_due = 0.0
        """Monotonic time before which ``_send_commits`` sends nothing (but the final)."""
        self._driver_is_loop = False
        """Whether the event loop drives the consumer now (see ``Consuming._poll``)."""
        self._starts_unknown = False
        """Whether a partition may have ``start_unknown`` set (the lock guards it)."""
        self._next_start_lookup = 0.0
        """Monotonic time before which no lookup of unknown starts is made."""
        self._start_lookup_error = ""
        """Why the last lookup of committed offsets failed (for the warnings)."""
        self._held_warned = 0.0
        """Monotonic time of the last warning that retry partitions are held."""
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
        self._prepared: set[str] = set()
        """Topics whose retry and dead-letter topics were seen to (a pattern address's
        matching topics join when first assigned: ``_prepare_matched``)."""
        self._preparing: dict[str, asyncio.Task[None]] = {}
        """The ``_prepare_matched`` under way, by topic: a retry copy or dead letter of
        the topic waits for it (``_republish``)."""
        self._cooperative = False
        """A cooperative assignor (``--config partition.assignment.strategy``, which
        cannot mix it with eager ones) hands partitions out and back incrementally."""

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
            # Split at the first '=' only: the value is taken whole (commas, '=' and all).
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise invalid(o, "config", "expects NAME=VALUE items")  # values are secret
            conf[name.strip()] = value
        self._cooperative = "cooperative" in conf.get("partition.assignment.strategy", "")
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

    def _producer_config(self, acks: str | None = None) -> dict[str, Any]:
        """The producer's settings; ``acks`` over ``--acks`` (the mover's: ``all``)."""
        o = self.config
        conf = self._common_config()
        conf.update(
            {
                "acks": acks or o.acks,
                "compression.type": o.compression_type,
                "linger.ms": o.linger_ms,
                "enable.idempotence": o.enable_idempotence,
                "delivery.timeout.ms": o.delivery_timeout_ms,
            }
        )
        return conf

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
                metadata = await loop.run_in_executor(
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
            else:
                self._client_errors.connecting = False
                return metadata

    async def _create_topics(self, metadata: Any, topics: list[str]) -> bool:
        """Create the missing retry and dead-letter topics of ``topics``, each with its
        topic's partitions; whether one was created."""
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
            return False
        admin = AdminClient(self._common_config())
        # Within --connect-timeout: the client's own request timeout (60 s) held a start
        # for a minute on a broker that does not answer.
        futures = admin.create_topics(
            [NewTopic(t, n) for t, n in wanted.items()],
            request_timeout=self.config.connect_timeout,
        )
        created = False
        for topic, fut in futures.items():
            try:
                await asyncio.wrap_future(fut)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if error is not None and error.name() == "TOPIC_ALREADY_EXISTS":
                    created = True  # perhaps just now, by another member of the group
                    continue
                why = error.str() if error is not None else str(exc)
                logger.warning("could not create Kafka topic %r: %s", topic, why)
            else:
                created = True
        return created

    def _prepare_matched_soon(self, topics: list[str]) -> None:
        if self._closing:
            return
        task = asyncio.get_running_loop().create_task(self._prepare_matched(topics))
        for topic in topics:
            self._preparing[topic] = task

        def done(_: object) -> None:
            for topic in topics:
                if self._preparing.get(topic) is task:
                    del self._preparing[topic]

        task.add_done_callback(done)

    async def _prepare_matched(self, topics: list[str]) -> None:
        """Create the retry and dead-letter topics of ``topics`` (matched by a pattern
        address, first assigned now) unless ``--no-create-topics``, then have the consumer
        ask for the topics at once: its pattern subscription takes in a retry topic
        created after it subscribed only then (else at librdkafka's next metadata
        refresh, 5 minutes by default), and until then retry copies were stuck there.
        A topic whose retry or dead-letter name is no topic name, or that is missing with
        ``--no-create-topics``, is an error in the log."""
        usable = []
        for topic in topics:
            names = (self._retry_name(topic), self._dead_name(topic))
            bad = [n for n in names if not _TOPIC_NAME.fullmatch(n)]
            if bad:
                logger.error(
                    "the retry or dead-letter topic of %r would be %r, not a valid Kafka "
                    "topic name: its nacked records cannot be retried or dead-lettered "
                    "(set --retry-topic / --dead-letter-topic)",
                    topic,
                    bad[0][:60],
                )
            else:
                usable.append(topic)
        if not usable or self._producer is None:
            return
        try:
            metadata = await self._metadata(self._producer)
            usable = [t for t in usable if t in metadata.topics]
            if not self.config.create_topics:
                for topic in usable:
                    missing = [
                        n
                        for n in (self._retry_name(topic), self._dead_name(topic))
                        if n not in metadata.topics
                    ]
                    if missing:
                        logger.error(
                            "Kafka topic %s of %r (matched by a pattern address) does not "
                            "exist and --no-create-topics is set: its nacked records wait "
                            "until it is created",
                            " and ".join(repr(n) for n in missing),
                            topic,
                        )
                return
            if await self._create_topics(metadata, usable) and self._consumer is not None:
                consumer = self._consumer
                loop = asyncio.get_running_loop()
                # On the consumer thread: a close queues the consumer's close behind it
                # (cancelling this task does not stop the call, and a consumer closed
                # under a call still running in another thread is freed under it).
                await loop.run_in_executor(
                    self._poll_thread,
                    functools.partial(consumer.list_topics, timeout=self.config.connect_timeout),
                )
        except Exception as exc:  # the log is where this can fail loudly
            logger.error(
                "could not make the retry and dead-letter topics of %s: %s",
                ", ".join(repr(t) for t in usable),
                exc,
            )

    def _retry_name(self, topic: str) -> str:
        return self.config.retry_topic.replace("{topic}", topic)

    def _dead_name(self, topic: str) -> str:
        return self.config.dead_letter_topic.replace("{topic}", topic)

    def _on_commit(self, err: Any, partitions: list[Any]) -> None:
        """The broker's answer to a commit (consumer thread): a failure is a warning,
        each alike once a minute (a partition's by topic and error)."""
        if err is not None:
            if self._commit_failures.fresh(str(err)):
                logger.warning("kafka commit failed: %s", err)
            return
        for tp in partitions:
            if tp.error is not None and self._commit_failures.fresh(
                f"{tp.topic}[{tp.partition}] {tp.error}"
            ):
                logger.warning(
                    "kafka commit of %s[%d]@%d failed: %s",
                    tp.topic,
                    tp.partition,
                    tp.offset,
                    tp.error,
                )
