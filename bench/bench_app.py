"""The typed layer (amgi.app) against our raw app and the peers, on Kafka and in-process.

Run after ``scripts/brokers/kafka.sh``: ``.venv/bin/python bench/bench_app.py``.

One topic of ``--count`` records (a 4-field JSON object of about 100 bytes, 4 partitions) is
produced once; every contender drains it in its own process with a fresh consumer group,
validating each payload into the same pydantic model and doing nothing else. The rate is
taken from the first message to the last one handled (group join excluded). Contenders
alternate over ``--rounds`` rounds; the table shows the median and the min-max.

Ours (this venv, our Kafka server through ``amgi.runtime.Runtime`` with the ``amgi run``
defaults, logging on): ``app-per-message`` (``@app.subscriber`` taking ``Order``),
``app-batch`` (``batch=True`` taking ``list[Order]``) and ``raw-app`` (a raw AMGI app calling
``Order.model_validate_json`` per message: the floor the layer adds to). Peers (from
``.venv-bench-app``, created on first use): ``faststream-default`` and ``faststream-batch``
(FastStream's Kafka subscriber; batch mode acks after the handler) and ``asyncfast``
(upstream AsyncFast 0.49 on amgi-aiokafka 0.51; their PyPI pins name an amgi-types release
that is not published, so both go in with ``--no-deps`` beside amgi-types 0.49).

In-process rows (no broker): the same three handlers of ours on the memory server, with
the per-message cost of the layer in microseconds over the raw app; and the runtime's
batch call alone, best of many alternating calls, the estimate least disturbed by other
load on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench-app"
PEERS = ["faststream[kafka]==0.6.*", "amgi-types==0.49.0", "aiokafka>=0.12", "pydantic>=2"]
PEERS_NO_DEPS = ["asyncfast==0.49.0", "amgi-aiokafka==0.51.0", "amgi-common==0.51.0"]
PARTITIONS = 4


class Order(BaseModel):
    id: int
    customer: str
    amount: float
    note: str


def payload(i: int) -> bytes:
    """A 4-field JSON object of about 100 bytes."""
    return json.dumps(
        {"id": i, "customer": f"customer-{i % 9973:06d}", "amount": 1234.5, "note": "n" * 34}
    ).encode()


class Counter:
    """Counts handled messages; ``done`` once ``expected`` were handled."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = 0
        self.first = 0.0
        self.last = 0.0
        self.done = asyncio.Event()

    def add(self, n: int = 1) -> None:
        if not self.first:
            self.first = time.perf_counter()
        self.seen += n
        if self.seen >= self.expected:
            self.last = time.perf_counter()
            self.done.set()

    def result(self) -> dict[str, float]:
        return {"drain": self.last - self.first, "seen": self.seen}


# -- our handlers ----------------------------------------------------------------------------


def our_app(kind: str, address: str, counter: Counter) -> Any:
    """The AMGI app of one of our contenders."""
    if kind == "raw-app":
        validate = Order.model_validate_json

        async def raw(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "message":
                return
            more = True
            while more:
                event = await receive()
                validate(event["payload"])
                await send({"type": "message.ack", "id": event["id"]})
                counter.add()
                more = event.get("more_messages", False)

        return raw
    from amgi.app import App

    app = App(title="bench")
    if kind == "app-per-message":

        @app.subscriber(address)
        async def on_order(order: Order) -> None:
            counter.add()

    else:

        @app.subscriber(address, batch=True)
        async def on_orders(orders: list[Order]) -> None:
            counter.add(len(orders))

    return app


def run_ours(kind: str, bootstrap: str, topic: str, count: int) -> dict[str, float]:
    from amgi.runtime import Runtime, RuntimeConfig
    from amgi.runtime.gc import tune_for_server
    from amgi.servers.kafka import KafkaOptions, KafkaTransport

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    tune_for_server()  # as `amgi run` does

    async def main() -> dict[str, float]:
        counter = Counter(count)
        options = KafkaOptions(
            bootstrap_servers=bootstrap, group_id=f"bench-{kind}-{uuid.uuid4().hex[:8]}"
        )
        runtime = Runtime(
            our_app(kind, topic, counter), KafkaTransport([topic], options), RuntimeConfig()
        )
        server = asyncio.create_task(runtime.serve())
        await counter.done.wait()
        runtime.request_stop()
        await server
        return counter.result()

    return asyncio.run(main())


# -- the peers (run in .venv-bench-app) ------------------------------------------------------


def run_faststream(batch: bool, bootstrap: str, topic: str, count: int) -> dict[str, float]:
    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker

    async def main() -> dict[str, float]:
        counter = Counter(count)
        broker = KafkaBroker(bootstrap)
        group = f"bench-fs-{uuid.uuid4().hex[:8]}"
        if batch:

            @broker.subscriber(  # type: ignore[misc]
                topic,
                batch=True,
                group_id=group,
                auto_offset_reset="earliest",
                max_records=2000,
                ack_policy=AckPolicy.ACK,  # commit after the handler
            )
            async def on_orders(orders: list[Order]) -> None:
                counter.add(len(orders))

        else:

            @broker.subscriber(topic, group_id=group, auto_offset_reset="earliest")  # type: ignore[misc]
            async def on_order(order: Order) -> None:
                counter.add()

        await broker.start()
        await counter.done.wait()
        await broker.stop()
        return counter.result()

    return asyncio.run(main())


def run_asyncfast(bootstrap: str, topic: str, count: int) -> dict[str, float]:
    import amgi_aiokafka
    from asyncfast import AsyncFast

    async def main() -> dict[str, float]:
        counter = Counter(count)
        app = AsyncFast()

        async def on_order(order: Order) -> None:
            counter.add()

        # AsyncFast reads annotations unevaluated; this module has postponed annotations.
        on_order.__annotations__ = {"order": Order, "return": None}
        app.channel(topic)(on_order)

        server = amgi_aiokafka.Server(
            app,
            topic,
            bootstrap_servers=bootstrap,
            group_id=f"bench-af-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
        )
        task = asyncio.create_task(server.serve())
        await counter.done.wait()
        server.stop()
        await asyncio.wait_for(task, 30)
        return counter.result()

    return asyncio.run(main())


CONTENDERS: dict[str, tuple[Callable[[str, str, int], dict[str, float]], bool]] = {
    "app-per-message": (lambda b, t, c: run_ours("app-per-message", b, t, c), False),
    "app-batch": (lambda b, t, c: run_ours("app-batch", b, t, c), False),
    "raw-app": (lambda b, t, c: run_ours("raw-app", b, t, c), False),
    "faststream-default": (lambda b, t, c: run_faststream(False, b, t, c), True),
    "faststream-batch": (lambda b, t, c: run_faststream(True, b, t, c), True),
    "asyncfast": (run_asyncfast, True),
}


# -- in-process rows -------------------------------------------------------------------------


async def memory_rate(kind: str, count: int) -> float:
    from amgi.runtime import Runtime, RuntimeConfig
    from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport

    broker = MemoryBroker.reset("bench-app")
    headers = [(b"content-type", b"application/json")]
    for i in range(count):
        broker.put("orders", headers, payload(i), {})
    counter = Counter(count)
    transport = MemoryTransport(["orders"], MemoryOptions(broker="bench-app", batch_size=1000))
    runtime = Runtime(our_app(kind, "orders", counter), transport, RuntimeConfig(lifespan="off"))
    server = asyncio.create_task(runtime.serve())
    await counter.done.wait()
    runtime.request_stop()
    await server
    return count / (counter.last - counter.first)


async def batch_call_costs(batches: int, size: int = 1000) -> dict[str, float]:
    """Microseconds per message of each of our handlers in the runtime's batch call alone
    (``call_app``, no server): the best of ``batches`` calls, alternating, so that load from
    elsewhere on the machine affects the figures least."""
    from amgi.runtime import RuntimeConfig
    from amgi.runtime.batch import call_app
    from amgi.transport import Batch, Message

    async def publish(*_: Any) -> None:
        raise AssertionError("nothing is published")

    headers = [(b"content-type", b"application/json")]
    messages = [Message(str(i), headers, payload(i), {}, 1) for i in range(size)]
    config = RuntimeConfig()
    apps = {
        k: our_app(k, "orders", Counter(1 << 62))
        for k in ("app-per-message", "app-batch", "raw-app")
    }
    best = dict.fromkeys(apps, float("inf"))
    for _ in range(batches):
        for kind, app in apps.items():
            for m in messages:
                m.bindings = {}
            started = time.perf_counter()
            settlement = await call_app(app, Batch("orders", messages), publish, config)
            best[kind] = min(best[kind], time.perf_counter() - started)
            assert len(settlement.acked) == size
    return {kind: seconds / size * 1e6 for kind, seconds in best.items()}


# -- the driver ------------------------------------------------------------------------------


def ensure_bench_venv() -> Path:
    """Create ``.venv-bench-app`` with the peers unless it already has them."""
    python = BENCH_VENV / "bin" / "python"
    check = [str(python), "-c", "import faststream.kafka, asyncfast, amgi_aiokafka"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *PEERS], check=True)
    subprocess.run([*pip, "--no-deps", *PEERS_NO_DEPS], check=True)
    return python


def prefill(bootstrap: str, count: int) -> str:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    topic = f"bench-app-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS)])[topic].result(10)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1000000})
    headers = [("content-type", b"application/json")]
    for i in range(count):
        while True:
            try:
                producer.produce(topic, payload(i), headers=headers, partition=i % PARTITIONS)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError("records not delivered")
    return topic


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):>10,.0f}  ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--memory-count", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-rounds", type=int, default=5)
    parser.add_argument("--batch-calls", type=int, default=300)
    parser.add_argument("--only", nargs="*", choices=sorted(CONTENDERS))
    parser.add_argument("--child-timeout", type=float, default=300, help="seconds per run")
    parser.add_argument("--child", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fn, _ = CONTENDERS[args.child]
        print(json.dumps(fn(args.bootstrap, args.topic, args.count)))
        return
    names = args.only if args.only is not None else list(CONTENDERS)
    peer_python = ensure_bench_venv() if any(CONTENDERS[n][1] for n in names) else None
    rates: dict[str, list[float]] = {n: [] for n in names}
    if names:
        print(f"pre-filling {args.count} records on {PARTITIONS} partitions ...", flush=True)
        topic = prefill(args.bootstrap, args.count)
    for round_no in range(args.rounds):
        order = names if round_no % 2 == 0 else list(reversed(names))
        for name in order:
            python = peer_python if CONTENDERS[name][1] else Path(sys.executable)
            cmd = [str(python), __file__, "--child", name, "--bootstrap", args.bootstrap]
            cmd += ["--topic", topic, "--count", str(args.count)]
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
            if python != Path(sys.executable):
                env.pop("PYTHONPATH")
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
            rates[name].append(args.count / result["drain"])
            print(
                f"  round {round_no + 1}: {name:<20} {rates[name][-1]:>10,.0f} msgs/s", flush=True
            )
    from amgi.runtime.gc import tune_for_server

    tune_for_server()  # as `amgi run` does, also for the in-process rows
    memory: dict[str, list[float]] = {k: [] for k in ("app-per-message", "app-batch", "raw-app")}
    for round_no in range(args.memory_rounds):
        kinds = list(memory) if round_no % 2 == 0 else list(reversed(memory))
        for kind in kinds:
            memory[kind].append(asyncio.run(memory_rate(kind, args.memory_count)))
    raw = statistics.median(rates["raw-app"]) if rates.get("raw-app") else None
    if names:
        print(
            f"\nKafka: {args.count:,} records (4-field JSON, ~100 B), {PARTITIONS} partitions, "
            f"validated into a pydantic model; {args.rounds} rounds, median (min-max)"
        )
        print(f"{'contender':<22}{'msgs/s (min-max)':>34}{'vs raw-app':>12}")
        for name in names:
            if not rates[name]:
                print(f"{name:<22}{'failed':>34}")
                continue
            ratio = f"{statistics.median(rates[name]) / raw:.0%}" if raw else "-"
            print(f"{name:<22}{spread(rates[name]):>34}{ratio:>12}")
    raw_median = statistics.median(memory["raw-app"])
    raw_best = max(memory["raw-app"])
    print(
        f"\nin-process (memory server, batches of 1,000), {args.memory_count:,} messages, "
        f"{args.memory_rounds} rounds; cost over the raw app from the medians and from the "
        "best rounds (the least disturbed by other load)"
    )
    print(f"{'contender':<22}{'msgs/s (min-max)':>34}{'us/msg (median)':>17}{'(best)':>9}")
    for kind, values in memory.items():
        over = 1e6 / statistics.median(values) - 1e6 / raw_median
        best = 1e6 / max(values) - 1e6 / raw_best
        print(f"{kind:<22}{spread(values):>34}{over:>17.2f}{best:>9.2f}")
    costs = asyncio.run(batch_call_costs(args.batch_calls))
    print(
        f"\nthe batch call alone (call_app, batches of 1,000), best of {args.batch_calls} "
        "alternating calls"
    )
    print(f"{'contender':<22}{'us/msg':>10}{'over raw':>10}")
    for kind, us in costs.items():
        print(f"{kind:<22}{us:>10.3f}{us - costs['raw-app']:>10.3f}")


if __name__ == "__main__":
    main()
