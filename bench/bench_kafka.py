"""Drain a pre-filled Kafka topic: our server beside the raw client loops and the peers.

Run after ``scripts/brokers/kafka.sh``: ``.venv/bin/python bench/bench_kafka.py``.

One topic of ``--count`` 100-byte records with 2 headers (a content type, the same on every
record, and a trace id, new on each) on 4 partitions is produced once.
Each contender then drains it in its own process with a fresh consumer group, contenders
alternating over ``--rounds`` rounds (the order rotates each round). Every contender is
timed the same way, from outside: the driver starts its process and asks the broker every
10 ms for the group's committed offsets; a run ends when the broker reports every
partition committed to its end. The contender writes the wall time of its first message
to a file; time to first message is counted from the process start (interpreter start,
imports and group join included) and throughput from the first message to the end.
Every consumer gets ``session.timeout.ms`` 1000 and ``heartbeat.interval.ms`` 200.
CPU per message is read from ``/proc`` over the same span, in all and per round split by
thread: the main thread, the process's other threads and librdkafka's; per round also the
kernel part of the Python threads' CPU, and the CPU the hypervisor stole from this machine
(``/proc/stat``; 0 outside a virtual machine).

Contenders:

- ``amgi-run``: our server as a user runs it, the ``amgi run`` command (Runtime with
  signal handling, GC tuning, logging at INFO, lifespan auto), defaults except the group
  timings above; the app (:func:`app`) reads until ``more_messages`` is false and acks each id;
- ``amgi-run-ledger``: the same command with a fresh crash-ledger directory of its own (the
  Kafka transport declares stable ids, so ``amgi run`` keeps the ledger in its default
  directory too: the two differ in nothing else);
- ``amgi-inprocess``: the server embedded in a script (``Runtime(...).serve()``, lifespan
  off, GC tuning, no logging set up): the configuration this benchmark used before;
- ``raw-confluent`` / ``raw-confluent-async``: confluent-kafka ``consume`` + one commit per
  partition batch, synchronous or asynchronous (the latter as the server commits);
- ``protocol-minimum``: the asynchronous raw loop plus only the AMGI protocol's own
  per-record work (see :func:`run_floor`);
- from a separate venv (``.venv-bench``, created here on first use): ``raw-aiokafka``
  (``getmany`` + one commit per partition batch), ``amgi-aiokafka-prototype`` (our
  runtime over aiokafka, single-threaded: a measuring prototype, ``_kafka_aiokafka.py``,
  started like ``amgi run``), ``upstream-amgi-aiokafka`` (the
  ``amgi-aiokafka`` 0.51 server, one app call per record) and ``faststream-batch``
  (FastStream's Kafka subscriber in batch mode, committing after each batch).
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import functools
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _proc import cpu_seconds, stat_seconds, stop, system_seconds

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench"
UPSTREAM = "0.51.0"
PARTITIONS = 4
SESSION_MS = 1000
HEARTBEAT_MS = 200
WATCH_EVERY = 0.01


# -- what every contender reports -----------------------------------------------------------

_first_written = False


def first_message() -> None:
    """Write the wall time of the first message to ``$BENCH_FIRST`` (once)."""
    global _first_written
    if not _first_written:
        _first_written = True
        Path(os.environ["BENCH_FIRST"]).write_text(repr(time.time()))


async def app(scope: Any, receive: Any, send: Any) -> None:
    """The app ``amgi run`` serves: read until ``more_messages`` is false, ack each id."""
    if scope["type"] != "message":
        return
    first_message()
    more = True
    while more:
        event = await receive()
        more = event["more_messages"]
        await send({"type": "message.ack", "id": event["id"]})


# -- the contenders (each runs in its own process until the driver stops it) ----------------


def _raw_consumer(bootstrap: str, topic: str, group: str) -> Any:
    """A subscribed confluent-kafka consumer for the raw loops."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": SESSION_MS,
            "heartbeat.interval.ms": HEARTBEAT_MS,
            "fetch.queue.backoff.ms": 10,  # as the amgi server sets it (default: 1000)
        }
    )
    consumer.subscribe([topic])
    return consumer


def _take(consumer: Any) -> list[Any]:
    """Up to 2000 records: what is on hand, else wait up to 0.1 s for one and what follows."""
    records: list[Any] = consumer.consume(2000, 0)
    if not records:
        records = consumer.consume(1, 0.1)
        if records:
            records += consumer.consume(1999, 0)
    return records


def run_raw(bootstrap: str, topic: str, group: str, asynchronous: bool = False) -> None:
    """consume + one commit per partition batch, synchronous or asynchronous."""
    from confluent_kafka import TopicPartition

    consumer = _raw_consumer(bootstrap, topic, group)
    while True:
        records = _take(consumer)
        if not records:
            continue
        first_message()
        last: dict[int, int] = {}
        for r in records:
            if r.error() is None:
                r.value()
                r.headers()
                last[r.partition()] = r.offset()
        for p, off in last.items():  # one commit per partition batch
            consumer.commit(offsets=[TopicPartition(topic, p, off + 1)], asynchronous=asynchronous)


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


def run_floor(bootstrap: str, topic: str, group: str) -> None:
    """``raw-confluent-async`` plus the least per-record work the AMGI protocol asks of
    any server, and nothing else: the receive event the spec defines (text id,
    ``(bytes, bytes)`` headers, the Kafka bindings), one app call per partition batch
    that awaits ``receive`` and ``send`` per record, and a check that each ack names the
    record just handed out. No runtime, no validation beyond that, no retries, one thread.
    """
    from confluent_kafka import TopicPartition

    async def main() -> None:
        consumer = _raw_consumer(bootstrap, topic, group)
        names = {"content-type": b"content-type", "trace-id": b"trace-id"}
        while True:
            records = _take(consumer)
            if not records:
                continue
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
                last = run[-1].offset()
                consumer.commit(offsets=[TopicPartition(topic, p, last + 1)], asynchronous=True)

    asyncio.run(main())


def _amgi_options(bootstrap: str, group: str) -> list[str]:
    """The ``amgi run`` flags of the benchmark: defaults but the group timings."""
    return [
        "--server",
        "kafka",
        "--bootstrap-servers",
        bootstrap,
        "--group-id",
        group,
        "--auto-offset-reset",
        "earliest",
        "--session-timeout-ms",
        str(SESSION_MS),
        "--heartbeat-interval-ms",
        str(HEARTBEAT_MS),
    ]


def run_amgi_ledger(bootstrap: str, topic: str, group: str) -> None:
    """``amgi run`` (its ``main``, as the command calls it) with the Kafka transport
    declaring stable ids, which turns the runtime's crash ledger on."""
    from amgi.cli import main
    from amgi.servers.kafka import KafkaTransport

    ledger = tempfile.mkdtemp(prefix="bench-ledger-")
    KafkaTransport.stable_ids = True
    try:
        argv = ["run", "bench_kafka:app", topic, *_amgi_options(bootstrap, group)]
        main([*argv, "--crash-ledger", ledger])
    finally:
        shutil.rmtree(ledger, ignore_errors=True)


def run_amgi_inprocess(bootstrap: str, topic: str, group: str) -> None:
    """The server embedded in a script: Runtime in-process, lifespan off, GC tuned."""
    from amgi.runtime import Runtime, RuntimeConfig
    from amgi.runtime.gc import tune_for_server
    from amgi.servers.kafka import KafkaOptions, KafkaTransport

    options = KafkaOptions(
        bootstrap_servers=bootstrap,
        group_id=group,
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=HEARTBEAT_MS,
    )
    runtime = Runtime(app, KafkaTransport([topic], options), RuntimeConfig(lifespan="off"))
    tune_for_server()
    asyncio.run(runtime.serve())


def _aiokafka_group_timings() -> None:
    """Give every AIOKafkaConsumer of this process the benchmark's group timings."""
    from aiokafka import AIOKafkaConsumer

    init = AIOKafkaConsumer.__init__

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("session_timeout_ms", SESSION_MS)
        kwargs.setdefault("heartbeat_interval_ms", HEARTBEAT_MS)
        init(self, *args, **kwargs)

    AIOKafkaConsumer.__init__ = patched  # type: ignore[method-assign]


def run_raw_aiokafka(bootstrap: str, topic: str, group: str) -> None:
    """aiokafka ``getmany`` + one commit per partition batch (the peers' client)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def main() -> None:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=SESSION_MS,
            heartbeat_interval_ms=HEARTBEAT_MS,
        )
        await consumer.start()
        while True:
            fetched = await consumer.getmany(timeout_ms=100, max_records=2000)
            if fetched:
                first_message()
            for tp, records in fetched.items():
                for r in records:
                    r.value  # noqa: B018  (touch what an app would read)
                    r.headers  # noqa: B018
                offset = records[-1].offset + 1
                await consumer.commit({TopicPartition(topic, tp.partition): offset})

    asyncio.run(main())


def run_upstream(bootstrap: str, topic: str, group: str) -> None:
    """The ``amgi-aiokafka`` server, one app call per record, acked."""
    import amgi_aiokafka

    _aiokafka_group_timings()

    async def upstream_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                kind = event["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] == "message":
            first_message()
            await send({"type": "message.ack", "id": ""})

    server = amgi_aiokafka.Server(
        upstream_app,
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
    )
    asyncio.run(server.serve())


def run_faststream(bootstrap: str, topic: str, group: str) -> None:
    """FastStream's Kafka subscriber in batch mode, committing after each batch."""
    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker

    async def main() -> None:
        broker = KafkaBroker(bootstrap)

        @broker.subscriber(  # type: ignore[misc]
            topic,
            batch=True,
            group_id=group,
            auto_offset_reset="earliest",
            max_records=2000,
            session_timeout_ms=SESSION_MS,
            heartbeat_interval_ms=HEARTBEAT_MS,
            ack_policy=AckPolicy.ACK,  # commit after processing, as the others do
        )
        async def handle(messages: list[bytes]) -> None:
            first_message()

        await broker.start()
        await asyncio.Event().wait()

    asyncio.run(main())


def run_amgi_aiokafka(bootstrap: str, topic: str, group: str) -> None:
    """Our runtime over aiokafka (a measuring prototype, see ``_kafka_aiokafka.py``)."""
    from _kafka_aiokafka import run

    run(app, bootstrap, topic, group, SESSION_MS, HEARTBEAT_MS)


AMGI_RUN = "amgi-run"
"""Not a function: the driver starts the ``amgi`` command itself."""

CONTENDERS: dict[str, tuple[Any, bool]] = {
    AMGI_RUN: (None, False),
    "amgi-run-ledger": (run_amgi_ledger, False),
    "amgi-inprocess": (run_amgi_inprocess, False),
    "raw-confluent": (run_raw, False),
    "raw-confluent-async": (functools.partial(run_raw, asynchronous=True), False),
    "protocol-minimum": (run_floor, False),
    "raw-aiokafka": (run_raw_aiokafka, True),
    "amgi-aiokafka-prototype": (run_amgi_aiokafka, True),
    "upstream-amgi-aiokafka": (run_upstream, True),
    "faststream-batch": (run_faststream, True),
}
RAW = ("raw-confluent", "raw-confluent-async", "raw-aiokafka")
WITH_SRC = ("amgi-aiokafka-prototype",)
"""Peers' venv contenders that also import ``amgi`` from this tree."""


# -- the driver -----------------------------------------------------------------------------


def ensure_bench_venv() -> Path:
    """Create ``.venv-bench`` with the peers unless it already has them."""
    python = BENCH_VENV / "bin" / "python"
    check = [
        str(python),
        "-c",
        "import faststream.kafka, importlib.metadata as m; "
        f"assert m.version('amgi-aiokafka') == {UPSTREAM!r}",
    ]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([*pip, "faststream[kafka]", "aiokafka", "amgi-types"], check=True)
    upstream = [f"amgi-aiokafka=={UPSTREAM}", f"amgi-common=={UPSTREAM}"]
    if subprocess.run([*pip, *upstream]).returncode != 0:
        # Its amgi-types pin may not be published where pip looks; the newest one serves.
        subprocess.run([*pip, "--no-deps", *upstream], check=True)
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
    for i in range(count):
        # One header repeats its value (a content type), the other is new on each record.
        headers = [("content-type", b"application/octet-stream"), ("trace-id", b"%016x" % i)]
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


def _command(
    name: str, peer_python: Path | None, bootstrap: str, topic: str, group: str
) -> list[str]:
    if name == AMGI_RUN:
        amgi = Path(sys.executable).with_name("amgi")
        return [str(amgi), "run", "bench_kafka:app", topic, *_amgi_options(bootstrap, group)]
    python = peer_python if CONTENDERS[name][1] else Path(sys.executable)
    assert python is not None
    return [str(python), __file__, "--child", name, bootstrap, topic, group]


def _environment(name: str, first_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["BENCH_FIRST"] = str(first_file)
    if not CONTENDERS[name][1] or name in WITH_SRC:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])
    return env


def _committed(watcher: Any, partitions: list[Any]) -> dict[int, int]:
    from confluent_kafka import KafkaException

    try:
        return {tp.partition: tp.offset for tp in watcher.committed(partitions, timeout=5)}
    except KafkaException:
        return {}


THREAD_KINDS = ("main", "other", "librdkafka")
"""How :func:`_thread_cpu` sorts a contender's threads: the main thread (the one running
Python's event loop or loop), its other threads (Python ones, e.g. our consumer thread,
and any other library's), and librdkafka's own (named ``rdk:...``)."""


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of process ``pid`` so far, by :data:`THREAD_KINDS`, and the system
    (kernel) part of the main and other threads' as ``system`` (threads that ended are
    not counted: none end during a drain)."""
    seconds = dict.fromkeys((*THREAD_KINDS, "system"), 0.0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        if int(task.name) == pid:
            kind = "main"
        elif name.startswith("rdk:"):
            kind = "librdkafka"
        else:
            kind = "other"
        seconds[kind] += stat_seconds(raw)
        if kind != "librdkafka":
            seconds["system"] += system_seconds(raw)
    return seconds


def _steal_seconds() -> float:
    """Seconds the hypervisor ran something else while this machine's CPUs had work
    (``steal`` of ``/proc/stat``, all CPUs together); 0 on a machine that is not a guest."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def measure(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    args: argparse.Namespace,
    topic: str,
    group: str,
    ends: dict[int, int],
    first_file: Path,
    log: Path,
) -> dict[str, float] | None:
    """Start one contender, wait until the broker reports its group committed to every
    partition's end, stop it; ``None`` (and the reason on stderr) when it did not get there."""
    from confluent_kafka import Consumer, TopicPartition

    watcher = Consumer(
        {"bootstrap.servers": args.bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    partitions = [TopicPartition(topic, p) for p in ends]
    end = 0.0
    cpu_first = cpu_end = None
    threads_first: dict[str, float] = {}
    threads_end: dict[str, float] = {}
    steal_first = steal_end = math.nan
    with log.open("w") as out:
        started = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + args.child_timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if cpu_first is None and first_file.exists():
                    cpu_first = cpu_seconds(proc.pid)
                    threads_first = _thread_cpu(proc.pid)
                    steal_first = _steal_seconds()
                committed = _committed(watcher, partitions)
                if committed and all(committed.get(p, -1) >= e for p, e in ends.items()):
                    end = time.time()
                    cpu_end = cpu_seconds(proc.pid)
                    threads_end = _thread_cpu(proc.pid)
                    steal_end = _steal_seconds()
                    break
                time.sleep(WATCH_EVERY)
        finally:
            stop(proc)
            watcher.close()
    if not end:
        why = (
            "exited" if proc.returncode is not None and time.monotonic() < deadline else "timed out"
        )
        tail = log.read_text()[-1500:]
        print(f"{name} {why} before its commits reached the end:\n{tail}", file=sys.stderr)
        return None
    first = float(first_file.read_text())
    cpu = cpu_end - cpu_first if cpu_end is not None and cpu_first is not None else float("nan")
    result = {"first": first - started, "drain": end - first, "cpu": cpu}
    result["steal"] = (steal_end - steal_first) / result["drain"]
    for kind in (*THREAD_KINDS, "system"):
        result[kind] = threads_end.get(kind, math.nan) - threads_first.get(kind, math.nan)
    return result


def run_child(name: str, bootstrap: str, topic: str, group: str) -> None:
    fn, _ = CONTENDERS[name]
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the driver is done with it
    fn(bootstrap, topic, group)


def _span(values: list[float], fmt: str) -> str:
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


def report(results: dict[str, list[dict[str, float]]], count: int, loads: list[float]) -> None:
    rates = {n: [count / r["drain"] for r in rs] for n, rs in results.items() if rs}
    medians = {n: statistics.median(v) for n, v in rates.items()}
    raws = [medians[n] for n in RAW if n in medians]
    best_raw = max(raws) if raws else 0.0
    print(f"\n{count} records x 100 B, 2 headers, {PARTITIONS} partitions, committed to the end")
    print(f"load average (1 min) during the runs: {_span(loads, '.1f')}")
    print(
        f"{'contender':<24}{'msgs/s median':>14}{'min-max':>18}{'max/min':>9}"
        f"{'first msg (s)':>15}{'first min-max':>15}{'vs best raw':>13}"
        f"{'CPU µs/msg':>12}{'runs':>6}"
    )
    for name in sorted(medians, key=lambda n: -medians[n]):
        firsts = [r["first"] for r in results[name]]
        share = f"{medians[name] / best_raw:.0%}" if best_raw else "-"
        cpu = statistics.median(r["cpu"] for r in results[name]) / count * 1e6
        print(
            f"{name:<24}{medians[name]:>14,.0f}{_span(rates[name], ',.0f'):>18}"
            f"{max(rates[name]) / min(rates[name]):>9.2f}{statistics.median(firsts):>15.2f}"
            f"{_span(firsts, '.2f'):>15}{share:>13}{cpu:>12.2f}{len(rates[name]):>6}"
        )
    order = sorted(medians, key=lambda n: -medians[n])
    _per_round("msgs/s per round:", {n: [f"{r:>10,.0f}" for r in rates[n]] for n in order})
    _per_round(
        "CPU µs/msg by thread, per round (main thread / other threads / librdkafka's):",
        {
            n: [
                format("/".join(f"{r[k] / count * 1e6:.1f}" for k in THREAD_KINDS), ">16")
                for r in results[n]
            ]
            for n in order
        },
    )
    _per_round(
        "of which system (kernel) CPU µs/msg in the main and other threads, per round:",
        {n: [f"{r['system'] / count * 1e6:>10.2f}" for r in results[n]] for n in order},
    )
    _per_round(
        "CPU stolen by the hypervisor during the drain, % of one CPU, per round:",
        {n: [f"{r['steal']:>10.1%}" for r in results[n]] for n in order},
    )


def _per_round(title: str, rows: dict[str, list[str]]) -> None:
    """One block of the report: a line per contender, its rounds' cells side by side."""
    print(f"\n{title}")
    for name, cells in rows.items():
        print(f"  {name:<24}" + "".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3, help="runs per contender, alternating")
    parser.add_argument("--only", nargs="*", choices=sorted(CONTENDERS))
    parser.add_argument("--child-timeout", type=float, default=180, help="seconds per run")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(*args.child)
        return
    names = args.only or list(CONTENDERS)
    peer_python = ensure_bench_venv() if any(CONTENDERS[n][1] for n in names) else None
    # pip compiles an installed package's modules; a source tree started with
    # PYTHONDONTWRITEBYTECODE set would compile them at each start instead (~0.1-0.2 s).
    compileall.compile_dir(str(ROOT / "src" / "amgi"), quiet=1)
    print(f"pre-filling {args.count} records on {PARTITIONS} partitions ...", flush=True)
    topic, ends = prefill(args.bootstrap, args.count)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp:
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                group = f"bench-{name}-{uuid.uuid4().hex[:8]}"
                first_file = Path(tmp) / f"{name}-{round_}.first"
                cmd = _command(name, peer_python, args.bootstrap, topic, group)
                env = _environment(name, first_file)
                log = Path(tmp) / f"{name}-{round_}.log"
                result = measure(name, cmd, env, args, topic, group, ends, first_file, log)
                if result is not None:
                    results[name].append(result)
                    print(
                        f"round {round_ + 1} {name}: {args.count / result['drain']:,.0f} msgs/s,"
                        f" first message {result['first']:.2f} s,"
                        f" CPU {result['cpu'] / args.count * 1e6:.2f} µs/msg",
                        flush=True,
                    )
                loads.append(os.getloadavg()[0])
    report(results, args.count, loads)


if __name__ == "__main__":
    main()
