"""What the Lambda adapter tests share: a Lambda context, a capturing publisher, an app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from amgi.transport import Bindings, HeaderList, Transport


class Context:
    """A Lambda context whose deadline is ``seconds`` from now."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return int((self._end - time.monotonic()) * 1000)


class Capture(Transport):
    """A publisher that keeps what it was given."""

    name = "capture"
    options = dict

    def __init__(self) -> None:
        super().__init__([], {})
        self.sent: list[tuple[str, HeaderList, bytes | None, Bindings]] = []
        self.connected = 0
        self.fail = False

    async def connect(self) -> None:
        self.connected += 1

    async def fetch(self) -> Any:
        raise NotImplementedError

    async def settle(self, batch: Any, settlement: Any) -> None:
        raise NotImplementedError

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((address, headers, payload, bindings))

    async def close(self) -> None:
        pass


def settling_app(
    *,
    final: Callable[[bytes | None], bool] = lambda _: False,
    stall: bytes | None = None,
    seen: list[bytes | None] | None = None,
    extensions: list[Any] | None = None,
) -> Any:
    """An app that acks every message, but nacks with ``"retry": False`` the payloads
    ``final`` picks and stalls on the payload ``stall`` (only a deadline ends that call).
    It keeps the payloads it received in ``seen`` and each scope's extensions in
    ``extensions``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        if extensions is not None:
            extensions.append(scope.get("extensions"))
        more = True
        while more:
            event = await receive()
            more = event["more_messages"]
            if seen is not None:
                seen.append(event["payload"])
            if stall is not None and event["payload"] == stall:
                await asyncio.sleep(30)
            if final(event["payload"]):
                nack = {"type": "message.nack", "id": event["id"], "message": "bad schema"}
                await send(nack | {"retry": False})
            else:
                await send({"type": "message.ack", "id": event["id"]})

    return app


class Stuck(Capture):
    """A publisher whose sends never complete (an endpoint that accepts and never answers)."""

    name = "stuck"

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        await asyncio.Event().wait()
