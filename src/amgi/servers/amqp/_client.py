"""The aiormq connection: channels, declarations, reconnection, confirms (private)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from amgi.errors import BrokerUnavailable, ConfigurationError, SendError
from amgi.servers.amqp._codec import (
    ORIGIN_KEYS,
    _message,
    broker_counted,
    headers_to_table,
    origin,
)
from amgi.servers.amqp._recount import Recount
from amgi.servers.amqp.options import AmqpOptions
from amgi.servers.kit import (
    Backoff,
    Watermark,
    mask_url,
)
from amgi.transport import HeaderList, Message

if TYPE_CHECKING:
    from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
    from pamqp.commands import Basic

logger = logging.getLogger("amgi.servers.amqp")


_REPORTED_BY_US = (
    "error when creating transport",
    "Unexpected connection close from remote",
    "Cancelling cause reader exited abnormally",
)
"""How aiormq's records begin of a failed connect (ERROR, before it raises) and of a lost
connection (ERROR, then WARNING with a traceback)."""


def _not_reported_by_us(record: logging.LogRecord) -> bool:
    """Whether to keep a record of aiormq's: not one of :data:`_REPORTED_BY_US` about a
    connection of the server's (the startup error, the reconnect warnings and the loss
    warning with the broker's reason say those once, the URL's password masked). The
    connections of the process that are not the server's keep every record."""
    if not str(record.msg).startswith(_REPORTED_BY_US):
        return True
    from amgi.servers.amqp._frames import ours

    return not ours()


logging.getLogger("aiormq.connection").addFilter(_not_reported_by_us)


_RECONNECT_FIRST = 0.1
_CLOSING_POLL = 0.05
"""Seconds between looks at a closing connection while a send waits for the next one."""


class AmqpSendError(SendError):
    """A publish was not confirmed by the broker (unroutable, nacked, connection lost)."""


class _Nacked(AmqpSendError):
    """The broker answered a publish with ``basic.nack`` (a queue full with overflow
    ``reject-publish``, an internal error): it may take the same message later."""


@dataclass(slots=True, eq=False)
class _Channel:
    """The consuming channel of one queue, with its acknowledgement watermark.

    One channel per queue: delivery tags and ``basic.ack(multiple=True)`` are per
    channel, so each queue settles on its own and a slow batch of one never holds back
    the acknowledgements (and the prefetch window) of another.
    """

    channel: AbstractChannel
    queue: str
    acked: Watermark = field(default_factory=lambda: Watermark(first=1))
    """Delivery tags settled (acked, moved aside or rejected): ack up to its high mark."""
    tag: str = ""
    """The consumer tag of its ``basic.consume``."""
    held: dict[int | None, tuple[str, float]] = field(default_factory=dict)
    """The stable ids of the deliveries in the application's hands, by delivery tag,
    with when it took each (``time.monotonic()``)."""
    accounted: bool = False
    """The broker closed the channel and the loss recorded its held deliveries in the
    recount (an attempt each, :meth:`AmqpClient._record_loss`)."""
    cancelled: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    """Done when the broker cancelled the consumer (its queue deleted): the channel stays
    open, so the supervisor watches this too."""

    def on_cancel(self, _frame: object) -> None:
        """aiormq's callback of a ``basic.cancel`` from the broker."""
        if not self.cancelled.done():
            self.cancelled.set_result(None)


_QUEUE_MAX = 255 - len(".dead-letter")
"""The longest queue name consumed, in bytes: its dead-letter queue's name is 255 at most."""


def _check_queue_name(queue: str) -> None:
    """Refuse a name that cannot be a queue of this server (1 to 243 bytes)."""
    if not queue or len(queue.encode()) > _QUEUE_MAX:
        raise ConfigurationError(
            f"amqp: {queue!r:.300} is not a queue name of 1 to {_QUEUE_MAX} bytes "
            f"(at most {_QUEUE_MAX} bytes leaves room for its '.dead-letter' queue)"
        )


def _check_confirm(result: object) -> None:
    from pamqp.commands import Basic

    if not isinstance(result, Basic.Ack):
        raise _Nacked("the broker did not confirm the message (basic.nack)")


@functools.lru_cache(maxsize=16)
def _url_login(url: str) -> str | None:
    """The user ``url`` logs in as (the client's default, ``guest``, without one);
    ``None`` when the login is not a user name (``auth=external``). Parsed once per URL."""
    parsed = urllib.parse.urlsplit(url)
    auth = urllib.parse.parse_qs(parsed.query).get("auth", ["plain"])[0]
    if auth.upper() != "PLAIN":
        return None
    return urllib.parse.unquote(parsed.username or "") or "guest"


async def close_within(channel: AbstractChannel, timeout: float) -> None:
    """Close ``channel`` within ``timeout``, whatever it answers (a broker blocking
    publishers reads nothing of the connection, not even a close)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await channel.close()


def _reply_text(exc: BaseException) -> str:
    frame = exc.args[0] if exc.args else None
    text = getattr(frame, "reply_text", None)
    return str(text) if text else str(exc)


_MAX_KNOWN_EXCHANGES = 1000

_TIMED_OUT = re.compile(r"delivery acknowledgement .* timed out(?:.*?value used: (\d+) ms)?")
"""RabbitMQ's reply as it closes a channel over a delivery unacked for ``consumer_timeout``
(the timeout it used, in ms, when the reply names it)."""

_TIMEOUT_SLACK = 1.0
"""Most seconds between the broker's delivery and the application taking it that still
count a timeout as the application's (a tenth of shorter timeouts)."""

Publisher = Literal["sends", "large", "moves"]
"""The kinds of publishing channel (see :meth:`AmqpClient._channel`)."""

LARGE = 1024 * 1024
"""Body size from which an application's send goes on the ``large`` channel: brokers'
size limits are above it (RabbitMQ's ``max_message_size``: 128 MiB on 3.x, 16 MiB on 4.x)."""

_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")
"""RabbitMQ's refusal of a message over its ``max_message_size``."""


def _refused_another(exc: BaseException, exchange: str, size: int) -> bool:
    """Whether a publish of ``size`` body bytes to ``exchange`` failed only because the
    broker closed its channel over another publish: the channel was closed already, or
    the broker's reply names another exchange (``NOT_FOUND - no exchange 'x'``,
    ``ACCESS_REFUSED - access to exchange 'x' ...``) or a message of another size
    (``message size N is larger than ...``). Any other reply cannot be told apart: no."""
    from aiormq import exceptions as amqp_errors

    if isinstance(exc, amqp_errors.ChannelInvalidStateError):
        return True
    if not isinstance(exc, amqp_errors.ChannelClosed):
        return False
    text = _reply_text(exc)
    too_large = _TOO_LARGE.search(text)
    if too_large is not None:
        return int(too_large[1]) != size
    return "exchange '" in text and f"exchange '{exchange}'" not in text


COPY_ROOM = 1024
"""Bytes of a frame an application's send leaves free, so that its retry and dead-letter
copies, which add headers (attempt, original address, reason), fit in a frame too."""


def _header_room(channel: AbstractChannel, properties: Basic.Properties) -> int:
    """Bytes left in the frame of the content header of ``properties`` on ``channel``
    (negative when it overflows).

    The header (12 bytes, then the properties and headers table) travels in one frame of
    at most the connection's ``frame_max``; the broker answers a larger one by closing
    the whole connection (``FRAME_ERROR``), the consumers' deliveries with it."""
    size = 12 + len(properties.marshal())
    if not properties.message_id:
        size += 33  # aiormq sets one: a length octet and 32 hex digits
    return channel.connection.connection_tune.frame_max - 8 - size  # frame header, end


def _header_overflow(
    channel: AbstractChannel, properties: Basic.Properties, keep: int = 0
) -> str | None:
    """Why the content header of ``properties`` cannot go out on ``channel`` leaving
    ``keep`` bytes of its frame free, or ``None``."""
    room = _header_room(channel, properties) - keep
    if room >= 0:
        return None
    limit = channel.connection.connection_tune.frame_max - 8 - keep
    return (
        f"the headers and properties take {limit - room} bytes, more than one frame of the "
        f"broker holds ({limit} bytes"
        + (f", less {keep} for the headers of a retry or dead letter)" if keep else ")")
    )


def _size_limit(exc: BaseException) -> int | None:
    """The broker's largest message, when ``exc`` is its refusal of a larger one."""
    too_large = _TOO_LARGE.search(_reply_text(exc))
    return int(too_large[2]) if too_large is not None else None


class AmqpClient:
    """The connection, its consuming and publishing channels, and the delivery buffer."""

    addresses: list[str]
    config: AmqpOptions

    def _init_client(self) -> None:
        """Set up the state (called by the transport's ``__init__``)."""
        self._connection: AbstractConnection | None = None
        self._consumers: dict[str, _Channel] = {}
        self._publishers: dict[Publisher, AbstractChannel] = {}
        self._publisher_lock = asyncio.Lock()
        self._generation = 0
        self._buffer: deque[tuple[str, DeliveredMessage]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._want = 1
        self._ready = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._retry_queues: set[str] = set()
        self._exchanges: set[str] = set()
        """Exchanges a passive declare found (:meth:`_probe_exchange`)."""
        self._probe_lock = asyncio.Lock()
        self._max_size: int | None = None
        """The broker's largest message body, once it refused a larger one: a send over
        it fails here instead of closing the channel again (kept until the server
        stops: the refusal itself may have cost the connection, see :meth:`_learn_limit`)."""
        self._closed = False
        self._handed_over = False
        """The consumers were cancelled for a stop: a reconnect consumes no more (what
        it took would go back at the close, counted on a quorum queue)."""
        self._consuming = asyncio.Lock()
        """Held by a (re)connect's ``basic.consume`` loop: a stop's hand-over waits for
        it, so that it cancels every consumer the loop made."""
        self._recount = Recount()
        self._same_id: dict[tuple[int, str | bytes], tuple[asyncio.Lock, list[int]]] = {}
        """A lock and its user count per channel and message id being published there
        (:meth:`_publish`)."""

    async def _open(self) -> None:
        """Connect, declare the topology, open the publisher and start consuming; each
        answer of the broker within ``connect_timeout`` (a socket that accepts and never
        answers, a broker that hangs, waited for ever).

        One connection carries the consumers and the publishing channels. (A broker in a
        memory or disk alarm stops reading a connection that publishes, so a retry copy
        sent then holds the consumers' acks until the alarm clears; a publishing
        connection of its own is the remedy, not taken yet: see docs/servers/amqp.md.)"""
        try:
            async with asyncio.timeout(self.config.connect_timeout) as bound:
                connection = await self._connect()
        except TimeoutError:
            if not bound.expired():
                raise  # not the bound's
            raise self._no_answer("to the connection") from None
        await self._start(connection)
        self._ready.set()

    def _no_answer(self, what: str) -> BrokerUnavailable:
        """The error of a broker that did not answer ``what`` within ``connect_timeout``."""
        return BrokerUnavailable(
            f"amqp: no answer from {mask_url(self.config.url)} {what} within "
            f"{self.config.connect_timeout:g} s"
        )

    async def _start(self, connection: AbstractConnection) -> None:
        """Declare, open the publisher and consume on ``connection`` (closed on failure),
        each answer within ``connect_timeout``."""
        c = self.config
        timeout = c.connect_timeout
        what = "to the opening of a channel"
        try:
            channels = []
            for i, _ in enumerate(self.addresses):
                channel = await connection.channel(publisher_confirms=False, timeout=timeout)
                if i == 0:
                    await self._declare(channel)
                await channel.basic_qos(prefetch_count=c.prefetch, timeout=timeout)
                channels.append(channel)
            self._connection = connection
            self._publishers = {
                "sends": await connection.channel(
                    publisher_confirms=True, on_return_raises=True, timeout=timeout
                )
            }
            async with self._consuming:  # a stop's hand-over waits for the loop
                if self.addresses and not self._handed_over:
                    await self._consume(channels)
        except BaseException as exc:
            self._consumers = {}
            self._publishers = {}
            self._connection = connection
            await self._close_connection()
            if isinstance(exc, TimeoutError):
                raise self._no_answer(what) from None
            raise

    async def _consume(self, channels: list[AbstractChannel]) -> None:
        """``basic.consume`` each queue on its channel, one after another; stop at a
        stop's hand-over (it then cancels the consumers made so far)."""
        timeout = self.config.connect_timeout
        self._generation += 1
        self._buffer.clear()
        self._consumers = {}
        for queue, channel in zip(self.addresses, channels, strict=True):
            if self._handed_over:
                return
            try:
                consumer = self._consumers[queue] = _Channel(channel, queue)
                channel.on_consumer_cancel_callbacks.add(consumer.on_cancel)
                ok = await channel.basic_consume(
                    queue, self._consumer_for(queue, self._generation), timeout=timeout
                )
            except TimeoutError:
                raise self._no_answer(f"to the basic.consume of {queue!r}") from None
            consumer.tag = str(ok.consumer_tag)

    async def _connect(self) -> AbstractConnection:
        """A new connection to the broker, or one clear error."""
        import aiormq
        from aiormq import exceptions as amqp_errors

        from amgi.servers.amqp._frames import install, lenient

        c = self.config
        install()
        try:
            with lenient() as closed:  # the connection's reader reads any content header
                connection = await aiormq.connect(c.url)
        except (amqp_errors.AuthenticationError, amqp_errors.ProbableAuthenticationError):
            raise BrokerUnavailable(
                f"amqp: the broker at {mask_url(c.url)} refused the credentials"
            ) from None
        except (amqp_errors.ConnectionNotAllowed, amqp_errors.InvalidFrameError) as exc:
            # RabbitMQ answers connection.open for a virtual host that does not exist (or
            # that the user may not use) with connection.close, which aiormq reports as
            # an unexpected frame, the reply's text lost.
            refused = "Connection.OpenOk" in str(exc)
            if isinstance(exc, amqp_errors.ConnectionNotAllowed) or refused:
                why = closed.reply  # the broker's reply, which the client's error lost
                raise BrokerUnavailable(
                    f"amqp: access to the virtual host of {mask_url(c.url)} was refused: {why}"
                    if why
                    else f"amqp: access to the virtual host of {mask_url(c.url)} was refused "
                    "(it does not exist, or the user may not use it)"
                ) from None
            raise BrokerUnavailable(f"amqp: cannot connect to {mask_url(c.url)}: {exc}") from None
        except (OSError, amqp_errors.AMQPError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"amqp: cannot connect to {mask_url(c.url)}: {exc or type(exc).__name__}"
            ) from None
        except ValueError as exc:
            raise ConfigurationError(f"amqp: bad url {mask_url(c.url)}: {exc}") from None
        return connection

    async def _declare(self, channel: AbstractChannel) -> None:
        """Declare (or, when passive, check) the queues, exchange, bindings and dead letters."""
        from aiormq import exceptions as amqp_errors

        c = self.config
        timeout = c.connect_timeout
        arguments: dict[str, Any] | None = (
            {"x-queue-type": "quorum"} if c.queue_type == "quorum" else None
        )
        what = ""
        try:
            if c.exchange:
                what = f"exchange {c.exchange!r}"
                await channel.exchange_declare(
                    c.exchange,
                    exchange_type=c.exchange_type,
                    durable=c.durable,
                    passive=c.passive,
                    timeout=timeout,
                )
            for queue in self.addresses:
                what = f"queue {queue!r}"
                await channel.queue_declare(
                    queue,
                    durable=c.durable,
                    passive=c.passive,
                    arguments=arguments,
                    timeout=timeout,
                )
                if c.exchange and not c.passive:
                    for key in c.routing_keys or [queue]:
                        await channel.queue_bind(
                            queue, c.exchange, routing_key=key, timeout=timeout
                        )
            what = f"dead-letter exchange {c.dead_letter_exchange!r}"
            await channel.exchange_declare(
                c.dead_letter_exchange, exchange_type="direct", durable=True, timeout=timeout
            )
            for queue in self.addresses:
                what = f"dead-letter queue {queue + '.dead-letter'!r}"
                await channel.queue_declare(queue + ".dead-letter", durable=True, timeout=timeout)
                await channel.queue_bind(
                    queue + ".dead-letter",
                    c.dead_letter_exchange,
                    routing_key=queue,
                    timeout=timeout,
                )
        except TimeoutError:
            raise self._no_answer(f"about the {what}") from None
        except amqp_errors.ChannelNotFoundEntity:
            raise ConfigurationError(f"amqp: {what} does not exist (passive mode)") from None
        except (
            amqp_errors.ChannelPreconditionFailed,
            amqp_errors.ChannelAccessRefused,
            amqp_errors.ConnectionCommandInvalid,  # an exchange type the broker lacks
        ) as exc:
            raise ConfigurationError(f"amqp: cannot declare {what}: {_reply_text(exc)}") from None

    async def _supervise(self) -> None:
        """Reconnect with backoff whenever the connection or the consuming channel closes."""
        backoff = Backoff(_RECONNECT_FIRST, self.config.reconnect_delay_max)
        loop = asyncio.get_running_loop()
        connected_at = loop.time()
        while True:
            waits: list[asyncio.Future[Any]] = []
            if self._connection is not None:
                waits.append(self._connection.closing)
            consumers = list(self._consumers.values())
            waits.extend(c.channel.closing for c in consumers)
            waits.extend(c.cancelled for c in consumers)
            if waits:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for future in waits:
                    if future.done() and not future.cancelled():
                        future.exception()  # mark retrieved
                gone = [c.queue for c in consumers if c.cancelled.done()]
                if gone:
                    # Consuming again on this connection would need the queue declared
                    # again: a reconnect does both.
                    logger.warning(
                        "amqp: the broker cancelled the consumer of %s (queue deleted?); "
                        "reconnecting",
                        ", ".join(map(repr, gone)),
                    )
                else:
                    logger.warning("amqp: %s; reconnecting", self._record_loss(consumers))
            self._ready.clear()
            self._consumers = {}
            self._publishers = {}
            self._drop_buffer()
            await self._close_connection()
            if loop.time() - connected_at < self.config.reconnect_delay_max:
                # Lost again soon after connecting (a delivery the client cannot read
                # drops the connection each time it comes): wait before the next try.
                logger.warning(
                    "amqp: the connection was lost %.1fs after it was made; next try in %.1fs",
                    loop.time() - connected_at,
                    backoff.delay,
                )
                await backoff.sleep()
            else:
                backoff.reset()
            while True:
                try:
                    await self._open()
                except Exception as exc:
                    known = isinstance(exc, (BrokerUnavailable, ConfigurationError, OSError))
                    logger.warning(
                        "amqp: reconnect failed: %s (next try in %.1fs)",
                        exc if known else repr(exc),
                        backoff.delay,
                    )
                    await backoff.sleep()
                    continue
                logger.info("amqp: reconnected%s", "" if self._handed_over else "; consuming again")
                connected_at = loop.time()
                break

    async def _close_connection(self) -> None:
        """Close the connection (its unacked deliveries go back to the queues)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    def _record_loss(self, consumers: list[_Channel]) -> str:
        """Record the deliveries in the application's hands on a consuming channel the
        broker closed (each counts an attempt, :mod:`._recount`); return what the broker
        said as it closed that channel or the connection."""
        from aiormq import exceptions as amqp_errors

        connection = self._connection
        if connection is not None and connection.closing.done():
            closing = connection.closing
            exc = None if closing.cancelled() else closing.exception()
            return f"lost the connection to the broker ({exc or 'closed'})"
        for consumer in consumers:
            closing = consumer.channel.closing
            if not closing.done() or closing.cancelled():
                continue
            exc = closing.exception()
            if not isinstance(exc, amqp_errors.ChannelClosed) or not exc.args:
                continue
            text = _reply_text(exc)
            why = f"the broker closed the channel of {consumer.queue!r}: {text}"
            consumer.accounted = True
            timed_out = _TIMED_OUT.search(text)
            if timed_out is None:
                self._recount.lost(i for i, _ in consumer.held.values())
            else:
                limit = int(timed_out[1]) / 1000 if timed_out[1] else None
                why += self._record_timeout(consumer, limit)
            return why
        return "lost the connection to the broker"

    def _record_timeout(self, consumer: _Channel, limit: float | None) -> str:
        """Record the deliveries held on ``consumer`` as the broker closed its channel
        over ``consumer_timeout`` (``limit`` seconds, when its reply names it); return
        the explanation for the log.

        The timeout runs from the delivery, and deliveries wait in the buffer behind
        slow calls: only a message the application itself held about that long counts
        an attempt; one that waited comes back uncounted (also on a quorum queue)."""
        now = time.monotonic()
        slack = _TIMEOUT_SLACK if limit is None else min(_TIMEOUT_SLACK, limit / 10)
        slow: list[str] = []
        waited: list[str] = []
        for message_id, taken in consumer.held.values():
            late = limit is None or now - taken >= limit - slack
            (slow if late else waited).append(message_id)
        self._recount.lost(slow)
        self._recount.dropped(waited)
        if slow:
            return (
                " (the application held a message longer than the broker's "
                "consumer_timeout: raise consumer_timeout in rabbitmq.conf, or make calls "
                "shorter with a smaller --batch-size; the messages it held come back, each "
                "at its next attempt)"
            )
        return (
            " (a delivery waited in the server's buffer behind slow calls until the "
            "broker's consumer_timeout ran out: lower --prefetch to what the application "
            "gets through within that time, or raise consumer_timeout in rabbitmq.conf; "
            "the messages come back at the same attempt)"
        )

    def _drop_buffer(self) -> None:
        """Drop the deliveries not handed out (the broker puts them back)."""
        if self._buffer:
            self._recount.dropped(_message(d).id for _, d in self._buffer)
            self._buffer.clear()

    def _hand_out(self, queue: str, delivered: DeliveredMessage) -> Message:
        """The message of a buffered delivery, its attempt put right, recorded as held."""
        counts = self._queues_count()
        message = _message(delivered, counts)
        deliver = cast("Basic.Deliver", delivered.delivery)
        if deliver.redelivered:
            self._recount.correct(message, delivered, broker_counted(delivered, counts))
        consumer = self._consumers.get(queue)
        if consumer is not None:
            consumer.held[deliver.delivery_tag] = (message.id, time.monotonic())
        return message

    def _queues_count(self) -> bool:
        """Whether the queues may count deliveries (``x-delivery-count``): quorum queues,
        and with ``passive`` any (their type is not known). A classic queue counts none:
        the header there is a publisher's, no attempt of this server's."""
        return self.config.queue_type == "quorum" or self.config.passive

    def _consumer_for(self, queue: str, generation: int) -> Any:
        buffer = self._buffer

        async def on_message(delivered: DeliveredMessage) -> None:
            if generation != self._generation:
                # A late delivery of a closed channel: the broker redelivers it.
                self._recount.dropped([_message(delivered).id])
                return
            buffer.append((queue, delivered))
            waiter = self._waiter
            if waiter is not None and len(buffer) >= self._want and not waiter.done():
                waiter.set_result(None)

        return on_message

    async def _wait_for(self, count: int, timeout: float | None) -> None:
        if len(self._buffer) >= count:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiter, self._want = waiter, count
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await waiter
        finally:
            self._waiter = None

    async def _publish(
        self,
        channel: AbstractChannel,
        body: bytes,
        properties: Basic.Properties,
        *,
        exchange: str,
        routing_key: str,
        mandatory: bool,
        timeout: float | None,
    ) -> object:
        """``channel.basic_publish``, one publish of a ``message-id`` at a time on
        ``channel``, all within ``timeout``.

        The client matches a ``basic.return`` to its publish by the message id: of two
        publishes of one id awaiting their confirms, the return of the one that went
        nowhere failed the other, and the returned one was confirmed (reported sent).
        A publish without an id gets a unique one from the client."""
        publish = functools.partial(
            channel.basic_publish,
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=mandatory,
        )
        message_id = properties.message_id
        if not message_id:
            return await publish(timeout=timeout)
        key = (id(channel), message_id)
        lock, users = self._same_id.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            async with asyncio.timeout(timeout):
                await lock.acquire()
            try:
                left = None if timeout is None else max(0.0, timeout - (loop.time() - start))
                return await publish(timeout=left)
            finally:
                lock.release()
        finally:
            users[0] -= 1
            if not users[0]:
                del self._same_id[key]

    async def _confirm(
        self,
        channel: AbstractChannel,
        delivered: DeliveredMessage,
        exchange: str,
        routing_key: str,
        headers: HeaderList,
        *,
        forever: bool = False,
        consumed: bool = True,
    ) -> None:
        """Publish a copy of ``delivered`` and wait for its confirm: up to the
        ``confirm_timeout``, or with ``forever`` until it comes (or the channel closes);
        ``consumed``: see :meth:`_copy_properties`."""
        properties = self._copy_properties(delivered, headers, consumed=consumed)
        overflow = _header_overflow(channel, properties)
        if overflow is not None:
            raise AmqpSendError(f"amqp: {overflow}")
        result = await self._publish(
            channel,
            delivered.body,
            properties,
            exchange=exchange,
            routing_key=routing_key,
            mandatory=True,
            timeout=None if forever else self.config.confirm_timeout,
        )
        _check_confirm(result)

    def _copy_properties(
        self, delivered: DeliveredMessage, headers: HeaderList, *, consumed: bool = True
    ) -> Basic.Properties:
        """The properties of a copy of ``delivered`` (retry, dead letter, replay): the
        values the client could not read go out as they came (:mod:`._frames`).

        The copy keeps the exchange and routing key the message came by when they were
        not the default exchange's (a copy reaches the queue through that one): those of
        ``delivered`` if ``consumed`` (a delivery from the queue, not a dead letter's
        own), else those its table carries."""
        from amgi.servers.amqp._frames import CopyProperties

        props = delivered.header.properties
        table = headers_to_table(headers)
        came_by = origin(delivered)
        if came_by is None and consumed:
            came_by = (
                getattr(delivered.delivery, "exchange", ""),
                getattr(delivered.delivery, "routing_key", ""),
            )
        if came_by is not None and came_by[0]:
            table.update(zip(ORIGIN_KEYS, came_by, strict=True))
        # The broker refuses a user-id other than the connection's (PRECONDITION_FAILED,
        # closing the channel): a message another user published would never move.
        user_id = props.user_id if props.user_id == _url_login(self.config.url) else None
        return CopyProperties(
            content_type=props.content_type,
            content_encoding=props.content_encoding,
            headers=table,
            delivery_mode=2,
            priority=props.priority,
            correlation_id=props.correlation_id,
            reply_to=props.reply_to,
            message_id=props.message_id,
            timestamp=props.timestamp,
            message_type=props.message_type,
            user_id=user_id,
            app_id=props.app_id,
        )

    async def _declare_apart(
        self, what: str, declare: Callable[[AbstractChannel], Awaitable[object]]
    ) -> None:
        """Run ``declare`` on a channel of its own: a refusal closes only that one
        (:class:`AmqpSendError` naming ``what``). No answer within ``confirm_timeout`` (a
        broker blocking the connection) raises ``TimeoutError``, a lost connection the
        client's error."""
        from aiormq import exceptions as amqp_errors

        connection = self._connection
        if connection is None:
            raise AmqpSendError("amqp: not connected to the broker")
        channel: AbstractChannel | None = None
        try:
            async with asyncio.timeout(self.config.confirm_timeout):
                channel = await connection.channel(publisher_confirms=False)
                await declare(channel)
        except amqp_errors.ChannelClosed as exc:
            raise AmqpSendError(f"amqp: cannot declare {what}: {_reply_text(exc)}") from None
        finally:
            if channel is not None:
                await close_within(channel, self.config.confirm_timeout)

    async def _declare_retry_queue(self, retry_queue: str, queue: str, delay_ms: int) -> None:
        """Declare a retry queue (:meth:`_declare_apart`)."""
        arguments: dict[str, Any] = {
            "x-message-ttl": delay_ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
        }
        await self._declare_apart(
            f"the retry queue {retry_queue!r}",
            lambda ch: ch.queue_declare(retry_queue, durable=True, arguments=arguments),
        )
        self._retry_queues.add(retry_queue)

    async def _declare_dead_letters(self, queue: str) -> None:
        """Declare the dead-letter exchange, ``<queue>.dead-letter`` and their binding
        again, as at the start (:meth:`_declare_apart`): deleted while the server runs,
        every dead letter of ``queue`` was refused."""
        exchange = self.config.dead_letter_exchange

        async def declare(channel: AbstractChannel) -> None:
            await channel.exchange_declare(exchange, exchange_type="direct", durable=True)
            await channel.queue_declare(queue + ".dead-letter", durable=True)
            await channel.queue_bind(queue + ".dead-letter", exchange, routing_key=queue)

        await self._declare_apart(f"the dead letters of {queue!r}", declare)

    async def _probe_exchange(self, exchange: str) -> str | None:
        """``None`` when ``exchange`` exists, else the broker's answer: a passive declare,
        once per name, on a channel of its own.

        A publish to a missing exchange makes the broker close the publishing channel,
        failing every send waiting there for its confirmation; and a publish aiormq
        writes as that channel closes can make the broker close the whole connection
        (consumers included). Asked here first, such a send fails alone."""
        from aiormq import exceptions as amqp_errors

        async with self._probe_lock:
            if exchange in self._exchanges:
                return None
            connection = self._connection
            if connection is None:
                raise AmqpSendError("amqp: not connected to the broker")
            channel: AbstractChannel | None = None
            try:
                async with asyncio.timeout(self.config.confirm_timeout):
                    channel = await connection.channel()
                    await channel.exchange_declare(exchange, passive=True)
            except amqp_errors.ChannelClosed as exc:
                return _reply_text(exc)
            except TimeoutError:
                raise AmqpSendError(f"amqp: the broker did not answer about {exchange!r}") from None
            finally:
                if channel is not None and not channel.is_closed:
                    await close_within(channel, self.config.confirm_timeout)
            if len(self._exchanges) >= _MAX_KNOWN_EXCHANGES:
                self._exchanges.clear()
            self._exchanges.add(exchange)
            return None

    def _learn_limit(self, exc: BaseException) -> None:
        """Keep the size limit a refusal names. Its channel closed; at times the broker
        closes the whole connection too (a publish written after the channel closed),
        so it is kept across reconnects: the next message over it fails here."""
        limit = _size_limit(exc)
        if limit is not None and limit != self._max_size:
            self._max_size = limit
            logger.warning(
                "amqp: the broker refuses messages over %d bytes: sends larger than that "
                "fail here from now on (restart the server to pick up a raised limit)",
                limit,
            )

    async def _channel(self, kind: Publisher = "sends") -> AbstractChannel:
        """A confirm-mode publishing channel of ``kind``, reopened if the broker closed it.

        A publish the broker refuses at channel level (an exchange gone, a message over
        its size limit) closes its channel, every publish waiting there for its
        confirmation fails with that error, and a publish written as it closes can make
        the broker close the whole connection. So each kind has its own: the server's
        moves (retry copies, dead letters), the application's sends, and of those the
        large ones (:data:`LARGE`), which alone can be over the broker's size limit.
        """
        publisher = self._publishers.get(kind)
        if publisher is not None and not publisher.is_closed:
            return publisher
        if self._closed:
            raise AmqpSendError("amqp: the server is closed")
        try:
            async with asyncio.timeout(self.config.confirm_timeout):
                while True:
                    await self._ready.wait()
                    publisher = await self._open_publisher(kind)
                    if publisher is not None:
                        return publisher
                    # The connection is closing: wait until the supervisor has noticed
                    # (it clears _ready) and connected again.
                    await asyncio.sleep(_CLOSING_POLL)
        except TimeoutError:
            raise AmqpSendError("amqp: not connected to the broker") from None

    async def _open_publisher(self, kind: Publisher) -> AbstractChannel | None:
        """The publishing channel, opened when closed; ``None`` if the connection closes."""
        async with self._publisher_lock:
            publisher = self._publishers.get(kind)
            if publisher is not None and not publisher.is_closed:
                return publisher
            connection = self._connection
            if connection is None or connection.is_closed:
                return None
            try:
                publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
            except Exception as exc:
                logger.debug("amqp: opening a publishing channel failed: %s", exc)
                return None
            self._publishers[kind] = publisher
            return publisher
