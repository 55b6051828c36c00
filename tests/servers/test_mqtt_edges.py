"""The MQTT server's unhappy paths against a real Mosquitto: refusals, lost handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import pytest

from amgi.servers.mqtt import MqttOptions, MqttSendError
from amgi.transport import Retry, Settlement
from tests.ops.helpers import CuttingFront
from tests.servers.mosquitto.broker import Mosquitto
from tests.servers.test_mqtt import (
    connected,
    fetch_n,
    publish,
    topic,
)


async def test_a_qos2_send_the_broker_refuses_raises(mosquitto: Any) -> None:
    """An MQTT 5 broker refuses a QoS 2 PUBLISH with a failure code in its PUBREC
    (Mosquitto: a client may not publish to $SYS) and hangs up. paho ignored the code:
    on a clean session (here) it sent the PUBLISH again on every reconnect, each one
    hung up on, until the send timed out; on a persistent one it sent PUBREL, which the
    broker answers with a PUBCOMP whether it holds the message or not (the refused retry
    at QoS 2 in test_mqtt.py)."""
    options = MqttOptions(port=mosquitto.port, send_timeout=5)
    async with connected([], options) as sender:
        with pytest.raises(MqttSendError, match="refused the send to '\\$SYS/amgi'"):
            await sender.publish("$SYS/amgi", [], b"x", {"mqtt": {"qos": 2}})


async def test_a_send_that_makes_the_broker_hang_up_fails_and_the_server_hears_again(
    tmp_path: Path,
) -> None:
    """MQTT 3.1.1 has no Maximum Packet Size in CONNACK: Mosquitto hangs up on a PUBLISH
    over its limit. paho kept the PUBLISH and sent it again on every reconnect, each one
    ended by the broker: the server never got a subscription again (deaf for good) and
    the send failed only after --send-timeout. Now a send outstanding when the broker
    hangs up twice fails, and the next connection holds."""
    broker = Mosquitto(tmp_path / "small", extra="max_packet_size 2000")
    broker.start()
    try:
        options = MqttOptions(
            port=broker.port, protocol="3.1.1", send_timeout=20, reconnect_delay_max=0.5
        )
        address = topic()
        async with connected([address], options) as server:
            with pytest.raises(MqttSendError, match="hung up each time the send went out"):
                async with asyncio.timeout(10):
                    await server.publish(address, [], b"x" * 5000, {})
            await publish(options, address, [b"after"])
            [batch] = await fetch_n(server, 1, timeout=10)
            assert [m.payload for m in batch.messages] == [b"after"]
            await server.settle(batch, Settlement(acked=list(batch.messages)))
    finally:
        broker.stop()


async def test_a_qos0_message_on_hand_outlives_a_dropped_connection(mosquitto: Any) -> None:
    """A dropped connection cleared the messages on hand, the broker sending the
    unacknowledged ones again; a QoS 0 message it never sends again was lost, though
    the server held it."""
    async with CuttingFront(mosquitto.port) as front:
        own = MqttOptions(
            port=front.port,
            client_id=f"q0-{uuid.uuid4().hex[:8]}",
            qos=0,
            batch_linger=0,
            reconnect_delay_max=0.3,
        )
        address = topic()
        async with connected([address], own) as server:
            await publish(MqttOptions(port=mosquitto.port), address, [b"once"])
            async with asyncio.timeout(10):
                while not server._count:
                    await asyncio.sleep(0.01)
            generation = server._generation
            await front.cut()
            async with asyncio.timeout(10):
                while server._generation == generation:
                    await asyncio.sleep(0.01)
            [batch] = await fetch_n(server, 1, timeout=5)
            assert [(m.payload, m.bindings["mqtt"]["qos"]) for m in batch.messages] == [
                (b"once", 0)
            ]


async def test_a_nack_settled_after_its_resend_arrived_starts_no_second_retry_chain(
    mosquitto: Any,
) -> None:
    """The connection drops while the app holds a message; the broker sends it again
    (same packet id) on the next one before the app nacks the first delivery. Both
    deliveries were republished as retries: one message, two retry chains (and two dead
    letters in the end). The resend is the app's now; the stale nack publishes nothing."""
    address = topic()
    async with CuttingFront(mosquitto.port) as front:
        own = MqttOptions(
            port=front.port, client_id=f"stale-{uuid.uuid4().hex[:8]}", reconnect_delay_max=0.5
        )
        async with connected([address], own) as server:
            await publish(MqttOptions(port=mosquitto.port), address, [b"M"])
            [stale] = await fetch_n(server, 1)
            await front.cut()
            [resent] = await fetch_n(server, 1)  # the broker's resend, on the new connection
            for batch in (stale, resent):
                [message] = batch.messages
                await server.settle(batch, Settlement(retry=[Retry(message, "boom", 0.0)]))
            seen = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    while True:
                        for got in await server.fetch():
                            seen += [(m.payload, m.attempt) for m in got.messages]
                            await server.settle(got, Settlement(acked=list(got.messages)))
    assert seen == [(b"M", 2)]
