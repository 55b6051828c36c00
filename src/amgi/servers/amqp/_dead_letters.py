"""Dead letters of the AMQP server: the queue ``<queue>.dead-letter`` (private).

``list`` takes them with ``basic.get`` and closes its channel without acking, so the
broker puts them back in their order; a replay republishes each (confirmed) to the
queue through the default exchange, then acks it off the dead-letter queue.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.servers.amqp._client import (
    AmqpClient,
    AmqpSendError,
    _check_queue_name,
    _reply_text,
    close_within,
)
from amgi.servers.amqp._codec import table_to_headers
from amgi.servers.kit import mask_url, split_dead_letter_headers
from amgi.transport import StoredDeadLetter

if TYPE_CHECKING:
    from aiormq.abc import AbstractChannel, DeliveredMessage
    from pamqp.commands import Basic

_REPLAY_CHUNK = 100


class DeadLetters(AmqpClient):
    """The transport's ``list_dead_letters`` and ``replay_dead_letters`` on AMQP."""

    async def _dead_letter_channel(self, queue: str) -> tuple[AbstractChannel, int]:
        """A channel on which ``queue`` and its dead-letter queue were found to exist, and
        the number of messages ready in the dead-letter queue."""
        from aiormq import exceptions as amqp_errors

        _check_queue_name(queue)
        connection = self._connection
        if connection is None:
            raise AmqpSendError("amqp: not connected to the broker")
        timeout = self.config.connect_timeout
        for name in (queue, queue + ".dead-letter"):
            try:
                channel = await connection.channel(timeout=timeout)
                declared = await channel.queue_declare(name, passive=True, timeout=timeout)
            except amqp_errors.ChannelNotFoundEntity:
                raise ConfigurationError(f"amqp: queue {name!r} does not exist") from None
            except TimeoutError:
                raise self._no_answer(f"about the queue {name!r}") from None
            if name != queue:
                return channel, declared.message_count or 0
            await close_within(channel, timeout)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get_dead(self, channel: AbstractChannel, queue: str, limit: int) -> list[Any]:
        """Up to ``limit`` dead letters of ``queue``, each ``basic.get`` answered within
        ``connect_timeout``."""
        from pamqp.commands import Basic

        got: list[Any] = []
        while len(got) < limit:
            try:
                delivered = await channel.basic_get(
                    queue + ".dead-letter", no_ack=False, timeout=self.config.connect_timeout
                )
            except TimeoutError:
                raise self._no_answer(f"to a basic.get of {queue + '.dead-letter'!r}") from None
            if not isinstance(delivered.delivery, Basic.GetOk):
                break
            got.append(delivered)
        return got

    def _cut_off(self, verb: str, address: str, exc: BaseException) -> BrokerUnavailable:
        """The error of a list or replay the broker's channel or connection ended midway
        (the client's own errors would reach the command as a bare traceback)."""
        from aiormq import exceptions as amqp_errors

        if isinstance(exc, amqp_errors.ChannelClosed):
            why = f"the broker closed the channel: {_reply_text(exc)}"
        else:
            why = (
                f"lost the connection to {mask_url(self.config.url)} ({exc or type(exc).__name__})"
            )
        return BrokerUnavailable(
            f"amqp: the {verb} of the dead letters of {address!r} was cut off: {why}; the "
            "dead letters not acked stay"
            + (" (a copy of some may be in the queue already)" if verb == "replay" else "")
        )

    async def list_dead_letters(self, address: str, limit: int) -> list[StoredDeadLetter]:
        """Taken with basic.get and put back (the channel closes without acking)."""
        try:
            channel, _ = await self._dead_letter_channel(address)
            try:
                got = await self._get_dead(channel, address, limit)
            finally:
                await close_within(channel, self.config.connect_timeout)
        except _cut_off_errors() as exc:
            raise self._cut_off("listing", address, exc) from None
        return [_stored_dead_letter(d) for d in got]

    async def replay_dead_letters(self, address: str, limit: int) -> int:
        """Republish each to the queue (confirmed), then ack it off the dead-letter queue;
        only as many as were there when the replay started (the queue is FIFO: a replayed
        message that a consumer dead-letters again meanwhile waits for the next replay)."""
        try:
            return await self._replay(address, limit)
        except _cut_off_errors() as exc:
            raise self._cut_off("replay", address, exc) from None

    async def _replay(self, address: str, limit: int) -> int:
        channel, ready = await self._dead_letter_channel(address)
        limit = min(limit, ready)
        moved = 0
        try:
            while moved < limit:
                chunk = await self._get_dead(channel, address, min(_REPLAY_CHUNK, limit - moved))
                if not chunk:
                    break
                await self._republish(address, chunk)
                await channel.basic_ack(chunk[-1].delivery.delivery_tag, multiple=True)
                moved += len(chunk)
        finally:
            # A broker blocking publishers reads nothing of the connection, not even
            # this close (the dead letters not acked go back all the same).
            await close_within(channel, self.config.confirm_timeout)
        return moved

    async def _republish(self, address: str, chunk: list[Any]) -> None:
        """Publish the dead letters of ``chunk`` to ``address``, each confirmed, or raise
        one clear :class:`AmqpSendError`."""
        from aiormq import exceptions as amqp_errors

        publisher = await self._channel()
        try:
            await asyncio.gather(
                *(
                    self._confirm(
                        publisher, d, "", address, _stored_dead_letter(d).headers, consumed=False
                    )
                    for d in chunk
                )
            )
        except TimeoutError:
            raise AmqpSendError(
                f"amqp: no publish confirm from the broker within {self.config.confirm_timeout}s "
                f"for a dead letter replayed to {address!r} (is it blocking publishers: a "
                "memory or disk alarm?); the dead letters not acked stay (a copy of some may be in "
                "the queue already)"
            ) from None
        except amqp_errors.PublishError:
            raise AmqpSendError(
                f"amqp: a dead letter replayed to {address!r} is unroutable (the queue was "
                "deleted?); the dead letters not acked stay"
            ) from None


def _cut_off_errors() -> tuple[type[Exception], ...]:
    """The client's errors of a channel or connection that ended under a command."""
    from aiormq import exceptions as amqp_errors

    return (amqp_errors.AMQPError, amqp_errors.ChannelInvalidStateError, ConnectionError)


def _stored_dead_letter(delivered: DeliveredMessage) -> StoredDeadLetter:
    attempt, raw = table_to_headers(delivered.header.properties.headers)
    headers, reason, original = split_dead_letter_headers(raw)
    delivery = cast("Basic.GetOk", delivered.delivery)
    return StoredDeadLetter(
        str(delivery.delivery_tag), original, headers, delivered.body, {}, attempt, reason
    )
