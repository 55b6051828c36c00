"""Delivering one fetched batch to the application: ``receive()``, ``send()``, outcomes.

This is the hot path of every server: ``receive()`` and an ack through ``send()`` do no
I/O and allocate one event dict per message. A batch whose call ends with every message
acked is settled after one call; only a call that raised, or left messages it never
received, costs more (see :class:`Delivery`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import CoroutineType
from typing import Any, Final, Protocol

from amgi.errors import InvalidEvent
from amgi.runtime.config import RuntimeConfig
from amgi.servers.kit.headers import ATTEMPT_HEADER
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
    "NACK_RETRY_EXTENSION",
    "BatchCall",
    "CallCancelled",
    "CallHooks",
    "Delivery",
    "Publisher",
    "call_app",
    "call_once",
    "failure_reason",
    "message_scope",
    "place",
    "release",
    "validate_send",
]

logger = logging.getLogger("amgi.runtime")

AMGI_VERSIONS: Final[AMGIVersions] = {"version": "1.0", "spec_version": "1.0"}

NACK_RETRY_EXTENSION: Final = "message.nack.retry"
"""The extension that lets ``message.nack`` carry ``"retry": False`` (dead-letter now)."""

Publisher = Callable[[str, HeaderList, "bytes | None", dict[str, dict[str, Any]]], Awaitable[None]]
"""``publish(address, headers, payload, bindings)``; raises an ``OSError`` subclass on failure."""

_ACK: Final = True
_NOT_RECEIVED = "not received by the application before its call ended"
_UNSETTLED = "not acked or nacked by the application"
_CANCELLED = "the application call was cancelled (shutdown or deadline)"
_ACK_KEYS: Final = frozenset(("type", "id"))
_NACK_KEYS: Final = frozenset(("type", "id", "message", "retry"))
_SEND_KEYS: Final = frozenset(("type", "address", "headers", "payload", "bindings"))


class _Final(str):
    """The reason of a nack the application marked ``"retry": False``."""

    __slots__ = ()


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


def _unknown_keys(event: Mapping[str, Any], allowed: frozenset[str]) -> None:
    extra = sorted(str(k) for k in event if k not in allowed)
    if extra:
        raise InvalidEvent(
            f"{event.get('type')}: unknown key(s) {', '.join(map(repr, extra))} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


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
        # None: unsettled; True: acked; str: nacked with that reason (_Final: no retry).
        self._outcome: list[bool | str | None] = [None] * self._count
        self._publish = publish
        self._ended = False
        self._ended_event: asyncio.Event | None = None

    @property
    def received(self) -> int:
        """How many messages ``receive()`` has handed out."""
        return self._next

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
            if kind == "message.ack" and len(event) == 2:
                # The hot path, inlined: a valid ack of a received, unsettled message.
                # (end() moves _guess past the last message, so no ended check here.)
                mid = event.get("id")
                i = self._guess
                if i < self._next and self._messages[i].id == mid:
                    outcome = self._outcome
                    if outcome[i] is None:
                        outcome[i] = True
                        self._guess = i + 1
                        return
        elif isinstance(event, Mapping):
            kind = event.get("type")
        else:
            raise InvalidEvent(f"send() takes an event dict, not {type(event).__name__}")
        if kind == "message.ack":
            _unknown_keys(event, _ACK_KEYS)
            self._settle(event, _ACK)
        elif kind == "message.nack":
            _unknown_keys(event, _NACK_KEYS)
            reason = event.get("message")
            if type(reason) is not str:
                raise InvalidEvent(
                    f"message.nack needs 'message': str (the reason), got {type(reason).__name__}"
                )
            retry = event.get("retry", True)
            if type(retry) is not bool:
                raise InvalidEvent(
                    f"message.nack 'retry' must be a bool, got {type(retry).__name__}"
                )
            self._settle(event, reason if retry else _Final(reason))
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

    def all_acked(self) -> bool:
        """Whether the application acked every message of the call."""
        return self._outcome.count(_ACK) == self._count

    def end(self) -> None:
        """Mark the call as over: later events are rejected, waiting receives return."""
        self._ended = True
        self._guess = self._count
        if self._ended_event is not None:
            self._ended_event.set()

    def settlement(self, config: RuntimeConfig, failure: str | None = None) -> Settlement:
        """Sort every message into acked, retry or dead after this one call alone.

        ``failure`` describes why the call ended abnormally; it becomes the nack reason of
        the messages the app left unsettled. (:class:`Delivery` goes further: it calls the
        app again before placing what this call did not settle.)
        """
        if self.all_acked():
            return Settlement(acked=list(self._messages))
        settlement = Settlement()
        received = self._next
        for i, (m, o) in enumerate(zip(self._messages, self._outcome, strict=True)):
            if o is True:
                settlement.acked.append(m)
            elif o is None:
                if i >= received:
                    reason = f"{_NOT_RECEIVED} ({failure})" if failure else _NOT_RECEIVED
                else:
                    reason = failure or _UNSETTLED
                place(settlement, m, reason, config)
            elif isinstance(o, str):
                place(settlement, m, o, config)
        return settlement


def place(settlement: Settlement, message: Message, reason: str, config: RuntimeConfig) -> None:
    """Put a failed ``message`` in the retry or dead list according to its attempt.

    A reason the application marked final (``"retry": False``) goes to the dead list
    whatever the attempt.
    """
    if type(reason) is _Final:
        settlement.dead.append(DeadLetter(message, str(reason)))
    elif message.attempt < config.max_attempts:
        settlement.retry.append(Retry(message, reason, config.retry_delay_for(message.attempt)))
    else:
        settlement.dead.append(DeadLetter(message, reason))


def release(settlement: Settlement, messages: Sequence[Message], reason: str) -> None:
    """Hand back messages the application never had: redelivered at once, never dead here."""
    settlement.retry.extend(Retry(m, reason, 0.0, uncounted=True) for m in messages)


def validate_send(
    event: Mapping[str, Any],
) -> tuple[str, HeaderList, bytes | None, dict[str, dict[str, Any]]]:
    """Check a ``message.send`` event and return its parts in canonical types."""
    _unknown_keys(event, _SEND_KEYS)
    address = event.get("address")
    if type(address) is not str or not address:
        raise InvalidEvent(f"message.send needs 'address': a non-empty str, got {address!r:.100}")
    if "headers" not in event:
        raise InvalidEvent("message.send needs 'headers': a sequence of (bytes, bytes) pairs")
    raw_headers = event["headers"]
    if isinstance(raw_headers, str | bytes | Mapping):
        raise InvalidEvent(
            "message.send 'headers' must be a sequence of (bytes, bytes) pairs, "
            f"not {type(raw_headers).__name__}"
        )
    headers: HeaderList = []
    try:
        pairs = list(raw_headers)
    except TypeError:
        raise InvalidEvent(
            "message.send 'headers' must be a sequence of (bytes, bytes) pairs, "
            f"not {type(raw_headers).__name__}"
        ) from None
    for pair in pairs:
        if type(pair) is not tuple and not isinstance(pair, list | tuple):
            raise InvalidEvent(
                f"message.send 'headers' must hold (bytes, bytes) pairs, got {pair!r:.100}"
            )
        if len(pair) != 2:
            raise InvalidEvent(
                f"message.send 'headers' must hold (bytes, bytes) pairs, got {len(pair)} item(s)"
            )
        name, value = pair
        if type(name) is not bytes or type(value) is not bytes:
            raise InvalidEvent(
                "message.send 'headers' must hold (bytes, bytes) pairs, "
                f"got ({type(name).__name__}, {type(value).__name__})"
            )
        if len(name) == len(ATTEMPT_HEADER) and name.lower() == ATTEMPT_HEADER:
            raise InvalidEvent(
                "message.send header 'amgi-attempt' is the server's: it carries a retried "
                "message's attempt, and a receiving server would take it as one"
            )
        headers.append((name, value))
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


class CallHooks(Protocol):
    """What the runtime does around each application call of a delivery (crash ledger)."""

    async def enter(self, address: str, messages: Sequence[Message], exclusive: bool) -> Any:
        """Wait for the app's hands to be free enough; return a token for :meth:`leave`."""

    def leave(self, token: Any) -> None:
        """The call ended (or was abandoned)."""


async def call_once(
    app: AMGIApplication, scope: MessageScope, call: BatchCall, *, log_level: int = logging.ERROR
) -> BaseException | None:
    """Run one application call; return the exception it raised (logged), or None.

    Cancellation, ``KeyboardInterrupt`` and ``SystemExit`` propagate; any other
    ``BaseException`` (a ``BaseExceptionGroup`` of a task group, say) is a failed call
    like an ``Exception``: escaping, it left the batch unsettled. The call is ended
    (``call.end()``) whatever happens.
    """
    try:
        result = app(scope, call.receive, call.send)
        if type(result) is not CoroutineType and not inspect.isawaitable(result):
            raise TypeError(
                f"calling the application returned {type(result).__name__}, not an awaitable "
                "(is it an 'async def'?)"
            )
        await result
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        logger.log(
            log_level,
            "application raised on a batch of %d message(s) from %r",
            call._count,
            call.address,
            exc_info=exc,
        )
        return exc
    finally:
        call.end()
    return None


def failure_reason(exc: BaseException) -> str:
    """The nack reason of messages left unsettled by a call that raised ``exc``."""
    return f"the application raised {type(exc).__name__}: {exc}"


class Delivery:
    """Delivers one fetched batch to the application and says how to settle it.

    The first call gets the whole batch (or the ``groups`` given). After a call:

    * acked messages are acked; messages the app nacked in a call that did not raise are
      placed by its verdict (retry, or dead at the last attempt or with ``retry: False``);
      messages it received but neither acked nor nacked, in a call that returned, are
      nacked as unsettled;
    * messages the call never received are delivered again in a new call at once: they
      use up no attempt (unless the call received nothing at all: then they are nacked);
    * when the call raised, the messages it received and did not ack are suspects: they
      are delivered again in halves, down to one message, and only a message whose call
      fails when it is delivered alone is nacked with the exception.

    Every new call holds fewer messages than the call it comes from, and at most
    ``2 * n.bit_length()`` calls of a delivery may raise (enough to find one culprit
    among n): after that, the suspects left are nacked with the exception (a retry then
    delivers each alone). So a failure that is not any one message's fault (a database
    down) costs a few calls, not 2n. The first exception of a delivery is logged with its
    traceback, the ones while isolating at debug level (each nacked message is logged
    anyway). :meth:`abandon` settles what is left when the runtime gives up on a call
    that ignores cancellation.
    """

    __slots__ = (
        "_abandoned",
        "_app",
        "_batch",
        "_call",
        "_config",
        "_current",
        "_extensions",
        "_failures_left",
        "_groups",
        "_hooks",
        "_publish",
        "_settlement",
        "_state",
        "_token",
    )

    def __init__(
        self,
        app: AMGIApplication,
        batch: Batch,
        publish: Publisher,
        config: RuntimeConfig,
        *,
        state: dict[str, Any] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
        groups: Sequence[tuple[list[Message], bool]] | None = None,
        hooks: CallHooks | None = None,
    ) -> None:
        self._app = app
        self._batch = batch
        self._publish = publish
        self._config = config
        self._state = state
        self._extensions = extensions
        self._groups: deque[tuple[list[Message], bool]] = deque(
            groups if groups is not None else [(batch.messages, False)]
        )
        self._hooks = hooks
        self._failures_left = 2 * len(batch.messages).bit_length()
        self._settlement = Settlement()
        self._call: BatchCall | None = None
        self._current: list[Message] = []
        self._token: Any = None
        self._abandoned = False

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    async def run(self) -> Settlement:
        """Call the app until every message is placed; see the class docstring.

        Cancellation settles what the app did, nacks what it had in hand, hands back what
        it never received, and raises :class:`CallCancelled` with that settlement.
        """
        groups = self._groups
        settlement = self._settlement
        while groups:
            messages, exclusive = groups[0]
            try:
                token = None
                if self._hooks is not None:
                    token = await self._hooks.enter(self._batch.address, messages, exclusive)
                call = self._start(messages, exclusive, token)
                groups.popleft()  # taken off only once in the app's hands
                error = await call_once(
                    self._app,
                    self._scope(),
                    call,
                    log_level=logging.ERROR if self._no_failure_yet() else logging.DEBUG,
                )
            except asyncio.CancelledError:
                if self._abandoned:
                    raise
                raise CallCancelled(self.abandon(_CANCELLED)) from None
            finally:
                self._finish()
            if self._abandoned:
                return settlement
            if error is None and call.all_acked():
                if not groups and messages is self._batch.messages:
                    return Settlement(acked=list(messages))  # the whole batch, in one call
                settlement.acked.extend(messages)
                continue
            self._sort(call, messages, exclusive, None if error is None else failure_reason(error))
        return settlement

    def abandon(self, reason: str) -> Settlement:
        """Give up: settle the call in progress and everything not yet called, now."""
        settlement = self._settlement
        if self._abandoned:
            return settlement
        self._abandoned = True
        call = self._call
        if call is not None:
            call.end()
            received = call.received
            for i, (m, o) in enumerate(zip(self._current, call.outcomes(), strict=True)):
                if o is True:
                    settlement.acked.append(m)
                elif isinstance(o, str):
                    place(settlement, m, o, self._config)
                elif i < received:
                    place(settlement, m, reason, self._config)
                else:
                    release(settlement, [m], f"{_NOT_RECEIVED} ({reason})")
            self._finish()
        for messages, _ in self._groups:
            release(settlement, messages, f"{_NOT_RECEIVED} ({reason})")
        self._groups.clear()
        return settlement

    def _no_failure_yet(self) -> bool:
        """True until the first call failed (the first exception is logged loudly)."""
        return self._failures_left == 2 * len(self._batch.messages).bit_length()

    def _scope(self) -> MessageScope:
        return message_scope(self._batch, self._state, self._extensions)

    def _start(self, messages: list[Message], exclusive: bool, token: Any) -> BatchCall:
        batch = self._batch
        if messages is not batch.messages:
            batch = Batch(batch.address, messages, batch.key, batch.context)
        call = BatchCall(batch, self._publish)
        self._call = call
        self._current = messages
        self._token = token
        return call

    def _finish(self) -> None:
        if self._call is None:
            return
        self._call = None
        if self._hooks is not None:
            self._hooks.leave(self._token)

    def _sort(
        self, call: BatchCall, messages: list[Message], exclusive: bool, failure: str | None
    ) -> None:
        settlement = self._settlement
        config = self._config
        received = call.received
        outcomes = call.outcomes()
        rest = messages[received:]
        if failure is None:
            for m, o in zip(messages[:received], outcomes, strict=False):
                if o is True:
                    settlement.acked.append(m)
                else:
                    place(settlement, m, o if isinstance(o, str) else _UNSETTLED, config)
            if rest:
                if received:
                    self._groups.appendleft((rest, exclusive))
                else:
                    for m in rest:
                        place(settlement, m, _NOT_RECEIVED, config)
            return
        suspects = []
        for m, o in zip(messages[:received], outcomes, strict=False):
            if o is True:
                settlement.acked.append(m)
            else:
                suspects.append(m)
        self._failures_left -= 1
        if len(messages) == 1 or not received:
            # Failed alone, or before taking any message: nothing to isolate.
            for m, o in zip(messages, outcomes, strict=True):
                if o is not True:
                    place(settlement, m, failure, config)
            return
        again: list[tuple[list[Message], bool]] = []
        if self._failures_left <= 0:
            # Failing too often to be one message's fault: stop isolating.
            for m in suspects:
                place(settlement, m, failure, config)
            suspects = []
        if len(suspects) > 1:
            half = len(suspects) // 2
            again += [(suspects[:half], exclusive), (suspects[half:], exclusive)]
        elif suspects:
            again.append((suspects, exclusive))
        if rest:
            again.append((rest, exclusive))
        self._groups.extendleft(reversed(again))


async def call_app(
    app: AMGIApplication,
    batch: Batch,
    publish: Publisher,
    config: RuntimeConfig,
    *,
    state: dict[str, Any] | None = None,
    extensions: dict[str, dict[str, Any]] | None = None,
) -> Settlement:
    """Deliver ``batch`` to ``app`` and return how every message is to be settled.

    This is the whole AMGI batch protocol, with the isolation of :class:`Delivery`; the
    long-lived runtime, the serverless adapters and :mod:`amgi.testing` all go through
    it. Cancellation raises :class:`CallCancelled`, which carries the settlement.
    """
    return await Delivery(app, batch, publish, config, state=state, extensions=extensions).run()


class CallCancelled(asyncio.CancelledError):
    """Cancellation of an app call that still carries the settlement of its batch."""

    def __init__(self, settlement: Settlement) -> None:
        super().__init__()
        self.settlement = settlement
