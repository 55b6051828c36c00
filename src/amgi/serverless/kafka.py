"""AWS Lambda with a Kafka event source (Amazon MSK or self-managed Kafka).

How a Kafka event maps onto AMGI:

=====================  ================================================================
``records[topic-N]``   one batch per partition, its records in offset order; partitions
                       run concurrently (address: the topic)
record                 mapped by :mod:`amgi.servers._kafka_records`, as the Kafka server
                       does: base64 ``key``/``value`` decoded, header byte arrays joined,
                       ``bindings["kafka"]``: key, partition, offset, timestamp
ack                    nothing to do: Lambda commits the batch when the invocation succeeds
nack / unsettled       :class:`BatchFailed` is raised so that Lambda retries the batch,
                       unless ``dead_letter_address`` is set: then each one is sent there
                       (with the reason header) and the invocation succeeds
deadline               batches not finished in time fail the invocation (Lambda retries)
malformed event        :class:`MalformedEvent`, nothing processed
=====================  ================================================================
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Mapping
from operator import attrgetter
from typing import Any

from amgi.options import build
from amgi.runtime import RuntimeConfig
from amgi.serverless._adapter import (
    BatchFailed,
    LambdaAdapter,
    LambdaContext,
    MalformedEvent,
    PublisherFactory,
)
from amgi.servers import load
from amgi.servers._kafka_records import message_from_record
from amgi.transport import (
    DEAD_LETTER_REASON_HEADER,
    ORIGINAL_ADDRESS_HEADER,
    Batch,
    Message,
    Transport,
)
from amgi.types import AMGIApplication

__all__ = ["KafkaHandler", "kafka_batches"]

logger = logging.getLogger("amgi.serverless")

_SOURCES = ("aws:kafka", "SelfManagedKafka", None)


def _b64(value: Any, where: Any, field: str) -> bytes | None:
    if value is None:
        return None
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, TypeError, ValueError):
        raise MalformedEvent(f"{where}.{field} is not a base64 string") from None


def _headers(raw: Any, where: Any) -> list[tuple[bytes, bytes]]:
    """``[{"name": [byte, ...]}, ...]`` as (name, value) pairs, in order."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise MalformedEvent(f"{where}.headers is not a list")
    out = []
    for j, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise MalformedEvent(f"{where}.headers[{j}] is not an object")
        for name, value in item.items():
            if type(value) is not list:
                raise MalformedEvent(f"{where}.headers[{j}][{name!r}] is not a byte array")
            try:
                data = bytes(value)  # unsigned bytes: the common case, done in C
            except (TypeError, ValueError):
                if not all(type(b) is int and -128 <= b <= 255 for b in value):
                    raise MalformedEvent(
                        f"{where}.headers[{j}][{name!r}] is not a byte array"
                    ) from None
                data = bytes(b & 0xFF for b in value)  # Java's signed bytes
            out.append((str(name).encode("utf-8"), data))
    return out


class _Where:
    """A record's place in the event, formatted only for an error message."""

    __slots__ = ("group", "index")

    def __init__(self, group: str, index: int) -> None:
        self.group = group
        self.index = index

    def __str__(self) -> str:
        return f"records[{self.group!r}][{self.index}]"


def _int(record: Mapping[str, Any], key: str, where: Any) -> int:
    value = record.get(key)
    if type(value) is not int:
        raise MalformedEvent(f"{where} has no integer {key!r}")
    return value


_TOKEN = attrgetter("token")


def kafka_batches(event: Any) -> list[Batch]:
    """One batch per partition of a Lambda Kafka event; :class:`MalformedEvent` if bad."""
    if not isinstance(event, Mapping) or not isinstance(event.get("records"), Mapping):
        raise MalformedEvent("not a Kafka event: expected an object with a 'records' object")
    if event.get("eventSource") not in _SOURCES:
        raise MalformedEvent(f"not a Kafka event (eventSource {event.get('eventSource')!r})")
    batches = []
    for group, records in event["records"].items():
        if not isinstance(records, list):
            raise MalformedEvent(f"records[{group!r}] is not a list")
        messages: list[Message] = []
        topic: str | None = None
        partition: int | None = None
        for i, record in enumerate(records):
            where = _Where(group, i)
            if not isinstance(record, Mapping) or type(record.get("topic")) is not str:
                raise MalformedEvent(f"{where} has no string 'topic'")
            this = (record["topic"], _int(record, "partition", where))
            if topic is None:
                topic, partition = this
            elif this != (topic, partition):
                raise MalformedEvent(f"{where} is not of partition {topic}-{partition}")
            timestamp = record.get("timestamp")
            if timestamp is not None and type(timestamp) is not int:
                raise MalformedEvent(f"{where}.timestamp is not an integer")
            m = message_from_record(
                this[0],
                this[1],
                _int(record, "offset", where),
                timestamp,
                _b64(record.get("key"), where, "key"),
                _b64(record.get("value"), where, "value"),
                _headers(record.get("headers"), where),
            )
            messages.append(m)
        if messages and topic is not None:
            messages.sort(key=_TOKEN)
            if len({m.id for m in messages}) != len(messages):
                raise MalformedEvent(f"records[{group!r}] repeats an offset")
            batches.append(Batch(topic, messages, (topic, partition)))
    return batches


class KafkaHandler(LambdaAdapter):
    """Lambda handler for MSK and self-managed Kafka events: ``handler = KafkaHandler(app)``.

    ``message.send`` goes to the event's Kafka cluster (``bootstrapServers``) by default;
    pass ``publisher=`` another transport (e.g. SQS) to send elsewhere.
    """

    def __init__(
        self,
        app: AMGIApplication,
        *,
        config: RuntimeConfig | None = None,
        publisher: Transport | PublisherFactory | None = None,
        deadline_margin: float = 1.0,
        handle_sigterm: bool = True,
        dead_letter_address: str | None = None,
    ) -> None:
        super().__init__(
            app,
            config=config,
            publisher=publisher,
            deadline_margin=deadline_margin,
            handle_sigterm=handle_sigterm,
        )
        self.dead_letter_address = dead_letter_address

    def default_publisher(self, event: Mapping[str, Any]) -> Transport:
        servers = event.get("bootstrapServers")
        if not isinstance(servers, str) or not servers:
            raise MalformedEvent("the Kafka event names no bootstrapServers to send to")
        cls = load("kafka")
        return cls([], build(cls.options, {"bootstrap_servers": servers}))

    async def handle(self, event: Any, context: LambdaContext | None = None) -> Any:
        batches = kafka_batches(event)
        settlements = await self.run_batches(batches, event, self._deadline(context))
        failures: list[tuple[str, Message, str]] = []
        for batch, settlement in zip(batches, settlements, strict=True):
            failures.extend((batch.address, r.message, r.reason) for r in settlement.retry)
            failures.extend((batch.address, d.message, d.reason) for d in settlement.dead)
        processed = sum(len(b.messages) for b in batches)
        if not failures:
            return {"processed": processed, "dead_lettered": 0}
        if self.dead_letter_address is None:
            first = failures[0]
            raise BatchFailed(
                f"{len(failures)} record(s) nacked or unfinished (first: {first[0]} offset "
                f"{first[1].id}: {first[2]}); failing the invocation so Lambda retries"
            )
        for address, m, reason in failures:
            headers = [
                *m.headers,
                (DEAD_LETTER_REASON_HEADER, reason.encode("utf-8", "replace")),
                (ORIGINAL_ADDRESS_HEADER, address.encode("utf-8")),
            ]
            # A send error propagates: the invocation fails and Lambda retries the batch.
            await self._publish(self.dead_letter_address, headers, m.payload, dict(m.bindings))
        logger.warning("%d record(s) dead-lettered to %r", len(failures), self.dead_letter_address)
        return {"processed": processed, "dead_lettered": len(failures)}
