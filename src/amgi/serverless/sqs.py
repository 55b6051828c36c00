"""AWS Lambda with an SQS event source.

How an SQS event maps onto AMGI:

=====================  ================================================================
event ``Records``      one batch, one application call (address: the queue name)
record                 a message mapped as the SQS server maps it (same headers, payload,
                       ``sqs`` bindings); attempt: ``ApproximateReceiveCount``
ack                    the record is not reported: Lambda deletes it
nack / unsettled       ``batchItemFailures`` (partial batch response): SQS redelivers it
                       after the visibility timeout; the queue's redrive policy dead-letters
body md5 mismatch      reported as a failure without reaching the application
FIFO queue             after a group's first failure the rest of that group fails too
deadline               records not settled before the invocation's remaining time (less
                       ``deadline_margin``) are reported as failures
malformed event        :class:`MalformedEvent`, nothing processed (the whole batch returns)
=====================  ================================================================

The function's event source mapping must have ``ReportBatchItemFailures`` turned on.
"""

from __future__ import annotations

import binascii
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

from amgi.options import build
from amgi.serverless._adapter import LambdaAdapter, LambdaContext, MalformedEvent, is_object
from amgi.servers import load
from amgi.servers.kit.fifo import held_behind
from amgi.servers.sqs.records import decode_body, headers_from_attributes, message_bindings
from amgi.transport import Batch, Message, Transport

__all__ = ["SqsHandler", "sqs_message"]

logger = logging.getLogger("amgi.serverless")


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

    ``where`` names the record in errors; an int ``i`` stands for ``Records[i]``.
    """
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
        headers, encoding, types = headers_from_attributes(
            _record_attributes(raw_attributes, where)
        )
    else:
        headers, encoding, types = [], None, {}
    if encoding is None:
        payload: bytes | None = body.encode("utf-8")
    else:
        try:
            payload = decode_body(body, encoding)
        except (ValueError, binascii.Error) as exc:
            raise MalformedEvent(f"{_name(where)}: body does not decode: {exc}") from None
    count = system.get("ApproximateReceiveCount", "1")
    try:
        attempt = int(count)
    except (TypeError, ValueError):
        raise MalformedEvent(f"{_name(where)}: ApproximateReceiveCount is not a number") from None
    bindings = {"sqs": message_bindings(message_id, system, types)}
    return Message(message_id, headers, payload, bindings, attempt if attempt > 1 else 1, record)


class SqsHandler(LambdaAdapter):
    """Lambda handler for SQS events: ``handler = SqsHandler(app)``.

    Returns ``{"batchItemFailures": [{"itemIdentifier": id}, ...]}``. ``message.send``
    goes to SQS by default (credentials and region from the function's environment);
    pass ``publisher=`` another transport (e.g. Kafka) to send elsewhere.
    """

    def default_publisher(self, event: Mapping[str, Any]) -> Transport:
        cls = load("sqs")
        return cls([], build(cls.options, {"endpoint_url": "aws"}))

    async def handle(self, event: Any, context: LambdaContext | None = None) -> Any:
        records = self._records(event)
        failed: set[str] = set()
        messages: list[Message] = []
        md5 = hashlib.md5
        for m in records:
            expected = m.token.get("md5OfBody")
            if (
                expected is not None
                and md5(m.token["body"].encode("utf-8"), usedforsecurity=False).hexdigest()
                != expected
            ):
                logger.error("record %s: body md5 does not match md5OfBody; failing it", m.id)
                failed.add(m.id)
            else:
                messages.append(m)
        if messages:
            address = _queue_name(str(messages[0].token.get("eventSourceARN", "")))
            batch = Batch(address, messages)
            (settlement,) = await self.run_batches([batch], event, self._deadline(context))
            failed.update(r.message.id for r in settlement.retry)
            failed.update(d.message.id for d in settlement.dead)
        if failed and any(_is_fifo(m) for m in records):
            failed = _stop_groups(records, failed)
        return {"batchItemFailures": [{"itemIdentifier": m.id} for m in records if m.id in failed]}

    @staticmethod
    def _records(event: Any) -> list[Message]:
        if not isinstance(event, Mapping) or not isinstance(event.get("Records"), list):
            raise MalformedEvent("not an SQS event: expected an object with a 'Records' list")
        messages = []
        sources = set()
        for i, record in enumerate(event["Records"]):
            m = sqs_message(record, i)
            if record.get("eventSource") not in (None, "aws:sqs"):
                source = record.get("eventSource")
                raise MalformedEvent(f"Records[{i}] is not from SQS ({source!r})")
            sources.add(record.get("eventSourceARN"))
            messages.append(m)
        if len(sources) > 1:
            raise MalformedEvent("records of one SQS event come from more than one queue")
        if len({m.id for m in messages}) != len(messages):
            raise MalformedEvent("an SQS event repeats a messageId")
        return messages


def _is_fifo(m: Message) -> bool:
    return "message_group_id" in m.bindings["sqs"]


def _stop_groups(records: list[Message], failed: set[str]) -> set[str]:
    """FIFO: every record after a group's first failure fails too, keeping the order."""
    blocked = held_behind(
        records, lambda m: m.id in failed, lambda m: m.bindings["sqs"].get("message_group_id")
    )
    return failed | {m.id for m in records if id(m) in blocked}
