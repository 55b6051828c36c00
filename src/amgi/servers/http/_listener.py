"""The server's own HTTP/1.1 listener (``amgi run --server http``), in the runtime's loop.

The socket is bound here (so a busy port is a one-line error, and port 0 works); each
accepted connection is a :class:`~amgi.servers.http._connection.Connection`, parsing
with httptools and answering through the front. A sweep once a second refreshes the
``Date`` header and closes connections idle for ``keep_alive`` seconds (and, with 408,
those silent mid-request for ``read_timeout``), and aborts those whose close has not
ended within ``read_timeout`` (their client reads no answer). Signals belong to the runtime, which
stops fetching, finishes in-flight batches and then calls :meth:`Listener.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from email.utils import formatdate

from amgi.errors import BrokerUnavailable
from amgi.servers.http._connection import Connection
from amgi.servers.http._front import Front

__all__ = ["Listener"]

logger = logging.getLogger("amgi.servers.http")

_BACKLOG = 2048
_SHOWN_MOST = 10
"""The most connections a log line names."""
_OVER_HANDSHAKE = 1
"""Seconds the TLS handshake of a connection over --max-connections may take (then its
503): about as long as a plain one stays open for its 503."""


class Listener:
    """Serves ``front`` on ``host``:``port`` until :meth:`stop` (see the module docstring)."""

    def __init__(
        self,
        front: Front,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        keep_alive: float = 5.0,
        read_timeout: float = 30.0,
        min_body_rate: int = 500,
        close_timeout: float = 30.0,
        max_connections: int = 1000,
    ) -> None:
        self.front = front
        self.host = host
        self.requested_port = port
        self.tls = tls
        self.keep_alive = max(1, math.ceil(keep_alive))
        self.read_timeout = max(1, math.ceil(read_timeout))
        self.min_body_rate = min_body_rate
        self.close_timeout = close_timeout
        self.max_connections = max_connections
        """Open connections at most: one more is answered 503 and closed (its sender
        keeps its messages and tries again), before it runs out of file descriptors."""
        self._refused_since_log = 0
        self.port: int | None = None
        self.connections: set[Connection] = set()
        self.stopping = False
        self.date = b""
        """The ``date`` header line of answers (refreshed by the sweep)."""
        self.acked = b""
        """The whole answer to an acked request kept alive (refreshed with the date)."""
        self._refresh_date()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._all_closed: asyncio.Event | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and start serving; :class:`BrokerUnavailable` if that fails."""
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
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        try:
            # No ssl= here: asyncio would count nothing and give the protocol nothing
            # before the handshake ends, so a client that never completes it escaped
            # --max-connections. A connection is accepted plain, counted at once, and
            # upgraded by :meth:`secure` within --read-timeout.
            self._server = await loop.create_server(
                lambda: Connection(self), sock=sock, backlog=_BACKLOG
            )
        except OSError as exc:
            sock.close()
            raise BrokerUnavailable(f"http: cannot start the listener: {exc}") from None
        self._sweeper = asyncio.create_task(self._sweep(), name="amgi-http-sweep")
        logger.info("http: listening on %s:%d", self.host, self.port)

    def secure(self, connection: Connection, transport: asyncio.Transport, over: bool) -> None:
        """Run the TLS handshake of a connection just accepted (see :meth:`start`): it
        must end within ``read_timeout`` seconds (:data:`_OVER_HANDSHAKE` for one over
        ``max_connections``, which then gets its 503), else the connection closes."""
        timeout = min(self.read_timeout, _OVER_HANDSHAKE) if over else self.read_timeout
        task = asyncio.get_running_loop().create_task(
            self._handshake(connection, transport, timeout, over)
        )
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(
        self, connection: Connection, transport: asyncio.Transport, timeout: float, over: bool
    ) -> None:
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        secured: asyncio.Transport | None = None
        try:
            secured = await loop.start_tls(
                transport, connection, self.tls, server_side=True, ssl_handshake_timeout=timeout
            )
        except Exception as exc:  # failed, or not done in time: start_tls closed it
            logger.debug("http: TLS handshake failed: %r", exc)
        finally:
            if secured is None or transport.is_closing():
                transport.close()
                connection.connection_lost(None)  # (asyncio tells it nothing)
        if secured is None or transport.is_closing():
            return
        connection.secured(secured, over)

    def full(self) -> bool:
        """Whether a new connection is one too many (counted, logged once a minute)."""
        if len(self.connections) < self.max_connections:
            return False
        if not self._refused_since_log:
            logger.warning(
                "http: %d connections open (--max-connections): answering new ones 503",
                len(self.connections),
            )
        self._refused_since_log += 1
        return True

    def lost(self) -> None:
        """A connection closed (called by it)."""
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()

    def begin_stop(self) -> None:
        """Shutdown begins: close idle connections now and the others after their last
        answer (a request that arrives meanwhile is answered 503 by the front); a new
        connection is closed as it comes. The socket still listens until :meth:`stop`."""
        self.stopping = True
        for connection in list(self.connections):
            connection.close_when_idle()

    async def stop(self) -> None:
        """Stop accepting, close connections as :meth:`begin_stop` does; after
        ``close_timeout`` seconds, abort what is still open."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._all_closed = asyncio.Event()
        self.begin_stop()
        if self.connections:
            try:
                async with asyncio.timeout(self.close_timeout):
                    await self._all_closed.wait()
            except TimeoutError:
                self._abort(
                    list(self.connections), f"still open {self.close_timeout:g} s into the stop"
                )
        for task in list(self._handshakes):
            task.cancel()
        if self._handshakes:
            await asyncio.wait(self._handshakes)
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await server.wait_closed()

    def _refresh_date(self) -> None:
        self.date = b"date: " + formatdate(usegmt=True).encode() + b"\r\n"
        self.acked = b"HTTP/1.1 204 No Content\r\n" + self.date + b"\r\n"

    async def _sweep(self) -> None:
        seconds = 0
        while True:
            await asyncio.sleep(1)
            seconds += 1
            if seconds % 60 == 0 and self._refused_since_log:
                if self._refused_since_log > 1:
                    logger.warning(
                        "http: %d more connection(s) answered 503 in the last minute "
                        "(--max-connections %d)",
                        self._refused_since_log - 1,
                        self.max_connections,
                    )
                self._refused_since_log = 0
            self._refresh_date()
            stalled = [
                connection
                for connection in list(self.connections)
                if connection.sweep(self.keep_alive, self.read_timeout, self.min_body_rate)
            ]
            if stalled:
                why = f"whose client read no answer in the {self.read_timeout} s after their close"
                self._abort(stalled, why)

    def _abort(self, connections: list[Connection], why: str) -> None:
        """Abort ``connections`` (their answers not sent yet are dropped), with one
        warning that names them."""
        shown = [connection.describe() for connection in connections[:_SHOWN_MOST]]
        if len(connections) > _SHOWN_MOST:
            shown.append(f"{len(connections) - _SHOWN_MOST} more")
        for connection in connections:
            connection.abort()
        logger.warning(
            "http: aborted %d connection(s) %s: %s", len(connections), why, ", ".join(shown)
        )
