"""Drain a pre-filled Redis stream: our server beside the raw redis-py loop and FastStream.

Each contender gets its own stream of the same entries (default 200,000, a 100-byte
payload and 2 headers, in the field layout of docs/servers/redis.md) and a consumer group
created at position 0. It runs in its own process; the bench polls ``XINFO GROUPS`` and
counts from the first entry delivered to the moment the group has read every entry and
has nothing pending (every entry acknowledged). Contenders:

* ``raw redis-py loop``: ``XREADGROUP COUNT 1000`` + one ``XACK`` per batch, redis-py's
  asyncio client with hiredis;
* ``amgi redis``: ``amgi run bench._common:ack_all STREAM --server redis`` with its
  defaults (logging on), a raw app that acks everything;
* ``faststream batch``: FastStream's Redis stream subscriber in batch mode (1000 per read,
  hiredis), acking after the handler; runs in ``.venv-bench``.

Run ``scripts/brokers/redis.sh`` first, then ``.venv/bin/python bench/bench_redis.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from typing import Any

from _common import HEADERS, PAYLOAD
from _drain_race import Contender, Progress, bench_python, run_rounds, table
from amgi.servers.redis._fields import encode

URL = "redis://127.0.0.1:6379/0"
PEERS = ["faststream[redis]>=0.6", "redis[hiredis]>=5"]

RAW = """
import asyncio, sys
import redis.asyncio as aioredis

async def main(url, stream, group, count):
    client = aioredis.Redis.from_url(url)
    done = 0
    while done < count:
        reply = await client.xreadgroup(group, "raw", {stream: ">"}, count=1000, block=1000)
        if not reply:
            continue
        ids = [entry_id for entry_id, _ in reply[0][1]]
        await client.xack(stream, group, *ids)
        done += len(ids)
    await client.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""

FASTSTREAM = """
import asyncio, sys
from faststream import FastStream
from faststream.redis import RedisBroker, StreamSub

url, stream, group = sys.argv[1:4]
broker = RedisBroker(url)

@broker.subscriber(stream=StreamSub(stream, group=group, consumer="fs", batch=True,
                                    max_records=1000))
async def handle(messages: list) -> None:
    pass

asyncio.run(FastStream(broker).run())
"""


def group_of(stream: str) -> str:
    return f"{stream}-group"


async def client() -> Any:
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(URL, protocol=2)


async def fill(count: int) -> str:
    stream = f"amgi-bench-{uuid.uuid4().hex[:8]}"
    fields = encode(HEADERS, PAYLOAD)
    c = await client()
    try:
        for start in range(0, count, 5000):
            async with c.pipeline(transaction=False) as pipe:
                for _ in range(min(5000, count - start)):
                    pipe.execute_command("XADD", stream, "*", *fields)
                await pipe.execute()
        await c.execute_command("XGROUP", "CREATE", stream, group_of(stream), "0")
    finally:
        await c.aclose()
    return stream


def progress_probe(count: int) -> Any:
    probe: list[Any] = []

    async def progress(stream: str) -> Progress:
        if not probe:
            probe.append(await client())
        groups = await probe[0].xinfo_groups(stream)
        for g in groups:
            if g["name"].decode() == group_of(stream):
                read = int(g.get("entries-read") or 0)
                return read > 0 or int(g["pending"]) > 0, read >= count and int(g["pending"]) == 0
        return False, False

    return progress


async def cleanup(stream: str) -> None:
    c = await client()
    try:
        await c.delete(stream, f"{stream}.dlq")
    finally:
        await c.aclose()


def contenders(count: int, only: list[str] | None) -> list[Contender]:
    python = sys.executable
    found = [
        Contender(
            "raw redis-py loop (XREADGROUP 1000 + XACK, hiredis)",
            lambda s: [python, "-c", RAW, URL, s, group_of(s), str(count)],
        ),
        Contender(
            "amgi redis (`amgi run` defaults)",
            lambda s: [
                python,
                "-m",
                "amgi",
                "run",
                "bench._common:ack_all",
                s,
                "--server",
                "redis",
                "--url",
                URL,
                "--group",
                group_of(s),
            ],
        ),
    ]
    peer = bench_python(PEERS, "import faststream.redis, hiredis")
    if peer is not None:
        found.append(
            Contender(
                "FastStream stream subscriber, batch 1000 (hiredis)",
                lambda s: [str(peer), "-c", FASTSTREAM, URL, s, group_of(s)],
            )
        )
    return [c for c in found if not only or any(o in c.name for o in only)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", action="append", help="run only contenders containing this")
    args = parser.parse_args()
    scores = await run_rounds(
        contenders(args.messages, args.only),
        args.rounds,
        args.messages,
        lambda _: fill(args.messages),
        progress_probe(args.messages),
        cleanup,
        timeout=600,
    )
    print(
        f"\nDrain {args.messages:,} stream entries ({len(PAYLOAD)}-byte payload, "
        f"{len(HEADERS)} headers), {args.rounds} rounds\n"
    )
    print(table(scores, next(iter(scores))))


if __name__ == "__main__":
    asyncio.run(main())
