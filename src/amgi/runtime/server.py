"""The long-lived runtime: lifespan, fetch loop, ordering, concurrency, settlement, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Hashable
from operator import attrgetter

from amgi.errors import ConfigurationError, SendError
from amgi.runtime.batch import CallCancelled, call_app, place
from amgi.runtime.config import RuntimeConfig
from amgi.runtime.lifespan import Lifespan
from amgi.runtime.metrics import BatchStats, MetricsHook
from amgi.transport import Batch, Bindings, HeaderList, Settlement, Transport
from amgi.types import AMGIApplication

__all__ = ["Runtime"]

logger = logging.getLogger("amgi.runtime")

_FETCH_BACKOFF_FIRST = 0.1
_FETCH_BACKOFF_MAX = 5.0
_SIGNAL_DEBOUNCE = 0.2
_attempt = attrgetter("attempt")


def _failure_fields(address: str, mid: str, attempt: int, reason: str) -> dict[str, object]:
    """Structured fields of a message-failure log record (shown by ``--log-format json``)."""
    return {"amgi": {"address": address, "id": mid, "attempt": attempt, "reason": reason}}


class Runtime:
    """Runs one AMGI application on one transport until asked to stop.

    ``await runtime.serve()`` runs lifespan startup, connects the transport, then loops:
    fetch batches while fewer than ``config.concurrency`` are in flight, call the app once
    per batch (batches with the same ordering key one after another), settle each batch
    in one transport call. :meth:`request_stop` (or SIGINT/SIGTERM when
    ``handle_signals`` is true) stops fetching, lets in-flight batches finish within
    ``config.shutdown_timeout``, settles them, runs lifespan shutdown and closes the
    transport. ``serve`` returns the process exit code (0 after a clean shutdown) and
    raises :class:`amgi.errors.AMGIError` (or ``OSError``) when it cannot start.
    """

    def __init__(
        self,
        app: AMGIApplication,
        transport: Transport,
        config: RuntimeConfig | None = None,
        *,
        metrics: MetricsHook | None = None,
        handle_signals: bool = False,
    ) -> None:
        self.app = app
        self.transport = transport
        self.config = config or RuntimeConfig()
        self.metrics = metrics or MetricsHook()
        self.handle_signals = handle_signals
        self.started = asyncio.Event()
        """Set once lifespan startup is done and the transport is connected."""
        self._stop: asyncio.Event | None = None
        self._signals = 0
        self._first_signal = 0.0
        self._lifespan = Lifespan(app, self.config.lifespan)
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: dict[asyncio.Task[None], Batch] = {}
        self._tails: dict[Hashable, asyncio.Future[None]] = {}
        self._capacity = asyncio.Event()
        self._fatal: BaseException | None = None
        self._exit_code = 0

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

    async def serve(self) -> int:
        """Run until stopped; return the exit code. See the class docstring."""
        if self._stop is None:
            self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if self.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        try:
            await self._lifespan.startup()
            try:
                await self.transport.connect()
            except BaseException:
                await self._lifespan.shutdown(self.config.shutdown_timeout)
                with contextlib.suppress(Exception):
                    await self.transport.close()
                raise
            self.started.set()
            logger.info(
                "serving %s on %s",
                ", ".join(self.transport.addresses) or "(no address)",
                self.transport.name,
            )
            await self._run()
            return self._exit_code
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if self._signals and now - self._first_signal < _SIGNAL_DEBOUNCE:
            return  # the same signal delivered to the process and to its group
        self._signals += 1
        if self._signals == 1:
            self._first_signal = now
            logger.info("%s received: shutting down gracefully (again to exit now)", sig.name)
            self.request_stop()
        else:
            logger.warning("%s received again: exiting now, settling nothing more", sig.name)
            os._exit(1)

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
            await asyncio.gather(fetcher, stop_wait, return_exceptions=True)
            await self._drain()
            if leaser is not None:
                leaser.cancel()
                await asyncio.gather(leaser, return_exceptions=True)
            ok = await self._lifespan.shutdown(self.config.shutdown_timeout)
            try:
                await self.transport.close()
            except Exception:
                logger.exception("error while closing the %s transport", self.transport.name)
            if not ok and self._exit_code == 0:
                self._exit_code = 1
        if self._fatal is not None:
            self._exit_code = 1

    async def _drain(self) -> None:
        """Let in-flight batches finish within the shutdown timeout, then cancel them."""
        if not self._tasks:
            return
        logger.info("waiting for %d batch(es) in flight", len(self._tasks))
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.config.shutdown_timeout)
        if pending:
            logger.warning(
                "%d batch(es) still running after %.1fs: cancelling them",
                len(pending),
                self.config.shutdown_timeout,
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # -- fetching and dispatch ---------------------------------------------------------

    async def _fetch_loop(self) -> None:
        backoff = _FETCH_BACKOFF_FIRST
        failing = False
        limit = self.config.concurrency
        while True:
            await self._free_slot(limit)
            try:
                batches = await self.transport.fetch()
            except ConfigurationError as exc:
                logger.error("%s: %s", self.transport.name, exc)
                self._fatal = exc
                return
            except Exception as exc:
                if not failing:
                    logger.error("fetch from %s failed: %s (retrying)", self.transport.name, exc)
                    self.metrics.broker_reachable(False)
                failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _FETCH_BACKOFF_MAX)
                continue
            if failing:
                logger.info("fetch from %s recovered", self.transport.name)
                self.metrics.broker_reachable(True)
                failing = False
                backoff = _FETCH_BACKOFF_FIRST
            for batch in batches:
                if not batch.messages:
                    continue
                # One fetch may return more batches than there are free slots (a batch
                # per topic, per partition ...): start each only when a slot is free.
                # Batches not started when a stop cancels this wait stay unacknowledged
                # on the broker and come back by redelivery.
                await self._free_slot(limit)
                self._start(batch)

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
        self._tasks.add(task)
        self._active[task] = batch
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._active.pop(task, None)
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
                await previous
            await self._process(batch)
        finally:
            if turn is not None:
                turn.set_result(None)
                if self._tails.get(batch.key) is turn:
                    del self._tails[batch.key]

    async def _process(self, batch: Batch) -> None:
        config = self.config
        started = time.monotonic()
        messages = batch.messages
        exhausted: Settlement | None = None
        if max(map(_attempt, messages)) > config.max_attempts:
            # Delivered more often than allowed without being settled (e.g. the consumer
            # crashed on it each time): dead-letter before the app sees it again.
            exhausted = Settlement()
            keep = []
            for m in messages:
                if m.attempt > config.max_attempts:
                    place(
                        exhausted, m, f"delivered {m.attempt} times without being settled", config
                    )
                else:
                    keep.append(m)
            batch = Batch(batch.address, keep, batch.key, batch.context)
        cancelled = False
        if batch.messages:
            try:
                settlement = await call_app(
                    self.app,
                    batch,
                    self._publish,
                    config,
                    state=self._lifespan.state if self._lifespan.supported else None,
                    extensions=self.transport.extensions,
                )
            except CallCancelled as exc:
                settlement = exc.settlement
                cancelled = True
        else:
            settlement = Settlement()
        if exhausted is not None:
            settlement.dead.extend(exhausted.dead)
            batch = Batch(batch.address, messages, batch.key, batch.context)
        try:
            await self.transport.settle(batch, settlement)
        except Exception as exc:
            logger.error(
                "settling %d message(s) from %r on %s failed: %s; "
                "unacknowledged messages will be redelivered",
                len(messages),
                batch.address,
                self.transport.name,
                exc,
            )
        self._report(batch, settlement, time.monotonic() - started)
        if cancelled:
            raise asyncio.CancelledError

    def _report(self, batch: Batch, settlement: Settlement, duration: float) -> None:
        for r in settlement.retry:
            logger.warning(
                "message %s from %r nacked (attempt %d of %d): %s; retrying in %.3gs",
                r.message.id,
                batch.address,
                r.message.attempt,
                self.config.max_attempts,
                r.reason,
                r.delay,
                extra=_failure_fields(batch.address, r.message.id, r.message.attempt, r.reason),
            )
        for d in settlement.dead:
            logger.error(
                "message %s from %r dead-lettered after attempt %d: %s",
                d.message.id,
                batch.address,
                d.message.attempt,
                d.reason,
                extra=_failure_fields(batch.address, d.message.id, d.message.attempt, d.reason),
            )
        self.metrics.batch_settled(
            BatchStats(
                address=batch.address,
                received=len(batch.messages),
                acked=len(settlement.acked),
                retried=len(settlement.retry),
                dead_lettered=len(settlement.dead),
                duration=duration,
            )
        )

    async def _publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        transport = self.transport
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
        interval = self.transport.lease_interval
        assert interval
        while True:
            await asyncio.sleep(interval)
            batches = list(self._active.values())
            if not batches:
                continue
            try:
                await self.transport.extend(batches)
            except Exception as exc:
                logger.warning("extending the lease of %d batch(es) failed: %s", len(batches), exc)
