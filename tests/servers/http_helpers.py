"""Helpers for the HTTP push tests: uvicorn serving an ASGI app, the server's own listener,
a recording AMGI app, events built with the official CloudEvents SDK."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import uvicorn
from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from amgi.http import PushApp
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.http import HttpOptions, HttpTransport
from amgi.types import AMGIApplication, AMGIReceiveCallable, AMGISendCallable, Scope

WAYS = ["asgi", "own"]
"""How a test serves the app: ``PushApp`` under uvicorn, or the server's own listener."""


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


class Stepped(Recorder):
    """Each call waits for a release of ``go`` before it reads its messages."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Semaphore(0)
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "message":
            self.calls += 1
            await self.go.acquire()
        await super().__call__(scope, receive, send)


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


@dataclass
class Served:
    """An app being served: its base URL, its transport, and its graceful stop."""

    url: str
    transport: HttpTransport
    stop: Callable[[], Awaitable[int]]


@contextlib.asynccontextmanager
async def serving(
    way: str,
    app: AMGIApplication,
    options: HttpOptions | None = None,
    *,
    config: RuntimeConfig,
    addresses: Sequence[str] = (),
) -> AsyncIterator[Served]:
    """Serve ``app`` the ``way`` given (see :data:`WAYS`) on a free loopback port."""
    if way == "asgi":
        push = PushApp(app, options, config=config, addresses=addresses)
        async with uvicorn_serving(push, lifespan="off") as url:
            try:
                yield Served(url, push.transport, push.shutdown)
            finally:
                await push.shutdown()
        return
    transport = HttpTransport(addresses, replace(options or HttpOptions(), port=0))
    runtime = Runtime(app, transport, config)
    task = asyncio.create_task(runtime.serve())

    async def stop() -> int:
        runtime.request_stop()
        return await asyncio.wait_for(task, 30)

    try:
        async with asyncio.timeout(10):
            while transport.port is None:
                if task.done():
                    raise AssertionError(f"the runtime ended at startup: {task.result()}")
                await asyncio.sleep(0.01)
        yield Served(f"http://127.0.0.1:{transport.port}", transport, stop)
    finally:
        if not task.done():
            await stop()
