"""``amgi dead-letters`` on Mosquitto: the server keeps a persistent session per topic
filter subscribed to its dead letters; they are listed (and stay), replayed to their
topic (published, then acknowledged off the session); a replay killed with SIGKILL
half-way loses none; MQTT 5 and 3.1.1."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path
from typing import Any, Literal

import pytest

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.servers.mqtt import MqttOptions, MqttTransport
from amgi.servers.mqtt._dead_letters import _REPLAY_CHUNK, DeadLetterSession
from amgi.transport import Message
from tests.ops.helpers import (
    ROOT,
    amgi,
    dead_letter_all,
    kill_replay_when,
    one_line_error,
    replay_beside_a_failing_consumer,
    take,
)
from tests.servers.mosquitto.broker import Mosquitto

pytestmark = pytest.mark.timeout(120)

Protocol = Literal["5", "3.1.1"]


def topic() -> str:
    return f"amgi-ops/{uuid.uuid4().hex[:12]}"


def options(broker: Mosquitto, protocol: Protocol = "5", **kw: Any) -> MqttOptions:
    return MqttOptions(port=broker.port, protocol=protocol, **kw)


async def sessions(broker: Mosquitto, address: str, protocol: Protocol = "5") -> None:
    """Create the server's session of ``address`` and the one keeping its dead letters."""
    server = MqttTransport([address], options(broker, protocol))
    await server.connect()
    await server.close()


async def publish(broker: Mosquitto, address: str, n: int) -> None:
    """Publish ``n`` messages: payload ``i``, header ``n: i``."""
    sender = MqttTransport([], options(broker))
    await sender.connect()
    try:
        await asyncio.gather(
            *(sender.publish(address, [(b"n", b"%d" % i)], b"%d" % i, {}) for i in range(n))
        )
    finally:
        await sender.close()


def consumer(broker: Mosquitto, address: str) -> MqttTransport:
    """The server's session of ``address``, taking all it holds at once: Mosquitto sends a
    resumed session's messages (up to the Receive Maximum) before it answers the
    SUBSCRIBE of the connect, so the first fetch has every one, duplicates included."""
    return MqttTransport([address], options(broker, batch_size=65535, receive_maximum=65535))


async def on_hand(transport: MqttTransport) -> list[Message]:
    """Connect ``transport`` and take what its session holds (all on hand at once)."""
    await transport.connect()
    try:
        batches = await asyncio.wait_for(transport.fetch(), 10)
    finally:
        await transport.close()
    return [m for b in batches for m in b.messages]


def run(
    broker: Mosquitto, *args: str, protocol: Protocol = "5"
) -> subprocess.CompletedProcess[str]:
    return amgi(
        *args, "--server", "mqtt", "--port", str(broker.port), "--protocol", protocol, cwd=ROOT
    )


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_list_and_replay_from_the_command_line(
    mosquitto: Mosquitto, protocol: Protocol
) -> None:
    address = topic()
    await sessions(mosquitto, address, protocol)
    await publish(mosquitto, address, 4)
    await dead_letter_all(MqttTransport([address], options(mosquitto, protocol)), 4)
    listed = await asyncio.to_thread(
        run, mosquitto, "dead-letters", "list", address, "--limit", "10", protocol=protocol
    )
    assert listed.returncode == 0, listed.stderr
    assert f"4 dead letter(s) of {address!r} shown (mqtt)" in listed.stdout
    if protocol == "5":
        assert listed.stdout.count("reason:  refused") == 4
        assert listed.stdout.count("attempts=1 ") == 4
        assert "headers: n=0" in listed.stdout
    else:
        assert listed.stdout.count("not recorded: MQTT 3.1.1") == 4
    again = await asyncio.to_thread(
        run, mosquitto, "dead-letters", "list", address, protocol=protocol
    )
    assert f"4 dead letter(s) of {address!r} shown" in again.stdout, "listing must leave them"
    replay = await asyncio.to_thread(
        run, mosquitto, "dead-letters", "replay", address, "--limit", "3", protocol=protocol
    )
    assert replay.returncode == 0, replay.stderr
    assert f"replayed 3 dead letter(s) to {address!r} (mqtt)" in replay.stdout
    assert [m.payload for m in await take(consumer(mosquitto, address), 3)] == [b"0", b"1", b"2"]
    transport = MqttTransport([], options(mosquitto, protocol))
    await transport.connect()
    try:
        left = await transport.list_dead_letters(address, 10)
    finally:
        await transport.close()
    assert [(d.payload, d.address) for d in left] == [(b"3", address)]


def test_replay_with_no_dead_letter_session_is_one_line(mosquitto: Mosquitto) -> None:
    result = run(mosquitto, "dead-letters", "replay", topic())
    assert "no dead letters are kept for" in one_line_error(result)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_looking_for_missing_dead_letters_creates_no_session(
    mosquitto: Mosquitto, protocol: Protocol
) -> None:
    """Resuming a missing session creates it: the lookup removes it again, so a server
    that never kept dead letters (here: --no-keep-dead-letters) is still told apart."""
    address = topic()
    server = MqttTransport([address], options(mosquitto, protocol, keep_dead_letters=False))
    await server.connect()
    await server.close()
    transport = MqttTransport([], options(mosquitto, protocol))
    await transport.connect()
    try:
        for _ in range(2):
            with pytest.raises(ConfigurationError, match="no dead letters are kept"):
                await transport.replay_dead_letters(address, 10)
        with pytest.raises(ConfigurationError, match="invalid topic filter 'a/#/b'"):
            await transport.list_dead_letters("a/#/b", 10)
    finally:
        await transport.close()


async def test_replay_killed_half_way_loses_no_dead_letter(mosquitto: Mosquitto) -> None:
    n = 2000
    address = topic()
    await sessions(mosquitto, address)
    await publish(mosquitto, f"amgi/dead-letter/{address}", n)
    # A live subscriber sees the replayed copies (its own session keeps no dead letters);
    # the replay is killed once it publishes its second chunk.
    watch = options(
        mosquitto,
        client_id=f"watch-{uuid.uuid4().hex[:8]}",
        keep_dead_letters=False,
        receive_maximum=65535,
    )
    watcher = MqttTransport([address], watch)
    await watcher.connect()
    seen = 0

    async def watch_copies() -> None:
        nonlocal seen
        while True:
            seen += sum(len(b.messages) for b in await watcher.fetch())

    async def second_chunk() -> bool:
        return seen > _REPLAY_CHUNK

    watching = asyncio.create_task(watch_copies())
    try:
        await kill_replay_when(
            second_chunk, address, "--server", "mqtt", "--port", str(mosquitto.port)
        )
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await watcher.close()
    everything = {b"%d" % i for i in range(n)}
    killed = [m.payload for m in await on_hand(consumer(mosquitto, address))]
    transport = MqttTransport([], options(mosquitto))
    await transport.connect()
    try:
        left = [d.payload for d in await transport.list_dead_letters(address, n)]
        # Copies of a chunk are published once the broker took the last chunk's acks.
        assert 0 < len(left) <= n - _REPLAY_CHUNK, "killed too late (or too early)"
        assert set(killed) | set(left) == everything, "a dead letter was lost"
        finish = await asyncio.to_thread(run, mosquitto, "dead-letters", "replay", address)
        assert finish.returncode == 0, finish.stderr
        assert await transport.list_dead_letters(address, n) == []
    finally:
        await transport.close()
    back = [m.payload for m in await on_hand(consumer(mosquitto, address))]
    assert back[: len(killed)] == killed
    assert sorted(back[len(killed) :]) == sorted(left), "the second replay sends each one once"
    assert len(back) - n <= _REPLAY_CHUNK, "more than the killed replay's last chunk sent twice"


async def test_a_replayed_dead_letter_is_a_first_attempt_with_only_its_own_headers(
    mosquitto: Mosquitto,
) -> None:
    address = topic()
    headers = [(b"kind", b"order"), (b"n", b"1"), (b"n", b"2")]
    await sessions(mosquitto, address)
    sender = MqttTransport([], options(mosquitto))
    await sender.connect()
    bindings = {"mqtt": {"contentType": "text/plain", "messageExpiryInterval": 300}}
    try:
        await asyncio.gather(
            *(sender.publish(address, headers, b"%d" % i, bindings) for i in range(2))
        )
        await dead_letter_all(
            MqttTransport([address], options(mosquitto)), 2, max_attempts=2, retry_delay=0
        )
        listed = await sender.list_dead_letters(address, 10)
    finally:
        await sender.close()
    assert [(d.attempts, d.headers, d.reason) for d in listed] == [(2, headers, "refused")] * 2
    # a dead letter waits until someone looks at it: the message's expiry is not kept
    assert [d.bindings for d in listed] == [{"mqtt": {"contentType": "text/plain"}}] * 2
    replay = await asyncio.to_thread(run, mosquitto, "dead-letters", "replay", address)
    assert replay.returncode == 0, replay.stderr
    back = await take(consumer(mosquitto, address), 2)
    assert sorted(m.payload for m in back) == [b"0", b"1"]
    for m in back:
        assert m.attempt == 1
        assert m.headers == headers
        assert m.bindings["mqtt"]["contentType"] == "text/plain"
        assert "messageExpiryInterval" not in m.bindings["mqtt"]


async def test_a_session_taken_over_is_one_error_and_keeps_its_dead_letters(
    mosquitto: Mosquitto,
) -> None:
    address = topic()
    await sessions(mosquitto, address)
    await publish(mosquitto, f"amgi/dead-letter/{address}", 3)
    config = options(mosquitto)
    first = DeadLetterSession(address, config, receive_maximum=10, create=False)
    await first.open()
    second = DeadLetterSession(address, config, receive_maximum=10, create=False)
    try:
        await second.open()  # the broker hands the session over and drops the first
        with pytest.raises(BrokerUnavailable, match="lost the dead-letter session"):
            await first.all_sent()
        await second.all_sent()
        assert [m.payload for m in second.take(10)] == [b"0", b"1", b"2"]
    finally:
        await first.close()
        await second.close()


def test_dead_letters_outlive_a_broker_restart(tmp_path: Path) -> None:
    """Mosquitto saves sessions and their queues at shutdown (persistence true)."""
    broker = Mosquitto(tmp_path)
    broker.start()
    address = topic()

    async def before() -> None:
        await sessions(broker, address)
        await publish(broker, f"amgi/dead-letter/{address}", 3)

    async def after() -> list[bytes | None]:
        transport = MqttTransport([], options(broker))
        await transport.connect()
        try:
            return [d.payload for d in await transport.list_dead_letters(address, 10)]
        finally:
            await transport.close()

    try:
        asyncio.run(before())
        broker.stop()
        broker.start()
        assert asyncio.run(after()) == [b"0", b"1", b"2"]
    finally:
        broker.stop()


async def test_a_broker_that_refuses_the_dead_letter_session_is_one_error(
    tmp_path: Path,
) -> None:
    """Mosquitto lets in only client ids that start with ``srv-`` (``clientid_prefixes``)."""
    broker = Mosquitto(tmp_path, extra="clientid_prefixes srv-")
    broker.start()
    try:
        address = topic()
        server = MqttTransport([address], options(broker, client_id="srv-1"))
        with pytest.raises(BrokerUnavailable) as refused:
            await server.connect()
        assert "refused the connection" in str(refused.value)
        assert "--no-keep-dead-letters" in str(refused.value)
        assert "\n" not in str(refused.value)
        opted_out = options(broker, client_id="srv-1", keep_dead_letters=False)
        server = MqttTransport([address], opted_out)
        await server.connect()
        await server.close()
    finally:
        broker.stop()


async def test_a_replay_the_broker_refuses_is_one_line_and_keeps_the_dead_letters(
    tmp_path: Path,
) -> None:
    """The replaying user may read the dead letters but not publish to their topic."""
    acl = "user amgi\ntopic read orders/#\ntopic readwrite amgi/dead-letter/#\n"
    broker = Mosquitto(tmp_path, users={"amgi": "a"}, acl=acl)
    broker.start()
    try:
        address = f"orders/{uuid.uuid4().hex[:8]}"
        login = {"username": "amgi", "password": "a"}
        server = MqttTransport([address], options(broker, **login))
        await server.connect()
        await server.close()
        sender = MqttTransport([], options(broker, **login))
        await sender.connect()
        try:
            for i in range(3):
                await sender.publish(f"amgi/dead-letter/{address}", [], b"%d" % i, {})
        finally:
            await sender.close()
        result = await asyncio.to_thread(
            run, broker, "dead-letters", "replay", address, "--username", "amgi",
            "--password", "a", "--send-timeout", "2",
        )  # fmt: skip
        line = one_line_error(result)
        # Mosquitto answers the refused PUBLISH (PUBACK "Not authorized") and drops the
        # connection; when the drop is seen first, the send times out instead.
        assert "refused the send to" in line or "did not acknowledge the send" in line, line
        reader = MqttTransport([], options(broker, **login))
        await reader.connect()
        try:
            left = await reader.list_dead_letters(address, 10)
        finally:
            await reader.close()
        assert [d.payload for d in left] == [b"0", b"1", b"2"]
    finally:
        broker.stop()


async def test_a_replay_beside_a_consumer_that_fails_them_again_ends(
    mosquitto: Mosquitto,
) -> None:
    """The replay moves the dead letters there when it started, once each, and ends at
    the first one dead-lettered after it started (MQTT 5 dead letters carry that time),
    though a running consumer dead-letters each replayed message again at once."""
    address = topic()
    n = 300
    await sessions(mosquitto, address)
    await publish(mosquitto, address, n)
    await dead_letter_all(MqttTransport([address], options(mosquitto)), n)
    moved = await replay_beside_a_failing_consumer(
        MqttTransport([], options(mosquitto)),
        MqttTransport([address], options(mosquitto)),
        address,
        n,
    )
    assert moved == n + 1
    transport = MqttTransport([], options(mosquitto))
    await transport.connect()
    try:
        left = await transport.list_dead_letters(address, 10_000)
    finally:
        await transport.close()
    assert len(left) == n + 1  # each failed again: for the next replay
    assert all(d.dead_at is not None for d in left)
    assert {name for d in left for name, _ in d.headers} == {b"n"}  # the time is not shown


async def test_an_mqtt_311_replay_beside_a_consumer_that_fails_them_again_ends(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """MQTT 3.1.1 dead letters carry no time: the replay moves each dead letter once
    and ends, with a warning, at the first one it had moved already (a copy the consumer
    dead-lettered again). It went on taking the copies: 501 dead letters, 1309 moved."""
    address = topic()
    n = 500
    await sessions(mosquitto, address, "3.1.1")
    await publish(mosquitto, address, n)
    await dead_letter_all(MqttTransport([address], options(mosquitto, "3.1.1")), n)
    moved = await replay_beside_a_failing_consumer(
        MqttTransport([], options(mosquitto, "3.1.1")),
        MqttTransport([address], options(mosquitto, "3.1.1")),
        address,
        n,
    )
    assert moved == n + 1
    stops = [r for r in caplog.records if "the replay of" in r.getMessage()]
    assert all(r.levelname == "WARNING" for r in stops)


@pytest.mark.parametrize("digits", [5000, 400])
async def test_a_dead_letter_whose_time_no_number_holds_is_still_listed(
    mosquitto: Mosquitto, digits: int
) -> None:
    """Any client can publish to the dead-letter topic: an ``amgi-dead-at`` of 5,000 digits
    was over Python's int conversion limit and one of 400 over a float's range; either
    failed the whole listing (ValueError, OverflowError). It is kept as a header."""
    address = topic()
    await sessions(mosquitto, address)
    sender = MqttTransport([], options(mosquitto))
    await sender.connect()
    try:
        prefix = sender.config.dead_letter_prefix
        await sender.publish(f"{prefix}/{address}", [(b"amgi-dead-at", b"9" * digits)], b"x", {})
    finally:
        await sender.close()
    reader = MqttTransport([], options(mosquitto))
    await reader.connect()
    try:
        letters = await reader.list_dead_letters(address, 10)
    finally:
        await reader.close()
    assert [(d.payload, d.dead_at) for d in letters] == [(b"x", None)]
    assert letters[0].headers == [(b"amgi-dead-at", b"9" * digits)]
