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
long batches         ChangeMessageVisibilityBatch every third of the visibility timeout, for
                     every message the server holds: in the app's hands, waiting for a
                     free slot, or taken by a background long poll
headers              message attributes: String, Number (value as text) and Binary; all
                     packed in one ``amgi-headers`` attribute when SQS cannot carry them
                     one by one (a repeated name, an empty value, more than ten)
body                 text as is; other payloads base64 with ``amgi-body-encoding``
send                 SendMessage; bindings ``sqs``: message_group_id,
                     message_deduplication_id, delay_seconds, attribute_types
stop                 the long polls in flight are awaited (at most ``wait_time`` seconds,
                     within the shutdown timeout) and what they bring is processed: a
                     poll cut off would still take messages, hidden for the visibility
                     timeout with one receive counted
close / crash        unsettled messages come back when their visibility timeout ends
backlog (metrics)    ``ApproximateNumberOfMessages`` per queue, read every 5 s by an owned
                     task, once metrics asked for it
dead letters (CLI)   list: received from the dead-letter queue, made visible again at
                     once; replay: sent back (attributes less AMGI's), then deleted; of a
                     shared redrive target only the queue's own (the source ARN or AMGI's
                     original address), the others' made visible again at once
===================  ==================================================================

Credentials come from the standard AWS chain (environment, profile, instance role) and
are never logged. The pure mapping functions here are shared with the Lambda adapter
(:mod:`amgi.serverless`), so a message looks the same to an app on either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.servers.kit import Refreshed, await_answers, redact_client_logs
from amgi.servers.sqs._client import (
    DEPTH_EVERY,
    SqsClient,
    SqsSendError,
    _Queue,
    _Receive,
    _stop_group_at_first_failure,
)
from amgi.servers.sqs._dead_letters import DeadLetters
from amgi.servers.sqs.options import AWS_DEFAULT_ENDPOINT, SqsOptions
from amgi.servers.sqs.records import (
    encode_body,
    headers_to_attributes,
    send_attribute_types,
    send_parameters,
)
from amgi.transport import (
    Batch,
    Bindings,
    HeaderList,
    Settlement,
    Transport,
)

__all__ = ["SqsOptions", "SqsSendError", "SqsTransport"]

logger = logging.getLogger("amgi.servers.sqs")

"""Message attribute marking a body that is not the payload's text: base64, empty, none."""
"""Binary message attribute carrying every header when they do not fit SQS attributes
(a name repeats, a name SQS refuses, more than fit): length-prefixed name/value pairs."""
"""SQS takes at most this many message attributes per message."""
"""``--endpoint-url`` values that mean AWS's own endpoint (or ``AWS_ENDPOINT_URL_SQS``)."""

# Characters SQS accepts in a body or String attribute (the XML 1.0 character set).
# -- the message mapping, shared with the Lambda adapter ---------------------------------


# -- the transport -----------------------------------------------------------------------


_WIRE_LOGGERS = ("botocore.auth", "botocore.endpoint", "aiobotocore.endpoint")
"""The loggers that write signed requests (headers and canonical request) at DEBUG."""


class SqsTransport(DeadLetters, SqsClient, Transport):
    """The AMGI transport of Amazon SQS (and services speaking its API); lists and
    replays dead letters (:mod:`._dead_letters`)."""

    name = "sqs"
    options = SqsOptions
    send_error = SqsSendError
    requires = ("aiobotocore",)
    extra = "sqs"
    stable_ids = True
    """``MessageId`` is the same on every receive: the crash ledger isolates a killer."""
    counts_deliveries = True
    """``ApproximateReceiveCount`` rises on every receive, crashes included."""

    def __init__(self, addresses: Sequence[str], options: SqsOptions | None = None) -> None:
        super().__init__(addresses, options or SqsOptions())
        self._init_client()

    # -- connection ------------------------------------------------------------------

    async def connect(self) -> None:
        """Create the client and look up every consumed queue (clear errors if it cannot)."""
        self.check()
        from aiobotocore.config import AioConfig
        from aiobotocore.session import AioSession
        from botocore.exceptions import BotoCoreError, ProfileNotFound

        c = self.config
        # botocore's DEBUG wire trace writes the session token of temporary credentials.
        redact_client_logs(*_WIRE_LOGGERS)
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
            if self._consumed:
                self._depths = Refreshed("sqs queue depth", DEPTH_EVERY, self._read_depths)
        except BaseException:
            await self.close()
            raise

    def check(self) -> None:
        """The options, then the addresses: non-empty queue names."""
        super().check()
        for address in self.addresses:
            if not address:
                raise ConfigurationError("sqs: an address must be a queue name")

    async def hand_over(self) -> Sequence[Batch]:
        """Wait for the long polls in flight (at most ``wait_time`` seconds and a little),
        then return what they received, for the runtime to process before it stops.

        SQS cannot call a ReceiveMessage off: cut off at the client, it goes on waiting on
        the service's side and the messages it then takes are hidden for the visibility
        timeout, each with one receive counted (``ApproximateReceiveCount``, the attempt):
        enough deploys would dead-letter innocent messages. Cancelled (the shutdown timeout
        ended first), the polls are left to :meth:`close`, which cuts them off as before.
        """
        receives = list(self._receives)
        if not receives:
            return []
        pending = [r.task for r in receives if not r.task.done()]
        if pending:
            logger.info(
                "waiting up to %ds for %d long poll(s) in flight (--wait-time)",
                self.config.wait_time,
                len(pending),
            )
            # SQS answers a poll within its wait time; one still open after that (an
            # unreachable endpoint, its retries) is left to close, which cuts it off.
            await await_answers(pending, self.config.wait_time)
        done = [r for r in receives if r.task.done()]
        self._receives = [r for r in self._receives if r not in done]
        batches: list[Batch] = []
        for receive in done:
            if receive.task.cancelled():
                continue
            exc = receive.task.exception()
            if exc is not None:
                logger.debug("sqs: a long poll in flight at the stop failed: %s", exc)
                continue
            batches.extend(self._batches(receive.queue, receive.task.result()))
        return batches

    async def close(self) -> None:
        """Cancel receives in flight (a stop awaited them in :meth:`hand_over` unless its
        timeout ended first): messages they took come back after their timeout."""
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
            await self._after_lease()
            for queue, handles in unclaimed.values():
                with contextlib.suppress(Exception):
                    await self._change_visibility(queue, [(h, 0) for h in handles])
        self._held.clear()
        depths, self._depths = self._depths, None
        if depths is not None:
            await depths.close()
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    # -- queues ----------------------------------------------------------------------

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

    def backlog(self) -> dict[str, int] | None:
        """Per queue, ``ApproximateNumberOfMessages`` (visible, waiting), re-read every
        ``DEPTH_EVERY`` seconds by a task started on the first call; ``None`` before."""
        return self._depths.get() if self._depths is not None else None

    # -- settling --------------------------------------------------------------------

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        """Delete acked, delay retried, dead-letter dead: concurrently, 10 per call."""
        queue: _Queue = batch.context
        held = self._held
        for m in batch.messages:
            held.pop(m.token, None)
        acked, retry, dead = settlement.acked, settlement.retry, settlement.dead
        if queue.fifo and retry:
            acked, retry, dead = _stop_group_at_first_failure(batch, settlement)
        steps = []
        if acked:
            steps.append(self._delete(queue, [m.token for m in acked]))
        if retry:
            await self._after_lease()  # which may still hold these messages back
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
        """Push back the visibility timeout of every message the server holds.

        Not only ``batches`` (in the app's hands): batches waiting for a free slot and
        messages a long poll took in the background must not come back meanwhile either.
        A message settled while the extension is on its way is not extended any more:
        SQS refusing it is expected and not reported, and a retry delay or a release at
        close waits for the extension so that it lands last.
        """
        by_queue: dict[str, tuple[_Queue, list[tuple[str, float]]]] = {}
        timeout = self.config.visibility_timeout
        for handle, queue in list(self._held.items()):
            entry = by_queue.setdefault(queue.url, (queue, []))
            entry[1].append((handle, timeout))
        lease = self._lease = asyncio.ensure_future(
            asyncio.gather(
                *(self._change_visibility(q, e, lease=True) for q, e in by_queue.values())
            )
        )
        try:
            await lease
        finally:
            if self._lease is lease:
                self._lease = None

    # -- sending ---------------------------------------------------------------------

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        """SendMessage to queue ``address``; raise :class:`SqsSendError` if SQS refused it."""
        sqs = bindings.get("sqs") or {}
        body, encoding = encode_body(payload)
        try:
            # SQS requires a FIFO queue's name (and so its URL) to end in .fifo.
            given = send_parameters(sqs, fifo=address.endswith(".fifo"))
            types = send_attribute_types(sqs)
            attributes = headers_to_attributes(headers, types, encoding)
        except ValueError as exc:
            raise SqsSendError(f"sqs: cannot send to {address!r}: {exc}") from None
        try:
            queue = await self._queue(address, create=False)
        except (ConfigurationError, BrokerUnavailable) as exc:
            raise SqsSendError(str(exc)) from None
        params: dict[str, Any] = {"QueueUrl": queue.url, "MessageBody": body}
        if attributes:
            params["MessageAttributes"] = attributes
        params |= given
        if queue.fifo:
            params.setdefault("MessageGroupId", "default")
            if "MessageDeduplicationId" not in params:
                if not queue.content_deduplication:
                    params["MessageDeduplicationId"] = uuid.uuid4().hex
                elif encoding is not None:
                    # SQS hashes the body alone, which no longer tells payloads apart
                    # (b"", None and "-" are all "-"; base64 text is someone's text).
                    marked = f"{encoding}:{body}".encode()
                    params["MessageDeduplicationId"] = hashlib.sha256(marked).hexdigest()
        try:
            await self.client.send_message(**params)
        except Exception as exc:
            raise SqsSendError(f"sqs: could not send to {address!r}: {exc}") from exc
