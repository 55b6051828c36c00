"""What the Lambda adapters share: one event loop, lifespan and publisher per container.

A Lambda container runs invocations one after another in one process. The adapter keeps
one asyncio event loop for the life of the container, so the application's lifespan call
(started on the first invocation) and its connections survive between invocations. Each
invocation runs its batches through :func:`amgi.runtime.call_app`, the same batch call
the long-lived runtime makes, bounded by the invocation's remaining time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import FrameType
from typing import Any, NamedTuple, Protocol

from amgi.errors import AMGIError, SendError, StartupFailed
from amgi.runtime import CallCancelled, Lifespan, RuntimeConfig
from amgi.runtime.app import check_app, watched
from amgi.runtime.batch import NACK_RETRY_EXTENSION, Delivery
from amgi.runtime.routing import Router
from amgi.servers.kit import dead_letter_headers
from amgi.transport import Batch, Bindings, HeaderList, Message, Settlement, Transport
from amgi.types import AMGIApplication

__all__ = [
    "BatchFailed",
    "BatchResult",
    "LambdaAdapter",
    "LambdaContext",
    "MalformedEvent",
    "is_object",
]

logger = logging.getLogger("amgi.serverless")


class LambdaContext(Protocol):
    """The part of the Lambda context object the adapters use."""

    def get_remaining_time_in_millis(self) -> int: ...


def is_object(value: Any) -> bool:
    """Whether an event part is a JSON object (a dict, checked first, or any mapping)."""
    return type(value) is dict or isinstance(value, Mapping)


class MalformedEvent(AMGIError, ValueError):
    """The invocation event is not of the documented shape; nothing was processed."""


class BatchFailed(AMGIError):
    """Raised from an invocation so that Lambda retries the whole batch."""


PublisherFactory = Callable[[Mapping[str, Any]], Transport]
"""Makes the transport ``message.send`` goes through, from the first event that needs it."""


class BatchResult(NamedTuple):
    """How one batch of an invocation ended."""

    settlement: Settlement
    in_time: bool
    """False when the call was still running at the deadline (cancelled or abandoned)."""


class LambdaAdapter:
    """Base of the Lambda handlers: call it as ``handler(event, context)``.

    ``config`` supplies ``max_attempts`` (a nacked message on its last attempt counts as
    dead) and ``lifespan``. ``publisher`` is the transport that ``message.send`` uses;
    it is connected on the first send and closed at shutdown. ``routes`` sends the
    addresses its patterns match elsewhere (e.g. to Kafka): each route's transport is
    connected on the first send to it (again on the next one if that failed) and closed
    at shutdown. ``deadline_margin`` is the
    time kept back from the invocation's remaining time to report the outcome.
    ``dead_letter_address``: where a message the app nacks with ``"retry": False`` (or
    on its last attempt) is sent at once, through the publisher (or ``routes``); the
    ``message.nack.retry`` extension is advertised only when it is set.
    """

    def __init__(
        self,
        app: AMGIApplication,
        *,
        config: RuntimeConfig | None = None,
        publisher: Transport | PublisherFactory | None = None,
        deadline_margin: float = 1.0,
        handle_sigterm: bool = True,
        routes: Router | None = None,
        dead_letter_address: str | None = None,
    ) -> None:
        check_app(app)
        self.app = app
        self.routes = routes
        self._routed: dict[int, Transport] = {}
        """The route transports connected, by id, in the order they connected."""
        self._route_locks: dict[int, asyncio.Lock] = {}
        """One per route transport, so that concurrent first sends connect it once."""
        self.config = config or RuntimeConfig()
        self.deadline_margin = deadline_margin
        self.handle_sigterm = handle_sigterm
        self.dead_letter_address = dead_letter_address
        self._publisher_spec = publisher
        self._publisher: Transport | None = None
        self._publisher_lock: asyncio.Lock | None = None
        self._event: Mapping[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lifespan: Lifespan | None = None
        self._closing = False
        self._sigterm_installed = False
        self._exit: Callable[[], None] | None = None
        """What a SIGTERM that came during an invocation does once :meth:`close` ran."""
        self._stop_at: float | None = None
        """The loop time by which a SIGTERM wants the invocation in progress over."""
        self._stop_signal: asyncio.Future[None] | None = None
        """Done at that SIGTERM: wakes what waits for the invocation's calls."""

    # -- the Lambda entry point ------------------------------------------------------

    def __call__(self, event: Any, context: LambdaContext | None = None) -> Any:
        """Handle one invocation on the container's event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.new_event_loop()
            if self.handle_sigterm and not self._sigterm_installed:
                self._install_sigterm()
        try:
            return loop.run_until_complete(self.handle(event, context))
        finally:
            if self._closing:
                self.close()

    async def handle(self, event: Any, context: LambdaContext | None = None) -> Any:
        """Handle one invocation (the coroutine behind ``__call__``)."""
        raise NotImplementedError

    def close(self) -> None:
        """Run lifespan shutdown, close the publisher and the event loop (container end);
        then exit if a SIGTERM asked for it while the loop was busy."""
        loop = self._loop
        if loop is not None and loop.is_running():
            self._closing = True  # at the end of the invocation in progress
            return
        try:
            if loop is not None and not loop.is_closed():
                try:
                    loop.run_until_complete(self.aclose())
                    loop.run_until_complete(self._cancel_leftovers())
                finally:
                    loop.close()
                    self._loop = None
                    self._closing = False
                    self._stop_at = None
        finally:
            end, self._exit = self._exit, None
            if end is not None:
                end()

    async def _cancel_leftovers(self) -> None:
        """Cancel what is still running on the loop (calls abandoned at a deadline, tasks
        the app started), so that nothing is destroyed pending when the loop closes."""
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=self.config.cancel_grace)
        if pending:
            logger.error("%d task(s) ignored cancellation at close: abandoned", len(pending))

    async def aclose(self) -> None:
        """The asynchronous part of :meth:`close`, for use on a loop you own: ends what is
        bound to this loop, so that the handler may run again on another one."""
        self._publisher_lock = None
        self._stop_signal = None
        self._route_locks.clear()
        lifespan, self._lifespan = self._lifespan, None
        if lifespan is not None:
            await lifespan.shutdown(self.config.lifespan_shutdown_timeout)
        routed, self._routed = self._routed, {}
        for transport in reversed(routed.values()):
            try:
                await transport.close()
            except Exception:
                logger.exception("closing the %s send route failed", transport.name)
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            try:
                await publisher.close()
            except Exception:
                logger.exception("closing the %s publisher failed", publisher.name)

    def _install_sigterm(self) -> None:
        """On SIGTERM: :meth:`close`, then the previous handler or exit 0. During an
        invocation, after it: the loop is busy; a second SIGTERM exits at once."""

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            def end() -> None:
                if previous not in (signal.SIG_DFL, signal.SIG_IGN, None) and callable(previous):
                    previous(signum, frame)
                else:
                    raise SystemExit(0)

            if self._exit is not None:
                logger.warning("SIGTERM received again: exiting now")
                self._exit, self._closing = None, False
                end()
                return
            self._exit = end
            loop = self._loop
            if loop is not None and loop.is_running():
                logger.info(
                    "SIGTERM: shutting the application down after the invocation in progress "
                    "(again to exit now)"
                )
                self._closing = True
                loop.call_soon_threadsafe(self._stop_soon)
                return
            logger.info("SIGTERM: shutting the application down")
            self.close()

        try:
            previous = signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread: the host shuts us down itself
            logger.debug("not on the main thread: SIGTERM left to the host")
            return
        self._sigterm_installed = True

    def _stop_soon(self) -> None:
        """A SIGTERM came during the invocation: what runs gets ``shutdown_timeout`` to
        end (the host kills the container soon), then it is cancelled like at a deadline."""
        self._stop_at = asyncio.get_running_loop().time() + self.config.shutdown_timeout
        if self._stop_signal is not None and not self._stop_signal.done():
            self._stop_signal.set_result(None)

    @property
    def stopping(self) -> bool:
        """Whether a SIGTERM cut the invocation in progress short."""
        return self._stop_at is not None

    async def stopped_within(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if a SIGTERM comes: whether one came."""
        if not self.stopping:
            await asyncio.wait([self._stop_future()], timeout=seconds)
        return self.stopping

    def _stop_future(self) -> asyncio.Future[None]:
        """The future a SIGTERM completes, on the running loop."""
        loop = asyncio.get_running_loop()
        if self._stop_signal is None or self._stop_signal.get_loop() is not loop:
            self._stop_signal = loop.create_future()
            if self._stop_at is not None:
                self._stop_signal.set_result(None)
        return self._stop_signal

    # -- one invocation ----------------------------------------------------------------

    def _time_left(self, context: LambdaContext | None, keep: float | None = None) -> float | None:
        """Seconds the application may still use in this invocation, or None (no limit):
        the context's remaining time now, less ``keep`` (``deadline_margin``); after a
        SIGTERM, at most what is left of ``shutdown_timeout``."""
        left = None
        if context is not None:
            remaining = context.get_remaining_time_in_millis() / 1000.0
            left = max(0.0, remaining - (self.deadline_margin if keep is None else keep))
        if self._stop_at is not None:
            until_stop = max(0.0, self._stop_at - asyncio.get_running_loop().time())
            left = until_stop if left is None else min(left, until_stop)
        return left

    async def _wait(
        self,
        tasks: Sequence[asyncio.Future[Any]],
        context: LambdaContext | None,
        keep: float | None = None,
    ) -> set[asyncio.Future[Any]]:
        """Wait for ``tasks`` within the invocation's time (shortened by a SIGTERM that
        comes meanwhile); those still pending then."""
        pending = set(tasks)
        stop = self._stop_future()
        while pending:
            watch = pending if stop.done() else pending | {stop}
            done, _ = await asyncio.wait(
                watch, timeout=self._time_left(context, keep), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            pending -= done
        return pending

    def _grace(self, context: LambdaContext | None) -> float:
        """How long a cancelled call may take to end: half the margin, within Lambda."""
        if context is None:
            return self.config.cancel_grace
        return min(self.config.cancel_grace, self.deadline_margin / 2)

    async def _startup(self, context: LambdaContext | None) -> None:
        """Lifespan startup (a cold start), within the invocation's time as well.

        Raises ``StartupFailed`` (tried again on the next invocation): the app failed,
        did not answer within ``startup_timeout``, or not within the invocation's
        remaining time less ``deadline_margin``, so that the invocation still fails in
        time rather than being killed by Lambda.
        """
        if self._lifespan is not None:
            return
        timeout = self.config.startup_timeout
        left = self._time_left(context)
        cut = False
        if left is not None and left < timeout:
            cut, timeout = True, left
        lifespan = Lifespan(self.app, self.config.lifespan, cancel_grace=self._grace(context))
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await lifespan.startup(timeout)
        except StartupFailed as exc:
            if cut and loop.time() - started >= timeout:
                raise StartupFailed(
                    f"lifespan startup did not complete within the {timeout:.3g}s this "
                    f"invocation had left (its remaining time less deadline_margin "
                    f"{self.deadline_margin:g}s): no record was delivered, the batch is "
                    "retried"
                ) from exc
            raise
        self._lifespan = lifespan

    def extensions(self) -> dict[str, dict[str, Any]] | None:
        """What the scope advertises: ``message.nack.retry`` when ``retry: False`` can
        be honoured, that is with a ``dead_letter_address`` to send such a message to."""
        if self.dead_letter_address is None:
            return None
        return {NACK_RETRY_EXTENSION: {}}

    async def run_batches(
        self,
        batches: Sequence[Batch],
        event: Mapping[str, Any],
        context: LambdaContext | None,
    ) -> list[BatchResult]:
        """Call the app once per batch, concurrently, within the invocation's time.

        Lifespan startup runs first (on a cold start); the batches then have the
        context's remaining time less ``deadline_margin``, measured after it. Batches
        still running at the deadline are cancelled: what their app acked stays acked,
        what it had in hand is nacked ("cancelled (shutdown or deadline)"), what it never
        received is handed back uncounted.
        """
        await self._startup(context)
        self._event = event
        lifespan = self._lifespan
        state = lifespan.state if lifespan is not None and lifespan.supported else None
        extensions = self.extensions()
        cannot_serve: list[StartupFailed] = []
        app = watched(self.app, cannot_serve.append)
        deliveries = [
            Delivery(app, b, self._publish, self.config, state=state, extensions=extensions)
            for b in batches
        ]
        tasks = [asyncio.create_task(d.run()) for d in deliveries]
        if not tasks:
            return []
        pending = await self._wait(tasks, context)
        grace = self._grace(context)
        if pending:
            logger.warning(
                "%d batch(es) still running at the invocation deadline: cancelling them",
                len(pending),
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=grace)
        results = []
        for task, delivery in zip(tasks, deliveries, strict=True):
            in_time = task not in pending
            if not task.done():
                logger.error("a call ignored cancellation for %gs: abandoned", grace)
                settlement = delivery.abandon("the application ignored cancellation")
            else:
                try:
                    settlement = task.result()
                except CallCancelled as exc:
                    settlement = exc.settlement
            results.append(BatchResult(settlement, in_time))
        if cannot_serve:
            # The app cannot serve any record (a broken handler found at its first message,
            # lifespan off): a failed startup, which no record is charged for.
            raise StartupFailed(str(cannot_serve[0])) from cannot_serve[0]
        return results

    async def in_time(
        self,
        sends: Sequence[Awaitable[None]],
        context: LambdaContext | None,
        keep: float | None = None,
    ) -> list[Exception | None]:
        """Run ``sends`` concurrently within the invocation's time left (less ``keep``,
        by default ``deadline_margin``); the outcome of each: None when done, else its
        error. One still running at the deadline is cancelled and fails with a
        ``TimeoutError``: an endpoint that never answers must not run the invocation
        into Lambda's timeout, which retries the whole batch."""
        tasks = [asyncio.ensure_future(send) for send in sends]
        if not tasks:
            return []
        left = self._time_left(context, keep)
        pending = await self._wait(tasks, context, keep)
        if pending:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=self._grace(context))
        outcomes: list[Exception | None] = []
        for task in tasks:
            if task in pending:
                outcomes.append(TimeoutError(f"not done within the {left or 0:.3g}s left"))
                continue
            error = task.exception()
            if error is not None and not isinstance(error, Exception):
                raise error
            outcomes.append(error)
        return outcomes

    async def dead_letter(
        self, source: str, message: Message, reason: str, bindings: Bindings
    ) -> None:
        """Send ``message`` to ``dead_letter_address`` with the dead-letter headers
        (attempt, original address, reason); a failed send raises the send error."""
        assert self.dead_letter_address is not None
        headers = dead_letter_headers(
            message.headers, attempt=message.attempt, address=source, reason=reason
        )
        await self._publish(self.dead_letter_address, headers, message.payload, bindings)

    # -- message.send --------------------------------------------------------------------

    def default_publisher(self, event: Mapping[str, Any]) -> Transport:
        """The transport ``message.send`` uses when none was given."""
        raise NotImplementedError

    async def _publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        routed = self.routes.target(address) if self.routes is not None else None
        if routed is not None:
            connected = self._routed.get(id(routed))
            publisher = connected if connected is not None else await self._connect_route(routed)
        else:
            publisher = self._publisher or await self._connect_publisher()
        try:
            await publisher.publish(address, headers, payload, bindings)
        except SendError:
            raise
        except Exception as exc:
            raise publisher.send_error(
                f"{publisher.name}: could not send to {address!r}: {exc}"
            ) from exc

    async def _connect_route(self, target: Transport) -> Transport:
        """Connect one route's transport, once however many sends wait for it."""
        lock = self._route_locks.setdefault(id(target), asyncio.Lock())
        async with lock:
            if id(target) not in self._routed:
                await _connect(target)
                self._routed[id(target)] = target
        return target

    async def _connect_publisher(self) -> Transport:
        if self._publisher_lock is None:
            self._publisher_lock = asyncio.Lock()
        async with self._publisher_lock:
            if self._publisher is not None:
                return self._publisher
            spec = self._publisher_spec
            if isinstance(spec, Transport):
                publisher = spec
            else:
                try:
                    publisher = (
                        self.default_publisher(self._event) if spec is None else spec(self._event)
                    )
                except SendError:
                    raise
                except Exception as exc:
                    raise SendError(f"cannot make the publisher to send: {exc}") from exc
            await _connect(publisher)
            self._publisher = publisher
            return publisher


async def _connect(transport: Transport) -> None:
    """Connect ``transport`` to send; on failure close it and raise its send error. Cut
    by the deadline, it is closed as well: what the connect opened would leak otherwise,
    and the next send connects it afresh."""
    try:
        await transport.connect()
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await transport.close()
        raise
    except Exception as exc:
        with contextlib.suppress(Exception):
            await transport.close()
        raise transport.send_error(f"{transport.name}: cannot connect to send: {exc}") from exc
