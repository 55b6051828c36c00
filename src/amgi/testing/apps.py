"""Applications used by the conformance suite's server processes.

``recorder`` appends one JSON line per event to the file named by ``AMGI_TEST_RECORD``:
``{"event": "lifespan.startup"}``, ``{"event": "receive", "payload": ..., "attempt": n}``
and ``{"event": "ack", "payload": ...}``. ``AMGI_TEST_DELAY`` (seconds) is slept before
each ack, so a test can stop or kill the process mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope

__all__ = ["recorder"]


def _write(record: dict[str, Any]) -> None:
    path = os.environ["AMGI_TEST_RECORD"]
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


async def recorder(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
    """Record lifespan and messages; ack every message after ``AMGI_TEST_DELAY`` seconds."""
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            _write({"event": event["type"]})
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    delay = float(os.environ.get("AMGI_TEST_DELAY", "0"))
    more = True
    while more:
        message = await receive()
        assert message["type"] == "message.receive"
        payload = (message.get("payload") or b"").decode("utf-8", "replace")
        attempt = message.get("bindings", {}).get("amgi", {}).get("attempt")
        _write({"event": "receive", "payload": payload, "attempt": attempt})
        if delay:
            await asyncio.sleep(delay)
        await send({"type": "message.ack", "id": message["id"]})
        _write({"event": "ack", "payload": payload})
        more = bool(message.get("more_messages"))
