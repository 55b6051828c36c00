"""Helpers for the HTTP push tests: uvicorn serving an ASGI app, a recording AMGI app,
events built with the official CloudEvents SDK."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope


def cloud_event(type_: str, data: Any = None, **attributes: Any) -> CloudEvent:
    """A CloudEvent (SDK object) of ``type_`` from source ``/tests``."""
    return CloudEvent({"type": type_, "source": "/tests", **attributes}, data)


def binary(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Headers and body of ``event`` in binary content mode (the SDK's encoding)."""
    message = to_binary(event, JSONFormat())
    return dict(message.headers), message.body


def structured(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Headers and body of ``event`` in structured content mode (the SDK's encoding)."""
    message = to_structured(event, JSONFormat())
    return dict(message.headers), message.body


def batched(*events: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Headers and body of a batched-mode request (the SDK writes each event)."""
    fmt = JSONFormat()
    body = b"[" + b",".join(fmt.write(e) for e in events) + b"]"
    return {"content-type": "application/cloudevents-batch+json"}, body


@dataclass
class Recorder:
    """An AMGI app that records what it received; nacks payloads starting with ``nack``.

    ``gate``, when set, makes each call wait for it before settling (requests in flight).
    ``sends`` maps an incoming address to the address it sends an echo to.
    """

    received: list[dict[str, Any]] = field(default_factory=list)
    scopes: list[dict[str, Any]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    nack_once: set[bytes] = field(default_factory=set)
    sends: dict[str, str] = field(default_factory=dict)
    send_errors: list[str] = field(default_factory=list)

    async def __call__(
        self, scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable
    ) -> None:
        if scope["type"] != "message":
            return
        self.scopes.append(dict(scope))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        more = True
        while more:
            message: Any = await receive()
            self.received.append(message)
            payload = message.get("payload") or b""
            target = self.sends.get(scope["address"])
            if target is not None:
                try:
                    await send(
                        {
                            "type": "message.send",
                            "address": target,
                            "headers": [(b"ce-type", target.encode()), (b"via", b"http")],
                            "payload": b"echo:" + payload,
                        }
                    )
                except OSError as exc:
                    self.send_errors.append(str(exc))
                    await send({"type": "message.nack", "id": message["id"], "message": str(exc)})
                    more = message.get("more_messages", False)
                    continue
            if payload.lstrip(b'"').startswith(b"nack") or payload in self.nack_once:
                self.nack_once.discard(payload)
                await send({"type": "message.nack", "id": message["id"], "message": "told to"})
            else:
                await send({"type": "message.ack", "id": message["id"]})
            more = message.get("more_messages", False)


@contextlib.asynccontextmanager
async def uvicorn_serving(app: Any, **options: Any) -> AsyncIterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a free loopback port; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, **{"log_config": None, "lifespan": "on", **options})
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                    raise AssertionError("uvicorn stopped at startup")
                await asyncio.sleep(0.01)
        scheme = "https" if options.get("ssl_certfile") else "http"
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()
