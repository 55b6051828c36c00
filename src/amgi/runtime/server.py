"""The long-lived runtime: lifespan, fetch loop, ordering, concurrency, settlement, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Hashable
from operator import attrgetter
from types import FrameType
from typing import Any

from amgi.errors import ConfigurationError, SendError, StartupFailed
from amgi.runtime.app import check_app, watched
from amgi.runtime.batch import (
    NACK_RETRY_EXTENSION,
    CallCancelled,
    CallHooks,
    Delivery,
    place,
    release,
)
from amgi.runtime.config import RuntimeConfig
from amgi.runtime.ledger import CallGuard, CrashLedger
from amgi.runtime.lifespan import Lifespan
from amgi.runtime.metrics import BatchStats, MetricsHook
from amgi.runtime.report import report_nacks
from amgi.runtime.routing import Router
from amgi.servers.kit.backoff import Backoff
from amgi.transport import (
    Batch,
    Bindings,
    DeadLetter,
    HeaderList,
    Message,
    Settlement,
    Transport,
)
from amgi.types import AMGIApplication

__all__ = ["Runtime"]

logger = logging.getLogger("amgi.runtime")

_FETCH_BACKOFF_FIRST = 0.1
_FETCH_BACKOFF_MAX = 5.0
SIGNAL_DEBOUNCE = 0.2
"""Seconds within which a repeated stop signal is the same one, delivered to the process
and to its group (GNU ``timeout``, a shell): it does not count as a second signal."""
_attempt = attrgetter("attempt")


_MIN_CLOSE = 5.0
"""Seconds a close always gets, even with a shorter ``shutdown_timeout`` (which is about
the application's calls: a ``--shutdown-timeout 0`` must not cut off final commits)."""


def _named(name: str, exc: Exception) -> str:
    """``exc``'s text led by the server's name, unless the server put it there itself."""
    text = str(exc)
    return text if text.startswith(f"{name}:") else f"{name}: {text}"


def _unmoved(settlement: Settlement, exc: Exception) -> None:
    """A settle raised: the retries and dead letters it did not say it moved stay
    unacknowledged (so the log and the metrics say, not "retrying" or "dead-lettered")."""
    error = f"the settle failed: {exc}"
    for r in settlement.retry:
        if not r.error and r.dead is None:
            r.not_scheduled(error)
    for d in settlement.dead:
        if d.fate is None:
            d.not_stored(error)


def _cleared(suspects: list[str], settlement: Settlement, cancelled: bool) -> list[str]:
    """The crash ledger's suspects a batch cleared: all but those a stop handed back
    unseen and, when it cancelled the call, those it left to come again. They keep their
    crash counts: the stop, not the message, ended their turn."""
    kept = {r.message.id for r in settlement.retry if r.uncounted or cancelled}
    return [mid for mid in suspects if mid not in kept]


class Runtime:
    """Runs one AMGI application on one transport until asked to stop.

    ``await runtime.serve()`` connects the transport, runs lifespan startup, then loops:
    fetch batches while fewer than ``config.concurrency`` are in flight, call the app once
    per batch (batches with the same ordering key one after another), settle each batch
    in one transport call. :meth:`request_stop` (or SIGINT/SIGTERM when
    ``handle_signals`` is true) stops fetching, lets in-flight batches finish within
    ``config.shutdown_timeout``, settles them, runs lifespan shutdown and closes the
    transport. ``serve`` returns the process exit code (0 after a clean shutdown) and
    raises :class:`amgi.errors.AMGIError` (or ``OSError``) when it cannot start.
    A call that ignores cancellation for ``config.cancel_grace`` seconds is abandoned:
    its batch is settled without it and :attr:`abandoned` becomes true (:meth:`run`
    then ends the process without waiting for it).
    """

    def __init__(
        self,
        app: AMGIApplication,
        transport: Transport,
        config: RuntimeConfig | None = None,
        *,
        metrics: MetricsHook | None = None,
        handle_signals: bool = False,
        routes: Router | None = None,
    ) -> None:
        check_app(app)
        self.app = app
        self._watched_app = watched(app, self._cannot_serve)
        self.routes = routes
        """Send routing: sends whose address a route matches go to that route's transport."""
        self.transport = transport
        self.config = config or RuntimeConfig()
        self.metrics = metrics or MetricsHook()
        self._reports_batches = (
            getattr(self.metrics.batch_settled, "__func__", None) is not MetricsHook.batch_settled
        )
        """False when the hook's batch_settled is the no-op: no BatchStats is built."""
        self.handle_signals = handle_signals
        self.started = asyncio.Event()
        """Set once lifespan startup is done and the transport is connected."""
        self._stop: asyncio.Event | None = None
        self._signals = 0
        self._first_signal = 0.0
        self._lifespan = Lifespan(app, self.config.lifespan, cancel_grace=self.config.cancel_grace)
        self.extensions: dict[str, dict[str, Any]] = {
            **transport.extensions,
            NACK_RETRY_EXTENSION: {},
        }
        """Extensions advertised in every message scope: the server's and the runtime's."""
        self._ledger: CrashLedger | None = None
        self._hooks: CallHooks | None = None
        self._deliveries: dict[asyncio.Task[None], tuple[Delivery, Batch, Settlement | None]] = {}
        self._abandoned: set[asyncio.Task[None]] = set()
        self._tasks: dict[asyncio.Task[None], Batch] = {}
        """Batches in flight, by the task that processes them (the lease loop extends them)."""
        self._tails: dict[Hashable, asyncio.Future[None]] = {}
        self._capacity = asyncio.Event()
        self._unstarted: list[Batch] = []
        """Batches a fetch returned that were waiting for a slot when the stop came."""
        self._waiting: list[Batch] = []
        """Batches the last fetch returned that wait for a slot (the lease loop extends
        them too: the broker delivered them to this process)."""
        self._fatal: BaseException | None = None
        self._exit_code = 0
        self._leasing = True
        self._settling: set[asyncio.Task[Any]] = set()
        """Tasks in a transport's ``settle``: a stop lets them end (bounded), not cut off."""

    # -- lifecycle -----------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Batches being processed now (read by the metrics gauge at scrape time)."""
        return len(self._tasks)

    @property
    def draining(self) -> bool:
        """True once a stop was requested (the readiness probe reports not ready)."""
        return self._stop is not None and self._stop.is_set()

    def request_stop(self) -> None:
        """Begin a graceful shutdown (safe to call more than once, from the loop's thread)."""
        if self._stop is None:
            self._stop = asyncio.Event()
        self._stop.set()

    @property
    def abandoned(self) -> bool:
        """True when an application call (or the lifespan call) ignored cancellation."""
        return bool(self._abandoned) or self._lifespan.abandoned

    def run(self, main: Coroutine[Any, Any, int] | None = None) -> int:
        """Serve on a new event loop until stopped and return the exit code (``amgi run``).

        ``main`` runs in place of :meth:`serve`: a coroutine that awaits ``serve()`` with
        something beside it (the operations listener of ``amgi run --metrics-port``).
        When the application ignored cancellation, its abandoned call cannot be waited
        for: the process then exits at once, after the runtime settled and closed.
        """
        runner = asyncio.Runner()
        try:
            code = runner.run(self.serve() if main is None else main)
        except BaseException:
            if not self.abandoned:
                runner.close()
            raise
        if self.abandoned:
            logger.error("exiting without waiting for application code that ignored cancellation")
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 1)
        runner.close()
        return code

    async def serve(self) -> int:
        """Run until stopped; return the exit code. See the class docstring."""
        self.transport.check()  # bad options fail before the app's lifespan startup
        if self._stop is None:
            self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if self.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
                # The loop runs the handler above only when it gets control back; this
                # one runs even while the application blocks the loop (time.sleep ...),
                # so that a second signal always ends the process.
                signal.signal(sig, self._on_signal_now)
                installed.append(sig)
        try:
            # Connect first, so that an unreachable broker, refused credentials or a
            # missing stream fail before the application's lifespan startup runs.
            try:
                connected = await self._connect()
            except BaseException:
                await self._close_connections()
                raise
            if not connected:
                await self._close_connections()
                return self._exit_code
            try:
                started = await self._startup()
            except BaseException:
                await self._close_connections()
                raise
            if not started:
                await self._close_connections()
                return 0
            self._open_ledger()
            self.started.set()
            logger.info(
                "serving %s on %s",
                ", ".join(self.transport.addresses) or "(no address)",
                self.transport.name,
            )
            try:
                await self._run()
            finally:
                if self._ledger is not None:
                    self._ledger.close()
            if isinstance(self._fatal, StartupFailed):
                raise self._fatal
            if self.abandoned and self._exit_code == 0:
                self._exit_code = 1
            return self._exit_code
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def _close_connections(self) -> None:
        """Close the transport and the send routes; a failure is logged, never raised."""
        transport = self.transport
        needs = transport.close_needs + 1.0 if transport.close_needs > 0 else 0.0
        await self._close_within(transport.close(), f"the {transport.name} transport", needs)
        if self.routes is not None:
            await self._close_within(self.routes.close(), "the send routes")

    async def _close_within(
        self, closing: Coroutine[Any, Any, None], what: str, needs: float = 0.0
    ) -> None:
        """Await ``closing`` for at most ``shutdown_timeout`` seconds, and at least
        :data:`_MIN_CLOSE` or what the closing thing ``needs`` (a broker that stops
        reading can hold a close forever); past that, log it, cancel it and go on."""
        task = asyncio.create_task(closing)
        timeout = max(self.config.shutdown_timeout, _MIN_CLOSE, needs)
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:
            task.cancel()  # cancelled ourselves: the close is cut short, as it was awaited
            raise
        if not done:
            logger.error("%s did not close within %gs: exiting without it", what, timeout)
            task.cancel()
            _, stuck = await asyncio.wait({task}, timeout=self.config.cancel_grace)
            self._abandoned.update(stuck)
            self._exit_code = 1
            return
        if not task.cancelled() and (exc := task.exception()) is not None:
            if not isinstance(exc, Exception):
                raise exc
            logger.error("error while closing %s", what, exc_info=exc)

    async def _connect(self) -> bool:
        """Connect the transport and the send routes, given up when a stop is requested
        meanwhile (a broker that takes the connection and never answers held the stop
        until the client's own timeout, or for ever); False if stopped."""
        connecting = asyncio.create_task(self._connect_all())
        try:
            await self._until_stopped(connecting)
        finally:
            if await self._ignored_cancel(connecting, "connecting to"):
                self._abandoned.add(connecting)
                self._exit_code = 1
        if connecting.cancelled() or not connecting.done():
            logger.info(
                "stopped while connecting to %s: nothing was delivered", self.transport.name
            )
            return False
        connecting.result()  # raises what the connect raised
        return True

    async def _connect_all(self) -> None:
        await self.transport.connect()
        if self.routes is not None:
            await self.routes.connect()

    async def _until_stopped(self, task: asyncio.Task[None]) -> None:
        """Wait for ``task`` to end or for a stop request, whichever comes first; on a
        stop (or when this wait is cancelled) ``task`` is cancelled, not waited for."""
        assert self._stop is not None
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(stop_wait, return_exceptions=True)

    async def _startup(self) -> bool:
        """Lifespan startup, given up when a stop is requested meanwhile; False if stopped."""
        startup = asyncio.create_task(self._lifespan.startup(self.config.startup_timeout))
        try:
            await self._until_stopped(startup)
        finally:
            await asyncio.gather(startup, return_exceptions=True)
        if startup.cancelled():
            logger.info("stopped during application startup: nothing was delivered")
            return False
        startup.result()  # raises StartupFailed
        return True

    def _open_ledger(self) -> None:
        transport = self.transport
        directory = self.config.crash_ledger
        if not (directory and transport.stable_ids and transport.outlives_process):
            return
        if not CrashLedger.available():
            logger.info("no crash ledger on this platform (it needs flock)")
            return
        ledger = CrashLedger(directory, transport.ledger_namespace())
        try:
            ledger.open()
        except OSError as exc:
            logger.warning(
                "crash ledger %r unusable (%s): a message that kills the process is "
                "bounded by the broker's delivery count only",
                directory,
                exc,
            )
            return
        self._ledger = ledger
        self._hooks = CallGuard(ledger)

    def _on_signal_now(self, signum: int, frame: FrameType | None) -> None:
        """Counts signals as they arrive; the second one ends the process at once."""
        now = time.monotonic()
        if self._signals and now - self._first_signal < SIGNAL_DEBOUNCE:
            return  # the same signal delivered to the process and to its group
        self._signals += 1
        if self._signals == 1:
            self._first_signal = now
            return  # the graceful stop is started by _on_signal, on the loop
        name = signal.Signals(signum).name
        if self._ledger is not None:
            self._ledger.stopped()  # the calls cut off here are no crash of their messages
        # No logging here: a lock held by the interrupted code would deadlock it.
        os.write(2, f"amgi: {name} received again: exiting now, settling nothing more\n".encode())
        os._exit(1)

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._stop or not self._stop.is_set():
            logger.info("%s received: shutting down gracefully (again to exit now)", sig.name)
        self.request_stop()

    async def _run(self) -> None:
        assert self._stop is not None
        fetcher = asyncio.create_task(self._fetch_loop(), name="amgi-fetch")
        leaser = (
            asyncio.create_task(self._lease_loop(), name="amgi-lease")
            if self.transport.lease_interval
            else None
        )
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({fetcher, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            fetcher.cancel()
            await asyncio.gather(stop_wait, return_exceptions=True)
            fetching = await self._end_fetching(fetcher)
            self.transport.stop_fetching()
            deadline = time.monotonic() + self.config.shutdown_timeout
            await self._run_handed_over(deadline)
            await self._drain(deadline)
            if leaser is not None:
                self._leasing = False
                leaser.cancel()
                if await self._ignored_cancel(leaser, "a lease extension on"):
                    self._abandoned.add(leaser)
            ok = await self._lifespan.shutdown(self.config.lifespan_shutdown_timeout)
            await self._close_connections()
            if fetching is not None:
                # Closing the transport ends a fetch that ignored cancellation, or not.
                _, stuck = await asyncio.wait({fetching}, timeout=self.config.cancel_grace)
                self._abandoned.update(stuck)
            if not ok and self._exit_code == 0:
                self._exit_code = 1
        if self._fatal is not None:
            self._exit_code = 1

    async def _ignored_cancel(self, task: asyncio.Task[None], what: str) -> bool:
        """Wait up to ``cancel_grace`` for the cancelled ``task`` (``what`` the transport
        was doing); True, and a warning, when it is still running then."""
        _, stuck = await asyncio.wait({task}, timeout=self.config.cancel_grace)
        if stuck:
            logger.warning(
                "%s %s ignored cancellation for %gs: stopping without it",
                what,
                self.transport.name,
                self.config.cancel_grace,
            )
        return bool(stuck)

    async def _end_fetching(self, fetcher: asyncio.Task[None]) -> asyncio.Task[None] | None:
        """Wait for the cancelled fetch loop; a fetch that ignores the cancellation for
        ``cancel_grace`` seconds is returned, the stop goes on without it."""
        if await self._ignored_cancel(fetcher, "a fetch from"):
            return fetcher
        if not fetcher.cancelled() and fetcher.exception() is not None:
            logger.error("the fetch loop failed", exc_info=fetcher.exception())
        return None

    async def _run_handed_over(self, deadline: float) -> None:
        """Start the batches the transport hands over at the stop (see
        :meth:`Transport.hand_over`), as slots free up, until ``deadline``; those not
        started by then go back to the broker at close.

        The batches a fetch returned that were still waiting for a slot go first: the
        broker delivered them to this process. Handed back, each of their messages would
        come again with one attempt used up where the broker counts deliveries, and a
        push server's senders would wait for an answer until their connections closed.
        """
        if self._fatal is not None:
            if self.transport.counts_deliveries:
                for batch in self._unstarted:  # not their fault: no attempt used up
                    self._hand_back(batch)
            self._unstarted = []
            return
        limit = self.config.concurrency
        batches, self._unstarted = self._unstarted, []
        self._waiting = batches  # leased while they wait, as in the fetch loop
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                try:
                    handed = [b for b in await self.transport.hand_over() if b.messages]
                except Exception as exc:
                    logger.warning("taking the delivered messages at the stop failed: %s", exc)
                    handed = []
                batches += handed
                if not batches:
                    return
                count = sum(len(b.messages) for b in batches)
                logger.info("processing %d message(s) the broker delivered before the stop", count)
                while batches:
                    if len(self._tasks) >= limit:
                        await self._free_slot(limit)
                    self._start(batches.pop(0))
        except TimeoutError:
            self._left_at_deadline(batches)
        finally:
            self._waiting = []

    def _left_at_deadline(self, batches: list[Batch]) -> None:
        """Say what becomes of the delivered batches the shutdown timeout left unstarted
        (and release them where the broker would count their return as a delivery)."""
        transport = self.transport
        count = sum(len(b.messages) for b in batches)
        if transport.at_most_once:
            if count:  # (what a hand-over cut short still held, the server counts)
                logger.error(
                    "the shutdown timeout ended before %d delivered message(s) were "
                    "processed: they are lost (%s delivers at most once)",
                    count,
                    transport.name,
                )
            return
        logger.warning(
            "the shutdown timeout ended before every delivered message was processed: %s",
            f"{count} not started go back to the broker"
            if count
            else "the rest goes back to the broker",
        )
        if transport.counts_deliveries:
            for batch in batches:
                self._hand_back(batch)

    def _hand_back(self, batch: Batch) -> None:
        """Settle a batch the application never had as released (no attempt used up).

        Left to the transport's close, its messages would come back as a delivery: the
        broker counts deliveries (elsewhere the close hands them back for free). Run as a
        batch task: the drain bounds it like the rest."""
        settlement = Settlement()
        release(settlement, batch.messages, "the server stopped before it was started")
        task = asyncio.create_task(self._settle(batch, settlement, time.monotonic()))
        self._tasks[task] = batch
        task.add_done_callback(self._batch_done)

    async def _drain(self, deadline: float) -> None:
        """Let in-flight batches finish until ``deadline`` (the shutdown timeout), then
        cancel them.

        Calls that ignore cancellation for ``cancel_grace`` seconds are abandoned: their
        batches are settled from what the app did so far, and they are left running.
        """
        if not self._tasks:
            return
        config = self.config
        logger.info("waiting for %d batch(es) in flight", len(self._tasks))
        left = max(0.0, deadline - time.monotonic())
        _, pending = await asyncio.wait(set(self._tasks), timeout=left)
        if not pending:
            return
        logger.warning(
            "%d batch(es) still running after %gs: cancelling them",
            len(pending),
            config.shutdown_timeout,
        )
        for task in pending:
            # A settle under way goes on: cut off, the app's acks would be lost (and the
            # messages delivered again) although its call ended in time.
            if task not in self._settling:
                task.cancel()
        _, stuck = await asyncio.wait(pending, timeout=config.cancel_grace)
        # Settles (one under way, or of a call just cancelled), and below those the stop
        # makes for calls that ignored the cancel: all bounded together.
        settles = {t for t in stuck if t not in self._deliveries}
        for task in stuck - settles:  # calls that ignored the cancel
            self._abandoned.add(task)
            delivery, batch, exhausted = self._deliveries[task]
            logger.error(
                "a call on %r ignored cancellation for %gs: settling its batch without it",
                batch.address,
                config.cancel_grace,
            )
            reason = f"the application ignored cancellation for {config.cancel_grace:g}s"
            settlement = delivery.abandon(reason)
            if exhausted is not None:
                settlement.dead.extend(exhausted.dead)
            settles.add(asyncio.create_task(self._settle(batch, settlement, time.monotonic())))
        if not settles:
            return
        _, late = await asyncio.wait(settles, timeout=_MIN_CLOSE)
        if late:
            logger.error(
                "%d settle(s) on %s did not end within %gs: stopping without them "
                "(their unacknowledged messages %s)",
                len(late),
                self.transport.name,
                _MIN_CLOSE,
                "are lost" if self.transport.at_most_once else "come back",
            )
        for task in late:
            task.cancel()
            self._abandoned.add(task)

    # -- fetching and dispatch ---------------------------------------------------------

    async def _fetch_loop(self) -> None:
        backoff = Backoff(_FETCH_BACKOFF_FIRST, _FETCH_BACKOFF_MAX)
        failing = False
        limit = self.config.concurrency
        stop = self._stop
        assert stop is not None
        tasks = self._tasks
        # A client library may swallow the cancellation that ends this loop (on 3.11,
        # asyncio.wait_for does when its inner future completes at the same moment):
        # the stop flag is checked too: nothing more is fetched, and what such a fetch
        # returned is kept for the stop (_run_handed_over), like batches waiting for a slot.
        while not stop.is_set():
            if len(tasks) >= limit:
                await self._free_slot(limit)
            try:
                batches = await self.transport.fetch()
            except ConfigurationError as exc:
                logger.error("%s", _named(self.transport.name, exc))
                self._fatal = exc
                return
            except Exception as exc:
                if not failing:
                    logger.error("fetch from %s failed: %s (retrying)", self.transport.name, exc)
                    self.metrics.broker_reachable(False)
                failing = True
                await backoff.sleep()
                continue
            if failing:
                logger.info("fetch from %s recovered", self.transport.name)
                self.metrics.broker_reachable(True)
                failing = False
                backoff.reset()
            waiting = self._waiting = [b for b in batches if b.messages]
            # One fetch may return more batches than there are free slots (a batch per
            # topic, per partition ...): start each only when a slot is free. Batches not
            # started when the stop comes are kept for it (_run_handed_over).
            try:
                while waiting:
                    if len(tasks) >= limit:
                        await self._free_slot(limit)
                    if stop.is_set():
                        break
                    self._start(waiting.pop(0))
            finally:
                self._unstarted += waiting
                self._waiting = []

    async def _free_slot(self, limit: int) -> None:
        """Wait until fewer than ``limit`` batches are in flight."""
        while len(self._tasks) >= limit:
            self._capacity.clear()
            await self._capacity.wait()

    def _start(self, batch: Batch) -> None:
        key = batch.key
        previous: asyncio.Future[None] | None = None
        turn: asyncio.Future[None] | None = None
        if key is not None:
            previous = self._tails.get(key)
            turn = asyncio.get_running_loop().create_future()
            self._tails[key] = turn
        task = asyncio.create_task(self._run_batch(batch, previous, turn))
        self._tasks[task] = batch
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._capacity.set()
        if not task.cancelled() and task.exception() is not None:
            logger.error("batch task failed", exc_info=task.exception())

    async def _run_batch(
        self,
        batch: Batch,
        previous: asyncio.Future[None] | None,
        turn: asyncio.Future[None] | None,
    ) -> None:
        try:
            if previous is not None:
                try:
                    # Shielded: cancelled here, this task must not cancel the turn of
                    # the batch before it (which sets it when it ends).
                    await asyncio.shield(previous)
                except asyncio.CancelledError:
                    # Stopped before its turn: the app never had these messages.
                    settlement = Settlement()
                    release(settlement, batch.messages, "the server stopped before its turn")
                    await self._settle(batch, settlement, time.monotonic())
                    raise
            await self._process(batch)
        finally:
            if turn is not None:
                if not turn.done():
                    turn.set_result(None)
                if self._tails.get(batch.key) is turn:
                    del self._tails[batch.key]

    async def _process(self, batch: Batch) -> None:
        started = time.monotonic()
        fetched = batch
        messages = batch.messages
        ledger = self._ledger
        exhausted: Settlement | None = None
        groups: list[tuple[list[Message], bool]] | None = None
        suspects: list[str] = []
        if (ledger is not None and ledger.suspects) or max(map(_attempt, messages)) > 1:
            exhausted, groups, suspects = self._triage(batch)
            if exhausted.dead:
                keep = [m for g, _ in groups for m in g]
                batch = Batch(batch.address, keep, batch.key, batch.context)
        cancelled = False
        settlement = Settlement()
        if batch.messages:
            delivery = Delivery(
                self._watched_app,
                batch,
                self._publish,
                self.config,
                state=self._lifespan.state if self._lifespan.supported else None,
                extensions=self.extensions,
                groups=groups,
                hooks=self._hooks,
            )
            task = asyncio.current_task()
            assert task is not None
            self._deliveries[task] = (delivery, fetched, exhausted)
            try:
                settlement = await delivery.run()
            except CallCancelled as exc:
                settlement = exc.settlement
                cancelled = True
            finally:
                del self._deliveries[task]
            if delivery.abandoned and not cancelled:
                return  # settled by _drain when it gave up on this call
        if exhausted is not None and exhausted.dead:
            settlement.dead.extend(exhausted.dead)
            batch = fetched
        await self._settle(batch, settlement, started)
        if suspects and ledger is not None:
            ledger.forget(batch.address, _cleared(suspects, settlement, cancelled))
        if cancelled:
            raise asyncio.CancelledError

    def _cannot_serve(self, exc: StartupFailed) -> None:
        """The application raised StartupFailed from a message call: stop with it."""
        if self._fatal is None:
            logger.info("the application cannot serve any message: stopping")
            self._fatal = exc
            self.request_stop()

    def _triage(
        self, batch: Batch
    ) -> tuple[Settlement, list[tuple[list[Message], bool]], list[str]]:
        """Sort a batch holding redelivered messages into dead, suspects and the rest.

        Redelivered messages (attempt > 1) are delivered one per call; messages the crash
        ledger saw in the hands of a process that died are delivered one per call with
        no other call in the app's hands. Returns the messages dead-lettered before
        delivery, the calls to make, and the ledger suspects among them.
        """
        config = self.config
        ledger = self._ledger
        exhausted = Settlement()
        groups: list[tuple[list[Message], bool]] = []
        suspects: list[str] = []
        plain: list[Message] = []
        address = batch.address
        for m in batch.messages:
            known = ledger.known(address, m.id) if ledger is not None else None
            if known is not None:
                suspects.append(m.id)
                crashes, alone = known
                if crashes >= config.max_attempts and alone:
                    reason = (
                        f"the process died {crashes} times while it held this message "
                        f"({alone} of them with this message alone in its hands)"
                    )
                    exhausted.dead.append(DeadLetter(m, reason))
                    continue
            elif ledger is None and m.attempt > config.max_attempts:
                # Delivered more often than allowed without being settled (e.g. the
                # consumer crashed on it each time): dead-letter before the app sees it.
                place(exhausted, m, f"delivered {m.attempt} times without being settled", config)
                continue
            elif m.attempt == 1:
                plain.append(m)
                continue
            if plain:
                groups.append((plain, False))
                plain = []
            groups.append(([m], known is not None))
        if plain:
            groups.append((plain, False))
        return exhausted, groups, suspects

    async def _settle(self, batch: Batch, settlement: Settlement, started: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._settling.add(task)
        try:
            await self.transport.settle(batch, settlement)
        except Exception as exc:
            logger.error(
                "settling %d message(s) from %r on %s failed: %s; "
                "unacknowledged messages will be redelivered",
                len(batch.messages),
                batch.address,
                self.transport.name,
                exc,
            )
            _unmoved(settlement, exc)
        finally:
            self._settling.discard(task)
        self._report(batch, settlement, time.monotonic() - started)

    def _report(self, batch: Batch, settlement: Settlement, duration: float) -> None:
        retried, dead_lettered, kept, lost = report_nacks(
            batch.address, settlement, self.config.max_attempts
        )
        if not self._reports_batches:
            return
        self.metrics.batch_settled(
            BatchStats(
                address=batch.address,
                received=len(batch.messages),
                acked=len(settlement.acked),
                retried=retried,
                dead_lettered=dead_lettered,
                duration=duration,
                kept=kept,
                lost=lost,
            )
        )

    async def _publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        transport = self.transport
        if self.routes is not None:
            transport = self.routes.target(address) or transport
        try:
            await transport.publish(address, headers, payload, bindings)
        except SendError:
            self.metrics.message_sent(address, False)
            raise
        except Exception as exc:
            self.metrics.message_sent(address, False)
            raise transport.send_error(
                f"{transport.name}: could not send to {address!r}: {exc}"
            ) from exc
        self.metrics.message_sent(address, True)

    async def _lease_loop(self) -> None:
        """Call the transport's ``extend`` every ``lease_interval``, also with no batch in
        flight: what a transport took and has not handed out yet (a NATS inbox, an SQS
        long poll, Redis retries waiting for their time) needs its lease while the fetch
        loop backs off after a failed fetch (up to 5 s), when nothing runs."""
        interval = self.transport.lease_interval
        assert interval
        loop = asyncio.get_running_loop()
        due = loop.time() + interval
        while self._leasing:  # (an extend that swallows the cancel ends the loop anyway)
            # Timed from the start of each extension, not its end: a slow one (a broker
            # slow to answer) must not stretch the rhythm until a lease lapses.
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = max(due + interval, loop.time())
            batches = [*self._tasks.values(), *self._waiting]
            try:
                await self.transport.extend(batches)
            except Exception as exc:
                logger.warning("extending the lease of %d batch(es) failed: %s", len(batches), exc)
