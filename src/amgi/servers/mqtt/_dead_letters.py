"""Dead letters of the MQTT server: one persistent session per topic filter (private).

The dead letter of a message consumed on filter ``F`` is published to ``PREFIX/<topic>``,
and an MQTT broker keeps a message only for the sessions subscribed when it arrives. So
a server that consumes ``F`` also creates (or renews) a session of its own for ``F``'s
dead letters at connect: client id ``amgi-dl-<hash of PREFIX/F>``, subscribed at QoS 1 to
``PREFIX/F``, never expiring, and disconnected at once. The broker queues every dead
letter for it, whoever reads them or not.

``list`` resumes that session, lets the broker send what it holds (up to the Receive
Maximum), and hangs up without acknowledging anything: the broker keeps those messages
in flight for the session and sends them again, first and in their order, on its next
connection. A replay publishes each dead letter back to its topic at QoS 1, and only once
the broker acknowledged the copy acknowledges (PUBACK) the dead letter; whatever a killed
replay had not acknowledged stays in the session.

The broker sends no "nothing more" marker: a PINGREQ is. A broker handles a client's
packets in order and sends what a PUBACK freed before it answers the next packet, so
once the PINGRESP is in, everything the broker would send now has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.servers.kit import stored_dead_letter
from amgi.servers.mqtt._client import MqttClient, SubscriptionLost
from amgi.servers.mqtt.options import MqttOptions, validate_filter
from amgi.transport import Bindings, HeaderList, Message, StoredDeadLetter

if TYPE_CHECKING:
    import paho.mqtt.client as paho

    from amgi.servers.mqtt._codec import Publish

__all__ = [
    "DEAD_AT_HEADER",
    "DeadLetterSession",
    "DeadLetters",
    "dead_at_header",
    "dead_letter_client_id",
    "dead_letter_filter",
]

logger = logging.getLogger("amgi.servers.mqtt")

_NEVER = 0xFFFFFFFF
"""MQTT 5 session expiry interval of a session that never expires."""
_MOST = 65535
"""The largest Receive Maximum: what one listing can show at most."""
_REPLAY_CHUNK = 100
_TAKEOVER_TRIES = 10
"""Connections a server makes to create a dead-letter session that others take over."""
_NO_REASON = "(not recorded: MQTT 3.1.1 carries no user properties)"
DEAD_AT_HEADER = b"amgi-dead-at"
"""When the server dead-lettered the message, in milliseconds since the epoch (MQTT
messages carry no time of their own; MQTT 5 only): what ends a replay."""


def dead_at_header() -> tuple[bytes, bytes]:
    """The :data:`DEAD_AT_HEADER` of a dead letter published now."""
    return DEAD_AT_HEADER, str(round(time.time() * 1000)).encode()


def dead_letter_client_id(prefix: str, address: str) -> str:
    """The client id of the session keeping the dead letters of consumed filter ``address``."""
    digest = hashlib.sha256(dead_letter_filter(prefix, address).encode()).hexdigest()[:20]
    return f"amgi-dl-{digest}"


def dead_letter_filter(prefix: str, address: str) -> str:
    """The filter of the dead letters of consumed filter ``address`` (shared or not)."""
    if address.startswith("$share/"):
        address = address.split("/", 2)[2]
    return f"{prefix}/{address}"


class DeadLetterSession(MqttClient):
    """A connection to the dead-letter session of one consumed topic filter.

    ``create`` (a server at connect) subscribes the session, creating it if needed;
    otherwise (``amgi dead-letters``) only an existing session is resumed. What the broker
    sends is collected in :attr:`arrived`, in order, and acknowledged only by :meth:`ack`.
    """

    def __init__(
        self, address: str, options: MqttOptions, *, receive_maximum: int, create: bool
    ) -> None:
        self.address = address
        dead = dead_letter_filter(options.dead_letter_prefix, address)
        self.addresses = [dead]
        self.config = replace(
            options,
            client_id=dead_letter_client_id(options.dead_letter_prefix, address),
            qos=1,
            session_expiry=_NEVER,
            receive_maximum=receive_maximum,
        )
        self._create = create
        self._init_client()
        self.arrived: deque[Message] = deque()
        self._pings: deque[asyncio.Future[bool]] = deque()
        self._why = ""

    async def open(self) -> None:
        """Connect; without ``create``, a missing session is one clear error (and removed)."""
        self._start_client()
        try:
            await self._open()
            if not self._create and not self._session_present:
                await self._forget()
                raise ConfigurationError(
                    f"mqtt: no dead letters are kept for {self.address!r} at {self._where()}: "
                    f"no server consuming it has started with --keep-dead-letters (session "
                    f"{self.config.client_id} does not exist or expired)"
                )
        except BaseException:
            await self.close()
            raise

    async def _forget(self) -> None:
        """Remove the session the connection just created by resuming a missing one."""
        if self._v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
            await self._hang_up(props)
            return
        # MQTT 3.1.1 cannot change that at DISCONNECT; a clean session with the same id ends it.
        await self._hang_up()
        self.addresses = []
        self._start_client()
        await self._open()
        await self._hang_up()

    async def _subscribe(self, client: paho.Client, paho_module: Any) -> None:
        if self._create:
            await super()._subscribe(client, paho_module)

    def _new_client(self) -> paho.Client:
        client = super()._new_client()
        client.on_pingresp = self._on_pingresp  # type: ignore[attr-defined]
        return client

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # A PUBACK or PINGREQ goes out at once (no Nagle wait for the broker's delayed ACK):
        # a replay waits for the broker's answer after each chunk.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super()._on_socket_open(client, userdata, sock)

    def _deliver(self, publish: Publish) -> None:
        super()._deliver(publish)
        self.arrived.extend(self._on_hand.pop(publish.topic))
        self._count = 0

    def _on_pingresp(self) -> None:
        if self._pings:
            pong = self._pings.popleft()
            if not pong.done():
                pong.set_result(True)

    def _lost(self, why: str) -> None:
        super()._lost(why)
        self._why = why
        while self._pings:
            pong = self._pings.popleft()
            if not pong.done():
                pong.set_result(False)

    def _gone(self) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"mqtt: lost the dead-letter session {self.config.client_id} at {self._where()} "
            f"({self._why or 'closed'}); another 'amgi dead-letters' or a server starting "
            "takes it over"
        )

    async def all_sent(self) -> None:
        """Wait until everything the broker sends now has arrived (a PINGREQ round trip)."""
        client = self._client
        if client is None or self._loop is None or not self._connected.is_set():
            raise self._gone()
        pong = self._loop.create_future()
        self._pings.append(pong)
        client._send_pingreq()
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                answered = await pong
        except TimeoutError:
            raise BrokerUnavailable(
                f"mqtt: {self._where()} did not answer within {self.config.connect_timeout}s"
            ) from None
        if not answered:
            raise self._gone()

    def take(self, n: int) -> list[Message]:
        """Up to ``n`` of the dead letters that arrived, oldest first."""
        return [self.arrived.popleft() for _ in range(min(n, len(self.arrived)))]

    def ack(self, messages: list[Message]) -> None:
        """PUBACK ``messages``: the broker drops them from the session."""
        if not self._connected.is_set():
            raise self._gone()
        for message in messages:
            self._ack(message)

    async def close(self) -> None:
        """Hang up; the session keeps every dead letter not acknowledged."""
        self._closing = True
        await self._hang_up()
        while self._pings:
            self._pings.popleft().cancel()


class DeadLetters(MqttClient):
    """The transport's dead-letter sessions, ``list_dead_letters`` and ``replay_dead_letters``."""

    publish: Callable[[str, HeaderList, bytes | None, Bindings], Awaitable[None]]

    async def _keep_dead_letters(self) -> None:
        """Create or renew the dead-letter session of every consumed filter."""
        if not self.config.keep_dead_letters or not self.addresses:
            return
        outcomes = await asyncio.gather(
            *(self._keep_dead_letters_of(a) for a in self.addresses), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _keep_dead_letters_of(self, address: str) -> None:
        session = DeadLetterSession(address, self.config, receive_maximum=1, create=True)
        try:
            for tries_left in reversed(range(_TAKEOVER_TRIES)):
                try:
                    await session.open()
                    if session._granted_qos < 1:
                        self._dead_letters_at_qos0 = True
                    return
                except SubscriptionLost:
                    # Another server of the filter (a shared subscription's group) took
                    # the session over to create it too: try again, out of its way.
                    if not tries_left:
                        raise
                await asyncio.sleep(random.uniform(0.05, 0.25))
        except (ConfigurationError, BrokerUnavailable) as exc:
            raise type(exc)(
                f"{exc} (session {session.config.client_id}, which keeps the dead letters of "
                f"{address!r}: it must be allowed to connect and to read "
                f"{self.config.dead_letter_prefix}/#; or pass --no-keep-dead-letters)"
            ) from None
        finally:
            await session.close()

    async def _dead_letter_session(self, address: str, receive_maximum: int) -> DeadLetterSession:
        problem = validate_filter(address)
        if problem:
            raise ConfigurationError(f"mqtt: invalid topic filter {address!r}: {problem}")
        session = DeadLetterSession(
            address, self.config, receive_maximum=receive_maximum, create=False
        )
        await session.open()
        return session

    async def list_dead_letters(self, address: str, limit: int) -> list[StoredDeadLetter]:
        """What the session holds, up to the Receive Maximum; left unacknowledged."""
        session = await self._dead_letter_session(address, min(limit, _MOST))
        try:
            await session.all_sent()
            return [self._stored(m) for m in session.take(limit)]
        finally:
            await session.close()

    async def replay_dead_letters(self, address: str, limit: int) -> int:
        """Publish each back to its topic (QoS 1, acknowledged), then acknowledge it.

        Chunk by chunk; the next chunk is published only once the broker has handled the
        acknowledgements of the last (a PINGREQ round trip): a killed process's
        connection is reset, and a broker drops what it had not read of it yet, so a
        killed replay sends at most one chunk twice. The replay ends at the first dead
        letter dead-lettered after it started (a replayed message failing again, say):
        that one and the rest wait for the next replay.
        """
        started = time.time()
        session = await self._dead_letter_session(address, min(limit, _REPLAY_CHUNK))
        moved = 0
        # MQTT 3.1.1 dead letters carry no time: a copy failing again is known by being
        # one this replay moved already (its topic and payload), and ends the replay.
        seen: set[bytes] | None = set() if self.config.protocol == "3.1.1" else None
        try:
            await session.all_sent()
            while moved < limit:
                chunk = session.take(min(_REPLAY_CHUNK, limit - moved))
                letters = [self._stored(m) for m in chunk]
                late = next((i for i, d in enumerate(letters) if (d.dead_at or 0) > started), None)
                if seen is not None:
                    late = _first_seen_again(letters, seen)
                if late is not None:
                    logger.warning(
                        "mqtt: the replay of %r stopped after %d dead letter(s) at one %s "
                        "after it started (a replayed copy that failed again): it and the "
                        "rest wait for the next replay",
                        address,
                        moved + late,
                        "it had moved already" if seen is not None else "dead-lettered",
                    )
                    chunk, letters = chunk[:late], letters[:late]
                if not chunk:
                    break
                await asyncio.gather(
                    *(
                        self.publish(
                            d.address,
                            d.headers,
                            d.payload,
                            {"mqtt": {**d.bindings.get("mqtt", {}), "qos": 1}},
                        )
                        for d in letters
                    )
                )
                session.ack(chunk)
                moved += len(chunk)
                if late is not None:
                    break
                await session.all_sent()
        finally:
            await session.close()
        return moved

    def _stored(self, message: Message) -> StoredDeadLetter:
        binding = dict(message.bindings["mqtt"])
        topic = binding.pop("topic")
        for key in ("qos", "retain"):
            binding.pop(key, None)
        prefix = self.config.dead_letter_prefix + "/"
        # The server removed amgi-attempt already (it is message.attempt).
        headers, dead_at = _without_dead_at(message.headers)
        stored = stored_dead_letter(
            message.id,
            headers,
            message.payload,
            address=topic.removeprefix(prefix),
            dead_at=dead_at,
        )
        stored.bindings = {"mqtt": binding} if binding else {}
        stored.attempts = message.attempt if stored.reason else 0
        stored.reason = stored.reason or _NO_REASON
        return stored


def _first_seen_again(letters: list[StoredDeadLetter], seen: set[bytes]) -> int | None:
    """The index of the first of ``letters`` whose topic and payload are in ``seen`` (or
    earlier in ``letters``); the others up to it are added to ``seen``."""
    for i, letter in enumerate(letters):
        digest = hashlib.blake2b(digest_size=16)
        digest.update(letter.address.encode())
        digest.update(b"\0")
        digest.update(letter.payload or b"")
        key = digest.digest()
        if key in seen:
            return i
        seen.add(key)
    return None


def _without_dead_at(headers: HeaderList) -> tuple[HeaderList, float | None]:
    """``headers`` less :data:`DEAD_AT_HEADER`, and the time it gives (seconds). A value
    that is no time in milliseconds (any client can publish to a dead-letter topic; more
    than 16 digits is past the year 300,000, and too many for an int or a float) stays a
    header."""
    dead_at: float | None = None
    rest: HeaderList = []
    for name, value in headers:
        if name == DEAD_AT_HEADER and value.isdigit() and len(value) <= 16:
            dead_at = int(value) / 1000
        else:
            rest.append((name, value))
    return rest, dead_at
