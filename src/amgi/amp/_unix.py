"""A UNIX-socket transport for asyncio that also carries file descriptors (``SCM_RIGHTS``).

asyncio's own transports cannot pass descriptors, so ``connect_unix``/``serve_unix``
use this small one: a non-blocking stream socket read with ``recvmsg`` and written with
``send``; queued descriptors ride one per byte on the next bytes written (``sendmsg``),
as Twisted sends them, so no receiver gets more than one per message (Linux takes at
most 253 in one, and a receiver reads a bounded number at a time). It keeps asyncio's
flow control (``pause_writing`` above the high-water mark, ``pause_reading``) and close
semantics (queued bytes are sent first).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["FdTransport", "UnixServer", "open_unix_connection", "start_unix_server"]

log = logging.getLogger("amgi.amp")

_MAX_READ = 256 * 1024
_MAX_FDS_PER_READ = 64
_INT_SIZE = array.array("i").itemsize


class FdTransport(asyncio.Transport):
    """A stream transport over a connected UNIX socket; :meth:`send_fds` queues descriptors.

    A protocol that defines ``fds_received(fds)`` gets each read's descriptors before
    that read's bytes, and owns them; without it they are closed.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[None] | None = None,
    ) -> None:
        super().__init__(
            {"socket": sock, "peername": sock.getpeername(), "sockname": sock.getsockname()}
        )
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._fileno = sock.fileno()
        self._protocol = protocol
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._writing_paused = False
        self._reading = False
        self._closing = False
        self._lost = False
        loop.call_soon(self._start, waiter)

    def _start(self, waiter: asyncio.Future[None] | None) -> None:
        self._protocol.connection_made(self)
        if not self._closing:
            self.resume_reading()
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ reading

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fileno)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fileno, self._read_ready)

    def _read_ready(self) -> None:
        try:
            data, ancdata, flags, _ = self._sock.recvmsg(
                _MAX_READ, socket.CMSG_SPACE(_MAX_FDS_PER_READ * _INT_SIZE)
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % _INT_SIZE])
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            log.warning(
                "closing UNIX connection: the peer sent more than %d file descriptors at once",
                _MAX_FDS_PER_READ,
            )
            self._force_close(ConnectionError("too many file descriptors in one read"))
            return
        if fds:
            receiver: Callable[[list[int]], None] | None = getattr(
                self._protocol, "fds_received", None
            )
            if receiver is None:
                for fd in fds:
                    os.close(fd)
            else:
                receiver(fds.tolist())
        if data:
            self._protocol.data_received(data)  # type: ignore[attr-defined]
            return
        self.pause_reading()
        keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        if not keep_open:
            self.close()

    # ------------------------------------------------------------------ writing

    def send_fds(self, fds: list[int]) -> None:
        """Send ``fds``, one per byte, with the next bytes written (write at least as
        many bytes after)."""
        if self._closing:
            return
        self._fds.extend(fds)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        idle = not self._buffer
        self._buffer += data
        if idle:
            self._write_some()
            if self._buffer and not self._lost:
                self._loop.add_writer(self._fileno, self._write_ready)
        self._check_high()

    def _write_some(self) -> None:
        buffer = self._buffer
        while buffer:
            try:
                if self._fds:
                    rights = array.array("i", (self._fds[0],)).tobytes()
                    sent = self._sock.sendmsg(
                        [bytes(buffer[:1])], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
                    )
                    if sent:
                        self._fds.popleft()
                else:
                    sent = self._sock.send(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._force_close(exc)
                return
            if not sent:
                return
            del buffer[:sent]

    def _write_ready(self) -> None:
        self._write_some()
        if self._lost:
            return
        if not self._buffer:
            self._loop.remove_writer(self._fileno)
            if self._closing:
                self._force_close(None)
                return
        if self._writing_paused and len(self._buffer) <= self._low:
            self._writing_paused = False
            self._protocol.resume_writing()

    def _check_high(self) -> None:
        if not self._writing_paused and len(self._buffer) > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low
        self._check_high()

    def can_write_eof(self) -> bool:
        return False

    # ---------------------------------------------------------------- lifecycle

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._buffer:
            self._force_close(None)

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = self._closing = True
        self._buffer.clear()
        self._fds.clear()
        self.pause_reading()
        self._loop.remove_writer(self._fileno)
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)  # type: ignore[arg-type]
        finally:
            self._sock.close()


class UnixServer:
    """Accepts connections on a listening UNIX socket; see :func:`start_unix_server`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        path: str | None = None,
    ) -> None:
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._factory = protocol_factory
        self.sockets = [sock]
        # The socket file we created, and its identity, so close() removes it only
        # while it is still ours (not one another server bound there since).
        self._path = path
        self._identity = _identity(path) if path is not None else None
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(100):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("cannot accept a UNIX connection: %s", exc)
                return
            try:
                FdTransport(self._loop, conn, self._factory())
            except Exception:
                log.exception("cannot start a UNIX connection")
                conn.close()

    def close(self) -> None:
        """Stop accepting (connections already made stay open) and remove the socket
        file, if it is still the one this server created."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._loop.remove_reader(sock.fileno())
        sock.close()
        path, self._path = self._path, None
        if path is not None and self._identity is not None and _identity(path) == self._identity:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def wait_closed(self) -> None:
        """For symmetry with :class:`asyncio.Server`; closing is immediate."""

    async def __aenter__(self) -> UnixServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def open_unix_connection(
    path: str | os.PathLike[str], protocol_factory: Callable[[], asyncio.BaseProtocol]
) -> tuple[FdTransport, Any]:
    """Connect to ``path``; return the transport and the protocol, once connected."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    transport: FdTransport | None = None
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, os.fspath(path))
        protocol = protocol_factory()
        waiter: asyncio.Future[None] = loop.create_future()
        transport = FdTransport(loop, sock, protocol, waiter)
        await waiter
    except BaseException:
        if transport is None:
            sock.close()
        else:
            # Cancelled while it starts: the transport owns the socket now; aborting it
            # tells the protocol and stops watching the descriptor before closing it.
            transport.abort()
        raise
    return transport, protocol


async def start_unix_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol], path: str | os.PathLike[str]
) -> UnixServer:
    """Listen on the UNIX socket ``path`` (created; it must not exist; the server's
    ``close()`` removes it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = os.fspath(path)
    try:
        sock.bind(name)
        sock.listen(100)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return UnixServer(asyncio.get_running_loop(), sock, protocol_factory, name)


def _identity(path: str) -> tuple[int, int] | None:
    """Device and inode of the socket file at ``path`` (None if there is none)."""
    try:
        found = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISSOCK(found.st_mode):
        return None
    return found.st_dev, found.st_ino
