"""Runtime overhead: the in-memory server and a raw AMGI app that acks every message.

Prints, for batches of 1,000 messages (100-byte payload, 2 headers), pinned to one core:

* floor   - the app's own loop driven by the cheapest possible receive()/send() pair
            (prebuilt events, a list append per ack): what any AMGI server must pay;
* runtime - the full runtime over the memory server: fetch, batch call, validation,
            settlement, retry bookkeeping, metrics hook.

    .venv/bin/python bench/bench_runtime.py [--messages 500000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from _common import HEADERS, PAYLOAD, ack_all, drain
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


async def runtime(n: int, batch: int) -> float:
    broker = MemoryBroker.reset("bench")
    for _ in range(n):
        broker.put("q", HEADERS, PAYLOAD, {})
    transport = MemoryTransport(["q"], MemoryOptions(broker="bench", batch_size=batch))
    elapsed, _ = await drain(transport, n)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    n, b = args.messages, args.batch
    rows = []
    for label, fn in (("floor (app loop only)", floor), ("runtime + memory server", runtime)):
        best = min(asyncio.run(fn(n, b)) for _ in range(args.rounds))
        rows.append((label, n / best, best / n * 1e6))
    print(f"{n:,} messages, batches of {b:,}, one core, best of {args.rounds}\n")
    print(f"{'':<26}{'msgs/s':>12}{'us/msg':>10}")
    for label, rate, us in rows:
        print(f"{label:<26}{rate:>12,.0f}{us:>10.2f}")
    cost = rows[1][2] - rows[0][2]
    print(f"\nruntime cost per message (runtime - floor): {cost:.2f} us")


if __name__ == "__main__":
    main()
