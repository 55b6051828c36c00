"""An AMGI app for the Kafka process tests: log every payload (then ack it) to a file.

``KAFKA_TEST_LOG`` names the file; ``KAFKA_TEST_DELAY`` (seconds) slows each batch down.
Each line is ``<pid> <payload>``, written and flushed before the batch is acked.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

LOG = os.environ.get("KAFKA_TEST_LOG", "kafka-test.log")
DELAY = float(os.environ.get("KAFKA_TEST_DELAY", "0"))


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
    if DELAY:
        await asyncio.sleep(DELAY)
    _record([e["payload"].decode() for e in events])
    for event in events:
        await send({"type": "message.ack", "id": event["id"]})
