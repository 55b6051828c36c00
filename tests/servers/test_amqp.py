"""The AMQP server against a real RabbitMQ: transport calls, the runtime on top, failures."""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.amqp import (
    AmqpOptions,
    AmqpSendError,
    AmqpTransport,
    _check_user_id,
    headers_to_table,
    publish_properties,
    table_to_headers,
)
from amgi.transport import DeadLetter, Fate, Retry, Settlement
from tests.apps import attempts_app, serve_in_stops
from tests.net import TlsFront, free_port, port_open, self_signed
from tests.races import STEPS, cancel_after_completion
from tests.servers.private_brokers import private_rabbitmq
from tests.servers.test_amqp_support import (
    URL,
    delete_exchange,
    drain,
    fetch_n,
    new_queue,
    queue_depth,
    rabbitmq,
)

__all__ = ["rabbitmq"]

pytestmark = pytest.mark.usefixtures("rabbitmq")


@pytest.fixture
async def queue() -> str:
    return new_queue()


@pytest.fixture
async def transport(queue: str) -> AsyncIterator[AmqpTransport]:
    t = AmqpTransport([queue], AmqpOptions(url=URL, batch_size=10, linger=0.01))
    await t.connect()
    yield t
    await t.close()


# -- pure conversions ---------------------------------------------------------------------


def test_headers_round_trip_through_a_table() -> None:
    headers = [(b"a", b"1"), (b"b", b"\xff\x00"), (b"a", b"2"), (b"c", b"")]
    attempt, back = table_to_headers(headers_to_table(headers))
    assert attempt == 1
    assert sorted(back) == sorted(headers)


def test_attempt_and_broker_headers_are_split_off() -> None:
    table = {"amgi-attempt": "3", "x-death": [{"count": 1}], "x-delivery-count": 2, "k": 7}
    attempt, headers = table_to_headers(table)
    assert attempt == 5
    assert headers == [(b"k", b"7")]


def test_an_attempt_header_that_is_no_whole_number_counts_as_the_first() -> None:
    for value in (float("inf"), float("nan"), "many", b"\xff"):
        assert table_to_headers({"amgi-attempt": value})[0] == 1


def test_a_table_the_codec_cannot_read_still_makes_a_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A delivery whose headers table no AMGI server wrote and the codec cannot read (here
    a name that is neither text nor bytes) comes without its headers, with a warning:
    raising, it took the deliveries fetched with it down."""
    from types import SimpleNamespace

    from pamqp.commands import Basic

    from amgi.servers.amqp._codec import _message

    properties = Basic.Properties()
    properties.headers = {5: "x"}
    delivered: Any = SimpleNamespace(
        header=SimpleNamespace(properties=properties),
        body=b"body",
        delivery=SimpleNamespace(exchange="", routing_key="q", redelivered=False),
    )
    with caplog.at_level(logging.WARNING, "amgi.servers.amqp"):
        message = _message(delivered)
    assert (message.payload, message.headers, message.attempt) == (b"body", [], 1)
    assert any("could not be read" in r.getMessage() for r in caplog.records)


# -- the transport ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("binding", "error"),
    [
        ({"expiration": "abc"}, "expiration must be a TTL in whole ms, 0 to 315360000000"),
        ({"expiration": -5}, "expiration must be a TTL"),
        ({"expiration": 1.5}, "expiration must be a TTL"),
        ({"expiration": True}, "expiration must be a TTL"),
        ({"expiration": "315360000001"}, "expiration must be a TTL"),
        ({"priority": 300}, "priority must be an int from 0 to 255, not 300"),
        ({"priority": True}, "priority must be an int from 0 to 255, not True"),
        ({"deliveryMode": "2"}, "deliveryMode must be an int from 0 to 255"),
        ({"contentType": 5}, "contentType must be a str, not int"),
        ({"messageId": "é" * 128}, "messageId must be at most 255 bytes (UTF-8), not 256"),
        ({"timestamp": 1e20}, "timestamp 1e+20 is out of range"),
        ({"timestamp": "now"}, "timestamp must be seconds since the epoch, not 'now'"),
        ({"timestamp": -1}, "timestamp -1 is out of range (0 to 4294967295 seconds"),
        ({"timestamp": 2**32}, "timestamp 4294967296 is out of range"),
        ({"timestamp": datetime.datetime(1969, 12, 31)}, "timestamp -86400 is out of range"),
        ({"timestamp": datetime.datetime(2200, 1, 1)}, "timestamp 7258118400 is out of range"),
    ],
)
def test_bindings_the_broker_would_refuse_are_refused_before_sending(
    binding: dict[str, Any], error: str
) -> None:
    """Each of these made the broker close the channel, or the client fail mid-frame
    with a bare struct or type error (a timestamp before 1970), or arrive changed (one
    after 2106 was read back as milliseconds)."""
    with pytest.raises(ValueError, match=re.escape(error)):
        publish_properties([], binding)


def test_bindings_at_their_limits_are_sent() -> None:
    props = publish_properties(
        [],
        {"expiration": 315_360_000_000, "priority": 255, "messageId": "é" * 127, "timestamp": 0},
    )
    assert (props.expiration, props.priority) == ("315360000000", 255)
    latest = publish_properties([], {"timestamp": 2**32 - 1}).timestamp
    assert latest == datetime.datetime(2106, 2, 7, 6, 28, 15, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("url", "user_id", "refused"),
    [
        ("amqp://127.0.0.1/", "guest", False),  # no user in the URL: the client logs in as guest
        ("amqp://127.0.0.1/", "bob", True),
        ("amqp://b%40b:pw@127.0.0.1/", "b@b", False),
        ("amqp://bob:pw@127.0.0.1/", "alice", True),
        ("amqps://127.0.0.1/?auth=external", "anyone", False),  # the certificate's user
    ],
)
def test_user_id_must_be_the_login_of_the_connection(url: str, user_id: str, refused: bool) -> None:
    if refused:
        with pytest.raises(ValueError, match="is not the user this server logs in as"):
            _check_user_id(user_id, url)
    else:
        _check_user_id(user_id, url)


async def test_publish_fetch_ack_with_headers_and_bindings(
    transport: AmqpTransport, queue: str
) -> None:
    stamp = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)
    binding = {
        "contentType": "application/json",
        "contentEncoding": "utf-8",
        "correlationId": "corr-1",
        "replyTo": "answers",
        "expiration": 60000,
        "messageId": "m-1",
        "timestamp": int(stamp.timestamp()),
        "messageType": "order.created",
        "userId": "guest",
        "appId": "tests",
        "priority": 4,
        "deliveryMode": 2,
    }
    await transport.publish(queue, [(b"h1", b"v1"), (b"h2", b"v2")], b'{"n":1}', {"amqp": binding})
    [batch] = await fetch_n(transport, 1)
    [m] = batch.messages
    assert batch.address == queue
    assert batch.key == queue
    assert m.payload == b'{"n":1}'
    assert m.headers == [(b"h1", b"v1"), (b"h2", b"v2")]
    assert m.attempt == 1
    got = m.bindings["amqp"]
    assert got == {**binding, "exchange": "", "routingKey": queue, "redelivered": False}
    await transport.settle(batch, Settlement(acked=[m]))
    assert await queue_depth(queue) == 0


async def test_headers_named_cc_and_bcc_arrive_as_sent_and_route_nothing(
    transport: AmqpTransport, queue: str
) -> None:
    """RabbitMQ reads ``CC`` and ``BCC`` headers as more routing keys (sender-selected
    distribution): one value closed the channel of the sends (PRECONDITION_FAILED, an
    array was expected), several sent copies to the queues they named, and ``BCC`` was
    removed from the message."""
    other = new_queue()
    declaring = AmqpTransport([other], AmqpOptions(url=URL))
    await declaring.connect()
    await declaring.close()
    headers = [(b"CC", b"bob@example.com"), (b"BCC", other.encode()), (b"BCC", b"x")]
    await transport.publish(queue, headers, b"mail", {})
    await transport.publish(queue, [(b"CC", other.encode()), (b"CC", b"y")], b"two", {})
    batches = await fetch_n(transport, 2)
    got = [m for b in batches for m in b.messages]
    assert [m.headers for m in got] == [headers, [(b"CC", other.encode()), (b"CC", b"y")]]
    for batch in batches:
        first = [m for m in batch.messages if m is got[0]]
        rest = [m for m in batch.messages if m is not got[0]]
        retry = [Retry(m, "again", 0.01) for m in first]
        await transport.settle(batch, Settlement(retry=retry, acked=rest))
    [back] = await fetch_n(transport, 1)
    assert back.messages[0].headers == headers
    await transport.settle(back, Settlement(acked=list(back.messages)))
    assert await queue_depth(other) == 0


async def test_batches_respect_size_and_order(transport: AmqpTransport, queue: str) -> None:
    for i in range(25):
        await transport.publish(queue, [], b"%d" % i, {})
    batches = await fetch_n(transport, 25)
    assert all(len(b.messages) <= 10 for b in batches)
    payloads = [m.payload for b in batches for m in b.messages]
    assert payloads == [b"%d" % i for i in range(25)]
    for b in batches:
        await transport.settle(b, Settlement(acked=list(b.messages)))
    assert await queue_depth(queue) == 0


@pytest.mark.parametrize("steps", range(STEPS))
async def test_a_stop_that_meets_a_wake_in_the_linger_is_not_lost(queue: str, steps: int) -> None:
    """The fetch lingers for a fuller batch; a cancel landing as it is woken ends it, and
    the delivery on hand stays for the next fetch. (White-box: the test fires the
    transport's own waiter.)"""
    t = AmqpTransport([queue], AmqpOptions(url=URL, batch_size=10, linger=30))
    await t.connect()
    try:
        await t.publish(queue, [], b"one", {})
        async with asyncio.timeout(10):
            while not t._buffer:
                await asyncio.sleep(0.01)
        # fetch() now lingers: one delivery on hand, fewer than batch_size

        def wake() -> None:
            assert t._waiter is not None
            t._waiter.set_result(None)

        fetch = await cancel_after_completion(t.fetch(), wake, steps)
        if steps == 0:
            assert fetch.cancelled(), "a cancel in the waking iteration lands while it waits"
        # cancelled, it took nothing; woken before the cancel, it returned what it had
        batches = [] if fetch.cancelled() else list(fetch.result())
        more = 9 if fetch.cancelled() else 10  # a full batch on hand: no linger next
        for i in range(more):
            await t.publish(queue, [], b"%d" % i, {})
        batches += await fetch_n(t, 10)
        assert [m.payload for b in batches for m in b.messages] == [
            b"one",
            *(b"%d" % i for i in range(more)),
        ]
        for b in batches:
            await t.settle(b, Settlement(acked=list(b.messages)))
        assert await queue_depth(queue) == 0
    finally:
        await t.close()


async def test_an_ack_never_covers_an_earlier_unsettled_batch(queue: str) -> None:
    options = AmqpOptions(url=URL, batch_size=5, linger=0.05)
    first = AmqpTransport([queue], options)
    await first.connect()
    try:
        for i in range(10):
            await first.publish(queue, [], b"%d" % i, {})
        batches = await fetch_n(first, 10)
        early, late = batches[0], batches[-1]
        assert early is not late
        await first.settle(late, Settlement(acked=list(late.messages)))
    finally:
        await first.close()
    # Nothing was acked: the later batch waited for the earlier one, which never settled.
    assert await queue_depth(queue) == 10

    second = AmqpTransport([queue], options)
    await second.connect()
    try:
        batches = await fetch_n(second, 10)
        assert all(m.bindings["amqp"]["redelivered"] for b in batches for m in b.messages)
        for b in reversed(batches):  # settled out of order: acked once the gap closes
            await second.settle(b, Settlement(acked=list(b.messages)))
    finally:
        await second.close()
    assert await queue_depth(queue) == 0


async def test_retry_comes_back_after_the_delay_with_the_next_attempt(
    transport: AmqpTransport, queue: str
) -> None:
    await transport.publish(queue, [(b"k", b"v")], b"again", {})
    [batch] = await fetch_n(transport, 1)
    [m] = batch.messages
    loop = asyncio.get_running_loop()
    started = loop.time()
    await transport.settle(batch, Settlement(retry=[Retry(m, "try later", 0.3)]))
    [batch] = await fetch_n(transport, 1)
    elapsed = loop.time() - started
    [again] = batch.messages
    assert elapsed >= 0.25
    assert again.attempt == 2
    assert again.payload == b"again"
    assert again.headers == [(b"k", b"v")]
    await transport.settle(batch, Settlement(acked=[again]))
    assert await queue_depth(queue) == 0
    assert await queue_depth(f"{queue}.retry.300") == 0


async def test_dead_letter_lands_in_the_dead_letter_queue_with_the_reason(
    transport: AmqpTransport, queue: str
) -> None:
    await transport.publish(queue, [(b"k", b"v")], b"poison", {"amqp": {"correlationId": "c"}})
    [batch] = await fetch_n(transport, 1)
    [m] = batch.messages
    await transport.settle(batch, Settlement(dead=[DeadLetter(m, "bad input")]))
    [dead] = await drain(f"{queue}.dead-letter", 1, timeout=5)
    assert dead.body == b"poison"
    props = dead.header.properties
    assert props.correlation_id == "c"
    assert props.headers["amgi-dead-letter-reason"] == "bad input"
    assert props.headers["amgi-original-address"] == queue
    assert props.headers["k"] == "v"
    assert await queue_depth(queue) == 0


async def test_copies_settled_after_the_channel_closed_are_reported_not_made(
    queue: str,
) -> None:
    """A batch settled after its channel closed (a stop, a lost connection) moves nothing:
    the broker delivers its messages again. Its retry and dead letter say so, so that the
    runtime does not log them as retried and dead-lettered."""
    t = AmqpTransport([queue], AmqpOptions(url=URL, batch_size=10, linger=0.05))
    await t.connect()
    try:
        for payload in (b"retry-me", b"dead"):
            await t.publish(queue, [], payload, {})
        [batch] = await fetch_n(t, 2)
    finally:
        await t.close()
    first, second = batch.messages
    retry, dead = Retry(first, "later", 0.0), DeadLetter(second, "bad")
    await t.settle(batch, Settlement(retry=[retry], dead=[dead]))
    comes_back = "its channel closed: the broker delivers it again"
    assert (retry.error, retry.dead) == (comes_back, None)
    assert (dead.fate, dead.error) == (Fate.KEPT, comes_back)
    t = AmqpTransport([queue], AmqpOptions(url=URL, batch_size=10, linger=0.05))
    await t.connect()
    try:
        [again] = await fetch_n(t, 2)
        assert sorted(m.payload or b"" for m in again.messages) == [b"dead", b"retry-me"]
        await t.settle(again, Settlement(acked=list(again.messages)))
    finally:
        await t.close()
    assert await queue_depth(f"{queue}.dead-letter") == 0


async def test_unroutable_send_raises_the_send_error(transport: AmqpTransport) -> None:
    with pytest.raises(AmqpSendError, match="unroutable"):
        await transport.publish(new_queue(), [], b"x", {})


async def test_mandatory_must_be_a_bool(transport: AmqpTransport, queue: str) -> None:
    """``"mandatory": "false"`` was read as true (a non-empty string): the send the
    application meant to let go unrouted failed as unroutable."""
    binding = {"amqp": {"mandatory": "false", "routingKey": "nowhere"}}
    with pytest.raises(AmqpSendError, match="mandatory must be a bool, not str"):
        await transport.publish(queue, [], b"x", binding)
    await transport.publish(queue, [], b"x", {"amqp": {"mandatory": False, "routingKey": "no"}})


async def test_send_to_a_missing_exchange_raises_and_consuming_goes_on(
    transport: AmqpTransport, queue: str
) -> None:
    await transport.publish(queue, [], b"before", {})
    [before] = await fetch_n(transport, 1)
    with pytest.raises(AmqpSendError, match="NOT_FOUND"):
        await transport.publish(queue, [], b"x", {"amqp": {"exchange": "amgi-test-no-such-x"}})
    # The consuming channel is untouched: the earlier delivery can still be acked.
    await transport.settle(before, Settlement(acked=list(before.messages)))
    await transport.publish(queue, [], b"after", {})
    [after] = await fetch_n(transport, 1)
    assert [m.payload for m in after.messages] == [b"after"]
    await transport.settle(after, Settlement(acked=list(after.messages)))
    assert await queue_depth(queue) == 0


async def test_a_consumer_the_broker_cancels_consumes_again(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A queue deleted under the server: the broker cancels its consumer (basic.cancel)
    but keeps the channel open. The server went on with no consumer, silent for good;
    now it declares the queue again and consumes it, as after a channel loss."""
    import aiormq

    caplog.set_level(logging.WARNING, "amgi.servers.amqp")
    t = AmqpTransport([queue], AmqpOptions(url=URL, linger=0.01))
    await t.connect()
    try:
        connection = await aiormq.connect(URL)
        try:
            channel = await connection.channel()
            await channel.queue_delete(queue)
        finally:
            await connection.close()
        async with asyncio.timeout(5):
            while True:  # unroutable until the queue is back
                try:
                    await t.publish(queue, [], b"after", {})
                    break
                except AmqpSendError:
                    await asyncio.sleep(0.05)
            [batch] = await t.fetch()
        assert [m.payload for m in batch.messages] == [b"after"]
        await t.settle(batch, Settlement(acked=list(batch.messages)))
    finally:
        await t.close()
    assert any("cancelled the consumer" in r.getMessage() for r in caplog.records)
    assert await queue_depth(queue) == 0


async def test_headers_another_publisher_wrote_oddly_lose_no_message(queue: str) -> None:
    """``amgi-header-order`` holding a number (another publisher's array) made the fetch
    raise after it took the deliveries off its buffer: those never came to the app nor
    back from the broker while the channel lived, and no later message of the queue was
    acked (the acks stop below the first tag not settled). Now each comes, the odd entry
    left out of the order."""
    import aiormq
    from pamqp.commands import Basic

    odd = [{"amgi-header-order": [-1, "b", 1.5, "a"], "a": "1", "b": "2"}, None]
    t = AmqpTransport([queue], AmqpOptions(url=URL, linger=0.01))
    await t.connect()  # (declares the queue)
    try:
        connection = await aiormq.connect(URL)
        try:
            channel = await connection.channel()
            for i, table in enumerate(odd):
                properties = Basic.Properties(headers=table)
                await channel.basic_publish(b"%d" % i, routing_key=queue, properties=properties)
        finally:
            await connection.close()
        got = await fetch_n(t, 2)
        for batch in got:
            await t.settle(batch, Settlement(acked=list(batch.messages)))
    finally:
        await t.close()
    received = {m.payload: m.headers for b in got for m in b.messages}
    assert received == {b"0": [(b"b", b"2"), (b"a", b"1")], b"1": []}
    assert await queue_depth(queue) == 0


async def test_exchange_topology_and_send_routing(queue: str) -> None:
    exchange = queue + "-x"
    options = AmqpOptions(url=URL, exchange=exchange, exchange_type="topic", routing_keys=["o.*"])
    t = AmqpTransport([queue], options)
    await t.connect()
    try:
        await t.publish("o.created", [], b"routed", {})
        [batch] = await fetch_n(t, 1)
        [m] = batch.messages
        assert m.payload == b"routed"
        assert m.bindings["amqp"]["exchange"] == exchange
        assert m.bindings["amqp"]["routingKey"] == "o.created"
        await t.settle(batch, Settlement(acked=[m]))
        with pytest.raises(AmqpSendError, match="unroutable"):
            await t.publish("p.created", [], b"nowhere", {})
    finally:
        await t.close()
        await delete_exchange(exchange)


async def test_a_retried_and_replayed_message_keeps_the_exchange_and_key_it_came_by(
    queue: str,
) -> None:
    """A retry copy goes through ``<queue>.retry.<ms>`` and the default exchange, a
    replayed dead letter through the default exchange: the message came back with the
    exchange ``""`` and its queue's name as routing key, so an application telling
    messages of a topic exchange apart by their key took it for another."""
    exchange = queue + "-x"
    options = AmqpOptions(
        url=URL, exchange=exchange, exchange_type="topic", routing_keys=["o.#"], linger=0.01
    )
    t = AmqpTransport([queue], options)
    await t.connect()
    try:
        await t.publish("o.created.eu", [(b"k", b"v")], b"routed", {})
        await t.publish(queue, [], b"plain", {"amqp": {"exchange": ""}})  # default exchange
        seen: list[tuple[bytes | None, str, str, int]] = []
        for step in ("retry", "dead", "replayed"):
            batches = await fetch_n(t, 2)
            messages = [m for b in batches for m in b.messages]
            for m in sorted(messages, key=lambda m: m.payload or b""):
                amqp = m.bindings["amqp"]
                seen.append((m.payload, amqp["exchange"], amqp["routingKey"], m.attempt))
                assert m.headers == ([(b"k", b"v")] if m.payload == b"routed" else [])
            for b in batches:
                if step == "retry":
                    settled = Settlement(retry=[Retry(m, "later", 0.05) for m in b.messages])
                elif step == "dead":
                    settled = Settlement(dead=[DeadLetter(m, "bad") for m in b.messages])
                else:
                    settled = Settlement(acked=list(b.messages))
                await t.settle(b, settled)
            if step == "dead":
                assert await t.replay_dead_letters(queue, 10) == 2
    finally:
        await t.close()
        await delete_exchange(exchange)
    routed = (b"routed", exchange, "o.created.eu")
    plain = (b"plain", "", queue)
    # (a replay starts the attempts afresh)
    assert seen == [(*plain, 1), (*routed, 1), (*plain, 2), (*routed, 2), (*plain, 1), (*routed, 1)]


async def test_quorum_queue_counts_redeliveries_as_attempts(queue: str) -> None:
    options = AmqpOptions(url=URL, queue_type="quorum", batch_size=1)
    t = AmqpTransport([queue], options)
    await t.connect()
    try:
        await t.publish(queue, [], b"q", {})
        [batch] = await fetch_n(t, 1)
        assert batch.messages[0].attempt == 1
    finally:
        await t.close()  # unsettled: the broker redelivers and counts it
    t = AmqpTransport([queue], options)
    await t.connect()
    try:
        [batch] = await fetch_n(t, 1)
        assert batch.messages[0].attempt == 2
        await t.settle(batch, Settlement(acked=list(batch.messages)))
    finally:
        await t.close()


# -- bad input ----------------------------------------------------------------------------


async def test_wrong_credentials_give_one_clear_error() -> None:
    t = AmqpTransport([new_queue()], AmqpOptions(url="amqp://guest:wrong@127.0.0.1:5672/"))
    with pytest.raises(BrokerUnavailable, match="refused the credentials") as info:
        await t.connect()
    assert "wrong" not in str(info.value)
    assert "\n" not in str(info.value)


async def test_a_virtual_host_that_does_not_exist_gives_one_clear_error() -> None:
    """The broker refuses ``connection.open``: the client's error showed the object repr
    of the broker's answer (``got <Connection.Close object at 0x...>``), not what it was;
    now the broker's reply is said."""
    url = "amqp://guest:guest@127.0.0.1:5672/amgi-no-such-vhost"
    t = AmqpTransport([new_queue()], AmqpOptions(url=url))
    with pytest.raises(BrokerUnavailable) as info:
        await t.connect()
    assert str(info.value) == (
        "amqp: access to the virtual host of amqp://guest:*****@127.0.0.1:5672/"
        "amgi-no-such-vhost was refused: NOT_ALLOWED - vhost amgi-no-such-vhost not found"
    )


@pytest.mark.parametrize(
    ("address", "binding", "error"),
    [
        ("r" * 256, {}, "the routing key must be a str of at most 255 bytes .* not 256 bytes"),
        ("q", {"routingKey": "é" * 128}, "the routing key must be a str .* not 256 bytes"),
        ("q", {"exchange": "x" * 300}, "the exchange must be a str .* not 300 bytes"),
        ("q", {"exchange": 5}, "the exchange must be a str .* not 5"),
        ("q", {"routingKey": None}, "the routing key must be a str .* not None"),
    ],
)
async def test_a_routing_key_or_exchange_amqp_cannot_carry_fails_that_send_alone(
    address: str, binding: dict[str, Any], error: str
) -> None:
    """The client raised a bare ValueError (``Routing key too long``) or TypeError."""
    queue = new_queue()
    t = AmqpTransport([queue], AmqpOptions(url=URL, batch_size=10, linger=0.01))
    await t.connect()
    try:
        with pytest.raises(AmqpSendError, match=f"cannot send to {address!r}: {error}"):
            await t.publish(address, [], b"bad", {"amqp": binding})
        await t.publish(queue, [], b"good", {})
        (batch,) = await fetch_n(t, 1)
        assert [m.payload for m in batch.messages] == [b"good"]
        await t.settle(batch, Settlement(acked=list(batch.messages)))
    finally:
        await t.close()


async def test_unreachable_broker_gives_one_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    t = AmqpTransport([new_queue()], AmqpOptions(url="amqp://guest:guest@127.0.0.1:1/"))
    with (
        caplog.at_level(logging.DEBUG, "aiormq"),
        pytest.raises(BrokerUnavailable, match=r"cannot connect to amqp://guest:\*\*\*\*\*@"),
    ):
        await t.connect()
    # aiormq logged the same failure at ERROR first: two reports of one failure.
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_missing_queue_in_passive_mode_gives_one_clear_error() -> None:
    name = new_queue()
    t = AmqpTransport([name], AmqpOptions(url=URL, passive=True))
    with pytest.raises(ConfigurationError, match=f"queue '{name}' does not exist"):
        await t.connect()


@pytest.mark.parametrize(
    ("field", "value"),
    [("queue_type", "stream"), ("batch_size", 0), ("prefetch", 70000)],
)
async def test_bad_options_are_configuration_errors(field: str, value: Any) -> None:
    options = AmqpOptions(url=URL)
    setattr(options, field, value)
    with pytest.raises(ConfigurationError, match=field.split("_")[0]):
        await AmqpTransport([new_queue()], options).connect()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("exchange", "x" * 256),
        ("dead_letter_exchange", "é" * 128),
        ("routing_keys", ["ok", "k" * 256]),
    ],
)
async def test_names_amqp_cannot_carry_are_configuration_errors(field: str, value: Any) -> None:
    """Exchange names and routing keys are at most 255 bytes: longer ones failed at start
    with the client's bare ``ValueError``."""
    options = AmqpOptions(url=URL, exchange="amgi-test-long-names")
    setattr(options, field, value)
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ConfigurationError, match=f"{flag} must be at most 255 bytes"):
        await AmqpTransport([new_queue()], options).connect()


def test_routing_keys_without_an_exchange_are_a_configuration_error() -> None:
    """Queues cannot be bound to the default exchange: the keys were ignored, silently,
    and the messages published with them never arrived."""
    t = AmqpTransport([new_queue()], AmqpOptions(url=URL, routing_keys=["orders.*"]))
    with pytest.raises(ConfigurationError, match="--routing-keys needs --exchange"):
        t.check()


async def test_an_exchange_type_the_broker_does_not_know_is_a_configuration_error() -> None:
    """The broker answers an unknown exchange type by closing the connection
    (COMMAND_INVALID): that reached the caller as the client's own exception."""
    exchange = f"amgi-test-x-{new_queue()[-12:]}"
    options = AmqpOptions(url=URL, exchange=exchange, exchange_type="no-such-type")
    with pytest.raises(ConfigurationError) as caught:
        await AmqpTransport([new_queue()], options).connect()
    assert re.fullmatch(
        f"amqp: cannot declare exchange {exchange!r}: "
        "COMMAND_INVALID - (invalid|unknown) exchange type 'no-such-type'",
        str(caught.value),
    )


@pytest.mark.parametrize("length", [244, 255])
async def test_a_queue_name_with_no_room_for_its_dead_letter_queue_is_refused(length: int) -> None:
    """``<queue>.dead-letter`` must be a queue name too (at most 255 bytes): a longer
    queue name failed at start with the client's bare ``ValueError``."""
    name = new_queue()
    name += "q" * (length - len(name))
    with pytest.raises(ConfigurationError, match="at most 243 bytes"):
        await AmqpTransport([name], AmqpOptions(url=URL)).connect()


async def test_dead_letters_of_a_name_that_is_no_queue_of_this_server_are_one_clear_error() -> None:
    """``amgi dead-letters list NAME``: a name too long to have a dead-letter queue ended
    in the client's bare ``ValueError`` ("unexpected ValueError")."""
    import aiormq

    name = new_queue()
    name += "q" * (250 - len(name))
    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        await channel.queue_declare(name)  # another client's queue
    finally:
        await connection.close()
    t = AmqpTransport([], AmqpOptions(url=URL))
    await t.connect()
    try:
        for method in (t.list_dead_letters, t.replay_dead_letters):
            with pytest.raises(ConfigurationError, match="not a queue name of 1 to 243 bytes"):
                await method(name, 10)
    finally:
        await t.close()


async def test_a_queue_name_of_243_bytes_is_consumed() -> None:
    name = new_queue()
    name += "q" * (243 - len(name))
    t = AmqpTransport([name], AmqpOptions(url=URL, linger=0.01))
    await t.connect()
    try:
        await t.publish(name, [], b"long", {})
        async with asyncio.timeout(5):
            [batch] = await t.fetch()
        assert [m.payload for m in batch.messages] == [b"long"]
    finally:
        await t.close()


# -- the runtime on top -------------------------------------------------------------------


class Recorder:
    """A raw AMGI app that acks everything (or nacks what ``poison`` says) and records it."""

    def __init__(
        self, poison: bytes | None = None, pause: float = 0.0, hold_after: int | None = None
    ) -> None:
        self.seen: list[bytes] = []
        self.attempts: list[int] = []
        self.poison = poison
        self.pause = pause
        self.hold_after = hold_after
        """Once this many messages were seen, settle nothing until ``release`` is set."""
        self.release = asyncio.Event()
        self.changed = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        while True:
            event = await receive()
            payload = event.get("payload") or b""
            self.seen.append(payload)
            self.attempts.append(event["bindings"]["amgi"]["attempt"])
            if self.hold_after is not None and len(self.seen) >= self.hold_after:
                self.changed.set()
                await self.release.wait()
            if payload == self.poison:
                await send({"type": "message.nack", "id": event["id"], "message": "poisoned"})
            else:
                await send({"type": "message.ack", "id": event["id"]})
            if not event.get("more_messages"):
                break
        self.changed.set()
        if self.pause:
            await asyncio.sleep(self.pause)

    async def wait(self, predicate: Any, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


async def run_in_background(runtime: Runtime) -> asyncio.Task[int]:
    task = asyncio.create_task(runtime.serve())
    async with asyncio.timeout(15):
        await runtime.started.wait()
    return task


async def test_poison_message_is_dead_lettered_after_max_attempts(queue: str) -> None:
    app = Recorder(poison=b"poison")
    transport = AmqpTransport([queue], AmqpOptions(url=URL))
    config = RuntimeConfig(max_attempts=3, retry_delay=0.05, retry_delay_max=0.2)
    runtime = Runtime(app, transport, config)
    task = await run_in_background(runtime)
    try:
        await transport.publish(queue, [], b"poison", {})
        await transport.publish(queue, [], b"fine", {})
        [dead] = await drain(f"{queue}.dead-letter", 1, timeout=10)
    finally:
        runtime.request_stop()
        assert await task == 0
    assert dead.body == b"poison"
    headers = dead.header.properties.headers
    assert headers["amgi-dead-letter-reason"] == "poisoned"
    assert headers["amgi-attempt"] == "3"
    poisoned = [a for p, a in zip(app.seen, app.attempts, strict=True) if p == b"poison"]
    assert poisoned == [1, 2, 3]
    assert app.seen.count(b"fine") == 1
    assert await queue_depth(queue) == 0


async def publish_to_quorum_queue(queue: str, options: AmqpOptions, *payloads: bytes) -> None:
    """Declare ``queue`` (a consumer that takes nothing), then send ``payloads`` from a
    send-only transport: a consuming one would hold them and hand them back, counted."""
    declaring = AmqpTransport([queue], options)
    await declaring.connect()
    await declaring.close()
    sender = AmqpTransport([], AmqpOptions(url=options.url))
    await sender.connect()
    try:
        await asyncio.gather(*(sender.publish(queue, [], p, {}) for p in payloads))
    finally:
        await sender.close()


async def test_a_stop_uses_up_no_attempt_of_the_messages_prefetched_from_a_quorum_queue(
    queue: str,
) -> None:
    """Closing with deliveries unacked hands them back counted (``x-delivery-count``):
    at the stop the transport cancels its consumer and the runtime processes what the
    broker had delivered, so every message reaches the app on its first attempt."""
    options = AmqpOptions(url=URL, queue_type="quorum", batch_size=5, prefetch=20)
    await publish_to_quorum_queue(queue, options, *(b"%d" % i for i in range(30)))
    config = RuntimeConfig(lifespan="off", concurrency=1, shutdown_timeout=10)
    # Each run stops while more is delivered than taken.
    seen, runs = await serve_in_stops(lambda: AmqpTransport([queue], options), 30, config)
    assert {attempt for _, attempt in seen} == {1}
    assert sorted(p for p, _ in seen) == sorted(b"%d" % i for i in range(30))
    assert runs == 2, "the first stop took all or only its first batch"
    assert await queue_depth(queue) == 0


async def test_a_stop_uses_up_no_attempt_of_a_quorum_queue_consumed_passively(queue: str) -> None:
    """``--passive`` declares nothing, so ``--queue-type`` is left at its default: the
    server did not know the queue counts deliveries and handed its prefetched messages
    back at each stop, counted (enough stops dead-letter them, never seen)."""
    quorum = AmqpOptions(url=URL, queue_type="quorum")
    await publish_to_quorum_queue(queue, quorum, *(b"%d" % i for i in range(30)))
    options = AmqpOptions(url=URL, passive=True, batch_size=5, prefetch=20)
    config = RuntimeConfig(lifespan="off", concurrency=1, shutdown_timeout=10)
    seen, _ = await serve_in_stops(lambda: AmqpTransport([queue], options), 30, config)
    assert {attempt for _, attempt in seen} == {1}
    assert sorted(p for p, _ in seen) == sorted(b"%d" % i for i in range(30))
    assert await queue_depth(queue) == 0


async def test_a_stop_whose_deadline_ends_the_hand_over_returns_the_rest_and_loses_none(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The shutdown timeout runs out while the handed-over messages are processed: the
    stop still ends in time, the messages not started go back to the quorum queue
    (counted, as after a crash) and the next consumer gets every one of them."""
    options = AmqpOptions(url=URL, queue_type="quorum", batch_size=5, prefetch=20)
    await publish_to_quorum_queue(queue, options, *(b"%d" % i for i in range(30)))
    seen: list[tuple[bytes, int]] = []
    first_call = asyncio.Event()

    app = attempts_app(seen, called=first_call, linger=0.3)

    slow = RuntimeConfig(lifespan="off", concurrency=1, shutdown_timeout=0.5)
    runtime = Runtime(app, AmqpTransport([queue], options), slow)
    serving = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(first_call.wait(), 10)
    stopping = asyncio.get_running_loop().time()
    runtime.request_stop()
    assert await asyncio.wait_for(serving, 20) == 0
    assert asyncio.get_running_loop().time() - stopping < 10
    assert "the shutdown timeout ended before every delivered message" in caplog.text
    first = len(seen)
    assert 5 <= first < 30
    rest = Runtime(app, AmqpTransport([queue], options), RuntimeConfig(lifespan="off"))
    serving = asyncio.create_task(rest.serve())
    async with asyncio.timeout(20):
        while len({p for p, _ in seen}) < 30:
            await asyncio.sleep(0.05)
    rest.request_stop()
    assert await asyncio.wait_for(serving, 20) == 0
    assert {p for p, _ in seen} == {b"%d" % i for i in range(30)}
    assert {a for _, a in seen[:first]} == {1}
    assert await queue_depth(queue) == 0


async def crash_holding(queue: str, options: AmqpOptions, times: int) -> None:
    """Consumers that take the message and die holding it: the channel closes unacked."""
    for crash in range(times):
        t = AmqpTransport([queue], options)
        await t.connect()
        try:
            [batch] = await fetch_n(t, 1)
            assert batch.messages[0].attempt == crash + 1
        finally:
            await t.close()


async def requeue_once(queue: str) -> None:
    """Another consumer takes the message and hands it back (basic.nack, requeue)."""
    import aiormq

    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=1)
        got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def on_message(message: Any) -> None:
            if not got.done():
                got.set_result(message)

        ok = await channel.basic_consume(queue, on_message)
        message = await asyncio.wait_for(got, 10)
        await channel.basic_cancel(ok.consumer_tag)  # so that it does not come back here
        await channel.basic_nack(message.delivery.delivery_tag, requeue=True)
    finally:
        await connection.close()


async def serve_until_dead_lettered(
    app: Recorder, transport: AmqpTransport, config: RuntimeConfig
) -> Any:
    """Run the runtime until the transport's queue has one dead letter; that message."""
    runtime = Runtime(app, transport, config)
    task = await run_in_background(runtime)
    try:
        [dead] = await drain(f"{transport.addresses[0]}.dead-letter", 1, timeout=15)
    finally:
        runtime.request_stop()
        assert await task == 0
    return dead


@pytest.mark.parametrize(("crashes", "requeues"), [(0, 0), (1, 1), (2, 0)])
async def test_quorum_queue_redeliveries_count_as_attempts_up_to_the_dead_letter(
    queue: str, crashes: int, requeues: int
) -> None:
    """On a quorum queue the broker counts deliveries (x-delivery-count): a consumer that
    died holding the message, or one that handed it back, used up an attempt; with the
    app nacking, the message is dead-lettered at attempt --max-attempts, counted with the
    runtime's own retries."""
    options = AmqpOptions(url=URL, queue_type="quorum", batch_size=1)
    assert AmqpTransport([queue], options).counts_deliveries
    assert not AmqpTransport([queue], AmqpOptions(url=URL)).counts_deliveries
    await publish_to_quorum_queue(queue, options, b"poison")
    await crash_holding(queue, options, crashes)
    for _ in range(requeues):
        await requeue_once(queue)
    app = Recorder(poison=b"poison")
    config = RuntimeConfig(max_attempts=4, retry_delay=0.05, retry_delay_max=0.2, crash_ledger="")
    dead = await serve_until_dead_lettered(app, AmqpTransport([queue], options), config)
    first = 1 + crashes + requeues
    assert app.attempts == list(range(first, 5))
    assert dead.header.properties.headers["amgi-attempt"] == "4"
    assert await queue_depth(queue) == 0


async def test_quorum_queue_message_delivered_too_often_is_dead_lettered_unseen(
    queue: str,
) -> None:
    """Consumers died holding it --max-attempts times: the next delivery goes to the dead
    letters before the app sees it."""
    options = AmqpOptions(url=URL, queue_type="quorum", batch_size=1)
    await publish_to_quorum_queue(queue, options, b"killer")
    await crash_holding(queue, options, 3)
    app = Recorder()
    config = RuntimeConfig(max_attempts=3, crash_ledger="")
    dead = await serve_until_dead_lettered(app, AmqpTransport([queue], options), config)
    assert app.seen == []
    headers = dead.header.properties.headers
    assert headers["amgi-attempt"] == "4"
    assert "delivered 4 times" in headers["amgi-dead-letter-reason"]


async def test_broker_restart_mid_stream_loses_nothing(tmp_path: Path) -> None:
    """The broker's app stops mid-stream and starts again: the transport reconnects and
    every message is processed. On a private node: stopping the shared one would break
    every other test using it meanwhile."""
    total = 200
    queue = new_queue()
    # Holds after 40 messages until the broker was restarted: the stream cannot end before
    # the stop lands (rabbitmqctl takes seconds on a loaded machine).
    app = Recorder(pause=0.05, hold_after=40)
    with private_rabbitmq(tmp_path / "rabbitmq") as broker:
        sender = AmqpTransport([queue], AmqpOptions(url=broker.url))  # declares the queue
        await sender.connect()
        try:
            for i in range(total):
                await sender.publish(queue, [], b"%d" % i, {})
        finally:
            await sender.close()
        transport = AmqpTransport(
            [queue],
            AmqpOptions(url=broker.url, batch_size=10, prefetch=20, reconnect_delay_max=0.5),
        )
        runtime = Runtime(app, transport, RuntimeConfig(retry_delay=0.05))
        task = await run_in_background(runtime)
        try:
            await app.wait(lambda: len(app.seen) >= 40, timeout=20)
            assert len(set(app.seen)) < total, "the stream ended before the restart"
            try:
                await asyncio.to_thread(broker.ctl, "stop_app")
                assert port_open(5672), "the shared broker stopped too"
            finally:
                await asyncio.to_thread(broker.ctl, "start_app")
                app.release.set()
            expected = {b"%d" % i for i in range(total)}
            await app.wait(lambda: expected <= set(app.seen), timeout=60)
            assert transport._generation >= 2, "the transport never reconnected"
        finally:
            runtime.request_stop()
            assert await task == 0
        assert await queue_depth(queue, url=broker.url) == 0


_publisher: dict[str, AmqpTransport] = {}


async def transport_publish_once(queue: str, payload: bytes) -> None:
    """Publish with a throwaway send-only transport (as ``amgi send`` does)."""
    t = _publisher.get(queue)
    if t is None:
        t = _publisher[queue] = AmqpTransport([], AmqpOptions(url=URL))
        await t.connect()
        # the queue must exist before the first send is routable
        import aiormq

        connection = await aiormq.connect(URL)
        channel = await connection.channel()
        await channel.queue_declare(queue, durable=True)
        await connection.close()
    await t.publish(queue, [], payload, {})


@pytest.fixture(autouse=True)
async def _close_publishers() -> AsyncIterator[None]:
    yield
    while _publisher:
        _, t = _publisher.popitem()
        await t.close()


# -- TLS ----------------------------------------------------------------------------------


async def test_amqps_with_client_certificate_and_untrusted_broker(tmp_path: Path) -> None:
    """amqps:// through a TLS front on the test broker that demands a client certificate:
    the URL's cafile/certfile/keyfile reach the client; a broker certificate the CA file
    does not trust is one clear error."""
    server_cert, server_key = self_signed(tmp_path, "server")
    client_cert, client_key = self_signed(tmp_path, "client")
    port = free_port()
    files = f"certfile={client_cert}&keyfile={client_key}"
    with TlsFront(port, 5672, server_cert, server_key, client_ca=client_cert):
        url = f"amqps://guest:guest@127.0.0.1:{port}/?cafile={server_cert}&{files}"
        t = AmqpTransport([new_queue()], AmqpOptions(url=url, batch_size=10, linger=0.01))
        await t.connect()
        try:
            await t.publish(t.addresses[0], [(b"trace", b"t-1")], b"over tls", {})
            (batch,) = await fetch_n(t, 1)
            assert batch.messages[0].payload == b"over tls"
            assert batch.messages[0].headers == [(b"trace", b"t-1")]
            await t.settle(batch, Settlement(acked=list(batch.messages)))
        finally:
            await t.close()
        untrusted = f"amqps://guest:guest@127.0.0.1:{port}/?cafile={client_cert}&{files}"
        t = AmqpTransport([new_queue()], AmqpOptions(url=untrusted))
        with pytest.raises(BrokerUnavailable, match="certificate verify failed") as info:
            await t.connect()
        assert "guest:guest" not in str(info.value)
