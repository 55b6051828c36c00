"""Pieces every benchmark shares: the raw ack-everything app and a drain timer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from amgi.runtime import BatchStats, MetricsHook, Runtime, RuntimeConfig
from amgi.transport import Transport

HEADERS = [(b"content-type", b"application/json"), (b"trace-id", b"0123456789abcdef")]
PAYLOAD = b"x" * 100


async def ack_all(scope: Any, receive: Any, send: Any) -> None:
    """A raw AMGI app that acks every message and does nothing else."""
    if scope["type"] != "message":
        return
    more = True
    while more:
        message = await receive()
        await send({"type": "message.ack", "id": message["id"]})
        more = message.get("more_messages", False)


class DrainTimer(MetricsHook):
    """Counts acks settled by the runtime; ``done`` is set once ``expected`` were settled."""

    def __init__(self, expected: int, also: MetricsHook | None = None) -> None:
        self.expected = expected
        self.also = also
        self.acked = 0
        self.first: float | None = None
        self.done = asyncio.Event()

    def batch_settled(self, stats: BatchStats) -> None:
        if self.also is not None:
            self.also.batch_settled(stats)
        if self.first is None:
            self.first = time.perf_counter()
        self.acked += stats.acked
        if self.acked >= self.expected:
            self.done.set()


async def drain(
    transport: Transport,
    expected: int,
    *,
    app: Any = ack_all,
    metrics: MetricsHook | None = None,
    **config: Any,
) -> tuple[float, float]:
    """Run ``app`` (default ``ack_all``) on ``transport`` until ``expected`` acks are settled;
    ``metrics`` also receives every batch report.

    Returns ``(seconds in all, seconds to the first settled batch)``.
    """
    timer = DrainTimer(expected, metrics)
    runtime = Runtime(app, transport, RuntimeConfig(lifespan="off", **config), metrics=timer)
    started = time.perf_counter()
    task = asyncio.create_task(runtime.serve())
    done = asyncio.create_task(timer.done.wait())
    await asyncio.wait({task, done}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        done.cancel()
        task.result()
        raise RuntimeError("the server stopped before the queue was drained")
    elapsed = time.perf_counter() - started
    runtime.request_stop()
    await task
    first = (timer.first or started) - started
    return elapsed, first
