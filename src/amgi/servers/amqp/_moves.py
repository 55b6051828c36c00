"""Copies of nacked messages (private): retry copies to ``<queue>.retry.<ms>`` and dead
letters to the dead-letter exchange, published on the ``moves`` channel with publisher
confirms (kit ``move_aside`` decides what a failed copy becomes).

A copy of a delivery whose channel closed is refused (the broker delivers the original
again). A retry copy the broker refuses (its retry queue exists with another TTL, access
refused, too large) fails for good: the message goes to the dead letters. One it cannot
take for now (no confirm in time, a ``basic.nack``, a channel closed over another copy)
raises :class:`_NotYet`: the message stays unacked and its retry is tried again. A dead
letter the broker does not take stays unacked and is tried again too; one unroutable or
refused for want of its exchange is tried once more at once, its exchange, queue and
binding declared again (deleted while the server runs). Either way a copy sent but not
confirmed in time is not sent again: the next try waits for its confirm.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from amgi.servers.amqp._client import (
    AmqpClient,
    AmqpSendError,
    _Channel,
    _header_room,
    _Nacked,
    _refused_another,
    _reply_text,
)
from amgi.servers.kit import (
    MOST_REASON,
    DelayedRepublisher,
    bounded_reason,
    dead_letter_headers,
    encode_text,
    move_aside,
    retry_headers,
)
from amgi.transport import HeaderList, Message, Retry, Settlement

if TYPE_CHECKING:
    from aiormq.abc import AbstractChannel

logger = logging.getLogger("amgi.servers.amqp")


def _retrieved(task: asyncio.Task[None]) -> None:
    """Mark the outcome of a copy's confirm seen (no try may be left to wait for it)."""
    if not task.cancelled():
        task.exception()


class _NotYet(AmqpSendError):
    """A retry copy the broker could not take for now: not the message's fault."""


def _for_now(exc: Exception, size: int) -> bool:
    """Whether a retry copy of ``size`` body bytes failed with ``exc`` for a reason that
    may pass: no confirm (or declaration) in time, a ``basic.nack``, a channel closed
    over another copy, a lost connection. Not: a refusal of this copy (its retry queue
    exists with another TTL, access refused, too large)."""
    from aiormq import exceptions as amqp_errors

    if isinstance(exc, AmqpSendError):
        return isinstance(exc, _Nacked)
    if isinstance(exc, amqp_errors.PublishError):  # unroutable even once declared again
        return False
    if isinstance(exc, amqp_errors.ChannelClosed):
        text = _reply_text(exc)
        ours = "exchange ''" in text or "exchange 'amq.default'" in text
        return not ours and _refused_another(exc, "amq.default", size)
    return isinstance(
        exc,
        (
            TimeoutError,
            amqp_errors.DeliveryError,  # basic.nack
            amqp_errors.ChannelInvalidStateError,
            amqp_errors.AMQPConnectionError,
            ConnectionError,
        ),
    )


COMES_BACK = "its channel closed: the broker delivers it again"
"""Why a nacked message was not moved aside when its channel went (the settlement's
error, which the runtime reports)."""


def _coming_back(settlement: Settlement, moved: set[Message]) -> list[Message]:
    """Mark the messages of ``settlement`` not in ``moved`` as coming back from the
    broker (their channel went); return them."""
    back: list[Message] = []
    for r in settlement.retry:
        if r.message not in moved:
            r.not_scheduled(COMES_BACK)
            back.append(r.message)
    for d in settlement.dead:
        if d.message not in moved:
            d.not_stored(COMES_BACK)
            back.append(d.message)
    return back


class Moves(AmqpClient):
    """The transport's retry copies and dead letters on AMQP."""

    def _init_moves(self) -> None:
        """Set up the state (called by the transport's ``__init__`` and ``connect``)."""
        self._moves = DelayedRepublisher("amqp")
        """Copies the broker refused, tried again in the background (kit ``move_aside``)."""
        self._unconfirmed: dict[Message, tuple[tuple[str, str], asyncio.Task[None]]] = {}
        """Copies (retry copies, dead letters) published but not confirmed in time, with
        their exchange and routing key: the next try of one waits for its confirm again
        instead of publishing a second copy."""
        self._unanswered: set[Message] = set()
        """Messages whose retry's last try got no answer from the broker (no confirm or
        declaration in time): no dead letter is made of them meanwhile."""

    async def _close_moves(self) -> None:
        """Stop the copies in the background; their messages stay unacked."""
        await self._moves.close(timeout=1.0)
        for _target, task in self._unconfirmed.values():
            task.cancel()
        self._unconfirmed.clear()
        self._unanswered.clear()

    def _drop_unconfirmed(self, messages: list[Message]) -> None:
        """Stop waiting for the copies of ``messages``, whose channel closed: no try of
        theirs comes again (the broker delivers the originals again)."""
        for message in messages:
            pending = self._unconfirmed.pop(message, None)
            if pending is not None:
                pending[1].cancel()

    def _gone(self, consumer: _Channel) -> bool:
        """The channel closed: the broker redelivers its unacked messages."""
        return self._closed or self._consumers.get(consumer.queue) is not consumer

    def _check_held(self, consumer: _Channel) -> None:
        """Refuse a copy of a delivery whose channel closed: the broker delivers the
        original again (a copy too would be a duplicate, and a retry failing over the
        lost connection would fall through to the dead letters)."""
        if self._gone(consumer):
            raise AmqpSendError(
                f"amqp: the channel that delivered it from {consumer.queue!r} closed; "
                "the broker delivers it again"
            )

    def _lost(self, consumer: _Channel) -> bool:
        """The channel closed, or is closing (a lost connection the supervisor has not
        seen yet): either way the broker redelivers its unacked messages."""
        return self._gone(consumer) or consumer.channel.is_closed

    async def _move(
        self,
        consumer: _Channel,
        settlement: Settlement,
        give_up: Callable[[], bool],
        since: float,
    ) -> list[Message]:
        """Move the copies of ``settlement`` (first tried at ``since``, monotonic): a
        retry refused for now longer than ``retry_refused_for`` is dead-lettered.

        A try that fails because the channel went is no refusal: the broker delivers
        every message of the batch again. Raised into the kit, it would be logged as a
        message kept unacked to be tried again (or dead-lettered); instead the whole move
        is cancelled and the messages not moved say that they come back."""
        moved: set[Message] = set()
        lost = asyncio.Event()

        async def held(message: Message, copy: Awaitable[None]) -> None:
            try:
                await copy
            except Exception:
                if not self._lost(consumer):
                    raise
                lost.set()
                await asyncio.get_running_loop().create_future()  # until cancelled below
            moved.add(message)

        moving = asyncio.ensure_future(
            move_aside(
                settlement,
                retry=lambda r: held(r.message, self._publish_retry(consumer, r)),
                dead=lambda d: held(d.message, self._publish_dead(consumer, d.message, d.reason)),
                address=consumer.queue,
                give_up=give_up,
                transient=lambda exc: isinstance(exc, _NotYet),
                transient_for=self.config.retry_refused_for,
                since=since,
            )
        )
        watch = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait((moving, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not moving.done():
                moving.cancel()
                await asyncio.wait((moving,))
            self._unanswered.difference_update(r.message for r in settlement.retry)
        if not moving.cancelled():
            return moving.result()
        return _coming_back(settlement, moved)

    async def _publish_retry(self, consumer: _Channel, retry: Retry) -> None:
        from aiormq import exceptions as amqp_errors

        queue = consumer.queue
        message = retry.message
        delay_ms = max(1, round(retry.delay * 1000))
        retry_queue = f"{queue}.retry.{delay_ms}"
        attempt = message.attempt + (not retry.uncounted)
        headers = retry_headers(message.headers, attempt=attempt)
        self._unanswered.discard(message)
        try:
            for again in (False, True):
                if retry_queue not in self._retry_queues:
                    await self._declare_retry_queue(retry_queue, queue, delay_ms)
                channel = await self._channel("moves")
                self._check_held(consumer)
                try:
                    await self._confirm_once(channel, message, "", retry_queue, headers)
                    return
                except amqp_errors.PublishError:  # unroutable: the queue was deleted since
                    if again:
                        raise
                    self._retry_queues.discard(retry_queue)
        except Exception as exc:
            if not _for_now(exc, len(message.token.body)):
                raise  # refused: the message goes to the dead letters
            if isinstance(exc, TimeoutError):
                self._unanswered.add(message)
                raise _NotYet(
                    f"amqp: no answer from the broker about the copy for {retry_queue!r} "
                    f"within {self.config.confirm_timeout}s (is it blocking publishers: a "
                    "memory or disk alarm?)"
                ) from None
            if isinstance(exc, (_Nacked, amqp_errors.DeliveryError)):
                raise _NotYet(
                    f"amqp: the broker nacked the copy for {retry_queue!r} (basic.nack: is "
                    "the queue full, a max-length policy with overflow reject-publish?)"
                ) from None
            raise _NotYet(
                f"amqp: the broker did not take the copy for {retry_queue!r}: "
                f"{str(exc) or type(exc).__name__}"
            ) from None

    async def _confirm_once(
        self,
        channel: AbstractChannel,
        message: Message,
        exchange: str,
        routing_key: str,
        headers: HeaderList,
    ) -> None:
        """Publish a copy of ``message`` (a retry copy, a dead letter) and wait up to
        ``confirm_timeout`` for its confirm. A copy not confirmed in time may still reach
        its queue (a broker blocking publishers reads it once the alarm clears): the
        next try of the same copy waits for that confirm again rather than publishing
        another."""
        target = (exchange, routing_key)
        pending = self._unconfirmed.get(message)
        if pending is not None and pending[0] == target:
            task = pending[1]
        else:
            copy = self._confirm(
                channel, message.token, exchange, routing_key, headers, forever=True
            )
            task = asyncio.ensure_future(copy)
            task.add_done_callback(_retrieved)
            self._unconfirmed[message] = (target, task)
        try:
            async with asyncio.timeout(self.config.confirm_timeout):
                await asyncio.shield(task)
        finally:
            if task.done() and self._unconfirmed.get(message, (None, None))[1] is task:
                del self._unconfirmed[message]

    async def _publish_dead(self, consumer: _Channel, message: Message, reason: str) -> None:
        from aiormq import exceptions as amqp_errors

        queue = consumer.queue
        reason = bounded_reason(reason)  # as the header holds it: the cut below works on it
        headers = dead_letter_headers(
            message.headers, attempt=message.attempt, address=queue, reason=reason
        )
        if message in self._unanswered:
            # Its retry got no answer (a broker blocking publishers): this is no refusal,
            # and a dead letter now would wait for the broker too, then land beside the
            # retry copy already sent.
            raise AmqpSendError(
                "amqp: the broker has not answered its retry (no confirm or declaration "
                f"within {self.config.confirm_timeout}s): not dead-lettered meanwhile"
            )
        exchange = self.config.dead_letter_exchange
        for again in (False, True):
            channel = await self._channel("moves")
            self._check_held(consumer)
            room = _header_room(channel, self._copy_properties(message.token, headers))
            if room < 0:  # the message's own headers fill the frame: the reason gets the rest
                text = encode_text(reason)
                kept = text[: max(0, len(text) + room - 40)].decode("utf-8", "ignore")
                kept = kept[: MOST_REASON - 40]  # (so that the header's own cut keeps it)
                reason = f"{kept} ... ({len(reason) - len(kept)} more characters cut)"
                headers = dead_letter_headers(
                    message.headers, attempt=message.attempt, address=queue, reason=reason
                )
            try:
                await self._confirm_once(channel, message, exchange, queue, headers)
                return
            except (amqp_errors.PublishError, amqp_errors.ChannelNotFoundEntity) as exc:
                # Unroutable (``<queue>.dead-letter`` deleted) or no exchange: declared
                # again, as at the start, then tried once more.
                if again:
                    raise
                logger.warning(
                    "amqp: the dead letter of a message of %r was refused (%s): declaring "
                    "the dead-letter exchange %r and queue %r again",
                    queue,
                    _reply_text(exc) if isinstance(exc, amqp_errors.ChannelClosed) else "NO_ROUTE",
                    exchange,
                    queue + ".dead-letter",
                )
                await self._declare_dead_letters(queue)
