"""Drain a pre-filled JetStream stream: our server beside the raw nats-py loop and peers.

Each contender gets its own stream (file storage) holding the same messages (default
50,000, a 100-byte payload and 2 headers) on one subject, and its own durable consumer.
The payload is a JSON string, as the ``content-type`` header says: FastStream decodes
bodies by that header, and a body that fails to decode makes it log a traceback and
reject the message, which is not the path to measure.
It runs in its own process; the bench polls the consumer's info and counts from the first
message delivered until every message is acknowledged (nothing pending, nothing awaiting
an ack). Contenders:

* ``raw nats-py loop``: a durable pull consumer, ``fetch(1000)``, ``ack()`` for each
  message without waiting for a reply, one flush per batch;
* ``amgi nats``: ``amgi run bench._common:ack_all SUBJECT --server nats`` with its
  defaults (logging on), a raw app that acks everything;
* ``FastStream pull`` / ``FastStream push``: FastStream's JetStream subscriber (pull
  batches of 1000, or push), acking after the handler;
* ``amgi-nats pull``: the upstream AMGI NATS server (``amgi_nats.pull``) with an app that
  acks.

Peers run in ``.venv-bench`` (their pins clash with ours). Run ``scripts/brokers/nats.sh``
first, then ``.venv/bin/python bench/bench_nats.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from typing import Any

from _common import HEADERS
from _drain_race import Contender, Progress, bench_python, run_rounds, table
from amgi.servers.nats._headers import encode

URL = "nats://127.0.0.1:4222"
PAYLOAD = b'"' + b"x" * 98 + b'"'  # 100 bytes of JSON
PEERS = ["faststream[nats]>=0.6", "nats-py>=2.10", "amgi-nats==0.51.0"]

RAW = """
import asyncio, sys
import nats

async def main(url, subject, stream, durable, count):
    nc = await nats.connect(url)
    sub = await nc.jetstream().pull_subscribe(subject, durable=durable, stream=stream)
    done = 0
    while done < count:
        try:
            msgs = await sub.fetch(1000, timeout=1)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            await msg.ack()
        await nc.flush()
        done += len(msgs)
    await nc.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
"""

FASTSTREAM = """
import asyncio, sys
from faststream import FastStream
from faststream.nats import JStream, NatsBroker, PullSub

url, subject, stream, durable, mode = sys.argv[1:6]
broker = NatsBroker(url)
options = {"pull_sub": PullSub(batch_size=1000)} if mode == "pull" else {}

@broker.subscriber(subject, stream=JStream(stream, declare=False), durable=durable, **options)
async def handle(body: bytes) -> None:
    pass

asyncio.run(FastStream(broker).run())
"""

UPSTREAM = """
import sys
from amgi_nats.pull import run

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "message.ack", "id": ""})

run(app, sys.argv[2], servers=sys.argv[1])
"""


async def connect() -> Any:
    import nats

    return await nats.connect(URL)


async def fill(contender: Contender, count: int) -> str:
    """A new stream of ``count`` messages; the address is ``stream:subject:durable``."""
    from nats.js import api

    stream = f"BENCH_{uuid.uuid4().hex[:8]}"
    subject = f"amgi-bench.{stream.lower()}"
    # The upstream server names its durable after the stream it finds.
    durable = stream if contender.tag == "upstream" else "bench"
    nc = await connect()
    try:
        js = nc.jetstream()
        await js.add_stream(api.StreamConfig(name=stream, subjects=[subject]))
        headers = encode(HEADERS)
        for start in range(0, count, 1000):
            for _ in range(min(1000, count - start)):
                await nc.publish(subject, PAYLOAD, headers=headers)
            await nc.flush()
        while (await js.stream_info(stream)).state.messages < count:
            await asyncio.sleep(0.05)
        if contender.tag == "pull":  # the raw loop and ours bind to the same consumer setup
            await js.add_consumer(
                stream,
                api.ConsumerConfig(
                    durable_name=durable,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    max_deliver=-1,
                    max_ack_pending=20_000,
                    filter_subject=subject,
                ),
            )
    finally:
        await nc.close()
    return f"{stream}:{subject}:{durable}"


def progress_probe(count: int) -> Any:
    probe: list[Any] = []

    async def progress(address: str) -> Progress:
        from nats.js.errors import NotFoundError

        stream, _, durable = address.split(":")
        if not probe:
            probe.append(await connect())
        try:
            info = await probe[0].jsm().consumer_info(stream, durable)
        except NotFoundError:
            return False, False
        delivered = info.delivered.stream_seq or 0
        acked = info.ack_floor.stream_seq or 0
        return delivered > 0, acked >= count and not info.num_ack_pending

    return progress


async def cleanup(address: str) -> None:
    nc = await connect()
    try:
        await nc.jsm().delete_stream(address.split(":")[0])
    finally:
        await nc.close()


def contenders(count: int, only: list[str] | None) -> list[Contender]:
    python = sys.executable

    def parts(address: str) -> list[str]:
        return address.split(":")

    found = [
        Contender(
            "raw nats-py loop (fetch 1000, ack each, flush per batch)",
            lambda a: [python, "-c", RAW, URL, parts(a)[1], parts(a)[0], parts(a)[2], str(count)],
            "pull",
        ),
        Contender(
            "amgi nats (`amgi run` defaults)",
            lambda a: [
                python,
                "-m",
                "amgi",
                "run",
                "bench._common:ack_all",
                parts(a)[1],
                "--server",
                "nats",
                "--servers",
                URL,
                "--stream",
                parts(a)[0],
                "--durable",
                parts(a)[2],
            ],
            "pull",
        ),
    ]
    peer = bench_python(PEERS, "import faststream.nats, amgi_nats.pull")
    if peer is not None:
        for mode in ("pull", "push"):
            found.append(
                Contender(
                    f"FastStream JetStream subscriber, {mode}",
                    lambda a, m=mode: [  # type: ignore[misc]
                        str(peer),
                        "-c",
                        FASTSTREAM,
                        URL,
                        parts(a)[1],
                        parts(a)[0],
                        parts(a)[2],
                        m,
                    ],
                    mode,
                )
            )
        found.append(
            Contender(
                "amgi-nats 0.51 pull (upstream)",
                lambda a: [str(peer), "-c", UPSTREAM, URL, parts(a)[1]],
                "upstream",
            )
        )
    return [c for c in found if not only or any(o in c.name for o in only)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", action="append", help="run only contenders containing this")
    args = parser.parse_args()
    scores = await run_rounds(
        contenders(args.messages, args.only),
        args.rounds,
        args.messages,
        lambda c: fill(c, args.messages),
        progress_probe(args.messages),
        cleanup,
        timeout=600,
    )
    print(
        f"\nDrain {args.messages:,} JetStream messages ({len(PAYLOAD)}-byte payload, "
        f"{len(HEADERS)} headers), {args.rounds} rounds\n"
    )
    print(table(scores, next(iter(scores))))


if __name__ == "__main__":
    asyncio.run(main())
