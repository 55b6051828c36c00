"""AMQP failure paths of settling, against a real RabbitMQ: refused retries, two queues."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.amqp import AmqpOptions, AmqpSendError, AmqpTransport
from amgi.transport import Batch, DeadLetter, Retry, Settlement
from tests.apps import attempts_app
from tests.servers.crash_loop import CrashLoop
from tests.servers.private_brokers import private_rabbitmq
from tests.servers.test_amqp_support import URL, drain, new_queue, queue_depth, rabbitmq

__all__ = ["rabbitmq"]

pytestmark = [pytest.mark.usefixtures("rabbitmq"), pytest.mark.timeout(60)]


async def declare(queue: str, arguments: dict[str, Any]) -> None:
    import aiormq

    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        await channel.queue_declare(queue, durable=True, arguments=arguments)
    finally:
        await connection.close()


async def test_a_refused_retry_is_dead_lettered_at_once_not_requeued(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``<queue>.retry.<ms>`` exists with another TTL: the nack ends in the dead letters.

    Before, the message was rejected with requeue and came back at the same attempt,
    hundreds of times a second.
    """
    caplog.set_level(logging.ERROR, "amgi.servers.kit")
    queue = new_queue()
    await declare(f"{queue}.retry.100", {"x-message-ttl": 99999})
    seen: list[tuple[bytes, int]] = []

    app = attempts_app(seen, nack=b"bad")
    transport = AmqpTransport([queue], AmqpOptions(url=URL))
    runtime = Runtime(app, transport, RuntimeConfig(max_attempts=5, retry_delay=0.1))
    task = asyncio.create_task(runtime.serve())
    try:
        async with asyncio.timeout(15):
            await runtime.started.wait()
        await transport.publish(queue, [], b"bad", {})
        await transport.publish(queue, [], b"fine", {})
        [dead] = await drain(f"{queue}.dead-letter", 1, timeout=10)
        await asyncio.sleep(0.5)  # time enough for a loop to show
    finally:
        runtime.request_stop()
        assert await task == 0
    assert dead.body == b"bad"
    reason = dead.header.properties.headers["amgi-dead-letter-reason"]
    assert reason.startswith("bad payload (its retry could not be published: ")
    assert "retry.100" in reason
    assert dead.header.properties.headers["amgi-attempt"] == "1"
    assert sorted(seen) == [(b"bad", 1), (b"fine", 1)]
    assert await queue_depth(queue) == 0
    assert any("dead-lettering it" in r.getMessage() for r in caplog.records)


async def test_each_queue_settles_on_its_own() -> None:
    """An unsettled batch of queue A never holds back the acks of queue B.

    The transport closes (as a crash would) with A's batch unsettled: B's acked messages
    must not come back. Before, one watermark per channel kept B's acks behind A's tag.
    """
    a, b = new_queue(), new_queue()
    transport = AmqpTransport([a, b], AmqpOptions(url=URL, batch_size=10, linger=0.05))
    await transport.connect()
    try:
        await transport.publish(a, [], b"slow", {})
        await asyncio.sleep(0.2)  # A's delivery gets the lower tag
        for i in range(5):
            await transport.publish(b, [], b"%d" % i, {})
        batches: list[Batch] = []
        async with asyncio.timeout(10):
            while sum(len(x.messages) for x in batches) < 6:
                batches.extend(await transport.fetch())
        for batch in batches:
            if batch.address == b:
                await transport.settle(batch, Settlement(acked=list(batch.messages)))
        await asyncio.sleep(0.3)
    finally:
        await transport.close()
    assert await queue_depth(b) == 0
    assert await queue_depth(a) == 1


def test_a_message_that_kills_the_process_is_the_only_dead_letter(tmp_path: Path) -> None:
    """A classic queue counts no deliveries: stable ids let the crash ledger bound the loop."""
    queue = new_queue()

    async def fill() -> None:
        transport = AmqpTransport([queue], AmqpOptions(url=URL))
        await transport.connect()  # declares the queue and its dead letters
        try:
            for i in range(20):
                await transport.publish(queue, [], b"kill" if i == 4 else b"m%02d" % i, {})
        finally:
            await transport.close()

    asyncio.run(fill())
    loop = CrashLoop(tmp_path, queue, "--server", "amqp", "--url", URL)
    innocent = {f"m{i:02d}" for i in range(20) if i != 4}
    kills = loop.run(
        lambda: (
            set(loop.acked()) == innocent and asyncio.run(queue_depth(f"{queue}.dead-letter")) == 1
        )
    )
    assert kills == loop.max_attempts, loop
    [dead] = asyncio.run(drain(f"{queue}.dead-letter", 1, timeout=5))
    assert dead.body == b"kill"
    assert "died 3 times" in dead.header.properties.headers["amgi-dead-letter-reason"]
    assert asyncio.run(queue_depth(queue)) == 0


def test_ids_are_stable_and_unique_within_a_batch() -> None:
    from amgi.servers.amqp._codec import stable_id, unique_ids
    from amgi.transport import Message

    first = stable_id(None, [(b"h", b"v")], b"body")
    assert stable_id(None, [(b"h", b"v")], b"body") == first
    assert stable_id("m-1", [(b"h", b"v")], b"body") != first
    assert stable_id(None, [(b"h", b"v2")], b"body") != first
    batch = unique_ids([Message(first, [], b""), Message(first, [], b""), Message("x", [], b"")])
    assert [m.id for m in batch] == [first, f"{first}#2", "x"]


SLOW_ON_A = """
import asyncio, os
async def app(scope, receive, send):
    if scope["type"] != "message":
        return
    more = True
    while more:
        m = await receive()
        more = m.get("more_messages", False)
        if scope["address"] == os.environ["SLOW_QUEUE"]:
            await asyncio.sleep(600)
        await send({"type": "message.ack", "id": m["id"]})
        with open(os.environ["ACKS"], "a") as f:
            f.write(m["payload"].decode() + "\\n")
"""


async def unacked(queue: str) -> int | None:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", "list_queues", "name", "messages_unacknowledged",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    for line in out.decode().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == queue:
            return int(parts[1])
    return None  # not listed (yet)


async def test_a_kill_after_b_was_acked_redelivers_nothing_of_b(tmp_path: Path) -> None:
    """One ``amgi run`` on queues A and B; A's batch hangs; B's acked messages are acked
    on the broker (kill -9 redelivers none of them). Before, 5 of 5 came back."""
    import os
    import sys

    a, b = new_queue(), new_queue()
    (tmp_path / "slow_on_a.py").write_text(SLOW_ON_A)
    acks = tmp_path / "acks"
    env = {**os.environ, "ACKS": str(acks), "SLOW_QUEUE": a, "PYTHONPATH": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "amgi", "run", "slow_on_a:app", a, b, "--server", "amqp",
        "--url", URL, "--lifespan", "off",
        cwd=tmp_path, env=env, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    sender = AmqpTransport([], AmqpOptions(url=URL))
    try:
        async with asyncio.timeout(30):
            while proc.returncode is None and not await _declared(b):
                await asyncio.sleep(0.1)
        await sender.connect()
        await sender.publish(a, [], b"slow", {})
        await asyncio.sleep(0.3)  # A's delivery comes first
        for i in range(5):
            await sender.publish(b, [], b"b%d" % i, {})
        async with asyncio.timeout(30):
            while len(acks.read_text().split() if acks.exists() else []) < 5:
                assert proc.returncode is None
                await asyncio.sleep(0.05)
            while await unacked(b) != 0:
                await asyncio.sleep(0.2)
        assert await unacked(a) == 1
    finally:
        proc.kill()
        await proc.wait()
        await sender.close()
    async with asyncio.timeout(30):
        while await queue_depth(a) < 1:
            await asyncio.sleep(0.1)
    assert await queue_depth(b) == 0


async def _declared(queue: str) -> bool:
    try:
        await queue_depth(queue)
    except Exception:
        return False
    return True


async def test_a_refused_dead_letter_backs_off_then_lands_once_the_broker_takes_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Retry queue refused and dead-letter exchange refusing (internal): the message
    waits, unacked, tried again with a doubling delay (logged) while the queue goes on;
    once the exchange takes messages again it lands."""
    from tests.servers.test_amqp_support import delete_exchange

    caplog.set_level(logging.ERROR, "amgi.servers.kit")
    queue = new_queue()
    dlx = f"amgi-test-dlx-{queue}"
    await declare(f"{queue}.retry.100", {"x-message-ttl": 99999})
    calls: list[int] = []
    fine: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        event = await receive()
        if event["payload"] != b"bad":
            fine.append(event["payload"])
            await send({"type": "message.ack", "id": event["id"]})
            return
        calls.append(event["bindings"]["amgi"]["attempt"])
        await send({"type": "message.nack", "id": event["id"], "message": "no"})

    options = AmqpOptions(url=URL, dead_letter_exchange=dlx)
    transport = AmqpTransport([queue], options)
    runtime = Runtime(
        app, transport, RuntimeConfig(max_attempts=5, retry_delay=0.1, shutdown_timeout=1)
    )
    # The test's messages come from a connection of its own, not from the server tested.
    sender = AmqpTransport([], AmqpOptions(url=URL))
    await sender.connect()
    task = asyncio.create_task(runtime.serve())
    try:
        async with asyncio.timeout(15):
            await runtime.started.wait()
        await internal_exchange(dlx)
        await sender.publish(queue, [], b"bad", {})
        async with asyncio.timeout(20):
            while not _tried_again(caplog):
                await asyncio.sleep(0.05)
            await sender.publish(queue, [], b"fine", {})  # the queue goes on meanwhile
            while len(_tried_again(caplog)) < 2 or not fine:
                await asyncio.sleep(0.05)
        assert calls == [1]  # not delivered again while it waits
        assert await queue_depth(f"{queue}.dead-letter") == 0
        await delete_exchange(dlx)
        await declare_exchange_bound(dlx, f"{queue}.dead-letter", queue)
        [dead] = await drain(f"{queue}.dead-letter", 1, timeout=15)
    finally:
        await sender.close()
        runtime.request_stop()
        assert await task == 0
        await delete_exchange(dlx)
    assert dead.body == b"bad"
    assert calls == [1]
    assert fine == [b"fine"]
    assert len(_tried_again(caplog)) < 8
    assert await queue_depth(queue) == 0


def _tried_again(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "tried again in" in r.getMessage()]


async def declare_exchange_bound(exchange: str, queue: str, routing_key: str) -> None:
    import aiormq

    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        await channel.exchange_declare(exchange, exchange_type="direct", durable=True)
        await channel.queue_bind(queue, exchange, routing_key=routing_key)
    finally:
        await connection.close()


async def internal_exchange(name: str) -> None:
    """Make ``name`` an internal exchange: the broker refuses a publish to it (closing the
    channel, ACCESS_REFUSED), and declaring it again mends nothing."""
    import aiormq

    from tests.servers.test_amqp_support import delete_exchange

    await delete_exchange(name)
    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        await channel.exchange_declare(name, exchange_type="direct", durable=True, internal=True)
    finally:
        await connection.close()


async def test_a_dead_letter_the_broker_refuses_fails_no_send_of_the_application(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The dead-letter exchange refuses messages (internal): the broker closes the
    channel the dead letter went out on. The application's sends have a channel of their
    own: it stays open and a send goes through (on one shared channel, a send waiting
    for its confirmation failed with the dead letter's error)."""
    from amgi.transport import DeadLetter
    from tests.servers.test_amqp_support import delete_exchange

    queue = new_queue()
    dlx = f"amgi-test-dlx-{queue}"
    transport = AmqpTransport([queue], AmqpOptions(url=URL, dead_letter_exchange=dlx))
    await transport.connect()
    try:
        await internal_exchange(dlx)
        await transport.publish(queue, [], b"doomed", {})
        sends = await transport._channel()
        batches: list[Batch] = []
        async with asyncio.timeout(10):
            while not batches:
                batches = list(await transport.fetch())
        [message] = batches[0].messages
        await transport.settle(batches[0], Settlement(dead=[DeadLetter(message, "no")]))
        async with asyncio.timeout(10):  # the dead letter was refused: its channel closed
            while "could not be dead-lettered" not in caplog.text:
                await asyncio.sleep(0.01)
        assert not sends.is_closed
        await transport.publish(queue, [], b"after", {})
        assert await transport._channel() is sends
    finally:
        await transport.close()
        await delete_exchange(dlx)
    # the refused dead letter stayed unacked (it went back at close), the send landed
    assert sorted(m.body for m in await drain(queue, 2, timeout=10)) == [b"after", b"doomed"]


async def send_around(
    transport: AmqpTransport, queue: str, bad: dict[str, Any], payload: bytes = b"bad"
) -> list[BaseException | None]:
    """Ten sends to ``queue`` with one of ``bad`` bindings (or ``payload``) in their
    midst, all at once."""
    sends = [transport.publish(queue, [], b"%d" % i, {}) for i in range(10)]
    sends.insert(5, transport.publish(queue, [], payload, bad))
    return await asyncio.gather(*sends, return_exceptions=True)


def the_bad_one_alone(results: list[BaseException | None]) -> str:
    """The error of the bad send of :func:`send_around`, which failed alone."""
    failed = [r for r in results if r is not None]
    assert len(failed) == 1, results
    assert results.index(failed[0]) == 5
    return str(failed[0])


async def ack_on_open_channels(
    transport: AmqpTransport, batches: list[Batch], *channels: Any
) -> None:
    """Check that ``channels`` stayed open, then ack the message :func:`hold_one` held."""
    assert not any(channel.is_closed for channel in channels)
    [held] = batches[0].messages
    await transport.settle(batches[0], Settlement(acked=[held]))


async def hold_one(transport: AmqpTransport, queue: str) -> list[Batch]:
    """Send one message to ``queue`` and fetch it (unsettled: its delivery is held)."""
    await transport.publish(queue, [], b"held", {})
    async with asyncio.timeout(10):
        batches: list[Batch] = []
        while not batches:
            batches = list(await transport.fetch())
    return batches


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"exchange": "amgi-test-no-such-x"}, "no exchange 'amgi-test-no-such-x'"),
        ({"expiration": "abc"}, "bad amqp bindings for '{queue}': expiration must be a TTL"),
        ({"userId": "someone-else"}, "bad amqp bindings for '{queue}': userId 'someone-else'"),
        ({"priority": 300}, "bad amqp bindings for '{queue}': priority must be an int"),
    ],
)
async def test_a_send_the_broker_would_refuse_fails_alone_and_the_consumer_keeps_its_channel(
    bad: dict[str, Any], error: str
) -> None:
    """The broker answers a publish to a missing exchange, with a bad TTL or with a
    user-id that is not the login by closing the channel: every send waiting there
    failed with that error, and a publish written as it closed could make the broker
    close the whole connection, the consumer's deliveries with it. The exchange is
    asked about first (once, on a channel of its own), the values checked here."""
    queue = new_queue()
    transport = AmqpTransport([queue], AmqpOptions(url=URL))
    await transport.connect()
    try:
        batches = await hold_one(transport, queue)
        consumer = transport._consumers[queue].channel
        sends = await transport._channel()
        for _ in range(3):
            results = await send_around(transport, queue, {"amqp": bad})
            assert error.format(queue=queue) in the_bad_one_alone(results)
        assert await transport._channel() is sends
        await ack_on_open_channels(transport, batches, sends, consumer)
    finally:
        await transport.close()
    assert sorted(m.body for m in await drain(queue, 30, timeout=10)) == sorted(
        b"%d" % i for _ in range(3) for i in range(10)
    )


async def test_sends_the_broker_fails_over_another_ones_refusal_go_out_again() -> None:
    """An exchange deleted after it was found: the send to it closes the channel (at
    times the broker closes the whole connection), and the sends waiting there go out
    again on a new one (only the culprit fails); the next send to it is asked about
    again and fails alone."""
    from tests.servers.test_amqp_support import delete_exchange

    queue = new_queue()
    exchange = f"amgi-test-gone-{queue}"
    await declare(queue, {})
    await declare_exchange_bound(exchange, queue, "k")
    transport = AmqpTransport([], AmqpOptions(url=URL))
    await transport.connect()
    try:
        await transport.publish("k", [], b"found", {"amqp": {"exchange": exchange}})
        await delete_exchange(exchange)
        results = await send_around(transport, queue, {"amqp": {"exchange": exchange}})
        assert f"no exchange '{exchange}'" in the_bad_one_alone(results)
        sends = await transport._channel()
        with pytest.raises(AmqpSendError, match="no exchange"):
            await transport.publish("k", [], b"again", {"amqp": {"exchange": exchange}})
        assert await transport._channel() is sends
    finally:
        await transport.close()
    # A send the broker had taken before it closed the channel, unconfirmed, went out
    # twice (at least once); none is missing.
    bodies = [m.body for m in await drain(queue, 21, timeout=1)]
    assert set(bodies) == {b"found"} | {b"%d" % i for i in range(10)}
    assert bodies.count(b"found") == 1
    assert max(bodies.count(b) for b in bodies) <= 2


RABBITMQ_MAX_MESSAGE = 128 * 1024 * 1024
"""RabbitMQ's default ``max_message_size`` (the test broker keeps it)."""


async def test_a_message_over_the_brokers_size_limit_fails_alone_and_the_next_fails_here(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker refuses a message over its size limit by closing the channel, and its
    reply names no exchange. Large sends have a channel of their own, so the others
    (and the consumer's deliveries) are not on the channel that closes; the limit the
    reply gives is kept, so the next message over it fails without reaching the broker."""
    queue = new_queue()
    transport = AmqpTransport([queue], AmqpOptions(url=URL))
    await transport.connect()
    too_large = b"x" * (RABBITMQ_MAX_MESSAGE + 1)
    try:
        batches = await hold_one(transport, queue)
        consumer = transport._consumers[queue].channel
        sends = await transport._channel()
        results = await send_around(transport, queue, {}, too_large)
        assert "is larger than configured max size" in the_bad_one_alone(results)
        large = await transport._channel("large")
        with pytest.raises(AmqpSendError, match="larger than the broker's max size 134217728"):
            await transport.publish(queue, [], too_large, {})
        assert await transport._channel("large") is large
        assert await transport._channel() is sends
        await ack_on_open_channels(transport, batches, sends, consumer)
    finally:
        await transport.close()
        del too_large
    assert "lost the connection" not in caplog.text
    learned = [r.getMessage() for r in caplog.records if "refuses messages over" in r.getMessage()]
    assert learned == [
        "amqp: the broker refuses messages over 134217728 bytes: sends larger than that "
        "fail here from now on (restart the server to pick up a raised limit)"
    ]
    bodies = sorted(m.body for m in await drain(queue, 10, timeout=10))
    assert bodies == sorted(b"%d" % i for i in range(10))


async def test_large_sends_failed_over_anothers_size_refusal_go_out_again() -> None:
    """Large sends share their channel: when the broker closes it over one message too
    large, the others, whose refusal names another size, go out once more."""
    queue = new_queue()
    await declare(queue, {})
    transport = AmqpTransport([], AmqpOptions(url=URL))
    await transport.connect()
    large = [b"%d" % i + b"y" * (2 * 1024 * 1024) for i in range(4)]
    try:
        sends = [transport.publish(queue, [], body, {}) for body in large]
        sends.insert(2, transport.publish(queue, [], b"x" * (RABBITMQ_MAX_MESSAGE + 1), {}))
        results = await asyncio.gather(*sends, return_exceptions=True)
    finally:
        await transport.close()
    failed = [r for r in results if r is not None]
    assert len(failed) == 1, results
    assert results.index(failed[0]) == 2
    bodies = [m.body for m in await drain(queue, 8, timeout=1)]
    assert set(bodies) == set(large)
    assert max(bodies.count(b) for b in bodies) <= 2


async def test_a_message_another_user_published_with_its_user_id_is_retried_and_dead_lettered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The ``user-id`` property names the user who published; RabbitMQ refuses a publish
    that claims another user than the connection's. The server's copies of such a
    message (retry, dead letter) carried it: every copy was refused, the message stayed
    unacked for good (its channel's later acks waiting behind it) and each refusal closed
    the channel of the server's moves."""
    import aiormq
    from pamqp.commands import Basic

    from tests.servers.test_amqp_support import rabbitmqctl

    caplog.set_level(logging.ERROR, "amgi.servers.kit")
    queue = new_queue()
    user = f"amgi-test-user-{queue[-12:]}"
    await rabbitmqctl("add_user", user, "secret")
    transport = AmqpTransport([queue], AmqpOptions(url=URL, linger=0.3))
    try:
        await rabbitmqctl("set_permissions", user, ".*", ".*", ".*")
        await transport.connect()
        other = await aiormq.connect(f"amqp://{user}:secret@127.0.0.1:5672/")
        try:
            channel = await other.channel()
            for body in (b"retry me", b"bury me"):
                properties = Basic.Properties(user_id=user, app_id="theirs")
                await channel.basic_publish(body, routing_key=queue, properties=properties)
        finally:
            await other.close()
        batches: list[Batch] = []
        async with asyncio.timeout(5):
            while sum(len(b.messages) for b in batches) < 2:
                batches.extend(await transport.fetch())
        [batch] = batches
        retried, buried = batch.messages
        assert retried.bindings["amqp"]["userId"] == user
        settlement = Settlement(
            retry=[Retry(retried, "again", 0.05)], dead=[DeadLetter(buried, "no")]
        )
        async with asyncio.timeout(5):
            await transport.settle(batch, settlement)
            [back] = await transport.fetch()
        [message] = back.messages
        assert (message.payload, message.attempt) == (b"retry me", 2)
        assert message.bindings["amqp"]["appId"] == "theirs"  # the other properties stay
        await transport.settle(back, Settlement(acked=[message]))
        [dead] = await drain(f"{queue}.dead-letter", 1, timeout=5)
        assert dead.body == b"bury me"
        assert dead.header.properties.app_id == "theirs"
    finally:
        await transport.close()
        await rabbitmqctl("delete_user", user)
    assert await queue_depth(queue) == 0
    assert not caplog.records


async def test_a_send_whose_headers_overflow_a_frame_fails_alone_and_the_connection_stays() -> None:
    """The headers and properties travel in one frame, at most the connection's
    ``frame_max`` (128 KiB on RabbitMQ). A larger header frame made the broker close the
    whole connection (FRAME_ERROR): the consumers' deliveries went back with it."""
    queue = new_queue()
    transport = AmqpTransport([queue], AmqpOptions(url=URL, linger=0.05))
    await transport.connect()
    try:
        await transport.publish(queue, [], b"held", {})
        async with asyncio.timeout(5):
            [batch] = await transport.fetch()
        generation = transport._generation
        headers = [(b"h%d" % i, b"v" * 1000) for i in range(200)]
        with pytest.raises(AmqpSendError, match=r"headers and properties take \d+ bytes"):
            await transport.publish(queue, headers, b"too many headers", {})
        await asyncio.sleep(0.3)  # time for a close to arrive
        assert transport._generation == generation  # no reconnect
        await transport.settle(batch, Settlement(acked=list(batch.messages)))
        fits = [(b"h%d" % i, b"v" * 1000) for i in range(120)]
        await transport.publish(queue, fits, b"fits", {})
        async with asyncio.timeout(5):
            [back] = await transport.fetch()
        assert [m.payload for m in back.messages] == [b"fits"]
        assert back.messages[0].headers == fits
        await transport.settle(back, Settlement(acked=list(back.messages)))
        await asyncio.sleep(0.2)
    finally:
        await transport.close()
    assert await queue_depth(queue) == 0


async def test_a_dead_letter_with_a_reason_too_long_for_a_frame_lands_with_the_reason_cut() -> None:
    """A nack reason is the application's text (an exception's message may hold a whole
    payload). It travels in a header of the dead letter, and a header frame over
    ``frame_max`` made the broker close the connection: the message came back, was
    nacked again, and closed the connection again, without end."""
    queue = new_queue()
    transport = AmqpTransport([queue], AmqpOptions(url=URL, linger=0.05))
    await transport.connect()
    try:
        await transport.publish(queue, [(b"k", b"v")], b"doomed", {})
        async with asyncio.timeout(5):
            [batch] = await transport.fetch()
        generation = transport._generation
        reason = "ValueError: " + "x" * 200_000
        async with asyncio.timeout(5):
            await transport.settle(batch, Settlement(dead=[DeadLetter(batch.messages[0], reason)]))
        [dead] = await drain(f"{queue}.dead-letter", 1, timeout=5)
        assert transport._generation == generation  # no reconnect
    finally:
        await transport.close()
    assert dead.body == b"doomed"
    headers = dead.header.properties.headers
    assert headers["k"] == "v"
    cut = headers["amgi-dead-letter-reason"]
    assert cut == "ValueError: " + "x" * 953 + "... (cut: 200012 characters in all)"
    assert len(cut) == 1000
    assert await queue_depth(queue) == 0


async def test_a_retry_met_by_a_connection_loss_is_delivered_again_not_dead_lettered() -> None:
    """The connection drops as a batch settles with a retry: the broker puts the message
    back (its channel is gone), so no copy is due. The retry failed (no connection), the
    copy fell through to the dead letters, which went out on the new connection: an
    innocent message in the dead letters, and delivered again as well."""
    queue = new_queue()
    transport = AmqpTransport([queue], AmqpOptions(url=URL, linger=0.01))
    await transport.connect()
    try:
        await transport.publish(queue, [], b"again", {})
        async with asyncio.timeout(5):
            [batch] = await transport.fetch()
        declare = transport._declare_retry_queue

        async def lost_meanwhile(*args: Any) -> None:
            assert transport._connection is not None
            await transport._connection.close()  # as a connection loss would
            await declare(*args)

        transport._declare_retry_queue = lost_meanwhile  # type: ignore[method-assign]
        [message] = batch.messages
        async with asyncio.timeout(10):
            await transport.settle(batch, Settlement(retry=[Retry(message, "later", 0.05)]))
            [back] = await transport.fetch()
        assert [(m.payload, m.attempt) for m in back.messages] == [(b"again", 1)]
        await transport.settle(back, Settlement(acked=list(back.messages)))
        await asyncio.sleep(0.3)
    finally:
        await transport.close()
    assert await queue_depth(f"{queue}.dead-letter") == 0
    assert await queue_depth(queue) == 0


async def test_a_retry_queue_deleted_while_the_server_runs_is_declared_again() -> None:
    """The server declares ``<queue>.retry.<ms>`` once. Deleted since (an operator
    tidying up), every retry of that delay came back unroutable and was dead-lettered at
    once, an innocent message on its second attempt of five."""
    import aiormq

    queue = new_queue()
    transport = AmqpTransport([queue], AmqpOptions(url=URL, linger=0.01))
    await transport.connect()
    try:
        await transport.publish(queue, [], b"twice", {})
        async with asyncio.timeout(5):
            [batch] = await transport.fetch()
            await transport.settle(batch, Settlement(retry=[Retry(batch.messages[0], "a", 0.05)]))
            [batch] = await transport.fetch()
        connection = await aiormq.connect(URL)
        try:
            channel = await connection.channel()
            await channel.queue_delete(f"{queue}.retry.50")
        finally:
            await connection.close()
        async with asyncio.timeout(5):
            await transport.settle(batch, Settlement(retry=[Retry(batch.messages[0], "b", 0.05)]))
            [back] = await transport.fetch()
        assert [(m.payload, m.attempt) for m in back.messages] == [(b"twice", 3)]
        await transport.settle(back, Settlement(acked=list(back.messages)))
        await asyncio.sleep(0.2)
    finally:
        await transport.close()
    assert await queue_depth(f"{queue}.dead-letter") == 0
    assert await queue_depth(queue) == 0


@pytest.mark.parametrize("deleted", ["queue", "exchange"])
async def test_dead_letters_deleted_while_the_server_runs_are_declared_again(deleted: str) -> None:
    """The server declares the dead-letter exchange and ``<queue>.dead-letter`` once.
    Deleted since, every dead letter was refused (unroutable, or no exchange) for good:
    it stayed unacked, held back the acks of every later message of the queue, and
    consumption stopped once they filled the prefetch."""
    from tests.servers.test_amqp_support import delete_exchange

    queue = new_queue()
    dlx = f"amgi-test-dlx-{queue}"
    options = AmqpOptions(url=URL, batch_size=1, linger=0, prefetch=3, dead_letter_exchange=dlx)
    transport = AmqpTransport([queue], options)
    await transport.connect()
    try:
        if deleted == "queue":
            import aiormq

            connection = await aiormq.connect(URL)
            try:
                channel = await connection.channel()
                await channel.queue_delete(f"{queue}.dead-letter")
            finally:
                await connection.close()
        else:
            await delete_exchange(dlx)
        await transport.publish(queue, [], b"poison", {})
        async with asyncio.timeout(5):
            [batch] = await transport.fetch()
        await transport.settle(batch, Settlement(dead=[DeadLetter(batch.messages[0], "bad")]))
        for i in range(5):  # more than the prefetch
            await transport.publish(queue, [], b"fine %d" % i, {})
        acked = 0
        async with asyncio.timeout(10):
            while acked < 5:
                for batch in await transport.fetch():
                    await transport.settle(batch, Settlement(acked=list(batch.messages)))
                    acked += len(batch.messages)
        [dead] = await drain(f"{queue}.dead-letter", 1, timeout=5)
        await asyncio.sleep(0.2)
    finally:
        await transport.close()
        await delete_exchange(dlx)
    assert dead.body == b"poison"
    assert await queue_depth(queue) == 0


async def test_a_message_with_the_largest_headers_a_send_takes_can_be_retried_and_dead_lettered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A retry or dead letter adds headers to the message's own. A message whose headers
    filled the frame made each copy overflow it: the broker closed the connection, the
    message came back at the same attempt, for good, and every other delivery in flight
    went back with it each time. A send keeps room for them now, and a dead letter's
    reason is cut to the room there is."""
    caplog.set_level(logging.WARNING, "amgi.servers")
    queue = new_queue()
    transport = AmqpTransport([queue], AmqpOptions(url=URL, linger=0.01))
    await transport.connect()
    try:
        with pytest.raises(AmqpSendError) as caught:
            await transport.publish(queue, [(b"z", b"last"), (b"h", b"v" * 140_000)], b"", {})
        size, limit = map(int, re.findall(r"\d+", str(caught.value))[:2])
        headers = [(b"z", b"last"), (b"h", b"v" * (140_000 - (size - limit)))]
        await transport.publish(queue, headers, b"full", {})
        generation = transport._generation
        async with asyncio.timeout(5):
            [batch] = await transport.fetch()
            await transport.settle(batch, Settlement(retry=[Retry(batch.messages[0], "a", 0.05)]))
            [batch] = await transport.fetch()
        [message] = batch.messages
        assert (message.payload, message.attempt, message.headers) == (b"full", 2, headers)
        dead = DeadLetter(message, "é" * 3000)
        async with asyncio.timeout(5):
            await transport.settle(batch, Settlement(dead=[dead]))
        [stored] = await drain(f"{queue}.dead-letter", 1, timeout=5)
        assert transport._generation == generation  # the connection never dropped
    finally:
        await transport.close()
    reason = stored.header.properties.headers["amgi-dead-letter-reason"]
    assert reason.startswith("éé")
    assert reason.endswith(" more characters cut)")
    assert stored.header.properties.headers["h"] == headers[1][1].decode()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_send_asking_for_direct_reply_to_fails_alone() -> None:
    """``replyTo: amq.rabbitmq.reply-to`` needs a consumer of that pseudo-queue on the
    publishing channel. The broker closed the channel of the sends over it (failing the
    sends waiting there) and at times the whole connection."""
    queue = new_queue()
    transport = AmqpTransport([queue], AmqpOptions(url=URL, linger=0.01))
    await transport.connect()
    try:
        await transport.publish(queue, [], b"first", {})
        generation = transport._generation

        async def send(i: int) -> str | None:
            binding = {"amqp": {"replyTo": "amq.rabbitmq.reply-to"}} if i == 5 else {}
            try:
                await transport.publish(queue, [], b"%d" % i, binding)
            except AmqpSendError as exc:
                return str(exc)
            return None

        results = await asyncio.gather(*(send(i) for i in range(20)))
        await asyncio.sleep(0.3)
        assert transport._generation == generation
    finally:
        await transport.close()
    assert [i for i, r in enumerate(results) if r is not None] == [5]
    assert "bad amqp bindings" in (results[5] or "")
    assert "amq.rabbitmq.reply-to" in (results[5] or "")
    assert await queue_depth(queue) == 20


async def test_a_message_the_client_cannot_read_does_not_make_the_server_reconnect_in_a_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A delivery the client fails to read makes it drop the connection. The broker
    delivers it again on the next one: the server reconnected hundreds of times a
    second, without end. Now a connection lost soon after it was made waits the
    reconnect backoff. (A header name that is not UTF-8 was such a delivery: it is read
    now, see below; here the lenient reader is made to fail too.)"""
    import struct

    import aiormq
    from pamqp import encode
    from pamqp.commands import Basic

    from amgi.servers.amqp import _frames

    def unreadable(payload: bytes, odd: Any) -> Any:
        raise ValueError("unreadable")

    monkeypatch.setattr(_frames, "_content_header", unreadable)
    queue = new_queue()
    transport = AmqpTransport([queue], AmqpOptions(url=URL, reconnect_delay_max=1.0))
    await transport.connect()  # declares the queue
    plain = encode.field_table

    def not_utf8(value: Any) -> bytes:
        if value and "not-utf8" in value:
            entry = b"\x02k\xff" + b"S" + struct.pack(">I", 1) + b"v"
            return struct.pack(">I", len(entry)) + entry
        return plain(value)

    try:
        await transport.close()
        connection = await aiormq.connect(URL)
        try:
            channel = await connection.channel()
            with monkeypatch.context() as patch:
                patch.setitem(encode.METHODS, "table", not_utf8)
                patch.setattr(encode, "field_table", not_utf8)
                properties = Basic.Properties(headers={"not-utf8": "v"})
                await channel.basic_publish(b"unreadable", routing_key=queue, properties=properties)
            await transport.connect()
            first = transport._generation
            await asyncio.sleep(2.5)
            reconnects = transport._generation - first
        finally:
            await channel.queue_purge(queue)
            await connection.close()
    finally:
        await transport.close()
    assert 1 <= reconnects <= 6  # 0.1 + 0.2 + 0.4 + 0.8 + 1 ... s apart


class _PausableProxy:
    """A TCP relay to the broker whose client-to-broker direction can be paused: the
    broker reads nothing of that connection meanwhile, as when it blocks a publisher
    (a memory or disk alarm), without blocking the other tests' connections."""

    def __init__(self) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.lag = 0.0
        """Seconds each read of the client's is held before the broker gets it."""
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"amqp://guest:guest@127.0.0.1:{port}/"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", 5672)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, gated: bool) -> None:
            try:
                while data := await src.read(65536):
                    if gated:
                        await self.flowing.wait()
                        if self.lag:
                            await asyncio.sleep(self.lag)
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for task in (
            asyncio.create_task(pipe(reader, upstream_writer, True)),
            asyncio.create_task(pipe(upstream_reader, writer, False)),
        ):
            self._pipes.add(task)

    async def drop(self) -> None:
        """Cut the connections relayed so far, as a network loss would (new ones pass)."""
        pipes, self._pipes = self._pipes, set()
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)

    async def close(self) -> None:
        self.flowing.set()
        if self._server is not None:
            self._server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


async def test_a_retry_the_broker_nacks_stays_unacked_and_is_retried_not_dead_lettered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The retry queue refuses new messages for a while (a policy of max-length 0 with
    overflow reject-publish: the broker nacks the copy). The broker's refusal is not
    the message's fault: it used to fall through to the dead letters at its first
    attempt. It stays unacked and its retry is published once the broker takes it."""
    from tests.servers.test_amqp_support import rabbitmqctl

    caplog.set_level(logging.ERROR, "amgi.servers.kit")
    queue = new_queue()
    policy = f"{queue}-full"
    definition = '{"max-length":0,"overflow":"reject-publish"}'
    transport = AmqpTransport([queue], AmqpOptions(url=URL, linger=0.01))
    await transport.connect()
    try:
        await transport.publish(queue, [], b"innocent", {})
        async with asyncio.timeout(5):
            [batch] = await transport.fetch()
        pattern = "^" + re.escape(f"{queue}.retry.")
        await rabbitmqctl("set_policy", "--apply-to", "queues", policy, pattern, definition)
        try:
            async with asyncio.timeout(5):
                await transport.settle(
                    batch, Settlement(retry=[Retry(batch.messages[0], "a", 0.05)])
                )
            await asyncio.sleep(0.7)  # the first try in the background was nacked too
        finally:
            await rabbitmqctl("clear_policy", policy)
        assert await queue_depth(f"{queue}.dead-letter") == 0
        async with asyncio.timeout(10):
            [back] = await transport.fetch()
        assert [(m.payload, m.attempt) for m in back.messages] == [(b"innocent", 2)]
        await transport.settle(back, Settlement(acked=list(back.messages)))
        await asyncio.sleep(0.2)
    finally:
        await transport.close()
    assert await queue_depth(f"{queue}.dead-letter") == 0
    assert await queue_depth(queue) == 0
    assert any("could not be published for now" in r.getMessage() for r in caplog.records)
    assert not any("dead-lettering it" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("refused_for", "declared"), [(3.0, True), (0.5, True), (0.5, False)])
async def test_a_retry_not_confirmed_in_time_is_published_once_and_not_dead_lettered(
    refused_for: float, declared: bool
) -> None:
    """The broker reads nothing of the connection for a while (as when it blocks
    publishers in a memory or disk alarm): the retry copy's confirm timed out and the
    message fell through to the dead letters, which landed once the broker read on,
    with the retry copy beside them. Now it stays unacked, and the next tries wait for
    the confirm of the copy already sent instead of sending another. An alarm longer
    than ``--retry-refused-for`` dead-letters nothing either: a dead letter would be a
    second copy while the retry copy is on its way, or wait for the broker as well while
    the retry queue's declaration does (``declared`` false: the pause comes first)."""
    proxy = _PausableProxy()
    url = await proxy.start()
    queue = new_queue()
    options = AmqpOptions(url=url, linger=0.01, confirm_timeout=0.3, retry_refused_for=refused_for)
    transport = AmqpTransport([queue], options)
    await transport.connect()
    try:
        await transport.publish(queue, [], b"innocent", {})
        async with asyncio.timeout(5):
            [batch] = await transport.fetch()
            if declared:  # a first retry declares the retry queue while the broker reads
                retry = Retry(batch.messages[0], "a", 0.05)
                await transport.settle(batch, Settlement(retry=[retry]))
                [batch] = await transport.fetch()
        assert [m.attempt for m in batch.messages] == [1 + declared]
        proxy.flowing.clear()
        try:
            async with asyncio.timeout(5):
                await transport.settle(
                    batch, Settlement(retry=[Retry(batch.messages[0], "b", 0.05)])
                )
            await asyncio.sleep(1.5)  # two tries in the background time out too
        finally:
            proxy.flowing.set()
        async with asyncio.timeout(10):
            [back] = await transport.fetch()
        assert [(m.payload, m.attempt) for m in back.messages] == [(b"innocent", 2 + declared)]
        await transport.settle(back, Settlement(acked=list(back.messages)))
        await asyncio.sleep(1.0)  # time for a second copy to show
        assert not transport._buffer
    finally:
        await transport.close()
        await proxy.close()
    assert await queue_depth(f"{queue}.dead-letter") == 0
    assert await queue_depth(queue) == 0


async def at_its_second_try(transport: AmqpTransport, queue: str) -> Batch:
    """A message published to ``queue``, fetched again after one retry (which declared
    the retry queue, so that the next retry copy is a plain publish)."""
    await transport.publish(queue, [], b"innocent", {})
    async with asyncio.timeout(5):
        [batch] = await transport.fetch()
        await transport.settle(batch, Settlement(retry=[Retry(batch.messages[0], "a", 0.05)]))
        [batch] = await transport.fetch()
    return batch


async def test_a_retry_copy_unconfirmed_as_its_channel_goes_is_not_kept_for_good() -> None:
    """The broker reads nothing of the connection and the queue is deleted meanwhile
    (its consumer cancelled: the server drops the channel and reconnects): the retry
    copy's confirm timed out after the channel went, and its entry (the message, body
    and all, and the copy's task) stayed in the server's memory until it stopped."""
    proxy = _PausableProxy()
    url = await proxy.start()
    queue = new_queue()
    options = AmqpOptions(url=url, linger=0.01, confirm_timeout=1.0, reconnect_delay_max=0.2)
    transport = AmqpTransport([queue], options)
    await transport.connect()
    try:
        batch = await at_its_second_try(transport, queue)
        proxy.flowing.clear()
        try:
            settling = asyncio.create_task(
                transport.settle(batch, Settlement(retry=[Retry(batch.messages[0], "b", 0.05)]))
            )
            await asyncio.sleep(0.1)
            await delete_queue(queue)  # the broker cancels the consumer
            async with asyncio.timeout(10):
                await settling
        finally:
            proxy.flowing.set()
        async with asyncio.timeout(15):
            while transport._unconfirmed:
                await asyncio.sleep(0.05)
    finally:
        await transport.close()
        await proxy.close()


@pytest.mark.parametrize("later", [False, True])
async def test_a_retry_whose_channel_goes_while_it_waits_is_said_to_come_back(
    caplog: pytest.LogCaptureFixture, later: bool
) -> None:
    """The connection is lost while a retry copy waits for its confirm (in the settle,
    or ``later`` in the background, its first wait timed out): the broker delivers the
    message again. The log said that it stayed unacknowledged, to be dead-lettered if
    still refused after 5 min; the settlement, that it was tried again."""
    caplog.set_level(logging.INFO)
    proxy = _PausableProxy()
    url = await proxy.start()
    queue = new_queue()
    timeout = 1.0 if later else 5.0
    options = AmqpOptions(url=url, linger=0.01, confirm_timeout=timeout, reconnect_delay_max=0.2)
    transport = AmqpTransport([queue], options)
    await transport.connect()
    try:
        batch = await at_its_second_try(transport, queue)
        proxy.flowing.clear()
        retry = Retry(batch.messages[0], "b", 0.05)
        settling = asyncio.create_task(transport.settle(batch, Settlement(retry=[retry])))
        async with asyncio.timeout(5):
            if later:  # tried again at once in the background, waiting for the confirm
                await settling
                caplog.clear()
            while not transport._unconfirmed:  # the copy is out, waiting for its confirm
                await asyncio.sleep(0.01)
        await proxy.drop()
        proxy.flowing.set()
        async with asyncio.timeout(10):
            await settling
            [back] = await transport.fetch()
        assert [(m.payload, m.attempt) for m in back.messages] == [(b"innocent", 2)]
        await transport.settle(back, Settlement(acked=list(back.messages)))
        await asyncio.sleep(0.2)
    finally:
        await transport.close()
        await proxy.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [s for s in said if "stays unacknowledged" in s or "dead-letter" in s], said
    if later:
        assert [s for s in said if "the broker delivers them again" in s], said
    else:
        assert retry.error == "its channel closed: the broker delivers it again"
        assert retry.dead is None
    assert await queue_depth(f"{queue}.dead-letter") == 0


async def delete_queue(queue: str) -> None:
    import aiormq

    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        await channel.queue_delete(queue)
    finally:
        await connection.close()


def _raw_table(*entries: tuple[bytes, bytes, bytes]) -> bytes:
    """An AMQP field table of ``(name, type tag, encoded value)`` entries, as another
    client may write it (pamqp writes only UTF-8 names and in-range timestamps)."""
    import struct

    data = b"".join(bytes([len(n)]) + n + tag + raw for n, tag, raw in entries)
    return struct.pack(">I", len(data)) + data


async def _publish_raw(
    monkeypatch: pytest.MonkeyPatch, queue: str, body: bytes, table: bytes | None, **props: Any
) -> None:
    """Publish ``body`` to ``queue`` with the headers table ``table`` written as given
    and properties written as they are (``bytes`` short strings, an ``int`` timestamp)."""
    import aiormq
    from pamqp import encode

    from amgi.servers.amqp._frames import CopyProperties

    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        with monkeypatch.context() as patch:
            if table is not None:
                patch.setitem(encode.METHODS, "table", lambda _value: table)
                props["headers"] = {"placeholder": ""}
            properties = CopyProperties(**props)
            await channel.basic_publish(body, routing_key=queue, properties=properties)
    finally:
        await connection.close()


async def test_a_header_the_client_cannot_read_reaches_the_app_as_bytes_and_blocks_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A header name that is not UTF-8, a timestamp after the year 9999 (a header's or
    the property's), a content type that is not UTF-8: RabbitMQ passes them on, pamqp
    failed the content header and aiormq dropped the connection. The broker delivered
    the message again on the next connection, and again: the queue was blocked for
    good, the messages behind it with it. Now they are read as bytes (numbers), reach
    the app, and a retry or dead-letter copy keeps them."""
    import struct

    import aiormq
    from pamqp.commands import Basic

    from amgi.servers.amqp._frames import lenient

    caplog.set_level(logging.WARNING, "amgi.servers.amqp")
    queue = new_queue()
    transport = AmqpTransport([queue], AmqpOptions(url=URL, linger=0.05))
    await transport.connect()
    try:
        year_10000_ms = struct.pack(">Q", 253402300800 * 1000)
        name_table = _raw_table((b"k\xff", b"S", b"\x00\x00\x00\x01v"))
        value_table = _raw_table(
            (b"nested", b"F", _raw_table((b"\xfe", b"V", b""))), (b"when", b"T", year_10000_ms)
        )
        await _publish_raw(monkeypatch, queue, b"name", name_table)
        await _publish_raw(monkeypatch, queue, b"value", value_table)
        await _publish_raw(
            monkeypatch, queue, b"props", None, content_type=b"\xff\xfe", timestamp=2**63
        )
        await transport.publish(queue, [], b"innocent", {})
        generation = transport._generation
        got: dict[bytes | None, Any] = {}
        async with asyncio.timeout(5):
            while len(got) < 4:
                for batch in await transport.fetch():
                    got.update((m.payload, (batch, m)) for m in batch.messages)
        assert transport._generation == generation  # the connection never dropped
        name, value, props = got[b"name"][1], got[b"value"][1], got[b"props"][1]
        assert name.headers == [(b"k\xff", b"v")]
        assert value.headers == [(b"nested", b"{b'\\xfe': None}"), (b"when", b"253402300800000")]
        assert props.bindings["amqp"]["contentType"] == b"\xff\xfe"
        assert props.bindings["amqp"]["timestamp"] == 2**63
        for payload, (batch, message) in got.items():
            if payload == b"innocent":
                await transport.settle(batch, Settlement(acked=[message]))
            else:
                await transport.settle(batch, Settlement(retry=[Retry(message, "a", 0.05)]))
        back: dict[bytes | None, Any] = {}
        async with asyncio.timeout(5):
            while len(back) < 3:
                for batch in await transport.fetch():
                    back.update((m.payload, (batch, m)) for m in batch.messages)
        for payload, (_batch, message) in back.items():
            first = got[payload][1]
            assert (message.headers, message.attempt) == (first.headers, 2)
            assert message.bindings["amqp"].get("contentType") == first.bindings["amqp"].get(
                "contentType"
            )
        batch, message = back[b"props"]
        await transport.settle(batch, Settlement(dead=[DeadLetter(message, "bad")]))
        for payload in (b"name", b"value"):
            batch, message = back[payload]
            await transport.settle(batch, Settlement(acked=[message]))
        await asyncio.sleep(0.2)
        assert transport._generation == generation
    finally:
        await transport.close()
    assert await queue_depth(queue) == 0
    with lenient():
        connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        dead = await channel.basic_get(f"{queue}.dead-letter", no_ack=True)
        assert isinstance(dead.delivery, Basic.GetOk)
    finally:
        await connection.close()
    assert dead.body == b"props"
    assert dead.header.properties.content_type == b"\xff\xfe"
    assert dead.header.properties.timestamp == 2**63
    assert dead.header.properties.headers["amgi-dead-letter-reason"] == "bad"
    warnings = [r.getMessage() for r in caplog.records if "cannot read" in r.getMessage()]
    assert any("the header name b'k\\xff' is not UTF-8" in w for w in warnings)
    assert any("the content-type property b'\\xff\\xfe' is not UTF-8" in w for w in warnings)


async def test_a_dead_letter_not_confirmed_in_time_is_published_once() -> None:
    """The broker reads nothing of the connection for a while (as when it blocks
    publishers in a memory or disk alarm): the dead letter's confirm timed out, and
    each try in the background published another copy, all of which landed in the
    dead letters once the broker read on. Now the tries wait for the confirm of the
    copy already sent, as a retry copy's do."""
    proxy = _PausableProxy()
    url = await proxy.start()
    queue = new_queue()
    transport = AmqpTransport([queue], AmqpOptions(url=url, linger=0.01, confirm_timeout=0.3))
    await transport.connect()
    try:
        await transport.publish(queue, [], b"first", {})
        await transport.publish(queue, [], b"second", {})
        async with asyncio.timeout(5):
            batches = await transport.fetch()
            while sum(len(b.messages) for b in batches) < 2:
                batches += await transport.fetch()
        messages = [(b, m) for b in batches for m in b.messages]
        (b1, first), (b2, second) = messages
        # A first dead letter opens the moves channel while the broker still reads.
        await transport.settle(b1, Settlement(dead=[DeadLetter(first, "bad")]))
        proxy.flowing.clear()
        try:
            async with asyncio.timeout(5):
                await transport.settle(b2, Settlement(dead=[DeadLetter(second, "bad")]))
            await asyncio.sleep(1.5)  # two tries in the background time out too
        finally:
            proxy.flowing.set()
        dead = await drain(f"{queue}.dead-letter", 2, timeout=10)
        await asyncio.sleep(1.5)  # time for a later try to land another copy
        dead += await drain(f"{queue}.dead-letter", 5, timeout=0)
        await asyncio.sleep(0.2)
    finally:
        await transport.close()
        await proxy.close()
    assert sorted(d.body for d in dead) == [b"first", b"second"]
    assert await queue_depth(queue) == 0


async def test_a_retry_queue_that_refuses_for_longer_than_the_bound_dead_letters_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The retry queue refuses every copy for good (a policy of max-length 0 with
    overflow reject-publish: the broker nacks each one). The message stayed unacked
    for ever, an ERROR every 30 s, holding a place of the prefetch. After
    ``--retry-refused-for`` it is dead-lettered once, not before, with a reason that
    names the retry queue and the likely cause."""
    from tests.servers.test_amqp_support import rabbitmqctl

    caplog.set_level(logging.ERROR, "amgi.servers.kit")
    queue = new_queue()
    policy = f"{queue}-full"
    definition = '{"max-length":0,"overflow":"reject-publish"}'
    options = AmqpOptions(url=URL, linger=0.01, retry_refused_for=1.0)
    transport = AmqpTransport([queue], options)
    await transport.connect()
    pattern = "^" + re.escape(f"{queue}.retry.")
    await rabbitmqctl("set_policy", "--apply-to", "queues", policy, pattern, definition)
    try:
        await transport.publish(queue, [], b"innocent", {})
        async with asyncio.timeout(5):
            [batch] = await transport.fetch()
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(5):
            await transport.settle(batch, Settlement(retry=[Retry(batch.messages[0], "a", 0.05)]))
        await asyncio.sleep(0.8)
        assert await queue_depth(f"{queue}.dead-letter") == 0, "dead-lettered before the bound"
        [dead] = await drain(f"{queue}.dead-letter", 1, timeout=5)
        assert asyncio.get_running_loop().time() - started >= 1.0
        await asyncio.sleep(0.6)  # time for a second dead letter to show
        assert await queue_depth(f"{queue}.dead-letter") == 0
    finally:
        await rabbitmqctl("clear_policy", policy)
        await transport.close()
    assert await queue_depth(queue) == 0  # acked once dead-lettered
    assert dead.body == b"innocent"
    reason = dead.header.properties.headers["amgi-dead-letter-reason"]
    assert reason.startswith("a (its retry was refused for ")
    assert f"{queue}.retry.50" in reason
    assert "reject-publish" in reason
    lines = [r.getMessage() for r in caplog.records if "dead-lettering it" in r.getMessage()]
    assert len(lines) == 1
    assert "refused for" in lines[0]


# A node of its own: starting it may take up to 120 s on a loaded machine and stopping
# it 30 s (private_rabbitmq's own bounds), more than the file's limit per test.
@pytest.mark.timeout(180)
async def test_a_message_held_past_the_consumer_timeout_comes_back_at_its_next_attempt(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The application holds a message longer than the broker's ``consumer_timeout``:
    the broker closes the channel (PRECONDITION_FAILED). The server logged only "lost the
    connection", and on a classic queue the message came back at the same attempt, for
    good: a too slow message was never dead-lettered. On a private node: the timeout is
    a setting of the whole broker."""
    caplog.set_level(logging.WARNING, "amgi.servers.amqp")
    queue = new_queue()
    with private_rabbitmq(tmp_path / "rabbitmq") as broker:
        await broker.consumer_timeout_of_a_second()
        options = AmqpOptions(url=broker.url, batch_size=1, linger=0)
        transport = AmqpTransport([queue], options)
        await transport.connect()
        try:
            await transport.publish(queue, [], b"slow", {})
            async with asyncio.timeout(5):
                [batch] = await transport.fetch()
            # A channel takes the broker's timeout when it opens: this one keeps its second,
            # those of the reconnection get half an hour (set afterwards, one that opened
            # meanwhile could close on the redelivery before the test acked it).
            await asyncio.to_thread(
                broker.ctl, "eval", "application:set_env(rabbit, consumer_timeout, 1800000)."
            )
            async with asyncio.timeout(15):
                while "consumer_timeout" not in caplog.text:
                    await asyncio.sleep(0.05)
            await transport.settle(batch, Settlement(acked=list(batch.messages)))  # too late
            async with asyncio.timeout(10):
                [back] = await transport.fetch()
            assert [(m.payload, m.attempt) for m in back.messages] == [(b"slow", 2)]
            await transport.settle(back, Settlement(acked=list(back.messages)))
            await asyncio.sleep(0.2)
        finally:
            await transport.close()
        assert "PRECONDITION_FAILED - delivery acknowledgement" in caplog.text
        assert await queue_depth(queue, url=broker.url) == 0


async def test_deliveries_a_quorum_queue_takes_back_unseen_use_up_no_attempt() -> None:
    """The connection closes while the server has deliveries buffered that the
    application never had: the quorum queue counts each return in x-delivery-count, so
    they came back at a higher attempt, one more per lost connection. The message the
    application held is counted, the others are not."""
    from tests.servers.test_amqp_support import close_connections

    queue = new_queue()
    name = f"amgi-test-{queue}"
    options = AmqpOptions(
        url=f"{URL}?name={name}", queue_type="quorum", batch_size=1, linger=0, prefetch=10
    )
    transport = AmqpTransport([queue], options)
    await transport.connect()
    try:
        for i in range(4):
            await transport.publish(queue, [], b"%d" % i, {})
        async with asyncio.timeout(5):
            [held] = await transport.fetch()  # in the application's hands
        for unseen in (3, 4):  # all of them buffered: none left in flight
            async with asyncio.timeout(10):
                while len(transport._buffer) < unseen or not transport._ready.is_set():
                    await asyncio.sleep(0.02)
            generation = transport._generation
            assert await close_connections(name)
            async with asyncio.timeout(10):
                while transport._generation == generation:
                    await asyncio.sleep(0.02)
        got: dict[bytes | None, int] = {}
        async with asyncio.timeout(10):
            while len(got) < 4:
                for batch in await transport.fetch():
                    got.update((m.payload, m.attempt) for m in batch.messages)
                    await transport.settle(batch, Settlement(acked=list(batch.messages)))
        await asyncio.sleep(0.2)
    finally:
        await transport.close()
    assert held.messages[0].payload == b"0"
    assert got == {b"0": 2, b"1": 1, b"2": 1, b"3": 1}
    assert await queue_depth(queue) == 0
