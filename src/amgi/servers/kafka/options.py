"""The options of the Kafka server: one ``--kebab-case`` flag per field."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from amgi.servers.kit import invalid

__all__ = ["KafkaOptions"]

_TOPIC_CHARACTERS = re.compile(r"[a-zA-Z0-9._-]*")
"""What a Kafka topic name may hold."""

_SERVER_COMMITS = "the server commits only what the application settled"
_OWNED_SETTINGS: dict[str, str] = {
    "enable.auto.commit": _SERVER_COMMITS,
    "auto.commit.enable": _SERVER_COMMITS,
    "enable.auto.offset.store": _SERVER_COMMITS,
    "auto.commit.interval.ms": _SERVER_COMMITS,
    "enable.partition.eof": "the server sets it",
    "group.id": "use --group-id",
    "auto.offset.reset": "use --auto-offset-reset",
    "session.timeout.ms": "use --session-timeout-ms",
    "heartbeat.interval.ms": "use --heartbeat-interval-ms",
    "max.poll.interval.ms": "use --max-poll-interval-ms",
    "fetch.wait.max.ms": "use --fetch-wait-max-ms",
    "fetch.min.bytes": "use --fetch-min-bytes",
    "fetch.queue.backoff.ms": "use --fetch-queue-backoff-ms",
    "fetch.max.bytes": "use --fetch-max-bytes",
    "max.partition.fetch.bytes": "use --max-partition-fetch-bytes",
    "acks": "use --acks",
    "request.required.acks": "use --acks",
    "compression.type": "use --compression-type",
    "compression.codec": "use --compression-type",
    "linger.ms": "use --linger-ms",
    "queue.buffering.max.ms": "use --linger-ms",
    "enable.idempotence": "use --enable-idempotence",
    "delivery.timeout.ms": "use --delivery-timeout-ms",
    "message.timeout.ms": "use --delivery-timeout-ms",
}
"""librdkafka settings (and their aliases) the server sets itself, over a ``--config``
of the same name: why one cannot be given there."""


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
    auto_offset_reset: Literal["earliest", "latest"] = field(
        default="earliest",
        metadata={"help": "where a group without committed offsets starts: earliest|latest"},
    )
    client_id: str = field(default="amgi", metadata={"help": "client id sent to the broker"})
    max_batch_size: int = field(
        default=250,
        metadata={
            "ge": 1,
            "le": 1_000_000,
            "help": "most records taken by one fetch (all partitions)",
        },
    )
    commit_interval_ms: int = field(
        default=20,
        metadata={
            "ge": 0,
            "le": 60_000,
            "help": "least milliseconds between two offset commits (0: one before every fetch)",
        },
    )
    fetch_wait_max_ms: int = field(
        default=100, metadata={"ge": 0, "help": "longest wait of the broker for fetch_min_bytes"}
    )
    fetch_min_bytes: int = field(default=1, metadata={"ge": 1, "help": "fetch.min.bytes"})
    fetch_queue_backoff_ms: int = field(
        default=10,
        metadata={"ge": 0, "help": "pause of a partition's fetching while its local queue is full"},
    )
    fetch_max_bytes: int = field(default=52428800, metadata={"ge": 1, "help": "fetch.max.bytes"})
    max_partition_fetch_bytes: int = field(
        default=1048576, metadata={"ge": 1, "help": "max.partition.fetch.bytes"}
    )
    session_timeout_ms: int = field(
        default=45000, metadata={"ge": 1, "help": "group session timeout"}
    )
    heartbeat_interval_ms: int = field(
        default=3000, metadata={"ge": 1, "help": "group heartbeat interval"}
    )
    max_poll_interval_ms: int = field(
        default=300000,
        metadata={"ge": 1, "help": "longest gap between fetches before leaving the group"},
    )
    rebalance_timeout: float = field(
        default=30.0,
        metadata={
            "ge": 0,
            "help": "seconds a revoke waits for in-flight batches to settle and commit",
        },
    )
    acks: Literal["0", "1", "-1", "all"] = field(
        default="all", metadata={"help": "producer acks: 0, 1 or all (-1)"}
    )
    compression_type: str = field(
        default="none", metadata={"help": "producer compression: none|gzip|snappy|lz4|zstd"}
    )
    linger_ms: int = field(default=5, metadata={"ge": 0, "help": "producer linger.ms"})
    enable_idempotence: bool = field(default=True, metadata={"help": "idempotent producer"})
    delivery_timeout_ms: int = field(
        default=30000, metadata={"ge": 0, "help": "how long a send may take before it fails"}
    )
    retry_refused_for: float = field(
        default=300.0,
        metadata={
            "ge": 0,
            "help": "seconds a retry copy the broker cannot take for now (timed out, no "
            "leader) is tried again before its record is dead-lettered",
        },
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
        default=10.0, metadata={"gt": 0, "help": "seconds to reach the broker at startup"}
    )
    security_protocol: Literal["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"] = field(
        default="plaintext", metadata={"help": "plaintext|ssl|sasl_plaintext|sasl_ssl"}
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = field(
        default=None, metadata={"help": "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"}
    )
    sasl_username: str | None = field(default=None, metadata={"help": "SASL user name"})
    sasl_password: str | None = field(
        default=None, repr=False, metadata={"help": "SASL password", "secret": True}
    )
    ssl_ca_location: str | None = field(default=None, metadata={"help": "CA certificate file"})
    ssl_certificate_location: str | None = field(
        default=None, metadata={"help": "client certificate file"}
    )
    ssl_key_location: str | None = field(default=None, metadata={"help": "client key file"})
    ssl_key_password: str | None = field(
        default=None, repr=False, metadata={"help": "client key password", "secret": True}
    )
    ssl_check_hostname: bool = field(
        default=True, metadata={"help": "verify the broker's host name in its certificate"}
    )
    config: list[str] = field(
        default_factory=list,
        repr=False,
        metadata={
            "help": "extra librdkafka setting NAME=VALUE, one per flag",
            "secret": True,
            "whole": True,
        },
    )

    def check_together(self) -> None:
        """Some broker to reach, a group id, a heartbeat under the session timeout; retry
        and dead-letter topic templates with ``{topic}``, two other valid topic names;
        no ``--acks`` below all with an idempotent producer."""
        if not self.bootstrap_servers.strip():
            raise invalid(self, "bootstrap_servers", "is empty")
        if not self.group_id.strip():  # the client library aborts the process on it
            raise invalid(self, "group_id", "is empty")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise invalid(self, "heartbeat_interval_ms", "must be lower than --session-timeout-ms")
        for name in ("retry_topic", "dead_letter_topic"):
            template = getattr(self, name)
            if "{topic}" not in template:
                raise invalid(self, name, "must contain {topic}")
            if template == "{topic}":
                raise invalid(self, name, "must name another topic than {topic} itself")
            if not _TOPIC_CHARACTERS.fullmatch(template.replace("{topic}", "")):
                raise invalid(self, name, "may hold only a-z A-Z 0-9 . _ - besides {topic}")
        if self.dead_letter_topic == self.retry_topic:
            raise invalid(self, "dead_letter_topic", "must differ from --retry-topic")
        if self.enable_idempotence and self.acks not in ("all", "-1"):
            # librdkafka refuses the pair only as the producer is made, in its own words.
            raise invalid(
                self,
                "acks",
                "below all needs --no-enable-idempotence: an idempotent producer waits "
                "for every in-sync replica",
            )
        self._check_config()

    def _check_config(self) -> None:
        """No ``--config`` of a setting the server sets itself: it was overridden without
        a word, so auto-commit, ``acks=0`` or another group id asked for there never
        applied. The value is never shown (``--config`` is secret)."""
        for item in self.config:
            name = item.partition("=")[0].strip()
            why = _OWNED_SETTINGS.get(name)
            if why is not None:
                raise invalid(self, "config", f"{name} cannot be given: {why}")
