"""MQTT 3.1.1 and 5 server, on paho-mqtt 2 driven by the asyncio event loop.

How AMGI maps onto MQTT:

=================  ==================================================================
address            a topic filter to subscribe to (``+``, ``#``, ``$share/GROUP/...``);
                   the scope address is the topic each message was published to
batch              the messages on hand for one topic, up to ``batch_size``, after a
                   linger of ``batch_linger`` seconds for more to arrive
ordering key       the topic: batches of one topic run one after another
ack                PUBACK (QoS 1), PUBREC then PUBCOMP (QoS 2), sent only now
nack (retry)       after the delay, republish to the topic with ``amgi-attempt`` + 1,
                   wait for the broker's PUBACK, then acknowledge the original
nack (dead)        publish to ``<dead_letter_prefix>/<topic>`` with the reason, wait for
                   the broker's PUBACK, then acknowledge the original
headers            MQTT 5 user properties (repeated names kept; a name or value that is
                   not UTF-8 without NUL travels base64-encoded); none on MQTT 3.1.1
bindings           ``mqtt``: qos, retain, topic, messageExpiryInterval, contentType,
                   correlationData, responseTopic, payloadFormatIndicator
send               PUBLISH at ``bindings["mqtt"]["qos"]`` (default 1), awaiting PUBACK
close / crash      the persistent session keeps every unacknowledged message; the
                   broker sends them again when the server reconnects
=================  ==================================================================

MQTT has no negative acknowledgement and a broker redelivers an unacknowledged message
only when the client reconnects, so retries and dead letters are republished. The
session is persistent (clean start off, ``session_expiry`` seconds) so messages published
while the server is down wait for it, and the client id defaults to one derived from the
topic filters so that a restarted server finds its session again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import ssl
import struct
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from amgi.errors import BrokerUnavailable, ConfigurationError, SendError
from amgi.servers.kit import (
    Backoff,
    DelayedRepublisher,
    attempt_from_headers,
    dead_letter_headers,
    invalid,
    retry_headers,
)
from amgi.transport import (
    Batch,
    Bindings,
    HeaderList,
    Message,
    Settlement,
    Transport,
)

if TYPE_CHECKING:
    import paho.mqtt.client as paho

__all__ = ["MqttOptions", "MqttSendError", "MqttTransport", "Publish", "decode_publish"]

logger = logging.getLogger("amgi.servers.mqtt")

_MISC_INTERVAL = 1.0
_RECONNECT_FIRST = 0.1


class MqttSendError(SendError):
    """The MQTT broker did not take a message (not connected, refused, timed out)."""


@dataclass(slots=True)
class MqttOptions:
    """Options of the MQTT server; each becomes a ``--kebab-case`` flag."""

    host: str = field(default="127.0.0.1", metadata={"help": "broker host name or address"})
    port: int = field(
        default=1883, metadata={"ge": 1, "le": 65535, "help": "broker port (8883 is usual for TLS)"}
    )
    protocol: Literal["5", "3.1.1"] = field(
        default="5", metadata={"help": "MQTT protocol version: 5 or 3.1.1"}
    )
    client_id: str = field(
        default="",
        metadata={
            "help": "client id of the persistent session (default: derived from the topic "
            "filters; give each server of a shared subscription its own)"
        },
    )
    qos: int = field(default=1, metadata={"ge": 0, "le": 2, "help": "subscription QoS: 0, 1 or 2"})
    session_expiry: int = field(
        default=3600,
        metadata={
            "ge": 0,
            "help": "seconds the broker keeps the session while disconnected (MQTT 5)",
        },
    )
    batch_size: int = field(default=100, metadata={"ge": 1, "help": "most messages per batch"})
    batch_linger: float = field(
        default=0.005, metadata={"ge": 0, "help": "seconds to wait for a batch to fill up"}
    )
    receive_maximum: int = field(
        default=1000,
        metadata={
            "ge": 1,
            "le": 65535,
            "help": "unacknowledged messages the broker may send at once (MQTT 5)",
        },
    )
    dead_letter_prefix: str = field(
        default="amgi/dead-letter",
        metadata={"help": "dead letters of topic T are published to PREFIX/T"},
    )
    username: str | None = field(default=None, metadata={"help": "user name to log in with"})
    password: str | None = field(
        default=None, metadata={"help": "password to log in with", "secret": True}
    )
    tls: bool = field(default=False, metadata={"help": "connect with TLS"})
    ca_file: str | None = field(
        default=None, metadata={"help": "CA certificates file (default: the system's)"}
    )
    cert_file: str | None = field(
        default=None, metadata={"help": "client certificate file for TLS"}
    )
    key_file: str | None = field(default=None, metadata={"help": "client key file for TLS"})
    tls_insecure: bool = field(
        default=False, metadata={"help": "do not check the broker's certificate host name"}
    )
    keepalive: int = field(default=60, metadata={"ge": 0, "help": "keepalive interval, seconds"})
    connect_timeout: float = field(
        default=10.0,
        metadata={"gt": 0, "help": "seconds to wait for the broker to accept a connection"},
    )
    send_timeout: float = field(
        default=30.0,
        metadata={"gt": 0, "help": "seconds a send waits for the broker's acknowledgement"},
    )
    reconnect_delay_max: float = field(
        default=30.0,
        metadata={"gt": 0, "help": "upper bound of the doubling reconnect delay, seconds"},
    )

    def check_together(self) -> None:
        """A password needs a user name; the dead-letter prefix must be a topic."""
        if self.password is not None and self.username is None:
            raise invalid(self, "password", "needs --username")
        problem = _topic_problem(self.dead_letter_prefix)
        if problem:
            raise invalid(self, "dead_letter_prefix", f"is not a topic: {problem}")


def validate_filter(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid MQTT topic filter, or ``None`` when it is."""
    text = topic_filter
    if text.startswith("$share/"):
        parts = text.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            return "a shared subscription is $share/GROUP/FILTER"
        if "+" in parts[1] or "#" in parts[1]:
            return "the share group name must not contain '+' or '#'"
        text = parts[2]
    if not text:
        return "a topic filter must not be empty"
    if "\x00" in text:
        return "a topic filter must not contain NUL"
    if len(text.encode()) > 65535:
        return "a topic filter is at most 65535 bytes"
    levels = text.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be the whole last level of a topic filter"
        if "+" in level and level != "+":
            return "'+' must be a whole level of a topic filter"
    return None


def _topic_problem(topic: str) -> str | None:
    if not topic:
        return "a topic must not be empty"
    if "+" in topic or "#" in topic:
        return "a topic to publish to must not contain '+' or '#'"
    if "\x00" in topic:
        return "a topic must not contain NUL"
    return None


@dataclass(slots=True)
class Publish:
    """An incoming PUBLISH packet, decoded."""

    topic: str
    mid: int
    qos: int
    retain: bool
    payload: bytes
    user_properties: list[tuple[str, str]]
    bindings: dict[str, Any]


def _varint(data: bytes | bytearray, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ValueError("malformed variable byte integer")


def _string(data: bytes | bytearray, pos: int) -> tuple[str, int]:
    (size,) = struct.unpack_from("!H", data, pos)
    pos += 2
    return data[pos : pos + size].decode(), pos + size


def decode_publish(command: int, packet: bytes | bytearray, v5: bool) -> Publish:
    """Decode the variable header and payload of a PUBLISH (everything after the fixed header).

    paho's own decoder builds a generic ``Properties`` object per message, which costs more
    than the rest of the receive path together; this one reads what AMGI maps.
    """
    qos = (command & 0x06) >> 1
    topic, pos = _string(packet, 0)
    mid = 0
    if qos:
        (mid,) = struct.unpack_from("!H", packet, pos)
        pos += 2
    user: list[tuple[str, str]] = []
    bindings: dict[str, Any] = {"qos": qos, "retain": bool(command & 0x01), "topic": topic}
    if v5:
        size, pos = _varint(packet, pos)
        end = pos + size
        while pos < end:
            ident, pos = _varint(packet, pos)
            if ident == 0x26:
                name, pos = _string(packet, pos)
                value, pos = _string(packet, pos)
                user.append((name, value))
            elif ident == 0x01:
                bindings["payloadFormatIndicator"] = packet[pos]
                pos += 1
            elif ident == 0x02:
                (bindings["messageExpiryInterval"],) = struct.unpack_from("!I", packet, pos)
                pos += 4
            elif ident == 0x03:
                bindings["contentType"], pos = _string(packet, pos)
            elif ident == 0x08:
                bindings["responseTopic"], pos = _string(packet, pos)
            elif ident == 0x09:
                (length,) = struct.unpack_from("!H", packet, pos)
                bindings["correlationData"] = bytes(packet[pos + 2 : pos + 2 + length])
                pos += 2 + length
            elif ident == 0x0B:
                _, pos = _varint(packet, pos)
            elif ident == 0x23:
                pos += 2
            else:
                raise ValueError(f"unexpected PUBLISH property 0x{ident:02x}")
    return Publish(topic, mid, qos, bool(command & 0x01), bytes(packet[pos:]), user, bindings)


def _client_class() -> type[paho.Client]:
    """A paho client that hands each PUBLISH over at once and acknowledges it on :meth:`ack`.

    Acknowledgement is always manual: PUBACK for QoS 1; for QoS 2 PUBREC (paho would send
    it on receipt and hand the message over only on PUBREL, so a crash in between would
    lose it), then PUBCOMP when the broker answers with PUBREL.
    """
    import paho.mqtt.client as paho
    from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion

    class Client(paho.Client):
        on_publish_packet: Any = None

        def _handle_publish(self) -> MQTTErrorCode:
            packet = self._in_packet
            v5 = self._protocol == MQTTProtocolVersion.MQTTv5
            try:
                publish = decode_publish(packet["command"], packet["packet"], v5)
            except (ValueError, IndexError, struct.error) as exc:
                logger.error("mqtt: malformed PUBLISH from the broker: %s", exc)
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            self.on_publish_packet(publish)
            return MQTTErrorCode.MQTT_ERR_SUCCESS

        def _handle_pubrel(self) -> MQTTErrorCode:
            (mid,) = struct.unpack_from("!H", self._in_packet["packet"], 0)
            return self._send_pubcomp(mid)

        def ack(self, mid: int, qos: int) -> MQTTErrorCode:
            if qos == 1:
                return self._send_puback(mid)
            if qos == 2:
                return self._send_pubrec(mid)
            return MQTTErrorCode.MQTT_ERR_SUCCESS

    return Client


_CLOSED_BEFORE_CONNACK: Final = object()
"""The CONNACK outcome when the broker dropped the connection before sending one."""


class MqttTransport(Transport):
    """The AMGI transport of an MQTT broker (see the module docstring for the mapping)."""

    name = "mqtt"
    options = MqttOptions
    send_error = MqttSendError
    requires = ("paho.mqtt",)
    extra = "mqtt"

    def __init__(self, addresses: Sequence[str], options: MqttOptions | None = None) -> None:
        super().__init__(addresses, options or MqttOptions())
        self.config: MqttOptions
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._generation = 0
        """Bumped on every connection loss: acks of older deliveries are not sent."""
        self._connected = asyncio.Event()
        self._arrived = asyncio.Event()
        self._on_hand: dict[str, list[Message]] = {}
        self._count = 0
        self._ids = 0
        self._connack: asyncio.Future[tuple[bool, Any]] | None = None
        self._suback: dict[int, asyncio.Future[list[Any]]] = {}
        self._puback: dict[int, asyncio.Future[Any]] = {}
        self._retries = DelayedRepublisher("mqtt")
        self._reconnector: asyncio.Task[None] | None = None
        self._misc: asyncio.Task[None] | None = None
        self._closing = False
        self._v5 = True
        self._warned_headers = False
        self._retry_attempts: dict[tuple[str, bytes], int] = {}
        """MQTT 3.1.1 only: attempts of republished retries, by topic and payload."""

    # -- connection ------------------------------------------------------------------

    def check(self) -> None:
        """The options, then the addresses: topic filters, a client id for shared ones."""
        super().check()
        c = self.config
        for address in self.addresses:
            problem = validate_filter(address)
            if problem:
                raise ConfigurationError(f"mqtt: invalid topic filter {address!r}: {problem}")
        if not c.client_id and any(a.startswith("$share/") for a in self.addresses):
            # The default id comes from the filters: every server of the group would get
            # the same one and take the session over from the others, again and again.
            raise ConfigurationError(
                "mqtt: a shared subscription needs --client-id, a different one per server"
            )

    def _client_id(self) -> str:
        if self.config.client_id:
            return self.config.client_id
        if not self.addresses:
            return f"amgi-send-{uuid.uuid4().hex[:16]}"
        digest = hashlib.sha256("\n".join(sorted(self.addresses)).encode()).hexdigest()
        return f"amgi-{digest[:20]}"

    def _where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    async def connect(self) -> None:
        """Connect, resume (or create) the persistent session and subscribe."""
        self.check()
        self._retries = DelayedRepublisher("mqtt")
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        c = self.config
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._closing = False
        self._v5 = c.protocol == "5"
        consuming = bool(self.addresses)
        client = _client_class()(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id(),
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            clean_session=None if self._v5 else not consuming,
            manual_ack=True,
        )
        client.max_inflight_messages_set(1000)
        client.connect_timeout = c.connect_timeout
        client.max_queued_messages_set(0)
        if c.username is not None:
            client.username_pw_set(c.username, c.password)
        if c.tls:
            context = ssl.create_default_context(cafile=c.ca_file)
            if c.cert_file:
                context.load_cert_chain(c.cert_file, c.key_file)
            if c.tls_insecure:
                context.check_hostname = False
            client.tls_set_context(context)
            client.tls_insecure_set(c.tls_insecure)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_publish_packet = self._on_publish_packet  # type: ignore[attr-defined]
        self._client = client
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise
        self._misc = asyncio.create_task(self._misc_loop(), name="amgi-mqtt-misc")

    def _connect_properties(self) -> Any:
        if not self._v5:
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.config.session_expiry if self.addresses else 0
        props.ReceiveMaximum = self.config.receive_maximum
        return props

    async def _open(self) -> None:
        """One connection attempt: TCP (and TLS), CONNECT/CONNACK, SUBSCRIBE/SUBACK."""
        client = self._client
        assert client is not None
        assert self._loop is not None
        c = self.config
        import paho.mqtt.client as paho

        self._connack = self._loop.create_future()
        if self._v5:
            client.connect_async(
                c.host,
                c.port,
                keepalive=c.keepalive,
                clean_start=not self.addresses,
                properties=self._connect_properties(),
            )
        else:
            client.connect_async(c.host, c.port, keepalive=c.keepalive)
        old = client.socket()
        if old is not None:
            self._forget_socket(old)  # paho closes it in reconnect(), off the loop
        try:
            # The blocking socket connect (and TLS handshake) runs off the loop; paho's
            # socket callbacks hop back onto it.
            await asyncio.to_thread(client.reconnect)
        except ssl.SSLError as exc:
            raise BrokerUnavailable(f"mqtt: TLS with {self._where()} failed: {exc}") from None
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            raise BrokerUnavailable(f"mqtt: cannot reach {self._where()}: {why}") from None
        try:
            _, reason = await asyncio.wait_for(self._connack, c.connect_timeout)
        except TimeoutError:
            raise BrokerUnavailable(
                f"mqtt: no answer from {self._where()} within {c.connect_timeout}s"
            ) from None
        if reason is _CLOSED_BEFORE_CONNACK:
            hint = ""
            if c.tls and not c.cert_file:
                hint = " (if it requires a client certificate: --cert-file and --key-file)"
            raise BrokerUnavailable(
                f"mqtt: {self._where()} closed the connection before answering CONNECT{hint}"
            )
        if reason is not None:
            raise BrokerUnavailable(
                f"mqtt: broker at {self._where()} refused the connection: {reason}"
            )
        if self.addresses:
            # Always (re)subscribe: the filters may have changed since the session began.
            await self._subscribe(client, paho)
        self._connected.set()

    async def _subscribe(self, client: paho.Client, paho_module: Any) -> None:
        assert self._loop is not None
        qos = self.config.qos
        topics: list[tuple[str, Any]]
        if self._v5:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            # Retain handling 1: retained messages only when the subscription is new,
            # so resuming a session does not deliver them again.
            topics = [(a, SubscribeOptions(qos=qos, retainHandling=1)) for a in self.addresses]
        else:
            topics = [(a, qos) for a in self.addresses]
        rc, mid = client.subscribe(topics)
        if rc != paho_module.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerUnavailable(f"mqtt: could not subscribe at {self._where()}: rc={rc}")
        waiter = self._suback[mid] = self._loop.create_future()
        try:
            codes = await asyncio.wait_for(waiter, self.config.connect_timeout)
        except TimeoutError:
            raise BrokerUnavailable(
                f"mqtt: {self._where()} did not confirm the subscription in time"
            ) from None
        finally:
            self._suback.pop(mid, None)
        for address, code in zip(self.addresses, codes, strict=False):
            if getattr(code, "is_failure", False) or getattr(code, "value", 0) >= 0x80:
                raise ConfigurationError(
                    f"mqtt: broker at {self._where()} refused the subscription to "
                    f"{address!r}: {code}"
                )

    def _lost(self, why: str) -> None:
        """The connection is gone: forget deliveries on hand and reconnect in the background."""
        self._connected.clear()
        self._generation += 1
        self._on_hand.clear()
        self._count = 0
        if self._closing or self._reconnector is not None or self._misc is None:
            return  # closing, already reconnecting, or still in the first connect
        logger.warning("mqtt: connection to %s lost (%s); reconnecting", self._where(), why)
        self._reconnector = asyncio.create_task(self._reconnect(), name="amgi-mqtt-reconnect")

    async def _reconnect(self) -> None:
        backoff = Backoff(_RECONNECT_FIRST, self.config.reconnect_delay_max)
        try:
            while not self._closing:
                await backoff.sleep()
                try:
                    await self._open()
                except (OSError, ConfigurationError) as exc:
                    logger.warning(
                        "mqtt: reconnect failed: %s (next try in %.1fs)", exc, backoff.delay
                    )
                    continue
                logger.info("mqtt: reconnected to %s", self._where())
                return
        finally:
            self._reconnector = None

    async def _misc_loop(self) -> None:
        """paho's periodic duties (keepalive pings) on the event loop."""
        while True:
            await asyncio.sleep(_MISC_INTERVAL)
            client = self._client
            if client is not None and self._connected.is_set():
                client.loop_misc()

    # -- paho callbacks (on the event loop thread, or hopped onto it) -------------------

    def _soon(self, callback: Any, *args: Any) -> None:
        """Run ``callback`` on the event loop: now if on its thread, else hop onto it."""
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            callback(*args)
        else:
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._soon(self._loop_add_reader, client, sock)

    def _loop_add_reader(self, client: paho.Client, sock: Any) -> None:
        assert self._loop is not None
        if client is not self._client:
            sock.close()  # a connect that finished after close(): drop it
        elif sock.fileno() >= 0:
            self._loop.add_reader(sock, client.loop_read)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._soon(self._forget_socket, sock)

    def _forget_socket(self, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._soon(self._loop_add_writer, client, sock)

    def _loop_add_writer(self, client: paho.Client, sock: Any) -> None:
        assert self._loop is not None
        if client is self._client and sock.fileno() >= 0:
            self._loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._soon(self._remove_writer, sock)

    def _remove_writer(self, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        waiter = self._connack
        if waiter is not None and not waiter.done():
            failed = getattr(reason, "is_failure", False)
            waiter.set_result((bool(flags.session_present), reason if failed else None))

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        waiter = self._connack
        if waiter is not None and not waiter.done():
            waiter.set_result((False, _CLOSED_BEFORE_CONNACK))
        self._lost(str(reason))

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, codes: list[Any], props: Any
    ) -> None:
        waiter = self._suback.get(mid)
        if waiter is not None and not waiter.done():
            waiter.set_result(list(codes))

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        waiter = self._puback.pop(mid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reason)

    def _on_publish_packet(self, publish: Publish) -> None:
        topic = publish.topic
        headers: HeaderList = []
        attempt = 1
        if publish.user_properties:
            attempt, headers = attempt_from_headers(_headers(publish.user_properties))
        elif self._retry_attempts and not self._v5:
            attempt = self._retry_attempts.pop((topic, publish.payload), 1)
        self._ids += 1
        message = Message(
            str(self._ids),
            headers,
            publish.payload,
            {"mqtt": publish.bindings},
            attempt,
            (self._generation, publish.mid, publish.qos),
        )
        queue = self._on_hand.get(topic)
        if queue is None:
            self._on_hand[topic] = [message]
        else:
            queue.append(message)
        self._count += 1
        self._arrived.set()

    # -- the contract -------------------------------------------------------------------

    async def fetch(self) -> Sequence[Batch]:
        """Wait for messages, linger briefly, return one batch per topic on hand."""
        size = self.config.batch_size
        while not self._count:
            self._arrived.clear()
            await self._arrived.wait()
        if self._count < size and self.config.batch_linger > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.batch_linger
            while self._count < size:
                self._arrived.clear()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
        batches: list[Batch] = []
        on_hand = self._on_hand
        for topic in list(on_hand):
            queue = on_hand[topic]
            if len(queue) <= size:
                del on_hand[topic]
                taken = queue
            else:
                taken = queue[:size]
                del queue[:size]
            self._count -= len(taken)
            batches.append(Batch(topic, taken, key=topic))
        return batches

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        """PUBACK the acked; republish retries (later) and dead letters, then PUBACK them."""
        for message in settlement.acked:
            self._ack(message)
        for retry in settlement.retry:
            send = functools.partial(self._retry, batch.address, retry.message)
            self._retries.schedule(retry.delay, send)
        if settlement.dead:
            await asyncio.gather(
                *(self._dead_letter(batch.address, d.message, d.reason) for d in settlement.dead)
            )

    def _ack(self, message: Message) -> None:
        generation, mid, qos = message.token
        client = self._client
        if qos and generation == self._generation and client is not None:
            client.ack(mid, qos)

    async def _retry(self, topic: str, message: Message) -> None:
        """Republish ``message`` as its next attempt, then PUBACK the original."""
        attempt = message.attempt + 1
        bindings = {"mqtt": {k: v for k, v in message.bindings["mqtt"].items() if k != "retain"}}
        try:
            if self._v5:
                await self.publish(
                    topic,
                    retry_headers(message.headers, attempt=attempt),
                    message.payload,
                    bindings,
                )
            else:
                self._retry_attempts[(topic, message.payload or b"")] = attempt
                await self.publish(topic, [], message.payload, bindings)
        except MqttSendError as exc:
            logger.error(
                "mqtt: could not republish message %s for a retry (%s); it stays "
                "unacknowledged until the server reconnects",
                message.id,
                exc,
            )
            return
        self._ack(message)

    async def _dead_letter(self, topic: str, message: Message, reason: str) -> None:
        headers = dead_letter_headers(
            message.headers, attempt=message.attempt, address=topic, reason=reason
        )
        binding = {k: v for k, v in message.bindings["mqtt"].items() if k != "retain"}
        binding["qos"] = max(1, int(binding.get("qos", 1)))
        target = f"{self.config.dead_letter_prefix}/{topic}"
        try:
            await self.publish(target, headers, message.payload, {"mqtt": binding})
        except MqttSendError as exc:
            logger.error(
                "mqtt: could not dead-letter message %s to %r (%s); it stays "
                "unacknowledged until the server reconnects",
                message.id,
                target,
                exc,
            )
            return
        self._ack(message)

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        """PUBLISH to topic ``address``; for QoS 1 and 2 wait until the broker has it."""
        problem = _topic_problem(address)
        if problem:
            raise MqttSendError(f"mqtt: cannot send to {address!r}: {problem}")
        binding = bindings.get("mqtt") or {}
        qos = binding.get("qos", 1)
        if type(qos) is not int or qos not in (0, 1, 2):
            raise MqttSendError(f"mqtt: cannot send to {address!r}: qos must be 0, 1 or 2")
        props = self._publish_properties(address, headers, binding)
        if not self._connected.is_set():
            if self._client is None or self._closing:
                raise MqttSendError(f"mqtt: cannot send to {address!r}: the server is closed")
            try:
                await asyncio.wait_for(self._connected.wait(), self.config.send_timeout)
            except TimeoutError:
                raise MqttSendError(
                    f"mqtt: cannot send to {address!r}: not connected to {self._where()}"
                ) from None
        client = self._client
        assert client is not None
        assert self._loop is not None
        info = client.publish(
            address,
            payload if payload is not None else b"",
            qos=qos,
            retain=bool(binding.get("retain", False)),
            properties=props,
        )
        if info.rc not in (0, 4):  # success, or queued while reconnecting (NO_CONN)
            raise MqttSendError(f"mqtt: could not send to {address!r}: error code {info.rc}")
        if qos == 0:
            return
        if info.is_published():
            return
        waiter = self._puback[info.mid] = self._loop.create_future()
        try:
            reason = await asyncio.wait_for(waiter, self.config.send_timeout)
        except TimeoutError:
            raise MqttSendError(
                f"mqtt: {self._where()} did not acknowledge the send to {address!r} "
                f"within {self.config.send_timeout}s"
            ) from None
        finally:
            self._puback.pop(info.mid, None)
        if getattr(reason, "is_failure", False):
            raise MqttSendError(f"mqtt: broker refused the send to {address!r}: {reason}")

    def _publish_properties(
        self, address: str, headers: HeaderList, binding: dict[str, Any]
    ) -> Any:
        if not self._v5:
            if headers and not self._warned_headers:
                self._warned_headers = True
                logger.warning("mqtt: MQTT 3.1.1 has no user properties; headers are dropped")
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if headers:
            props.UserProperty = _user_properties(headers)
        for prop, key in _PROPERTY_BINDINGS:
            value = binding.get(key)
            if value is None:
                continue
            if key == "correlationData" and isinstance(value, str):
                value = value.encode()
            kind = _BINDING_TYPES[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise MqttSendError(
                    f"mqtt: cannot send to {address!r}: binding {key} must be "
                    f"{_BINDING_TYPE_NAMES[key]}, not {value!r}"
                )
            if isinstance(value, int) and not 0 <= value < 2**32:
                raise MqttSendError(f"mqtt: cannot send to {address!r}: {key} is out of range")
            setattr(props, prop, value)
        return props

    async def close(self) -> None:
        """Disconnect, keeping the session (and every unacknowledged message) on the broker."""
        self._closing = True
        # Retries still waiting are dropped (their originals stay unacknowledged and come
        # back); those publishing get the send timeout to finish.
        await self._retries.close(timeout=self.config.send_timeout)
        tasks = [t for t in (self._reconnector, self._misc) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._misc = None
        client, self._client = self._client, None
        if client is not None:
            if self._connected.is_set():
                client.disconnect()
                client.loop_write()
            sock = client.socket()
            if sock is not None and self._loop is not None:
                self._forget_socket(sock)
            with contextlib.suppress(Exception):
                client._sock_close()
        self._connected.clear()
        self._generation += 1
        self._on_hand.clear()
        self._count = 0
        for waiter in (*self._puback.values(), *self._suback.values()):
            if not waiter.done():
                waiter.cancel()
        self._puback.clear()
        self._suback.clear()


def _user_properties(headers: HeaderList) -> list[tuple[str, str]]:
    """Headers as MQTT 5 user properties, which are UTF-8 strings without NUL.

    A header that is not such a string on both sides travels as a ``amgi-b64`` property
    whose value is ``base64(name).base64(value)``; :func:`_headers` turns it back.
    """
    out: list[tuple[str, str]] = []
    for name, value in headers:
        if b"\x00" not in name and b"\x00" not in value:
            try:
                out.append((name.decode(), value.decode()))
                continue
            except UnicodeDecodeError:
                pass
        packed = b".".join((base64.b64encode(name), base64.b64encode(value)))
        out.append((_BINARY_HEADER, packed.decode()))
    return out


def _headers(pairs: Sequence[tuple[str, str]]) -> HeaderList:
    """MQTT 5 user properties as headers (see :func:`_user_properties`)."""
    out: HeaderList = []
    for name, value in pairs:
        if name == _BINARY_HEADER:
            encoded_name, _, encoded_value = value.partition(".")
            try:
                out.append((base64.b64decode(encoded_name), base64.b64decode(encoded_value)))
                continue
            except ValueError:
                pass
        out.append((name.encode(), value.encode()))
    return out


_BINARY_HEADER = "amgi-b64"

_PROPERTY_BINDINGS: tuple[tuple[str, str], ...] = (
    ("MessageExpiryInterval", "messageExpiryInterval"),
    ("ContentType", "contentType"),
    ("CorrelationData", "correlationData"),
    ("ResponseTopic", "responseTopic"),
    ("PayloadFormatIndicator", "payloadFormatIndicator"),
)
"""MQTT 5 PUBLISH properties carried as ``mqtt`` bindings, by AsyncAPI's names."""

_BINDING_TYPES: dict[str, type | tuple[type, ...]] = {
    "messageExpiryInterval": int,
    "contentType": str,
    "correlationData": (bytes, bytearray),
    "responseTopic": str,
    "payloadFormatIndicator": int,
}
_BINDING_TYPE_NAMES = {
    "messageExpiryInterval": "an int (seconds)",
    "contentType": "a str",
    "correlationData": "bytes or a str",
    "responseTopic": "a str",
    "payloadFormatIndicator": "0 or 1",
}
