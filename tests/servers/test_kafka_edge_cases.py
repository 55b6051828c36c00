"""Kafka edge cases against the real test broker: application headers named like the
server's own, retry and dead-letter topics of ``^regex`` addresses, revokes with a broker
that refuses a dead letter or answers commits late."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.kafka import KafkaOptions, KafkaTransport
from tests.servers.kafka_helpers import (
    BOOTSTRAP,
    KafkaFront,
    create_topic,
    ensure_broker,
    fresh,
    fronted_private_broker,
    options,
    produce,
    read_all,
    run_until,
    transport,
    wait_committed,
)

pytestmark = pytest.mark.timeout(60)

# Every name the Kafka server or the kit gives a meaning to, and two plain ones.
LOOKALIKES = [
    (b"trace", b"t1"),
    (b"amgi-original-address", b"somewhere-else"),
    (b"amgi-retry-due", b"99999999999999"),
    (b"amgi-retry-group", b"not-this-group"),
    (b"amgi-dead-letter-reason", b"app's own reason"),
    (b"amgi-b64", b"not.packed"),
    (b"trace", b"t2"),
]


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


async def test_headers_named_like_the_servers_own_arrive_as_sent() -> None:
    """Through a retry copy and into the dead letters too, and another client's raw
    ones on an ordinary topic are headers, never retry metadata."""
    source = create_topic(fresh("hdr-in"), partitions=1)
    topic = create_topic(fresh("hdr"), partitions=1)
    produce(source, [(None, b"go", [])])
    # Another client's record on an ordinary topic with a raw `amgi-retry-due` far ahead
    # and another group's `amgi-retry-group`: headers like any other, not retry metadata.
    produce(topic, [(None, b"raw", [(k.decode(), v) for k, v in LOOKALIKES[:4]])])
    received: list[tuple[bytes, int, list[tuple[bytes, bytes]]]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        more = True
        while more:
            event = await receive()
            more = event.get("more_messages", False)
            if scope["address"] == source:
                await send(
                    {
                        "type": "message.send",
                        "address": topic,
                        "headers": LOOKALIKES,
                        "payload": b"sent",
                    }
                )
                await send({"type": "message.ack", "id": event["id"]})
                continue
            assert scope["address"] == topic
            attempt = event["bindings"]["amgi"]["attempt"]
            received.append((event["payload"], attempt, list(event["headers"])))
            if event["payload"] == b"sent":
                await send({"type": "message.nack", "id": event["id"], "message": "no"})
            else:
                await send({"type": "message.ack", "id": event["id"]})

    kafka = transport([source, topic])
    await run_until(
        app,
        kafka,
        lambda: sum(p == b"sent" for p, _, _ in received) >= 2,
        max_attempts=2,
        retry_delay=0.1,
        retry_delay_max=0.2,
    )
    raw = [(p, a, h) for p, a, h in received if p == b"raw"]
    assert raw == [(b"raw", 1, LOOKALIKES[:4])]
    sent = [(a, h) for p, a, h in received if p == b"sent"]
    assert sent == [(1, LOOKALIKES), (2, LOOKALIKES)]
    # The dead letter keeps them too, and its reason and address are the server's.
    wait_committed(kafka.config.group_id, f"{topic}.retry")
    reader = transport([topic])
    await reader.connect()
    try:
        [letter] = await reader.list_dead_letters(topic, 10)
    finally:
        await reader.close()
    assert (letter.address, letter.reason, letter.attempts) == (topic, "no", 2)
    assert letter.headers == LOOKALIKES
    assert len(read_all(f"{topic}.dlq", 1)) == 1


def partitions_of(topic: str) -> int:
    metadata = AdminClient({"bootstrap.servers": BOOTSTRAP}).list_topics(timeout=10)
    found = metadata.topics.get(topic)
    return 0 if found is None or found.error is not None else len(found.partitions)


async def test_a_pattern_address_gets_retry_and_dead_letter_topics_for_matching_topics() -> None:
    """Made when a matching topic is first assigned, with its partitions, and the retry
    copies arrive at once (the pattern subscription took in the retry topic only at
    librdkafka's next metadata refresh, 5 minutes on: the copies were stuck till then)."""
    stem = fresh("rx")
    topic = create_topic(f"{stem}-a", partitions=2)
    produce(topic, [(b"k", b"bad", [])])
    attempts: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        event = await receive()
        assert scope["address"] == topic
        attempts.append(event["bindings"]["amgi"]["attempt"])
        await send({"type": "message.nack", "id": event["id"], "message": "no"})

    kafka = transport([f"^{stem}-.*"])
    await run_until(
        app, kafka, lambda: len(attempts) >= 2, timeout=15, max_attempts=2, retry_delay=0.1
    )
    assert attempts == [1, 2]
    [dead] = read_all(f"{topic}.dlq", 1)
    assert dead.value() == b"bad"
    assert (partitions_of(f"{topic}.retry"), partitions_of(f"{topic}.dlq")) == (2, 2)


async def test_a_revoke_does_not_wait_for_a_dead_letter_the_broker_refuses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The refused dead letter is tried again in the background and nothing past its
    record is committed, so its records go to the next owner anyway: the revoke hands
    the partition over at once, not after ``--rebalance-timeout`` (20 s here)."""
    caplog.set_level(logging.ERROR, "amgi.servers.kit")
    topic = create_topic(fresh("stuck"), partitions=1)
    produce(topic, [(b"k", b"x" * 3000, [])])
    group = fresh("group")

    async def refusing(scope: Any, receive: Any, send: Any) -> None:
        event = await receive()
        await send({"type": "message.nack", "id": event["id"], "message": "no"})

    first = KafkaTransport(
        [topic],
        KafkaOptions(
            **options(group_id=group, rebalance_timeout=20.0, config=["message.max.bytes=1000"])
        ),
    )
    # Which member gets the one partition after the rebalance is the assignor's choice:
    # the first member's revoke is what is timed.
    revokes: list[float] = []
    revoke = first._on_revoke

    def timed_revoke(consumer: Any, partitions: list[Any]) -> None:
        started = time.monotonic()
        revoke(consumer, partitions)
        revokes.append(time.monotonic() - started)

    first._on_revoke = timed_revoke  # type: ignore[method-assign]
    runtime = Runtime(refusing, first, RuntimeConfig(lifespan="off", max_attempts=1))
    server = asyncio.create_task(runtime.serve())
    try:
        deadline = time.monotonic() + 20
        while not any("tried again in" in r.getMessage() for r in caplog.records):
            assert not server.done(), server.result()
            assert time.monotonic() < deadline, "the dead letter was not refused"
            await asyncio.sleep(0.05)

        async def taking(scope: Any, receive: Any, send: Any) -> None:
            event = await receive()
            await send({"type": "message.ack", "id": event["id"]})

        second = transport([topic], group_id=group)
        await run_until(taking, second, lambda: bool(revokes), timeout=40)
        assert revokes[0] < 10  # not the 20 s --rebalance-timeout
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(server, 30) == 0
    assert read_all(f"{topic}.dlq", 1, timeout=1) == []


class _SlowListing:
    """The real consumer, with a ``list_topics`` that takes 1 s and a record of when
    calls start and end (``close`` included)."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.calls: list[str] = []
        self.listing = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def list_topics(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("list_topics")
        self.listing.set()
        time.sleep(1.0)
        try:
            return self._real.list_topics(*args, **kwargs)
        finally:
            self.calls.append("list_topics done")

    def close(self) -> None:
        self.calls.append("close")
        self._real.close()


async def test_a_close_waits_for_the_topic_lookup_of_a_new_matching_topic() -> None:
    """A topic a pattern address matches, first assigned: its retry and dead-letter topics
    are made, then the consumer asks for the topics (``list_topics``, in a thread). A
    close meanwhile cancelled the task, not the call, and closed the consumer while the
    call still ran in another thread (the client's handle freed under it). Now the
    consumer's close waits for the call."""
    stem = fresh("rxclose")
    create_topic(f"{stem}-a", partitions=1)
    kafka = transport([f"^{stem}-.*"])
    await kafka.connect()
    slow = _SlowListing(kafka._consumer)
    kafka._consumer = slow
    fetching = asyncio.ensure_future(kafka.fetch())
    try:
        await asyncio.wait_for(asyncio.to_thread(slow.listing.wait, 20), 25)
    finally:
        fetching.cancel()
        await asyncio.gather(fetching, return_exceptions=True)
        await kafka.close()
    assert slow.calls == ["list_topics", "list_topics done", "close"]


_OFFSET_COMMIT = 8
"""The API key of Kafka's OffsetCommit request."""


def _member(bootstrap: str, group: str, topic: str, leave: threading.Event) -> None:
    """Another member of ``group``: joins, takes its share, commits nothing, leaves."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "session.timeout.ms": 1000,
            "heartbeat.interval.ms": 200,
        }
    )
    try:
        consumer.subscribe([topic])
        while not leave.is_set():
            consumer.poll(0.05)
    finally:
        consumer.close()


async def test_a_revoke_on_the_event_loop_does_not_wait_for_its_commit(tmp_path: Path) -> None:
    """A busy application's records are taken on the event loop, so a rebalance's revoke
    may run there: it waited for its commit's answer, and a coordinator that stopped
    answering commits froze the loop (183 s seen: every batch stalled, SIGTERM unheeded).
    Here the broker answers commits only 3 s late: the loop must not wait for it, and the
    commit still goes out."""
    with fronted_private_broker(tmp_path) as (front, bootstrap):
        await _revoke_on_the_loop(front, bootstrap)


async def _revoke_on_the_loop(front: KafkaFront, bootstrap: str) -> None:
    topic = create_topic(fresh("held"), partitions=2, bootstrap=bootstrap)
    produce(topic, ((b"k%d" % (i % 8), b"%d" % i, []) for i in range(5000)), bootstrap=bootstrap)
    group = fresh("group")
    kafka = transport([topic], bootstrap_servers=bootstrap, group_id=group, max_batch_size=10)
    loop_thread = threading.get_ident()
    on_loop: list[float] = []  # how long each revoke run by the event loop took
    revoke = kafka._on_revoke

    def held_revoke(consumer: Any, partitions: list[Any]) -> None:
        if threading.get_ident() != loop_thread:
            return revoke(consumer, partitions)
        front.delays[_OFFSET_COMMIT] = 3.0  # this revoke's commit on
        started = time.monotonic()
        revoke(consumer, partitions)
        on_loop.append(time.monotonic() - started)

    kafka._on_revoke = held_revoke  # type: ignore[method-assign]
    seen: list[str] = []

    async def busy(scope: Any, receive: Any, send: Any) -> None:  # the loop drives: see _poll
        end = time.perf_counter() + 0.005
        while time.perf_counter() < end:
            pass
        more = True
        while more:
            event = await receive()
            more = event["more_messages"]
            seen.append(event["id"])
            await send({"type": "message.ack", "id": event["id"]})

    stalls: list[float] = []

    async def watch() -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.01)
            stalls.append(time.monotonic() - started - 0.01)

    watching = asyncio.create_task(watch())
    runtime = Runtime(busy, kafka, RuntimeConfig(lifespan="off", crash_ledger=""))
    server = asyncio.create_task(runtime.serve())
    leave = threading.Event()
    other: asyncio.Future[None] | None = None
    try:
        deadline = time.monotonic() + 40
        while not on_loop:  # the other member joins, or leaves: each time a revoke
            assert not server.done(), server.result()
            assert time.monotonic() < deadline, "no revoke ran on the event loop"
            if len(seen) >= 100 and other is None:
                leave.clear()
                other = asyncio.ensure_future(
                    asyncio.to_thread(_member, bootstrap, group, topic, leave)
                )
                joined = time.monotonic()
            elif other is not None and time.monotonic() - joined > 3:
                leave.set()
                await other
                other = None
            await asyncio.sleep(0.05)
        while not front.held[_OFFSET_COMMIT]:  # the revoke's commit went out
            assert time.monotonic() < deadline, "the revoke's commit was never sent"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # the watch measures the last stall
        assert on_loop[0] < 1.0, on_loop
        assert max(stalls) < 2.0, max(stalls)
    finally:
        front.delays.clear()
        leave.set()
        if other is not None:
            await other
        runtime.request_stop()
        assert await asyncio.wait_for(server, 30) == 0
        watching.cancel()


async def test_a_retry_copy_stamped_by_a_clock_ahead_waits_no_longer_than_its_delay() -> None:
    """A copy's due time comes from the clock of the server that made it. One made on a
    host whose clock ran an hour ahead paused the retry partition, and every copy behind
    it (one due now, here), for that hour. It now waits at most the delay it was given:
    its due time less its own timestamp, both from that clock."""
    topic = create_topic(fresh("skew"), partitions=1)
    kafka = transport([topic])
    retry = create_topic(kafka.config.retry_topic.replace("{topic}", topic), partitions=1)
    group = kafka.config.group_id.encode()
    now = int(time.time() * 1000)
    ahead = now + 3_600_000
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    for payload, stamp, due in ((b"ahead", ahead, ahead + 300), (b"due", now, now)):
        headers = [
            ("amgi-attempt", b"2"),
            ("amgi-original-address", topic.encode()),
            ("amgi-retry-group", group),
            ("amgi-retry-due", str(due).encode()),
        ]
        producer.produce(retry, value=payload, headers=headers, timestamp=stamp)
    assert producer.flush(10) == 0
    received: list[tuple[bytes, int]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        more = True
        while more:
            event = await receive()
            more = event.get("more_messages", False)
            received.append((event["payload"], event["bindings"]["amgi"]["attempt"]))
            await send({"type": "message.ack", "id": event["id"]})

    await run_until(app, kafka, lambda: len(received) >= 2, timeout=20)
    assert received == [(b"ahead", 2), (b"due", 2)]
