"""Amazon SQS server, on aiobotocore.

How AMGI maps onto SQS:

===================  ==================================================================
address              a queue name (``orders``, ``orders.fifo``); URLs are looked up once
fetch                long-polling ReceiveMessage (up to 10 messages), ``receivers`` calls
                     in flight per queue
batch                the messages of one receive; on a FIFO queue, those of one group
ordering key         none on standard queues; ``(queue, MessageGroupId)`` on FIFO queues
attempt              the broker's ``ApproximateReceiveCount``
ack                  DeleteMessageBatch, one call per 10 messages
nack (retry)         ChangeMessageVisibilityBatch to the runtime's delay (native redelivery)
nack (dead)          SendMessage to the queue's redrive target (or ``<queue>-dlq``) with
                     the reason attribute, then delete; the queue's own redrive policy
                     also applies when it triggers first
FIFO failure         the rest of a group after its first retried message is not deleted
                     but made visible again with it, so the group keeps its order
long batches         ChangeMessageVisibilityBatch every third of the visibility timeout
headers              message attributes: String, Number (value as text) and Binary; all
                     packed in one ``amgi-headers`` attribute when SQS cannot carry them
                     one by one (a repeated name, more than ten)
body                 text as is; other payloads base64 with ``amgi-body-encoding``
send                 SendMessage; bindings ``sqs``: message_group_id,
                     message_deduplication_id, delay_seconds, attribute_types
close / crash        unsettled messages come back when their visibility timeout ends
===================  ==================================================================

Credentials come from the standard AWS chain (environment, profile, instance role) and
are never logged. The pure mapping functions here are shared with the Lambda adapter
(:mod:`amgi.serverless`), so a message looks the same to an app on either side.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from amgi.errors import BrokerUnavailable, ConfigurationError, SendError
from amgi.transport import (
    DEAD_LETTER_REASON_HEADER,
    ORIGINAL_ADDRESS_HEADER,
    Batch,
    Bindings,
    DeadLetter,
    HeaderList,
    Message,
    Retry,
    Settlement,
    StoredDeadLetter,
    Transport,
)

SQSClient = Any
"""The aiobotocore SQS client (untyped: the library ships no stubs)."""

__all__ = [
    "BODY_ENCODING_ATTRIBUTE",
    "PACKED_HEADERS_ATTRIBUTE",
    "SqsOptions",
    "SqsSendError",
    "SqsTransport",
    "decode_body",
    "encode_body",
    "headers_from_attributes",
    "headers_to_attributes",
    "message_bindings",
    "pack_headers",
    "unpack_headers",
]

logger = logging.getLogger("amgi.servers.sqs")

BODY_ENCODING_ATTRIBUTE: Final = "amgi-body-encoding"
"""Message attribute marking a body that is not the payload's text: base64, empty, none."""
PACKED_HEADERS_ATTRIBUTE: Final = "amgi-headers"
"""Binary message attribute carrying every header when they do not fit SQS attributes
(a name repeats, a name SQS refuses, more than fit): length-prefixed name/value pairs."""
MAX_ATTRIBUTES: Final = 10
"""SQS takes at most this many message attributes per message."""
AWS_DEFAULT_ENDPOINT: Final = ("", "aws")
"""``--endpoint-url`` values that mean AWS's own endpoint (or ``AWS_ENDPOINT_URL_SQS``)."""

_MAX_BATCH: Final = 10
_MAX_VISIBILITY: Final = 43200
_ATTRIBUTE_FIELDS: Final = frozenset({"DataType", "StringValue", "BinaryValue"})
_MISSING_QUEUE_CODES: Final = frozenset(
    {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
)
_CREDENTIAL_CODES: Final = frozenset(
    {
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "InvalidSecurity",
        "AccessDenied",
        "AccessDeniedException",
        "ExpiredToken",
        "MissingAuthenticationToken",
    }
)
# Characters SQS accepts in a body or String attribute (the XML 1.0 character set).
_NOT_SQS_TEXT: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ATTRIBUTE_NAME: Final = re.compile(r"[A-Za-z0-9_\-.]{1,256}")
_XML_ERROR_CODE: Final = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")


class SqsSendError(SendError):
    """SQS did not take a ``message.send``."""


# -- the message mapping, shared with the Lambda adapter ---------------------------------


def encode_body(payload: bytes | None) -> tuple[str, str | None]:
    """The SQS body for ``payload`` and the body encoding to mark it with (None: text)."""
    if payload is None:
        return "-", "none"
    if not payload:
        return "-", "empty"
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and not _NOT_SQS_TEXT.search(text):
        return text, None
    return base64.b64encode(payload).decode("ascii"), "base64"


def decode_body(body: str, encoding: str | None) -> bytes | None:
    """The payload of an SQS body written by :func:`encode_body` (or by anyone else)."""
    if encoding is None:
        return body.encode("utf-8")
    if encoding == "base64":
        return base64.b64decode(body)
    if encoding == "empty":
        return b""
    if encoding == "none":
        return None
    raise ValueError(f"unknown {BODY_ENCODING_ATTRIBUTE} {encoding!r}")


def headers_from_attributes(
    attributes: Iterable[tuple[str, str, bytes]],
) -> tuple[HeaderList, str | None, dict[str, str]]:
    """Split ``(name, data type, value)`` message attributes into the app's view.

    Returns the headers, the body encoding (see :func:`decode_body`) and the data type of
    each header (``String``, ``Number``, ``Binary``, possibly with a custom suffix).
    """
    headers: HeaderList = []
    types: dict[str, str] = {}
    encoding: str | None = None
    packed: HeaderList | None = None
    for name, data_type, value in attributes:
        if name == BODY_ENCODING_ATTRIBUTE:
            encoding = value.decode("utf-8", "replace")
        elif name == PACKED_HEADERS_ATTRIBUTE:
            packed = unpack_headers(value)
        else:
            headers.append((name.encode("utf-8"), value))
            types[name] = data_type
    if packed is not None:
        headers = packed + headers
    return headers, encoding, types


def pack_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Headers as one byte string: for each, 4-byte big-endian lengths and the bytes."""
    out = bytearray()
    for name, value in headers:
        out += len(name).to_bytes(4, "big") + name + len(value).to_bytes(4, "big") + value
    return bytes(out)


def unpack_headers(data: bytes) -> HeaderList:
    """The headers :func:`pack_headers` packed; ``ValueError`` if ``data`` is not that."""
    headers: HeaderList = []
    view = memoryview(data)
    i = 0
    while i < len(view):
        pair = []
        for _ in range(2):
            if i + 4 > len(view):
                raise ValueError("truncated packed headers")
            size = int.from_bytes(view[i : i + 4], "big")
            i += 4
            if i + size > len(view):
                raise ValueError("truncated packed headers")
            pair.append(bytes(view[i : i + size]))
            i += size
        headers.append((pair[0], pair[1]))
    return headers


def headers_to_attributes(
    headers: Iterable[tuple[bytes, bytes]],
    types: Mapping[str, str] | None = None,
    body_encoding: str | None = None,
) -> dict[str, dict[str, Any]]:
    """SQS ``MessageAttributes`` for ``headers`` (and the body encoding, if any).

    Each header becomes one attribute: String when its value is SQS text, otherwise
    Binary; ``types`` may name another data type per header (e.g. ``{"count": "Number"}``).
    Headers SQS cannot carry that way (a repeated or invalid name, more than ten) travel
    together in the :data:`PACKED_HEADERS_ATTRIBUTE` attribute instead, unchanged.
    """
    pairs = list(headers)
    attributes = _native_attributes(pairs, types or {})
    if attributes is None or len(attributes) + (body_encoding is not None) > MAX_ATTRIBUTES:
        attributes = {
            PACKED_HEADERS_ATTRIBUTE: {"DataType": "Binary", "BinaryValue": pack_headers(pairs)}
        }
    if body_encoding is not None:
        attributes[BODY_ENCODING_ATTRIBUTE] = {"DataType": "String", "StringValue": body_encoding}
    return attributes


def _native_attributes(
    headers: list[tuple[bytes, bytes]], types: Mapping[str, str]
) -> dict[str, dict[str, Any]] | None:
    """One attribute per header, or None when SQS attributes cannot carry them as they are."""
    attributes: dict[str, dict[str, Any]] = {}
    for raw_name, value in headers:
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if (
            name in attributes
            or not _ATTRIBUTE_NAME.fullmatch(name)
            or name.startswith((".", "AWS.", "Amazon.", "amgi-headers", "amgi-body"))
            or name.endswith(".")
            or ".." in name
        ):
            return None
        data_type = types.get(name)
        text: str | None
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        is_text = text is not None and not _NOT_SQS_TEXT.search(text)
        if data_type is None:
            data_type = "String" if is_text else "Binary"
        if data_type.startswith("Binary"):
            attributes[name] = {"DataType": data_type, "BinaryValue": value}
        elif is_text:
            attributes[name] = {"DataType": data_type, "StringValue": text}
        else:
            raise ValueError(f"header {name!r} of type {data_type} is not valid SQS text")
    return attributes


def message_bindings(
    message_id: str, system: Mapping[str, str], types: Mapping[str, str]
) -> dict[str, Any]:
    """The ``sqs`` bindings of a received message (``system`` and ``types`` are kept, not
    copied: pass mappings the message may own)."""
    binding: dict[str, Any] = {
        "message_id": message_id,
        "attributes": system,
        "attribute_types": types,
    }
    for key, attribute in _SYSTEM_BINDINGS:
        if attribute in system:
            binding[key] = system[attribute]
    return binding


_SYSTEM_BINDINGS: Final = (
    ("message_group_id", "MessageGroupId"),
    ("message_deduplication_id", "MessageDeduplicationId"),
    ("sequence_number", "SequenceNumber"),
)


def _api_attributes(raw: Mapping[str, Any]) -> list[tuple[str, str, bytes]]:
    """``(name, data type, value)`` of the MessageAttributes of an SQS API message."""
    out = []
    for name, attribute in raw.items():
        data_type = attribute.get("DataType", "String")
        if "BinaryValue" in attribute:
            value = bytes(attribute["BinaryValue"])
        else:
            value = str(attribute.get("StringValue", "")).encode("utf-8")
        out.append((name, data_type, value))
    return out


def _message(raw: Mapping[str, Any]) -> Message:
    system = raw.get("Attributes") or {}
    headers, encoding, types = headers_from_attributes(
        _api_attributes(raw.get("MessageAttributes") or {})
    )
    try:
        payload = decode_body(raw["Body"], encoding)
    except ValueError as exc:
        # Not ours to judge: hand the app the body as it is.
        logger.warning("message %s: %s; delivering the raw body", raw["MessageId"], exc)
        payload = raw["Body"].encode("utf-8")
    return Message(
        id=raw["MessageId"],
        headers=headers,
        payload=payload,
        bindings={"sqs": message_bindings(raw["MessageId"], system, types)},
        attempt=max(1, int(system.get("ApproximateReceiveCount", "1"))),
        token=raw["ReceiptHandle"],
    )


# -- the transport -----------------------------------------------------------------------


@dataclass(slots=True)
class SqsOptions:
    """Options of the SQS server."""

    endpoint_url: str = field(
        default="http://127.0.0.1:5000",
        metadata={"help": "SQS endpoint; '' or 'aws' for AWS's own (or AWS_ENDPOINT_URL_SQS)"},
    )
    region: str | None = field(
        default=None,
        metadata={"help": "AWS region (default: AWS_REGION, the profile, else us-east-1)"},
    )
    profile: str | None = field(
        default=None, metadata={"help": "AWS profile for credentials (default: the standard chain)"}
    )
    wait_time: int = field(
        default=20, metadata={"help": "long-poll seconds per ReceiveMessage (0-20)"}
    )
    max_messages: int = field(default=10, metadata={"help": "messages per receive (1-10)"})
    receivers: int = field(default=2, metadata={"help": "receive calls in flight per queue"})
    visibility_timeout: int = field(
        default=30,
        metadata={"help": "seconds a received message stays hidden; extended while in flight"},
    )
    dead_letter_suffix: str = field(
        default="-dlq",
        metadata={"help": "dead-letter queue name suffix for queues without a redrive policy"},
    )
    connect_timeout: float = field(
        default=5.0, metadata={"help": "seconds to wait for a connection to the endpoint"}
    )


@dataclass(slots=True, eq=False)
class _Queue:
    """What the transport knows about one queue, looked up once."""

    name: str
    url: str
    fifo: bool
    content_deduplication: bool
    redrive_target: str | None  # the ARN of the queue's dead-letter queue, if any


@dataclass(slots=True, eq=False)
class _Receive:
    """One ReceiveMessage call in flight for a queue."""

    queue: _Queue
    task: asyncio.Task[list[dict[str, Any]]]


class SqsTransport(Transport):
    """The AMGI transport of Amazon SQS (and services speaking its API)."""

    name = "sqs"
    options = SqsOptions
    send_error = SqsSendError
    requires = ("aiobotocore",)
    extra = "sqs"

    def __init__(self, addresses: Sequence[str], options: SqsOptions | None = None) -> None:
        super().__init__(addresses, options or SqsOptions())
        self.config: SqsOptions
        self.lease_interval = max(1.0, self.config.visibility_timeout / 3)
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: SQSClient | None = None
        self._queues: dict[str, _Queue] = {}
        self._consumed: list[_Queue] = []
        self._receives: list[_Receive] = []

    # -- connection ------------------------------------------------------------------

    async def connect(self) -> None:
        """Create the client and look up every consumed queue (clear errors if it cannot)."""
        self._check_options()
        from aiobotocore.config import AioConfig
        from aiobotocore.session import AioSession
        from botocore.exceptions import BotoCoreError, ProfileNotFound

        c = self.config
        try:
            session = AioSession(profile=c.profile)
            region = c.region or session.get_config_variable("region") or "us-east-1"
        except ProfileNotFound:
            raise ConfigurationError(f"sqs: AWS profile {c.profile!r} not found") from None
        endpoint = None if c.endpoint_url in AWS_DEFAULT_ENDPOINT else c.endpoint_url
        config = AioConfig(
            connect_timeout=c.connect_timeout,
            read_timeout=c.wait_time + 15,
            retries={"mode": "standard", "max_attempts": 3},
            max_pool_connections=max(10, c.receivers * len(self.addresses) + 10),
        )
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                session.create_client(
                    "sqs", region_name=region, endpoint_url=endpoint, config=config
                )
            )
        except ProfileNotFound:
            await stack.aclose()
            raise ConfigurationError(f"sqs: AWS profile {c.profile!r} not found") from None
        except (BotoCoreError, ValueError) as exc:
            await stack.aclose()
            raise ConfigurationError(f"sqs: cannot create a client: {exc}") from None
        self._stack = stack
        self._consumed = []
        try:
            for address in self.addresses:
                self._consumed.append(await self._queue(address, create=False))
        except BaseException:
            await self.close()
            raise

    def _check_options(self) -> None:
        c = self.config
        if not 0 <= c.wait_time <= 20:
            raise ConfigurationError("sqs: wait_time must be 0 to 20 seconds")
        if not 1 <= c.max_messages <= _MAX_BATCH:
            raise ConfigurationError("sqs: max_messages must be 1 to 10")
        if c.receivers < 1:
            raise ConfigurationError("sqs: receivers must be at least 1")
        if not 0 <= c.visibility_timeout <= _MAX_VISIBILITY:
            raise ConfigurationError("sqs: visibility_timeout must be 0 to 43200 seconds")
        for address in self.addresses:
            if not address:
                raise ConfigurationError("sqs: an address must be a queue name")

    @property
    def client(self) -> SQSClient:
        """The aiobotocore SQS client (after :meth:`connect`)."""
        if self._client is None:
            raise BrokerUnavailable("sqs: not connected")
        return self._client

    async def close(self) -> None:
        """Cancel receives in flight; messages they took come back after their timeout."""
        receives, self._receives = self._receives, []
        for receive in receives:
            receive.task.cancel()
        results = await asyncio.gather(*(r.task for r in receives), return_exceptions=True)
        # Messages received but never handed out: make them visible again at once.
        unclaimed: dict[str, tuple[_Queue, list[str]]] = {}
        for receive, result in zip(receives, results, strict=True):
            if isinstance(result, list) and result:
                entry = unclaimed.setdefault(receive.queue.url, (receive.queue, []))
                entry[1].extend(m["ReceiptHandle"] for m in result)
        if self._client is not None:
            for queue, handles in unclaimed.values():
                with contextlib.suppress(Exception):
                    await self._change_visibility(queue, [(h, 0) for h in handles])
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    # -- queues ----------------------------------------------------------------------

    async def _queue(self, name: str, *, create: bool, fifo: bool | None = None) -> _Queue:
        """Look up ``name`` once (URL and attributes); raise clear errors for bad input."""
        queue = self._queues.get(name)
        if queue is not None:
            return queue
        client = self.client
        try:
            try:
                url = (await client.get_queue_url(QueueName=name))["QueueUrl"]
            except Exception as exc:
                if not (create and _error_code(exc) in _MISSING_QUEUE_CODES):
                    raise
                attributes = {"FifoQueue": "true"} if fifo else {}
                url = (await client.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"]
                logger.info("created SQS queue %r", name)
            found = (
                await client.get_queue_attributes(
                    QueueUrl=url,
                    AttributeNames=["FifoQueue", "ContentBasedDeduplication", "RedrivePolicy"],
                )
            ).get("Attributes", {})
        except Exception as exc:
            raise _connect_error(exc, name, self.config.endpoint_url) from None
        redrive = found.get("RedrivePolicy")
        queue = _Queue(
            name=name,
            url=url,
            fifo=found.get("FifoQueue") == "true" or name.endswith(".fifo"),
            content_deduplication=found.get("ContentBasedDeduplication") == "true",
            redrive_target=json.loads(redrive).get("deadLetterTargetArn") if redrive else None,
        )
        self._queues[name] = queue
        return queue

    async def _dead_letter_queue(self, queue: _Queue) -> _Queue:
        """The queue's redrive target, else ``<name><suffix>`` (created when missing)."""
        if queue.redrive_target:
            name = queue.redrive_target.rsplit(":", 1)[-1]
            return await self._queue(name, create=False)
        suffix = self.config.dead_letter_suffix
        if queue.fifo:
            name = queue.name.removesuffix(".fifo") + suffix + ".fifo"
        else:
            name = queue.name + suffix
        return await self._queue(name, create=True, fifo=queue.fifo)

    # -- consuming -------------------------------------------------------------------

    async def fetch(self) -> Sequence[Batch]:
        """Keep ``receivers`` long polls per queue in flight; return what the first bring."""
        if not self._consumed:
            raise ConfigurationError("sqs: no queue to consume (give at least one address)")
        while True:
            self._fill()
            await asyncio.wait([r.task for r in self._receives], return_when="FIRST_COMPLETED")
            batches: list[Batch] = []
            error: BaseException | None = None
            still: list[_Receive] = []
            for receive in self._receives:
                if not receive.task.done():
                    still.append(receive)
                    continue
                exc = receive.task.exception()
                if exc is not None:
                    error = exc
                    continue
                batches.extend(self._batches(receive.queue, receive.task.result()))
            self._receives = still
            if batches:
                return batches
            if error is not None:
                raise error

    def _fill(self) -> None:
        per_queue: dict[str, int] = {}
        for receive in self._receives:
            per_queue[receive.queue.url] = per_queue.get(receive.queue.url, 0) + 1
        for queue in self._consumed:
            for _ in range(self.config.receivers - per_queue.get(queue.url, 0)):
                task = asyncio.create_task(self._receive(queue), name=f"amgi-sqs-{queue.name}")
                self._receives.append(_Receive(queue, task))

    async def _receive(self, queue: _Queue) -> list[dict[str, Any]]:
        c = self.config
        try:
            response = await self.client.receive_message(
                QueueUrl=queue.url,
                MaxNumberOfMessages=c.max_messages,
                WaitTimeSeconds=c.wait_time,
                VisibilityTimeout=c.visibility_timeout,
                MessageSystemAttributeNames=["All"],
                MessageAttributeNames=["All"],
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if _error_code(exc) in _MISSING_QUEUE_CODES:
                raise ConfigurationError(f"sqs: queue {queue.name!r} no longer exists") from None
            raise BrokerUnavailable(f"sqs: receive from {queue.name!r} failed: {exc}") from exc
        messages: list[dict[str, Any]] = response.get("Messages", [])
        return messages

    def _batches(self, queue: _Queue, raw: list[dict[str, Any]]) -> list[Batch]:
        if not raw:
            return []
        messages = [_message(m) for m in raw]
        if not queue.fifo:
            return [Batch(queue.name, messages, None, queue)]
        groups: dict[str, list[Message]] = {}
        for m in messages:
            group = m.bindings["sqs"].get("message_group_id", "")
            groups.setdefault(group, []).append(m)
        return [Batch(queue.name, ms, (queue.name, g), queue) for g, ms in groups.items()]

    # -- settling --------------------------------------------------------------------

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        """Delete acked, delay retried, dead-letter dead: concurrently, 10 per call."""
        queue: _Queue = batch.context
        acked, retry, dead = settlement.acked, settlement.retry, settlement.dead
        if queue.fifo and retry:
            acked, retry, dead = _stop_group_at_first_failure(batch, settlement)
        steps = []
        if acked:
            steps.append(self._delete(queue, [m.token for m in acked]))
        if retry:
            steps.append(
                self._change_visibility(queue, [(r.message.token, r.delay) for r in retry])
            )
        if dead:
            steps.append(self._dead_letter(queue, dead))
        results = await asyncio.gather(*steps, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def extend(self, batches: Sequence[Batch]) -> None:
        """Push back the visibility timeout of every message still in flight."""
        by_queue: dict[str, tuple[_Queue, list[tuple[str, float]]]] = {}
        timeout = self.config.visibility_timeout
        for batch in batches:
            queue: _Queue = batch.context
            entry = by_queue.setdefault(queue.url, (queue, []))
            entry[1].extend((m.token, timeout) for m in batch.messages)
        await asyncio.gather(*(self._change_visibility(q, e) for q, e in by_queue.values()))

    async def _delete(self, queue: _Queue, handles: list[str]) -> None:
        async def one(chunk: list[str]) -> None:
            response = await self.client.delete_message_batch(
                QueueUrl=queue.url,
                Entries=[{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)],
            )
            _log_failed(response, "delete", queue)

        await asyncio.gather(*(one(c) for c in _chunks(handles)))

    async def _change_visibility(self, queue: _Queue, entries: list[tuple[str, float]]) -> None:
        async def one(chunk: list[tuple[str, float]]) -> None:
            response = await self.client.change_message_visibility_batch(
                QueueUrl=queue.url,
                Entries=[
                    {
                        "Id": str(i),
                        "ReceiptHandle": handle,
                        "VisibilityTimeout": min(_MAX_VISIBILITY, math.ceil(delay)),
                    }
                    for i, (handle, delay) in enumerate(chunk)
                ],
            )
            _log_failed(response, "change the visibility of", queue)

        await asyncio.gather(*(one(c) for c in _chunks(entries)))

    async def _dead_letter(self, queue: _Queue, dead: list[DeadLetter]) -> None:
        """Send each message to the dead-letter queue with its reason, then delete it."""
        target = await self._dead_letter_queue(queue)

        async def send(d: DeadLetter) -> str:
            m = d.message
            body, encoding = encode_body(m.payload)
            attributes = _dead_letter_attributes(m, queue.name, d.reason, encoding)
            params: dict[str, Any] = {
                "QueueUrl": target.url,
                "MessageBody": body,
                "MessageAttributes": attributes,
            }
            if target.fifo:
                sqs = m.bindings.get("sqs", {})
                params["MessageGroupId"] = sqs.get("message_group_id") or "dead-letters"
                params["MessageDeduplicationId"] = m.id
            await self.client.send_message(**params)
            token: str = m.token
            return token

        sent = await asyncio.gather(*(send(d) for d in dead), return_exceptions=True)
        handles = [h for h in sent if isinstance(h, str)]
        if handles:
            await self._delete(queue, handles)
        failures = [e for e in sent if isinstance(e, BaseException)]
        if failures:
            raise BrokerUnavailable(
                f"sqs: {len(failures)} dead letter(s) of {queue.name!r} not sent to "
                f"{target.name!r} ({failures[0]}); they will be redelivered"
            )

    # -- dead letters: the redrive target or <queue><suffix> ------------------------------

    async def _existing_dead_letter_queue(self, address: str) -> tuple[_Queue, _Queue]:
        queue = await self._queue(address, create=False)
        if queue.redrive_target:
            name = queue.redrive_target.rsplit(":", 1)[-1]
        elif queue.fifo:
            name = queue.name.removesuffix(".fifo") + self.config.dead_letter_suffix + ".fifo"
        else:
            name = queue.name + self.config.dead_letter_suffix
        return queue, await self._queue(name, create=False)

    async def _take_dead(self, dlq: _Queue, limit: int, hold: float) -> list[dict[str, Any]]:
        """Receive up to ``limit`` dead letters, hidden for ``hold`` seconds (what a listing
        or replay that dies holds comes back after that)."""
        taken: list[dict[str, Any]] = []
        while len(taken) < limit:
            response = await self.client.receive_message(
                QueueUrl=dlq.url,
                MaxNumberOfMessages=min(_MAX_BATCH, limit - len(taken)),
                WaitTimeSeconds=1,
                VisibilityTimeout=int(hold),
                MessageSystemAttributeNames=["All"],
                MessageAttributeNames=["All"],
            )
            got = response.get("Messages", [])
            if not got:
                break
            taken += got
        return taken

    async def list_dead_letters(self, address: str, limit: int) -> list[StoredDeadLetter]:
        """Received (hidden for a moment), then made visible again at once."""
        _, dlq = await self._existing_dead_letter_queue(address)
        taken = await self._take_dead(dlq, limit, self.config.visibility_timeout)
        if taken:
            await self._change_visibility(dlq, [(m["ReceiptHandle"], 0) for m in taken])
        out = []
        for raw in taken:
            m = _message(raw)
            headers = [
                (n, v)
                for n, v in m.headers
                if n not in (DEAD_LETTER_REASON_HEADER, ORIGINAL_ADDRESS_HEADER)
            ]
            reason = dict(m.headers).get(DEAD_LETTER_REASON_HEADER, b"").decode()
            sent = (raw.get("Attributes") or {}).get("SentTimestamp")
            out.append(
                StoredDeadLetter(
                    m.id,
                    address,
                    headers,
                    m.payload,
                    {},
                    0,
                    reason,
                    int(sent) / 1000 if sent else None,
                )
            )
        return out

    async def replay_dead_letters(self, address: str, limit: int) -> int:
        """Send each back to the queue (body and attributes as they were, less AMGI's
        reason and origin), then delete it from the dead-letter queue."""
        queue, dlq = await self._existing_dead_letter_queue(address)
        moved = 0
        while moved < limit:
            chunk = await self._take_dead(
                dlq, min(_MAX_BATCH, limit - moved), self.config.visibility_timeout
            )
            if not chunk:
                break
            await asyncio.gather(*(self._send_back(queue, raw) for raw in chunk))
            await self._delete(dlq, [raw["ReceiptHandle"] for raw in chunk])
            moved += len(chunk)
        return moved

    async def _send_back(self, queue: _Queue, raw: dict[str, Any]) -> None:
        dropped = {DEAD_LETTER_REASON_HEADER.decode(), ORIGINAL_ADDRESS_HEADER.decode()}
        attributes = {
            name: {k: v for k, v in value.items() if k in _ATTRIBUTE_FIELDS}
            for name, value in (raw.get("MessageAttributes") or {}).items()
            if name not in dropped
        }
        params: dict[str, Any] = {"QueueUrl": queue.url, "MessageBody": raw["Body"]}
        if attributes:
            params["MessageAttributes"] = attributes
        if queue.fifo:
            system = raw.get("Attributes") or {}
            params["MessageGroupId"] = system.get("MessageGroupId") or "dead-letters"
            params["MessageDeduplicationId"] = raw["MessageId"]
        try:
            await self.client.send_message(**params)
        except Exception as exc:
            raise SqsSendError(f"sqs: could not send back to {queue.name!r}: {exc}") from exc

    # -- sending ---------------------------------------------------------------------

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        """SendMessage to queue ``address``; raise :class:`SqsSendError` if SQS refused it."""
        sqs = bindings.get("sqs") or {}
        body, encoding = encode_body(payload)
        try:
            attributes = headers_to_attributes(headers, sqs.get("attribute_types"), encoding)
        except ValueError as exc:
            raise SqsSendError(f"sqs: cannot send to {address!r}: {exc}") from None
        try:
            queue = await self._queue(address, create=False)
        except (ConfigurationError, BrokerUnavailable) as exc:
            raise SqsSendError(str(exc)) from None
        params: dict[str, Any] = {"QueueUrl": queue.url, "MessageBody": body}
        if attributes:
            params["MessageAttributes"] = attributes
        if sqs.get("delay_seconds") is not None:
            params["DelaySeconds"] = int(sqs["delay_seconds"])
        group = sqs.get("message_group_id")
        dedup = sqs.get("message_deduplication_id")
        if queue.fifo:
            group = group or "default"
            if dedup is None and not queue.content_deduplication:
                dedup = uuid.uuid4().hex
        if group is not None:
            params["MessageGroupId"] = str(group)
        if dedup is not None:
            params["MessageDeduplicationId"] = str(dedup)
        try:
            await self.client.send_message(**params)
        except Exception as exc:
            raise SqsSendError(f"sqs: could not send to {address!r}: {exc}") from exc


def _stop_group_at_first_failure(
    batch: Batch, settlement: Settlement
) -> tuple[list[Message], list[Retry], list[DeadLetter]]:
    """FIFO: hold back everything after a group's first retried message, with it."""
    retries = {id(r.message): r for r in settlement.retry}
    acked_ids = {id(m) for m in settlement.acked}
    deads = {id(d.message): d for d in settlement.dead}
    acked: list[Message] = []
    retry: list[Retry] = []
    dead: list[DeadLetter] = []
    held: Retry | None = None
    for m in batch.messages:
        key = id(m)
        if held is not None:
            retry.append(Retry(m, f"held behind {held.message.id} (FIFO group)", held.delay))
        elif key in retries:
            held = retries[key]
            retry.append(held)
        elif key in acked_ids:
            acked.append(m)
        elif key in deads:
            dead.append(deads[key])
    return acked, retry, dead


def _dead_letter_attributes(
    m: Message, source: str, reason: str, body_encoding: str | None
) -> dict[str, dict[str, Any]]:
    """The original headers (with their data types), the reason and the source queue."""
    types = m.bindings.get("sqs", {}).get("attribute_types", {})
    headers = [
        *m.headers,
        (DEAD_LETTER_REASON_HEADER, reason.encode("utf-8", "replace")),
        (ORIGINAL_ADDRESS_HEADER, source.encode("utf-8")),
    ]
    return headers_to_attributes(headers, types, body_encoding)


def _chunks(items: list[Any]) -> list[list[Any]]:
    return [items[i : i + _MAX_BATCH] for i in range(0, len(items), _MAX_BATCH)]


def _log_failed(response: Mapping[str, Any], action: str, queue: _Queue) -> None:
    failed = response.get("Failed") or []
    if failed:
        first = failed[0]
        logger.warning(
            "could not %s %d message(s) of %r: %s %s (they will be redelivered)",
            action,
            len(failed),
            queue.name,
            first.get("Code"),
            first.get("Message", ""),
        )


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _rejected_credentials(exc: BaseException, code: str) -> str | None:
    """The reason an endpoint refused the request's credentials, or None if it did not;
    ``code`` is the exception's :func:`_error_code`.

    A service that answers the JSON protocol in XML (some SQS stand-ins) leaves botocore
    with only the HTTP status as the code; the XML's own code is then read from the text.
    """
    if code in _CREDENTIAL_CODES:
        return code
    response = getattr(exc, "response", None)
    status = (
        response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(response, dict)
        else None
    )
    if status != 403 and code != "403":
        return None
    embedded = _XML_ERROR_CODE.search(str(exc))
    return embedded.group(1) if embedded else "HTTP 403"


def _connect_error(exc: Exception, queue: str, endpoint: str) -> Exception:
    """One clear error for a failed queue lookup."""
    from botocore.exceptions import (
        ConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    where = endpoint or "AWS"
    code = _error_code(exc)
    if code in _MISSING_QUEUE_CODES:
        return ConfigurationError(f"sqs: queue {queue!r} does not exist at {where}")
    rejected = _rejected_credentials(exc, code)
    if rejected is not None:
        return BrokerUnavailable(f"sqs: {where} rejected the AWS credentials ({rejected})")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return BrokerUnavailable(
            "sqs: no usable AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "or a profile)"
        )
    if isinstance(exc, ConnectionError):
        return BrokerUnavailable(f"sqs: cannot reach the SQS endpoint {where}: {exc}")
    if code:
        return BrokerUnavailable(f"sqs: looking up queue {queue!r} failed: {code}: {exc}")
    return BrokerUnavailable(f"sqs: looking up queue {queue!r} failed: {exc}")
