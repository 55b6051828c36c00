"""The AMQP server against a real RabbitMQ: edges of counting, confirms and settling."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from amgi.servers.amqp import AmqpOptions, AmqpSendError, AmqpTransport
from amgi.transport import DeadLetter, Settlement
from tests.servers.private_brokers import private_rabbitmq
from tests.servers.test_amqp_support import URL, fetch_n, new_queue, queue_depth, rabbitmq

__all__ = ["rabbitmq"]

pytestmark = pytest.mark.usefixtures("rabbitmq")


async def publish_raw(queue: str, body: bytes, headers: dict[str, object]) -> None:
    """Publish as another client would (headers written as given)."""
    import aiormq
    from pamqp.commands import Basic

    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        properties = Basic.Properties(headers=headers)
        await channel.basic_publish(body, routing_key=queue, properties=properties)
    finally:
        await connection.close()


async def test_a_publishers_delivery_count_header_uses_up_no_attempt_on_a_classic_queue() -> None:
    """A classic queue counts no delivery: an ``x-delivery-count`` there is a publisher's
    (a message forwarded from a quorum queue with its headers, a shovel). It was added to
    the attempt, so the message came at attempt 11 and, over --max-attempts, went to the
    dead letters before any application saw it; the redelivery after a reconnect too."""
    queue = new_queue()
    options = AmqpOptions(url=URL, linger=0.01)
    for again in (False, True):
        t = AmqpTransport([queue], options)
        await t.connect()  # (declares the queue)
        try:
            if not again:
                await publish_raw(queue, b"forwarded", {"x-delivery-count": 10, "k": "v"})
            [batch] = await fetch_n(t, 1)
            [m] = batch.messages
            assert m.attempt == 1
            assert m.bindings["amqp"]["redelivered"] is again
            if again:
                await t.settle(batch, Settlement(acked=[m]))
        finally:
            await t.close()  # the first time unacked: the broker delivers it again
    assert await queue_depth(queue) == 0


async def test_sends_of_one_message_id_at_once_each_get_their_own_return() -> None:
    """The client matches a ``basic.return`` to its publish by the ``message-id``: of two
    sends with one id in flight on a channel (an event id sent to two places at once),
    the return of the unroutable one failed the other, and the unroutable one was then
    confirmed: a send that went nowhere reported as sent."""
    queue = new_queue()
    t = AmqpTransport([queue], AmqpOptions(url=URL))
    await t.connect()
    try:
        bindings = {"amqp": {"messageId": "event-7"}}
        nowhere, routed = await asyncio.gather(
            t.publish(new_queue(), [], b"lost?", bindings),  # no such queue: returned
            t.publish(queue, [], b"kept", bindings),
            return_exceptions=True,
        )
        assert isinstance(nowhere, AmqpSendError)
        assert "unroutable" in str(nowhere)
        assert routed is None
    finally:
        await t.close()
    assert await queue_depth(queue) == 1


# A node of its own: starting it may take up to 120 s on a loaded machine and stopping
# it 30 s (private_rabbitmq's own bounds), more than the file's limit per test.
@pytest.mark.timeout(180)
async def test_a_delivery_that_waited_in_the_buffer_past_the_consumer_timeout_is_not_counted(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A slow application with deliveries prefetched: the broker's ``consumer_timeout``
    runs from the delivery, so a message that waited in the server's buffer behind slow
    calls timed out soon after the application took it. It came back at its next
    attempt, as if its own call had been too slow, and the log said so. Now only a
    message the application itself held that long is counted, and the log points at
    the prefetch. On a private node: the timeout is a setting of the whole broker."""
    caplog.set_level(logging.WARNING, "amgi.servers.amqp")
    queue = new_queue()
    with private_rabbitmq(tmp_path / "rabbitmq") as broker:
        await broker.consumer_timeout_of_a_second()
        options = AmqpOptions(url=broker.url, batch_size=1, linger=0, prefetch=10)
        transport = AmqpTransport([queue], options)
        await transport.connect()
        try:
            for body in (b"slow", b"waited"):
                await transport.publish(queue, [], body, {})
            async with asyncio.timeout(5):
                [first] = await fetch_n(transport, 1)
                await asyncio.sleep(0.8)  # a slow call; "waited" is in the buffer meanwhile
                await transport.settle(first, Settlement(acked=list(first.messages)))
                [second] = await fetch_n(transport, 1)
            assert [m.payload for m in second.messages] == [b"waited"]
            async with asyncio.timeout(15):
                while "consumer_timeout" not in caplog.text:
                    await asyncio.sleep(0.05)
            await asyncio.to_thread(
                broker.ctl, "eval", "application:set_env(rabbit, consumer_timeout, 1800000)."
            )
            async with asyncio.timeout(10):
                [back] = await fetch_n(transport, 1)
            assert [(m.payload, m.attempt) for m in back.messages] == [(b"waited", 1)]
            await transport.settle(back, Settlement(acked=list(back.messages)))
            await asyncio.sleep(0.2)
        finally:
            await transport.close()
        assert "--prefetch" in caplog.text
        assert await queue_depth(queue, url=broker.url) == 0


async def test_a_connection_the_broker_closes_is_reported_once_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client logged every lost connection of the server at ERROR ("Unexpected
    connection close from remote") and again at WARNING with a traceback, before the
    server's own warning that says what the broker said and that it reconnects."""
    from tests.servers.test_amqp_support import close_connections

    caplog.set_level(logging.DEBUG)
    queue = new_queue()
    name = f"amgi-test-{queue}"
    t = AmqpTransport([queue], AmqpOptions(url=f"{URL}?name={name}", reconnect_delay_max=0.5))
    await t.connect()
    try:
        assert await close_connections(name) == 1
        async with asyncio.timeout(15):
            while "reconnected" not in caplog.text:
                await asyncio.sleep(0.05)
    finally:
        await t.close()
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert [r.name for r in loud] == ["amgi.servers.amqp"]
    assert "lost the connection to the broker ([Errno 320] CONNECTION_FORCED" in loud[0].message


async def test_a_replay_the_broker_does_not_confirm_fails_with_one_clear_error() -> None:
    """The broker stops reading the connection as the replay publishes (as when it blocks
    publishers in a memory or disk alarm): the replay waited as long as the broker did,
    closing its channel, then failed with a TimeoutError without a message (the command
    printed an empty error). Now it fails once its confirms are overdue, saying why, and
    the dead letters it did not ack stay in their queue."""
    from tests.servers.test_amqp_reliability import _PausableProxy

    proxy = _PausableProxy()
    url = await proxy.start()
    queue = new_queue()
    options = AmqpOptions(url=url, linger=0.01, confirm_timeout=0.5)
    t = AmqpTransport([queue], options)
    await t.connect()
    try:
        await t.publish(queue, [], b"dead", {})
        [batch] = await fetch_n(t, 1)
        await t.settle(batch, Settlement(dead=[DeadLetter(batch.messages[0], "bad")]))
        publisher = t._channel

        async def broker_stops_reading(*args: Any) -> Any:
            channel = await publisher(*args)
            proxy.flowing.clear()
            return channel

        t._channel = broker_stops_reading  # type: ignore[method-assign]
        with pytest.raises(AmqpSendError, match="no publish confirm"):
            async with asyncio.timeout(15):
                await t.replay_dead_letters(queue, 10)
    finally:
        async with asyncio.timeout(15):
            await t.close()
        await proxy.close()
    assert await queue_depth(f"{queue}.dead-letter") == 1
