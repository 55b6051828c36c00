"""AMQP 0-9-1 server (RabbitMQ), on the aiormq client.

How AMGI maps onto AMQP:

=================  ==================================================================
address            a queue name; ``message.send`` publishes to ``exchange`` (default:
                   the default exchange) with the address as routing key
consume            ``basic.consume`` on one channel with ``basic.qos(prefetch)``;
                   deliveries are buffered until the runtime fetches them
batch              the deliveries on hand, up to ``batch_size``, after ``linger``
ordering key       the queue: batches of one queue run one after another
ack                one ``basic.ack(multiple=True)`` up to the highest delivery tag below
                   which every delivery of the channel is settled
nack (retry)       republished (confirmed) to ``<queue>.retry.<ms>``, a queue with that
                   message TTL whose dead-letter target is the queue, attempt + 1 in the
                   ``amgi-attempt`` header; then the original is acked
nack (dead)        republished (confirmed) to ``dead_letter_exchange`` with the queue as
                   routing key (bound to ``<queue>.dead-letter``) and the reason header
attempt            the ``amgi-attempt`` header, plus ``x-delivery-count`` (quorum queues)
send               ``basic.publish`` with publisher confirms, mandatory by default
connection loss    reconnect with backoff and consume again on a new channel; batches of
                   the old channel are not acked (the broker redelivers them)
=================  ==================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from amgi.errors import BrokerUnavailable, ConfigurationError, SendError
from amgi.transport import (
    ATTEMPT_HEADER,
    DEAD_LETTER_REASON_HEADER,
    ORIGINAL_ADDRESS_HEADER,
    Batch,
    Bindings,
    HeaderList,
    Message,
    Settlement,
    StoredDeadLetter,
    Transport,
    headers_with_attempt,
)

if TYPE_CHECKING:
    from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
    from pamqp.commands import Basic

__all__ = ["AmqpOptions", "AmqpSendError", "AmqpTransport"]

logger = logging.getLogger("amgi.servers.amqp")

_ATTEMPT_KEY = ATTEMPT_HEADER.decode()
_DELIVERY_COUNT_KEY = "x-delivery-count"
_ORDER_KEY = "amgi-header-order"
# Headers the broker adds when our retry queues dead-letter a message back: bookkeeping
# of the retry mechanism, not part of the message the app sent.
_BROKER_KEYS = frozenset(
    {
        _ATTEMPT_KEY,
        _DELIVERY_COUNT_KEY,
        _ORDER_KEY,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
_RECONNECT_FIRST = 0.1
_REPLAY_CHUNK = 100


class AmqpSendError(SendError):
    """A publish was not confirmed by the broker (unroutable, nacked, connection lost)."""


@dataclass(slots=True)
class AmqpOptions:
    """Options of the AMQP server."""

    url: str = field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        metadata={"help": "broker URL, amqp://user:password@host:port/vhost", "secret": True},
    )
    prefetch: int = field(
        default=1000, metadata={"help": "unacknowledged deliveries per queue (basic.qos)"}
    )
    batch_size: int = field(default=100, metadata={"help": "most messages per batch"})
    linger: float = field(
        default=0.002, metadata={"help": "seconds to wait for a fuller batch once one arrived"}
    )
    queue_type: str = field(
        default="classic", metadata={"help": "type of declared queues: classic or quorum"}
    )
    durable: bool = field(default=True, metadata={"help": "declare durable queues/exchange"})
    passive: bool = field(
        default=False,
        metadata={"help": "only check that the queues and exchange exist, declare nothing"},
    )
    exchange: str = field(
        default="",
        metadata={"help": "exchange to bind the queues to and publish to (default exchange)"},
    )
    exchange_type: str = field(
        default="direct", metadata={"help": "type of the exchange: direct, topic, fanout ..."}
    )
    routing_keys: list[str] = field(
        default_factory=list,
        metadata={"help": "binding keys of the queues on the exchange (default: queue name)"},
    )
    dead_letter_exchange: str = field(
        default="amgi.dead-letter",
        metadata={"help": "exchange receiving dead letters, routed by their queue name"},
    )
    confirm_timeout: float = field(
        default=30.0, metadata={"help": "seconds to wait for a publish confirm"}
    )
    reconnect_delay_max: float = field(
        default=5.0, metadata={"help": "longest pause between reconnection attempts, seconds"}
    )


# -- headers and bindings -----------------------------------------------------------------


def _header_value(value: Any) -> Iterable[bytes]:
    """The AMGI header values of one AMQP table value (an array repeats the name)."""
    if isinstance(value, str):
        yield value.encode()
    elif isinstance(value, bytes | bytearray):
        yield bytes(value)
    elif isinstance(value, list):
        for item in value:
            yield from _header_value(item)
    else:
        yield str(value).encode()


def _table_value(value: bytes) -> str | bytearray:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return bytearray(value)


def headers_to_table(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, Any]:
    """AMGI headers as an AMQP headers table; a repeated name becomes an array.

    RabbitMQ hands tables out sorted by name, so when the names are not in that order
    the original order travels in an ``amgi-header-order`` array.
    """
    table: dict[str, Any] = {}
    names: list[str] = []
    for name, value in headers:
        key = name.decode("utf-8", "replace")
        item = _table_value(value)
        if key not in _BROKER_KEYS:
            names.append(key)
        if key in table:
            previous = table[key]
            if isinstance(previous, list):
                previous.append(item)
            else:
                table[key] = [previous, item]
        else:
            table[key] = item
    if any(a > b for a, b in itertools.pairwise(names)):
        table[_ORDER_KEY] = names
    return table


def table_to_headers(table: dict[str, Any] | None) -> tuple[int, HeaderList]:
    """Split an AMQP headers table into ``(attempt, AMGI headers)``."""
    if not table:
        return 1, []
    headers: HeaderList = []
    attempt = 1
    for key, value in table.items():
        if key in _BROKER_KEYS:
            if key == _ATTEMPT_KEY:
                attempt += _attempt_value(value) - 1
            elif key == _DELIVERY_COUNT_KEY and isinstance(value, int):
                attempt += value
            continue
        name = key.encode()
        headers.extend((name, v) for v in _header_value(value))
    order = table.get(_ORDER_KEY)
    if isinstance(order, list):
        headers = _reorder(headers, order)
    return attempt, headers


def _reorder(headers: HeaderList, order: list[Any]) -> HeaderList:
    """``headers`` in the name order of ``order`` (unknown or extra names go last)."""
    by_name: dict[bytes, deque[bytes]] = {}
    for name, value in headers:
        by_name.setdefault(name, deque()).append(value)
    out: HeaderList = []
    for item in order:
        name = item.encode() if isinstance(item, str) else bytes(item)
        values = by_name.get(name)
        if values:
            out.append((name, values.popleft()))
    out.extend((name, v) for name, values in by_name.items() for v in values)
    return out


def _attempt_value(value: Any) -> int:
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", "replace")
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return 1


_PROPERTY_BINDINGS = (
    ("content_type", "contentType"),
    ("content_encoding", "contentEncoding"),
    ("correlation_id", "correlationId"),
    ("reply_to", "replyTo"),
    ("message_id", "messageId"),
    ("message_type", "messageType"),
    ("user_id", "userId"),
    ("app_id", "appId"),
    ("priority", "priority"),
    ("delivery_mode", "deliveryMode"),
)


def delivery_bindings(delivered: DeliveredMessage) -> dict[str, Any]:
    """The ``amqp`` bindings of a delivery: routing data and basic properties."""
    delivery = delivered.delivery
    props = delivered.header.properties
    out: dict[str, Any] = {
        "exchange": getattr(delivery, "exchange", ""),
        "routingKey": getattr(delivery, "routing_key", ""),
        "redelivered": bool(getattr(delivery, "redelivered", False)),
    }
    for attr, key in _PROPERTY_BINDINGS:
        value = getattr(props, attr)
        if value is not None:
            out[key] = value
    if props.expiration is not None:
        out["expiration"] = (
            int(props.expiration) if props.expiration.isdigit() else props.expiration
        )
    if props.timestamp is not None:
        out["timestamp"] = int(props.timestamp.timestamp())
    return out


def publish_properties(
    headers: Iterable[tuple[bytes, bytes]], binding: dict[str, Any]
) -> Basic.Properties:
    """Basic properties of an outgoing message from AMGI headers and ``amqp`` bindings."""
    from pamqp.commands import Basic

    kwargs: dict[str, Any] = {"delivery_mode": 2}
    for attr, key in _PROPERTY_BINDINGS:
        value = binding.get(key)
        if value is not None:
            kwargs[attr] = value
    expiration = binding.get("expiration")
    if expiration is not None:
        kwargs["expiration"] = str(expiration)
    timestamp = binding.get("timestamp")
    if timestamp is not None:
        if not isinstance(timestamp, datetime.datetime):
            timestamp = datetime.datetime.fromtimestamp(float(timestamp), datetime.UTC)
        kwargs["timestamp"] = timestamp
    table = headers_to_table(headers)
    if table:
        kwargs["headers"] = table
    return Basic.Properties(**kwargs)


# -- the transport ------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Channel:
    """The consuming channel of one connection, with its acknowledgement watermark."""

    channel: AbstractChannel
    generation: int
    next_tag: int = 1
    """Lowest delivery tag not yet settled: every tag below it is acked or rejected."""
    settled: set[int] = field(default_factory=set)
    """Settled tags above ``next_tag`` (their predecessors are still in flight)."""


class AmqpTransport(Transport):
    """The AMGI transport of an AMQP 0-9-1 broker (RabbitMQ)."""

    name = "amqp"
    options = AmqpOptions
    send_error = AmqpSendError
    requires = ("aiormq",)
    extra = "amqp"

    def __init__(self, addresses: Sequence[str], options: AmqpOptions | None = None) -> None:
        super().__init__(addresses, options or AmqpOptions())
        self.config: AmqpOptions
        self._connection: AbstractConnection | None = None
        self._consumer: _Channel | None = None
        self._publisher: AbstractChannel | None = None
        self._publisher_lock = asyncio.Lock()
        self._generation = 0
        self._buffer: deque[tuple[str, DeliveredMessage]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._want = 1
        self._ready = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._retry_queues: set[str] = set()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    def _check_options(self) -> None:
        c = self.config
        if c.batch_size < 1 or c.prefetch < 1:
            raise ConfigurationError("amqp: batch_size and prefetch must be at least 1")
        if c.prefetch > 65535:
            raise ConfigurationError("amqp: prefetch must be at most 65535")
        if c.queue_type not in ("classic", "quorum"):
            raise ConfigurationError(
                f"amqp: queue_type must be classic or quorum, not {c.queue_type!r}"
            )
        if c.queue_type == "quorum" and not c.durable:
            raise ConfigurationError("amqp: quorum queues are always durable")
        if c.linger < 0 or c.confirm_timeout <= 0:
            raise ConfigurationError("amqp: linger must be >= 0 and confirm_timeout > 0")
        for address in self.addresses:
            if not address or len(address.encode()) > 255:
                raise ConfigurationError(f"amqp: {address!r} is not a queue name (1-255 bytes)")

    async def connect(self) -> None:
        self._check_options()
        self._closed = False
        await self._open()
        self._supervisor = asyncio.create_task(self._supervise(), name="amgi-amqp-reconnect")

    async def _open(self) -> None:
        """Connect, declare the topology, open the publisher and start consuming."""
        import aiormq
        from aiormq import exceptions as amqp_errors

        c = self.config
        try:
            connection = await aiormq.connect(c.url)
        except (amqp_errors.AuthenticationError, amqp_errors.ProbableAuthenticationError):
            raise BrokerUnavailable(
                f"amqp: the broker at {_safe_url(c.url)} refused the credentials"
            ) from None
        except amqp_errors.ConnectionNotAllowed:
            raise BrokerUnavailable(
                f"amqp: access to the virtual host of {_safe_url(c.url)} was refused"
            ) from None
        except (OSError, amqp_errors.AMQPError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"amqp: cannot connect to {_safe_url(c.url)}: {exc or type(exc).__name__}"
            ) from None
        except ValueError as exc:
            raise ConfigurationError(f"amqp: bad url {_safe_url(c.url)}: {exc}") from None
        try:
            if self.addresses:
                channel = await connection.channel(publisher_confirms=False)
                await self._declare(channel)
                await channel.basic_qos(prefetch_count=c.prefetch)
            self._connection = connection
            self._publisher = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            if self.addresses:
                self._generation += 1
                self._buffer.clear()
                self._consumer = _Channel(channel, self._generation)
                for queue in self.addresses:
                    await channel.basic_consume(queue, self._consumer_for(queue, self._generation))
        except BaseException:
            self._consumer = None
            self._publisher = None
            self._connection = None
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self._ready.set()

    async def _declare(self, channel: AbstractChannel) -> None:
        """Declare (or, when passive, check) the queues, exchange, bindings and dead letters."""
        from aiormq import exceptions as amqp_errors

        c = self.config
        arguments: dict[str, Any] | None = (
            {"x-queue-type": "quorum"} if c.queue_type == "quorum" else None
        )
        what = ""
        try:
            if c.exchange:
                what = f"exchange {c.exchange!r}"
                await channel.exchange_declare(
                    c.exchange, exchange_type=c.exchange_type, durable=c.durable, passive=c.passive
                )
            for queue in self.addresses:
                what = f"queue {queue!r}"
                await channel.queue_declare(
                    queue, durable=c.durable, passive=c.passive, arguments=arguments
                )
                if c.exchange and not c.passive:
                    for key in c.routing_keys or [queue]:
                        await channel.queue_bind(queue, c.exchange, routing_key=key)
            what = f"dead-letter exchange {c.dead_letter_exchange!r}"
            await channel.exchange_declare(
                c.dead_letter_exchange, exchange_type="direct", durable=True
            )
            for queue in self.addresses:
                what = f"dead-letter queue {queue + '.dead-letter'!r}"
                await channel.queue_declare(queue + ".dead-letter", durable=True)
                await channel.queue_bind(
                    queue + ".dead-letter", c.dead_letter_exchange, routing_key=queue
                )
        except amqp_errors.ChannelNotFoundEntity:
            raise ConfigurationError(f"amqp: {what} does not exist (passive mode)") from None
        except (amqp_errors.ChannelPreconditionFailed, amqp_errors.ChannelAccessRefused) as exc:
            raise ConfigurationError(f"amqp: cannot declare {what}: {_reply_text(exc)}") from None

    async def _supervise(self) -> None:
        """Reconnect with backoff whenever the connection or the consuming channel closes."""
        delay = _RECONNECT_FIRST
        while True:
            waits: list[asyncio.Future[Any]] = []
            if self._connection is not None:
                waits.append(self._connection.closing)
            if self._consumer is not None:
                waits.append(self._consumer.channel.closing)
            if waits:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for future in waits:
                    if future.done() and not future.cancelled():
                        future.exception()  # mark retrieved
                logger.warning("amqp: lost the connection to the broker; reconnecting")
            self._ready.clear()
            self._consumer = None
            self._publisher = None
            self._buffer.clear()
            old, self._connection = self._connection, None
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.close()
            while True:
                try:
                    await self._open()
                except (BrokerUnavailable, ConfigurationError, OSError) as exc:
                    logger.warning("amqp: reconnect failed: %s (next try in %.1fs)", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.config.reconnect_delay_max)
                    continue
                except Exception as exc:
                    logger.warning("amqp: reconnect failed: %r (next try in %.1fs)", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.config.reconnect_delay_max)
                    continue
                logger.info("amqp: reconnected; consuming again")
                delay = _RECONNECT_FIRST
                break

    async def close(self) -> None:
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        self._ready.clear()
        connection, self._connection = self._connection, None
        self._consumer = None
        self._publisher = None
        self._buffer.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    # -- consuming ------------------------------------------------------------------------

    def _consumer_for(self, queue: str, generation: int) -> Any:
        buffer = self._buffer

        async def on_message(delivered: DeliveredMessage) -> None:
            if generation != self._generation:
                return  # a late delivery of a closed channel: the broker redelivers it
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
            if timeout is None:
                await waiter
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, timeout)
        finally:
            self._waiter = None

    async def fetch(self) -> Sequence[Batch]:
        size = self.config.batch_size
        buffer = self._buffer
        while True:
            await self._wait_for(1, None)
            if self.config.linger > 0:
                await self._wait_for(size, self.config.linger)
            if buffer:
                break
        generation = self._generation
        grouped: dict[str, list[Message]] = {}
        for _ in range(min(size, len(buffer))):
            queue, delivered = buffer.popleft()
            grouped.setdefault(queue, []).append(_message(delivered))
        return [
            Batch(queue, msgs, key=queue, context=generation) for queue, msgs in grouped.items()
        ]

    # -- settling -------------------------------------------------------------------------

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        consumer = self._consumer
        if consumer is None or consumer.generation != batch.context:
            return  # the channel is gone: the broker redelivers every message of the batch
        republish = [
            self._publish_retry(batch.address, r.message, r.delay) for r in settlement.retry
        ]
        republish += [
            self._publish_dead(batch.address, d.message, d.reason) for d in settlement.dead
        ]
        rejected: list[int] = []
        if republish:
            moved = [r.message for r in settlement.retry] + [d.message for d in settlement.dead]
            results = await asyncio.gather(*republish, return_exceptions=True)
            if self._consumer is not consumer:
                return
            for message, result in zip(moved, results, strict=True):
                if isinstance(result, BaseException):
                    logger.error(
                        "amqp: could not move a nacked message of %r aside (%s); requeued",
                        batch.address,
                        result,
                    )
                    rejected.append(message.token.delivery.delivery_tag)
        channel = consumer.channel
        try:
            for tag in rejected:
                await channel.basic_reject(tag, requeue=True)
        except Exception:
            return  # channel lost: everything unacked comes back
        settled = consumer.settled
        settled.update(m.token.delivery.delivery_tag for m in batch.messages)
        start = tag = consumer.next_tag
        while tag in settled:
            settled.discard(tag)
            tag += 1
        if tag == start:
            return
        consumer.next_tag = tag
        with contextlib.suppress(Exception):  # channel lost: the broker redelivers them
            await channel.basic_ack(tag - 1, multiple=True)

    async def _publish_retry(self, queue: str, message: Message, delay: float) -> None:
        delay_ms = max(1, round(delay * 1000))
        retry_queue = f"{queue}.retry.{delay_ms}"
        channel = await self._channel()
        if retry_queue not in self._retry_queues:
            await channel.queue_declare(
                retry_queue,
                durable=True,
                arguments={
                    "x-message-ttl": delay_ms,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": queue,
                },
            )
            self._retry_queues.add(retry_queue)
        headers = headers_with_attempt(message.headers, message.attempt + 1)
        await self._confirm(channel, message.token, "", retry_queue, headers)

    async def _publish_dead(self, queue: str, message: Message, reason: str) -> None:
        headers = headers_with_attempt(message.headers, message.attempt)
        headers.append((DEAD_LETTER_REASON_HEADER, reason.encode()))
        headers.append((ORIGINAL_ADDRESS_HEADER, queue.encode()))
        channel = await self._channel()
        await self._confirm(
            channel, message.token, self.config.dead_letter_exchange, queue, headers
        )

    async def _confirm(
        self,
        channel: AbstractChannel,
        delivered: DeliveredMessage,
        exchange: str,
        routing_key: str,
        headers: HeaderList,
    ) -> None:
        from pamqp.commands import Basic

        props = delivered.header.properties
        properties = Basic.Properties(
            content_type=props.content_type,
            content_encoding=props.content_encoding,
            headers=headers_to_table(headers),
            delivery_mode=2,
            priority=props.priority,
            correlation_id=props.correlation_id,
            reply_to=props.reply_to,
            message_id=props.message_id,
            timestamp=props.timestamp,
            message_type=props.message_type,
            user_id=props.user_id,
            app_id=props.app_id,
        )
        result = await channel.basic_publish(
            delivered.body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=True,
            timeout=self.config.confirm_timeout,
        )
        _check_confirm(result)

    # -- publishing -----------------------------------------------------------------------

    async def _channel(self) -> AbstractChannel:
        """The confirm-mode publishing channel, reopened if the broker closed it."""
        publisher = self._publisher
        if publisher is not None and not publisher.is_closed:
            return publisher
        if self._closed:
            raise AmqpSendError("amqp: the server is closed")
        try:
            await asyncio.wait_for(self._ready.wait(), self.config.confirm_timeout)
        except TimeoutError:
            raise AmqpSendError("amqp: not connected to the broker") from None
        async with self._publisher_lock:
            publisher = self._publisher
            if publisher is None or publisher.is_closed:
                connection = self._connection
                if connection is None:
                    raise AmqpSendError("amqp: not connected to the broker")
                publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
                self._publisher = publisher
            return publisher

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
        try:
            properties = publish_properties(headers, binding)
        except (TypeError, ValueError) as exc:
            raise AmqpSendError(f"amqp: bad amqp bindings for {address!r}: {exc}") from None
        where = f"exchange {exchange!r}" if exchange else "the default exchange"
        try:
            channel = await self._channel()
            result = await channel.basic_publish(
                payload or b"",
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=bool(binding.get("mandatory", True)),
                timeout=self.config.confirm_timeout,
            )
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

    # -- dead letters: the queue <queue>.dead-letter ----------------------------------------

    async def _dead_letter_channel(self, queue: str) -> AbstractChannel:
        """A channel on which ``queue`` and its dead-letter queue were found to exist."""
        from aiormq import exceptions as amqp_errors

        connection = self._connection
        if connection is None:
            raise AmqpSendError("amqp: not connected to the broker")
        for name in (queue, queue + ".dead-letter"):
            channel = await connection.channel()
            try:
                await channel.queue_declare(name, passive=True)
            except amqp_errors.ChannelNotFoundEntity:
                raise ConfigurationError(f"amqp: queue {name!r} does not exist") from None
            if name != queue:
                return channel
            await channel.close()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get_dead(self, channel: AbstractChannel, queue: str, limit: int) -> list[Any]:
        from pamqp.commands import Basic

        got: list[Any] = []
        while len(got) < limit:
            delivered = await channel.basic_get(queue + ".dead-letter", no_ack=False)
            if not isinstance(delivered.delivery, Basic.GetOk):
                break
            got.append(delivered)
        return got

    async def list_dead_letters(self, address: str, limit: int) -> list[StoredDeadLetter]:
        """Taken with basic.get and put back (the channel closes without acking)."""
        channel = await self._dead_letter_channel(address)
        try:
            return [_stored_dead_letter(d) for d in await self._get_dead(channel, address, limit)]
        finally:
            await channel.close()

    async def replay_dead_letters(self, address: str, limit: int) -> int:
        """Republish each to the queue (confirmed), then ack it off the dead-letter queue."""
        channel = await self._dead_letter_channel(address)
        moved = 0
        try:
            while moved < limit:
                chunk = await self._get_dead(channel, address, min(_REPLAY_CHUNK, limit - moved))
                if not chunk:
                    break
                publisher = await self._channel()
                await asyncio.gather(
                    *(
                        self._confirm(publisher, d, "", address, _stored_dead_letter(d).headers)
                        for d in chunk
                    )
                )
                await channel.basic_ack(chunk[-1].delivery.delivery_tag, multiple=True)
                moved += len(chunk)
        finally:
            await channel.close()
        return moved


def _message(delivered: DeliveredMessage) -> Message:
    attempt, headers = table_to_headers(delivered.header.properties.headers)
    delivery = cast("Basic.Deliver", delivered.delivery)
    return Message(
        str(delivery.delivery_tag),
        headers,
        delivered.body,
        {"amqp": delivery_bindings(delivered)},
        attempt,
        delivered,
    )


def _stored_dead_letter(delivered: DeliveredMessage) -> StoredDeadLetter:
    attempt, raw = table_to_headers(delivered.header.properties.headers)
    headers: HeaderList = []
    reason, original = "", ""
    for name, value in raw:
        if name == DEAD_LETTER_REASON_HEADER:
            reason = value.decode("utf-8", "replace")
        elif name == ORIGINAL_ADDRESS_HEADER:
            original = value.decode("utf-8", "replace")
        else:
            headers.append((name, value))
    delivery = cast("Basic.GetOk", delivered.delivery)
    return StoredDeadLetter(
        str(delivery.delivery_tag), original, headers, delivered.body, {}, attempt, reason
    )


def _check_confirm(result: object) -> None:
    from pamqp.commands import Basic

    if not isinstance(result, Basic.Ack):
        raise AmqpSendError("the broker did not confirm the message (basic.nack)")


def _reply_text(exc: BaseException) -> str:
    frame = exc.args[0] if exc.args else None
    text = getattr(frame, "reply_text", None)
    return str(text) if text else str(exc)


def _safe_url(url: str) -> str:
    """``url`` with the password masked, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, hostpart = rest.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}"
