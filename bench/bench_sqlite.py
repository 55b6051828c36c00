"""The embedded SQLite server: drain a pre-filled queue, fetched and acked in batches.

Prints messages/s for a raw loop over the queue (lease a batch, delete it; no AMGI)
beside the SQLite server under the runtime with a raw app that acks everything, on the
same kind of file, same run.

    .venv/bin/python bench/bench_sqlite.py [--messages 100000] [--batch 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from _common import HEADERS, PAYLOAD, drain
from amgi.servers.sqlite import SqliteOptions, SqliteQueue, SqliteTransport


def fill(path: str, n: int) -> None:
    queue = SqliteQueue(path)
    queue.put_many("q", ((HEADERS, PAYLOAD, {}) for _ in range(n)))
    queue.close()


def raw(path: str, n: int, batch: int) -> float:
    queue = SqliteQueue(path)
    started = time.perf_counter()
    done = 0
    while done < n:
        token, messages = queue.lease("q", batch, 30)
        queue.settle(token, len(messages), [m.token for m in messages], [], [])
        done += len(messages)
    elapsed = time.perf_counter() - started
    queue.close()
    return elapsed


async def served(path: str, n: int, batch: int) -> float:
    transport = SqliteTransport(["q"], SqliteOptions(database=path, batch_size=batch))
    elapsed, _ = await drain(transport, n)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    n, b = args.messages, args.batch
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, run in (
            ("raw queue loop", lambda p: raw(p, n, b)),
            ("amgi sqlite server", lambda p: asyncio.run(served(p, n, b))),
        ):
            path = os.path.join(folder, f"{label.replace(' ', '-')}.db")
            fill(path, n)
            elapsed = run(path)
            rows.append((label, n / elapsed))
    print(f"{n:,} messages (100-byte payload, 2 headers), batches of {b}\n")
    print(f"{'':<22}{'msgs/s':>10}")
    for label, rate in rows:
        print(f"{label:<22}{rate:>10,.0f}")
    print(f"\nserver / raw: {rows[1][1] / rows[0][1]:.0%}")


if __name__ == "__main__":
    main()
