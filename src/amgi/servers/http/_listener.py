"""uvicorn inside the runtime's event loop: bind, serve the front, stop gracefully.

The socket is bound here (so a busy port is a one-line error, and port 0 works), and
uvicorn's own signal handling is turned off: SIGINT/SIGTERM belong to the runtime,
which stops fetching, finishes in-flight batches and then closes the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from typing import Any

from amgi.errors import BrokerUnavailable

__all__ = ["Listener"]

logger = logging.getLogger("amgi.servers.http")

_STARTED_POLL = 0.01


class Listener:
    """One uvicorn server serving ``app`` on ``host``:``port`` until :meth:`stop`."""

    def __init__(self, app: Any, host: str, port: int, **uvicorn_options: Any) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.options = uvicorn_options
        self.port: int | None = None
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    async def start(self, startup_timeout: float = 10.0) -> None:
        """Bind and start serving; :class:`BrokerUnavailable` if that fails."""
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Generator[None, None, None]:
                yield  # the runtime owns the signals

        try:
            infos = socket.getaddrinfo(
                self.host, self.requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError:
                sock.close()
                raise
        except OSError as exc:
            raise BrokerUnavailable(
                f"http: cannot listen on {self.host}:{self.requested_port}: {exc.strerror or exc}"
            ) from None
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            server_header=False,
            proxy_headers=False,  # the app never sees the client address
            **self.options,
        )
        try:
            config.load()
        except Exception as exc:
            sock.close()
            raise BrokerUnavailable(f"http: cannot start the listener: {exc}") from None
        server = self._server = _Server(config)
        task = self._task = asyncio.create_task(server.serve(sockets=[sock]), name="amgi-http")
        deadline = asyncio.get_running_loop().time() + startup_timeout
        while not server.started:
            if task.done():
                error = task.exception() if not task.cancelled() else None
                raise BrokerUnavailable(f"http: the listener stopped at startup: {error}")
            if asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise BrokerUnavailable("http: the listener did not start in time")
            await asyncio.sleep(_STARTED_POLL)
        logger.info("http: listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop accepting, let open requests finish (they are answered by now), close."""
        task, self._task = self._task, None
        if task is not None and self._server is not None:
            self._server.should_exit = True
            try:
                await task
            except (Exception, SystemExit) as exc:
                logger.warning("http: the listener stopped with an error: %s", exc)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
