"""An AMGI app for the Kafka process tests: log every payload (then ack it) to a file.

``KAFKA_TEST_LOG`` names the file; ``KAFKA_TEST_DELAY`` (seconds) slows each batch down,
awaiting (an application waiting on I/O) or, with ``KAFKA_TEST_SPIN`` set, keeping the
CPU busy (a CPU-bound one).
Each line is ``<pid> <payload>``, written and flushed before the batch is acked.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

LOG = os.environ.get("KAFKA_TEST_LOG", "kafka-test.log")
DELAY = float(os.environ.get("KAFKA_TEST_DELAY", "0"))
SPIN = bool(os.environ.get("KAFKA_TEST_SPIN"))


def _record(payloads: list[str]) -> None:
    """Append and fsync the batch before it is acked (durable across SIGKILL)."""
    pid = os.getpid()
    with open(LOG, "a") as f:
        f.write("".join(f"{pid} {p}\n" for p in payloads))
        f.flush()
        os.fsync(f.fileno())


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "message":
        return
    events = []
    more = True
    while more:
        event = await receive()
        events.append(event)
        more = event.get("more_messages", False)
    if DELAY and SPIN:
        end = time.perf_counter() + DELAY
        while time.perf_counter() < end:
            pass
    elif DELAY:
        await asyncio.sleep(DELAY)
    _record([e["payload"].decode() for e in events])
    for event in events:
        await send({"type": "message.ack", "id": event["id"]})
