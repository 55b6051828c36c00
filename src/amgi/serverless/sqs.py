"""AWS Lambda with an SQS event source.

How an SQS event maps onto AMGI:

=====================  ================================================================
event ``Records``      one batch, one application call (address: the queue name)
record                 a message mapped as the SQS server maps it (same headers, payload,
                       ``sqs`` bindings); attempt: ``ApproximateReceiveCount``
ack                    the record is not reported: Lambda deletes it
nack / unsettled       ``batchItemFailures`` (partial batch response): SQS redelivers it
                       after the visibility timeout; the queue's redrive policy dead-letters
nack ``retry: False``  with ``dead_letter_address`` (a queue): sent there at once and not
                       reported (Lambda deletes it); so is a nack on the last attempt.
                       Without it ``message.nack.retry`` is not advertised
body md5 mismatch,     reported as a failure without reaching the application (content
undecodable content    that does not decode: a bad ``amgi-body-encoding`` or
                       ``amgi-headers``); the other records are processed
FIFO queue             after a group's first failure the rest of that group fails too; a
(a ``.fifo`` name)     record failed before the app holds the rest of its group back
deadline               records not settled before the invocation's remaining time (less
                       ``deadline_margin``) are reported as failures
malformed event        :class:`MalformedEvent`, nothing processed (the whole batch returns)
startup fails          ``StartupFailed`` (at lifespan startup, or raised by the app's
                       first message call), the whole batch returns; a record on its
                       last receive is sent back to the queue instead, so that it is
                       not dead-lettered for the app's failure (not on a FIFO queue)
=====================  ================================================================

The function's event source mapping must have ``ReportBatchItemFailures`` turned on.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from amgi.errors import StartupFailed
from amgi.options import build
from amgi.serverless._adapter import LambdaAdapter, LambdaContext, MalformedEvent, is_object
from amgi.servers import load
from amgi.servers.kit.fifo import held_behind
from amgi.servers.sqs.records import decode_content, message_bindings
from amgi.transport import Batch, DeadLetter, Message, Transport

__all__ = ["SqsHandler", "sqs_message"]

logger = logging.getLogger("amgi.serverless")

CLIENT_SETUP = 1.0
"""Seconds the first send back to the source queue needs at least: making its client
loads the SQS service model, which holds the event loop for about half a second (more on
a small function), past any timeout. Started with less time left, it would run the
invocation into Lambda's timeout, which retries every record, those acked included."""


def _queue_name(arn: str) -> str:
    return arn.rsplit(":", 1)[-1]


def _name(where: str | int) -> str:
    return f"Records[{where}]" if type(where) is int else str(where)


def _record_attributes(raw: Mapping[str, Any], where: str | int) -> list[tuple[str, str, bytes]]:
    out = []
    for name, attribute in raw.items():
        if not is_object(attribute):
            raise MalformedEvent(f"{_name(where)}: messageAttributes[{name!r}] is not an object")
        binary = attribute.get("binaryValue")
        if binary is None:
            value = str(attribute.get("stringValue", "")).encode("utf-8")
        else:
            try:
                value = binascii.a2b_base64(binary, strict_mode=True)
            except (binascii.Error, TypeError, ValueError):
                raise MalformedEvent(
                    f"{_name(where)}: messageAttributes[{name!r}].binaryValue is not base64"
                ) from None
        out.append((name, str(attribute.get("dataType", "String")), value))
    return out


def sqs_message(record: Any, where: str | int = "record") -> Message:
    """The message an app sees for one SQS event record; :class:`MalformedEvent` if bad.

    ``where`` names the record in errors; an int ``i`` stands for ``Records[i]``. Content
    that does not decode comes as it arrived, as the SQS server delivers it
    (:func:`amgi.servers.sqs.records.decode_content`); the handler fails such a record.
    """
    return _mapped(record, where)[0]


def _mapped(record: Any, where: str | int) -> tuple[Message, str | None]:
    """The message of one record, and why its content does not decode (None: it does)."""
    if not is_object(record):
        raise MalformedEvent(f"{_name(where)} is not an object")
    message_id = record.get("messageId")
    body = record.get("body")
    if type(message_id) is not str or type(body) is not str:
        missing = "messageId" if type(message_id) is not str else "body"
        raise MalformedEvent(f"{_name(where)} has no string {missing!r}")
    system = record.get("attributes") or {}
    raw_attributes = record.get("messageAttributes") or {}
    if not is_object(system) or not is_object(raw_attributes):
        raise MalformedEvent(f"{_name(where)}: attributes and messageAttributes must be objects")
    if raw_attributes:
        headers, payload, types, problem = decode_content(
            body, _record_attributes(raw_attributes, where)
        )
    else:
        headers, payload, types, problem = [], body.encode("utf-8"), {}, None
    count = system.get("ApproximateReceiveCount", "1")
    try:
        attempt = int(count)
    except (TypeError, ValueError):
        raise MalformedEvent(f"{_name(where)}: ApproximateReceiveCount is not a number") from None
    bindings = {"sqs": message_bindings(message_id, system, types)}
    message = Message(message_id, headers, payload, bindings, attempt if attempt > 1 else 1, record)
    return message, problem


def _rejection(m: Message, problem: str | None) -> str | None:
    """Why a record fails before reaching the app (content, md5), or None."""
    if problem is not None:
        return f"its content does not decode: {problem}"
    expected = m.token.get("md5OfBody")
    body = m.token["body"].encode("utf-8")
    if expected is not None and hashlib.md5(body, usedforsecurity=False).hexdigest() != expected:
        return "body md5 does not match md5OfBody"
    return None


class SqsHandler(LambdaAdapter):
    """Lambda handler for SQS events: ``handler = SqsHandler(app)``.

    Returns ``{"batchItemFailures": [{"itemIdentifier": id}, ...]}``. ``message.send``
    goes to SQS by default (credentials and region from the function's environment);
    pass ``publisher=`` another transport (e.g. Kafka) to send elsewhere, or ``routes=``
    (:class:`amgi.runtime.routing.Router`) to send some addresses elsewhere.
    """

    _source: Transport | None = None
    """An SQS client for the source queue, connected when a record must go back to it."""
    _source_queue: tuple[str, str, int | None] | None = None
    """The source queue's ARN, URL and the receive count that dead-letters, looked up once."""

    def default_publisher(self, event: Mapping[str, Any]) -> Transport:
        return _sqs_transport()

    async def handle(self, event: Any, context: LambdaContext | None = None) -> Any:
        parsed = self._parse(event)
        records = [m for m, _ in parsed]
        fifo = bool(records) and _is_fifo(records[0])
        failed: set[str] = set()
        for m, problem in parsed:
            why = _rejection(m, problem)
            if why is not None:
                logger.error("record %s: %s; failing it without delivering it", m.id, why)
                failed.add(m.id)
        if failed and fifo:
            # The rest of such a record's group must not reach the app before it does.
            failed = _stop_groups(records, failed)
        messages = [m for m in records if m.id not in failed]
        if messages:
            address = _queue_name(str(messages[0].token.get("eventSourceARN", "")))
            batch = Batch(address, messages)
            try:
                ((settlement, _),) = await self.run_batches([batch], event, context)
            except StartupFailed:  # at lifespan startup, or the app's first message
                why = "the application failed to start"
                kept = await self._requeue_uncharged(messages, fifo, context, why)
                if not kept:
                    raise
                # The copies are in the queue: Lambda deletes these records.
                failed.update(m.id for m in records if m.id not in kept)
                return {
                    "batchItemFailures": [
                        {"itemIdentifier": m.id} for m in records if m.id in failed
                    ]
                }
            failed.update(r.message.id for r in settlement.retry)
            uncounted = [r.message for r in settlement.retry if r.uncounted]
            if uncounted and not fifo:
                # After a deadline's cut the time left is in the margin: use half of it.
                why = f"{len(uncounted)} record(s) never reached the app"
                keep = self.deadline_margin / 2
                failed -= await self._requeue_uncharged(uncounted, fifo, context, why, keep)
            dead = settlement.dead
            if self.dead_letter_address is None:
                failed.update(d.message.id for d in dead)  # the redrive policy's
                dead = []
            if failed and fifo:
                failed = _stop_groups(records, failed)
            # Held behind a failure of its group (FIFO), a dead one comes back with it.
            order = {m.id: i for i, m in enumerate(records)}
            dead = sorted(
                (d for d in dead if d.message.id not in failed), key=lambda d: order[d.message.id]
            )
            unsent = await self._dead_letter_all(address, dead, fifo, context)
            failed.update(unsent)
            if unsent and fifo:
                failed = _stop_groups(records, failed)
        return {"batchItemFailures": [{"itemIdentifier": m.id} for m in records if m.id in failed]}

    async def aclose(self) -> None:
        """Close the source queue's client too (see :meth:`LambdaAdapter.aclose`)."""
        self._source_queue = None
        source, self._source = self._source, None
        if source is not None:
            try:
                await source.close()
            except Exception:
                logger.exception("closing the SQS client of the source queue failed")
        await super().aclose()

    async def _requeue_uncharged(
        self,
        messages: list[Message],
        fifo: bool,
        context: LambdaContext | None,
        why: str,
        keep: float | None = None,
    ) -> set[str]:
        """``messages`` never reached the app (``why``), yet SQS counted this receive.

        Those whose next failed receive would dead-letter them (the source queue's
        ``maxReceiveCount``, or ``max_attempts`` with ``dead_letter_address``) are sent
        back to the queue as they are, delayed by ``retry_delay_max``, so that they are
        not dead-lettered for someone else's failure; the ids of those sent (Lambda must
        delete them), within the invocation's time less ``keep``. Not on a FIFO queue:
        a copy would go behind the rest of its group.
        """
        if fifo:
            logger.error("%s: on a FIFO queue they come back, their receive counted", why)
            return set()
        left = self._time_left(context, keep)
        if left == 0:
            logger.error("%s, with no time left: they come back, their receive counted", why)
            return set()
        if self._source is None and left is not None and left < CLIENT_SETUP:
            logger.error(
                "%s, with %.3gs left, too little to make the source queue's client: they "
                "come back, their receive counted",
                why,
                left,
            )
            return set()
        sent: set[str] = set()
        (outcome,) = await self.in_time([self._requeue(messages, sent)], context, keep)
        if outcome is not None:
            logger.error(
                "%s, and the source queue could not take back those on their last receive "
                "(%s): they come back, their receive counted",
                why,
                outcome,
            )
        if sent:
            logger.error(
                "%s: %d record(s) on their last receive sent back to the queue as new "
                "messages (visible in %ds) instead of being dead-lettered",
                why,
                len(sent),
                self._requeue_delay(),
            )
        return sent

    def _requeue_delay(self) -> int:
        """Seconds a copy waits in the queue: a startup failing at once must not turn
        into a loop of receives (SQS allows at most 900)."""
        return min(900, math.ceil(self.config.retry_delay_max))

    async def _requeue(self, messages: list[Message], sent: set[str]) -> None:
        """Send back a copy of each record on its last receive; add its id to ``sent``."""
        arn = str(messages[0].token.get("eventSourceARN", ""))
        client = await self._source_client()
        queue = self._source_queue
        if queue is None or queue[0] != arn:
            found = await client.get_queue_url(QueueName=_queue_name(arn), **_owner(arn))
            url = found["QueueUrl"]
            queue = self._source_queue = (arn, url, await self._last_attempt(client, url))
        _, url, last = queue
        for m in messages:
            if last is not None and m.attempt >= last:
                copy = _copy(m.token)
                await client.send_message(QueueUrl=url, DelaySeconds=self._requeue_delay(), **copy)
                sent.add(m.id)

    async def _last_attempt(self, client: Any, url: str) -> int | None:
        """The receive count on which a failure dead-letters a record, if any."""
        found = await client.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
        redrive = found.get("Attributes", {}).get("RedrivePolicy")
        limits = []
        if redrive:
            limits.append(int(json.loads(redrive)["maxReceiveCount"]))
        if self.dead_letter_address is not None:
            limits.append(self.config.max_attempts)
        return min(limits) if limits else None

    async def _source_client(self) -> Any:
        """An SQS client from the function's environment, for the source queue."""
        source = self._source
        if source is None:
            source = _sqs_transport()
            try:
                await source.connect()
            except BaseException:
                await source.close()
                raise
            self._source = source
        return source.client  # type: ignore[attr-defined]

    async def _dead_letter_all(
        self, source: str, dead: list[DeadLetter], fifo: bool, context: LambdaContext | None
    ) -> list[str]:
        """Send ``dead`` to the dead-letter queue at once, within the invocation's time;
        the ids whose send failed or did not end in time. FIFO: a group's dead letters go
        one after another and stop at the first that fails, since the rest of the group
        comes back behind it (sent already, they would be dead-lettered twice, and ahead
        of it)."""

        if not dead:
            return []

        async def send(d: DeadLetter) -> None:
            m = d.message
            sqs = m.bindings["sqs"]
            binding: dict[str, Any] = {"attribute_types": sqs["attribute_types"]}
            if str(self.dead_letter_address).endswith(".fifo"):
                binding["message_group_id"] = sqs.get("message_group_id") or "dead-letters"
                binding["message_deduplication_id"] = m.id
            await self.dead_letter(source, m, d.reason, {"sqs": binding})

        sent: set[str] = set()

        async def send_in_order(lane: list[DeadLetter]) -> None:
            for d in lane:
                await send(d)
                sent.add(d.message.id)

        lanes = _lanes(dead) if fifo else [[d] for d in dead]
        outcomes = await self.in_time([send_in_order(lane) for lane in lanes], context)
        unsent = []
        for lane, outcome in zip(lanes, outcomes, strict=True):
            for d in lane:
                if d.message.id in sent:
                    continue
                logger.error(
                    "record %s: not dead-lettered to %r (%s); failing it so SQS redelivers it",
                    d.message.id,
                    self.dead_letter_address,
                    outcome,
                )
                unsent.append(d.message.id)
        if len(unsent) < len(dead):
            logger.warning(
                "%d record(s) dead-lettered to %r",
                len(dead) - len(unsent),
                self.dead_letter_address,
            )
        return unsent

    @staticmethod
    def _records(event: Any) -> list[Message]:
        """The messages of an SQS event (their content mapped as the SQS server does)."""
        return [m for m, _ in SqsHandler._parse(event)]

    @staticmethod
    def _parse(event: Any) -> list[tuple[Message, str | None]]:
        if not isinstance(event, Mapping) or not isinstance(event.get("Records"), list):
            raise MalformedEvent("not an SQS event: expected an object with a 'Records' list")
        parsed = []
        sources = set()
        for i, record in enumerate(event["Records"]):
            mapped = _mapped(record, i)
            if record.get("eventSource") not in (None, "aws:sqs"):
                source = record.get("eventSource")
                raise MalformedEvent(f"Records[{i}] is not from SQS ({source!r})")
            sources.add(record.get("eventSourceARN"))
            parsed.append(mapped)
        if len(sources) > 1:
            raise MalformedEvent("records of one SQS event come from more than one queue")
        if len({m.id for m, _ in parsed}) != len(parsed):
            raise MalformedEvent("an SQS event repeats a messageId")
        return parsed


def _sqs_transport() -> Transport:
    """An SQS server sending only, set up from the function's environment (region,
    credentials, endpoint), as AWS's own clients are."""
    cls = load("sqs")
    return cls([], build(cls.options, {"endpoint_url": "aws"}))


def _owner(arn: str) -> dict[str, str]:
    """GetQueueUrl's owner parameter from a queue ARN (``arn:aws:sqs:region:account:name``):
    the queue may belong to another account than the function."""
    parts = arn.split(":")
    return {"QueueOwnerAWSAccountId": parts[4]} if len(parts) == 6 and parts[4] else {}


def _copy(record: Mapping[str, Any]) -> dict[str, Any]:
    """SendMessage parameters that make the message of ``record`` again, as it arrived."""
    params: dict[str, Any] = {"MessageBody": record["body"]}
    attributes = {}
    for name, a in (record.get("messageAttributes") or {}).items():
        value: dict[str, Any] = {"DataType": str(a.get("dataType", "String"))}
        if a.get("binaryValue") is not None:
            value["BinaryValue"] = binascii.a2b_base64(a["binaryValue"])
        else:
            value["StringValue"] = str(a.get("stringValue", ""))
        attributes[name] = value
    if attributes:
        params["MessageAttributes"] = attributes
    group = (record.get("attributes") or {}).get("MessageGroupId")
    if group:  # a fair queue's tenant
        params["MessageGroupId"] = group
    return params


def _is_fifo(m: Message) -> bool:
    """Whether ``m`` comes from a FIFO queue: its name ends in ``.fifo``, as SQS requires.

    Not from ``MessageGroupId``: standard queues carry it too (fair queues), and there a
    group's failure must not fail the records after it.
    """
    return _queue_name(str(m.token.get("eventSourceARN", ""))).endswith(".fifo")


def _lanes(dead: list[DeadLetter]) -> list[list[DeadLetter]]:
    """FIFO: the dead letters of each message group, in their order."""
    lanes: dict[Any, list[DeadLetter]] = {}
    for d in dead:
        lanes.setdefault(d.message.bindings["sqs"].get("message_group_id"), []).append(d)
    return list(lanes.values())


def _stop_groups(records: list[Message], failed: set[str]) -> set[str]:
    """FIFO: every record after a group's first failure fails too, keeping the order."""
    blocked = held_behind(
        records, lambda m: m.id in failed, lambda m: m.bindings["sqs"].get("message_group_id")
    )
    return failed | {m.id for m in records if id(m) in blocked}
