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
dead letters kept  in a persistent session per topic filter, ``amgi-dl-<hash>``, that
                   the server subscribes at connect; ``amgi dead-letters`` reads and
                   replays it (``_dead_letters``)
refused copy       a retry the broker refuses (MQTT 5 PUBACK failure, e.g. not
                   authorised) is dead-lettered instead; a refused dead letter is tried
                   again with backoff in the background; resends of the original
                   wait meanwhile and are acknowledged once the copy is taken
                   (``amgi.servers.kit.move_aside``); a copy the connection rules out
                   (over the broker's maximum packet size or QoS) is given up on, the
                   original left for the next connection
message id         the packet id (QoS 1 and 2): a resend after a reconnect or a crash keeps
                   it (MQTT 3.1.1 and 5 alike), so the crash ledger bounds a message that
                   kills the process; QoS 0 messages get a counter (never redelivered)
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
import contextlib
import functools
import logging
from collections.abc import Sequence

from amgi.errors import ConfigurationError
from amgi.servers.kit import (
    DelayedRepublisher,
    dead_letter_headers,
    move_aside,
    retry_headers,
    unmoved,
)
from amgi.servers.mqtt._client import HungUpOnSend, MqttSendError, Refusals, RuledOut
from amgi.servers.mqtt._codec import Publish, decode_publish
from amgi.servers.mqtt._dead_letters import DeadLetters, dead_at_header
from amgi.servers.mqtt.options import MqttOptions, validate_filter
from amgi.transport import Batch, Bindings, HeaderList, Message, Settlement, Transport

__all__ = [
    "MqttOptions",
    "MqttSendError",
    "MqttTransport",
    "Publish",
    "decode_publish",
    "validate_filter",
]

logger = logging.getLogger("amgi.servers.mqtt")

"""The CONNACK outcome when the broker dropped the connection before sending one."""


class MqttTransport(DeadLetters, Transport):
    """The AMGI transport of an MQTT broker (see the module docstring for the mapping)."""

    name = "mqtt"
    options = MqttOptions
    send_error = MqttSendError
    requires = ("paho.mqtt",)
    extra = "mqtt"
    stable_ids = True
    """QoS 1 and 2 messages are identified by topic and packet id, which a resend keeps."""
    single_process_reason = (
        "processes sharing one --client-id take its session from each other (run one "
        "'amgi run' per client id, on a $share/GROUP/ subscription)"
    )

    def __init__(self, addresses: Sequence[str], options: MqttOptions | None = None) -> None:
        super().__init__(addresses, options or MqttOptions())
        self._init_client()

    def ledger_namespace(self) -> str:
        """The broker and the session (client id): packet ids are the session's."""
        return f"mqtt {self._where()} {self._client_id()}"

    # -- connection ------------------------------------------------------------------

    def check(self) -> None:
        """The options, then the addresses: topic filters, a client id for shared ones."""
        super().check()
        c = self.config
        for address in self.addresses:
            problem = validate_filter(address)
            if problem:
                raise ConfigurationError(f"mqtt: invalid topic filter {address!r}: {problem}")
        if c.tls:
            self._tls_context()  # its files, before the lifespan starts
        if not c.client_id and any(a.startswith("$share/") for a in self.addresses):
            # The default id comes from the filters: every server of the group would get
            # the same one and take the session over from the others, again and again.
            raise ConfigurationError(
                "mqtt: a shared subscription needs --client-id, a different one per server"
            )

    async def connect(self) -> None:
        """Connect, resume (or create) the persistent session and subscribe."""
        self.check()
        self._retries = DelayedRepublisher("mqtt")
        self._start_client()
        try:
            await self._open()
            # From here a lost connection is made again (the dead-letter sessions below
            # take a connection each, long enough for it to drop meanwhile).
            self._misc = asyncio.create_task(self._misc_loop(), name="amgi-mqtt-misc")
            await self._keep_dead_letters()
        except BaseException:
            await self.close()
            raise

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
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()
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
        settlement = self._without_resent(settlement)
        for retry in settlement.retry:
            # Marked as moving from now: a resend of it while its delay runs (a reconnect:
            # same packet id, DUP) waits for the copy instead of reaching the app again,
            # which started a second retry chain for one message.
            self._moving_entry(batch.address, retry.message)
            move = functools.partial(self._move, batch.address, Settlement(retry=[retry]))
            self._retries.schedule(retry.delay, move)
        if settlement.dead:
            await self._move(batch.address, Settlement(dead=settlement.dead), inline=True)

    async def _move(self, topic: str, settlement: Settlement, *, inline: bool = False) -> None:
        """Publish the copies (the kit's rule for refused ones), then PUBACK the originals.

        A resend of the original (after a reconnect: same packet id, DUP) that arrives
        while its copy is being published waits for the outcome instead of reaching the
        app, and is acknowledged once the copy is on the broker. ``inline`` (from
        ``settle``) tries once and leaves what the broker refused to a background task,
        which tries again with backoff until the server closes, or until every copy left
        is one the connection rules out (then the originals wait for the next one).
        """
        messages = [r.message for r in settlement.retry] + [d.message for d in settlement.dead]
        outcomes: dict[int, tuple[str, asyncio.Future[bool]]] = {}
        for m in messages:
            entry = self._moving_entry(topic, m)
            if entry is not None:
                outcomes[m.token[1]] = entry
        stranded: list[Message] = messages
        later = False
        # A copy this connection rules out (over the broker's maximum QoS or packet size)
        # is refused at every try until the next one: trying on would go on for ever.
        refusals = Refusals()
        try:
            stranded = await move_aside(
                settlement,
                retry=lambda r: refusals.watch(
                    r.message, self._retry(topic, r.message, r.uncounted)
                ),
                dead=lambda d: refusals.watch(
                    d.message, self._dead_letter(topic, d.message, d.reason)
                ),
                address=topic,
                give_up=(lambda: True) if inline else (lambda: self._closing or refusals.certain()),
                # Two lost connections may be the network's doing: the retry waits and
                # is tried again, it is not dead-lettered for them.
                transient=lambda exc: isinstance(exc, HungUpOnSend),
            )
            later = bool(stranded) and inline and not self._closing and not refusals.certain()
        finally:
            for m in messages:
                moved = m not in stranded
                if moved:
                    self._ack(m)
                entry = outcomes.get(m.token[1])
                if entry is None or (later and not moved):
                    continue  # the background task carries on with it
                if self._moving.get(m.token[1]) is entry:
                    del self._moving[m.token[1]]
                if not entry[1].done():
                    entry[1].set_result(moved)
        if later:
            again = functools.partial(self._move, topic, unmoved(settlement, stranded))
            self._retries.schedule(0, again)
        elif stranded:
            for m in stranded:
                # A later try (after a reconnect) publishes anew: by then this packet id
                # may name another message, which a stale copy's PUBACK must not ack.
                self._dead_sent.pop((topic, m.token[1]), None)
            self._report_stranded(topic, stranded, refusals.certain())

    def _moving_entry(
        self, topic: str, message: Message
    ) -> tuple[str, asyncio.Future[bool]] | None:
        """The record that ``message`` (QoS 1 or 2) is being moved aside, made if need be;
        its future tells a resend's wait whether the copy got to the broker."""
        _, mid, qos = message.token
        if not qos:
            return None
        entry = self._moving.get(mid)
        if entry is None or entry[0] != topic or entry[1].done():
            entry = self._moving[mid] = (topic, asyncio.get_running_loop().create_future())
        return entry

    async def _retry(self, topic: str, message: Message, uncounted: bool) -> None:
        """Republish ``message`` as its next attempt (the same, when ``uncounted``)."""
        attempt = message.attempt + (not uncounted)
        bindings = {"mqtt": {k: v for k, v in message.bindings["mqtt"].items() if k != "retain"}}
        if self._v5:
            headers = retry_headers(message.headers, attempt=attempt)
            await self._publish(topic, headers, message.payload, bindings, None)
            return
        payload = message.payload or b""
        note = self._retry_attempts.expect(topic, payload, attempt)
        try:
            await self._publish(topic, [], message.payload, bindings, None)
        except BaseException:
            self._retry_attempts.unsent(topic, payload, note)
            raise
        self._retry_attempts.sent(topic, note)

    async def _dead_letter(self, topic: str, message: Message, reason: str) -> None:
        headers = dead_letter_headers(
            message.headers, attempt=message.attempt, address=topic, reason=reason
        )
        headers.append(dead_at_header())
        # Not retained, and no expiry: a dead letter waits until someone looks at it.
        binding = {
            k: v
            for k, v in message.bindings["mqtt"].items()
            if k not in ("retain", "messageExpiryInterval")
        }
        binding["qos"] = max(1, int(binding.get("qos", 1)))
        target = f"{self.config.dead_letter_prefix}/{topic}"
        why = self._no_qos1()
        if why:
            # Not even tried: a QoS 1 PUBLISH gets the connection dropped (MQTT 3.1.1) or
            # refused, and one at QoS 0 is not kept for the dead-letter session.
            raise RuledOut(
                f"mqtt: cannot dead-letter to {target!r}: the broker takes nothing at QoS 1 "
                f"({why}; Mosquitto: max_qos), and a dead letter at QoS 0 is not kept"
            )
        # Sent once: a copy whose PUBACK is late is waited for again on the next try
        # (paho sends it again itself after a reconnect), not published once more.
        key = (topic, message.token[1])
        timeout = self.config.send_timeout
        sent = self._dead_sent.get(key)
        if sent is None:
            sent = await self._send(target, headers, message.payload, {"mqtt": binding}, timeout)
            self._dead_sent[key] = sent
        try:
            await self._confirmed(sent, target, timeout)
        except MqttSendError:
            if sent.done():  # refused: the next try publishes anew
                del self._dead_sent[key]
            raise
        del self._dead_sent[key]

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        """PUBLISH to topic ``address``; for QoS 1 and 2 wait until the broker has it."""
        await self._publish(address, headers, payload, bindings, self.config.send_timeout)

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
        await self._hang_up()
        self._on_hand.clear()
        self._count = 0
        for waiter in (*self._puback.values(), *self._suback.values()):
            if not waiter.done():
                waiter.cancel()
        self._puback.clear()
        self._hung_up_on.clear()
        self._suback.clear()
        self._dead_sent.clear()
        self._retry_attempts.clear()


"""MQTT 5 PUBLISH properties carried as ``mqtt`` bindings, by AsyncAPI's names."""
