"""Runtime overhead: the in-memory server and a raw AMGI app that acks every message.

Prints, for batches of 1,000 messages (100-byte payload, 2 headers), pinned to one core,
the median and min-max over the rounds, contenders alternating within each round:

* floor    - the app's own loop driven by the cheapest possible receive()/send() pair
             (prebuilt events, a list append per ack): what any AMGI server must pay;
* runtime  - the full runtime over the memory server: fetch, batch call, validation,
             settlement, retry bookkeeping, metrics hook (what ``amgi run`` does);
* + ops off - the same through ``amgi.ops.run.prepare`` with every operations option at
             its default (no metrics port, tracing auto without a tracer provider);
* + metrics - Prometheus metrics on (what ``--metrics-port`` adds);
* + tracing - OpenTelemetry tracing with the SDK's tracer provider and no exporter
             (a consumer span per message, a batch span per call), for messages without
             and with a ``traceparent`` header (extracted, linked from the batch span).

    .venv/bin/python bench/bench_runtime.py [--messages 500000] [--batch 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _common import HEADERS, PAYLOAD, ack_all, drain
from amgi.ops.config import OpsConfig
from amgi.ops.metrics import PrometheusMetrics
from amgi.ops.run import prepare
from amgi.ops.tracing import instrument
from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport


async def floor(n: int, batch: int) -> float:
    events = [
        {
            "type": "message.receive",
            "id": str(i),
            "headers": HEADERS,
            "payload": PAYLOAD,
            "bindings": {},
            "more_messages": i != batch - 1,
        }
        for i in range(batch)
    ]
    scope = {"type": "message", "amgi": {"version": "1.0", "spec_version": "1.0"}, "address": "q"}
    acked: list[str] = []
    started = time.perf_counter()
    for _ in range(n // batch):
        it = iter(events)

        async def receive() -> Any:
            return next(it)  # noqa: B023

        async def send(event: Any) -> None:
            acked.append(event["id"])

        await ack_all(scope, receive, send)
        acked.clear()
    return time.perf_counter() - started


async def _runtime(n: int, batch: int, headers: Any = HEADERS, **kwargs: Any) -> float:
    broker = MemoryBroker.reset("bench")
    for _ in range(n):
        broker.put("q", headers, PAYLOAD, {})
    transport = MemoryTransport(["q"], MemoryOptions(broker="bench", batch_size=batch))
    elapsed, _ = await drain(transport, n, **kwargs)
    return elapsed


async def runtime(n: int, batch: int) -> float:
    return await _runtime(n, batch)


async def ops_off(n: int, batch: int) -> float:
    ops = prepare(OpsConfig(), ack_all, "memory")
    return await _runtime(n, batch, app=ops.app)


async def metrics_on(n: int, batch: int) -> float:
    return await _runtime(n, batch, metrics=PrometheusMetrics("memory"))


async def tracing_on(n: int, batch: int) -> float:
    from opentelemetry.sdk.trace import TracerProvider

    return await _runtime(n, batch, app=instrument(ack_all, "memory", TracerProvider()))


async def tracing_on_traced(n: int, batch: int) -> float:
    from opentelemetry.sdk.trace import TracerProvider

    app = instrument(ack_all, "memory", TracerProvider())
    return await _runtime(n, batch, [*HEADERS, TRACEPARENT], app=app)


TRACEPARENT = (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")

CONTENDERS: list[tuple[str, Callable[[int, int], Awaitable[float]]]] = [
    ("floor (app loop only)", floor),
    ("runtime + memory server", runtime),
    ("  + ops prepared, all off", ops_off),
    ("  + Prometheus metrics", metrics_on),
    ("  + tracing (SDK, no export)", tracing_on),
    ("  + tracing, traceparent in", tracing_on_traced),
]


def hook_cost(batch: int, calls: int = 100_000) -> float:
    """Microseconds one ``PrometheusMetrics.batch_settled`` call takes (a batch report)."""
    from amgi.runtime.metrics import BatchStats

    metrics = PrometheusMetrics("memory")
    stats = BatchStats("q", batch, batch - 2, 1, 1, 0.004)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            metrics.batch_settled(stats)
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, contenders alternating")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    n, b = args.messages, args.batch
    times: dict[str, list[float]] = {label: [] for label, _ in CONTENDERS}
    for _ in range(args.rounds):
        for label, fn in CONTENDERS:
            times[label].append(asyncio.run(fn(n, b)))
    print(f"{n:,} messages, batches of {b:,}, one core, {args.rounds} rounds alternating\n")
    print(f"{'':<30}{'msgs/s (median)':>16}{'min-max':>22}{'us/msg':>9}{'vs runtime':>12}")
    base = statistics.median(times["runtime + memory server"])
    for label, _ in CONTENDERS:
        med = statistics.median(times[label])
        lo, hi = n / max(times[label]), n / min(times[label])
        ratio = f"{base / med:.1%}" if label != "floor (app loop only)" else ""
        print(
            f"{label:<30}{n / med:>16,.0f}{f'{lo:,.0f}-{hi:,.0f}':>22}"
            f"{med / n * 1e6:>9.2f}{ratio:>12}"
        )
    floor_us = statistics.median(times["floor (app loop only)"]) / n * 1e6
    print(f"\nruntime cost per message (runtime - floor): {base / n * 1e6 - floor_us:.2f} us")
    hook = hook_cost(b)
    share = hook / (base / n * 1e6 * b)
    print(f"metrics hook per batch report: {hook:.2f} us = {share:.2%} of a batch's runtime time")
    for label in ("  + tracing (SDK, no export)", "  + tracing, traceparent in"):
        us = statistics.median(times[label]) / n * 1e6 - base / n * 1e6
        print(f"tracing cost per message ({label.strip(' +')}): {us:.2f} us")


if __name__ == "__main__":
    main()
