"""An AMGI application as an ASGI application: HTTP push inside any ASGI stack.

``PushApp(app)`` is an ASGI application that accepts CloudEvents and Pub/Sub push
requests exactly as ``amgi run app:app --server http`` does (see
:mod:`amgi.servers.http`) and runs ``app`` behind them on the AMGI runtime. Serve it
with uvicorn (``uvicorn myapp:asgi``) or mount it in Starlette or FastAPI::

    asgi = PushApp(app, HttpOptions(address_from="path"))
    api = Starlette(routes=[Mount("/events", asgi)], lifespan=asgi.lifespan_context)

Served on its own, it runs the AMGI lifespan and the runtime from the ASGI lifespan.
Mounted where no lifespan reaches it, it starts on the first request; then call
:meth:`PushApp.shutdown` (or use :meth:`PushApp.lifespan_context`) to stop it
gracefully: in-flight requests finish, new ones get 503. A startup that fails there is
not run again: that request and every later one get 503 with its reason (the pusher
keeps its messages) until the process is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from amgi.errors import StartupFailed
from amgi.runtime import Runtime, RuntimeConfig
from amgi.runtime.routing import Router
from amgi.servers.http import HttpOptions, HttpTransport
from amgi.servers.http._front import Receive, Scope, Send, respond, text_answer
from amgi.types import AMGIApplication

__all__ = ["HttpOptions", "PushApp"]


class PushApp:
    """The ASGI application serving ``app`` over HTTP push (see the module docstring).

    ``addresses`` limits the addresses served (default: all). ``message.send`` goes to
    the CloudEvents sender of ``options.send_url``, or where ``routes`` (an
    :class:`amgi.runtime.routing.Router`) sends its address.
    """

    def __init__(
        self,
        app: AMGIApplication,
        options: HttpOptions | None = None,
        *,
        config: RuntimeConfig | None = None,
        addresses: Sequence[str] = (),
        routes: Router | None = None,
    ) -> None:
        self.transport = HttpTransport(addresses, options, listen=False)
        self.runtime = Runtime(app, self.transport, config, routes=routes)
        self._front = self.transport.front
        self._task: asyncio.Task[int] | None = None
        self._starting: asyncio.Lock | None = None
        self._failed: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self._task is None:
                try:
                    await self.startup()
                except Exception as exc:
                    reason = f"application startup failed: {exc}"
                    return await respond(send, text_answer(503, reason))
            await self._front(scope, receive, send)
        elif kind == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    try:
                        await self.startup()
                    except Exception as exc:
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await self.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def startup(self) -> None:
        """Run the AMGI lifespan startup and start the runtime (once: a startup that
        failed raises :class:`~amgi.errors.StartupFailed` again, without running)."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._task is not None:
                return
            if self._failed is not None:
                raise StartupFailed(self._failed)
            runtime = self.runtime
            task = asyncio.create_task(runtime.serve(), name="amgi-http-runtime")
            started = asyncio.create_task(runtime.started.wait())
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            if not started.done():
                started.cancel()
                await asyncio.gather(started, return_exceptions=True)
                try:
                    task.result()  # raises why it could not start
                except Exception as exc:
                    self._failed = str(exc)
                    raise
                self._failed = "the AMGI runtime stopped before it started"
                raise StartupFailed(self._failed)
            self._task = task

    async def shutdown(self) -> int:
        """Stop gracefully: finish in-flight requests, answer the rest 503; the exit code."""
        task = self._task
        if task is None:
            return 0
        self.runtime.request_stop()
        return await task

    @contextlib.asynccontextmanager
    async def lifespan_context(self, _app: Any = None) -> AsyncIterator[None]:
        """A Starlette/FastAPI ``lifespan=`` that starts and stops this app."""
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()
