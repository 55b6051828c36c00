"""Upstream ``amgi_cloudevents.Server`` for bench_http.py (run in the bench venv).

AMGI 2.0 as upstream speaks it: the message is in the scope, the app acks it.
"""

from __future__ import annotations

from typing import Any


async def _ack(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "message":
        await send({"type": "message.ack"})
    elif scope["type"] == "lifespan":  # upstream waits for the lifespan protocol
        while True:
            event = await receive()
            await send({"type": event["type"] + ".complete"})
            if event["type"] == "lifespan.shutdown":
                return


def upstream() -> Any:
    """The upstream CloudEvents server at path ``/`` (a uvicorn ``--factory``)."""
    from amgi_cloudevents import Server

    return Server(_ack, path="/")
