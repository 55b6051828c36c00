"""One application call over one batch: ``receive()``, ``send()`` and the outcome.

This is the hot path of every server: ``receive()`` and an ack through ``send()`` do no
I/O and allocate one event dict per message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from amgi.errors import InvalidEvent
from amgi.runtime.config import RuntimeConfig
from amgi.transport import Batch, DeadLetter, HeaderList, Message, Retry, Settlement
from amgi.types import (
    AMGIApplication,
    AMGIReceiveEvent,
    AMGISendEvent,
    AMGIVersions,
    MessageScope,
)

__all__ = [
    "AMGI_VERSIONS",
    "BatchCall",
    "CallCancelled",
    "Publisher",
    "call_app",
    "message_scope",
    "place",
    "validate_send",
]

logger = logging.getLogger("amgi.runtime")

AMGI_VERSIONS: Final[AMGIVersions] = {"version": "1.0", "spec_version": "1.0"}

Publisher = Callable[[str, HeaderList, "bytes | None", dict[str, dict[str, Any]]], Awaitable[None]]
"""``publish(address, headers, payload, bindings)``; raises an ``OSError`` subclass on failure."""

_ACK: Final = True
_NOT_RECEIVED = "not received by the application before its call ended"
_UNSETTLED = "not acked or nacked by the application"


def message_scope(
    batch: Batch,
    state: dict[str, Any] | None,
    extensions: dict[str, dict[str, Any]] | None,
) -> MessageScope:
    """The scope of the call for ``batch``; ``state`` is copied so calls cannot share it."""
    scope: MessageScope = {
        "type": "message",
        "amgi": AMGI_VERSIONS.copy(),
        "address": batch.address,
    }
    if state is not None:
        scope["state"] = dict(state)
    if extensions:
        scope["extensions"] = extensions
    return scope


class BatchCall:
    """The ``receive``/``send`` pair of one application call, and what the app settled."""

    __slots__ = (
        "_count",
        "_ended",
        "_ended_event",
        "_guess",
        "_index",
        "_messages",
        "_next",
        "_outcome",
        "_publish",
        "address",
    )

    def __init__(self, batch: Batch, publish: Publisher) -> None:
        messages = batch.messages
        self.address = batch.address
        self._messages = messages
        self._count = len(messages)
        self._next = 0
        # Apps mostly settle in the order they receive: the next id expected, tried
        # before the id -> position index, which is only built on the first miss.
        self._guess = 0
        self._index: dict[str, int] | None = None
        # None: unsettled; True: acked; str: nacked with that reason.
        self._outcome: list[bool | str | None] = [None] * self._count
        self._publish = publish
        self._ended = False
        self._ended_event: asyncio.Event | None = None

    async def receive(self) -> AMGIReceiveEvent:
        """Hand out the next message; after the last one, wait until the call ends."""
        i = self._next
        if i < self._count:
            self._next = i + 1
            m = self._messages[i]
            bindings = m.bindings
            bindings["amgi"] = {"attempt": m.attempt}
            return {
                "type": "message.receive",
                "id": m.id,
                "headers": m.headers,
                "payload": m.payload,
                "bindings": bindings,
                "more_messages": i + 1 < self._count,
            }
        if self._ended_event is None:
            self._ended_event = asyncio.Event()
            if self._ended:
                self._ended_event.set()
        await self._ended_event.wait()
        raise InvalidEvent("receive() called after the batch call ended: no more messages")

    async def send(self, event: AMGISendEvent) -> None:
        """Take an ack, nack or send from the application; reject anything malformed."""
        if type(event) is dict:
            kind = event.get("type")
            if kind == "message.ack":
                # The hot path, inlined: a valid ack of a received, unsettled message.
                mid = event.get("id")
                i = self._guess
                if i < self._next and self._messages[i].id == mid and not self._ended:
                    outcome = self._outcome
                    if outcome[i] is None:
                        outcome[i] = True
                        self._guess = i + 1
                        return
                self._settle(event, _ACK)
                return
        elif isinstance(event, Mapping):
            kind = event.get("type")
        else:
            raise InvalidEvent(f"send() takes an event dict, not {type(event).__name__}")
        if kind == "message.ack":
            self._settle(event, _ACK)
        elif kind == "message.nack":
            reason = event.get("message")
            if type(reason) is not str:
                raise InvalidEvent(
                    f"message.nack needs 'message': str (the reason), got {type(reason).__name__}"
                )
            self._settle(event, reason)
        elif kind == "message.send":
            await self._send_message(event)
        elif isinstance(kind, str):
            raise InvalidEvent(
                f"unknown event type {kind!r} in a message call "
                "(expected message.ack, message.nack or message.send)"
            )
        else:
            raise InvalidEvent(f"event needs 'type': str, got {event!r:.200}")

    def _settle(self, event: Mapping[str, Any], outcome: bool | str) -> None:
        mid = event.get("id")
        if type(mid) is not str:
            raise InvalidEvent(f"{event.get('type')} needs 'id': str, got {type(mid).__name__}")
        i = self._position(mid)
        if i is None or i >= self._next:
            raise InvalidEvent(f"{event['type']}: unknown message id {mid!r} in this batch")
        if self._ended:
            raise InvalidEvent(f"{event['type']} for {mid!r} after the batch call ended")
        previous = self._outcome[i]
        if previous is not None:
            was = "acked" if previous is True else "nacked"
            raise InvalidEvent(f"{event['type']}: message {mid!r} was already {was}")
        self._outcome[i] = outcome
        if i == self._guess:
            self._guess = i + 1

    def _position(self, mid: str) -> int | None:
        index = self._index
        if index is None:
            index = self._index = {m.id: i for i, m in enumerate(self._messages)}
            if len(index) != self._count:
                raise ValueError(
                    f"transport returned duplicate message ids in a batch of {self.address!r}"
                )
        return index.get(mid)

    async def _send_message(self, event: Mapping[str, Any]) -> None:
        if self._ended:
            raise InvalidEvent("message.send after the batch call ended")
        address, headers, payload, bindings = validate_send(event)
        await self._publish(address, headers, payload, bindings)

    def outcomes(self) -> list[bool | str | None]:
        """Per message, in batch order: True (acked), the nack reason, or None (unsettled)."""
        return list(self._outcome)

    def end(self) -> None:
        """Mark the call as over: later events are rejected, waiting receives return."""
        self._ended = True
        if self._ended_event is not None:
            self._ended_event.set()

    def settlement(self, config: RuntimeConfig, failure: str | None = None) -> Settlement:
        """Sort every message into acked, retry or dead, by the runtime's retry policy.

        ``failure`` describes why the call ended abnormally (the app raised); it becomes
        the nack reason of the messages the app left unsettled.
        """
        outcome = self._outcome
        messages = self._messages
        if outcome.count(_ACK) == self._count:
            return Settlement(acked=list(messages))
        settlement = Settlement()
        acked = settlement.acked
        received = self._next
        for i, (m, o) in enumerate(zip(messages, outcome, strict=True)):
            if o is True:
                acked.append(m)
                continue
            if o is None:
                if i >= received:
                    reason = f"{_NOT_RECEIVED} ({failure})" if failure else _NOT_RECEIVED
                else:
                    reason = failure or _UNSETTLED
            else:
                reason = str(o)
            place(settlement, m, reason, config)
        return settlement


def place(settlement: Settlement, message: Message, reason: str, config: RuntimeConfig) -> None:
    """Put a failed ``message`` in the retry or dead list according to its attempt."""
    if message.attempt < config.max_attempts:
        settlement.retry.append(Retry(message, reason, config.retry_delay_for(message.attempt)))
    else:
        settlement.dead.append(DeadLetter(message, reason))


def validate_send(
    event: Mapping[str, Any],
) -> tuple[str, HeaderList, bytes | None, dict[str, dict[str, Any]]]:
    """Check a ``message.send`` event and return its parts in canonical types."""
    address = event.get("address")
    if type(address) is not str or not address:
        raise InvalidEvent(f"message.send needs 'address': a non-empty str, got {address!r:.100}")
    raw_headers = event.get("headers", ())
    headers: HeaderList = []
    try:
        for pair in raw_headers:
            name, value = pair
            if type(name) is not bytes or type(value) is not bytes:
                raise InvalidEvent(
                    "message.send 'headers' must hold (bytes, bytes) pairs, "
                    f"got ({type(name).__name__}, {type(value).__name__})"
                )
            headers.append((name, value))
    except (TypeError, ValueError):
        raise InvalidEvent("message.send 'headers' must be an iterable of (bytes, bytes)") from None
    payload = event.get("payload")
    if payload is not None and type(payload) is not bytes:
        if isinstance(payload, bytes | bytearray | memoryview):
            payload = bytes(payload)
        else:
            raise InvalidEvent(
                f"message.send 'payload' must be bytes or None, got {type(payload).__name__}"
            )
    bindings = event.get("bindings")
    if bindings is None:
        bindings = {}
    if not isinstance(bindings, Mapping) or not all(
        type(k) is str and isinstance(v, Mapping) for k, v in bindings.items()
    ):
        raise InvalidEvent("message.send 'bindings' must map protocol names to dicts")
    return address, headers, payload, {k: dict(v) for k, v in bindings.items()}


async def call_app(
    app: AMGIApplication,
    batch: Batch,
    publish: Publisher,
    config: RuntimeConfig,
    *,
    state: dict[str, Any] | None = None,
    extensions: dict[str, dict[str, Any]] | None = None,
) -> Settlement:
    """Run ``app`` once over ``batch`` and return how every message is to be settled.

    This is the whole AMGI batch protocol; the long-lived runtime, the serverless adapters
    and :mod:`amgi.testing` all go through it. An exception from the app is logged and
    turns every message it left unsettled into a nack; cancellation does the same and is
    then re-raised.
    """
    call = BatchCall(batch, publish)
    scope = message_scope(batch, state, extensions)
    failure: str | None = None
    cancelled = False
    try:
        await app(scope, call.receive, call.send)
    except asyncio.CancelledError:
        failure = "the application call was cancelled (shutdown or deadline)"
        cancelled = True
    except Exception as exc:
        failure = f"the application raised {type(exc).__name__}: {exc}"
        logger.exception(
            "application raised on a batch of %d message(s) from %r",
            len(batch.messages),
            batch.address,
        )
    finally:
        call.end()
    settlement = call.settlement(config, failure)
    if cancelled:
        raise CallCancelled(settlement)
    return settlement


class CallCancelled(asyncio.CancelledError):
    """Cancellation of an app call that still carries the settlement of its batch."""

    def __init__(self, settlement: Settlement) -> None:
        super().__init__()
        self.settlement = settlement
