"""A raw AMGI app for the Lambda adapter tests that sends one message per record."""

from __future__ import annotations

from typing import Any

from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope

__all__ = ["SendingApp"]


class SendingApp:
    """Sends a message to ``address`` for each record and acks it; a send error (kept in
    :attr:`errors`) nacks the record instead."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.errors: list[OSError] = []

    async def __call__(
        self, scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable
    ) -> None:
        if scope["type"] != "message":
            return
        more = True
        while more:
            message: Any = await receive()
            more = message.get("more_messages", False)
            try:
                await send(
                    {
                        "type": "message.send",
                        "address": self.address,
                        "headers": [],
                        "payload": b"x",
                    }
                )
            except OSError as exc:
                self.errors.append(exc)
                await send({"type": "message.nack", "id": message["id"], "message": str(exc)})
            else:
                await send({"type": "message.ack", "id": message["id"]})
