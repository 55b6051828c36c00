"""The lifespan protocol: one long application call around the server's life."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amgi.errors import InvalidEvent, StartupFailed
from amgi.runtime.config import LifespanMode
from amgi.types import AMGIApplication, LifespanReceiveEvent, LifespanScope, LifespanSendEvent

__all__ = ["Lifespan"]

logger = logging.getLogger("amgi.runtime")


class Lifespan:
    """Drives the app's lifespan call: :meth:`startup` before messages, :meth:`shutdown` after.

    In ``auto`` mode an app that returns or raises without ever calling ``receive()`` is
    taken not to speak lifespan: that is logged once and the server goes on. Once the app
    has received ``lifespan.startup``, an exception or ``lifespan.startup.failed`` is a
    failed startup (:class:`amgi.errors.StartupFailed`).
    """

    def __init__(
        self, app: AMGIApplication, mode: LifespanMode = "auto", *, cancel_grace: float = 5.0
    ) -> None:
        self._app = app
        self._mode = mode
        self._grace = cancel_grace
        self.state: dict[str, Any] = {}
        self.supported = mode != "off"
        self._events: asyncio.Queue[LifespanReceiveEvent] = asyncio.Queue()
        self._reply: asyncio.Future[LifespanSendEvent] | None = None
        self._received = False
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._phase = "startup"
        self.abandoned = False
        """True when the lifespan call ignored cancellation and was left running."""

    async def startup(self, timeout: float | None = None) -> None:
        """Run the app until it reports startup; raise ``StartupFailed`` if it failed.

        An app that has not answered within ``timeout`` seconds has failed to start (its
        call is cancelled), and so has one that answered ``lifespan.startup.failed`` (its
        call is cancelled too). Cancelling ``startup`` cancels the app's call as well.
        """
        if self._mode == "off":
            return
        loop = asyncio.get_running_loop()
        self._reply = loop.create_future()
        self._task = asyncio.create_task(self._main(), name="amgi-lifespan")
        await self._events.put({"type": "lifespan.startup"})
        try:
            async with asyncio.timeout(timeout):
                reply = await self._wait_reply()
        except TimeoutError:
            await self.cancel()
            raise StartupFailed(
                f"the application did not complete lifespan startup within {timeout:g}s"
            ) from None
        except asyncio.CancelledError:
            await self.cancel()
            raise
        if reply is None or reply["type"] == "lifespan.startup.complete":
            return
        # A failed startup ends the call: an app still waiting in receive() (for a
        # shutdown that will never come) is cancelled, so its cleanup runs now.
        await self.cancel()
        if reply["type"] == "lifespan.startup.failed":
            raise StartupFailed(reply.get("message") or "application startup failed")
        raise StartupFailed(f"application answered lifespan.startup with {reply['type']!r}")

    async def shutdown(self, timeout: float | None = None) -> bool:
        """Tell the app to shut down; True when it completed (or does not speak lifespan)."""
        task = self._task
        if not self.supported or task is None or task.done():
            return True
        loop = asyncio.get_running_loop()
        self._reply = loop.create_future()
        self._phase = "shutdown"
        await self._events.put({"type": "lifespan.shutdown"})
        try:
            async with asyncio.timeout(timeout):
                reply = await self._wait_reply()
        except TimeoutError:
            logger.error("application did not complete lifespan shutdown in %gs", timeout)
            await self.cancel()
            return False
        except StartupFailed as exc:
            logger.error("application shutdown failed: %s", exc)
            return False
        await self.cancel()
        if reply is None:
            return self._error is None
        if reply["type"] == "lifespan.shutdown.failed":
            logger.error("application shutdown failed: %s", reply.get("message", ""))
            return False
        return True

    async def cancel(self) -> None:
        """Stop the lifespan call if it is still running (it owns no more work).

        A call that ignores cancellation for ``cancel_grace`` seconds is abandoned (and
        logged): the process is about to stop and no longer waits for it.
        """
        task = self._task
        if task is None or task.done():
            return
        task.cancel()
        await asyncio.wait({task}, timeout=self._grace)
        if not task.done():
            self.abandoned = True
            logger.error(
                "the application's lifespan call ignored cancellation for %gs: abandoned",
                self._grace,
            )
        elif not task.cancelled():
            task.exception()  # retrieved: its failure was handled in _main

    async def _wait_reply(self) -> LifespanSendEvent | None:
        """The app's answer, or None when its call ended without one."""
        reply, task = self._reply, self._task
        assert reply is not None
        assert task is not None
        waiters: set[asyncio.Future[Any]] = {reply, task}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if reply.done():
            return reply.result()
        # The call ended without answering.
        error = self._error
        if not self._received:
            if self._mode == "on":
                raise StartupFailed(
                    "lifespan is 'on' but the application does not speak lifespan"
                    + (f" (it raised {type(error).__name__}: {error})" if error else "")
                )
            self.supported = False
            logger.info(
                "application does not speak lifespan (%s); continuing without it",
                f"raised {type(error).__name__}: {error}" if error else "returned at once",
            )
            return None
        if error is not None:
            raise StartupFailed(
                f"application raised during lifespan: {type(error).__name__}: {error}"
            )
        logger.warning("application returned from its lifespan call without answering")
        self.supported = False
        return None

    async def _main(self) -> None:
        scope: LifespanScope = {
            "type": "lifespan",
            "amgi": {"version": "1.0", "spec_version": "1.0"},
            "state": self.state,
        }
        try:
            await self._app(scope, self._receive, self._send)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._error = exc
            if self._received:
                logger.exception("application raised in its lifespan call")

    async def _receive(self) -> LifespanReceiveEvent:
        self._received = True
        return await self._events.get()

    async def _send(self, event: LifespanSendEvent) -> None:
        kind = event.get("type") if isinstance(event, dict) else None
        if kind not in _ANSWERS:
            raise InvalidEvent(
                f"unknown event {kind!r} in a lifespan call (expected one of {sorted(_ANSWERS)})"
            )
        if kind.endswith(".failed") and type(event.get("message")) is not str:
            raise InvalidEvent(
                f"{kind} needs 'message': str (why it failed), "
                f"got {type(event.get('message')).__name__}"
            )
        reply = self._reply
        if reply is None or reply.done() or _ANSWERS[kind] != self._phase:
            raise InvalidEvent(f"{kind} does not answer a pending lifespan event")
        reply.set_result(event)


_ANSWERS = {
    "lifespan.startup.complete": "startup",
    "lifespan.startup.failed": "startup",
    "lifespan.shutdown.complete": "shutdown",
    "lifespan.shutdown.failed": "shutdown",
}
