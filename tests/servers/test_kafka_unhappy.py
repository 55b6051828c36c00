"""Kafka unhappy paths against the real test broker: a stop that meets a rebalance, a
producer the broker fenced, dead letters a broker fails to read or mark replayed."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer

from amgi.errors import BrokerUnavailable
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.kafka import KafkaOptions, KafkaSendError, KafkaTransport
from tests.servers.kafka_helpers import (
    BOOTSTRAP,
    FAST_GROUP,
    committed,
    create_topic,
    ensure_broker,
    fresh,
    fronted_private_broker,
    options,
    produce,
    transport,
)

pytestmark = pytest.mark.timeout(60)

_PRODUCE = 0
"""The API key of a Produce request."""
_OFFSET_COMMIT = 8
_OFFSET_FETCH = 9


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


def _join_group(group: str, topic: str, stop: threading.Event) -> None:
    """Be a second member of ``group`` until ``stop`` (a thread): it commits nothing."""
    consumer = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": FAST_GROUP["session_timeout_ms"],
            "heartbeat.interval.ms": FAST_GROUP["heartbeat_interval_ms"],
        }
    )
    try:
        consumer.subscribe([topic])
        while not stop.is_set():
            consumer.consume(10, 0.1)
    finally:
        consumer.close()


async def test_a_stop_during_a_revoke_still_commits_what_was_acked() -> None:
    """A member joins while a batch is in flight: the revoke waits for it. The server is
    then stopped and the batch, acked, settles: the revoke's commit went out only if the
    close had not begun meanwhile, and the revoke had forgotten the partition, so the
    close committed nothing either. The next owner got every acked record again."""
    topic = create_topic(fresh("stop-revoke"), partitions=1)
    produce(topic, ((None, b"%d" % i, []) for i in range(5)))
    kafka = transport([topic])
    group = kafka.config.group_id
    taken, release = asyncio.Event(), asyncio.Event()
    revoking = threading.Event()
    revoke = kafka._on_revoke

    def seen_revoke(consumer: Any, partitions: list[Any]) -> None:
        revoking.set()
        revoke(consumer, partitions)

    kafka._on_revoke = seen_revoke  # type: ignore[method-assign]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            event = await receive()
            await send({"type": "message.ack", "id": event["id"]})
            if not event.get("more_messages"):
                break
        taken.set()
        await release.wait()

    runtime = Runtime(app, kafka, RuntimeConfig(lifespan="off"))
    server = asyncio.create_task(runtime.serve())
    stop = threading.Event()
    other = threading.Thread(target=_join_group, args=(group, topic, stop))
    try:
        await asyncio.wait_for(taken.wait(), 30)
        other.start()
        deadline = time.monotonic() + 20
        while not revoking.is_set():  # the second member's join asks for the partition
            assert time.monotonic() < deadline, "no rebalance"
            await asyncio.sleep(0.02)
        runtime.request_stop()
        await asyncio.sleep(0.2)  # the stop is under way: the batch waits to be drained
        release.set()
        assert await asyncio.wait_for(server, 30) == 0
    finally:
        release.set()
        stop.set()
        if other.is_alive():
            await asyncio.to_thread(other.join)
    assert committed(group, topic) == {0: 5}


async def test_a_producer_the_broker_fenced_is_replaced(tmp_path: Path) -> None:
    """A send that timed out (the broker slower than ``--delivery-timeout-ms``) makes
    the idempotent producer bump its epoch, and the test broker answers by fencing it:
    librdkafka's producer is then failed for good (``error.fatal()``), and every later
    send and retry copy failed alike, for ever. It is replaced by a new one: a send
    fails at most once more, then records go through again."""
    with fronted_private_broker(tmp_path) as (front, bootstrap):
        topic = create_topic(fresh("fenced"), partitions=1, bootstrap=bootstrap)
        kafka = KafkaTransport(
            [], KafkaOptions(**options(bootstrap_servers=bootstrap, delivery_timeout_ms=1000))
        )
        await kafka.connect()
        try:
            await kafka.publish(topic, [], b"before", {})
            front.delays[_PRODUCE] = 2.5
            with pytest.raises(KafkaSendError, match="timed out"):
                await kafka.publish(topic, [], b"timed out", {})
            await asyncio.sleep(2.5)  # the request held is passed on, or dropped
            front.delays.clear()
            failures: list[KafkaSendError] = []
            deadline = time.monotonic() + 20
            while True:
                try:
                    await kafka.publish(topic, [], b"after", {})
                    break
                except KafkaSendError as exc:
                    failures.append(exc)
                assert time.monotonic() < deadline, failures[-3:]
                await asyncio.sleep(0.2)
            assert len(failures) <= 1, failures
            assert all(f.for_now for f in failures), failures  # not the record's fault
            assert kafka._producer_threads.keys() == {id(kafka._producer)}  # the old retired
        finally:
            await kafka.close()


async def test_dead_letters_a_broker_fails_to_read_or_mark_are_one_clear_error(
    tmp_path: Path,
) -> None:
    """The committed offsets not looked up in time, or the replay's commit failing, came
    out of ``amgi dead-letters`` as ``unexpected KafkaException: KafkaError{code=...}``;
    a replay's said nothing of the records it had sent back already."""
    with fronted_private_broker(tmp_path) as (front, bootstrap):
        topic = create_topic(fresh("letters"), partitions=1, bootstrap=bootstrap)
        create_topic(f"{topic}.dlq", partitions=1, bootstrap=bootstrap)
        dead = [("amgi-original-address", topic.encode())]
        produce(f"{topic}.dlq", [(None, b"dead", dead)], bootstrap=bootstrap)
        kafka = KafkaTransport(
            [], KafkaOptions(**options(bootstrap_servers=bootstrap, connect_timeout=2))
        )
        await kafka.connect()
        try:
            front.delays[_OFFSET_FETCH] = 10.0
            with pytest.raises(BrokerUnavailable, match="cannot read the dead-letter topic"):
                await kafka.list_dead_letters(topic, 10)
            front.delays.clear()
            front.cuts[_OFFSET_COMMIT] = b""  # the broker drops the replay's commit
            with pytest.raises(BrokerUnavailable, match="1 of them still listed") as failed:
                await kafka.replay_dead_letters(topic, 10)
            assert f"sent back to {topic!r}" in str(failed.value)
        finally:
            await kafka.close()
