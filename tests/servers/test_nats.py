"""The NATS server against a real nats-server: headers, attempts, lease, processes, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.runtime import Runtime, RuntimeConfig
from amgi.secrets import MASK
from amgi.servers.nats import NatsOptions, NatsSendError, NatsTransport
from amgi.servers.nats._headers import decode, encode
from amgi.testing.conformance import Received, Recorder
from amgi.transport import Batch, DeadLetter, Message, Retry, Settlement
from tests.apps import attempts_app, send_all, serve_in_stops
from tests.cli import amgi
from tests.core.test_cli import one_line_error
from tests.net import free_port
from tests.ops.helpers import CuttingFront
from tests.races import STEPS, cancel_after_completion
from tests.servers.amgi_process import (
    STARTUP_APP,
    AmgiProcess,
    processes,
    share_without_duplicates,
    until,
)
from tests.servers.crash_loop import CrashLoop
from tests.servers.nats_helpers import (
    PREFIX,
    STREAM,
    URL,
    consumer_state,
    ensure_broker,
    ensure_stream,
    fetch_all,
    fresh,
    read_subject,
    retention_stream,
    stored,
)
from tests.servers.private_brokers import private_nats

__all__ = ["processes"]


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


@pytest.fixture
async def subject() -> str:
    await ensure_stream()
    return f"{PREFIX}.{fresh('subject')}"


# -- headers (pure) -----------------------------------------------------------------------


def test_plain_headers_go_as_they_are_and_the_rest_encoded_in_place() -> None:
    headers = [
        (b"trace", b"abc"),
        (b"trace", b"second"),
        (b"bin", b"\x00\xff"),
        (b"pad", b" x"),
        (b"empty", b""),
        (b"bad name", b"v"),
    ]
    wire = encode(headers, "id-1")
    assert wire == {
        "trace": "abc",
        "Amgi-H-1": "dHJhY2U.c2Vjb25k",
        "Amgi-H-2": "Ymlu.AP8",
        "Amgi-H-3": "cGFk.IHg",
        "empty": "",
        "Amgi-H-5": "YmFkIG5hbWU.dg",
        "Nats-Msg-Id": "id-1",
    }
    assert decode(wire) == (headers, "id-1")


def test_headers_from_other_clients_read_as_they_are() -> None:
    assert decode({"Content-Type": "text/plain"}) == ([(b"Content-Type", b"text/plain")], None)
    assert decode(None) == ([], None)


@pytest.mark.parametrize("value", ["!!!.???", "aGVsbG8", "YQ.Yg.Yw", "YQ=.Yg", "a b.c"])
def test_a_header_named_like_an_encoded_one_that_is_not_is_read_as_it_is(value: str) -> None:
    """Another client's ``Amgi-H-0`` whose value is no ``<base64url>.<base64url>`` was
    decoded anyway (the decoder skips what is not base64): ``!!!.???`` became an empty
    name and value, ``aGVsbG8`` the header ``hello``. Now it is kept as it came."""
    assert decode({"Amgi-H-0": value}) == ([(b"Amgi-H-0", value.encode())], None)


# -- the transport ------------------------------------------------------------------------


async def test_values_with_unicode_whitespace_at_their_ends_come_back_exactly(
    subject: str,
) -> None:
    """nats-py strips a header value with ``str.strip()``, which takes Unicode whitespace
    too (NBSP, NEL, U+2028, ideographic space): such a value went out as it was and came
    back shortened. Now it travels encoded."""
    headers = [
        (b"nbsp", "\u00a0x".encode()),
        (b"nel", "x\u0085".encode()),
        (b"line", "x\u2028".encode()),
        (b"wide", "\u3000x\u3000".encode()),
        (b"inside", "a\u00a0b\u2028c".encode()),
    ]
    options = NatsOptions(servers=URL, durable=fresh("d"), fetch_expiry=0.2)
    t = NatsTransport([subject], options)
    await t.connect()
    try:
        await t.publish(subject, headers, b"x", {})
        (message,) = await fetch_all(t, 1)
    finally:
        await t.close()
    assert message.headers == headers


async def test_a_retry_keeps_the_stream_sequence_and_counts_the_delivery(subject: str) -> None:
    t = NatsTransport(
        [subject], NatsOptions(servers=URL, durable=fresh("d"), fetch_expiry=0.2, ack_wait=5)
    )
    await t.connect()
    try:
        await t.publish(subject, [(b"h", b"1")], b"again", {})
        (first,) = await fetch_all(t, 1)
        assert first.attempt == 1
        await t.settle(Batch(subject, [first]), Settlement(retry=[Retry(first, "later", 0.2)]))
        (again,) = await fetch_all(t, 1)
        assert again.id == first.id
        assert again.attempt == 2
        assert again.bindings["nats"]["sequence"] == int(first.id)
        await t.settle(Batch(subject, [again]), Settlement(acked=[again]))
    finally:
        await t.close()


async def test_a_message_handed_back_unseen_uses_up_no_attempt(subject: str) -> None:
    """JetStream counts every delivery: a message the runtime handed back uncounted (the
    app never had it) came back one attempt further each time, and enough of them
    dead-lettered it for nothing it did. The server takes its releases off the count."""
    t = NatsTransport(
        [subject], NatsOptions(servers=URL, durable=fresh("d"), fetch_expiry=0.2, ack_wait=5)
    )
    await t.connect()
    try:
        await t.publish(subject, [], b"waiting", {})
        attempts = []
        for _ in range(3):
            (message,) = await fetch_all(t, 1)
            attempts.append(message.attempt)
            released = Retry(message, "stopped before its turn", 0.0, uncounted=True)
            await t.settle(Batch(subject, [message]), Settlement(retry=[released]))
        (message,) = await fetch_all(t, 1)
        attempts.append(message.attempt)
        await t.settle(Batch(subject, [message]), Settlement(retry=[Retry(message, "no", 0.0)]))
        (message,) = await fetch_all(t, 1)
        attempts.append(message.attempt)
        await t.settle(Batch(subject, [message]), Settlement(acked=[message]))
    finally:
        await t.close()
    assert attempts == [1, 1, 1, 1, 2]


async def test_a_stop_uses_up_no_attempt_of_the_messages_already_pulled(subject: str) -> None:
    """A stop used to give back (``-NAK``) what its pull request had brought and no batch
    had taken: each came again with its delivery count, the attempt, raised. Now the
    stop processes them, so every message reaches the app on its first attempt."""
    durable = fresh("d")
    options = NatsOptions(servers=URL, durable=durable, batch_size=5, fetch_expiry=2)
    sender = NatsTransport([], NatsOptions(servers=URL))
    await send_all(sender, ((subject, b"%d" % i) for i in range(30)))
    config = RuntimeConfig(lifespan="off", concurrency=1, shutdown_timeout=10)
    # Each run stops with a pull request answered and not yet taken.
    seen, runs = await serve_in_stops(lambda: NatsTransport([subject], options), 30, config)
    assert sorted(p for p, _ in seen) == sorted(b"%d" % i for i in range(30))
    assert {attempt for _, attempt in seen} == {1}, f"{runs} {seen}"
    assert runs >= 2, "the first stop took every message"
    state = await consumer_state(STREAM, durable)
    assert (state.num_ack_pending, state.num_redelivered, state.num_pending) == (0, 0, 0)


async def test_a_stop_processes_what_the_open_pull_request_brings(subject: str) -> None:
    """JetStream cannot call a pull request off: the stop waits for the open one to end
    (at most ``fetch_expiry``) and processes what it brings. Unsubscribed while it was
    open, a message it was sending could reach the stopped inbox: lost to the process,
    it came again with its delivery count raised."""
    durable = fresh("d")
    options = NatsOptions(servers=URL, durable=durable, fetch_expiry=2, ack_wait=30)
    seen: list[tuple[bytes, int]] = []
    called = asyncio.Event()
    sender = NatsTransport([], NatsOptions(servers=URL))
    await sender.connect()
    try:
        transport = NatsTransport([subject], options)
        app = attempts_app(seen, called=called, linger=0.05)
        runtime = Runtime(app, transport, RuntimeConfig(lifespan="off"))
        serving = asyncio.create_task(runtime.serve())
        await sender.publish(subject, [], b"first", {})
        await asyncio.wait_for(called.wait(), 10)
        await asyncio.sleep(0.3)  # the next pull request is open
        started = asyncio.get_running_loop().time()
        runtime.request_stop()
        await sender.publish(subject, [], b"late", {})
        assert await asyncio.wait_for(serving, 20) == 0
        took = asyncio.get_running_loop().time() - started
    finally:
        await sender.close()
    assert seen == [(b"first", 1), (b"late", 1)]
    assert took < 4
    state = await consumer_state(STREAM, durable)
    assert (state.num_ack_pending, state.num_redelivered, state.num_pending) == (0, 0, 0)


async def test_a_stop_waits_no_longer_than_the_expiry_for_a_pull_request_never_answered(
    subject: str,
) -> None:
    """A pull request JetStream never answers (the request lost on its way, a server
    gone) counts as ended at its expiry: the stop waits that long at most, not the
    whole shutdown timeout."""
    options = NatsOptions(servers=URL, durable=fresh("d"), fetch_expiry=1)
    transport = NatsTransport([subject], options)
    runtime = Runtime(attempts_app([]), transport, RuntimeConfig(lifespan="off"))
    serving = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        client = transport._client
        real = client.publish

        async def lost(to: str, *args: Any, **kwargs: Any) -> Any:
            if to.startswith("$JS.API.CONSUMER.MSG.NEXT."):
                return None  # never reaches JetStream
            return await real(to, *args, **kwargs)

        client.publish = lost
        await asyncio.sleep(1.6)  # the request open before has ended: only a lost one
    finally:
        started = asyncio.get_running_loop().time()
        runtime.request_stop()
    assert await asyncio.wait_for(serving, 30) == 0
    assert asyncio.get_running_loop().time() - started < 5  # 1.5 s at most, not 30 s


@contextlib.asynccontextmanager
async def running(transport: NatsTransport, app: Any = None) -> AsyncIterator[asyncio.Task[int]]:
    """The server serving ``transport`` with ``app`` (by default one that acks all),
    started, stopped at the end; its task."""
    runtime = Runtime(app or attempts_app([]), transport, RuntimeConfig(lifespan="off"))
    serving = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        yield serving
    finally:
        runtime.request_stop()
        await asyncio.wait_for(serving, 10)


@contextlib.asynccontextmanager
async def silent_subject() -> AsyncIterator[str]:
    """A fresh subject no stream captures, on which a subscriber listens and never
    answers: a JetStream publish to it waits for an ack that never comes."""
    import nats

    silent = await nats.connect(URL)

    async def never_ack(msg: Any) -> None:
        pass

    try:
        dead_subject = f"{PREFIX}-silent.{fresh('dl')}"
        await silent.subscribe(dead_subject, cb=never_ack)
        await silent.flush()
        yield dead_subject
    finally:
        await silent.close()


async def hold_one_message(subject: str, options: NatsOptions, hold: float) -> Recorder:
    """Run the server with an app that holds one message ``hold`` seconds before it acks;
    the app's recorder."""
    app = Recorder()
    app.delay = hold
    runtime = Runtime(app, NatsTransport([subject], options), RuntimeConfig(lifespan="off"))
    task = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        producer = NatsTransport([], NatsOptions(servers=URL))
        await producer.connect()
        await producer.publish(subject, [], b"slow", {})
        await producer.close()
        await app.wait_for(lambda: len(app.acked) >= 1, 15, "the slow message")
        await asyncio.sleep(1.2)  # a redelivery would come by then
    finally:
        runtime.request_stop()
        assert await task == 0
    return app


async def test_in_progress_acks_keep_a_long_batch_from_being_redelivered(subject: str) -> None:
    durable = fresh("d")
    options = NatsOptions(servers=URL, durable=durable, fetch_expiry=0.2, ack_wait=1.0)
    app = await hold_one_message(subject, options, hold=2.5)  # longer than the ack wait
    assert [r.attempt for r in app.received] == [1], "redelivered while still in progress"
    info = await consumer_state(STREAM, durable)
    assert info.num_ack_pending == 0


@contextlib.asynccontextmanager
async def one_slot_busy(
    subject: str, options: NatsOptions, later: int, linger: float, shutdown_timeout: float = 10
) -> AsyncIterator[list[tuple[bytes, int]]]:
    """Serve ``subject`` one call at a time with an app that takes ``linger`` seconds per
    call; send ``0``, and ``1`` to ``later`` once the first call runs (the open pull
    request brings some of them while it does). Yields the ``(payload, attempt)`` seen;
    stopped at the end."""
    seen: list[tuple[bytes, int]] = []
    called = asyncio.Event()
    app = attempts_app(seen, called=called, linger=linger)
    config = RuntimeConfig(lifespan="off", concurrency=1, shutdown_timeout=shutdown_timeout)
    runtime = Runtime(app, NatsTransport([subject], options), config)
    serving = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        await send_all(NatsTransport([], NatsOptions(servers=URL)), [(subject, b"0")])
        await asyncio.wait_for(called.wait(), 10)
        payloads = ((subject, b"%d" % i) for i in range(1, later + 1))
        await send_all(NatsTransport([], NatsOptions(servers=URL)), payloads)
        yield seen
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(serving, 10) == 0


async def test_messages_pulled_while_every_slot_is_busy_are_leased_too(subject: str) -> None:
    """What a pull request brings after the runtime took its batch waits in the inbox
    until a slot is free, and was not leased: with ack wait 0.5 s, one call at a time
    and an app taking 1 s per call, JetStream delivered those messages again, their
    attempt raised, although the app never had them (and a low --max-attempts
    dead-lettered them unseen; measured: 7 messages, 13 deliveries). Now each comes
    once, on its first attempt."""
    durable = fresh("d")
    options = NatsOptions(servers=URL, durable=durable, batch_size=3, fetch_expiry=2, ack_wait=0.5)
    async with one_slot_busy(subject, options, later=6, linger=1.0) as seen:
        async with asyncio.timeout(15):
            while len({p for p, _ in seen}) < 7:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.8)  # a message delivered again would be here by now
    assert sorted(seen) == [(b"%d" % i, 1) for i in range(7)], f"{seen}"
    state = await consumer_state(STREAM, durable)
    assert (state.num_ack_pending, state.num_redelivered, state.num_pending) == (0, 0, 0)


async def rival_pull(durable: str, count: int, timeout: float) -> list[bytes]:
    """The payloads a pull of ``count`` on consumer ``durable`` by another client gets
    within ``timeout`` (handed back with ``-NAK``)."""
    import nats

    rival = await nats.connect(URL)
    try:
        pull = await rival.jetstream().pull_subscribe_bind(durable, STREAM)
        try:
            taken = await pull.fetch(count, timeout=timeout)
        except TimeoutError:  # nats-py's own, or asyncio's when its 408 comes late
            return []
        for msg in taken:
            await msg.nak()
        return [msg.data for msg in taken]
    finally:
        await rival.close()


async def test_messages_pulled_while_the_fetch_backs_off_after_a_failure_are_leased_too(
    subject: str,
) -> None:
    """A fetch that fails (a consumer check without an answer, say) makes the runtime
    back off (0.1 s, doubling), and with nothing in flight its lease loop extended
    nothing: the messages the open pull request had brought meanwhile waited in the inbox
    unleased, and after the ack wait (0.5 s) JetStream gave them to the next pull
    request, their attempt raised, before the app ever had them. Now the lease covers
    them while no batch runs: a rival pull on the same consumer gets nothing."""

    class Failing(NatsTransport):
        """Every fetch after the one that brings a message fails, until ``failing`` is
        cleared."""

        failing = False
        armed = True

        async def fetch(self) -> Sequence[Batch]:
            if self.failing:
                raise OSError("no answer to the consumer check")
            batches = await super().fetch()
            if self.armed and any(b.messages for b in batches):
                self.armed = False
                self.failing = True
            return batches

    seen: list[tuple[bytes, int]] = []
    called = asyncio.Event()
    app = attempts_app(seen, called=called)
    durable = fresh("d")
    options = NatsOptions(servers=URL, durable=durable, batch_size=3, fetch_expiry=4, ack_wait=0.5)
    transport = Failing([subject], options)
    async with running(transport, app) as serving:
        await send_all(NatsTransport([], NatsOptions(servers=URL)), [(subject, b"0")])
        await asyncio.wait_for(called.wait(), 10)
        # The pull request that brought "0" asked for 3: it brings these into the inbox.
        later = [(subject, b"1"), (subject, b"2")]
        await send_all(NatsTransport([], NatsOptions(servers=URL)), later)
        await asyncio.sleep(1.2)  # over two ack waits with no fetch, and so no batch
        taken = await rival_pull(durable, 2, timeout=0.5)
        assert transport.failing, "the fetch was to fail meanwhile"
        transport.failing = False
        async with asyncio.timeout(10):
            while len(seen) < 3:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.8)  # a message delivered again would be here by now
    assert serving.result() == 0
    assert taken == [], "the ack wait ran out in the inbox"
    assert sorted(seen) == [(b"0", 1), (b"1", 1), (b"2", 1)], f"{seen}"
    state = await consumer_state(STREAM, durable)
    assert (state.num_ack_pending, state.num_redelivered, state.num_pending) == (0, 0, 0)


async def test_a_lease_that_comes_after_a_retry_nak_keeps_the_retry_delay(subject: str) -> None:
    """The runtime leases the batches it lists, and a batch stays listed until its settle
    returns: a lease right after the ``-NAK`` of a retry (delay 0.3 s) sent ``+WPI`` for
    it, and JetStream then redelivered it after the ack wait (3 s) instead. Settled
    messages are left out of the lease now."""
    options = NatsOptions(servers=URL, durable=fresh("d"), ack_wait=3)
    t = NatsTransport([subject], options)
    await t.connect()
    try:
        await send_all(NatsTransport([], NatsOptions(servers=URL)), [(subject, b"x")])
        (m,) = await fetch_all(t, 1)
        batch = Batch(subject, [m])
        await t.settle(batch, Settlement(retry=[Retry(m, "again", 0.3)]))
        naked = asyncio.get_running_loop().time()
        await t.extend([batch])  # a lease that listed the batch before its settle ended
        (again,) = await fetch_all(t, 1)
        waited = asyncio.get_running_loop().time() - naked
        await t.settle(Batch(subject, [again]), Settlement(acked=[again]))
    finally:
        await t.close()
    assert (again.payload, again.attempt) == (b"x", 2)
    assert waited < 2, f"redelivered after {waited:.2f}s: the ack wait, not the retry delay"


async def test_a_lease_cut_off_by_a_reconnect_is_sent_again_at_once(subject: str) -> None:
    """A connection lost while a lease (``+WPI``, then a flush) waits for its answer:
    nats-py forgets that answer across the reconnect, and the flush waited out its whole
    timeout (the ack wait), which held the next lease back. Measured with a 4 s ack wait:
    a rival pull on the consumer got the message the app still held, its attempt raised.
    Now the lease is sent again as soon as the client has reconnected."""

    durable = fresh("d")
    seen: list[tuple[bytes, int]] = []
    async with CuttingFront(int(URL.rsplit(":", 1)[1]), b"+WPI") as relay:
        options = NatsOptions(servers=f"nats://127.0.0.1:{relay.port}", durable=durable, ack_wait=4)
        app = attempts_app(seen, linger=0)
        held = asyncio.Event()

        async def holding(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "message":
                await asyncio.wait_for(held.wait(), 20)
            await app(scope, receive, send)

        async with running(NatsTransport([subject], options), holding) as serving:
            try:
                await send_all(NatsTransport([], NatsOptions(servers=URL)), [(subject, b"x")])
                await asyncio.wait_for(relay.sent.wait(), 10)  # a lease went through
                await asyncio.sleep(0.3)
                relay.stalled = True  # the next lease and its flush's PING go nowhere
                await asyncio.wait_for(relay.lost.wait(), 10)
                await asyncio.sleep(0.3)
                await relay.cut()
                taken = await rival_pull(durable, 1, timeout=4.5)  # past the ack wait
                held.set()
                async with asyncio.timeout(10):
                    while not seen:
                        await asyncio.sleep(0.05)
            finally:
                held.set()
    assert serving.result() == 0
    assert taken == [], "the message was redelivered while the app held it"
    assert seen == [(b"x", 1)]


async def test_a_lease_cancelled_while_its_flush_waits_leaves_the_flush_to_the_stop(
    subject: str,
) -> None:
    """A lease (``+WPI`` and a flush) cancelled while the flush waits for its ``PONG``:
    the flush is kept, not cancelled (a ``PONG`` that comes for a cancelled flush breaks
    nats-py's reading loop), and the stop cancels it."""
    async with CuttingFront(int(URL.rsplit(":", 1)[1])) as relay:
        options = NatsOptions(servers=f"nats://127.0.0.1:{relay.port}", durable=fresh("d"))
        t = NatsTransport([subject], options)
        await t.connect()
        try:
            await send_all(NatsTransport([], NatsOptions(servers=URL)), [(subject, b"x")])
            (m,) = await fetch_all(t, 1)
            relay.stalled = True  # no PONG comes back now
            leasing = asyncio.ensure_future(t.extend([Batch(subject, [m])]))
            await asyncio.sleep(0.3)
            leasing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leasing
            consumers = t._consumers
            assert consumers is not None
            [flush] = consumers._stale_flushes
            assert not flush.done()
            await relay.cut()
        finally:
            await t.close()
        assert flush.done()
        assert not consumers._stale_flushes


async def test_messages_the_shutdown_timeout_leaves_unstarted_go_back_at_once(
    subject: str,
) -> None:
    """Messages pulled that the stop had no time to run (one call at a time, an app
    slower than --shutdown-timeout) stayed unacknowledged until the ack wait (here 30 s)
    before anyone could have them. Now they go back (``-NAK``) as the server closes:
    their delivery counted, as JetStream counts every delivery."""
    options = NatsOptions(servers=URL, durable=fresh("d"), batch_size=3, fetch_expiry=2)
    async with one_slot_busy(subject, options, later=3, linger=3, shutdown_timeout=0.5) as seen:
        await asyncio.sleep(0.2)  # two of them wait in the inbox
    assert seen == [(b"0", 1)]
    again = NatsTransport([subject], options)
    await again.connect()
    try:
        got = await asyncio.wait_for(fetch_all(again, 3), 3)  # not after 30 s
        await again.settle(Batch(subject, got), Settlement(acked=got))
    finally:
        await again.close()
    assert sorted((m.payload, m.attempt) for m in got) == [(b"1", 2), (b"2", 2), (b"3", 1)]


@pytest.mark.parametrize(("consumer_ack_wait", "ack_wait"), [(1, 30), (60, 1)])
async def test_the_lease_follows_an_existing_consumers_own_ack_wait(
    subject: str, caplog: pytest.LogCaptureFixture, consumer_ack_wait: int, ack_wait: int
) -> None:
    """An existing consumer is used with its own ack_wait, and the lease (+WPI) came every
    --ack-wait / 3: with ack_wait 1 s and --ack-wait 30, a message held 2.5 s was
    delivered again while in the app's hands, its attempt raised (measured: attempts
    [1, 2, 3]). Now the lease comes every third of the shorter of the two, with one line
    saying so; a consumer's longer ack_wait changes nothing wrong."""
    from nats.js import api

    durable = await existing_durable(
        subject, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=consumer_ack_wait
    )
    options = NatsOptions(servers=URL, durable=durable, fetch_expiry=0.2, ack_wait=ack_wait)
    with caplog.at_level(logging.INFO, logger="amgi.servers.nats"):
        app = await hold_one_message(subject, options, hold=2.5)
    assert [r.attempt for r in app.received] == [1], "redelivered while still in progress"
    info = await consumer_state(STREAM, durable)
    assert (info.num_ack_pending, info.num_redelivered) == (0, 0)
    said = f"ack_wait {consumer_ack_wait}s, not --ack-wait {ack_wait}s"
    lines = [r.getMessage() for r in caplog.records if said in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"comes every {min(ack_wait, consumer_ack_wait) / 3:.3g}s" in lines[0]


async def test_an_ack_wait_lowered_while_running_below_the_lease_ends_the_run(
    subject: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime keeps the lease interval set at the start (here 1 s, --ack-wait 3). A
    consumer's ack_wait lowered to 2.5 s while running is followed (its dead letters come
    back after it; one line says so); lowered to 1 s, the lease would come too rarely and
    JetStream would deliver a held message again: the run ends with one line (it went on,
    each held message delivered again, its attempt raised)."""
    from amgi.servers.nats import _jetstream

    monkeypatch.setattr(_jetstream, "_RECHECK", 0.3, raising=False)
    durable = fresh("d")
    options = NatsOptions(servers=URL, durable=durable, fetch_expiry=0.2, ack_wait=3)
    caplog.set_level(logging.INFO, logger="amgi.servers.nats")
    async with running(NatsTransport([subject], options)) as serving:
        await edit_consumer(durable, ack_wait=2.5)
        await asyncio.sleep(1)
        assert not serving.done()
        await edit_consumer(durable, ack_wait=1)
        code = await asyncio.wait_for(asyncio.shield(serving), 3)
    assert code != 0
    followed = [r.getMessage() for r in caplog.records if "has ack_wait 2.5s" in r.getMessage()]
    assert len(followed) == 1, followed
    lines = [r.getMessage() for r in caplog.records if "given ack_wait 1s" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "\n" not in lines[0]
    assert "comes every 1s" in lines[0]


async def test_a_dead_letter_not_stored_comes_back_after_the_consumers_own_ack_wait(
    subject: str,
) -> None:
    """A message whose dead letter could not be stored for now was -NAKed with --ack-wait
    as delay: with a consumer of ack_wait 1 s and --ack-wait 30 it came back after 30 s,
    not after the ack wait of the consumer it lives on. Now after 1 s."""
    from nats.js import api

    durable = await existing_durable(subject, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=1)
    async with silent_subject() as dead_subject:
        options = NatsOptions(
            servers=URL, durable=durable, fetch_expiry=0.2, ack_wait=30,
            dead_letter_subject=dead_subject, publish_timeout=0.3,
        )  # fmt: skip
        t = NatsTransport([subject], options)
        await t.connect()
        try:
            await t.publish(subject, [], b"poison", {})
            (first,) = await fetch_all(t, 1)
            await t.settle(Batch(subject, [first]), Settlement(dead=[DeadLetter(first, "no")]))
            (again,) = await asyncio.wait_for(fetch_all(t, 1), 3)
        finally:
            await t.close()
    assert (again.id, again.attempt) == (first.id, 2)


async def test_dead_letters_carry_reason_and_attempt_and_are_terminated(subject: str) -> None:
    durable = fresh("d")

    def decide(r: Received) -> str:
        return "nack:cannot parse"

    app = Recorder(decide)
    options = NatsOptions(servers=URL, durable=durable, fetch_expiry=0.2)
    runtime = Runtime(
        app, NatsTransport([subject], options), RuntimeConfig(max_attempts=2, retry_delay=0.05)
    )
    producer = NatsTransport([], NatsOptions(servers=URL))
    await producer.connect()
    await producer.publish(subject, [(b"k", b"v")], b"poison", {})
    await producer.close()
    task = asyncio.create_task(runtime.serve())
    try:
        ((headers, payload, _),) = await read_subject(f"{subject}.dlq", 1, 15)
        await asyncio.sleep(0.3)
    finally:
        runtime.request_stop()
        assert await task == 0
    assert payload == b"poison"
    assert headers == [
        (b"k", b"v"),
        (b"amgi-attempt", b"2"),
        (b"amgi-original-address", subject.encode()),
        (b"amgi-dead-letter-reason", b"cannot parse"),
    ]
    assert [r.attempt for r in app.received] == [1, 2]
    info = await consumer_state(STREAM, durable)
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0


async def test_a_dead_letter_does_not_repeat_the_jetstream_checks_of_its_first_publish(
    subject: str,
) -> None:
    """A message published with ``Nats-Expected-Last-Subject-Sequence`` (optimistic
    concurrency) carried the header into its dead-letter publish, where the stream
    refused it (wrong last sequence): -NAKed after the ack wait, for ever. Republished,
    ``Nats-`` headers travel encoded and come back byte-exact."""
    import nats

    producer = await nats.connect(URL)
    try:
        js = producer.jetstream()
        first = await js.publish(subject, b"first")
        expected = (b"Nats-Expected-Last-Subject-Sequence", b"%d" % first.seq)
        await js.publish(subject, b"second", headers={expected[0].decode(): expected[1].decode()})
    finally:
        await producer.close()
    options = NatsOptions(servers=URL, durable=fresh("d"), fetch_expiry=0.2, ack_wait=1)
    t = NatsTransport([subject], options)
    await t.connect()
    try:
        ok, poison = await fetch_all(t, 2)
        assert poison.headers == [expected]
        settlement = Settlement(acked=[ok], dead=[DeadLetter(poison, "no")])
        await t.settle(Batch(subject, [ok, poison]), settlement)
        ((headers, payload, _),) = await read_subject(f"{subject}.dlq", 1, 3)
    finally:
        await t.close()
    assert payload == b"second"
    assert headers[0] == expected


@pytest.mark.parametrize("mode", ["jetstream", "core"])
async def test_a_dead_letter_publish_waits_no_longer_than_the_publish_timeout(
    subject: str, mode: str
) -> None:
    """The dead-letter publish waited nats-py's 5 s for the stream's ack whatever
    ``--publish-timeout`` said. Here something listens on the dead-letter subject and
    never acks: the publish gives up after the publish timeout."""
    async with silent_subject() as dead_subject:
        options = NatsOptions(
            servers=URL, mode=mode, durable=fresh("d"), queue=fresh("q"), fetch_expiry=0.2,
            dead_letter_subject=dead_subject, publish_timeout=0.5,
        )  # fmt: skip
        t = NatsTransport([subject], options)
        await t.connect()
        try:
            await t.publish(subject, [], b"poison", {})
            (message,) = await fetch_all(t, 1)
            loop = asyncio.get_running_loop()
            started = loop.time()
            dead = Settlement(dead=[DeadLetter(message, "no")])
            await t.settle(Batch(subject, [message]), dead)
            took = loop.time() - started
        finally:
            await t.close()
    assert took < 2.5, took


@pytest.mark.parametrize("mode", ["jetstream", "core"])
async def test_a_dead_letter_over_the_max_payload_keeps_the_connection(
    subject: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A message near max_payload grows past it with the dead-letter headers: published,
    the server closed the connection and nats-py the client, for good (nothing fetched,
    acked or sent any more). Now that dead letter fails alone (JetStream: -NAKed), with
    one line."""
    options = NatsOptions(
        servers=URL, mode=mode, durable=fresh("d"), queue=fresh("q"), fetch_expiry=0.2,
        ack_wait=5,
    )  # fmt: skip
    t = NatsTransport([subject], options)
    await t.connect()
    try:
        await t.publish(subject, [], b"x" * (t._client.max_payload - 100), {})
        (big,) = await fetch_all(t, 1)
        await t.settle(Batch(subject, [big]), Settlement(dead=[DeadLetter(big, "too big")]))
        await t.publish(subject, [], b"after", {})
        (after,) = await fetch_all(t, 1)
        assert after.payload == b"after"
    finally:
        await t.close()
    assert "over the server's max_payload" in caplog.text


async def dead_letter_kept(
    t: NatsTransport, durable: str, caplog: pytest.LogCaptureFixture
) -> tuple[Message, str]:
    """Fetch the one message waiting, dead-letter it (a dead letter the broker refuses)
    and check it is kept: not back after the 1 s ack wait, neither acked nor lost, one
    error line naming where it stays. The message and that line."""
    (poison,) = await fetch_all(t, 1)
    await t.settle(
        Batch(poison.bindings["nats"]["subject"], [poison]),
        Settlement(dead=[DeadLetter(poison, "no")]),
    )
    with pytest.raises(TimeoutError):  # it came back after the 1 s ack wait
        await asyncio.wait_for(fetch_all(t, 1), 2.0)
    info = await consumer_state(STREAM, durable)
    assert (info.num_ack_pending, info.num_redelivered) == (1, 0), "not acked, not lost"
    lines = [r.getMessage() for r in caplog.records if "cannot be dead-lettered" in r.message]
    assert len(lines) == 1, lines
    assert f"in stream {STREAM!r} (sequence {poison.id})" in lines[0]
    return poison, lines[0]


@pytest.mark.parametrize("limit", ["stream max_msg_size", "server max_payload"])
async def test_a_dead_letter_refused_for_good_waits_long_with_one_line_and_is_not_lost(
    subject: str, limit: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead letter the broker refuses for what it is (over the dead-letter stream's
    max_msg_size: 400; over max_payload: never published) was -NAKed with --ack-wait as
    delay: tried again and refused every ack wait, with error lines, for ever. Now it is
    -NAKed with a long delay (an hour; shortened here) and one line saying where it stays;
    once the limit is raised, it comes back and is dead-lettered."""
    import nats
    from nats.js import api

    from amgi.servers.nats import _jetstream

    monkeypatch.setattr(_jetstream, "_REFUSED_DELAY", 3.0, raising=False)
    tag = fresh("dl")
    dead_stream = f"AMGI_TEST_{tag.replace('-', '_')}"
    admin = await nats.connect(URL)
    jsm = admin.jsm()
    config = api.StreamConfig(
        name=dead_stream,
        subjects=[f"{PREFIX}-{tag}.>"],
        storage=api.StorageType.MEMORY,
        max_msg_size=64,
        max_age=600,
    )
    await jsm.add_stream(config)
    durable = fresh("d")
    options = NatsOptions(
        servers=URL, durable=durable, fetch_expiry=0.2, ack_wait=1,
        dead_letter_subject=f"{PREFIX}-{tag}.{{subject}}",
    )  # fmt: skip
    t = NatsTransport([subject], options)
    await t.connect()
    try:
        size = t._client.max_payload - 100 if limit == "server max_payload" else 10
        await t.publish(subject, [], b"x" * size, {})
        poison, line = await dead_letter_kept(t, durable, caplog)
        assert ("exceeds maximum" if limit == "stream max_msg_size" else "max_payload") in line
        if limit == "stream max_msg_size":
            config.max_msg_size = -1
            await jsm.update_stream(config)
            (again,) = await fetch_all(t, 1)
            assert (again.id, again.attempt) == (poison.id, 2)
            await t.settle(Batch(subject, [again]), Settlement(dead=[DeadLetter(again, "no")]))
            ((_, payload, _),) = await read_subject(f"{PREFIX}-{tag}.{subject}", 1, 3)
            assert payload == b"x" * size
            assert (await consumer_state(STREAM, durable)).num_ack_pending == 0
    finally:
        await t.close()
        await jsm.delete_stream(dead_stream)
        await admin.close()


async def test_a_dead_letter_no_stream_captures_waits_long_with_one_line_and_is_not_lost(
    subject: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No stream captured the dead-letter subject: the message was -NAKed with --ack-wait
    as delay and failed again every ack wait, for ever (measured with --ack-wait 1: an
    error line a second). Now, once a look-up confirms no stream captures the subject, it
    is -NAKed with a long delay (an hour; shortened here) and one line naming the
    subject and the fix; once a stream captures it, the dead letter is stored."""
    import nats
    from nats.js import api

    from amgi.servers.nats import _jetstream

    monkeypatch.setattr(_jetstream, "_REFUSED_DELAY", 3.0)
    tag = fresh("nostream")
    durable = fresh("d")
    options = NatsOptions(
        servers=URL, durable=durable, fetch_expiry=0.2, ack_wait=1,
        dead_letter_subject=f"{PREFIX}-{tag}.{{subject}}",
    )  # fmt: skip
    dead_stream = f"AMGI_TEST_{tag.replace('-', '_')}"
    admin = await nats.connect(URL)
    t = NatsTransport([subject], options)
    await t.connect()
    try:
        await t.publish(subject, [], b"poison", {})
        poison, line = await dead_letter_kept(t, durable, caplog)
        assert f"to '{PREFIX}-{tag}.{subject}': no JetStream stream captures it" in line
        assert "create a stream capturing the subject" in line
        config = api.StreamConfig(
            name=dead_stream, subjects=[f"{PREFIX}-{tag}.>"], storage=api.StorageType.MEMORY
        )
        await admin.jsm().add_stream(config)
        (again,) = await fetch_all(t, 1)
        assert (again.id, again.attempt) == (poison.id, 2)
        await t.settle(Batch(subject, [again]), Settlement(dead=[DeadLetter(again, "no")]))
        ((_, payload, _),) = await read_subject(f"{PREFIX}-{tag}.{subject}", 1, 3)
        assert payload == b"poison"
        assert (await consumer_state(STREAM, durable)).num_ack_pending == 0
    finally:
        await t.close()
        with contextlib.suppress(Exception):
            await admin.jsm().delete_stream(dead_stream)
        await admin.close()


async def test_a_dead_letter_stream_with_interest_retention_is_refused_and_loses_nothing(
    subject: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream with interest retention acked the dead letter, then dropped it (no
    consumer's filter covered its subject), and the original was terminated: both gone
    (3 of 3 nacked messages, measured). Such a stream now stops the start with one line;
    one that appears while the server runs keeps the message unacknowledged, one line."""
    durable, tag = fresh("d"), fresh("interest")
    options = NatsOptions(
        servers=URL, durable=durable, fetch_expiry=0.2, ack_wait=1,
        dead_letter_subject=f"{PREFIX}-{tag}.{{subject}}",
    )  # fmt: skip
    t = NatsTransport([subject], options)
    await t.connect()  # no stream captures the dead-letter subject yet
    try:
        async with retention_stream("interest", tag):
            for mode in ("jetstream", "core"):
                refused = NatsTransport([subject], replace(options, mode=mode, queue=fresh("q")))
                with pytest.raises(ConfigurationError, match="has interest retention") as info:
                    await refused.connect()
                assert "limits or workqueue retention" in str(info.value)
            await t.publish(subject, [], b"poison", {})
            _, line = await dead_letter_kept(t, durable, caplog)
    finally:
        await t.close()
    assert "has interest retention" in line
    assert "(give the dead-letter subject a stream with limits or workqueue retention)" in line


async def test_core_mode_retries_in_memory_then_dead_letters(subject: str) -> None:
    def decide(r: Received) -> str:
        return "ack" if r.payload == b"fine" else "nack:no"

    app = Recorder(decide)
    options = NatsOptions(servers=URL, mode="core", queue=fresh("q"))
    runtime = Runtime(
        app, NatsTransport([subject], options), RuntimeConfig(max_attempts=2, retry_delay=0.05)
    )
    task = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        sender = NatsTransport([], NatsOptions(servers=URL, mode="core"))
        await sender.connect()
        await sender.publish(subject, [(b"h", b"\x00")], b"fine", {})
        await sender.publish(subject, [], b"bad", {})
        await sender.close()
        ((headers, payload, _),) = await read_subject(f"{subject}.dlq", 1, 15)
    finally:
        runtime.request_stop()
        assert await task == 0
    assert payload == b"bad"
    assert (b"amgi-dead-letter-reason", b"no") in headers
    assert [(r.payload, r.attempt) for r in app.received] == [
        (b"fine", 1),
        (b"bad", 1),
        (b"bad", 2),
    ]
    assert app.received[0].headers == [(b"h", b"\x00")]


@pytest.mark.parametrize("steps", range(STEPS))
async def test_core_mode_a_stop_that_meets_a_wake_is_not_lost(subject: str, steps: int) -> None:
    """With a retry waiting, the core-mode fetch sleeps with a timeout; a cancel landing as
    it is woken ends it. (White-box: the test fires the subscriptions' arrival event.)"""
    t = NatsTransport([subject], NatsOptions(servers=URL, mode="core", queue=fresh("q")))
    await t.connect()
    try:
        await t.publish(subject, [], b"one", {})
        (first,) = await fetch_all(t, 1)
        await t.settle(Batch(subject, [first]), Settlement(retry=[Retry(first, "later", 60)]))
        subscriptions = t._subscriptions
        assert subscriptions is not None
        fetch = await cancel_after_completion(t.fetch(), subscriptions._arrived.set, steps)
        assert fetch.cancelled(), "nothing to return, it sleeps on: the cancel lands"
        await t.publish(subject, [], b"two", {})
        assert [m.payload for m in await fetch_all(t, 1)] == [b"two"]
    finally:
        await t.close()


async def test_a_deleted_consumer_is_created_again(
    subject: str, caplog: pytest.LogCaptureFixture
) -> None:
    durable = fresh("d")
    t = NatsTransport([subject], NatsOptions(servers=URL, durable=durable, fetch_expiry=0.2))
    await t.connect()
    try:
        await t.publish(subject, [], b"before", {})
        (first,) = await fetch_all(t, 1)
        await t.settle(Batch(subject, [first]), Settlement(acked=[first]))
        import nats

        admin = await nats.connect(URL)
        await admin.jsm().delete_consumer(STREAM, durable)
        await admin.close()
        await t.publish(subject, [], b"after", {})
        # The new consumer starts at the stream's beginning: "before" comes again first.
        got = await fetch_all(t, 2)
        assert [m.payload for m in got] == [b"before", b"after"]
    finally:
        await t.close()
    assert "was gone; created it again" in caplog.text


async def test_two_subjects_whose_consumer_names_meet_each_get_their_own() -> None:
    """Consumer names replace ``.``, ``*`` and ``>`` by ``_``: ``x.y`` and ``x_y`` both
    made ``{durable}_x_y``, and the second address pulled from the first one's consumer
    (its own messages never came). The second now gets a name of its own."""
    await ensure_stream()
    base = f"{PREFIX}.{fresh('meet')}"
    dotted, underscored = f"{base}.y", f"{base}_y"
    options = NatsOptions(servers=URL, durable=fresh("d"), fetch_expiry=0.2)
    for order in ([dotted, underscored], [underscored, dotted]):  # and again, found
        t = NatsTransport(order, options)
        await t.connect()
        try:
            await t.publish(dotted, [], b"dotted", {})
            await t.publish(underscored, [], b"underscored", {})
            got: dict[str, list[bytes | None]] = {}
            async with asyncio.timeout(5):
                while sum(map(len, got.values())) < 2:
                    for batch in await t.fetch():
                        got.setdefault(batch.address, []).extend(m.payload for m in batch.messages)
                        await t.settle(batch, Settlement(acked=list(batch.messages)))
        finally:
            await t.close()
        assert got == {dotted: [b"dotted"], underscored: [b"underscored"]}


async def existing_durable(subject: str, **config: Any) -> str:
    """A fresh durable consumer of ``subject`` on the test stream, made by another
    client with ``config`` (nats-py ``ConsumerConfig`` fields); its name."""
    import nats
    from nats.js import api

    durable = fresh("d")
    admin = await nats.connect(URL)
    try:
        await admin.jsm().add_consumer(
            STREAM, api.ConsumerConfig(durable_name=durable, filter_subject=subject, **config)
        )
    finally:
        await admin.close()
    return durable


@pytest.mark.parametrize("ack_policy", ["none", "all"])
async def test_an_existing_consumer_without_explicit_acks_is_refused(
    subject: str, ack_policy: str
) -> None:
    """A durable found is used as it is: one made with ack policy ``none`` took every
    message as acked when delivered (a nack was never redelivered: at most once), and one
    with ``all`` acked past a nacked message. Both now stop the start with one line."""
    from nats.js import api

    durable = await existing_durable(subject, ack_policy=api.AckPolicy(ack_policy))
    t = NatsTransport([subject], NatsOptions(servers=URL, durable=durable, fetch_expiry=0.2))
    with pytest.raises(ConfigurationError, match=f"acks {ack_policy!r}"):
        await t.connect()
    assert t._client is None, "closed again"


@pytest.mark.parametrize("max_deliver", [2, 10])
async def test_an_existing_consumer_with_a_delivery_limit_is_refused(
    subject: str, max_deliver: int
) -> None:
    """A durable found with max_deliver 2 was used as it is: with --max-attempts 3, a
    message nacked twice was never delivered again and never dead-lettered (JetStream
    gives up on it without a word). Any limit strands a message whose dead letter cannot
    be stored (it is handed back and comes again), so every limit stops the start with one
    line. A consumer the server creates has none."""
    from nats.js import api

    durable = await existing_durable(
        subject, ack_policy=api.AckPolicy.EXPLICIT, max_deliver=max_deliver
    )
    t = NatsTransport([subject], NatsOptions(servers=URL, durable=durable, fetch_expiry=0.2))
    with pytest.raises(ConfigurationError, match=f"max_deliver {max_deliver}:") as caught:
        await t.connect()
    assert "\n" not in str(caught.value)
    assert "set its max_deliver to -1" in str(caught.value)
    assert t._client is None, "closed again"
    created = fresh("d")
    t = NatsTransport([subject], NatsOptions(servers=URL, durable=created, fetch_expiry=0.2))
    await t.connect()
    await t.close()
    assert (await consumer_state(STREAM, created)).config.max_deliver == -1


async def edit_consumer(durable: str, **changes: Any) -> None:
    """Change the test stream's consumer ``durable`` as an operator would (``nats
    consumer edit``): its config as it is, with ``changes``."""
    import nats

    admin = await nats.connect(URL)
    try:
        jsm = admin.jsm()
        config = (await jsm.consumer_info(STREAM, durable)).config
        for field, value in changes.items():
            setattr(config, field, value)
        await jsm.add_consumer(STREAM, config)
    finally:
        await admin.close()


async def test_a_delivery_limit_set_while_running_ends_the_run_before_it_strands(
    subject: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A max_deliver given to the consumer while the server ran went unnoticed (JetStream
    announces no consumer edit): the run went on, and a message nacked up to the limit
    was never delivered again. Now the consumers are looked at again every few seconds
    (shortened here), and the run ends with one line before anything is stranded."""
    from amgi.servers.nats import _jetstream

    monkeypatch.setattr(_jetstream, "_RECHECK", 0.3, raising=False)
    durable = fresh("d")
    options = NatsOptions(servers=URL, durable=durable, fetch_expiry=0.2)
    async with running(NatsTransport([subject], options)) as serving:
        await edit_consumer(durable, max_deliver=5)
        code = await asyncio.wait_for(asyncio.shield(serving), 3)
    assert code != 0
    lines = [r.getMessage() for r in caplog.records if "max_deliver 5:" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "\n" not in lines[0]
    assert "set its max_deliver to -1" in lines[0]


async def test_a_message_stranded_by_a_delivery_limit_ends_the_fetch_naming_it(
    subject: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set between two looks, a limit strands a message without a word to the client
    (measured: consumer at ack pending 0, ack floor 0, the message never delivered again,
    even once the limit is removed). JetStream's max-deliveries advisory now ends the fetch
    at once with one line naming the message's stream sequence."""
    from amgi.servers.nats import _jetstream

    monkeypatch.setattr(_jetstream, "_RECHECK", 60.0, raising=False)  # the advisory, not the look
    durable = fresh("d")
    t = NatsTransport([subject], NatsOptions(servers=URL, durable=durable, fetch_expiry=0.2))
    await t.connect()
    try:
        await t.publish(subject, [], b"nacked", {})
        for delay in (0, 1):  # the second comes back after the edit
            (message,) = await fetch_all(t, 1)
            retry = Retry(message, "no", delay)
            await t.settle(Batch(subject, [message]), Settlement(retry=[retry]))
        await edit_consumer(durable, max_deliver=2)
        with pytest.raises(ConfigurationError) as caught:
            await asyncio.wait_for(fetch_all(t, 1), 3)
    finally:
        await t.close()
    text = str(caught.value)
    assert f"message {message.id} of stream {STREAM!r} after 2 deliveries" in text
    assert "\n" not in text
    assert "max_deliver to -1" in text


async def test_an_existing_consumer_with_a_backoff_is_refused_with_a_fix_the_server_takes(
    subject: str,
) -> None:
    """JetStream's backoff replaces the ack wait of an unacked message (a message still
    being processed, its lease every --ack-wait / 3, came again with its attempt raised)
    and needs max_deliver above its length. Such a consumer was refused for its
    max_deliver, with a fix the server refuses ('max deliver is required to be > length
    of backoff values'). Now the line names the backoff, and its fix is taken."""
    from nats.js import api

    durable = await existing_durable(
        subject, ack_policy=api.AckPolicy.EXPLICIT, max_deliver=5, backoff=[1, 2.5]
    )
    options = NatsOptions(servers=URL, durable=durable, fetch_expiry=0.2)
    t = NatsTransport([subject], options)
    with pytest.raises(ConfigurationError, match=r"has backoff \[1s, 2\.5s\]:") as caught:
        await t.connect()
    assert "\n" not in str(caught.value)
    assert "remove the backoff and set max_deliver to -1" in str(caught.value)
    assert t._client is None, "closed again"
    await edit_consumer(durable, backoff=None, max_deliver=-1)
    t = NatsTransport([subject], options)
    await t.connect()
    await t.close()


@pytest.mark.parametrize(("mode", "subscriptions"), [("jetstream", 2), ("core", 1)])
async def test_a_connection_nats_py_closed_for_good_ends_the_run(
    tmp_path: Path, mode: str, subscriptions: int, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py closes the client for good on a server error it does not know (here the
    server's 'maximum subscriptions exceeded' as the second address subscribes): the run
    went on for ever, each fetch failing on the closed connection, and a stop then exited
    0. Now the run ends with an error."""
    config = f"max_subscriptions: {subscriptions}\n"
    with private_nats(tmp_path / "nats", config=config) as broker:
        url = f"nats://127.0.0.1:{broker.port}"
        await ensure_stream(url, "LIMITED", ["limited.>"])
        options = NatsOptions(servers=url, mode=mode, fetch_expiry=0.2)
        transport = NatsTransport(["limited.a", "limited.b"], options)
        runtime = Runtime(attempts_app([]), transport, RuntimeConfig(lifespan="off"))
        serving = asyncio.create_task(runtime.serve())
        try:
            code = await asyncio.wait_for(asyncio.shield(serving), 8)
        finally:
            runtime.request_stop()
            await asyncio.wait_for(serving, 20)
    assert code != 0
    assert "closed the connection for good" in caplog.text


async def test_core_mode_subscribes_again_after_a_broker_restart(tmp_path: Path) -> None:
    with private_nats(tmp_path / "nats") as broker:
        url = f"nats://127.0.0.1:{broker.port}"
        app = Recorder()
        options = NatsOptions(servers=url, mode="core")
        runtime = Runtime(app, NatsTransport(["signals"], options), RuntimeConfig(lifespan="off"))
        task = asyncio.create_task(runtime.serve())
        try:
            await asyncio.wait_for(runtime.started.wait(), 10)
            await asyncio.to_thread(broker.restart)
            sender = NatsTransport([], options)
            await sender.connect()
            try:
                async with asyncio.timeout(20):
                    # Core NATS keeps nothing: publish until the server listens again.
                    while not app.acked:
                        await sender.publish("signals", [], b"after", {})
                        await asyncio.sleep(0.2)
            finally:
                await sender.close()
        finally:
            runtime.request_stop()
            assert await task == 0
        assert app.acked[0].payload == b"after"


async def test_send_to_a_subject_no_stream_captures_raises_the_send_error() -> None:
    t = NatsTransport([], NatsOptions(servers=URL, publish_timeout=2))
    await t.connect()
    try:
        with pytest.raises(NatsSendError, match="no JetStream stream captures"):
            await t.publish(f"nowhere.{fresh('x')}", [], b"x", {})
    finally:
        await t.close()


@pytest.mark.parametrize("mode", ["jetstream", "core"])
async def test_a_send_over_the_max_payload_with_its_headers_fails_alone(
    subject: str, mode: str
) -> None:
    """nats-py checks the payload alone against the server's max_payload, the server the
    payload and headers: a send under it with headers over it made the server close the
    connection ('Maximum Payload Violation'), and nats-py closed the client for good.
    Now that send fails alone, before anything is written."""
    t = NatsTransport([], NatsOptions(servers=URL, mode=mode))
    await t.connect()
    try:
        max_payload = t._client.max_payload
        with pytest.raises(NatsSendError, match="over the server's max_payload"):
            await t.publish(subject, [(b"h", b"v" * 200)], b"x" * (max_payload - 100), {})
        await t.publish(subject, [(b"h", b"v")], b"still connected", {})
    finally:
        await t.close()


@pytest.mark.parametrize("mode", ["core", "jetstream"])
@pytest.mark.parametrize(
    ("suffix", "problem"),
    [
        ("..x", "empty token"),
        (".", "empty token"),
        (".*", "wildcards"),
        (".>", "wildcards"),
        (".a b", "whitespace"),
    ],
)
async def test_a_send_to_what_is_no_subject_fails_alone(
    subject: str, mode: str, suffix: str, problem: str
) -> None:
    """Core NATS took a send to ``a..b`` and dropped it without a word (the send
    returned as if it had gone out), and a wildcard subject went out as a literal."""
    t = NatsTransport([], NatsOptions(servers=URL, mode=mode, publish_timeout=2))  # type: ignore[arg-type]
    await t.connect()
    try:
        with pytest.raises(NatsSendError, match=f"not a subject: .*{problem}"):
            await t.publish(subject + suffix, [], b"bad", {})
        await t.publish(subject, [], b"good", {})
    finally:
        await t.close()
    if mode == "jetstream":
        ((_, payload, _),) = await read_subject(subject, 1, 5)
        assert payload == b"good"


@pytest.mark.parametrize("address", [".a", "a.", "a..b", "a.>.b", "a b", ""])
def test_a_consumed_address_that_is_no_subject_is_refused(address: str) -> None:
    with pytest.raises(ConfigurationError, match="is not a subject: "):
        NatsTransport([address], NatsOptions(servers=URL)).check()


@pytest.mark.parametrize(
    "msg_id", ["a\r\nNats-Expected-Stream: other", " padded", "", "tab\there", 5, {"a": 1}]
)
async def test_a_msg_id_no_header_can_carry_fails_that_send_alone(
    subject: str, msg_id: Any
) -> None:
    """A line break would end the header early (the rest read as a header of its own),
    outer whitespace would not survive, and a non-str was once sent as its str()."""
    t = NatsTransport([], NatsOptions(servers=URL, publish_timeout=2))
    await t.connect()
    try:
        with pytest.raises(NatsSendError, match=r"nats\.msgId must be non-empty text without"):
            await t.publish(subject, [], b"bad", {"nats": {"msgId": msg_id}})
        await t.publish(subject, [], b"good", {"nats": {"msgId": fresh("id")}})
        ((_, payload, _),) = await read_subject(subject, 1, 5)
        assert payload == b"good"
    finally:
        await t.close()


# -- processes ----------------------------------------------------------------------------


def flags(url: str, durable: str, *extra: str) -> list[str]:
    return [
        "--server",
        "nats",
        "--servers",
        url,
        "--durable",
        durable,
        "--fetch-expiry",
        "0.2",
        *extra,
    ]


async def produce(url: str, subject: str, payloads: list[str]) -> None:
    t = NatsTransport([], NatsOptions(servers=url))
    await t.connect()
    try:
        for p in payloads:
            await t.publish(subject, [], p.encode(), {})
    finally:
        await t.close()


async def test_two_processes_share_a_durable_without_duplicates(
    tmp_path: Path, subject: str, processes: list[AmgiProcess]
) -> None:
    durable = fresh("d")
    args = flags(URL, durable, "--batch-size", "10")
    await share_without_duplicates(
        subject, args, tmp_path, processes, lambda ps: produce(URL, subject, ps)
    )
    assert (await consumer_state(STREAM, durable)).num_ack_pending == 0


async def test_broker_restart_mid_stream_loses_nothing(
    tmp_path: Path, processes: list[AmgiProcess]
) -> None:
    with private_nats(tmp_path / "nats") as broker:
        url = f"nats://127.0.0.1:{broker.port}"
        await ensure_stream(url, "RESTART", ["restart.>"], on_disk=True)
        subject = "restart.orders"
        expected = [f"r{i}" for i in range(120)]
        await produce(url, subject, expected)
        server = AmgiProcess(
            subject,
            flags(url, "restart", "--batch-size", "5", "--ack-wait", "2"),
            tmp_path,
            0.02,
        )
        processes.append(server)
        await asyncio.to_thread(until, lambda: len(server.acked()) >= 20, 30, "a start", server)
        await asyncio.to_thread(broker.restart)
        assert len(set(server.acked())) < len(expected), "the restart came too late to test"
        await asyncio.to_thread(
            until, lambda: set(server.acked()) >= set(expected), 60, "every message", server
        )
        assert server.stop() == 0, server.output()
        info = await consumer_state("RESTART", "restart", url)
        assert info.num_ack_pending == 0
        assert info.num_pending == 0


async def test_the_crash_ledger_names_servers_durable_and_the_stream_of_each_subject(
    subject: str,
) -> None:
    """JetStream ids (stream sequences) are stable, so the crash ledger is kept, in a
    namespace that holds no password and names each subject's stream as found: a
    wildcard may be captured by another stream in the next run. Core ids are not."""
    secret = NatsOptions(servers=f"nats://app:s3cret@127.0.0.1:1, {URL}", durable="d")
    unconnected = NatsTransport([subject], secret).ledger_namespace()
    assert "s3cret" not in unconnected
    assert unconnected == f"nats nats://app:{MASK}@127.0.0.1:1,{URL} user= durable=d {subject}@"
    options = NatsOptions(servers=URL, durable=fresh("d"), fetch_expiry=0.2)
    t = NatsTransport([subject], options)
    assert t.stable_ids
    assert not NatsTransport([subject], replace(options, mode="core")).stable_ids
    await t.connect()
    try:
        namespace = t.ledger_namespace()
    finally:
        await t.close()
    assert namespace == f"nats {URL} user= durable={options.durable} {subject}@{STREAM}"


def test_a_message_that_kills_the_process_is_the_only_dead_letter(
    tmp_path: Path, subject: str
) -> None:
    """JetStream counts a delivery of every message a killed process had pulled (those
    the app acked, the ack never sent, and those it never had): without the crash ledger,
    three kills dead-lettered the killer and 9 innocents of 19, two of them acked. The
    stream sequence survives a redelivery, so the ledger convicts the killer alone."""
    payloads = ["kill" if i == 7 else f"m{i:02d}" for i in range(20)]
    asyncio.run(produce(URL, subject, payloads))
    loop = CrashLoop(
        tmp_path, subject, *flags(URL, fresh("d"), "--batch-size", "5", "--ack-wait", "1")
    )

    def dead_lettered() -> int:
        logs = tmp_path.glob("run-*.err")
        return sum(p.read_text().count(" dead-lettered after ") for p in logs)

    kills = loop.run(lambda: len(set(loop.acked())) + dead_lettered() >= len(payloads))
    dead = asyncio.run(stored(f"{subject}.dlq"))
    assert (dead, set(loop.acked())) == ([b"kill"], set(payloads) - {"kill"}), f"{loop}"
    assert kills == loop.max_attempts, f"{loop}"


# -- bad input ----------------------------------------------------------------------------


def run_startup_app(tmp_path: Path, address: str, *extra: str) -> tuple[str, bool]:
    (tmp_path / "startup.py").write_text(STARTUP_APP)
    started = tmp_path / "started"
    result = amgi(
        "run", "startup:app", address, "--server", "nats", *extra,
        cwd=tmp_path, env={"STARTED": str(started)},
    )  # fmt: skip
    return one_line_error(result), started.exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--batch-size", "0"], "--batch-size must be 1 to 100000 (got batch_size=0)"),
        (["--ack-wait", "inf"], "--ack-wait must be a finite number"),
        (["--durable", "a.b"], "--durable must be a name without"),
        (["--mode", "core", "--queue", ""], "--queue must be a name without whitespace"),
        (["--password", "secret"], "--password needs --user (got password=*****)"),
    ],
)
def test_bad_options_fail_before_the_apps_startup(
    tmp_path: Path, extra: list[str], expected: str
) -> None:
    line, started = run_startup_app(tmp_path, "amgi-test.x", "--servers", URL, *extra)
    assert expected in line
    assert not started


@pytest.mark.parametrize(
    ("field", "value"),
    [("durable", "a/b"), ("durable", "a\\b"), ("durable", "a\tb"), ("stream", "A/B")],
)
def test_a_durable_or_stream_name_nats_cannot_take_is_refused(field: str, value: str) -> None:
    """JetStream names take no ``/``, ``\\`` or whitespace either: such a name passed the
    check and failed the connect as "unexpected ValueError: nats: invalid consumer name"."""
    options = NatsOptions(servers=URL, **{field: value})
    with pytest.raises(ConfigurationError, match=f"--{field} must be a name without"):
        NatsTransport(["amgi-test.x"], options).check()


@pytest.mark.parametrize("queue", ["", "a b", "a\tb"])
def test_a_queue_group_that_is_no_name_is_refused(queue: str) -> None:
    """``--queue ""`` subscribed without a queue group: every process got every message
    (each processed it); one with whitespace failed the connect with nats-py's "invalid
    subject". Both are now a bad option, found before the lifespan."""
    transport = NatsTransport(["amgi-test.x"], NatsOptions(servers=URL, mode="core", queue=queue))
    with pytest.raises(ConfigurationError, match="--queue must be a name without"):
        transport.check()


@pytest.mark.parametrize("dead_letter_subject", ["{subject}..dlq", "dlq.", "{subject}.*", "a b"])
def test_a_dead_letter_subject_that_is_no_subject_is_refused(dead_letter_subject: str) -> None:
    """Unchecked, every dead-letter publish to such a subject failed (no ack: -NAKed and
    back after the ack wait, for ever), or one with a wildcard was stored under it."""
    options = NatsOptions(servers=URL, dead_letter_subject=dead_letter_subject)
    with pytest.raises(ConfigurationError, match="--dead-letter-subject is not a subject"):
        NatsTransport(["amgi-test.x"], options).check()


def test_a_wildcard_address_whose_dead_letters_it_would_consume_is_refused(
    tmp_path: Path,
) -> None:
    line, started = run_startup_app(tmp_path, "amgi-test.>", "--servers", URL)
    assert "set --dead-letter-subject" in line
    assert not started


@pytest.mark.parametrize(
    ("address", "dead_letter_subject"),
    [("amgi-test.x.*", "amgi-test.x.dead"), ("amgi-test.>", "amgi-test.dlq.{subject}")],
)
def test_an_address_that_would_consume_its_chosen_dead_letter_subject_is_refused(
    address: str, dead_letter_subject: str
) -> None:
    """Only the default dead-letter subject was checked: a chosen one the address
    matches took each dead letter in again, to fail and be dead-lettered again, for ever.
    (``check`` is what ``amgi run`` calls before the lifespan, as the test above shows.)"""
    options = NatsOptions(servers=URL, dead_letter_subject=dead_letter_subject)
    with pytest.raises(ConfigurationError, match="would match it again"):
        NatsTransport([address], options).check()
    NatsTransport(["amgi-test.x.*"], NatsOptions(dead_letter_subject="{subject}.dlq")).check()


def test_unreachable_server_wrong_credentials_and_missing_streams(tmp_path: Path) -> None:
    line, started = run_startup_app(tmp_path, "s", "--servers", f"nats://127.0.0.1:{free_port()}")
    assert "nats: cannot connect to nats://127.0.0.1:" in line
    assert not started  # found before the application's lifespan startup
    line, started = run_startup_app(tmp_path, "amgi-test.x", "--servers", URL, "--stream", "NOPE")
    assert "nats: stream 'NOPE' does not exist" in line
    assert not started
    line, started = run_startup_app(tmp_path, f"nowhere.{fresh('x')}", "--servers", URL)
    assert "no JetStream stream captures subject" in line
    with private_nats(tmp_path / "nats", user="app", password="right") as broker:
        server = f"nats://127.0.0.1:{broker.port}"
        line, started = run_startup_app(tmp_path, "s", "--servers", server, "--user", "app",
                                  "--password", "wrong")  # fmt: skip
        assert "refused the credentials" in line
        assert not started
        assert "wrong" not in line


async def test_tls_against_a_server_that_does_not_require_it_sends_no_credentials() -> None:
    """A plaintext server (or anything between) must never see CONNECT when TLS is on."""
    received = bytearray()
    connections: list[asyncio.StreamWriter] = []

    async def plaintext_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        writer.write(b'INFO {"server_id":"fake","version":"2.9.0","max_payload":1048576}\r\n')
        await writer.drain()
        while chunk := await reader.read(4096):
            received.extend(chunk)
        writer.close()

    server = await asyncio.start_server(plaintext_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    marker = "pw-marker-7f3a"
    options = NatsOptions(
        servers=f"nats://127.0.0.1:{port}", user="u", password=marker, tls=True, mode="core"
    )
    transport = NatsTransport(["orders"], options)
    try:
        with pytest.raises(BrokerUnavailable, match="refusing to send the credentials"):
            await transport.connect()
    finally:
        await transport.close()
        server.close()
        for writer in connections:  # 3.12+: wait_closed waits for every connection
            writer.close()
        await asyncio.wait_for(server.wait_closed(), 10)
    assert marker.encode() not in received
    assert b"CONNECT" not in received


# -- pull requests are bounded ------------------------------------------------------------


async def pull_requests_in(seconds: float, transport: NatsTransport) -> int:
    """How many pull requests ``transport`` makes in ``seconds`` of an idle fetch (to its
    own consumers only: other test runs may share the broker)."""
    import nats

    watcher = await nats.connect(URL)
    asked = 0
    durable = transport.config.durable

    async def count(msg: Any) -> None:
        nonlocal asked
        if msg.subject.rsplit(".", 1)[-1].startswith(durable):
            asked += 1

    try:
        await watcher.subscribe("$JS.API.CONSUMER.MSG.NEXT.>", cb=count)
        await watcher.flush()
        await transport.connect()
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(seconds):
                    await transport.fetch()
        finally:
            await transport.close()
        await watcher.flush()
    finally:
        await watcher.close()
    return asked


async def test_a_short_fetch_expiry_asks_no_faster_than_it_says(subject: str) -> None:
    """The pull request's expiry was ``--fetch-expiry`` less 10 ms, at least 1 ns: an
    expiry of 10 ms or less asked JetStream thousands of times a second while idle."""
    options = NatsOptions(servers=URL, durable=fresh("d"), fetch_expiry=0.01)
    asked = await pull_requests_in(1.0, NatsTransport([subject], options))
    assert 10 <= asked <= 300, asked  # one per 10 ms is 100


async def consumer_with_limits(subject: str, **limits: int) -> str:
    """A durable on ``subject`` with request ``limits`` nats-py's config does not carry
    (``max_batch``, ``max_expires`` in nanoseconds): its name."""
    import json

    import nats

    durable = fresh("d")
    admin = await nats.connect(URL)
    try:
        config = {"durable_name": durable, "ack_policy": "explicit", "filter_subject": subject}
        request = {"stream_name": STREAM, "config": {**config, **limits}}
        await admin.request(
            f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.{durable}", json.dumps(request).encode()
        )
    finally:
        await admin.close()
    return durable


@pytest.mark.parametrize(
    ("limits", "refused", "fix"),
    [
        ({"max_batch": 10}, "Exceeded MaxRequestBatch of 10", "--batch-size"),
        ({"max_expires": 100_000_000}, "Exceeded MaxRequestExpires", "--fetch-expiry"),
    ],
)
async def test_a_pull_request_the_consumer_refuses_for_good_ends_the_run_with_one_line(
    subject: str, limits: dict[str, int], refused: str, fix: str
) -> None:
    """A consumer (used as it is) whose max_batch is below ``--batch-size``, or whose
    max_expires is below ``--fetch-expiry``, refuses every pull request with 409: the run
    asked again every expiry, for ever, consuming nothing, with a warning each time.
    Now the fetch ends the run with one line naming the limit and the option to lower."""
    durable = await consumer_with_limits(subject, **limits)
    options = NatsOptions(servers=URL, durable=durable, batch_size=50, fetch_expiry=0.5)
    t = NatsTransport([subject], options)
    await t.connect()
    try:
        with pytest.raises(ConfigurationError) as caught:
            async with asyncio.timeout(10):
                await t.fetch()
    finally:
        await t.close()
    text = str(caught.value)
    assert refused in text
    assert durable in text
    assert fix in text
    assert "\n" not in text
