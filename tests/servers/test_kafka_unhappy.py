"""Kafka unhappy paths against the real test broker: a producer the broker fenced, dead
letters a broker fails to read or mark replayed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from amgi.errors import BrokerUnavailable
from amgi.servers.kafka import KafkaOptions, KafkaSendError, KafkaTransport
from tests.servers.kafka_helpers import (
    create_topic,
    ensure_broker,
    fresh,
    fronted_private_broker,
    options,
    produce,
)

pytestmark = pytest.mark.timeout(60)

_PRODUCE = 0
"""The API key of a Produce request."""
_OFFSET_COMMIT = 8
_OFFSET_FETCH = 9


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


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
