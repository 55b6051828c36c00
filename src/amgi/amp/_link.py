"""One AMP connection's state over its asyncio transport, and the plumbing every part of
the protocol shares: writing, pausing reading, closing.

:class:`Link` is the lowest layer of :class:`AMP`: :class:`~._calls.Caller` (calls to the
peer) stands on it, :class:`~._dispatch.Dispatcher` (the peer's input) on that, and
:class:`AMP` (the :class:`asyncio.Protocol` hooks) on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar, Self, cast

from ._box import DEFAULT_MAX_BOX_SIZE, DEFAULT_MAX_KEYS_PER_BOX
from ._command import RESPONDER_ATTRIBUTE, Command, StartTLS
from ._connection import DEFAULT_MAX_UNCLAIMED_FDS, CallReceived, Connection
from ._errors import AmpError, ConnectionLost, ProtocolSwitched

log = logging.getLogger("amgi.amp")

Responder = Callable[..., Any]

# Queued calls are written at once when they reach this many bytes (asyncio's default
# high-water mark), instead of at the end of the loop iteration.
_WRITE_NOW = 64 * 1024


class Link(asyncio.Protocol):
    """The connection's state, its output and its end (the arguments: see :class:`AMP`)."""

    _responders: ClassVar[dict[bytes, tuple[type[Command], str]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[bytes, tuple[type[Command], str]] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                command = getattr(value, RESPONDER_ATTRIBUTE, None)
                if isinstance(command, type) and issubclass(command, Command):
                    found[command.name] = (command, attr)
        cls._responders = found

    def __init__(
        self,
        *,
        max_outstanding_calls: int = 1024,
        max_concurrent_responders: int = 256,
        max_queued_calls: int | None = None,
        call_timeout: float | None = None,
        tls_context: ssl.SSLContext | None = None,
        max_box_size: int = DEFAULT_MAX_BOX_SIZE,
        max_keys_per_box: int = DEFAULT_MAX_KEYS_PER_BOX,
        max_unclaimed_fds: int = DEFAULT_MAX_UNCLAIMED_FDS,
        close_timeout: float = 5.0,
    ) -> None:
        if max_outstanding_calls < 1 or max_concurrent_responders < 1:
            raise ValueError("limits must be at least 1")
        if max_queued_calls is None:
            max_queued_calls = 4 * max_concurrent_responders
        if max_queued_calls < max_concurrent_responders:
            raise ValueError("max_queued_calls must be at least max_concurrent_responders")
        self._core = Connection(
            max_box_size=max_box_size,
            max_keys_per_box=max_keys_per_box,
            max_unclaimed_fds=max_unclaimed_fds,
        )
        self._handlers: dict[bytes, Responder] = {}
        for command, attr in self._responders.values():
            self.add_responder(command, getattr(self, attr))
        self._core.add_command(StartTLS)
        self.tls_context = tls_context
        self.call_timeout = call_timeout
        self.max_concurrent_responders = max_concurrent_responders
        self.max_queued_calls = max_queued_calls
        self.close_timeout = close_timeout
        self._abort_handle: asyncio.TimerHandle | None = None
        self._end_reason: str | None = None  # why we ended the connection ourselves
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._slots = asyncio.Semaphore(max_outstanding_calls)
        self._tasks: set[asyncio.Task[None]] = set()
        self._queue: deque[CallReceived] = deque()
        self._running = 0
        self._paused = False  # reading is paused (responders busy or writing paused)
        self._write_paused = False
        self._refused_unsent = 0  # refused calls answered while writing was paused
        self._refusals = 0
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._hold_output = False
        self._hold_input = False
        self._held_input: list[bytes] = []
        self._tls_started = False
        self._tls_task: asyncio.Task[None] | None = None
        self._lost = False
        self._closed: asyncio.Future[None] | None = None
        self._switch_factory: Callable[[], asyncio.BaseProtocol] | None = None
        self._switch_waiter: asyncio.Future[dict[str, Any]] | None = None
        self._switched_to: asyncio.BaseProtocol | None = None

    # ---------------------------------------------------------------- responders

    def add_responder(self, command: type[Command], responder: Responder) -> None:
        """Answer ``command`` with ``responder`` on this connection."""
        self._core.add_command(command)
        self._handlers[command.name] = responder

    # ------------------------------------------------------------------ the peer

    def _peer_name(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{peer[0]}:{peer[1]}"
        return str(peer) if peer else "peer"

    def _close_unclaimed_fds(self) -> None:
        for fd in self._core.unclaimed_fds():
            with contextlib.suppress(OSError):
                os.close(fd)

    def _check_fds(self, command: type[Command], names: tuple[str, ...]) -> None:
        if names and not hasattr(self.transport, "send_fds"):
            raise AmpError(
                f"{command.__name__} passes file descriptors: it needs a UNIX connection "
                "made with amp.connect_unix or amp.serve_unix"
            )

    # -------------------------------------------------------------- flow control

    def _update_reading(self) -> None:
        """Pause reading while ``max_concurrent_responders`` calls wait to be run and
        no call of ours awaits an answer.

        Calls wait while the responders are at their limit or writing is paused.
        Answers to our own calls are always read: a responder may be waiting for
        one (it called the peer back), and two peers that both stopped writing must
        not stop reading each other; meanwhile ``max_queued_calls`` bounds the calls
        held back (see :meth:`_dispatch`).
        """
        held = len(self._queue) + self._refused_unsent
        pause = (
            held >= self.max_concurrent_responders and not self._waiters
        ) or self._core.switch_pending
        if pause is self._paused or self.transport is None or self._lost:
            return
        self._paused = pause
        if self._hold_input:
            return  # the TLS switch resumes reading itself and honours _paused
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _drain(self) -> None:
        while self._write_paused and not self._lost:
            fut: asyncio.Future[None] = self._loop.create_future()  # type: ignore[union-attr]
            self._drain_waiters.append(fut)
            await fut

    # ------------------------------------------------------------------- output

    def _sent(self) -> None:
        """A call was queued: write it this loop iteration, or now once the queued
        bytes reach the high-water mark, so the transport can pause the next caller."""
        if self._core.bytes_to_send >= _WRITE_NOW:
            self._flush()
        else:
            self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._hold_output or self.transport is None or self._lost:
            return
        data = self._core.data_to_send()
        if data:
            if self._core.fds_waiting:
                cast(Any, self.transport).send_fds(self._core.fds_to_send())
            self.transport.write(data)

    # ------------------------------------------------------------------ lifecycle

    @property
    def _ended(self) -> bool:
        """No new call may be written: the connection is lost, not made, or closing
        (what is written after close() may still reach a peer that runs it, while its
        answer would never be read)."""
        transport = self.transport
        return self._lost or transport is None or transport.is_closing()

    def _gone(self) -> AmpError:
        if self._switched_to is not None:
            return ProtocolSwitched("the connection switched to another protocol")
        return ConnectionLost(self._end_reason or "not connected")

    def _finish(self, error: AmpError) -> None:
        """This AMP connection is over (lost, or switched): fail calls, stop responders."""
        self._lost = True
        self._wake_drain_waiters()
        self._core.connection_lost()
        self._close_unclaimed_fds()
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(error)
        queued, self._queue = self._queue, deque()
        for event in queued:  # their descriptors were claimed: nobody else closes them
            if not event.command.plain:
                for name in event.command.argument_descriptors:
                    fd = event.arguments.get(name)
                    if type(fd) is int:
                        with contextlib.suppress(OSError):
                            os.close(fd)
        for task in self._tasks:
            task.cancel()
        if self._tls_task is not None:
            self._tls_task.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _abort(self, reason: str) -> None:
        """End the connection now: pending and later calls fail with ``reason``."""
        if self._lost:
            return
        transport = self.transport
        self._end_reason = reason
        self._finish(ConnectionLost(reason))
        if transport is not None:
            transport.abort()

    @property
    def is_closed(self) -> bool:
        """True once the connection is lost."""
        return self._lost

    def close(self) -> None:
        """Close the connection: queued bytes are still sent, for at most
        ``close_timeout`` seconds (a peer that stops reading), then it is aborted.
        Pending and later calls fail with :class:`ConnectionLost`."""
        self._close_transport("the connection was closed by this side")

    def _close_transport(self, reason: str) -> None:
        """Close gracefully; ``reason`` is what pending and later calls fail with."""
        transport = self.transport
        if transport is None or self._lost:
            return
        if self._end_reason is None:  # the first reason is the cause
            self._end_reason = reason
        self._flush()
        transport.close()
        if self._abort_handle is None and not self._lost and self._loop is not None:
            self._abort_handle = self._loop.call_later(self.close_timeout, self._abort_stalled)

    def _abort_stalled(self) -> None:
        self._abort_handle = None
        if self._lost or self.transport is None:
            return
        log.warning(
            "aborting AMP connection with %s: %d bytes still unsent %ss after close",
            self._peer_name(),
            self.transport.get_write_buffer_size(),
            self.close_timeout,
        )
        self.transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the connection is lost and its responder tasks have finished."""
        if self._closed is not None:
            await asyncio.shield(self._closed)
        tasks = list(self._tasks)
        if self._tls_task is not None:
            tasks.append(self._tls_task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()
