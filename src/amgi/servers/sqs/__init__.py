"""Amazon SQS server, on aiobotocore.

How AMGI maps onto SQS:

===================  ==================================================================
address              a queue name (``orders``, ``orders.fifo``); URLs are looked up once
fetch                long-polling ReceiveMessage (up to 10 messages), ``receivers`` calls
                     in flight per queue; an empty short poll (wait time 0) waits 1 s
batch                the messages of one receive; on a FIFO queue, those of one group
ordering key         none on standard queues; ``(queue, MessageGroupId)`` on FIFO queues
attempt              the broker's ``ApproximateReceiveCount``
ack                  DeleteMessageBatch, one call per 10 messages
nack (retry)         ChangeMessageVisibilityBatch to the runtime's delay (native redelivery),
                     cut to the 12 hours SQS hides a message for from its receive
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
close                messages received and not settled are made visible again at once
                     (the long polls in flight awaited first: cut off, one would take them)
crash                unsettled messages come back when their visibility timeout ends
refused              a receive, a delete or a dead letter the credentials may not make
                     (AccessDenied) ends the run; what it left is visible again at close
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
import math
import uuid
from collections.abc import Sequence
from typing import Any, Final

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.servers.kit import Refreshed, await_answers, redact_client_logs
from amgi.servers.sqs._client import (
    _LEASE_LANDING,
    DEPTH_EVERY,
    SqsClient,
    SqsSendError,
    _Held,
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
    Retry,
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


def _retry_delays(
    queue: _Queue, retry: Sequence[Retry], taken: dict[str, _Held | None]
) -> list[tuple[str, float]]:
    """The visibility timeout that delays each retry: its delay in whole seconds, cut to
    the time SQS still lets the message be hidden for (12 hours from its receive; SQS
    refuses a change past that, and the message came back after the visibility timeout)."""
    entries: list[tuple[str, float]] = []
    cut = 0
    for r in retry:
        seconds = math.ceil(r.delay)
        held = taken.get(r.message.token)
        if held is not None and seconds > held.time_left():
            seconds = held.time_left()
            cut += 1
        entries.append((r.message.token, seconds))
    if cut:
        logger.warning(
            "SQS hides a message for at most 12 hours from its receive: %d retry delay(s) "
            "on %r cut to the time left",
            cut,
            queue.name,
        )
    return entries


_RELEASE_TIMEOUT: Final = 5.0
"""Seconds the close gives SQS to make the unsettled messages visible (all queues at once)."""

_CANCELLED_WAIT: Final = 1.0
"""Seconds to wait for a cancelled lease extension to end (it takes no time: it sits
in a network read)."""

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
        timeout ended first; with messages to give back they are awaited here first):
        messages they took on the service's side after the cut come back after their
        timeout. Every message received and never settled (handed out or not) is made
        visible again at once."""
        receives, self._receives = self._receives, []
        pending = [r.task for r in receives if not r.task.done()]
        if pending and (self._held or self._undeleted):
            # Cut off here, a poll goes on at the service and would take the messages
            # released below, hiding them for the visibility timeout: they end first
            # (a run a refusal ended has not handed over; a stop has, so none are left).
            logger.info(
                "waiting up to %ds for %d long poll(s) in flight before giving back %d "
                "message(s) (--wait-time)",
                self.config.wait_time,
                len(pending),
                len(self._held) + len(self._undeleted),
            )
            await await_answers(pending, self.config.wait_time)
        for receive in receives:
            receive.task.cancel()
        await asyncio.gather(*(r.task for r in receives), return_exceptions=True)
        # A finished receive put its messages in _held: with the batches the stop left
        # unstarted, none of them reached the app, and they go back now, not after the
        # visibility timeout (up to 12 hours).
        unsettled: dict[str, tuple[_Queue, list[tuple[str, float]]]] = {}
        held_queues = [(h, held.queue) for h, held in self._held.items()]
        for handle, queue in [*held_queues, *self._undeleted.items()]:
            unsettled.setdefault(queue.url, (queue, []))[1].append((handle, 0))
        # The releases must land after an extension on its way (bounded); with none to
        # send, nothing waits for it. Either way no extension outlives the client.
        await self._after_lease(patience=_LEASE_LANDING if unsettled else 0)
        if self._client is not None and unsettled:
            await asyncio.gather(*(self._release(q, e) for q, e in unsettled.values()))
        self._held.clear()
        self._undeleted.clear()
        depths, self._depths = self._depths, None
        if depths is not None:
            await depths.close()
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _release(self, queue: _Queue, entries: list[tuple[str, float]]) -> None:
        """Make the unsettled messages of ``queue`` visible again, within
        :data:`_RELEASE_TIMEOUT` (an endpoint gone would hold the close for botocore's
        retries); a failure is a warning: they come back after the visibility timeout."""
        try:
            async with asyncio.timeout(_RELEASE_TIMEOUT):
                await self._change_visibility(queue, entries)
        except Exception as exc:
            logger.warning(
                "could not make %d unprocessed message(s) of %r visible again (%s): "
                "they come back after the visibility timeout",
                len(entries),
                queue.name,
                exc or f"no answer in {_RELEASE_TIMEOUT:g}s",
            )

    # -- queues ----------------------------------------------------------------------

    # -- consuming -------------------------------------------------------------------

    async def fetch(self) -> Sequence[Batch]:
        """Keep ``receivers`` long polls per queue in flight; return what the first bring."""
        if not self._consumed:
            raise ConfigurationError("sqs: no queue to consume (give at least one address)")
        if self._refused is None:
            self._refused = asyncio.get_running_loop().create_future()
        while True:
            self._check_refusal()
            self._fill()
            waits: list[asyncio.Future[Any]] = [self._refused, *(r.task for r in self._receives)]
            await asyncio.wait(waits, return_when="FIRST_COMPLETED")
            self._check_refusal()
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
        taken = {m.token: held.pop(m.token, None) for m in batch.messages}
        acked, retry, dead = settlement.acked, settlement.retry, settlement.dead
        if queue.fifo and retry:
            acked, retry, dead = _stop_group_at_first_failure(batch, settlement)
        uncounted = self._uncounted
        uncounted.release(r.message.id for r in retry if r.uncounted)
        uncounted.forget([*(m.id for m in acked), *(d.message.id for d in dead)])
        steps = []
        if acked:
            steps.append(self._delete_acked(queue, acked))
        if retry:
            steps.append(self._retry(queue, retry, taken))
        if dead:
            steps.append(self._dead_letter(queue, dead))
        results = await asyncio.gather(*steps, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _retry(
        self, queue: _Queue, retry: list[Retry], taken: dict[str, _Held | None]
    ) -> None:
        """Hide each message for its retry delay; one SQS refuses (a stale receipt handle:
        another consumer received or deleted the message) or a failed call is marked not
        scheduled, for the runtime's report."""
        await self._after_lease()  # which may still hold these messages back
        try:
            refused = await self._change_visibility(
                queue, _retry_delays(queue, retry, taken), quiet=True
            )
        except Exception as exc:
            for r in retry:
                r.not_scheduled(f"SQS did not take its delay: {exc}")
            raise
        for r in retry:
            error = refused.get(r.message.token)
            if error is not None:
                r.not_scheduled(f"SQS refused its delay: {error}")

    async def extend(self, batches: Sequence[Batch]) -> None:
        """Push back the visibility timeout of every message the server holds.

        Not only ``batches`` (in the app's hands): batches waiting for a free slot and
        messages a long poll took in the background must not come back meanwhile either.
        A message settled while the extension is on its way is not extended any more:
        SQS refusing it is expected and not reported, and a retry delay or a release at
        close waits for the extension so that it lands last.

        The runtime calls this again a lease interval after it returns, so it waits for
        the extension a quarter of an interval at most: one that hangs (a half-open
        connection, which botocore waits out for its read timeout and retries) must not
        hold the next one back until the messages come back to other consumers. It goes
        on meanwhile, and the next call cancels it if it is still on its way.
        """
        previous = self._lease
        if previous is not None and not previous.done():
            previous.cancel()
            logger.warning(
                "a lease extension on %s got no answer within %gs: sending a new one",
                self.config.endpoint_url or "AWS",
                self.lease_interval,
            )
            await asyncio.wait([previous], timeout=_CANCELLED_WAIT)
        by_queue: dict[str, tuple[_Queue, list[tuple[str, float]]]] = {}
        timeout = self.config.visibility_timeout
        for handle, held in list(self._held.items()):
            seconds = min(timeout, held.time_left())
            if seconds < timeout and not held.cut:
                held.cut = True
                logger.warning(
                    "a message of %r has been held for almost 12 hours, the most SQS hides "
                    "a message for: it is visible again in %ds and may be delivered twice",
                    held.queue.name,
                    seconds,
                )
            if seconds >= 1:  # 0 would make it visible at once
                entry = by_queue.setdefault(held.queue.url, (held.queue, []))
                entry[1].append((handle, seconds))
        if not by_queue:
            return
        lease = self._lease = asyncio.ensure_future(self._extend_all(list(by_queue.values())))
        assert self.lease_interval is not None
        await asyncio.wait([lease], timeout=self.lease_interval / 4)
        if lease.done() and self._lease is lease:
            self._lease = None

    async def _extend_all(self, queues: list[tuple[_Queue, list[tuple[str, float]]]]) -> None:
        """One extension: every queue's at once; a failure is logged here, since the
        caller may have returned before it comes."""
        results = await asyncio.gather(
            *(self._change_visibility(q, e, lease=True) for q, e in queues),
            return_exceptions=True,
        )
        for (queue, entries), result in zip(queues, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning(
                    "extending the lease of %d message(s) of %r failed: %s",
                    len(entries),
                    queue.name,
                    result,
                )

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
