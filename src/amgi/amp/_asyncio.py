"""The asyncio layer: an :class:`asyncio.Protocol` around the sans-IO connection."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, ClassVar, TypeVar, cast

from ._arguments import brief
from ._box import DEFAULT_MAX_BOX_SIZE, DEFAULT_MAX_KEYS_PER_BOX
from ._command import RESPONDER_ATTRIBUTE, Command, ProtocolSwitchCommand, StartTLS
from ._connection import (
    DEFAULT_MAX_UNCLAIMED_FDS,
    AnswerDropped,
    AnswerReceived,
    CallReceived,
    CallRejected,
    Connection,
    ErrorReceived,
    Event,
    ProtocolViolation,
    Switched,
)
from ._errors import (
    TLS_ERROR_CODE,
    UNKNOWN_ERROR_CODE,
    AmpError,
    ConnectionLost,
    ProtocolSwitched,
)
from ._unix import UnixServer, open_unix_connection, start_unix_server

__all__ = ["AMP", "connect", "connect_unix", "serve", "serve_unix"]

log = logging.getLogger("amgi.amp")

P = TypeVar("P", bound="AMP")

Responder = Callable[..., Any]

# Queued calls are written at once when they reach this many bytes (asyncio's default
# high-water mark), instead of at the end of the loop iteration.
_WRITE_NOW = 64 * 1024


class AMP(asyncio.Protocol):
    """One AMP connection: it calls the peer and answers the peer's calls.

    Subclass it and decorate methods with ``@SomeCommand.responder``; a
    responder takes the command's arguments as keywords and returns the
    response dict (or ``None`` for an empty response), directly or from a
    coroutine.

    ``max_outstanding_calls`` bounds calls awaiting an answer (more callers
    wait for a slot); ``max_concurrent_responders`` bounds running async
    responders: the peer's calls beyond it wait, and reading pauses once as many
    wait, unless some call of ours awaits its answer (which must be read); then
    reading goes on and a peer with more than ``max_queued_calls`` calls waiting
    (default 4 x ``max_concurrent_responders``) is disconnected with a WARNING;
    ``call_timeout`` is the default timeout of :meth:`call_remote`;
    ``tls_context`` lets the peer switch this connection to TLS with
    ``StartTLS`` (this side acts as the TLS server); ``max_box_size`` and
    ``max_keys_per_box`` bound each box received (a peer exceeding them is
    disconnected with a WARNING), and ``max_unclaimed_fds`` the descriptors a UNIX
    peer sent that no argument claimed yet (likewise); ``close_timeout`` bounds how
    long closing waits for the peer to read what is still queued before the
    connection is aborted.

    Writing is flow-controlled: while the transport asks to pause writing, the
    peer's calls are not run but queued (reading pauses once
    ``max_concurrent_responders`` wait), so answers stop piling up, and
    :meth:`call_remote` waits before sending.
    """

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

    # ------------------------------------------------------------- asyncio hooks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()

    def data_received(self, data: bytes) -> None:
        if self._hold_input:
            self._held_input.append(data)
            return
        try:
            self._handle(self._core.receive_data(data))
        except Exception:
            # A bug here must not escape into the event loop; the stream is now unusable.
            log.exception("internal error while processing AMP data; closing")
            self._close_transport()

    def _handle(self, events: list[Event]) -> None:
        waiters = self._waiters
        for event in events:
            kind = type(event)
            if kind is AnswerReceived:
                answer = cast(AnswerReceived, event)
                if not answer.command.plain:
                    if answer.command is StartTLS:
                        self._begin_tls_switch()
                    elif answer.command.switches_protocol:
                        continue  # the Switched event follows: the waiter gets the new protocol
                fut = waiters.pop(answer.tag, None)
                if fut is not None and not fut.done():
                    fut.set_result(answer.response)
            elif kind is CallReceived:
                if self.transport is not None and self.transport.is_closing():
                    continue  # closing (a fatal error): later calls of the read are not run
                self._dispatch(cast(CallReceived, event))
            elif kind is ErrorReceived:
                error = cast(ErrorReceived, event)
                if error.command is StartTLS:
                    self._hold_output = False
                fut = waiters.pop(error.tag, None)
                if fut is not None and not fut.done():
                    fut.set_exception(error.error)
            elif kind is CallRejected:
                rejected = cast(CallRejected, event)
                log.warning(
                    "rejected call %r: %s %s",
                    rejected.name,
                    rejected.code.decode("ascii", "replace"),
                    rejected.description,
                )
            elif kind is AnswerDropped:
                tag = cast(AnswerDropped, event).tag
                log.debug("dropped late answer for abandoned call %r", tag)
            elif kind is Switched:
                self._switched(cast(Switched, event).data)
                return
            else:
                reason = cast(ProtocolViolation, event).reason
                log.warning("closing AMP connection with %s: %s", self._peer_name(), reason)
                self._close_transport()
        if self._queue:
            self._held_back()
        self._flush()

    def _peer_name(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{peer[0]}:{peer[1]}"
        return str(peer) if peer else "peer"

    def fds_received(self, fds: list[int]) -> None:
        """File descriptors from the peer (UNIX connections), for Descriptor arguments."""
        events = self._core.receive_fds(fds)
        if events:  # too many held: the connection closes, and they are closed now
            self._handle(events)
            self._close_unclaimed_fds()

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

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._run_queued()
        self._update_reading()
        self._wake_drain_waiters()
        self._flush_soon()

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed"
        self._finish(ConnectionLost(reason))

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
        self._queue.clear()
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

    # --------------------------------------------------------------------- calls

    async def call_remote(
        self,
        command: type[Command] | Command,
        /,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | None:
        """Call ``command`` on the peer and return its response dict.

        Accepts a command class with keyword arguments, or a command instance.
        Returns ``None`` at once for commands with ``requires_answer = False``.
        Raises the declared exception for a declared error code,
        :class:`UnknownRemoteError`, :class:`UnhandledCommand`,
        :class:`ConnectionLost`, or :class:`TimeoutError` after ``timeout``
        seconds (default: ``call_timeout``). A late answer is dropped.
        """
        if isinstance(command, Command):
            kwargs = {**command.kwargs, **kwargs}
            command = type(command)
        if not command.plain:
            if command.switches_protocol:
                raise TypeError(f"{command.__name__} switches protocols: use switch_protocol()")
            self._check_fds(command, command.argument_descriptors)
        if not command.requires_answer:
            if self._write_paused:
                await self._drain()
            if self._lost or self.transport is None:
                raise self._gone()
            self._core.send_call(command, kwargs)
            self._sent()
            return None
        if self._lost or self.transport is None:
            raise self._gone()
        if timeout is None:
            timeout = self.call_timeout
        if timeout is None:
            return await self._call(command, kwargs)
        async with asyncio.timeout(timeout):
            return await self._call(command, kwargs)

    def _gone(self) -> AmpError:
        if self._switched_to is not None:
            return ProtocolSwitched("the connection switched to another protocol")
        return ConnectionLost(self._end_reason or "not connected")

    async def switch_protocol(
        self,
        command: type[ProtocolSwitchCommand],
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        /,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> asyncio.BaseProtocol:
        """Call ``command`` (a :class:`ProtocolSwitchCommand`); once answered, hand the
        connection to ``protocol_factory()`` and return that protocol.

        From the call on, this side sends no other AMP box (further calls raise
        :class:`ProtocolSwitched`, answers are dropped, as in Twisted); an error
        answer raises the declared exception and the connection speaks AMP again.
        A timeout or cancellation closes the connection (its state is unknown).
        """
        if not command.switches_protocol:
            raise TypeError(f"{command.__name__} is not a ProtocolSwitchCommand")
        if self._write_paused:
            await self._drain()
        if self._lost or self.transport is None:
            raise self._gone()
        tag = self._core.send_call(command, kwargs)
        assert tag is not None
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()  # type: ignore[union-attr]
        self._waiters[tag] = fut
        self._switch_factory = protocol_factory
        self._switch_waiter = fut
        self._flush()
        try:
            async with asyncio.timeout(timeout if timeout is not None else self.call_timeout):
                await fut
        except BaseException:
            if tag in self._core.pending_tags:  # no answer yet: the state is unknown
                self.close()
            raise
        finally:
            self._switch_factory = self._switch_waiter = None
        assert self._switched_to is not None
        return self._switched_to

    def _switched(self, data: bytes) -> None:
        """Our switch was answered: hand the transport (and ``data``) to the new protocol."""
        factory, fut = self._switch_factory, self._switch_waiter
        assert factory is not None
        assert fut is not None
        self._waiters = {tag: f for tag, f in self._waiters.items() if f is not fut}
        try:
            protocol = factory()
        except Exception as exc:
            log.error("protocol factory of a switch failed; closing", exc_info=exc)
            self._finish(ProtocolSwitched("the protocol factory failed"))
            if self.transport is not None:
                self.transport.abort()
            if not fut.done():
                fut.set_exception(exc)
            return
        self._hand_over(protocol, data)
        if not fut.done():
            fut.set_result({})

    def _hand_over(self, protocol: asyncio.BaseProtocol, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        self._switched_to = protocol
        self._finish(ProtocolSwitched("the connection switched to another protocol"))
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if data:
            cast(asyncio.Protocol, protocol).data_received(data)

    async def _drain(self) -> None:
        while self._write_paused and not self._lost:
            fut: asyncio.Future[None] = self._loop.create_future()  # type: ignore[union-attr]
            self._drain_waiters.append(fut)
            await fut

    async def _call(
        self, command: type[Command], kwargs: Mapping[str, Any], tls: bool = False
    ) -> dict[str, Any]:
        slots = self._slots
        await slots.acquire()
        try:
            # Checked here, right before sending: callers that got a slot or arrived
            # before writing paused wait as well as those arriving after.
            if self._write_paused:
                await self._drain()
            if self._lost:
                raise self._gone()
            tag = self._core.send_call(command, kwargs)
            assert tag is not None
            fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()  # type: ignore[union-attr]
            self._waiters[tag] = fut
            if self._paused:
                self._update_reading()  # its answer must be read
            if tls:
                self._flush()
                self._hold_output = True
            else:
                self._sent()
            try:
                return await fut
            except BaseException:
                if self._waiters.pop(tag, None) is not None:
                    self._core.abandon(tag)
                    if self._queue:
                        self._update_reading()
                raise
        finally:
            slots.release()

    # ---------------------------------------------------------------- dispatching

    def _dispatch(self, event: CallReceived) -> None:
        if self._lost:
            return
        command = event.command
        if not command.plain:
            if command is StartTLS:
                self._answer_start_tls(event)
                return
            if command.switches_protocol and event.tag is not None:
                self._update_reading()  # input is held until the switch is answered
                task = self._loop.create_task(self._answer_switch(event))  # type: ignore[union-attr]
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
        if self._write_paused or self._queue or self._running >= self.max_concurrent_responders:
            self._queue.append(event)
            self._update_reading()
            return
        self._run(event)

    def _run(self, event: CallReceived) -> None:
        handler = self._handlers[event.command.name]
        try:
            result = handler(**event.arguments)
        except Exception as exc:
            self._respond_error(event, exc)
            return
        if type(result) is not dict and inspect.isawaitable(result):
            self._running += 1
            task = self._loop.create_task(self._await_responder(event, result))  # type: ignore[union-attr]
            self._tasks.add(task)
            task.add_done_callback(self._responder_done)
            if self._running >= self.max_concurrent_responders:
                self._update_reading()
        else:
            self._respond(event, result)

    async def _await_responder(self, event: CallReceived, awaitable: Awaitable[Any]) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError:
            if not self._lost:
                self._respond_error(event, RuntimeError("responder cancelled"))
                self._flush_soon()
            raise
        except Exception as exc:
            self._respond_error(event, exc)
        else:
            self._respond(event, result)
        self._flush_soon()

    async def _answer_switch(self, event: CallReceived) -> None:
        tag = event.tag
        assert tag is not None
        try:
            result = self._handlers[event.command.name](**event.arguments)
            if inspect.isawaitable(result):
                result = await result
            if not isinstance(result, asyncio.BaseProtocol):
                raise TypeError(
                    f"the responder of {event.command.__name__} must return an "
                    f"asyncio protocol, not {type(result).__name__}"
                )
        except Exception as exc:
            if self._lost:
                return
            self._respond_error(event, exc)
            self._flush()
            self._handle(self._core.switch_refused())
            self._update_reading()
            self._flush()
            return
        if self._lost:
            return
        self._core.send_answer(tag, event.command, {})
        self._flush()
        self._hand_over(result, self._core.switch_accepted())

    def _responder_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._running -= 1
        if self._lost:
            return
        self._run_queued()
        self._update_reading()
        self._flush_soon()

    def _run_queued(self) -> None:
        queue = self._queue
        while queue and not self._write_paused and self._running < self.max_concurrent_responders:
            self._run(queue.popleft())

    def _respond(self, event: CallReceived, result: Any) -> None:
        if event.tag is None or self._lost:
            return
        try:
            if not event.command.plain:
                self._check_fds(event.command, event.command.response_descriptors)
            self._core.send_answer(event.tag, event.command, result or {})
        except Exception:
            log.exception(
                "responder for %s returned a response that cannot be encoded: %s",
                event.command.__name__,
                brief(result, 200),
            )
            self._core.send_error(event.tag, UNKNOWN_ERROR_CODE, "Unknown Error")

    def _respond_error(self, event: CallReceived, exc: BaseException) -> None:
        found = event.command.code_for(exc)
        description = None
        if found is not None:
            try:
                description = str(exc)
            except Exception:
                found = None  # no description can be made: answered as undeclared
        if found is None or description is None:
            log.error("responder for %s failed", event.command.__name__, exc_info=exc)
            code, fatal, description = UNKNOWN_ERROR_CODE, False, "Unknown Error"
        else:
            code, fatal = found
            if event.tag is None:
                log.warning(
                    "responder for %s raised %s (%s: %.200s); the call asked no answer, so "
                    "the peer is not told",
                    event.command.__name__,
                    type(exc).__name__,
                    code.decode("ascii", "replace"),
                    description,
                )
        if self._lost:
            return
        if event.tag is not None:
            self._core.send_error(event.tag, code, description)
        if fatal:
            log.warning("closing AMP connection after fatal error %r", code)
            self._close_transport()

    def _held_back(self) -> None:
        """After a read that left calls waiting: pause reading, or (reading on for
        answers to our calls) disconnect a peer with too many calls waiting."""
        if len(self._queue) > self.max_queued_calls and self._waiters:
            reason = (
                f"{len(self._queue)} of its calls wait for a responder, over "
                f"max_queued_calls ({self.max_queued_calls}), while "
                f"{len(self._waiters)} of ours await answers"
            )
            log.warning("closing AMP connection with %s: %s", self._peer_name(), reason)
            self._abort(f"the peer sent too many calls: {reason}")
        else:
            self._update_reading()  # answers may have ended our wait for them

    def _update_reading(self) -> None:
        """Pause reading while ``max_concurrent_responders`` calls wait to be run and
        no call of ours awaits an answer.

        Calls wait while the responders are at their limit or writing is paused.
        Answers to our own calls are always read: a responder may be waiting for
        one (it called the peer back), and two peers that both stopped writing must
        not stop reading each other; meanwhile ``max_queued_calls`` bounds the calls
        held back (see :meth:`_dispatch`).
        """
        pause = (
            len(self._queue) >= self.max_concurrent_responders and not self._waiters
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

    # ---------------------------------------------------------------------- TLS

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Send ``StartTLS`` and, once answered, handshake as the TLS client.

        If it times out, is cancelled or fails before TLS is up, the connection is
        closed (its state is unknown): pending and later calls raise
        :class:`ConnectionLost` saying so.
        """
        if self._tls_started:
            raise AmpError("TLS already started on this connection")
        try:
            async with asyncio.timeout(timeout):
                await self._call(StartTLS, {}, tls=True)
                await self._switch_to_tls(ssl_context, False, server_hostname)
        except BaseException as exc:
            if self._hold_output or self._hold_input:  # the TLS switch is half done
                what = "failed"
                if isinstance(exc, TimeoutError | asyncio.CancelledError):
                    what = "timed out" if isinstance(exc, TimeoutError) else "was cancelled"
                self._abort(f"start_tls {what} before TLS was up; the connection is closed")
            raise

    def _abort(self, reason: str) -> None:
        """End the connection now: pending and later calls fail with ``reason``."""
        if self._lost:
            return
        transport = self.transport
        self._end_reason = reason
        self._finish(ConnectionLost(reason))
        if transport is not None:
            transport.abort()

    def _begin_tls_switch(self) -> None:
        self._tls_started = True
        self._hold_output = True
        self._hold_input = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _answer_start_tls(self, event: CallReceived) -> None:
        if event.tag is None:
            return
        if self.tls_context is None or self._tls_started:
            reason = "TLS already started" if self._tls_started else "TLS not available"
            self._core.send_error(event.tag, TLS_ERROR_CODE, reason)
            return
        self._core.send_answer(event.tag, StartTLS, {})
        self._flush()
        self._begin_tls_switch()
        self._tls_task = self._loop.create_task(  # type: ignore[union-attr]
            self._server_tls(self.tls_context)
        )

    async def _server_tls(self, context: ssl.SSLContext) -> None:
        try:
            await self._switch_to_tls(context, True, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("TLS handshake failed: %s", exc)
            self._close_transport()

    async def _switch_to_tls(
        self, context: ssl.SSLContext, server_side: bool, server_hostname: str | None
    ) -> None:
        loop = self._loop
        transport = self.transport
        assert loop is not None
        assert transport is not None
        new_transport = await loop.start_tls(
            transport,
            self,
            context,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        if new_transport is None:
            raise ConnectionLost("connection closed during the TLS handshake")
        self.transport = new_transport
        self._hold_output = False
        self._hold_input = False
        held, self._held_input = self._held_input, []
        if self._paused:
            self.transport.pause_reading()
        self._flush()
        if held:
            self.data_received(b"".join(held))

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_closed(self) -> bool:
        """True once the connection is lost."""
        return self._lost

    def close(self) -> None:
        """Close the connection: queued bytes are still sent, for at most
        ``close_timeout`` seconds (a peer that stops reading), then it is aborted."""
        self._close_transport()

    def _close_transport(self) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
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

    async def __aenter__(self: P) -> P:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()


async def connect(
    host: str,
    port: int,
    protocol_factory: Callable[[], P] = AMP,  # type: ignore[assignment]
    **kwargs: Any,
) -> P:
    """Open a TCP connection and return the connected protocol instance.

    Extra keyword arguments go to :meth:`asyncio.loop.create_connection`
    (for example ``ssl=``).
    """
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(protocol_factory, host, port, **kwargs)
    return protocol


async def serve(
    protocol_factory: Callable[[], AMP],
    host: str = "127.0.0.1",
    port: int = 0,
    **kwargs: Any,
) -> asyncio.Server:
    """Start a TCP server; each connection gets ``protocol_factory()``.

    Extra keyword arguments go to :meth:`asyncio.loop.create_server`.
    """
    loop = asyncio.get_running_loop()
    return await loop.create_server(protocol_factory, host, port, **kwargs)


async def connect_unix(
    path: str | os.PathLike[str],
    protocol_factory: Callable[[], P] = AMP,  # type: ignore[assignment]
) -> P:
    """Connect to the UNIX socket ``path``; the connection can pass file descriptors
    (:class:`Descriptor` arguments), like Twisted's ``connectUNIX``."""
    _, protocol = await open_unix_connection(path, protocol_factory)
    return cast(P, protocol)


async def serve_unix(
    protocol_factory: Callable[[], AMP], path: str | os.PathLike[str]
) -> UnixServer:
    """Listen on the UNIX socket ``path`` (created; must not exist; ``close()`` removes
    it while it is still this server's); each connection gets ``protocol_factory()``
    and can pass file descriptors."""
    return await start_unix_server(protocol_factory, path)
