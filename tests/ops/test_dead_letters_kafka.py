"""``amgi dead-letters`` on Kafka: records dead-lettered by the runtime into ``T.dlq`` are
listed, replayed to ``T`` and committed as replayed; a replay killed with SIGKILL
half-way leaves every dead letter back in ``T`` or still listed (at least once)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from amgi.servers.kafka import KafkaOptions, KafkaTransport
from tests.cli import amgi as amgi_cli
from tests.ops.helpers import dead_letter_all, one_line_error, replay_beside_a_failing_consumer
from tests.servers.kafka_helpers import (
    BOOTSTRAP,
    ROOT,
    committed,
    create_topic,
    end_offsets,
    ensure_broker,
    fresh,
    options,
    produce,
    read_all,
)

pytestmark = pytest.mark.timeout(150)


async def nack_everything(topic: str, n: int) -> None:
    """Produce ``n`` records to ``topic`` and let the runtime dead-letter every one."""
    produce(topic, ((b"k%d" % (i % 4), b"%d" % i, [("n", b"%d" % i)]) for i in range(n)))
    await dead_letter_all(KafkaTransport([topic], KafkaOptions(**options())), n, with_id=True)


def records_after(topic: str, before: dict[int, int]) -> list[Any]:
    """The records of ``topic`` past the offsets ``before`` (partition -> next offset)."""
    n = sum(end_offsets(topic, idle=0.5).values())
    records = read_all(topic, n, timeout=30)
    assert len(records) == n
    return [r for r in records if r.offset() >= before.get(r.partition(), 0)]


def values(records: list[Any]) -> list[bytes]:
    return sorted(r.value() for r in records)


async def test_list_and_replay_from_the_command_line() -> None:
    ensure_broker()
    topic = create_topic(fresh("dl"), partitions=2)
    await nack_everything(topic, 6)
    originals = end_offsets(topic)
    kafka = ["--server", "kafka", "--bootstrap-servers", BOOTSTRAP]
    listed = await asyncio.to_thread(amgi_cli, "dead-letters", "list", topic, *kafka)
    assert listed.returncode == 0, listed.stderr
    assert f"6 dead letter(s) of {topic!r} shown (kafka)" in listed.stdout
    assert "reason:  refused" in listed.stdout
    assert "attempts=1" in listed.stdout
    assert "headers: n=" in listed.stdout
    assert "amgi-" not in listed.stdout, "AMGI's own headers are not shown as the app's"
    replay = await asyncio.to_thread(
        amgi_cli, "dead-letters", "replay", topic, "--limit", "4", *kafka
    )
    assert replay.returncode == 0, replay.stderr
    assert f"replayed 4 dead letter(s) to {topic!r}" in replay.stdout
    first = records_after(topic, originals)
    assert len(first) == 4
    listed = await asyncio.to_thread(amgi_cli, "dead-letters", "list", topic, *kafka)
    assert f"2 dead letter(s) of {topic!r} shown" in listed.stdout
    rest = await asyncio.to_thread(amgi_cli, "dead-letters", "replay", topic, *kafka)
    assert f"replayed 2 dead letter(s) to {topic!r}" in rest.stdout
    replayed = records_after(topic, originals)
    assert values(replayed) == sorted(b"%d" % i for i in range(6))
    for record in replayed:
        names = {n for n, _ in record.headers() or []}
        assert "amgi-dead-letter-reason" not in names
        assert "amgi-attempt" not in names
        assert "n" in names


def test_replay_to_a_topic_that_does_not_exist_is_one_line() -> None:
    ensure_broker()
    result = amgi_cli(
        "dead-letters", "replay", fresh("gone"), "--server", "kafka",
        "--bootstrap-servers", BOOTSTRAP,
    )  # fmt: skip
    assert "does not exist" in one_line_error(result)


def test_replay_killed_half_way_loses_no_dead_letter() -> None:
    ensure_broker()
    topic = create_topic(fresh("dlkill"), partitions=2)
    n = 2000
    asyncio.run(nack_everything(topic, n))
    originals = end_offsets(topic)
    dlq = f"{topic}.dlq"
    replay = subprocess.Popen(
        [sys.executable, "-m", "amgi", "dead-letters", "replay", topic, "--server", "kafka",
         "--bootstrap-servers", BOOTSTRAP],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    watch = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": fresh("watch")})
    try:
        # Kill as soon as the first replayed records reach the topic.
        deadline = time.monotonic() + 60
        while not any(
            watch.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1] > end
            for p, end in originals.items()
        ):
            assert replay.poll() is None, replay.stderr
            assert time.monotonic() < deadline, "the replay sent nothing"
        replay.send_signal(signal.SIGKILL)
        replay.wait(10)
    finally:
        watch.close()
        if replay.poll() is None:
            replay.kill()
            replay.wait()
    done = committed("amgi-dead-letters", dlq)
    total = sum(end_offsets(dlq).values())
    assert total == n
    assert sum(max(v, 0) for v in done.values()) < n, "killed too late to test anything"
    replayed_before_kill = set(values(records_after(topic, originals)))
    still_dead = amgi_cli(
        "dead-letters", "list", topic, "--limit", str(n), "--server", "kafka",
        "--bootstrap-servers", BOOTSTRAP,
    )  # fmt: skip
    listed = set(re.findall(r"payload: b'(\d+)'", still_dead.stdout))
    missing = {b"%d" % i for i in range(n)} - replayed_before_kill - {p.encode() for p in listed}
    assert not missing, "dead letters in neither the topic nor the dead letters"
    finish = amgi_cli(
        "dead-letters", "replay", topic, "--server", "kafka", "--bootstrap-servers", BOOTSTRAP
    )
    assert finish.returncode == 0, finish.stderr
    replayed = records_after(topic, originals)
    assert set(values(replayed)) == {b"%d" % i for i in range(n)}
    assert len(replayed) <= n + 500, "more duplicates than one unconfirmed chunk"


async def test_a_replay_beside_a_consumer_that_fails_them_again_ends() -> None:
    """The replay moves the dead letters there when it started, once each, and ends,
    though a running consumer dead-letters each replayed record again at once."""
    ensure_broker()
    topic = create_topic(fresh("dl"), partitions=2)
    n = 1000
    group = options()  # one consumer group: the consumer goes on where the first stopped
    produce(topic, ((b"k%d" % (i % 4), b"%d" % i, []) for i in range(n)))
    await dead_letter_all(KafkaTransport([topic], KafkaOptions(**group)), n)
    moved = await replay_beside_a_failing_consumer(
        KafkaTransport([], KafkaOptions(**options())),
        KafkaTransport([topic], KafkaOptions(**group)),
        topic,
        n,
    )
    assert moved == n + 1
