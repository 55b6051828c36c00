"""The aiobotocore client: queue lookup, receiving, deleting, visibility (private)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from amgi.errors import BrokerUnavailable, ConfigurationError, SendError
from amgi.servers.kit.fifo import held_behind
from amgi.servers.kit.refreshed import Refreshed
from amgi.servers.kit.uncounted import Uncounted
from amgi.servers.sqs.options import SqsOptions
from amgi.servers.sqs.records import (
    _dead_letter_attributes,
    _message,
    encode_body,
)
from amgi.transport import (
    Batch,
    DeadLetter,
    Message,
    Retry,
    Settlement,
)

logger = logging.getLogger("amgi.servers.sqs")

SQSClient = Any
"""The aiobotocore SQS client (untyped: the library ships no stubs)."""

_MAX_BATCH: Final = 10
DEPTH_EVERY: Final = 5.0
"""Seconds between two reads of the queues' depth for metrics (SQS bills each call)."""


_MAX_VISIBILITY: Final = 43200
"""SQS hides a message for at most 12 hours from its receive: it refuses a visibility
change that would end later (not only a value over this)."""

_LIMIT_MARGIN: Final = 10.0
"""Seconds kept short of that limit: the receive's way back and the change's way there."""


_LEASE_LANDING: Final = 5.0
"""Seconds a visibility change waits for the lease extension on its way to land first.
An extension answers in milliseconds (a throttled one in a few seconds); one out longer
is hung, and waiting a lease interval for it (200 s at a 600 s visibility timeout) held
a retry's settlement, and the close past the runtime's shutdown timeout."""

_SHORT_POLL_PAUSE: Final = 1.0
"""Seconds a receiver waits after a short poll (``--wait-time 0``) that brought nothing."""

_DELETE_AGAIN_AFTER: Final = 0.2
"""Seconds before a delete SQS failed on its own side is sent again (once)."""

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


_XML_ERROR_CODE: Final = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")


class SqsSendError(SendError):
    """SQS did not take a ``message.send``."""


class _Rejected(BrokerUnavailable):
    """A queue lookup SQS refused these credentials (``code``: why)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True, eq=False)
class _Queue:
    """What the transport knows about one queue, looked up once."""

    name: str
    url: str
    fifo: bool
    content_deduplication: bool
    redrive_target: str | None  # the ARN of the queue's dead-letter queue, if any


@dataclass(slots=True, eq=False)
class _Held:
    """A message received and not settled yet."""

    queue: _Queue
    since: float
    """``time.monotonic()`` when the receive that took it was sent (SQS's 12 hours start
    at the receive, a little later)."""
    cut: bool = False
    """Its lease was cut to SQS's limit (warned once)."""

    def time_left(self) -> int:
        """Whole seconds SQS still lets it be hidden for."""
        left = _MAX_VISIBILITY - _LIMIT_MARGIN - (time.monotonic() - self.since)
        return max(0, math.floor(left))


@dataclass(slots=True, eq=False)
class _Receive:
    """One ReceiveMessage call in flight for a queue."""

    queue: _Queue
    task: asyncio.Task[list[dict[str, Any]]]


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
    # A batch is one group (Batch.key): everything after its first retry is held back.
    blocked = held_behind(batch.messages, lambda m: id(m) in retries, lambda m: batch.key)
    for m in batch.messages:
        key = id(m)
        if key in blocked:
            held = retries[id(blocked[key])]
            behind = f"held behind {held.message.id} (FIFO group)"
            # Not its failure: the delivery that brings it back uses up no attempt.
            retry.append(Retry(m, behind, held.delay, uncounted=True))
            if key in deads:
                deads[key].not_stored(behind)
        elif key in retries:
            retry.append(retries[key])
        elif key in acked_ids:
            acked.append(m)
        elif key in deads:
            dead.append(deads[key])
    return acked, retry, dead


T = TypeVar("T")
R = TypeVar("R")


async def send_each(
    fifo: bool, send: Callable[[T], Awaitable[R]], items: Sequence[T]
) -> list[R | BaseException]:
    """``send`` each item and return each outcome (its result or exception), in order.

    To a FIFO queue one after another, since SQS orders a group by when each send lands,
    and none after one that failed (it comes back, and would land behind them): the list
    is then shorter than ``items``. To a standard queue all at once."""
    if not fifo:
        return await asyncio.gather(*map(send, items), return_exceptions=True)
    outcomes: list[R | BaseException] = []
    for item in items:
        try:
            outcomes.append(await send(item))
        except Exception as exc:
            outcomes.append(exc)
            break
    return outcomes


def _chunks(items: list[Any]) -> list[list[Any]]:
    return [items[i : i + _MAX_BATCH] for i in range(0, len(items), _MAX_BATCH)]


def _log_failed(failed: list[Mapping[str, Any]], action: str, queue: _Queue) -> None:
    """Warn of the entries of a batch call that SQS refused (its ``Failed`` list)."""
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
        return _Rejected(f"sqs: {where} rejected the AWS credentials ({rejected})", rejected)
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


class SqsClient:
    """The SQS client, the queues looked up, and the long polls in flight."""

    addresses: list[str]
    config: SqsOptions
    lease_interval: float | None

    def _init_client(self) -> None:
        """Set up the state (called by the transport's ``__init__``)."""
        # A third of the timeout, with no floor: a floor of 1 s renewed a 1 s timeout as
        # it ran out, and another consumer took the message while the app had it.
        self.lease_interval = self.config.visibility_timeout / 3
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: SQSClient | None = None
        self._queues: dict[str, _Queue] = {}
        self._consumed: list[_Queue] = []
        self._receives: list[_Receive] = []
        self._uncounted = Uncounted()
        """Receives SQS counted that were no attempt (:class:`Uncounted`)."""
        self._held: dict[str, _Held] = {}
        """Receipt handle -> queue and receive time of every message received and not yet
        settled: in the app's hands, waiting for a free slot, or taken by a long poll not
        yet fetched."""
        self._depths: Refreshed[dict[str, int]] | None = None
        """Per consumed queue, ``ApproximateNumberOfMessages`` (metrics)."""
        self._lease: asyncio.Future[Any] | None = None
        """The lease extension on its way to SQS, if any (``extend``)."""
        self._refusal: ConfigurationError | None = None
        """Why consuming cannot go on: SQS refused these credentials a call settling
        messages (a delete, a dead letter's queue or send)."""
        self._refused: asyncio.Future[None] | None = None
        """Done once ``_refusal`` is set: wakes a fetch waiting for its long polls."""
        self._undeleted: dict[str, _Queue] = {}
        """Receipt handle -> queue of each message a refusal left unsettled (not
        deleted): made visible again at close, with the messages held."""

    async def _queue_count(self, queue: _Queue, attribute: str) -> int:
        """One of SQS's (approximate) counts of ``queue``: ``ApproximateNumberOfMessages``
        (visible), ``...NotVisible`` (in flight) ..."""
        found = await self.client.get_queue_attributes(
            QueueUrl=queue.url, AttributeNames=[attribute]
        )
        return int(found["Attributes"][attribute])

    async def _read_depths(self) -> dict[str, int]:
        """One GetQueueAttributes per consumed queue; a queue that fails is left out."""
        queues = self._consumed
        answers = await asyncio.gather(
            *(self._queue_count(q, "ApproximateNumberOfMessages") for q in queues),
            return_exceptions=True,
        )
        depths: dict[str, int] = {}
        for queue, answer in zip(queues, answers, strict=True):
            if isinstance(answer, BaseException):
                logger.debug("reading the depth of %r failed: %s", queue.name, answer)
                continue
            depths[queue.name] = answer
        return depths

    @property
    def client(self) -> SQSClient:
        """The aiobotocore SQS client (after :meth:`connect`)."""
        if self._client is None:
            raise BrokerUnavailable("sqs: not connected")
        return self._client

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

    async def _dead_letter_queue(self, queue: _Queue, *, create: bool = True) -> _Queue:
        """The queue's redrive target, else ``<name><suffix>`` (created when missing,
        if ``create``)."""
        if queue.redrive_target:
            name = queue.redrive_target.rsplit(":", 1)[-1]
            return await self._queue(name, create=False)
        suffix = self.config.dead_letter_suffix
        if queue.fifo:
            name = queue.name.removesuffix(".fifo") + suffix + ".fifo"
        else:
            name = queue.name + suffix
        return await self._queue(name, create=create, fifo=queue.fifo)

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
        since = time.monotonic()
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
            code = _error_code(exc)
            if code in _MISSING_QUEUE_CODES:
                raise ConfigurationError(f"sqs: queue {queue.name!r} no longer exists") from None
            denied = _rejected_credentials(exc, code)
            if denied is not None:
                # Refused for good (a policy): retried, the run would go on for ever
                # consuming nothing, after one line.
                raise ConfigurationError(
                    f"sqs: {self.config.endpoint_url or 'AWS'} refused these credentials "
                    f"receiving from {queue.name!r} ({denied}): allow sqs:ReceiveMessage on "
                    "the queue"
                ) from None
            raise BrokerUnavailable(f"sqs: receive from {queue.name!r} failed: {exc}") from exc
        messages: list[dict[str, Any]] = response.get("Messages", [])
        for m in messages:
            self._held[m["ReceiptHandle"]] = _Held(queue, since)
        if not messages and not c.wait_time:
            # A short poll answers at once: polled again at once, an idle queue would be
            # asked as fast as the endpoint answers (hundreds a second, each billed).
            await asyncio.sleep(_SHORT_POLL_PAUSE)
        return messages

    def _batches(self, queue: _Queue, raw: list[dict[str, Any]]) -> list[Batch]:
        if not raw:
            return []
        messages = [_message(m) for m in raw]
        for m in messages:
            self._uncounted.correct(m)
        if not queue.fifo:
            return [Batch(queue.name, messages, None, queue)]
        groups: dict[str, list[Message]] = {}
        for m in messages:
            group = m.bindings["sqs"].get("message_group_id", "")
            groups.setdefault(group, []).append(m)
        return [Batch(queue.name, ms, (queue.name, g), queue) for g, ms in groups.items()]

    async def _after_lease(self, patience: float = _LEASE_LANDING) -> None:
        """Wait for the lease extension on its way, if any: a visibility change sent now
        (a retry delay, visible again at close) must land after it, not be undone by it.
        One with no answer after ``patience`` seconds (a lease interval at most) is hung:
        it is cancelled (no new extension does it once the runtime stopped extending)."""
        lease = self._lease
        if lease is not None and not lease.done():
            assert self.lease_interval is not None
            await asyncio.wait([lease], timeout=min(patience, self.lease_interval))
            if not lease.done():
                lease.cancel()
                await asyncio.wait([lease], timeout=1.0)

    async def _delete(self, queue: _Queue, handles: list[str]) -> list[str]:
        """DeleteMessageBatch, 10 per call, concurrently. An entry SQS failed on its own
        side (``SenderFault`` false: InternalError ...) is sent once more, since that acked
        message would be delivered again; what stays refused is warned about, and its
        handle returned (a failed call raises)."""

        async def call(chunk: list[str]) -> dict[str, Mapping[str, Any]]:
            response = await self.client.delete_message_batch(
                QueueUrl=queue.url,
                Entries=[{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)],
            )
            return {chunk[int(f["Id"])]: f for f in response.get("Failed") or []}

        async def one(chunk: list[str]) -> list[str]:
            try:
                failed = await call(chunk)
            except Exception as exc:
                denied = _rejected_credentials(exc, _error_code(exc))
                refusal = (
                    f"the delete of messages of {queue.name!r} ({denied}): every ack would "
                    "fail and its message come back for ever; allow sqs:DeleteMessage on it"
                )
                error = self._refuse(queue, chunk, refusal) if denied is not None else None
                if error is not None:
                    raise error from exc  # its line, not the endpoint's XML
                raise
            again = [h for h, f in failed.items() if f.get("SenderFault") is False]
            if again:
                await asyncio.sleep(_DELETE_AGAIN_AFTER)
                failed = {h: f for h, f in failed.items() if h not in again}
                failed |= await call(again)
            _log_failed(list(failed.values()), "delete", queue)
            return list(failed)

        refused = await asyncio.gather(*(one(c) for c in _chunks(handles)))
        return [h for r in refused for h in r]

    def _refuse(self, queue: _Queue, handles: list[str], refusal: str) -> ConfigurationError | None:
        """SQS refused these credentials a call settling ``handles`` of ``queue``
        (``refusal``: which, and what to allow). Every such settlement would fail the same
        way, and its message come back after each visibility timeout, for ever:
        consuming ends (the next fetch raises), and the messages are made visible again
        at close. Returns the error that says so; None for a queue only read to replay
        dead letters (the CLI reports its own failures)."""
        if queue not in self._consumed:
            return None
        for handle in handles:
            self._undeleted[handle] = queue
        where = self.config.endpoint_url or "AWS"
        error = ConfigurationError(f"sqs: {where} refused these credentials {refusal}")
        if self._refusal is None:
            self._refusal = error
        if self._refused is not None and not self._refused.done():
            self._refused.set_result(None)
        return error

    def _check_refusal(self) -> None:
        """Raise the refusal consuming cannot go on after, if any."""
        if self._refusal is not None:
            raise self._refusal

    async def _delete_acked(self, queue: _Queue, acked: list[Message]) -> None:
        """Delete what the app acked. A message SQS did not delete comes back with a
        receive counted through no fault of its own (an ack must not lead to the dead
        letters): that receive is taken off its attempt when it comes back here."""
        ids = {m.token: m.id for m in acked}
        try:
            refused = await self._delete(queue, list(ids))
        except Exception:
            self._uncounted.release(ids.values())
            raise
        self._uncounted.release(ids[h] for h in refused)

    async def _change_visibility(
        self,
        queue: _Queue,
        entries: list[tuple[str, float]],
        *,
        lease: bool = False,
        quiet: bool = False,
    ) -> dict[str, str]:
        """ChangeMessageVisibilityBatch, 10 entries per call, concurrently; returns why
        SQS refused an entry, by receipt handle (a failed call raises).

        ``lease``: the entries extend held messages; one settled while the call was on its
        way (deleted, or given its retry delay) may be refused, and that is not reported.
        ``quiet``: the caller reports the refusals (no warning here).
        """
        refused: dict[str, str] = {}

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
            failed = response.get("Failed") or []
            if lease:  # a message settled since the call left is refused, as expected
                failed = [f for f in failed if chunk[int(f["Id"])][0] in self._held]
            for f in failed:
                refused[chunk[int(f["Id"])][0]] = f"{f.get('Code')} {f.get('Message', '')}"
            if not quiet:
                _log_failed(failed, "change the visibility of", queue)

        await asyncio.gather(*(one(c) for c in _chunks(entries)))
        return refused

    async def _dead_letter(self, queue: _Queue, dead: list[DeadLetter]) -> None:
        """Send each message to the dead-letter queue with its reason, then delete it.

        A dead-letter queue deleted since it was looked up is looked up again (and
        ``<queue><suffix>`` made again) and takes what it refused; before, its URL stayed
        cached and every dead letter failed until a restart."""
        handles: list[str] = []  # of the messages sent
        try:
            gone = await self._send_dead_letters(queue, dead, handles, last=False)
            if gone:
                await self._send_dead_letters(queue, gone, handles, last=True)
        finally:
            if handles:
                await self._delete(queue, handles)

    async def _send_dead_letters(
        self, queue: _Queue, dead: list[DeadLetter], handles: list[str], *, last: bool
    ) -> list[DeadLetter]:
        """Send ``dead`` to the dead-letter queue of ``queue``; add the receipt handles of
        those sent to ``handles``. Unless ``last``, return those refused because that
        queue no longer exists, forgotten to be looked up again. Mark the others that
        failed not stored, and raise."""
        try:
            target = await self._dead_letter_queue(queue)
        except Exception as exc:
            error: Exception = exc
            if isinstance(exc, _Rejected):
                refusal = (
                    f"the dead-letter queue of {queue.name!r} ({exc.code}): every dead "
                    "letter would fail and its message come back for ever; allow looking it "
                    "up and creating it (sqs:GetQueueUrl, sqs:GetQueueAttributes, "
                    "sqs:CreateQueue), or give the queue a redrive policy"
                )
                error = self._refuse(queue, [d.message.token for d in dead], refusal) or exc
            for d in dead:
                d.not_stored(error)
            raise error from None
        send = functools.partial(self._send_dead_letter, queue, target)
        sent = await send_each(target.fifo, send, dead)
        handles += [h for h in sent if isinstance(h, str)]
        failures = [e for e in sent if isinstance(e, BaseException)]
        if not last and any(_error_code(e) in _MISSING_QUEUE_CODES for e in failures):
            self._queues.pop(target.name, None)
            refused = [d for d, o in zip(dead, sent, strict=False) if not isinstance(o, str)]
            return refused + dead[len(sent) :]  # in order: a FIFO send stops at a failure
        denial = self._refuse_dead_letters(queue, target, dead, sent)
        for d, outcome in zip(dead, sent, strict=False):  # sent may stop short (FIFO)
            if not isinstance(outcome, str):
                d.not_stored(denial or outcome)  # its line, not the endpoint's XML
        for d in dead[len(sent) :]:  # not sent: after the one that failed
            d.not_stored(f"held behind {dead[len(sent) - 1].message.id} (FIFO group)")
        if denial is not None:
            raise denial
        if failures:
            raise BrokerUnavailable(
                f"sqs: {len(failures)} dead letter(s) of {queue.name!r} not sent to "
                f"{target.name!r} ({failures[0]}); they will be redelivered"
            )
        return []

    def _refuse_dead_letters(
        self, queue: _Queue, target: _Queue, dead: list[DeadLetter], sent: list[str | BaseException]
    ) -> ConfigurationError | None:
        """Note the refusal (and return its error) if a send of ``dead`` failed for want
        of permission."""
        for failure in sent:
            if not isinstance(failure, BaseException):
                continue
            denied = _rejected_credentials(failure, _error_code(failure))
            if denied is not None:
                refusal = (
                    f"sending dead letters of {queue.name!r} to {target.name!r} ({denied}): "
                    "every dead letter would fail and its message come back for ever; allow "
                    f"sqs:SendMessage on {target.name!r}"
                )
                unsent = [d for d, o in zip(dead, sent, strict=False) if not isinstance(o, str)]
                unsent += dead[len(sent) :]
                return self._refuse(queue, [d.message.token for d in unsent], refusal)
        return None

    async def _send_dead_letter(self, queue: _Queue, target: _Queue, d: DeadLetter) -> str:
        """Send ``d`` to ``target`` with its reason; its receipt handle in ``queue``."""
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
