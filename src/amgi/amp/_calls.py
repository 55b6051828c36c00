"""Calls to the peer: :meth:`~Caller.call_remote`, and the switches a call leads to
(:meth:`~Caller.switch_protocol`, :meth:`~Caller.start_tls`) with the hand-over of the
transport that both sides of a switch share."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any, cast

from ._command import Command, ProtocolSwitchCommand, StartTLS
from ._errors import AmpError, ConnectionLost, ProtocolSwitched
from ._link import Link

log = logging.getLogger("amgi.amp")


class Caller(Link):
    """What this side asks of the peer."""

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
            if self._ended:
                raise self._gone()
            self._core.send_call(command, kwargs)
            self._sent()
            return None
        if self._ended:
            raise self._gone()
        if timeout is None:
            timeout = self.call_timeout
        if timeout is None:
            return await self._call(command, kwargs)
        async with asyncio.timeout(timeout):
            return await self._call(command, kwargs)

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
            if self._ended:
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

    # ----------------------------------------------------------- protocol switch

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
        if self._ended:
            raise self._gone()
        tag = self._core.send_call(command, kwargs)
        assert tag is not None
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()  # type: ignore[union-attr]
        self._waiters[tag] = fut
        self._switch_factory = protocol_factory
        self._switch_waiter = fut
        if self._paused:
            self._update_reading()  # its answer must be read
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

    def _begin_tls_switch(self) -> None:
        self._tls_started = True
        self._hold_output = True
        self._hold_input = True
        if self.transport is not None:
            self.transport.pause_reading()

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
