"""AMQP 0-9-1 server (RabbitMQ), on the aiormq client.

How AMGI maps onto AMQP:

=================  ==================================================================
address            a queue name; ``message.send`` publishes to ``exchange`` (default:
                   the default exchange) with the address as routing key; a copy
                   (retry, dead letter, replay) keeps the exchange and routing key
                   its message came by (``amgi-original-*`` entries, :mod:`._codec`)
consume            ``basic.consume`` on one channel per queue with ``basic.qos(prefetch)``;
                   deliveries are buffered until the runtime fetches them
batch              the deliveries on hand, up to ``batch_size``, after ``linger``
ordering key       the queue: batches of one queue run one after another
ack                one ``basic.ack(multiple=True)`` up to the highest delivery tag below
                   which every delivery of the queue's channel is settled (each queue
                   settles on its own)
nack (retry)       republished (confirmed) to ``<queue>.retry.<ms>``, a queue with that
                   message TTL whose dead-letter target is the queue, attempt + 1 in the
                   ``amgi-attempt`` header; then the original is acked
nack (dead)        republished (confirmed) to ``dead_letter_exchange`` with the queue as
                   routing key (bound to ``<queue>.dead-letter``) and the reason header;
                   unroutable or no exchange: both declared again, tried once more
refused copy       a retry the broker refuses (its retry queue exists with another
                   TTL, access refused ...) is dead-lettered instead; one it cannot take
                   for now (no confirm in time, a nack, a channel closed over another
                   copy) stays unacked and is tried again with backoff, dead-lettered
                   once refused for ``retry_refused_for``; a refused dead letter stays
                   unacked and is tried again with backoff in the background
                   (``amgi.servers.kit.move_aside``)
attempt            the ``amgi-attempt`` header (our retries), plus the broker's
                   ``x-delivery-count`` on a quorum queue's redeliveries (handed back by a
                   consumer that died, closed or requeued): ``counts_deliveries``; put
                   right by stable id for deliveries dropped unseen (quorum: one less)
                   and held on a channel the broker closed (classic: one more)
                   (:mod:`._recount`)
message id         a hash of the ``message-id`` property (if set), headers and body, the
                   same on every delivery (the crash ledger bounds a message that kills
                   the process on classic queues too); ``#2`` ... tells identical
                   messages of one batch apart
send               ``basic.publish`` with publisher confirms, mandatory by default
connection loss    the connection or a consuming channel: log the broker's reason,
                   reconnect with backoff and consume again on new channels (not after
                   ``hand_over``); batches of the old channels are not acked (the broker
                   redelivers them); each connect and answer bounded by ``connect_timeout``
dead letters       list: ``basic.get`` from ``<queue>.dead-letter``, put back unacked;
(CLI)              replay: republished (confirmed) to the queue, then acked off it
=================  ==================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Sequence

from amgi.servers.amqp._client import (
    COPY_ROOM,
    LARGE,
    AmqpClient,
    AmqpSendError,
    Publisher,
    _Channel,
    _check_confirm,
    _check_queue_name,
    _header_overflow,
    _refused_another,
    _reply_text,
    _url_login,
)
from amgi.servers.amqp._codec import (
    delivery_bindings,
    headers_to_table,
    publish_properties,
    table_to_headers,
    unique_ids,
)
from amgi.servers.amqp._dead_letters import DeadLetters
from amgi.servers.amqp._moves import COMES_BACK, Moves
from amgi.servers.amqp._recount import base_id
from amgi.servers.amqp.options import AmqpOptions
from amgi.servers.kit import mask_url, unmoved
from amgi.transport import Batch, Bindings, HeaderList, Message, Settlement, Transport

__all__ = [
    "AmqpOptions",
    "AmqpSendError",
    "AmqpTransport",
    "delivery_bindings",
    "headers_to_table",
    "publish_properties",
    "table_to_headers",
]

logger = logging.getLogger("amgi.servers.amqp")

_CANCEL_TIMEOUT = 5.0
"""Seconds a ``basic.cancel`` at the stop may take."""

# -- the transport ------------------------------------------------------------------------


def _check_user_id(user_id: str | None, url: str) -> None:
    """RabbitMQ closes the channel over a ``user-id`` property other than the user the
    connection logged in as: refuse it here (unless the login is not the URL's, e.g.
    ``auth=external``, where the user is the certificate's)."""
    if user_id is None:
        return
    login = _url_login(url)
    if login is not None and user_id != login:
        raise ValueError(f"userId {user_id!r} is not the user this server logs in as ({login!r})")


class AmqpTransport(Moves, DeadLetters, AmqpClient, Transport):
    """The AMGI transport of an AMQP 0-9-1 broker (RabbitMQ); moves nacked messages aside
    (:mod:`._moves`), lists and replays dead letters (:mod:`._dead_letters`)."""

    name = "amqp"
    options = AmqpOptions
    send_error = AmqpSendError
    requires = ("aiormq",)
    extra = "amqp"
    stable_ids = True
    """Ids hash the message-id property, headers and body: the same on every delivery."""

    def __init__(self, addresses: Sequence[str], options: AmqpOptions | None = None) -> None:
        super().__init__(addresses, options or AmqpOptions())
        self._init_client()
        self._init_moves()
        self.counts_deliveries = self.config.queue_type == "quorum"
        """Quorum queues count every delivery (``x-delivery-count``), crashes included;
        classic queues only flag a redelivery, so there the crash ledger bounds a loop."""

    def ledger_namespace(self) -> str:
        """The broker and virtual host (the URL without its password)."""
        return f"amqp {mask_url(self.config.url)}"

    # -- lifecycle ------------------------------------------------------------------------

    def check(self) -> None:
        """The options, then the addresses: queue names of 1 to 243 bytes (their
        ``<queue>.dead-letter`` queue needs a name of at most 255 bytes too)."""
        super().check()
        for address in self.addresses:
            _check_queue_name(address)

    async def connect(self) -> None:
        self.check()
        self._closed = False
        self._handed_over = False
        self._init_moves()
        await self._open()
        self._supervisor = asyncio.create_task(self._supervise(), name="amgi-amqp-reconnect")

    async def close(self) -> None:
        self._closed = True
        await self._close_moves()  # their messages stay unacked
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        self._ready.clear()
        self._consumers = {}
        self._publishers = {}
        self._buffer.clear()
        await self._close_connection()

    # -- consuming ------------------------------------------------------------------------

    async def fetch(self) -> Sequence[Batch]:
        size = self.config.batch_size
        buffer = self._buffer
        while True:
            await self._wait_for(1, None)
            if self.config.linger > 0:
                await self._wait_for(size, self.config.linger)
            if buffer:
                break
        return self._take(size)

    def _take(self, size: int) -> list[Batch]:
        """Up to ``size`` buffered deliveries, one batch per queue."""
        buffer = self._buffer
        grouped: dict[str, list[Message]] = {}
        for _ in range(min(size, len(buffer))):
            queue, delivered = buffer.popleft()
            grouped.setdefault(queue, []).append(self._hand_out(queue, delivered))
        return [  # the context: the channel that delivered them
            Batch(queue, unique_ids(msgs), key=queue, context=self._consumers.get(queue))
            for queue, msgs in grouped.items()
        ]

    async def hand_over(self) -> Sequence[Batch]:
        """On a quorum queue, where a delivery handed back counts as an attempt: cancel
        the consumers (``basic.cancel``: nothing more is delivered), then return every
        delivery received so far, for the runtime to process before it stops. On a
        classic queue nothing (they go back uncounted at close, which is quicker). With
        ``passive`` the queues' type is not known (``queue_type`` is for declaring):
        they may be quorum queues, so hand over."""
        if not (self.counts_deliveries or self.config.passive) or self._closed:
            return []
        self._handed_over = True
        try:  # a reconnect consuming meanwhile stops at its next queue
            async with asyncio.timeout(_CANCEL_TIMEOUT), self._consuming:
                pass
        except TimeoutError:
            logger.debug("amqp: a reconnect's basic.consume did not end in time")
        for consumer in list(self._consumers.values()):
            try:
                async with asyncio.timeout(_CANCEL_TIMEOUT):
                    await consumer.channel.basic_cancel(consumer.tag)
            except Exception as exc:  # the channel is gone: its deliveries go back anyway
                logger.debug("amqp: cancelling the consumer of %r failed: %s", consumer.queue, exc)
        batches: list[Batch] = []
        while self._buffer:
            batches += self._take(self.config.batch_size)
        return batches

    # -- settling -------------------------------------------------------------------------

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        consumer: _Channel | None = batch.context
        if consumer is None or self._gone(consumer):
            # The channel is gone: the broker redelivers every message of the batch. A
            # quorum queue counts that return: for a message acked, or handed back
            # before the application had it, it is no attempt. (Unless the loss counted
            # the channel's messages already: the broker closed it over them.)
            if consumer is not None and not consumer.accounted:
                unseen = (r.message for r in settlement.retry if r.uncounted)
                self._recount.dropped(base_id(m) for m in (*settlement.acked, *unseen))
            for r in settlement.retry:
                r.not_scheduled(COMES_BACK)
            for d in settlement.dead:
                d.not_stored(COMES_BACK)
            return
        for m in batch.messages:  # out of the application's hands
            consumer.held.pop(m.token.delivery.delivery_tag, None)

        if settlement.retry or settlement.dead:
            since = time.monotonic()
            stranded = await self._move(consumer, settlement, lambda: True, since)
            if stranded and not self._lost(consumer):
                # Tried again in the background: the queue's later batches go on (their
                # acks wait behind this batch's delivery tags, the watermark sees to it).
                move = functools.partial(
                    self._move_later, batch, consumer, unmoved(settlement, stranded), since
                )
                self._moves.schedule(0, move)
                return
            self._drop_unconfirmed(stranded)  # the channel closed: no next try
        await self._ack_batch(batch, consumer)

    async def _move_later(
        self, batch: Batch, consumer: _Channel, left: Settlement, since: float
    ) -> None:
        stranded = await self._move(consumer, left, lambda: self._lost(consumer), since)
        self._drop_unconfirmed(stranded)  # the channel closed: the broker redelivers them
        if stranded:  # (the runtime reported these messages kept, to be tried again)
            logger.warning(
                "amqp: the channel of %r closed before %d nacked message(s) were moved to a "
                "retry or the dead letters: the broker delivers them again",
                consumer.queue,
                len(stranded),
            )
        else:
            await self._ack_batch(batch, consumer)

    async def _ack_batch(self, batch: Batch, consumer: _Channel) -> None:
        if self._gone(consumer):
            return
        self._recount.forget(batch.messages)
        mark = consumer.acked.settle(m.token.delivery.delivery_tag for m in batch.messages)
        if mark is None:
            return
        with contextlib.suppress(Exception):  # channel lost: the broker redelivers them
            await consumer.channel.basic_ack(mark, multiple=True)

    # -- publishing -----------------------------------------------------------------------

    async def publish(
        self,
        address: str,
        headers: HeaderList,
        payload: bytes | None,
        bindings: Bindings,
    ) -> None:
        from aiormq import exceptions as amqp_errors

        binding = bindings.get("amqp") or {}
        exchange = binding.get("exchange", self.config.exchange)
        routing_key = binding.get("routingKey", address)
        for what, name in (("exchange", exchange), ("routing key", routing_key)):
            if type(name) is not str or (len(name) > 63 and len(name.encode()) > 255):
                shown = f"{len(name.encode())} bytes" if type(name) is str else repr(name)
                raise AmqpSendError(
                    f"amqp: cannot send to {address!r}: the {what} must be a str of at most "
                    f"255 bytes (UTF-8), not {shown:.60}"
                )
        try:
            properties = publish_properties(headers, binding)
            _check_user_id(binding.get("userId"), self.config.url)
            mandatory = binding.get("mandatory", True)
            if type(mandatory) is not bool:
                raise ValueError(f"mandatory must be a bool, not {type(mandatory).__name__}")
        except (TypeError, ValueError) as exc:
            raise AmqpSendError(f"amqp: bad amqp bindings for {address!r}: {exc}") from None
        where = f"exchange {exchange!r}" if exchange else "the default exchange"
        size = len(payload or b"")
        if self._max_size is not None and size > self._max_size:
            raise AmqpSendError(
                f"amqp: cannot publish to {where}: message size {size} is larger than the "
                f"broker's max size {self._max_size} (from its refusal of an earlier one)"
            )
        try:
            if exchange and exchange not in self._exchanges:
                await self._channel()  # connected, or one clear error
                refused = await self._probe_exchange(exchange)
                if refused is not None:
                    raise AmqpSendError(f"amqp: cannot publish to {where}: {refused}")
            kind: Publisher = "large" if size >= LARGE else "sends"
            for again in (False, True):
                channel = await self._channel(kind)
                overflow = _header_overflow(channel, properties, COPY_ROOM)
                if overflow is not None:
                    raise AmqpSendError(f"amqp: cannot publish to {where}: {overflow}")
                try:
                    result = await self._publish(
                        channel,
                        payload or b"",
                        properties,
                        exchange=exchange,
                        routing_key=routing_key,
                        mandatory=mandatory,
                        timeout=self.config.confirm_timeout,
                    )
                    break
                except (amqp_errors.ChannelClosed, amqp_errors.ChannelInvalidStateError) as exc:
                    # Closed over another send: this one was not refused, so it goes out
                    # once more on a new channel (unconfirmed: at least once).
                    if again or not _refused_another(exc, exchange, size):
                        if isinstance(exc, amqp_errors.ChannelNotFoundEntity):
                            self._exchanges.discard(exchange)  # deleted since the probe
                        self._learn_limit(exc)
                        raise
        except amqp_errors.PublishError:
            raise AmqpSendError(
                f"amqp: message to {where} with routing key {routing_key!r} is unroutable "
                "(no queue bound)"
            ) from None
        except amqp_errors.ChannelNotFoundEntity as exc:
            raise AmqpSendError(f"amqp: cannot publish to {where}: {_reply_text(exc)}") from None
        except TimeoutError:
            raise AmqpSendError(f"amqp: no publish confirm from the broker for {where}") from None
        except AmqpSendError:
            raise
        except (amqp_errors.AMQPError, amqp_errors.ChannelInvalidStateError, OSError) as exc:
            raise AmqpSendError(
                f"amqp: publishing to {where} failed: {exc or type(exc).__name__}"
            ) from None
        try:
            _check_confirm(result)
        except AmqpSendError as exc:
            raise AmqpSendError(f"amqp: publishing to {where} failed: {exc}") from None
