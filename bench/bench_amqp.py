"""Drain a pre-filled RabbitMQ queue: our AMQP server beside raw client loops and peers.

Every contender gets its own queue holding the same messages (default 50,000 bodies of 100
bytes with 2 headers) and is timed from the moment it starts connecting until every
message is acknowledged; the table shows messages per second and the time to the first
message. Contenders:

* ``raw aio-pika``: an aio-pika consumer, prefetch 1000, ``ack(multiple=True)`` every 100;
* ``raw aiormq``: the same loop on aiormq, the library our server uses;
* ``amgi amqp``: :class:`amgi.runtime.Runtime` over :class:`amgi.servers.amqp.AmqpTransport`
  with a raw app that acks everything;
* ``faststream``: FastStream's RabbitMQ subscriber (prefetch 1000, ack per message);
* ``amgi-aio-pika``: the upstream AMGI aio-pika server from PyPI.

Peers run in a subprocess of a separate virtual environment (``.venv-bench``, created and
filled on first use) because the upstream packages clash with our ``amgi`` package.

Run ``scripts/brokers/rabbitmq.sh`` first, then ``.venv/bin/python bench/bench_amqp.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench"
PEER_PACKAGES = ["faststream[rabbit]>=0.6", "amgi-aio-pika"]
URL = "amqp://guest:guest@127.0.0.1:5672/"
HEADERS = {"trace-id": "0123456789abcdef", "source": "bench"}
BODY = b"x" * 100

Result = tuple[float, float]  # (seconds until all acked, seconds until the first message)


# -- filling and clean-up -----------------------------------------------------------------


async def fill(queue: str, count: int) -> None:
    """Declare ``queue`` and publish ``count`` messages to it, confirmed in windows."""
    import aiormq
    from pamqp.commands import Basic

    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.queue_declare(queue, durable=True)
        props = Basic.Properties(headers=HEADERS, delivery_mode=2)
        window = 2000
        for start in range(0, count, window):
            n = min(window, count - start)
            await asyncio.gather(
                *(
                    channel.basic_publish(BODY, routing_key=queue, properties=props)
                    for _ in range(n)
                )
            )
    finally:
        await connection.close()


async def delete(queue: str) -> None:
    import aiormq

    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        for name in (queue, queue + ".dead-letter"):
            await channel.queue_delete(name)
    finally:
        await connection.close()


# -- in-process contenders ----------------------------------------------------------------


async def raw_aio_pika(queue: str, count: int) -> Result:
    import aio_pika

    done = asyncio.Event()
    seen = 0
    first = 0.0
    started = time.perf_counter()
    connection = await aio_pika.connect(URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1000)
    q = await channel.declare_queue(queue, durable=True)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen, first
        seen += 1
        if seen == 1:
            first = time.perf_counter()
        if seen % 100 == 0 or seen == count:
            await message.ack(multiple=True)
            if seen == count:
                done.set()

    await q.consume(on_message)
    await done.wait()
    elapsed = time.perf_counter() - started
    await connection.close()
    return elapsed, first - started


async def raw_aiormq(queue: str, count: int) -> Result:
    import aiormq

    done = asyncio.Event()
    seen = 0
    first = 0.0
    started = time.perf_counter()
    connection = await aiormq.connect(URL)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=1000)

    async def on_message(message: Any) -> None:
        nonlocal seen, first
        seen += 1
        if seen == 1:
            first = time.perf_counter()
        if seen % 100 == 0 or seen == count:
            await channel.basic_ack(message.delivery.delivery_tag, multiple=True)
            if seen == count:
                done.set()

    await channel.basic_consume(queue, on_message)
    await done.wait()
    elapsed = time.perf_counter() - started
    await connection.close()
    return elapsed, first - started


async def amgi_amqp(queue: str, count: int) -> Result:
    from amgi.runtime import Runtime, RuntimeConfig
    from amgi.servers.amqp import AmqpOptions, AmqpTransport
    from amgi.transport import Batch, Settlement

    done = asyncio.Event()
    acked = 0
    first = 0.0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal first
        if scope["type"] != "message":
            return
        if not first:
            first = time.perf_counter()
        more = True
        while more:
            event = await receive()
            await send({"type": "message.ack", "id": event["id"]})
            more = event.get("more_messages", False)

    class Counting(AmqpTransport):
        async def settle(self, batch: Batch, settlement: Settlement) -> None:
            nonlocal acked
            await super().settle(batch, settlement)
            acked += len(settlement.acked)
            if acked >= count:
                done.set()

    started = time.perf_counter()
    runtime = Runtime(app, Counting([queue], AmqpOptions(url=URL)), RuntimeConfig(lifespan="off"))
    serving = asyncio.create_task(runtime.serve())
    waiting = asyncio.create_task(done.wait())
    await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
    elapsed = time.perf_counter() - started
    runtime.request_stop()
    waiting.cancel()
    await asyncio.gather(serving, waiting, return_exceptions=True)
    serving.result()
    return elapsed, first - started


# -- peers in the bench venv --------------------------------------------------------------

FASTSTREAM = """
import asyncio, json, sys, time
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

async def main(url, queue, count):
    done = asyncio.Event()
    state = {"seen": 0, "first": 0.0}
    started = time.perf_counter()
    broker = RabbitBroker(url, logger=None)

    @broker.subscriber(RabbitQueue(queue, durable=True), channel=Channel(prefetch_count=1000))
    async def handle(body: bytes) -> None:
        state["seen"] += 1
        if state["seen"] == 1:
            state["first"] = time.perf_counter()
        if state["seen"] >= count:
            done.set()

    await broker.start()
    await done.wait()
    elapsed = time.perf_counter() - started
    await asyncio.sleep(0.05)  # let the last ack leave
    await broker.stop()
    print(json.dumps([elapsed, state["first"] - started]))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""

UPSTREAM = """
import asyncio, json, sys, time
import amgi_aio_pika

async def main(url, queue, count):
    done = asyncio.Event()
    state = {"acked": 0, "first": 0.0}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if not state["first"]:
            state["first"] = time.perf_counter()
        await send({"type": "message.ack", "id": ""})
        state["acked"] += 1
        if state["acked"] >= count:
            done.set()

    started = time.perf_counter()
    server = amgi_aio_pika.Server(app, queue, url=url)
    serving = asyncio.create_task(server.serve())
    waiting = asyncio.create_task(done.wait())
    await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
    elapsed = time.perf_counter() - started
    server.stop()
    waiting.cancel()
    await asyncio.gather(serving, waiting, return_exceptions=True)
    serving.result()
    print(json.dumps([elapsed, state["first"] - started]))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def bench_python() -> Path | None:
    """The bench venv's interpreter, created and filled with the peers when missing."""
    python = BENCH_VENV / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        check = "import faststream.rabbit, amgi_aio_pika"
        if subprocess.run([str(python), "-c", check], capture_output=True).returncode != 0:
            subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"peers unavailable: could not prepare {BENCH_VENV.name}: {exc}", file=sys.stderr)
        return None
    return python


def peer(source: str) -> Callable[[str, int], Awaitable[Result]]:
    async def run(queue: str, count: int) -> Result:
        python = bench_python()
        if python is None:
            raise RuntimeError("bench venv unavailable")
        proc = await asyncio.create_subprocess_exec(
            str(python),
            "-c",
            source,
            URL,
            queue,
            str(count),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 900)
        if proc.returncode != 0:
            raise RuntimeError(err.decode(errors="replace").strip().splitlines()[-1:])
        elapsed, first = json.loads(out.decode().strip().splitlines()[-1])
        return float(elapsed), float(first)

    return run


CONTENDERS: dict[str, Callable[[str, int], Awaitable[Result]]] = {
    "raw aio-pika (bulk ack)": raw_aio_pika,
    "raw aiormq (bulk ack)": raw_aiormq,
    "amgi amqp (this repo)": amgi_amqp,
    "faststream": peer(FASTSTREAM),
    "amgi-aio-pika (upstream)": peer(UPSTREAM),
}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=1, help="best of this many runs")
    parser.add_argument("--only", action="append", help="run only contenders containing this")
    args = parser.parse_args()
    names = [n for n in CONTENDERS if not args.only or any(o in n for o in args.only)]
    if any(n in ("faststream", "amgi-aio-pika (upstream)") for n in names):
        bench_python()
    best: dict[str, Result | str] = {}
    for _ in range(args.rounds):
        for name in names:
            queue = f"amgi-bench-{uuid.uuid4().hex[:8]}"
            await fill(queue, args.messages)
            try:
                result = await CONTENDERS[name](queue, args.messages)
            except Exception as exc:
                best.setdefault(name, f"failed: {exc}")
                continue
            finally:
                await delete(queue)
            previous = best.get(name)
            if not isinstance(previous, tuple) or result[0] < previous[0]:
                best[name] = result
    reference = best.get("raw aio-pika (bulk ack)")
    lower = best.get("raw aiormq (bulk ack)")
    print(f"\nDrain {args.messages} messages of {len(BODY)} bytes with {len(HEADERS)} headers")
    header = f"{'contender':<28} {'msgs/s':>10} {'first msg':>10}"
    print(f"{header} {'vs raw aio-pika':>16} {'vs raw aiormq':>14}")
    for name in names:
        value = best[name]
        if isinstance(value, str):
            print(f"{name:<28} {value}")
            continue
        elapsed, first = value
        ratio = f"{reference[0] / elapsed:.0%}" if isinstance(reference, tuple) else "-"
        ratio2 = f"{lower[0] / elapsed:.0%}" if isinstance(lower, tuple) else "-"
        rate = args.messages / elapsed
        print(f"{name:<28} {rate:>10,.0f} {first * 1000:>8.0f}ms {ratio:>16} {ratio2:>14}")


if __name__ == "__main__":
    asyncio.run(main())
