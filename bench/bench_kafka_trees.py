"""Our Kafka server from two source trees, an application that awaits I/O, side by side.

Run after ``scripts/brokers/kafka.sh``, with an earlier commit checked out beside this one::

    git worktree add /tmp/amgi-before HEAD~1
    .venv/bin/python bench/bench_kafka_trees.py --baseline /tmp/amgi-before --io-delay 0.02

One topic of ``--count`` records (as ``bench_kafka.py`` fills it) is drained by ``amgi run``
(the defaults but the group timings of ``bench_kafka.py``), once with this tree's ``src``,
once with the baseline's, and by the raw loop below, over ``--rounds`` rounds (the order
rotates each round), each with a fresh group and timed from its first message until the
broker reports every partition committed to its end.
The application (:func:`app`) receives its whole batch, awaits ``--io-delay`` seconds (its
I/O: a database call, say), then acks every message; ``--io-delay 0`` is a CPU-bound one.
The raw-client baseline of the same run is a confluent-kafka loop (:func:`run_raw`) doing the same:
``consume``, one wait of ``--io-delay`` for the records of all partitions at once (as our
server runs the partitions' batches side by side), one asynchronous commit per partition.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _proc import stop
from bench_kafka import first_message

ROOT = Path(__file__).resolve().parents[1]


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Receive the batch, await ``$BENCH_IO_DELAY`` seconds, ack every message."""
    if scope["type"] != "message":
        return
    first_message()
    ids = []
    more = True
    while more:
        event = await receive()
        ids.append(event["id"])
        more = event["more_messages"]
    delay = float(os.environ.get("BENCH_IO_DELAY", "0"))
    if delay:
        await asyncio.sleep(delay)
    for mid in ids:
        await send({"type": "message.ack", "id": mid})


def run_raw(bootstrap: str, topic: str, group: str, io_delay: float) -> None:
    """The raw loop: ``consume``, wait ``io_delay``, commit each partition's last offset."""
    from confluent_kafka import TopicPartition

    import bench_kafka

    consumer = bench_kafka._raw_consumer(bootstrap, topic, group)
    while True:
        records = bench_kafka._take(consumer)
        if not records:
            continue
        first_message()
        last = {r.partition(): r.offset() for r in records if r.error() is None}
        if io_delay:
            time.sleep(io_delay)
        commits = [TopicPartition(topic, p, offset + 1) for p, offset in last.items()]
        consumer.commit(offsets=commits, asynchronous=True)


def drain(
    name: str, src: Path | None, topic: str, ends: dict[int, int], io_delay: float, bootstrap: str
) -> float:
    """Messages per second of one contender (``amgi run`` with ``src`` on the path, or the
    raw loop without), from its first message until its group is committed to every
    partition's end."""
    from confluent_kafka import Consumer, TopicPartition

    import bench_kafka

    group = f"trees-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        first = Path(tmp) / "first"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(src or ROOT / "src"), str(ROOT / "bench")]),
            "BENCH_FIRST": str(first),
            "BENCH_IO_DELAY": str(io_delay),
        }
        if src is None:
            cmd = [sys.executable, __file__, "--raw-child", bootstrap, topic, group]
        else:
            amgi = Path(sys.executable).with_name("amgi")
            cmd = [str(amgi), "run", "bench_kafka_trees:app", topic]
            cmd += bench_kafka._amgi_options(bootstrap, group)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        watcher = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        partitions = [TopicPartition(topic, p) for p in ends]
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode()[-1500:] if proc.stderr else ""
                    raise SystemExit(f"{name} did not drain the topic:\n{err}")
                done = {tp.partition: tp.offset for tp in watcher.committed(partitions, 5)}
                if all(done.get(p, -1) >= end for p, end in ends.items()):
                    break
                time.sleep(0.01)
            end_time = time.time()
        finally:
            stop(proc)
            watcher.close()
        return sum(ends.values()) / (end_time - float(first.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout's root")
    parser.add_argument("--io-delay", type=float, default=0.02, help="seconds awaited per batch")
    parser.add_argument("--count", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    if sys.argv[1:2] == ["--raw-child"]:  # the raw loop's own process, started by drain()
        bootstrap, topic, group = sys.argv[2:5]
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        run_raw(bootstrap, topic, group, float(os.environ["BENCH_IO_DELAY"]))
        return
    args = parser.parse_args()
    import bench_kafka

    trees: dict[str, Path | None] = {
        "this tree": ROOT / "src",
        f"baseline {args.baseline}": args.baseline / "src",
        "raw confluent-kafka loop": None,
    }
    if not (args.baseline / "src" / "amgi").is_dir():
        parser.error(f"--baseline {args.baseline}: no src/amgi there")
    topic, ends = bench_kafka.prefill(args.bootstrap, args.count)
    rates: dict[str, list[float]] = {name: [] for name in trees}
    for r in range(args.rounds):
        order = list(trees.items())
        order = order[r % len(order) :] + order[: r % len(order)]  # rotates each round
        for name, src in order:
            rate = drain(name, src, topic, ends, args.io_delay, args.bootstrap)
            rates[name].append(rate)
            print(f"round {r + 1} {name}: {rate:,.0f} msgs/s", flush=True)
    print(f"\n{args.count} records, the application awaits {args.io_delay:g} s per batch")
    print(f"{'tree':40} {'msgs/s median':>14} {'min-max':>18}")
    for name, values in rates.items():
        span = f"{min(values):,.0f}-{max(values):,.0f}"
        print(f"{name[:40]:40} {statistics.median(values):>14,.0f} {span:>18}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    main()
