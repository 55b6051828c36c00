"""The AMGI 1.0 message format and lifespan protocol as typed dictionaries.

These are the exact keys of the specification (see ``docs/spec.md``). Servers build the
receive events and scopes; applications build the send events.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, NotRequired, TypedDict

__all__ = [
    "AMGIApplication",
    "AMGIReceiveCallable",
    "AMGIReceiveEvent",
    "AMGISendCallable",
    "AMGISendEvent",
    "AMGIVersions",
    "Headers",
    "LifespanReceiveEvent",
    "LifespanScope",
    "LifespanSendEvent",
    "LifespanShutdownCompleteEvent",
    "LifespanShutdownEvent",
    "LifespanShutdownFailedEvent",
    "LifespanStartupCompleteEvent",
    "LifespanStartupEvent",
    "LifespanStartupFailedEvent",
    "MessageAckEvent",
    "MessageNackEvent",
    "MessageReceiveEvent",
    "MessageScope",
    "MessageSendEvent",
    "Scope",
]

Headers = Sequence[tuple[bytes, bytes]]
"""Message headers: ordered ``(name, value)`` byte pairs; a name may repeat."""


class AMGIVersions(TypedDict):
    version: Literal["1.0"]
    spec_version: str


class MessageScope(TypedDict):
    """The scope of one application call: one batch of messages from one address."""

    type: Literal["message"]
    amgi: AMGIVersions
    address: str
    state: NotRequired[dict[str, Any]]
    extensions: NotRequired[dict[str, dict[str, Any]]]


class LifespanScope(TypedDict):
    """The scope of the single lifespan call made before any message is delivered."""

    type: Literal["lifespan"]
    amgi: AMGIVersions
    state: NotRequired[dict[str, Any]]


class MessageReceiveEvent(TypedDict):
    """One message of the batch, returned by ``receive()``."""

    type: Literal["message.receive"]
    id: str
    headers: Headers
    payload: NotRequired[bytes | None]
    bindings: NotRequired[dict[str, dict[str, Any]]]
    more_messages: NotRequired[bool]


class MessageAckEvent(TypedDict):
    """Sent by the app: message ``id`` was processed; the server may forget it."""

    type: Literal["message.ack"]
    id: str


class MessageNackEvent(TypedDict):
    """Sent by the app: message ``id`` failed; ``message`` says why.

    ``retry`` (only where ``scope["extensions"]`` has ``"message.nack.retry"``): False
    dead-letters the message at once instead of retrying it.
    """

    type: Literal["message.nack"]
    id: str
    message: str
    retry: NotRequired[bool]


class MessageSendEvent(TypedDict):
    """Sent by the app: publish a message to ``address``."""

    type: Literal["message.send"]
    address: str
    headers: Headers
    payload: NotRequired[bytes | None]
    bindings: NotRequired[dict[str, dict[str, Any]]]


class LifespanStartupEvent(TypedDict):
    type: Literal["lifespan.startup"]


class LifespanShutdownEvent(TypedDict):
    type: Literal["lifespan.shutdown"]


class LifespanStartupCompleteEvent(TypedDict):
    type: Literal["lifespan.startup.complete"]


class LifespanStartupFailedEvent(TypedDict):
    type: Literal["lifespan.startup.failed"]
    message: str


class LifespanShutdownCompleteEvent(TypedDict):
    type: Literal["lifespan.shutdown.complete"]


class LifespanShutdownFailedEvent(TypedDict):
    type: Literal["lifespan.shutdown.failed"]
    message: str


Scope = MessageScope | LifespanScope
LifespanReceiveEvent = LifespanStartupEvent | LifespanShutdownEvent
LifespanSendEvent = (
    LifespanStartupCompleteEvent
    | LifespanStartupFailedEvent
    | LifespanShutdownCompleteEvent
    | LifespanShutdownFailedEvent
)
AMGIReceiveEvent = MessageReceiveEvent | LifespanReceiveEvent
AMGISendEvent = MessageAckEvent | MessageNackEvent | MessageSendEvent | LifespanSendEvent

AMGIReceiveCallable = Callable[[], Awaitable[AMGIReceiveEvent]]
AMGISendCallable = Callable[[AMGISendEvent], Awaitable[None]]
AMGIApplication = Callable[[Scope, AMGIReceiveCallable, AMGISendCallable], Awaitable[None]]
