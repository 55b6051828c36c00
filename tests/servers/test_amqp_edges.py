"""The AMQP server against a real RabbitMQ: edges of counting, confirms and settling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import pytest

from amgi.errors import BrokerUnavailable
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


class _SilentFront:
    """A TCP front on a port of its own that relays to the broker, or, while ``silent``,
    accepts connections and never answers (a broker hung, a firewall eating replies)."""

    def __init__(self) -> None:
        self.silent = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"amqp://guest:guest@127.0.0.1:{port}/"

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.silent:
            return  # held open, never answered
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5672)
        self._writers.append(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        self._pipes.add(asyncio.ensure_future(pipe(reader, up_writer)))
        self._pipes.add(asyncio.ensure_future(pipe(up_reader, writer)))

    def cut(self) -> None:
        """Drop every connection made so far (both sides)."""
        for writer in self._writers:
            writer.close()
        self._writers = []

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


async def test_a_broker_that_never_answers_the_connect_is_one_clear_error_in_time() -> None:
    """A socket that accepts the connection and says nothing (a hung broker): the
    connect waited for ever, with no error; every other server gives up after its
    ``--connect-timeout`` saying so."""
    front = _SilentFront()
    front.silent = True
    url = await front.start()
    t = AmqpTransport([new_queue()], AmqpOptions(url=url, connect_timeout=0.5))
    try:
        with pytest.raises(BrokerUnavailable, match=r"no answer from .* within 0\.5 ?s"):
            async with asyncio.timeout(10):
                await t.connect()
    finally:
        await t.close()
        await front.close()


async def test_a_broker_that_stops_answering_the_declarations_is_one_clear_error_in_time() -> None:
    """The connection is made, then the broker reads nothing more (as when it hangs):
    the declarations waited for ever. Each answer is bounded by ``--connect-timeout``."""
    from tests.servers.test_amqp_reliability import _PausableProxy

    proxy = _PausableProxy()
    url = await proxy.start()
    t = AmqpTransport([new_queue()], AmqpOptions(url=url))
    connect = t._connect

    async def then_silence() -> Any:
        connection = await connect()
        t.config.connect_timeout = 0.5  # (the connect itself had the default: load)
        proxy.flowing.clear()
        return connection

    t._connect = then_silence  # type: ignore[method-assign]
    try:
        with pytest.raises(BrokerUnavailable, match=r"no answer from .* within 0\.5 s"):
            async with asyncio.timeout(15):
                await t.connect()
    finally:
        async with asyncio.timeout(15):
            await t.close()
        await proxy.close()


async def test_a_reconnect_to_a_broker_that_never_answers_is_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The connection is lost, and the next one is accepted but never answered: the
    reconnect waited for ever, consuming nothing even once the broker answered again.
    Now each try ends after ``--connect-timeout`` and the next one gets through."""
    caplog.set_level(logging.WARNING, "amgi.servers.amqp")
    front = _SilentFront()
    url = await front.start()
    queue = new_queue()
    options = AmqpOptions(url=url, linger=0.01, reconnect_delay_max=0.2)
    t = AmqpTransport([queue], options)
    await t.connect()
    try:
        t.config.connect_timeout = 0.5
        front.silent = True
        front.cut()
        async with asyncio.timeout(15):
            while "reconnect failed" not in caplog.text:
                await asyncio.sleep(0.05)
        assert "within 0.5" in caplog.text
        t.config.connect_timeout = 10  # (a loaded broker may take longer than 0.5 s)
        front.silent = False
        async with asyncio.timeout(15):
            await t.publish(queue, [], b"after", {})
            [batch] = await fetch_n(t, 1)
        await t.settle(batch, Settlement(acked=list(batch.messages)))
    finally:
        await t.close()
        await front.close()
    assert await queue_depth(queue) == 0


async def _declare_quorum(*queues: str) -> None:
    declaring = AmqpTransport(list(queues), AmqpOptions(url=URL, queue_type="quorum"))
    await declaring.connect()
    await declaring.close()


async def test_a_deleted_quorum_queue_costs_another_queues_acked_message_no_attempt() -> None:
    """One of two quorum queues is deleted: the server rebuilds its connection, and the
    message the application held from the other queue goes back, counted by the broker.
    The application acked it (too late: its channel had closed), yet it came back at its
    next attempt, as if it had failed; enough of these dead-letter it unseen."""
    from tests.servers.test_amqp_reliability import delete_queue

    kept, deleted = new_queue(), new_queue()
    await _declare_quorum(kept, deleted)
    options = AmqpOptions(url=URL, queue_type="quorum", linger=0.01, reconnect_delay_max=0.2)
    t = AmqpTransport([kept, deleted], options)
    await t.connect()
    try:
        await t.publish(kept, [], b"held", {})
        [batch] = await fetch_n(t, 1)
        generation = t._generation
        await delete_queue(deleted)
        async with asyncio.timeout(15):
            while t._generation == generation:
                await asyncio.sleep(0.05)
        await t.settle(batch, Settlement(acked=list(batch.messages)))  # its channel is gone
        [back] = await fetch_n(t, 1)
        assert [(m.payload, m.attempt) for m in back.messages] == [(b"held", 1)]
        await t.settle(back, Settlement(acked=list(back.messages)))
        await asyncio.sleep(0.2)
    finally:
        await t.close()
    assert await queue_depth(kept) == 0


async def test_a_connection_lost_during_a_stop_consumes_nothing_more_from_a_quorum_queue(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At a stop the server cancels its consumers and hands over what it has; the
    connection is then lost and rebuilt before the close. The server consumed again, and
    the messages it was sent went back at the close, counted by the broker: each came
    back at its next attempt without the application having seen it."""
    from tests.servers.test_amqp_support import close_connections

    caplog.set_level(logging.INFO, "amgi.servers.amqp")
    queue = new_queue()
    await _declare_quorum(queue)
    name = f"amgi-test-{queue}"
    url = f"{URL}?name={name}"
    options = AmqpOptions(url=url, queue_type="quorum", prefetch=1, reconnect_delay_max=0.2)
    sender = AmqpTransport([], AmqpOptions(url=URL))
    await sender.connect()
    for body in (b"held", b"waiting"):
        await sender.publish(queue, [], body, {})
    await sender.close()
    t = AmqpTransport([queue], options)
    await t.connect()
    try:
        [batch] = await fetch_n(t, 1)
        assert await t.hand_over() == []  # (prefetch 1: "waiting" is still in the queue)
        assert await close_connections(name) == 1
        async with asyncio.timeout(15):
            while "reconnected" not in caplog.text:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # time for deliveries to come
        await t.settle(batch, Settlement(acked=list(batch.messages)))
    finally:
        await t.close()
    t = AmqpTransport([queue], AmqpOptions(url=URL, queue_type="quorum", linger=0.05))
    await t.connect()
    try:
        back = await fetch_n(t, 2)
        got = {m.payload: m.attempt for b in back for m in b.messages}
        # "held" went back once while the app had it (the loss; the new process cannot
        # know its ack came too late), never again unseen.
        assert got == {b"held": 2, b"waiting": 1}
        for b in back:
            await t.settle(b, Settlement(acked=list(b.messages)))
        await asyncio.sleep(0.2)
    finally:
        await t.close()


async def test_a_stop_as_a_reconnect_consumes_leaves_no_consumer_behind() -> None:
    """The connection is lost; the reconnect consumes again, one queue after another
    (each ``basic.consume`` answered slowly), and a stop hands over meanwhile. The stop
    cancelled the consumers there were, the one in flight without its tag, and the loop
    consumed the queues after it: their deliveries came to a server that had handed
    over, held unacked (on a quorum queue, counted) until its close."""
    from tests.servers.test_amqp_reliability import _PausableProxy, declare

    queues = [new_queue() for _ in range(3)]
    for queue in queues:
        await declare(queue, {})
    proxy = _PausableProxy()
    url = await proxy.start()
    # passive: the queues may be quorum queues, so a stop hands over (as on quorum ones)
    t = AmqpTransport(queues, AmqpOptions(url=url, passive=True, reconnect_delay_max=0.2))
    await t.connect()
    sender = AmqpTransport([], AmqpOptions(url=URL))
    await sender.connect()
    try:
        first = t._generation
        proxy.lag = 0.1
        await proxy.drop()
        async with asyncio.timeout(30):
            while not (t._generation > first and t._consumers):
                await asyncio.sleep(0.005)
        assert len(t._consumers) < len(queues)  # the first basic.consume is in flight
        async with asyncio.timeout(15):
            assert await t.hand_over() == []
        proxy.lag = 0.0
        async with asyncio.timeout(15):
            while not t._ready.is_set():  # the reconnect is done
                await asyncio.sleep(0.05)
        for queue in queues:
            await sender.publish(queue, [], b"after the stop", {})
        await asyncio.sleep(0.5)  # time for deliveries to come
        assert not t._buffer
        assert [await queue_depth(q) for q in queues] == [1, 1, 1]  # still ready
    finally:
        await sender.close()
        await t.close()
        await proxy.close()


async def test_a_virtual_host_at_its_connection_limit_says_so() -> None:
    """The broker refuses ``connection.open`` over the virtual host's connection limit
    (``max-connections``): the error said the virtual host did not exist or the user
    may not use it, the broker's reason lost. Now it is the broker's reason."""
    from tests.servers.test_amqp_support import rabbitmqctl

    vhost = new_queue()  # a name of this session's own
    await rabbitmqctl("add_vhost", vhost)
    try:
        await rabbitmqctl("set_vhost_limits", "-p", vhost, '{"max-connections": 0}')
        t = AmqpTransport([new_queue()], AmqpOptions(url=f"{URL}{vhost}"))
        with pytest.raises(BrokerUnavailable) as info:
            await t.connect()
        assert "connection limit (0) is reached" in str(info.value)
        assert "does not exist" not in str(info.value)
    finally:
        await rabbitmqctl("delete_vhost", vhost)


@pytest.mark.parametrize("verb", ["list", "replay"])
async def test_dead_letters_of_a_broker_that_stops_answering_fail_in_time(verb: str) -> None:
    """``amgi dead-letters`` connected, then the broker read nothing more (as when it
    hangs): the look for the queues, or the ``basic.get``, waited for ever. Each answer
    is bounded by ``--connect-timeout``."""
    from tests.servers.test_amqp_reliability import _PausableProxy

    proxy = _PausableProxy()
    url = await proxy.start()
    queue = new_queue()
    t = AmqpTransport([queue], AmqpOptions(url=url))
    await t.connect()
    try:
        t.config.connect_timeout = 0.5
        proxy.flowing.clear()
        call = t.list_dead_letters if verb == "list" else t.replay_dead_letters
        with pytest.raises(BrokerUnavailable, match=r"no answer from .* within 0\.5 s"):
            async with asyncio.timeout(15):
                await call(queue, 10)
    finally:
        proxy.flowing.set()
        async with asyncio.timeout(15):
            await t.close()
        await proxy.close()


@pytest.mark.parametrize("verb", ["list", "replay"])
async def test_dead_letters_of_a_connection_lost_midway_are_one_clear_error(verb: str) -> None:
    """``amgi dead-letters`` lost its connection half-way (a network cut, a broker
    restart): the client's own error (``ChannelInvalidStateError``, a connection error
    of aiormq's) reached the command, which printed a bare traceback. Now it is one
    clear error, and the dead letters not acked stay."""
    from tests.servers.test_amqp_reliability import _PausableProxy

    proxy = _PausableProxy()
    url = await proxy.start()
    queue = new_queue()
    t = AmqpTransport([queue], AmqpOptions(url=url, linger=0.01, reconnect_delay_max=0.2))
    await t.connect()
    try:
        for body in (b"one", b"two"):
            await t.publish(queue, [], body, {})
        batches = await fetch_n(t, 2)
        for b in batches:
            await t.settle(b, Settlement(dead=[DeadLetter(m, "bad") for m in b.messages]))
        get_dead = t._get_dead

        async def cut_first(channel: Any, *args: Any) -> Any:
            await proxy.drop()
            while not channel.is_closed:  # the client has seen the loss
                await asyncio.sleep(0.01)
            return await get_dead(channel, *args)

        t._get_dead = cut_first  # type: ignore[method-assign]
        call = t.list_dead_letters if verb == "list" else t.replay_dead_letters
        with pytest.raises(BrokerUnavailable, match="lost the connection"):
            async with asyncio.timeout(15):
                await call(queue, 10)
    finally:
        async with asyncio.timeout(15):
            await t.close()
        await proxy.close()
    async with asyncio.timeout(10):
        while await queue_depth(f"{queue}.dead-letter") != 2:
            await asyncio.sleep(0.05)
    assert await queue_depth(queue) == 0
