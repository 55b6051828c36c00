"""Drain a pre-filled Kafka topic: our server beside the raw client loop and the peers.

Run after ``scripts/brokers/kafka.sh``: ``.venv/bin/python bench/bench_kafka.py``.

One topic of ``--count`` 100-byte records with 2 headers on 4 partitions is produced once;
each contender then drains it in its own process with a fresh consumer group, counting
until every record is acked and its offset committed. Time to first message (group join
included) is reported apart from the throughput, which is measured after the first message.

Contenders: ``amgi-kafka`` (this project's server through ``amgi.runtime.Runtime``, an app
that acks everything), ``raw-confluent`` (confluent-kafka consume + one synchronous commit
per partition batch), ``raw-confluent-async`` (the same loop with asynchronous commits, as
the server sends them, done when the broker confirmed them), ``protocol-minimum`` (that
loop plus the AMGI protocol's bare per-record work: event dicts and one app call per
batch, see :func:`run_floor`), and the peers a user would
pick instead, run from a separate venv (``.venv-bench``, created here on first use):
``faststream-batch`` (FastStream Kafka subscriber, batch mode),
``upstream-amgi-aiokafka`` (the ``amgi-aiokafka`` package) and ``raw-aiokafka`` (the raw
loop of the client those two use: ``getmany`` + one commit per partition batch).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench"
PEERS = ["faststream[kafka]", "amgi-aiokafka"]
PARTITIONS = 4


# -- the contenders (each runs in its own process) ------------------------------------------


def _done(committed: dict[int, int], ends: dict[int, int]) -> bool:
    return all(committed.get(p, -1) >= end for p, end in ends.items())


def _raw_consumer(bootstrap: str, topic: str, name: str) -> tuple[Any, dict[int, int]]:
    """A subscribed confluent-kafka consumer for the raw loops, and the offsets per
    partition that the broker confirmed as committed (filled by its commit callback)."""
    from confluent_kafka import Consumer

    committed: dict[int, int] = {}

    def confirmed(err: Any, partitions: list[Any]) -> None:
        for tp in partitions if err is None else ():
            if tp.error is None:
                committed[tp.partition] = max(committed.get(tp.partition, 0), tp.offset)

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{name}-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
            "fetch.queue.backoff.ms": 10,  # as the amgi server sets it (default: 1000)
            "on_commit": confirmed,
        }
    )
    consumer.subscribe([topic])
    return consumer, committed


def _take(consumer: Any) -> list[Any]:
    """Up to 2000 records: what is on hand, else wait up to 0.1 s for one and what follows."""
    records: list[Any] = consumer.consume(2000, 0)
    if not records:
        records = consumer.consume(1, 0.1)
        if records:
            records += consumer.consume(1999, 0)
    return records


def run_raw(
    bootstrap: str, topic: str, ends: dict[int, int], count: int, asynchronous: bool = False
) -> dict[str, float]:
    """consume + one commit per partition batch: synchronous, or asynchronous (as the amgi
    server commits) with the broker's confirmations counted in the commit callback."""
    from confluent_kafka import TopicPartition

    t0 = time.perf_counter()
    consumer, committed = _raw_consumer(bootstrap, topic, "raw")
    first = 0.0
    seen = 0
    while not _done(committed, ends):
        records = _take(consumer)
        if not records:
            continue
        if not first:
            first = time.perf_counter()
        last: dict[int, int] = {}
        for r in records:
            if r.error() is None:
                r.value()
                r.headers()
                last[r.partition()] = r.offset()
                seen += 1
        for p, off in last.items():  # one commit per partition batch
            consumer.commit(offsets=[TopicPartition(topic, p, off + 1)], asynchronous=asynchronous)
            if not asynchronous:
                committed[p] = off + 1
    end = time.perf_counter()
    consumer.close()
    return {"first": first - t0, "drain": end - first, "seen": seen}


class _FloorCall:
    """receive/send over prepared events: hand out the next, accept its ack."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.position = 0

    async def receive(self) -> dict[str, Any]:
        return self.events[self.position]

    async def send(self, event: dict[str, Any]) -> None:
        if event["type"] != "message.ack" or event["id"] != self.events[self.position]["id"]:
            raise ValueError(f"not the ack of the record handed out: {event!r}")
        self.position += 1


def run_floor(bootstrap: str, topic: str, ends: dict[int, int], count: int) -> dict[str, float]:
    """``raw-confluent-async`` plus the least per-record work the AMGI protocol asks of
    any server, and nothing else: the receive event the spec defines (text id,
    ``(bytes, bytes)`` headers, the Kafka bindings), one app call per partition batch
    that awaits ``receive`` and ``send`` per record, and a check that each ack names the
    record just handed out. No runtime, no validation beyond that, no retries.

    It runs in one thread; the server overlaps the client's fetching with this work in a
    second thread, so it can beat this row. What the row shows is what the protocol's
    own per-record Python costs beside the raw loop."""
    from confluent_kafka import TopicPartition

    async def app(scope: Any, receive: Any, send: Any) -> None:
        more = True
        while more:
            event = await receive()
            more = event["more_messages"]
            await send({"type": "message.ack", "id": event["id"]})

    async def main() -> dict[str, float]:
        t0 = time.perf_counter()
        consumer, committed = _raw_consumer(bootstrap, topic, "floor")
        first = 0.0
        seen = 0
        names = {"content-type": b"content-type", "trace-id": b"trace-id"}
        while not _done(committed, ends):
            records = _take(consumer)
            if not records:
                continue
            if not first:
                first = time.perf_counter()
            runs: dict[int, list[Any]] = {}
            for r in records:
                if r.error() is None:
                    runs.setdefault(r.partition(), []).append(r)
            for p, run in runs.items():
                events = []
                for r in run:
                    off = r.offset()
                    headers = []
                    for n, v in r.headers() or ():
                        headers.append((names.get(n) or n.encode(), v))
                    events.append(
                        {
                            "type": "message.receive",
                            "id": str(off),
                            "headers": headers,
                            "payload": r.value(),
                            "bindings": {
                                "kafka": {
                                    "key": r.key(),
                                    "partition": p,
                                    "offset": off,
                                    "timestamp": r.timestamp()[1],
                                },
                                "amgi": {"attempt": 1},
                            },
                            "more_messages": True,
                        }
                    )
                events[-1]["more_messages"] = False
                call = _FloorCall(events)
                await app({"type": "message", "address": topic}, call.receive, call.send)
                seen += call.position
                last = run[-1].offset()
                consumer.commit(offsets=[TopicPartition(topic, p, last + 1)], asynchronous=True)
        end = time.perf_counter()
        consumer.close()
        return {"first": first - t0, "drain": end - first, "seen": seen}

    return asyncio.run(main())


def run_amgi(bootstrap: str, topic: str, ends: dict[int, int], count: int) -> dict[str, float]:
    from amgi.runtime import Runtime, RuntimeConfig
    from amgi.runtime.gc import tune_for_server
    from amgi.servers.kafka import KafkaOptions, KafkaTransport

    tune_for_server()  # as `amgi run` does

    async def main() -> dict[str, float]:
        first = 0.0
        seen = 0
        committed: dict[int, int] = {}
        finished = asyncio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            nonlocal first, seen
            if scope["type"] != "message":
                return
            if not first:
                first = time.perf_counter()
            more = True
            while more:
                event = await receive()
                more = event.get("more_messages", False)
                await send({"type": "message.ack", "id": event["id"]})
                seen += 1

        loop = asyncio.get_running_loop()

        class Counting(KafkaTransport):
            def _on_commit(self, err: Any, partitions: list[Any]) -> None:
                super()._on_commit(err, partitions)  # the broker confirmed these commits
                if err is None:
                    for tp in partitions:
                        if tp.error is None:
                            p = tp.partition
                            committed[p] = max(committed.get(p, 0), tp.offset)
                if _done(committed, ends):
                    loop.call_soon_threadsafe(finished.set)

        options = KafkaOptions(
            bootstrap_servers=bootstrap,
            group_id=f"bench-amgi-{uuid.uuid4().hex[:8]}",
            session_timeout_ms=6000,
            heartbeat_interval_ms=500,
        )
        t0 = time.perf_counter()
        runtime = Runtime(app, Counting([topic], options), RuntimeConfig(lifespan="off"))
        server = asyncio.create_task(runtime.serve())
        await finished.wait()
        end = time.perf_counter()
        runtime.request_stop()
        await server
        return {"first": first - t0, "drain": end - first, "seen": seen}

    return asyncio.run(main())


def _watch_aiokafka_commits(ends: dict[int, int], finished: Any) -> None:
    """Wrap aiokafka's commit to learn when every partition is committed to its end."""
    from aiokafka import AIOKafkaConsumer

    committed: dict[int, int] = {}
    original = AIOKafkaConsumer.commit

    async def commit(self: Any, offsets: Any = None) -> None:
        if offsets is None:  # commit() of everything consumed: the positions
            offsets = {tp: await self.position(tp) for tp in self.assignment()}
        await original(self, offsets)
        for tp, value in offsets.items():
            offset = value if isinstance(value, int) else value.offset
            committed[tp.partition] = max(committed.get(tp.partition, 0), offset)
        if _done(committed, ends):
            finished.set()

    AIOKafkaConsumer.commit = commit  # type: ignore[method-assign]


def run_raw_aiokafka(
    bootstrap: str, topic: str, ends: dict[int, int], count: int
) -> dict[str, float]:
    """aiokafka ``getmany`` + one commit per partition batch: the raw loop the issue's
    reference figures were taken with (the client the upstream package uses)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def main() -> dict[str, float]:
        t0 = time.perf_counter()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=f"bench-rawaio-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=6000,
            heartbeat_interval_ms=500,
        )
        await consumer.start()
        first = 0.0
        seen = 0
        committed: dict[int, int] = {}
        while not _done(committed, ends):
            fetched = await consumer.getmany(timeout_ms=100, max_records=2000)
            if fetched and not first:
                first = time.perf_counter()
            for tp, records in fetched.items():
                for r in records:
                    r.value  # noqa: B018  (touch what an app would read)
                    r.headers  # noqa: B018
                seen += len(records)
                offset = records[-1].offset + 1
                await consumer.commit({TopicPartition(topic, tp.partition): offset})
                committed[tp.partition] = offset
        end = time.perf_counter()
        await consumer.stop()
        return {"first": first - t0, "drain": end - first, "seen": seen}

    return asyncio.run(main())


def run_upstream(bootstrap: str, topic: str, ends: dict[int, int], count: int) -> dict[str, float]:
    import amgi_aiokafka

    async def main() -> dict[str, float]:
        first = 0.0
        seen = 0
        finished = asyncio.Event()
        _watch_aiokafka_commits(ends, finished)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            nonlocal first, seen
            if scope["type"] != "message":
                if scope["type"] == "lifespan":
                    while True:
                        event = await receive()
                        kind = event["type"].rsplit(".", 1)[-1]
                        await send({"type": f"lifespan.{kind}.complete"})
                        if kind == "shutdown":
                            return
                return
            if not first:
                first = time.perf_counter()
            seen += 1
            await send({"type": "message.ack", "id": ""})

        t0 = time.perf_counter()
        server = amgi_aiokafka.Server(
            app,
            topic,
            bootstrap_servers=bootstrap,
            group_id=f"bench-up-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
        )
        task = asyncio.create_task(server.serve())
        await finished.wait()
        end = time.perf_counter()
        server.stop()
        await asyncio.wait_for(task, 30)
        return {"first": first - t0, "drain": end - first, "seen": seen}

    return asyncio.run(main())


def run_faststream(
    bootstrap: str, topic: str, ends: dict[int, int], count: int
) -> dict[str, float]:
    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker

    async def main() -> dict[str, float]:
        first = 0.0
        seen = 0
        finished = asyncio.Event()
        _watch_aiokafka_commits(ends, finished)
        broker = KafkaBroker(bootstrap)

        @broker.subscriber(  # type: ignore[misc]
            topic,
            batch=True,
            group_id=f"bench-fs-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            max_records=2000,
            ack_policy=AckPolicy.ACK,  # commit after processing, as the others do
        )
        async def handle(messages: list[bytes]) -> None:
            nonlocal first, seen
            if not first:
                first = time.perf_counter()
            seen += len(messages)

        t0 = time.perf_counter()
        await broker.start()
        await finished.wait()
        end = time.perf_counter()
        await broker.stop()
        return {"first": first - t0, "drain": end - first, "seen": seen}

    return asyncio.run(main())


CONTENDERS = {
    "amgi-kafka": (run_amgi, False),
    "raw-confluent": (run_raw, False),
    "raw-confluent-async": (functools.partial(run_raw, asynchronous=True), False),
    "protocol-minimum": (run_floor, False),
    "raw-aiokafka": (run_raw_aiokafka, True),
    "faststream-batch": (run_faststream, True),
    "upstream-amgi-aiokafka": (run_upstream, True),
}


# -- the driver -----------------------------------------------------------------------------


def ensure_bench_venv() -> Path:
    """Create ``.venv-bench`` with the peers unless it already has them."""
    python = BENCH_VENV / "bin" / "python"
    check = [str(python), "-c", "import faststream.kafka, amgi_aiokafka"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS], check=True)
    return python


def prefill(bootstrap: str, count: int) -> tuple[str, dict[int, int]]:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS)])[topic].result(10)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1000000})
    ends: dict[int, int] = {}

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            raise RuntimeError(err)
        ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    payload = b"x" * 100
    headers = [("content-type", b"application/octet-stream"), ("trace-id", b"0123456789abcdef")]
    for i in range(count):
        while True:
            try:
                producer.produce(
                    topic, payload, headers=headers, partition=i % PARTITIONS, on_delivery=delivered
                )
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)
    return topic, ends


def run_child(args: argparse.Namespace) -> None:
    fn, _ = CONTENDERS[args.child]
    ends = {int(k): v for k, v in json.loads(args.ends).items()}
    result = fn(args.bootstrap, args.topic, ends, args.count)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=1, help="runs per contender (best kept)")
    parser.add_argument("--only", nargs="*", choices=sorted(CONTENDERS))
    parser.add_argument("--child-timeout", type=float, default=180, help="seconds per run")
    parser.add_argument("--child", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--ends", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    names = args.only or list(CONTENDERS)
    peer_python = ensure_bench_venv() if any(CONTENDERS[n][1] for n in names) else None
    print(f"pre-filling {args.count} records on {PARTITIONS} partitions ...", flush=True)
    topic, ends = prefill(args.bootstrap, args.count)
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for name in names:
            python = peer_python if CONTENDERS[name][1] else Path(sys.executable)
            cmd = [str(python), __file__, "--child", name, "--bootstrap", args.bootstrap]
            cmd += ["--topic", topic, "--ends", json.dumps(ends), "--count", str(args.count)]
            env = (
                {**os.environ, "PYTHONPATH": str(ROOT / "src")}
                if python == Path(sys.executable)
                else {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            )
            try:
                out = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=args.child_timeout, env=env
                )
            except subprocess.TimeoutExpired:
                print(f"{name}: did not finish within {args.child_timeout:g} s", file=sys.stderr)
                continue
            if out.returncode != 0:
                print(f"{name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if name not in best or result["drain"] < best[name]["drain"]:
                best[name] = result
    baselines = ("raw-confluent", "raw-confluent-async", "raw-aiokafka")
    raws = {k: args.count / best[k]["drain"] for k in baselines if k in best}
    print(f"\n{args.count} records x 100 B, 2 headers, {PARTITIONS} partitions, acked + committed")
    print(
        f"{'contender':<24}{'msgs/s':>12}{'first msg (s)':>15}"
        f"{'vs raw sync':>13}{'vs raw async':>14}{'vs raw aiokafka':>17}{'seen':>9}"
    )
    for name, r in sorted(best.items(), key=lambda kv: kv[1]["drain"]):
        rate = args.count / r["drain"]
        ratios = [f"{rate / raws[k]:.0%}" if k in raws else "-" for k in baselines]
        print(
            f"{name:<24}{rate:>12,.0f}{r['first']:>15.2f}"
            f"{ratios[0]:>13}{ratios[1]:>14}{ratios[2]:>17}{int(r['seen']):>9}"
        )


if __name__ == "__main__":
    main()
