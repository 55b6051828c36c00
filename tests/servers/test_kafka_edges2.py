"""Kafka unhappy paths of the producer side and the options: ``--config`` settings the
server owns, a close with the broker gone, a flood of client errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from amgi.errors import ConfigurationError
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.kafka import KafkaOptions, KafkaSendError, KafkaTransport
from tests.net import free_port
from tests.servers.kafka_helpers import (
    KafkaFront,
    committed,
    create_topic,
    fresh,
    fronted_private_broker,
    options,
    produce,
    read_all,
    start_private_broker,
    transport,
)

pytestmark = pytest.mark.timeout(60)

_CREATE_TOPICS = 19
"""The API key of a CreateTopics request."""


@pytest.mark.parametrize(
    ("setting", "instead"),
    [
        ("enable.auto.commit=true", "commits only what the application settled"),
        ("auto.commit.enable=true", "commits only what the application settled"),
        ("enable.auto.offset.store=true", "commits only what the application settled"),
        ("enable.partition.eof=true", "the server sets it"),
        ("acks=0", "--acks"),
        ("request.required.acks=1", "--acks"),
        ("enable.idempotence=false", "--enable-idempotence"),
        ("message.timeout.ms=100", "--delivery-timeout-ms"),
        (" group.id =other", "--group-id"),
        ("session.timeout.ms=6000", "--session-timeout-ms"),
    ],
)
def test_a_config_setting_the_server_owns_is_refused(setting: str, instead: str) -> None:
    """The server set these itself over ``--config`` without a word (the producer even
    logged that the consumer's would be 'ignored by this producer instance'): a user who
    asked for auto-commit, acks=0 or another group got something else. One error now,
    naming the setting and what to use, never its value (``--config`` is secret)."""
    kafka = KafkaTransport(["t"], KafkaOptions(**options(config=["debug=broker", setting])))
    with pytest.raises(ConfigurationError) as caught:
        kafka.check()
    text = str(caught.value)
    name = setting.partition("=")[0].strip()
    assert f"--config {name}" in text
    assert instead in text
    assert "=" + setting.partition("=")[2] not in text


@pytest.mark.parametrize("acks", ["0", "1"])
def test_acks_below_all_with_idempotence_is_one_clear_error(acks: str) -> None:
    """librdkafka refuses the pair only when the producer is made, at connect, and the
    error read ``invalid Kafka producer option: KafkaError{code=_INVALID_ARG,...}``: now
    one line before anything starts, naming both options."""
    kafka = KafkaTransport(["t"], KafkaOptions(**options(acks=acks)))
    with pytest.raises(ConfigurationError) as caught:
        kafka.check()
    assert str(caught.value) == (
        "--acks below all needs --no-enable-idempotence: an idempotent producer waits "
        f"for every in-sync replica (got acks='{acks}')"
    )
    KafkaTransport(["t"], KafkaOptions(**options(acks=acks, enable_idempotence=False))).check()


def test_config_settings_the_server_leaves_alone_pass() -> None:
    kafka = KafkaTransport(
        ["t"],
        KafkaOptions(
            **options(config=["partition.assignment.strategy=cooperative-sticky", "debug=all"])
        ),
    )
    kafka.check()


async def test_a_stop_with_the_broker_gone_closes_in_bounds_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker dies under an application awaiting a send; the stop cuts the
    application off (``--shutdown-timeout 1``). The close flushed the records nobody
    awaits any more (the send, the cut-off batch's retry copy) for the whole
    --delivery-timeout-ms (30 s): past the runtime's bound, so the stop logged 'the kafka
    transport did not close within 5s', exited 1 for it and left the client's threads
    running. Now the close ends in a few seconds with one warning that says why. (The
    retry copy's settle is cut off by the runtime's own bound, which says so.)"""
    caplog.set_level(logging.WARNING)
    port = free_port()
    broker = start_private_broker(port, port, tmp_path / "broker.log")
    bootstrap = f"127.0.0.1:{port}"
    try:
        topic = create_topic(fresh("gone"), partitions=1, bootstrap=bootstrap)
        produce(topic, [(None, b"x", [])], bootstrap=bootstrap)
        kafka = transport([topic], bootstrap_servers=bootstrap)
        started = asyncio.Event()

        async def sending(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            started.set()
            await send({"type": "message.send", "address": topic, "headers": [], "payload": b"y"})

        config = RuntimeConfig(lifespan="off", shutdown_timeout=1.0)
        runtime = Runtime(sending, kafka, config)
        server = asyncio.create_task(runtime.serve())
        await asyncio.wait_for(started.wait(), 30)
    finally:
        broker.kill()
        broker.wait()
    await asyncio.sleep(0.5)  # the send is queued for a broker that is gone
    stopped = time.monotonic()
    runtime.request_stop()
    await asyncio.wait_for(server, 60)
    assert time.monotonic() - stopped < 20  # 1 s for the app, 5 for settles, 3 to close
    assert "did not close" not in caplog.text
    [warning] = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert "Kafka record(s) were not delivered before close" in warning
    assert "the client's latest error: " in warning  # the broker refused the connection
    assert [t.name for t in threading.enumerate() if t.name.startswith("amgi-kafka")] == []


async def test_a_broker_slow_to_create_topics_holds_a_connect_no_longer_than_its_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Making the retry and dead-letter topics at connect waited for the broker's answer
    as long as the client's request timeout (60 s), whatever ``--connect-timeout``: a
    start held for a minute by a broker that does not answer. Now the request is given
    ``--connect-timeout`` and the topic it could not make is a warning."""
    with fronted_private_broker(tmp_path) as (front, bootstrap):
        topic = create_topic(fresh("slow"), partitions=1, bootstrap=bootstrap)
        front.delays[_CREATE_TOPICS] = 30.0
        kafka = transport([topic], bootstrap_servers=bootstrap, connect_timeout=1.0)
        started = time.monotonic()
        try:
            await asyncio.wait_for(kafka.connect(), 25)
        finally:
            took = time.monotonic() - started
            await kafka.close()
        assert front.held[_CREATE_TOPICS] == 1
        assert took < 15, took  # the delay is 30 s: never waited for
        assert "could not create Kafka topic" in caplog.text
        assert "Timed out" in caplog.text
        assert "KafkaError{" not in caplog.text  # the client's words, not its repr


async def test_a_key_that_is_no_valid_text_is_a_send_error() -> None:
    """A str key with a lone surrogate (``"\\udcff"`` from JSON or a file name) raised a
    bare UnicodeEncodeError out of ``message.send`` (``amgi send``: 'unexpected
    UnicodeEncodeError'); the application could not catch it as the server's send error."""
    topic = create_topic(fresh("badkey"), partitions=1)
    kafka = transport([])
    await kafka.connect()
    try:
        with pytest.raises(KafkaSendError, match=r"kafka\.key is not valid text"):
            await kafka.publish(topic, [], b"x", {"kafka": {"key": "ok\udcff"}})
        await kafka.publish(topic, [], b"y", {"kafka": {"key": "ok"}})
    finally:
        await kafka.close()
    [record] = read_all(topic, 1)
    assert (record.key(), record.value()) == (b"ok", b"y")


class _Acking:
    """A server of one topic on a private broker behind a :class:`KafkaFront`, whose app
    acks every message (``seen``: their payloads), serving its first record."""

    front: KafkaFront
    topic: str
    bootstrap: str
    direct: str
    kafka: KafkaTransport
    server: asyncio.Task[int]
    seen: list[bytes]


@contextlib.asynccontextmanager
async def acking_behind_a_front(tmp_path: Path, name: str) -> AsyncIterator[_Acking]:
    """Yield an :class:`_Acking` once its app acked the topic's first record; stop it
    after (exit code 0), then the broker. The client's requests time out after 1 s."""
    broker_port, front_port = free_port(), free_port()
    broker = start_private_broker(broker_port, front_port, tmp_path / "broker.log")
    served = _Acking()
    served.bootstrap = f"127.0.0.1:{front_port}"
    served.direct = f"127.0.0.1:{broker_port}"
    served.seen = []
    try:
        with KafkaFront(front_port, broker_port) as served.front:
            served.topic = create_topic(fresh(name), partitions=1, bootstrap=served.bootstrap)
            produce(served.topic, [(None, b"first", [])], bootstrap=served.bootstrap)

            async def acking(scope: Any, receive: Any, send: Any) -> None:
                event = await receive()
                served.seen.append(event["payload"])
                await send({"type": "message.ack", "id": event["id"]})

            served.kafka = transport(
                [served.topic],
                bootstrap_servers=served.bootstrap,
                config=["socket.timeout.ms=1000"],
            )
            runtime = Runtime(acking, served.kafka, RuntimeConfig(lifespan="off"))
            served.server = asyncio.create_task(runtime.serve())
            try:
                deadline = time.monotonic() + 30
                while not served.seen:
                    assert not served.server.done(), served.server.result()
                    assert time.monotonic() < deadline, "nothing consumed"
                    await asyncio.sleep(0.05)
                yield served
            finally:
                runtime.request_stop()
                assert await asyncio.wait_for(served.server, 30) == 0
    finally:
        broker.kill()
        broker.wait()


async def test_commits_a_coordinator_does_not_answer_are_not_a_line_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The group coordinator stops answering commits (a relay holds them back) while
    records keep coming and are acked: each commit timed out into a warning of its own,
    the same 'kafka commit failed: ... Local: Timed out' once per commit (up to 50 a
    second at the default --commit-interval-ms). Each distinct failure is a line a
    minute now."""
    caplog.set_level(logging.WARNING, "amgi.servers.kafka")
    async with acking_behind_a_front(tmp_path, "commits") as served:
        served.front.delays[8] = 30.0  # OffsetCommit: held past the 1 s socket timeout
        for n in range(12):
            await asyncio.to_thread(
                produce, served.topic, [(None, b"%d" % n, [])], bootstrap=served.bootstrap
            )
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 30
        while len(served.seen) < 13 or served.front.held[8] < 8:
            assert time.monotonic() < deadline, (len(served.seen), served.front.held)
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # the last commits time out too
    failed = [r.getMessage() for r in caplog.records if "commit failed" in r.getMessage()]
    assert failed  # the failure is said
    assert len(failed) == len(set(failed)), failed


async def test_a_commit_that_failed_is_sent_again_without_a_new_settle(tmp_path: Path) -> None:
    """The server marks a commit done when it goes out; one the coordinator does not
    answer (timed out) must still land once it answers again, with nothing settled
    after it, or the group's offset stays behind until the close and a crash meanwhile
    redelivers every record since. (librdkafka sends a timed-out commit again itself.)"""
    async with acking_behind_a_front(tmp_path, "recommit") as served:
        front, topic = served.front, served.topic
        front.delays[8] = 60.0  # OffsetCommit: held past the 1 s socket timeout
        await asyncio.to_thread(produce, topic, [(None, b"last", [])], bootstrap=served.bootstrap)
        deadline = time.monotonic() + 30
        while len(served.seen) < 2 or not front.held[8]:
            assert time.monotonic() < deadline, (served.seen, front.held)
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # that commit times out
        del front.delays[8]  # the coordinator answers again; nothing more settles
        got: dict[int, int] = {}
        while got.get(0) != 2:
            assert not served.server.done(), served.server.result()
            assert time.monotonic() < deadline + 10, f"committed {got}, want 2"
            group = served.kafka.config.group_id
            got = await asyncio.to_thread(committed, group, topic, served.direct)
            await asyncio.sleep(0.2)
