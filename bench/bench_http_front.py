"""HTTP push in-process: our front and runtime beside a bare ASGI app, no sockets, no uvicorn.

What ``bench_http.py`` cannot resolve (its rounds swing by a few µs): the CPU our server
adds per request on top of an app that answers 204 without reading anything. Each round
runs ``--concurrency`` requests at once, ``--requests`` in all, through
:class:`amgi.http.PushApp` (the front, the inbox, the runtime and an app that acks) and
through the bare app, alternating; each request is a binary-mode CloudEvent (the headers
and body ``bench_http.py`` posts) with ASGI ``receive``/``send`` callables like uvicorn's.
Prints the process CPU per request of both and the difference, median and min-max over
``--rounds``. Run ``.venv/bin/python bench/bench_http_front.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _common import ack_all
from amgi.http import PushApp
from amgi.runtime import RuntimeConfig

HEADERS = [
    (b"host", b"127.0.0.1:8080"),
    (b"content-length", b"76"),
    (b"content-type", b"application/json"),
    (b"ce-specversion", b"1.0"),
    (b"ce-id", b"a234-1234-1234"),
    (b"ce-source", b"/bench"),
    (b"ce-type", b"orders"),
]
BODY = b'{"order": 1, "pad": "' + b"x" * 75 + b'"}'
_START = {"type": "http.response.start", "status": 204, "headers": []}
_BODY = {"type": "http.response.body", "body": b""}

App = Callable[[Any, Any, Any], Awaitable[None]]


async def bare(scope: Any, receive: Any, send: Any) -> None:
    """Answer 204 without reading the request (the limit)."""
    await send(_START)
    await send(_BODY)


class Cycle:
    """One request's ``receive`` and ``send``, shaped like uvicorn's (an event to wait on)."""

    __slots__ = ("arrived", "sent")

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.arrived.set()
        self.sent = 0

    async def receive(self) -> dict[str, Any]:
        await self.arrived.wait()
        self.arrived.clear()
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent += 1


async def cpu_per_request(app: App, concurrency: int, requests: int) -> float:
    """Process CPU µs per request of ``requests`` requests, ``concurrency`` at a time."""
    loop = asyncio.get_running_loop()
    scope = {"type": "http", "method": "POST", "path": "/", "root_path": "", "headers": HEADERS}
    rounds = max(1, requests // concurrency)
    started = time.process_time()
    for _ in range(rounds):
        cycles = [Cycle() for _ in range(concurrency)]
        await asyncio.gather(
            *(loop.create_task(app(dict(scope), c.receive, c.send)) for c in cycles)
        )
        if any(c.sent != 2 for c in cycles):
            raise SystemExit("bench_http_front: a request was not answered with two events")
    return (time.process_time() - started) / (rounds * concurrency) * 1e6


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--concurrency", type=int, default=12, help="requests at once")
    parser.add_argument("--requests", type=int, default=64_000, help="requests per run")
    args = parser.parse_args()
    ours = PushApp(ack_all, config=RuntimeConfig(lifespan="off"))
    await ours.startup()
    gc.collect()
    gc.freeze()
    results: dict[str, list[float]] = {"amgi front + runtime": [], "bare ASGI app (204)": []}
    try:
        await cpu_per_request(ours, args.concurrency, 1000)  # warm-up
        for _ in range(args.rounds):
            results["amgi front + runtime"].append(
                await cpu_per_request(ours, args.concurrency, args.requests)
            )
            results["bare ASGI app (204)"].append(
                await cpu_per_request(bare, args.concurrency, args.requests)
            )
    finally:
        await ours.shutdown()
    extra = [a - b for a, b in zip(*results.values(), strict=True)]
    print(
        f"\nin-process, {args.concurrency} requests at once, {args.requests:,} per run, "
        f"{args.rounds} alternating rounds: CPU µs per request\n"
    )
    print("| | median | min-max |\n|---|---:|---:|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.2f} | {_span(values)} |")
    print(f"| ours minus bare, same round | {statistics.median(extra):.2f} | {_span(extra)} |")


if __name__ == "__main__":
    asyncio.run(main())
