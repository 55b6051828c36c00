"""The peer's input: the core's events routed to where they belong (answers to our
waiting calls, the peer's calls to responders) and the running of responders, held back
under the limits, with the answers or errors they give."""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
from collections.abc import Awaitable
from typing import Any, cast

from ._arguments import brief
from ._calls import Caller
from ._command import StartTLS
from ._connection import (
    AnswerDropped,
    AnswerReceived,
    CallReceived,
    CallRejected,
    ErrorReceived,
    Event,
    ProtocolViolation,
    Switched,
)
from ._errors import TLS_ERROR_CODE, UNKNOWN_ERROR_CODE

log = logging.getLogger("amgi.amp")

# Refused calls of one connection logged as warnings; the rest are logged at debug.
_LOGGED_REFUSALS = 5


class Dispatcher(Caller):
    """What the peer sends: answers, errors, calls and switches."""

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
                self._refused(cast(CallRejected, event))
            elif kind is AnswerDropped:
                tag = cast(AnswerDropped, event).tag
                log.debug("dropped late answer for abandoned call %r", tag)
            elif kind is Switched:
                self._switched(cast(Switched, event).data)
                return
            else:
                reason = cast(ProtocolViolation, event).reason
                log.warning("closing AMP connection with %s: %s", self._peer_name(), reason)
                self._close_transport(f"the peer broke the AMP protocol: {reason}")
        if self._queue or self._refused_unsent:
            self._held_back()
        self._flush()

    def _refused(self, rejected: CallRejected) -> None:
        """A call the core refused (unknown command, bad arguments) and answered itself.

        Its error answer is output like any other: while writing is paused it counts
        towards the calls held back (see :meth:`_held_back`). The first few of a
        connection are logged as warnings, the rest at debug level (a peer cannot fill
        the log).
        """
        if self._write_paused and rejected.tag is not None:
            self._refused_unsent += 1
        self._refusals += 1
        level, note = logging.WARNING, ""
        if self._refusals > _LOGGED_REFUSALS:
            level = logging.DEBUG
        elif self._refusals == _LOGGED_REFUSALS:
            note = "; further refused calls of this connection are logged at debug level"
        log.log(
            level,
            "rejected call %.80r from %s: %s %.200s%s",
            rejected.name,
            self._peer_name(),
            rejected.code.decode("ascii", "replace"),
            rejected.description,
            note,
        )
        self.call_rejected(rejected.name, rejected.code, rejected.description)

    def call_rejected(self, name: bytes, code: bytes, description: str) -> None:
        """Called after a call of the peer was refused without a responder (an unknown
        command, or arguments that do not decode); its error answer is already queued.
        Override it to act on such a peer (a server may close an unauthenticated one)."""

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
            self._close_transport(f"closed after the fatal error {code!r} answered to the peer")

    def _held_back(self) -> None:
        """After a read that left calls waiting (or refusals unsent while writing is
        paused): pause reading, or (reading on for answers to our calls) disconnect a
        peer with too many calls waiting."""
        held = len(self._queue) + self._refused_unsent
        if held > self.max_queued_calls and self._waiters:
            reason = (
                f"{held} of its calls wait for a responder or for their answer to be "
                f"sent, over max_queued_calls ({self.max_queued_calls}), while "
                f"{len(self._waiters)} of ours await answers"
            )
            log.warning("closing AMP connection with %s: %s", self._peer_name(), reason)
            self._abort(f"the peer sent too many calls: {reason}")
        else:
            self._update_reading()  # answers may have ended our wait for them

    # ------------------------------------------------------------------ switches

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
            self._close_transport(f"the TLS handshake failed: {exc}")
