"""AWS Lambda with a Kafka event source (Amazon MSK or self-managed Kafka).

How a Kafka event maps onto AMGI:

=====================  ================================================================
``records[topic-N]``   one batch per partition, its records in offset order; partitions
                       run concurrently (address: the topic)
record                 mapped by :mod:`amgi.servers.kafka.records`, as the Kafka server
                       does: base64 ``key``/``value`` decoded, header byte arrays joined
                       (a null header value: empty),
                       ``bindings["kafka"]``: key, partition, offset, timestamp
ack                    nothing to do: Lambda commits the batch when the invocation succeeds
nack / unsettled       retried within the invocation (Lambda can only retry a whole
                       batch): after the runtime's retry delay the partition's nacked
                       records go to the app again, attempt + 1, up to ``max_attempts``
                       or until the next delay no longer fits in the time left. What is
                       still nacked then raises :class:`BatchFailed` so that Lambda
                       retries the batch, unless ``dead_letter_address`` is set: then
                       each one is sent there (with the reason header and the record's
                       key, never its partition) and the invocation succeeds
``retry: False``       advertised (``message.nack.retry``) only with
                       ``dead_letter_address``, where such a record goes at once
deadline               batches not finished in time fail the invocation (Lambda retries);
                       nothing of it is dead-lettered, whether or not the app received it,
                       except a record whose in-invocation retry was cut: the attempt the
                       app nacked was its last (else every invocation would start over)
malformed event        :class:`MalformedEvent`, nothing processed
=====================  ================================================================
"""

from __future__ import annotations

import binascii
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import Any

from amgi.options import build
from amgi.serverless._adapter import (
    BatchFailed,
    LambdaAdapter,
    LambdaContext,
    MalformedEvent,
    is_object,
)
from amgi.servers import load
from amgi.servers.kafka.records import message_from_record
from amgi.transport import Batch, DeadLetter, Message, Retry, Settlement, Transport

__all__ = ["KafkaHandler", "kafka_batches"]

logger = logging.getLogger("amgi.serverless")

_SOURCES = ("aws:kafka", "SelfManagedKafka", None)

Failed = tuple[str, Message, str]
"""A record that did not succeed: its topic, the record, the reason."""


def _where(group: str, index: int) -> str:
    return f"records[{group!r}][{index}]"


def _b64(value: Any, group: str, index: int, field: str) -> bytes:
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, TypeError, ValueError):
        raise MalformedEvent(f"{_where(group, index)}.{field} is not a base64 string") from None


def _headers(raw: Any, group: str, index: int) -> list[tuple[str, bytes | None]]:
    """``[{"name": [byte, ...]}, ...]`` as (name, value) pairs, in order; a null value
    (Kafka allows a header without one) stays None, as the Kafka server maps it."""
    if type(raw) is not list:
        raise MalformedEvent(f"{_where(group, index)}.headers is not a list")
    out: list[tuple[str, bytes | None]] = []
    for j, item in enumerate(raw):
        if not is_object(item):
            raise MalformedEvent(f"{_where(group, index)}.headers[{j}] is not an object")
        for name, value in item.items():
            if value is None:
                out.append((str(name), None))
                continue
            try:
                if type(value) is not list:
                    raise TypeError
                data = bytes(value)  # unsigned bytes: the common case, done in C
            except (TypeError, ValueError):
                if type(value) is not list or not all(
                    type(b) is int and -128 <= b <= 255 for b in value
                ):
                    raise MalformedEvent(
                        f"{_where(group, index)}.headers[{j}][{name!r}] is not a byte array"
                    ) from None
                data = bytes(b & 0xFF for b in value)  # Java's signed bytes
            out.append((str(name), data))
    return out


_TOKEN = attrgetter("token")


def kafka_batches(event: Any) -> list[Batch]:
    """One batch per partition of a Lambda Kafka event; :class:`MalformedEvent` if bad.

    Every record is checked before anything runs: a malformed event fails whole. Error
    messages name the record as ``records['topic-0'][i]``.
    """
    if not isinstance(event, Mapping) or not isinstance(event.get("records"), Mapping):
        raise MalformedEvent("not a Kafka event: expected an object with a 'records' object")
    if event.get("eventSource") not in _SOURCES:
        raise MalformedEvent(f"not a Kafka event (eventSource {event.get('eventSource')!r})")
    batches = []
    for group, records in event["records"].items():
        if type(records) is not list:
            raise MalformedEvent(f"records[{group!r}] is not a list")
        messages: list[Message] = []
        topic: str | None = None
        partition: int | None = None
        for i, record in enumerate(records):
            if not is_object(record):
                raise MalformedEvent(f"{_where(group, i)} is not an object")
            this_topic = record.get("topic")
            this_partition = record.get("partition")
            offset = record.get("offset")
            timestamp = record.get("timestamp")
            if type(this_topic) is not str:
                raise MalformedEvent(f"{_where(group, i)} has no string 'topic'")
            if type(this_partition) is not int:
                raise MalformedEvent(f"{_where(group, i)} has no integer 'partition'")
            if type(offset) is not int:
                raise MalformedEvent(f"{_where(group, i)} has no integer 'offset'")
            if timestamp is not None and type(timestamp) is not int:
                raise MalformedEvent(f"{_where(group, i)}.timestamp is not an integer")
            if topic is None:
                topic, partition = this_topic, this_partition
            elif this_topic != topic or this_partition != partition:
                raise MalformedEvent(f"{_where(group, i)} is not of partition {topic}-{partition}")
            key = record.get("key")
            value = record.get("value")
            headers = record.get("headers")
            messages.append(
                message_from_record(
                    topic,
                    this_partition,
                    offset,
                    timestamp,
                    None if key is None else _b64(key, group, i, "key"),
                    None if value is None else _b64(value, group, i, "value"),
                    None if headers is None else _headers(headers, group, i),
                )
            )
        if messages and topic is not None:
            messages.sort(key=_TOKEN)
            if len({m.id for m in messages}) != len(messages):
                raise MalformedEvent(f"records[{group!r}] repeats an offset")
            batches.append(Batch(topic, messages, (topic, partition)))
    return batches


class KafkaHandler(LambdaAdapter):
    """Lambda handler for MSK and self-managed Kafka events: ``handler = KafkaHandler(app)``.

    ``message.send`` goes to the event's Kafka cluster (``bootstrapServers``) by default;
    pass ``publisher=`` another transport (e.g. SQS) to send elsewhere, or ``routes=``
    (:class:`amgi.runtime.routing.Router`) to send some addresses elsewhere.
    ``dead_letter_address=`` (a topic) takes the records the app nacked or left
    unsettled, so that one poison record does not block its partition.
    """

    def default_publisher(self, event: Mapping[str, Any]) -> Transport:
        cls = load("kafka")
        servers = event.get("bootstrapServers")
        if not isinstance(servers, str) or not servers:
            raise cls.send_error("kafka: the Kafka event names no bootstrapServers to send to")
        return cls([], build(cls.options, {"bootstrap_servers": servers}))

    async def handle(self, event: Any, context: LambdaContext | None = None) -> Any:
        batches = kafka_batches(event)
        failures, unfinished = await self._run_with_retries(batches, event, context)
        processed = sum(len(b.messages) for b in batches)
        if unfinished:
            address, m, reason = unfinished[0]
            raise BatchFailed(
                f"{len(unfinished)} record(s) not finished in this invocation (first: "
                f"{address} offset {m.id}: {reason}); failing the invocation so Lambda "
                "retries the batch"
                + (", nothing dead-lettered" if self.dead_letter_address is not None else "")
            )
        if not failures:
            return {"processed": processed, "dead_lettered": 0}
        if self.dead_letter_address is None:
            address, m, reason = failures[0]
            raise BatchFailed(
                f"{len(failures)} record(s) nacked or unfinished (first: {address} offset "
                f"{m.id}: {reason}); failing the invocation so Lambda retries"
            )
        sent: list[Failed] = []

        async def send_in_order() -> None:
            for address, m, reason in failures:
                # Only the key goes along: the source's partition need not exist in the
                # dead-letter topic, which partitions by key like any producer would.
                await self.dead_letter(address, m, reason, {"kafka": {"key": _key(m)}})
                sent.append((address, m, reason))

        # Within the invocation's time: a send that never ends fails it in time instead.
        (error,) = await self.in_time([send_in_order()], context)
        if error is not None:
            address, m, _ = failures[len(sent)]
            # Lambda retries the batch: nothing of it is lost, some dead letters repeat.
            raise BatchFailed(
                f"{len(failures) - len(sent)} of {len(failures)} record(s) not dead-lettered "
                f"to {self.dead_letter_address!r} (first: {address} offset {m.id}: {error}); "
                "failing the invocation so Lambda retries the batch"
            ) from error
        logger.warning("%d record(s) dead-lettered to %r", len(failures), self.dead_letter_address)
        return {"processed": processed, "dead_lettered": len(failures)}

    async def _run_with_retries(
        self, batches: Sequence[Batch], event: Mapping[str, Any], context: LambdaContext | None
    ) -> tuple[list[Failed], list[Failed]]:
        """Run the batches, then the records the app nacked again, within the invocation.

        Lambda can only retry a whole batch and Kafka counts no deliveries, so retries
        happen here: after the runtime's retry delay, each partition's nacked records go
        to the app again as one call, with the next attempt, until they are settled or
        on their last attempt (``max_attempts``) dead. Returns ``(failures, unfinished)``:
        the records nacked for good, or whose next delay does not fit in the time left,
        or whose retry the deadline cut (as the app last nacked them); and the others cut
        at the deadline, which must not be dead-lettered. Each round retries
        only what the one before nacked, so there are at most ``max_attempts`` rounds.
        """
        failures: list[Failed] = []
        unfinished: list[Failed] = []
        nacked: dict[str, Failed] = {}  # the app's latest nack of each record retried
        while batches:
            results = await self.run_batches(batches, event, context)
            again: list[tuple[Batch, list[Retry]]] = []
            for batch, (settlement, in_time) in zip(batches, results, strict=True):
                if not in_time:
                    # Cut by a SIGTERM, nothing has used up its attempts: not the last.
                    last = {} if self.stopping else nacked
                    _cut(batch.address, settlement, last, failures, unfinished)
                    continue
                failures.extend(_failed(batch.address, settlement.dead))
                if settlement.retry:
                    again.append((batch, settlement.retry))
                    nacked.update(
                        (r.message.id, (batch.address, r.message, r.reason))
                        for r in settlement.retry
                        if not r.uncounted
                    )
            if not again:
                break
            delay = max(r.delay for _, retries in again for r in retries)
            left = self._time_left(context)
            if left is not None and delay >= left:
                # Waiting would run into the deadline: the nacked records have used up
                # this invocation's attempts (an uncounted one was never the app's). Not
                # so when a SIGTERM shortened the time: Lambda retries the batch elsewhere.
                for batch, retries in again:
                    for r in retries:
                        into = unfinished if r.uncounted or self.stopping else failures
                        into.append((batch.address, r.message, r.reason))
                break
            count = sum(len(retries) for _, retries in again)
            logger.info("retrying %d nacked record(s) in %gs, within the invocation", count, delay)
            if await self.stopped_within(delay):
                # The container is shutting down: Lambda retries the batch elsewhere.
                unfinished.extend(
                    (batch.address, r.message, r.reason) for batch, rs in again for r in rs
                )
                break
            batches = [_next_attempt(batch, retries) for batch, retries in again]
        return failures, unfinished


def _cut(
    address: str,
    settlement: Settlement,
    nacked: Mapping[str, Failed],
    failures: list[Failed],
    unfinished: list[Failed],
) -> None:
    """Place the records of a partition cut at the deadline. What the app never received,
    or had in hand, has used up no attempt: unfinished. But a retry the deadline cut
    leaves its record as the app last nacked it (that attempt was its last): failing the
    invocation would start the batch over at attempt 1, every time."""
    cut: list[Retry | DeadLetter] = [*settlement.retry, *settlement.dead]
    for f in cut:
        earlier = nacked.get(f.message.id)
        if earlier is None:
            unfinished.append((address, f.message, f.reason))
        elif isinstance(f, DeadLetter):
            failures.append((address, f.message, f.reason))  # the app's own verdict
        else:
            failures.append(earlier)


def _key(m: Message) -> Any:
    return m.bindings.get("kafka", {}).get("key")


def _failed(address: str, failed: Sequence[Retry | DeadLetter]) -> list[Failed]:
    return [(address, f.message, f.reason) for f in failed]


def _next_attempt(batch: Batch, retries: list[Retry]) -> Batch:
    """The retried records of ``batch`` as one batch, in offset order, each with its next
    attempt (an uncounted one keeps its attempt: the app never had it)."""
    messages = [
        dataclasses.replace(r.message, attempt=r.message.attempt + (not r.uncounted))
        for r in retries
    ]
    messages.sort(key=_TOKEN)
    return Batch(batch.address, messages, batch.key)
