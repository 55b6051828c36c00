"""Kafka failure paths of retries and dead letters, against the real test broker."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.kafka import KafkaOptions, KafkaTransport
from tests.apps import attempts_app
from tests.servers.crash_loop import CrashLoop
from tests.servers.kafka_helpers import (
    BOOTSTRAP,
    committed,
    create_topic,
    ensure_broker,
    fresh,
    fronted_private_broker,
    options,
    produce,
    read_all,
    run_until,
)

pytestmark = pytest.mark.timeout(90)

_PRODUCE = 0
"""The API key of a Produce request."""


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


async def test_a_copy_the_broker_refuses_backs_off_and_copies_batch_mates_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A nacked record too large for the producer: no hot loop, batch-mates copied once.

    Its retry copy and its dead letter are both refused (over ``message.max.bytes``), so
    it stays uncommitted and is tried again with a doubling delay, loudly, while the
    partition's later records go on; the record nacked beside it is copied to the retry
    topic exactly once and retried from there.
    """
    caplog.set_level(logging.ERROR, "amgi.servers.kit")
    topic = create_topic(fresh("big"), partitions=1)
    produce(topic, [(b"k", b"small", []), (b"k", b"x" * 3000, []), (b"k", b"ok", [])])
    calls: dict[bytes, list[int]] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        more = True
        while more:
            event = await receive()
            more = event.get("more_messages", False)
            payload = event["payload"][:5]
            calls.setdefault(payload, []).append(event["bindings"]["amgi"]["attempt"])
            if payload in (b"ok", b"later") or event["bindings"]["amgi"]["attempt"] > 1:
                await send({"type": "message.ack", "id": event["id"]})
            else:
                await send({"type": "message.nack", "id": event["id"], "message": "no"})

    kafka = KafkaTransport([topic], KafkaOptions(**options(config=["message.max.bytes=1000"])))
    runtime = Runtime(
        app,
        kafka,
        RuntimeConfig(lifespan="off", max_attempts=3, retry_delay=0.1, shutdown_timeout=1),
    )
    server = asyncio.create_task(runtime.serve())
    deadline = time.monotonic() + 30
    while not _refusals(caplog):
        assert not server.done(), server.result()
        assert time.monotonic() < deadline, (calls, _refusals(caplog))
        await asyncio.sleep(0.05)
    produce(topic, [(b"k", b"later", [])])  # the partition goes on meanwhile
    while not (calls.get(b"small") == [1, 2] and b"later" in calls and len(_refusals(caplog)) >= 3):
        assert not server.done(), server.result()
        assert time.monotonic() < deadline, (calls, _refusals(caplog))
        await asyncio.sleep(0.05)
    runtime.request_stop()
    assert await asyncio.wait_for(server, 60) == 0

    assert calls[b"x" * 5] == [1]  # delivered once, never again while it waits
    assert calls[b"small"] == [1, 2]
    assert calls[b"ok"] == [1]
    assert calls[b"later"] == [1]
    retried = read_all(f"{topic}.retry", 5, timeout=3)
    assert [r.value() for r in retried] == [b"small"]  # copied once, not on every try
    assert not read_all(f"{topic}.dlq", 1, timeout=2)
    # Nothing committed past the record that could not be moved: it is not lost.
    assert committed(kafka.config.group_id, topic).get(0, 0) <= 1
    # Tried again after 0.5 s, 1 s, 2 s ...: no hot loop.
    assert len(_refusals(caplog)) < 8


async def test_with_acks_0_a_dead_letter_is_on_the_broker_before_its_record_is_committed(
    tmp_path: Path,
) -> None:
    """``--acks 0`` holds for the application's sends only: a producer asking for no
    acknowledgement counts a record stored once it is written to the socket, so a dead
    letter the broker never took had its record committed (lost). Here the broker drops
    every produce request with its connection: nothing is committed until the dead letter
    is confirmed, after the broker takes produce requests again."""
    with fronted_private_broker(tmp_path) as (front, bootstrap):
        topic = create_topic(fresh("acks0"), partitions=1, bootstrap=bootstrap)
        produce(topic, [(None, b"poison", [])], bootstrap=bootstrap)
        front.cuts[_PRODUCE] = b""
        seen: list[bytes] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            event = await receive()
            seen.append(event["payload"])
            await send({"type": "message.nack", "id": event["id"], "message": "bad"})

        group = fresh("group")
        kafka = KafkaTransport(
            [topic],
            KafkaOptions(
                **options(
                    bootstrap_servers=bootstrap,
                    group_id=group,
                    acks="0",
                    enable_idempotence=False,
                )
            ),
        )
        config = RuntimeConfig(lifespan="off", max_attempts=1, shutdown_timeout=1)
        runtime = Runtime(app, kafka, config)
        server = asyncio.create_task(runtime.serve())
        try:
            deadline = time.monotonic() + 30
            while not (seen and front.dropped[_PRODUCE]):
                assert not server.done(), server.result()
                assert time.monotonic() < deadline, (seen, front.dropped)
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # a commit would have gone out by now
            assert committed(group, topic, bootstrap).get(0, -1) < 1
            front.cuts.clear()
            while committed(group, topic, bootstrap).get(0, -1) < 1:
                assert not server.done(), server.result()
                assert time.monotonic() < deadline, "the record was never committed"
                await asyncio.sleep(0.1)
        finally:
            runtime.request_stop()
            assert await asyncio.wait_for(server, 30) == 0
        dead = read_all(f"{topic}.dlq", 1, timeout=10, bootstrap=bootstrap)
        assert [d.value() for d in dead] == [b"poison"]
        assert seen == [b"poison"]


async def test_a_retry_copy_the_broker_cannot_take_for_now_is_not_dead_lettered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A retry copy that timed out (the broker away for longer than
    ``--delivery-timeout-ms``) had its record dead-lettered at once, with attempts left:
    the dead letter, sent next, was taken as soon as the broker was back. Here every
    produce request for the retry topic is dropped with its connection for a while: the
    record stays uncommitted, its retry is tried again, and it is retried once the
    broker takes the copy."""
    caplog.set_level(logging.WARNING)
    with fronted_private_broker(tmp_path) as (front, bootstrap):
        topic = create_topic(fresh("away"), partitions=1, bootstrap=bootstrap)
        produce(topic, [(None, b"r", [])], bootstrap=bootstrap)
        front.cuts[_PRODUCE] = f"{topic}.retry".encode()
        attempts: list[int] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            event = await receive()
            attempts.append(event["bindings"]["amgi"]["attempt"])
            kind = "message.ack" if attempts[-1] > 1 else "message.nack"
            await send({"type": kind, "id": event["id"], "message": "once"})

        kafka = KafkaTransport(
            [topic],
            KafkaOptions(
                **options(
                    bootstrap_servers=bootstrap,
                    delivery_timeout_ms=1000,
                    # The test broker fences an idempotent producer that bumps its
                    # epoch after a timeout, as librdkafka then does.
                    enable_idempotence=False,
                    config=["reconnect.backoff.max.ms=100"],
                )
            ),
        )
        deadline = time.monotonic() + 40

        async def away_then_back() -> None:
            while "its retry could not be published" not in caplog.text:
                assert time.monotonic() < deadline, attempts
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)  # a dead letter sent next is taken meanwhile
            assert not read_all(f"{topic}.dlq", 1, timeout=1, bootstrap=bootstrap)
            front.cuts.clear()

        outage = asyncio.create_task(away_then_back())

        def done() -> bool:
            if outage.done():
                outage.result()  # its assertion, should it fail
            assert "dead-lettering it" not in caplog.text, attempts
            return attempts == [1, 2]

        try:
            await run_until(app, kafka, done, max_attempts=3, retry_delay=0.1)
        finally:
            outage.cancel()
        assert front.dropped[_PRODUCE] >= 1
        assert not read_all(f"{topic}.dlq", 1, timeout=1, bootstrap=bootstrap)


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "tried again in" in r.getMessage()]


def test_a_record_that_kills_the_process_is_the_only_dead_letter(tmp_path: Path) -> None:
    """Kafka counts no deliveries: the crash ledger (stable ids) bounds the crash loop."""
    topic = create_topic(fresh("killer"), partitions=1)
    payloads = [b"kill" if i == 4 else b"m%02d" % i for i in range(20)]
    produce(topic, [(None, p, []) for p in payloads])
    loop = CrashLoop(
        tmp_path, topic, "--server", "kafka", "--bootstrap-servers", BOOTSTRAP,
        "--group-id", fresh("group"), "--session-timeout-ms", "1000",
        "--heartbeat-interval-ms", "200",
    )  # fmt: skip
    innocent = {p.decode() for p in payloads if p != b"kill"}
    dead: list[Any] = []

    def done() -> bool:
        if set(loop.acked()) != innocent:
            return False
        dead.extend(read_assigned(f"{topic}.dlq"))
        return bool(dead)

    kills = loop.run(done)
    assert kills == loop.max_attempts, loop
    assert [d.value() for d in dead] == [b"kill"]
    reason = dict(dead[0].headers())["amgi-dead-letter-reason"]
    assert b"died 3 times" in reason
    assert set(loop.acked()) == innocent


def read_assigned(topic: str) -> list[Any]:
    """The records of partition 0 of ``topic`` on hand now (assigned: no group join)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": fresh("peek")})
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        return [r for r in consumer.consume(10, 1.0) if r.error() is None]
    finally:
        consumer.close()


async def test_a_topic_whose_retry_topic_name_is_invalid_is_refused_at_connect() -> None:
    """A 244-character topic would need a 250-character retry topic, which the broker
    refuses: the server used to subscribe and then consume nothing, silently."""
    from amgi.errors import ConfigurationError

    name = fresh("long")
    topic = create_topic(name + "x" * (244 - len(name)), partitions=1)
    kafka = KafkaTransport([topic], KafkaOptions(**options()))
    try:
        with pytest.raises(ConfigurationError, match="not a valid Kafka topic name"):
            await kafka.connect()
    finally:
        await kafka.close()


async def test_two_groups_on_one_topic_get_only_their_own_retries() -> None:
    """Every consumer group of a topic shares its retry topic (``{topic}.retry``): a
    copy one group made of a record it nacked went to the other group too, which had
    acked that record and got it again as attempt 2 (its failures counted against the
    first group's attempts). A group passes over the other groups' copies and commits
    past them."""
    topic = create_topic(fresh("groups"), partitions=1)
    seen: dict[str, list[int]] = {"billing": [], "shipping": []}

    def app_of(name: str) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            more = True
            while more:
                event = await receive()
                more = event.get("more_messages", False)
                attempt = event["bindings"]["amgi"]["attempt"]
                seen[name].append(attempt)
                if name == "billing" and attempt == 1:
                    await send({"type": "message.nack", "id": event["id"], "message": "later"})
                else:
                    await send({"type": "message.ack", "id": event["id"]})

        return app

    groups = {name: options() for name in seen}
    runtimes = [
        Runtime(
            app_of(name),
            KafkaTransport([topic], KafkaOptions(**groups[name])),
            RuntimeConfig(lifespan="off", crash_ledger="", retry_delay=0.1),
        )
        for name in seen
    ]
    servers = [asyncio.create_task(r.serve()) for r in runtimes]
    try:
        deadline = time.monotonic() + 20
        while not all(r.transport._partitions for r in runtimes):  # both assigned
            assert not any(s.done() for s in servers), [s.result() for s in servers if s.done()]
            assert time.monotonic() < deadline, "never assigned"
            await asyncio.sleep(0.02)
        produce(topic, [(b"k", b"once", [])])
        retry = f"{topic}.retry"
        while seen["billing"] != [1, 2] or committed(groups["shipping"]["group_id"], retry) != {
            0: 1
        }:
            assert len(seen["shipping"]) < 2, seen
            assert time.monotonic() < deadline, (
                seen,
                committed(groups["shipping"]["group_id"], retry),
            )
            await asyncio.sleep(0.05)
    finally:
        for r in runtimes:
            r.request_stop()
        assert await asyncio.wait_for(asyncio.gather(*servers), 30) == [0, 0]
    assert seen == {"billing": [1, 2], "shipping": [1]}
    assert [r.value() for r in read_all(retry, 1)] == [b"once"]


class _ErrorEvent:
    """An error event as ``consume`` returns it among the records."""

    def __init__(self, error: Any) -> None:
        self._error = error

    def error(self) -> Any:
        return self._error


class _ErrorMidway:
    """The real consumer, but the first ``consume`` call that brings records on each
    driver (the consumer thread, the event loop) has an error event in the middle, as
    librdkafka mixes them in (a topic refused, say)."""

    def __init__(self, real: Any, error: Any) -> None:
        self._real = real
        self._error = error
        self.met: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        records: list[Any] = self._real.consume(num_messages, timeout)
        driver = "loop" if threading.current_thread() is threading.main_thread() else "thread"
        if len(records) >= 2 and driver not in self.met:
            self.met.add(driver)
            records.insert(1, _ErrorEvent(self._error))
        return records


class _FailingTake(KafkaTransport):
    """Fault injection around the real client: ``consume`` meets an error event among its
    records (``event``), or the work on a fetched partition fails (``take``: a lookup,
    seek or pause the broker did not answer), once on each driver."""

    how = "event"
    midway: _ErrorMidway | None = None
    met: set[str]

    async def connect(self) -> None:
        from confluent_kafka import KafkaError

        await super().connect()
        self.met = set()
        if self.how == "event":
            error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
            self.midway = _ErrorMidway(self._consumer, error)
            self._consumer = self.midway

    def _make_batch(self, consumer: Any, key: Any, records: list[Any]) -> Any:
        from confluent_kafka import KafkaError, KafkaException

        driver = "loop" if threading.current_thread() is threading.main_thread() else "thread"
        if self.how == "take" and len(records) >= 2 and driver not in self.met:
            self.met.add(driver)
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return super()._make_batch(consumer, key, records)


@pytest.mark.parametrize("how", ["event", "take"])
async def test_a_fetch_that_fails_among_its_records_loses_none_and_fetching_goes_on(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An error event among the records of one ``consume`` call (or a failed lookup, seek
    or pause while taking them) raised at once: the records of that call already taken
    off the consumer were never handed out, and the partition's next batch committed past
    them (on the event loop); on the consumer thread the failed poll was awaited again
    by every later fetch, which never consumed again. Now the records come (fetched
    again, or handed out before the error is raised), every offset is committed, and
    the error is one line."""
    caplog.set_level(logging.ERROR, "amgi.runtime")
    topic = create_topic(fresh("midway"), partitions=1)
    count = 40
    produce(topic, [(None, b"%d" % i, []) for i in range(count)], partition=0)
    group = fresh("group")
    kafka = _FailingTake([topic], KafkaOptions(**options(group_id=group, max_batch_size=4)))
    kafka.how = how
    seen: list[tuple[bytes, int]] = []
    app = attempts_app(seen)
    await run_until(app, kafka, lambda: len(set(seen)) == count, timeout=30, crash_ledger="")
    assert sorted(set(seen)) == sorted((b"%d" % i, 1) for i in range(count))
    met = kafka.midway.met if kafka.midway is not None else kafka.met
    assert met == {"loop", "thread"}, "each driver met the failure"
    assert committed(group, topic) == {0: count}
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) >= 1
    reason = "Kafka refused access" if how == "event" else "could not take the records"
    assert all(reason in line for line in failed), failed
