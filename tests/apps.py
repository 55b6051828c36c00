"""Small AMGI apps the server tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from amgi.runtime import Runtime, RuntimeConfig
from amgi.transport import Transport


def attempts_app(
    seen: list[tuple[bytes, int]],
    *,
    nack: bytes | None = None,
    called: asyncio.Event | None = None,
    linger: float = 0.0,
) -> Any:
    """Record ``(payload, attempt)`` of each message and ack it (nack ``nack`` payloads,
    with the reason ``"bad payload"``); after each call set ``called`` and sleep
    ``linger`` seconds."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        more = True
        while more:
            event = await receive()
            seen.append((event["payload"], event["bindings"]["amgi"]["attempt"]))
            if nack is not None and event["payload"] == nack:
                await send({"type": "message.nack", "id": event["id"], "message": "bad payload"})
            else:
                await send({"type": "message.ack", "id": event["id"]})
            more = event.get("more_messages", False)
        if called is not None:
            called.set()
        if linger:
            await asyncio.sleep(linger)

    return app


async def serve_in_stops(
    transport: Callable[[], Transport], total: int, config: RuntimeConfig
) -> tuple[list[tuple[bytes, int]], int]:
    """Serve with a new ``transport()`` at a time, each stopped as the app's first call
    ends, until ``total`` messages were seen (10 runs at most): ``(payload, attempt)``
    of each message seen, and how many runs it took."""
    seen: list[tuple[bytes, int]] = []
    called = asyncio.Event()
    app = attempts_app(seen, called=called, linger=0.05)
    runs = 0
    while len(seen) < total and runs < 10:
        runs += 1
        called.clear()
        runtime = Runtime(app, transport(), config)
        serving = asyncio.create_task(runtime.serve())
        await asyncio.wait_for(called.wait(), 10)
        runtime.request_stop()
        assert await asyncio.wait_for(serving, 20) == 0
    return seen, runs


async def send_all(sender: Transport, messages: Iterable[tuple[str, bytes]]) -> None:
    """Connect the send-only ``sender``, send each ``(address, payload)`` in order, close."""
    await sender.connect()
    try:
        for address, payload in messages:
            await sender.publish(address, [], payload, {})
    finally:
        await sender.close()
