"""Move nacked messages aside (retry copies, dead letters), and what a failed copy becomes.

Servers that retry or dead-letter by publishing a copy (Kafka's retry topic, AMQP's
retry queues, MQTT's republish) acknowledge the original only once its copy is on the
broker. When a copy cannot be published, sending the original back unchanged would be
a hot loop: the attempt number travels only in the copy, so the message would come
back at the same attempt, forever. One rule for every such server:

* A retry whose copy the broker refuses goes to the dead letters instead, at its
  current attempt, with a reason that says the retry could not be published. But a
  copy the broker could not take for the moment (``transient(exc)``: no confirm in
  time, a broker nack, a channel closed over another copy) is no fault of the
  message: it stays unacknowledged and its retry is tried again, like a refused dead
  letter below. For a while: one still refused ``transient_for`` seconds after its
  first try (a retry queue that never takes a copy would hold the message, and a
  place of the prefetch, for good) goes to the dead letters too, with a reason that
  says for how long its retry was refused. Off (``None``) by default.
* A dead letter the broker refuses stays unacknowledged and is tried again (the retry
  copy first when it was a retry) after a doubling delay, with an ERROR line per try,
  until it is published or the server gives up on it (connection, partition or server
  gone: the broker then redelivers the original). Its batch-mates are never copied
  again.

Each try records its outcome on the settlement for the runtime's report
(:meth:`~amgi.transport.Retry.not_scheduled`, :meth:`~amgi.transport.DeadLetter.not_stored`),
and a copy stored at a later try says so with a WARNING line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from amgi.servers.kit.backoff import Backoff
from amgi.transport import DeadLetter, Fate, Message, Retry, Settlement

__all__ = ["move_aside", "unmoved"]

logger = logging.getLogger("amgi.servers.kit")

FIRST_DELAY = 0.5
"""Seconds before a dead letter the broker refused is tried again (then doubling)."""
MAX_DELAY = 30.0


async def move_aside(
    settlement: Settlement,
    *,
    retry: Callable[[Retry], Awaitable[None]],
    dead: Callable[[DeadLetter], Awaitable[None]],
    address: str,
    give_up: Callable[[], bool] = lambda: False,
    backoff: Backoff | None = None,
    transient: Callable[[Exception], bool] = lambda exc: False,
    transient_for: float | None = None,
    since: float | None = None,
) -> list[Message]:
    """Publish the copies of ``settlement.retry`` and ``settlement.dead``.

    ``retry(r)`` and ``dead(d)`` publish one copy and raise an ``Exception`` (the
    server's send error) when the broker did not take it. Returns once every message is
    moved; returns the messages not moved only when ``give_up()`` turned true between
    tries (acknowledge none of them). Cancellation leaves them unmoved too. A retry
    whose ``retry(r)`` raised an exception ``transient`` accepts is not dead-lettered:
    it stays pending, its retry tried again after the backoff, until ``transient_for``
    seconds (if not ``None``) have passed since ``since`` (``time.monotonic()`` of the
    first try, for a server that tries once in ``settle`` and again in the background;
    default: now): then it is dead-lettered as if refused for good.
    """
    pending: list[tuple[Retry | None, DeadLetter]] = [
        (r, r.dead or DeadLetter(r.message, r.reason)) for r in settlement.retry
    ]
    pending += [(None, d) for d in settlement.dead]
    if not pending:
        return []
    backoff = backoff or Backoff(FIRST_DELAY, MAX_DELAY)
    patience = _Patience(transient, transient_for, time.monotonic() if since is None else since)
    while True:
        results = await asyncio.gather(
            *(_move(r, d, retry, dead, address, patience) for r, d in pending)
        )
        pending = [p for p, moved in zip(pending, results, strict=True) if not moved]
        if not pending:
            return []
        if give_up():
            return [d.message for _, d in pending]
        delay = backoff.failed()
        logger.error(
            "%d nacked message(s) of %r could not be moved to a retry or the dead letters; "
            "they stay unacknowledged and are tried again in %.1fs",
            len(pending),
            address,
            delay,
        )
        await asyncio.sleep(delay)
        if give_up():
            return [d.message for _, d in pending]


def _span(seconds: float) -> str:
    """``seconds`` as an operator reads it: ``1.5s``, ``5 min``."""
    return f"{seconds:.1f}s" if seconds < 90 else f"{seconds / 60:.0f} min"


class _Patience:
    """How long a retry refused for now stays unacknowledged (``move_aside``)."""

    __slots__ = ("bound", "since", "transient")

    def __init__(
        self, transient: Callable[[Exception], bool], bound: float | None, since: float
    ) -> None:
        self.transient = transient
        self.bound = bound
        self.since = since

    def waited(self) -> float:
        return time.monotonic() - self.since

    def lasts(self, exc: Exception) -> bool:
        """Whether ``exc`` is a refusal for now whose bound has not passed yet."""
        return self.transient(exc) and (self.bound is None or self.waited() < self.bound)

    def until(self) -> str:
        return (
            ""
            if self.bound is None
            else f" (dead-lettered if still refused after {_span(self.bound)})"
        )


async def _move(
    r: Retry | None,
    d: DeadLetter,
    retry: Callable[[Retry], Awaitable[None]],
    dead: Callable[[DeadLetter], Awaitable[None]],
    address: str,
    patience: _Patience,
) -> bool:
    if r is not None:
        try:
            await retry(r)
        except Exception as exc:
            if patience.lasts(exc):
                logger.error(
                    "message %s of %r: its retry could not be published for now (%s); "
                    "it stays unacknowledged%s",
                    r.message.id,
                    address,
                    exc,
                    patience.until(),
                )
                r.not_scheduled(exc)
                return False
            r.not_scheduled(exc, d)
            if patience.transient(exc):  # refused for now, but for longer than the bound
                why = f"its retry was refused for {_span(patience.waited())}"
            else:
                why = "its retry could not be published"
            d.reason = f"{r.reason} ({why}: {exc})"
            logger.error(
                "message %s of %r: %s (%s); dead-lettering it", r.message.id, address, why, exc
            )
        else:
            if r.error:
                logger.warning("message %s of %r: its retry is published", r.message.id, address)
                r.error, r.dead = "", None
            return True
    try:
        await dead(d)
    except Exception as exc:
        logger.error("message %s of %r could not be dead-lettered: %s", d.message.id, address, exc)
        d.not_stored(exc)
        return False
    if d.fate is Fate.KEPT:
        logger.warning("message %s of %r: its dead letter is stored", d.message.id, address)
    d.fate = Fate.STORED
    return True


def unmoved(settlement: Settlement, stranded: list[Message]) -> Settlement:
    """The part of ``settlement`` whose messages are in ``stranded`` (to try again later).

    A server tries the copies once in ``settle`` (``give_up=lambda: True``) and hands
    what the broker refused to a background task that calls :func:`move_aside` again,
    so that a refused copy does not hold up the batches after it.
    """
    return Settlement(
        retry=[r for r in settlement.retry if r.message in stranded],
        dead=[d for d in settlement.dead if d.message in stranded],
    )
