"""The paho client on the event loop: connection, callbacks, reconnection (private)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import struct
import threading
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final

from amgi.errors import BrokerUnavailable, ConfigurationError, SendError
from amgi.servers.kit import (
    Backoff,
    DelayedRepublisher,
    attempt_from_headers,
    client_context,
)
from amgi.servers.mqtt._attempts import RetryAttempts
from amgi.servers.mqtt._codec import (
    _BINDING_TYPE_NAMES,
    _BINDING_TYPES,
    _PROPERTY_BINDINGS,
    Publish,
    _headers,
    _user_properties,
    decode_publish,
)
from amgi.servers.mqtt._linger import linger_until_peer_closes
from amgi.servers.mqtt.options import NOT_MQTT_TEXT, MqttOptions, _topic_problem, _utf8_over
from amgi.transport import Bindings, DeadLetter, HeaderList, Message, Retry, Settlement

if TYPE_CHECKING:
    import paho.mqtt.client as paho

logger = logging.getLogger("amgi.servers.mqtt")


def _client_class() -> type[paho.Client]:
    """A paho client that hands each PUBLISH over at once and acknowledges it on :meth:`ack`.

    Acknowledgement is always manual: PUBACK for QoS 1; for QoS 2 PUBREC (paho would send
    it on receipt and hand the message over only on PUBREL, so a crash in between would
    lose it), then PUBCOMP when the broker answers with PUBREL.
    """
    import paho.mqtt.client as paho
    from paho.mqtt.enums import MessageState, MQTTErrorCode, MQTTProtocolVersion

    class Client(paho.Client):
        on_publish_packet: Any = None
        on_pingresp: Any = None

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

        def _handle_pingresp(self) -> MQTTErrorCode:
            rc = super()._handle_pingresp()
            if self.on_pingresp is not None:
                self.on_pingresp()
            return rc

        def _handle_pubrec(self) -> MQTTErrorCode:
            # MQTT 5: a PUBREC with a failure code is the broker refusing a QoS 2 PUBLISH,
            # which ends the exchange there. paho ignores the code and sends PUBREL, which
            # the broker answers with a PUBCOMP (success) whether it holds the message or
            # not: a refused copy read as taken, and its original was acknowledged.
            # Read here (packet id, then the reason code, absent for success): paho's own
            # decoder is a private module that moved between versions.
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
            from paho.mqtt.reasoncodes import ReasonCode

            packet = self._in_packet["packet"]
            if self._protocol != MQTTProtocolVersion.MQTTv5 or len(packet) < 3:
                return super()._handle_pubrec()
            code = packet[2]
            if code < 0x80:  # success (0x00) or no matching subscribers (0x10)
                return super()._handle_pubrec()
            (mid,) = struct.unpack_from("!H", packet, 0)
            reason = ReasonCode(PacketTypes.PUBREC, identifier=code)
            with self._out_message_mutex:
                if mid not in self._out_messages:
                    return MQTTErrorCode.MQTT_ERR_SUCCESS
                properties = Properties(PacketTypes.PUBREC)  # type: ignore[no-untyped-call]
                return self._do_on_publish(mid, reason, properties)

        def _handle_pubrel(self) -> MQTTErrorCode:
            (mid,) = struct.unpack_from("!H", self._in_packet["packet"], 0)
            return self._send_pubcomp(mid)

        def withdraw(self, mid: int) -> bool:
            """Forget outgoing PUBLISH ``mid`` so that no reconnect sends it again, unless
            the broker has it already (QoS 2 past PUBREC): whether it is gone. Called
            between connections: the reconnect counts the messages in flight afresh."""
            with self._out_message_mutex:
                message = self._out_messages.get(mid)
                if message is not None:
                    if message.state in (
                        MessageState.MQTT_MS_WAIT_FOR_PUBCOMP,
                        MessageState.MQTT_MS_RESEND_PUBREL,
                    ):
                        return False
                    del self._out_messages[mid]
            return True

        def ack(self, mid: int, qos: int) -> MQTTErrorCode:
            if qos == 1:
                return self._send_puback(mid)
            if qos == 2:
                return self._send_pubrec(mid)
            return MQTTErrorCode.MQTT_ERR_SUCCESS

    return Client


_CLOSED_BEFORE_CONNACK: Final = object()


_HUNG_UP: Final = object()
"""The outcome of a send the broker hung up on twice (``_fail_sends_hung_up_on``)."""

_HUNG_UP_AT_ONCE = 2.0
"""Seconds after a CONNACK within which a connection that ends has ended on what paho
sent again at once."""


_MISC_INTERVAL = 1.0


_CLOSE_WAIT = 2.0
"""Seconds a hang-up waits for the broker to end the connection after DISCONNECT."""


_RECONNECT_FIRST = 0.1
_STABLE: Final = 10.0
"""Seconds a connection must last before its loss starts the reconnect delays afresh;
a shorter one (a broker that drops each new connection) keeps doubling them."""


class MqttSendError(SendError):
    """The MQTT broker did not take a message (not connected, refused, timed out)."""


class HungUpOnSend(MqttSendError):
    """The broker ended the connections a send went out on (``_fail_sends_hung_up_on``):
    it cannot take the message, or the network failed twice in a row."""


class RuledOut(MqttSendError):
    """A send the connection rules out (the broker's Maximum QoS or Packet Size, Retain
    Available; no QoS 1 for a dead letter): refused again at every try until the next."""


class Refusals:
    """Whether the last try of each message's copy was :class:`RuledOut` (``move_aside``)."""

    def __init__(self) -> None:
        self._last: dict[str, bool] = {}

    async def watch(self, message: Message, send: Awaitable[None]) -> None:
        """Await ``send``, the copy of ``message``, noting how it failed."""
        try:
            await send
        except BaseException as exc:
            self._last[message.id] = isinstance(exc, RuledOut)
            raise
        self._last.pop(message.id, None)

    def certain(self) -> bool:
        """Whether every copy not published yet was ruled out at its last try."""
        return bool(self._last) and all(self._last.values())


class SubscriptionLost(BrokerUnavailable):
    """The connection ended before the broker confirmed the subscription, or before it
    went out (another connection with the client id took the session over, say)."""


_VARINT_SIZES: Final = ((1, 2**7), (2, 2**14), (3, 2**21), (4, 2**28))
"""Bytes of MQTT's variable byte integer, by the value it must stay under."""

_MAX_FIELD = 65535
"""The longest string or binary field of an MQTT packet, in bytes."""


def _property_problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the MQTT 5 property of binding ``key``: paho
    would fail half-way with a bare struct error, or the broker may disconnect (a
    control character in a string: Mosquitto does; a wildcard in a response topic,
    which MQTT 5 forbids: Mosquitto lets it through)."""
    kind = _BINDING_TYPES[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        return f"must be {_BINDING_TYPE_NAMES[key]}, not {value!r:.60}"
    if isinstance(value, int):
        if key == "payloadFormatIndicator" and value not in (0, 1):
            return f"must be 0 or 1, not {value}"
        if not 0 <= value < 2**32:
            return "is out of range"
        return None
    if isinstance(value, str):
        if _utf8_over(value, _MAX_FIELD):
            return f"is {len(value.encode())} bytes, over MQTT's {_MAX_FIELD}"
        if NOT_MQTT_TEXT.search(value):
            return "must not contain control characters, surrogates or Unicode noncharacters"
    elif isinstance(value, bytes | bytearray):
        if len(value) > _MAX_FIELD:
            return f"is {len(value)} bytes, over MQTT's {_MAX_FIELD}"
    else:
        return None
    if key == "responseTopic" and isinstance(value, str):
        return _topic_problem(value)
    return None


class MqttClient:
    """The paho client driven by the event loop, its callbacks and connection state."""

    addresses: list[str]
    config: MqttOptions

    def _init_client(self) -> None:
        """Set up the state (called by the transport's ``__init__``)."""
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
        self._q0_prefix = f"q0-{uuid.uuid4().hex[:8]}-"
        """QoS 0 ids: never redelivered, so unique to this process (not the ledger's)."""
        self._connack: asyncio.Future[tuple[bool, Any]] | None = None
        self._session_present = False
        """The broker resumed a session (CONNACK) on the last connection."""
        self._suback: dict[int, asyncio.Future[list[Any]]] = {}
        self._puback: dict[int, asyncio.Future[Any]] = {}
        self._retries = DelayedRepublisher("mqtt")
        self._reconnector: asyncio.Task[None] | None = None
        self._reconnect_delays: Backoff | None = None
        self._max_packet: int | None = None
        """The broker's Maximum Packet Size from its last CONNACK (MQTT 5), if it set one."""
        self._max_qos = 2
        self._retain_available = True
        """The broker's Maximum QoS and Retain Available from its last CONNACK (MQTT 5)."""
        self._granted_qos = 2
        """The lowest QoS the last SUBACK granted (MQTT 3.1.1 announces no maximum QoS:
        a broker that grants 0 for QoS 1 hangs up on a QoS 1 PUBLISH)."""
        self._warned_granted = False
        self._dead_letters_at_qos0 = False
        """A dead-letter session made at connect was granted QoS 0: no dead letter is kept."""
        self._up_since = 0.0
        """Loop time the current connection was made (first connect or reconnect)."""
        self._misc: asyncio.Task[None] | None = None
        self._closing = False
        self._v5 = True
        self._warned_headers = False
        self._retry_attempts = RetryAttempts(self.addresses)
        """MQTT 3.1.1 only: attempts of republished retries, by topic and payload."""
        self._unsent_acks: dict[int, str] = {}
        """Packet id -> topic of messages settled after their connection was lost: the
        broker sends them again (DUP, same packet id) and they are acknowledged at once."""
        self._arrivals: dict[int, int] = {}
        """Packet id -> connection generation of the last message delivered with it: an
        ack that could not be sent is remembered only while no newer message took the id."""
        self._moving: dict[int, tuple[str, asyncio.Future[bool]]] = {}
        """Packet id -> (topic, outcome) of messages whose retry or dead-letter copy is
        being published: a resend of one waits for the outcome."""
        self._sent_out = False
        """A CONNACK came on the current connection: paho has sent every PUBLISH not
        acknowledged yet (again, after a reconnect)."""
        self._connack_at = 0.0
        """Loop time of the last CONNACK."""
        self._session_began = 0
        """Generation of the connection whose CONNACK began the current session: the
        broker forgot the deliveries of older ones."""
        self._hung_up_on: set[int] = set()
        """Packet ids of sends outstanding when a connection that had them out ended."""
        self._dead_sent: dict[tuple[str, int], asyncio.Future[Any]] = {}
        """(topic, packet id) of an original -> the PUBACK of its dead letter, published
        and not confirmed yet: a later try waits for that copy instead of sending another."""

    def _client_id(self) -> str:
        if self.config.client_id:
            return self.config.client_id
        if not self.addresses:
            return f"amgi-send-{uuid.uuid4().hex[:16]}"
        digest = hashlib.sha256("\n".join(sorted(self.addresses)).encode()).hexdigest()
        return f"amgi-{digest[:20]}"

    def _where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

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
            async with asyncio.timeout(c.connect_timeout):
                present, reason = await self._connack
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
        self._session_present = present
        if self.addresses:
            # Always (re)subscribe: the filters may have changed since the session began.
            await self._subscribe(client, paho)
        self._up_since = self._loop.time()
        self._connected.set()

    def _start_client(self) -> None:
        """A new paho client for :meth:`_open`, bound to the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._closing = False
        self._v5 = self.config.protocol == "5"
        self._client = self._new_client()

    async def _hang_up(self, properties: Any = None) -> None:
        """Send DISCONNECT (with MQTT 5 ``properties``) if connected, wait until the broker
        has read everything before it, and drop the client."""
        client, self._client = self._client, None
        if client is not None:
            sock = client.socket()
            if sock is not None and self._loop is not None:
                self._forget_socket(sock)
            if sock is not None and self._connected.is_set():
                # paho closes its socket right after writing DISCONNECT; a copy keeps the
                # connection open until the broker has read everything before it.
                with linger_until_peer_closes(sock.fileno(), _CLOSE_WAIT) as drained:
                    client.disconnect(properties=properties)
                    client.loop_write()
                    await drained
            with contextlib.suppress(Exception):
                client._sock_close()
        self._connected.clear()
        self._generation += 1

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
        if rc == paho_module.MQTT_ERR_NO_CONN:
            raise SubscriptionLost(
                f"mqtt: {self._where()} closed the connection before the subscription went out"
            )
        if rc != paho_module.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerUnavailable(f"mqtt: could not subscribe at {self._where()}: rc={rc}")
        waiter = self._suback[mid] = self._loop.create_future()
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                codes = await waiter
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
        self._note_granted(codes)

    def _note_granted(self, codes: list[Any]) -> None:
        """Record the lowest QoS the SUBACK granted; warn (once) if below the one asked."""
        qos = self.config.qos
        granted = [int(getattr(code, "value", qos)) for code in codes]
        self._granted_qos = min(granted, default=qos)
        lower = [(a, g) for a, g in zip(self.addresses, granted, strict=False) if g < qos]
        if not lower or self._warned_granted:
            return
        self._warned_granted = True
        address, lowest = min(lower, key=lambda pair: pair[1])
        if lowest == 0:
            means = (
                "its messages come at most once (QoS 0: never acknowledged, never sent "
                "again), so a crash or a lost connection loses them: at-least-once is NOT "
                "kept, and no dead letter can be stored (Mosquitto: max_qos)"
            )
        else:
            means = "its messages come at least once, not exactly once"
        logger.warning(
            "mqtt: broker at %s granted QoS %d for %r, not the QoS %d asked: %s",
            self._where(),
            lowest,
            address,
            qos,
            means,
        )

    def _no_qos1(self) -> str | None:
        """Why the broker takes no QoS 1 PUBLISH on this connection (None if it does):
        a dead letter sent at QoS 0 would not be kept."""
        if self._max_qos < 1:
            return "its CONNACK's maximum QoS is 0"
        if self._granted_qos < 1 <= self.config.qos:
            return f"it granted QoS 0 for a subscription at QoS {self.config.qos}"
        if self._dead_letters_at_qos0:
            return "it granted the dead-letter session QoS 0"
        return None

    def _report_stranded(self, topic: str, stranded: list[Message], ruled_out: bool) -> None:
        """The one ERROR line for nacked messages left where they are, and why."""
        cause = " (this connection rules their copies out, as said above)" if ruled_out else ""
        kept = sum(1 for m in stranded if m.token[2])
        if kept:
            logger.error(
                "mqtt: %d nacked message(s) of %r stay unacknowledged until the server "
                "reconnects%s",
                kept,
                topic,
                cause,
            )
        if len(stranded) > kept:
            logger.error(
                "mqtt: %d nacked QoS 0 message(s) of %r are dropped: they could not be moved "
                "aside%s, and the broker never sends a QoS 0 message again",
                len(stranded) - kept,
                topic,
                cause,
            )

    def _lost(self, why: str) -> None:
        """The connection is gone: forget deliveries on hand and reconnect in the background."""
        if self._sent_out:
            self._sent_out = False
            self._fail_sends_hung_up_on()
        self._connected.clear()
        self._generation += 1
        self._forget_resent()
        for waiter in self._suback.values():
            if not waiter.done():
                waiter.set_exception(
                    SubscriptionLost(
                        f"mqtt: {self._where()} closed the connection before confirming the "
                        f"subscription ({why})"
                    )
                )
        if self._closing or self._reconnector is not None or self._misc is None:
            return  # closing, already reconnecting, or still in the first connect
        assert self._loop is not None
        lasted = self._loop.time() - self._up_since
        backoff = self._reconnect_delays
        if backoff is None or lasted >= _STABLE:
            backoff = self._reconnect_delays = Backoff(
                _RECONNECT_FIRST, self.config.reconnect_delay_max
            )
        logger.warning(
            "mqtt: connection to %s lost after %.1fs (%s); reconnecting in %.1fs",
            self._where(),
            lasted,
            why,
            backoff.delay,
        )
        self._reconnector = asyncio.create_task(
            self._reconnect(backoff), name="amgi-mqtt-reconnect"
        )

    def _forget_resent(self) -> None:
        """Drop the QoS 1 and 2 messages on hand: the broker sends them again. A QoS 0
        one it never does stays (acknowledging it sends nothing)."""
        kept = {t: [m for m in q if not m.token[2]] for t, q in self._on_hand.items()}
        self._on_hand = {t: q for t, q in kept.items() if q}
        self._count = sum(len(q) for q in self._on_hand.values())

    def _fail_sends_hung_up_on(self) -> None:
        """Fail the sends outstanding when a connection that had them out ends, and the
        next, which sent them again, ends at once.

        A broker hangs up, without an answer, on a PUBLISH it cannot take (over its packet
        size, which MQTT 3.1.1 does not announce); paho sends it again after each
        reconnect, and the broker ended each connection before the subscription: the
        server never heard again.
        """
        assert self._loop is not None
        client = self._client
        at_once = self._loop.time() - self._connack_at < _HUNG_UP_AT_ONCE
        for mid, waiter in list(self._puback.items()):
            if waiter.done():  # given up on (timed out): its PUBACK is for nobody
                self._hung_up_on.discard(mid)
            elif mid not in self._hung_up_on or not at_once:
                self._hung_up_on.add(mid)  # a loss the network may have caused
            elif client is None or client.withdraw(mid):  # type: ignore[attr-defined]
                self._hung_up_on.discard(mid)
                del self._puback[mid]
                waiter.set_result(_HUNG_UP)

    async def _reconnect(self, backoff: Backoff) -> None:
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
        if not flags.session_present:
            self._unsent_acks.clear()  # a new session: nothing will be sent again
            self._session_began = self._generation
        # MQTT 5: the broker's limit, when it has one; it disconnects a client that
        # sends a larger packet (and paho would send it again after each reconnect).
        self._max_packet = getattr(props, "MaximumPacketSize", None)
        # Likewise for a QoS above its Maximum QoS, or a retained message it cannot keep.
        self._max_qos = getattr(props, "MaximumQoS", 2)
        self._retain_available = bool(getattr(props, "RetainAvailable", 1))
        failed = getattr(reason, "is_failure", False)
        self._sent_out = not failed  # paho sends what is outstanding once this returns
        if self._loop is not None:
            self._connack_at = self._loop.time()
        waiter = self._connack
        if waiter is not None and not waiter.done():
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
        self._hung_up_on.discard(mid)
        if waiter is not None and not waiter.done():
            waiter.set_result(reason)

    def _on_publish_packet(self, publish: Publish) -> None:
        if (
            publish.dup
            and publish.qos
            and (self._unsent_acks or self._moving)
            and self._settled_before(publish)
        ):
            return
        self._deliver(publish)

    def _settled_before(self, publish: Publish) -> bool:
        """A resend of a message already settled (or being moved aside): PUBACK it then.

        A session keeps an unacknowledged message's packet id until it is acknowledged,
        so a DUP PUBLISH with that id on that topic is the same message.
        """
        mid, topic = publish.mid, publish.topic
        if self._unsent_acks.get(mid) == topic:
            del self._unsent_acks[mid]
            self._ack_resend(publish, self._generation)
            return True
        moving = self._moving.get(mid)
        if moving is None or moving[0] != topic:
            return False
        generation = self._generation

        def decided(outcome: asyncio.Future[bool]) -> None:
            if outcome.cancelled() or not outcome.result():
                if generation == self._generation:
                    self._deliver(publish)  # not moved: the app gets it again
            else:
                # The copy is on the broker: this resend is the original to acknowledge
                # (not a later one, which _ack may have expected when it could not).
                if self._unsent_acks.get(mid) == topic:
                    del self._unsent_acks[mid]
                self._ack_resend(publish, generation)

        moving[1].add_done_callback(decided)
        return True

    def _ack_resend(self, publish: Publish, generation: int) -> None:
        client = self._client
        if generation == self._generation and client is not None:
            client.ack(publish.mid, publish.qos)
        else:
            self._unsent_acks[publish.mid] = publish.topic

    def _deliver(self, publish: Publish) -> None:
        topic = publish.topic
        if publish.qos:
            # This packet id now names the message delivered here.
            self._unsent_acks.pop(publish.mid, None)
            self._arrivals[publish.mid] = self._generation
        headers: HeaderList = []
        attempt = 1
        if publish.user_properties:
            attempt, headers = attempt_from_headers(_headers(publish.user_properties))
        elif self._retry_attempts and not self._v5:
            attempt = self._retry_attempts.take(topic, publish.payload)
        if publish.qos:
            # The session keeps the packet id until the message is acknowledged, and a
            # resend (after a reconnect or a crash) carries it again: a stable id.
            mid = str(publish.mid)
        else:
            self._ids += 1
            mid = f"{self._q0_prefix}{self._ids}"
        message = Message(
            mid,
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

    async def _publish(
        self,
        address: str,
        headers: HeaderList,
        payload: bytes | None,
        bindings: Bindings,
        timeout: float | None,
    ) -> None:
        """:meth:`publish`, waiting up to ``timeout`` for a connection and for the PUBACK.

        A retry copy waits as long as it takes (``None``; close() cancels it): a broker
        that is slow or away has not refused it, and a copy it takes late must not have
        been dead-lettered meanwhile (paho sends it again after a reconnect).
        """
        sent = await self._send(address, headers, payload, bindings, timeout)
        try:
            await self._confirmed(sent, address, timeout)
        finally:
            if not sent.done():
                sent.cancel()  # its PUBACK, if it comes, is for nobody

    async def _confirmed(
        self, sent: asyncio.Future[Any], address: str, timeout: float | None
    ) -> None:
        """Wait up to ``timeout`` for the outcome of a :meth:`_send` (it goes on after);
        raise :class:`MqttSendError` if it is late or a refusal."""
        try:
            async with asyncio.timeout(timeout):
                reason = await asyncio.shield(sent)
        except TimeoutError:
            raise MqttSendError(
                f"mqtt: {self._where()} did not acknowledge the send to {address!r} "
                f"within {timeout}s"
            ) from None
        if reason is _HUNG_UP:
            raise HungUpOnSend(
                f"mqtt: {self._where()} did not acknowledge the send to {address!r}: it "
                f"hung up each time the send went out (twice), so it does not take it "
                f"({self._why_hung_up()})"
            )
        if getattr(reason, "is_failure", False):
            raise MqttSendError(f"mqtt: broker refused the send to {address!r}: {reason}")

    def _why_hung_up(self) -> str:
        """The likely reason a broker hangs up on a PUBLISH (MQTT 3.1.1 announces no
        limits: Mosquitto does it for a packet over its size, or a QoS over its maximum)."""
        if not self._v5 and self._granted_qos < 1:
            return (
                "at QoS 1 or 2: it granted QoS 0 for a subscription, as a broker that takes "
                "nothing above QoS 0 does (Mosquitto: max_qos), which MQTT 3.1.1 does not "
                "announce; send at qos 0"
            )
        return "over its maximum packet size or its maximum QoS, say"

    async def _send(
        self,
        address: str,
        headers: HeaderList,
        payload: bytes | None,
        bindings: Bindings,
        timeout: float | None,
    ) -> asyncio.Future[Any]:
        """PUBLISH once (waiting up to ``timeout`` for a connection); return the future
        of its PUBACK's reason code (done at once for QoS 0)."""
        problem = _topic_problem(address)
        if problem:
            raise MqttSendError(f"mqtt: cannot send to {address!r}: {problem}")
        binding = bindings.get("mqtt") or {}
        qos = binding.get("qos", 1)
        if type(qos) is not int or qos not in (0, 1, 2):
            raise MqttSendError(f"mqtt: cannot send to {address!r}: qos must be 0, 1 or 2")
        retain = binding.get("retain", False)
        if type(retain) is not bool and retain is not None:
            raise MqttSendError(
                f"mqtt: cannot send to {address!r}: binding retain must be a bool, not "
                f"{retain!r:.60}"
            )
        props = self._publish_properties(address, headers, binding)
        if not self._connected.is_set():
            if self._client is None or self._closing:
                raise MqttSendError(f"mqtt: cannot send to {address!r}: the server is closed")
            try:
                async with asyncio.timeout(timeout):
                    await self._connected.wait()
            except TimeoutError:
                raise MqttSendError(
                    f"mqtt: cannot send to {address!r}: not connected to {self._where()}"
                ) from None
        self._check_connack_limits(address, qos, bool(retain))
        self._check_packet_size(address, payload or b"", qos, props)
        client = self._client
        assert client is not None
        assert self._loop is not None
        info = client.publish(
            address,
            payload if payload is not None else b"",
            qos=qos,
            retain=bool(retain),
            properties=props,
        )
        if info.rc not in (0, 4):  # success, or queued while reconnecting (NO_CONN)
            raise MqttSendError(f"mqtt: could not send to {address!r}: error code {info.rc}")
        waiter: asyncio.Future[Any] = self._loop.create_future()
        if qos == 0 or info.is_published():
            waiter.set_result(None)
        else:
            self._puback[info.mid] = waiter
        return waiter

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
            pairs = _user_properties(headers)
            for field_name, field_value in pairs:
                if _utf8_over(field_name, _MAX_FIELD) or _utf8_over(field_value, _MAX_FIELD):
                    raise MqttSendError(
                        f"mqtt: cannot send to {address!r}: header {field_name!r:.40} or its value "
                        f"is over {_MAX_FIELD} bytes, MQTT's limit for a user property"
                    )
            props.UserProperty = pairs
        for prop, key in _PROPERTY_BINDINGS:
            value = binding.get(key)
            if value is None:
                continue
            if key == "correlationData" and isinstance(value, str):
                value = value.encode()
            problem = _property_problem(key, value)
            if problem:
                raise MqttSendError(f"mqtt: cannot send to {address!r}: binding {key} {problem}")
            setattr(props, prop, value)
        return props

    def _check_connack_limits(self, topic: str, qos: int, retain: bool) -> None:
        """Refuse a PUBLISH the broker's CONNACK ruled out (it would disconnect)."""
        if qos > self._max_qos:
            raise RuledOut(
                f"mqtt: cannot send to {topic!r}: qos {qos} is over the broker's maximum "
                f"QoS of {self._max_qos}"
            )
        if retain and not self._retain_available:
            raise RuledOut(
                f"mqtt: cannot send to {topic!r}: the broker does not take retained messages"
            )

    def _check_packet_size(self, topic: str, payload: bytes, qos: int, props: Any) -> None:
        """Refuse a PUBLISH over the broker's Maximum Packet Size before it is written."""
        limit = self._max_packet
        if limit is None:
            return
        remaining = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
        if props is not None:
            remaining += len(props.pack())
        size = 1 + next(n for n, top in _VARINT_SIZES if remaining < top) + remaining
        if size > limit:
            raise RuledOut(
                f"mqtt: cannot send to {topic!r}: the packet would be {size} bytes, over the "
                f"broker's maximum packet size of {limit} bytes"
            )

    def _resent_since(self, message: Message) -> bool:
        """Whether the broker has sent ``message`` again since this delivery: a newer one
        took its packet id in the same session (which holds the id until the message is
        acknowledged), and that resend is the app's to settle."""
        generation, mid, qos = message.token
        return bool(qos) and self._session_began <= generation < self._arrivals.get(mid, -1)

    def _without_resent(self, settlement: Settlement) -> Settlement:
        """``settlement`` less the nacks of deliveries sent again since: moving them aside
        as well started a second retry chain for one message (two dead letters in the end).
        """
        if not settlement.retry and not settlement.dead:
            return settlement
        why = "the broker has sent the message again since; that delivery settles it"
        retry: list[Retry] = []
        for r in settlement.retry:
            if self._resent_since(r.message):
                r.not_scheduled(why)
            else:
                retry.append(r)
        dead: list[DeadLetter] = []
        for d in settlement.dead:
            if self._resent_since(d.message):
                d.not_stored(why)
            else:
                dead.append(d)
        return Settlement(settlement.acked, retry, dead)

    def _ack(self, message: Message) -> None:
        generation, mid, qos = message.token
        client = self._client
        if not qos:
            return
        if generation == self._generation and client is not None:
            client.ack(mid, qos)
        elif self._arrivals.get(mid) == generation:
            # The connection is gone; the broker sends it again with this packet id,
            # unless it already did and that resend was delivered (a newer arrival).
            self._unsent_acks[mid] = message.bindings["mqtt"]["topic"]

    def _tls_context(self) -> ssl.SSLContext:
        """The TLS context of the options (a file it cannot load: one clear error)."""
        c = self.config
        return client_context(
            "mqtt",
            ("--ca-file", c.ca_file),
            ("--cert-file", c.cert_file),
            ("--key-file", c.key_file),
            check_hostname=not c.tls_insecure,
        )

    def _new_client(self) -> paho.Client:
        """A paho client set up from the options, its callbacks pointing here."""
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        c = self.config
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
            client.tls_set_context(self._tls_context())
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
        return client
