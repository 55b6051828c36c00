"""A small AMGI application: prints each message, acks it, and runs on every server.

amgi send orders '{"order": 1}'
amgi run examples.hello:app orders
"""

from __future__ import annotations

import json
from typing import Any

from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope


async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                print("hello app: started, waiting for messages", flush=True)
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                print("hello app: stopped", flush=True)
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        message: Any = await receive()
        try:
            body = json.loads(message.get("payload") or b"null")
            headers = {k.decode(): v.decode() for k, v in message["headers"]}
            attempt = message["bindings"]["amgi"]["attempt"]
            print(
                f"hello app: {scope['address']} #{message['id']} {body} "
                f"headers={headers} attempt={attempt}",
                flush=True,
            )
            await send({"type": "message.ack", "id": message["id"]})
        except ValueError as exc:
            await send({"type": "message.nack", "id": message["id"], "message": str(exc)})
        more = message.get("more_messages", False)
