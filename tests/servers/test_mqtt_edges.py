"""The MQTT server's unhappy paths against a real Mosquitto: refusals, lost handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from amgi.servers.mqtt import MqttOptions, MqttSendError
from amgi.transport import DeadLetter, Retry, Settlement
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


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_broker_without_qos1_warns_once_and_gives_up_on_dead_letters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, protocol: str
) -> None:
    """Mosquitto with ``max_qos 0`` grants QoS 0 for the subscription and refuses every
    QoS 1 PUBLISH (MQTT 5: CONNACK; 3.1.1: it hangs up). Nothing said that at-least-once
    was gone, and each dead letter was tried again for ever, with backoff (on 3.1.1, two
    lost connections per try). Now one warning, one clear error per dead letter, and no
    further try on this connection."""
    import logging

    caplog.set_level(logging.WARNING)
    broker = Mosquitto(tmp_path / "qos0", extra="max_qos 0")
    broker.start()
    try:
        options = MqttOptions(
            port=broker.port, protocol=protocol, send_timeout=2, reconnect_delay_max=0.2
        )  # type: ignore[arg-type]
        address = topic()
        async with connected([address], options) as server:
            generation = server._generation
            await publish(options, address, [b"bad"], bindings={"mqtt": {"qos": 0}})
            [batch] = await fetch_n(server, 1)
            await server.settle(batch, Settlement(dead=[DeadLetter(batch.messages[0], "no")]))
            await asyncio.sleep(2.0)  # the kit's backoff tried again at 0.5 s and 1.5 s
            assert server._generation == generation  # never hung up on
    finally:
        broker.stop()
    granted = [r for r in caplog.records if f"QoS 0 for {address!r}, not" in r.message]
    assert len(granted) == 1, granted
    assert "at-least-once is NOT kept" in granted[0].message
    tries = [r.message for r in caplog.records if "could not be dead-lettered" in r.message]
    assert len(tries) == 1, tries
    assert "the broker takes nothing at QoS 1" in tries[0]
    assert any("QoS 0 message(s)" in r.message and "dropped" in r.message for r in caplog.records)


async def _one_from(servers: list[Any]) -> tuple[Any, Any]:
    """The first batch any of ``servers`` fetches, and that server."""
    tasks = {asyncio.create_task(s.fetch()): s for s in servers}
    try:
        async with asyncio.timeout(10):
            while True:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    for batch in task.result():
                        return tasks[task], batch
                    tasks[asyncio.create_task(tasks[task].fetch())] = tasks.pop(task)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_retry_copy_taken_by_another_group_member_lends_no_count(
    mosquitto: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MQTT 3.1.1 carries a retry's attempt in a note by topic and payload. On a
    ``$share/`` filter the copy may go to another server of the group: the note stayed
    for good, and a later, different message with the same payload started at its count
    (dead-lettered before its time). Now such a note lapses once the copy is out."""
    from amgi.servers.mqtt import _attempts

    monkeypatch.setattr(_attempts, "SHARED_COPY_WAIT", 0.3)
    address = topic()
    shared = f"$share/g/{address}"
    own = [
        MqttOptions(port=mosquitto.port, protocol="3.1.1", client_id=f"{n}-{uuid.uuid4().hex}")
        for n in "ab"
    ]
    sender = MqttOptions(port=mosquitto.port)
    async with connected([shared], own[0]) as a, connected([shared], own[1]) as b:
        for _ in range(10):  # until a copy lands on the other server
            await publish(sender, address, [b"same"])
            first, batch = await _one_from([a, b])
            await first.settle(batch, Settlement(retry=[Retry(batch.messages[0], "x", 0.0)]))
            second, copy = await _one_from([a, b])
            assert [m.attempt for m in copy.messages] == [2] or second is not first
            await second.settle(copy, Settlement(acked=list(copy.messages)))
            if second is not first:
                break
        else:
            pytest.skip("the broker gave every copy to the server that published it")
        await asyncio.sleep(0.6)  # the note lapsed
        attempts = []
        for _ in range(4):  # new messages, each to one of the two
            await publish(sender, address, [b"same"])
            server, batch = await _one_from([a, b])
            attempts += [m.attempt for m in batch.messages]
            await server.settle(batch, Settlement(acked=list(batch.messages)))
    assert attempts == [1, 1, 1, 1]


def test_tls_files_that_cannot_be_loaded_are_one_clear_error(tmp_path: Path) -> None:
    """A missing or unusable --ca-file, --cert-file or --key-file reached the user as
    ``amgi: error: [Errno 2] No such file or directory`` or ``[SSL] PEM lib
    (_ssl.c:3905)``, naming neither the option nor the file, and only at connect (after
    lifespan startup). Now the transport's check says which, before anything starts."""
    from amgi.errors import ConfigurationError
    from amgi.servers.mqtt import MqttTransport

    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    missing = str(tmp_path / "missing.pem")
    cases = [
        ({"ca_file": missing}, f"--ca-file {missing!r}: No such file or directory"),
        ({"ca_file": str(not_pem)}, f"--ca-file {str(not_pem)!r}: "),
        ({"cert_file": missing}, f"--cert-file {missing!r}: No such file or directory"),
        ({"cert_file": str(not_pem)}, f"--cert-file {str(not_pem)!r}"),
    ]
    for files, error in cases:
        transport = MqttTransport(["a/b"], MqttOptions(port=1, tls=True, **files))
        with pytest.raises(ConfigurationError, match=f"mqtt: cannot load {re.escape(error)}"):
            transport.check()


async def test_a_dead_letter_over_the_brokers_packet_size_is_given_up_on_not_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The dead letter's headers take a message just under the broker's Maximum Packet
    Size (MQTT 5, from its CONNACK) over it: refused before sending, and tried again in
    the background for ever, with backoff. Now one error: the original stays
    unacknowledged, and the broker sends it again on the next connection."""
    import logging

    caplog.set_level(logging.ERROR)
    broker = Mosquitto(tmp_path / "small", extra="max_packet_size 2000")
    broker.start()
    try:
        options = MqttOptions(port=broker.port, send_timeout=2)
        address = topic()
        big = b"x" * 1920
        async with connected([address], options) as server:
            await publish(options, address, [big])
            [batch] = await fetch_n(server, 1)
            await server.settle(batch, Settlement(dead=[DeadLetter(batch.messages[0], "no")]))
            await asyncio.sleep(2.0)  # the kit's backoff tried again at 0.5 s and 1.5 s
        tries = [r.message for r in caplog.records if "could not be dead-lettered" in r.message]
        assert len(tries) == 1, tries
        assert "over the broker's maximum packet size" in tries[0]
        assert any("stay unacknowledged until" in r.message for r in caplog.records)
        async with connected([address], options) as again:
            [batch] = await fetch_n(again, 1)
            assert [m.payload for m in batch.messages] == [big]
            await again.settle(batch, Settlement(acked=list(batch.messages)))
    finally:
        broker.stop()


async def test_a_send_over_an_mqtt_311_brokers_qos_says_so(tmp_path: Path) -> None:
    """MQTT 3.1.1 announces no Maximum QoS, and Mosquitto with ``max_qos 0`` hangs up on
    a QoS 1 PUBLISH: the send failed blaming the packet size ("over its maximum packet
    size, say") though the broker had granted QoS 0 for the server's subscription."""
    broker = Mosquitto(tmp_path / "qos0", extra="max_qos 0")
    broker.start()
    try:
        options = MqttOptions(
            port=broker.port, protocol="3.1.1", send_timeout=10, reconnect_delay_max=0.2
        )
        address = topic()
        async with connected([address], options) as server:
            with pytest.raises(MqttSendError, match="it granted QoS 0 for a subscription"):
                await server.publish(address, [], b"x", {"mqtt": {"qos": 1}})
            await server.publish(address, [], b"at qos 0", {"mqtt": {"qos": 0}})
            [batch] = await fetch_n(server, 1)
            assert [m.payload for m in batch.messages] == [b"at qos 0"]
    finally:
        broker.stop()
