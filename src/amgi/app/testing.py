"""Test an :class:`~amgi.app.App` without a broker.

>>> async with TestClient(app) as client:
...     result = await client.publish("orders.eu", Order(id=1, amount=5))
...     assert result.acked and result.sent[0].address == "invoices"

Each publish is one AMGI batch through :func:`amgi.runtime.batch.call_app`, the code every
server runs, with the lifespan started first. The client advertises the
``message.nack.retry`` extension, as the project's servers do (``extensions={}`` turns it
off).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from amgi.app._app import NACK_RETRY
from amgi.app._codec import encode_any
from amgi.runtime.batch import call_app
from amgi.runtime.config import RuntimeConfig
from amgi.testing import LifespanRunner, SentMessage
from amgi.transport import Batch, Bindings, HeaderList, Message
from amgi.types import (
    AMGIApplication,
    AMGIReceiveCallable,
    AMGISendCallable,
    AMGISendEvent,
    Scope,
)

__all__ = ["Delivery", "SentMessage", "TestClient"]


@dataclass(slots=True)
class Delivery:
    """What became of one published message."""

    id: str
    acked: bool
    reason: str | None = None
    """The nack reason, when not acked."""
    dead_lettered: bool = False
    """True when it would go to the dead letters now (no retry left, or ``retry: False``)."""
    sent: list[SentMessage] = field(default_factory=list)
    """Messages the application published during the call that handled this message."""

    @property
    def nacked(self) -> bool:
        """Not acked."""
        return not self.acked


class TestClient:
    """Runs an application's lifespan and feeds it messages, one batch per publish."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        app: AMGIApplication,
        *,
        extensions: Mapping[str, dict[str, Any]] | None = None,
        config: RuntimeConfig | None = None,
    ) -> None:
        self.app = app
        self.extensions = dict({NACK_RETRY: {}} if extensions is None else extensions)
        self.config = config or RuntimeConfig(max_attempts=3)
        self.sent: list[SentMessage] = []
        """Every message the application published, in order."""
        self._state: dict[str, Any] | None = None
        self._lifespan: LifespanRunner | None = None
        self._count = 0

    @property
    def state(self) -> dict[str, Any]:
        """The lifespan state (what the app's lifespan yielded), once started."""
        if self._state is None:
            raise RuntimeError("the TestClient is not started: use 'async with TestClient(app)'")
        return self._state

    async def __aenter__(self) -> TestClient:
        self._lifespan = LifespanRunner(self.app)
        self._state = await self._lifespan.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._lifespan is not None:
            await self._lifespan.__aexit__(*exc)
            self._lifespan = None

    async def publish(
        self,
        address: str,
        payload: Any = b"",
        *,
        headers: Mapping[str, str | bytes] | Sequence[tuple[bytes, bytes]] | None = None,
        bindings: Bindings | None = None,
        attempt: int = 1,
    ) -> Delivery:
        """Deliver one message to ``address`` (a batch of one) and report its outcome."""
        (delivery,) = await self.publish_batch(
            address, [payload], headers=headers, bindings=bindings, attempt=attempt
        )
        return delivery

    async def publish_batch(
        self,
        address: str,
        payloads: Sequence[Any],
        *,
        headers: Mapping[str, str | bytes] | Sequence[tuple[bytes, bytes]] | None = None,
        bindings: Bindings | None = None,
        attempt: int = 1,
    ) -> list[Delivery]:
        """Deliver ``payloads`` as one AMGI batch; ``bytes`` go as they are, others as JSON."""
        messages = []
        for payload in payloads:
            self._count += 1
            data, content_type = _encode(payload)
            pairs = _header_pairs(headers)
            if content_type and not any(n.lower() == b"content-type" for n, _ in pairs):
                pairs.append((b"content-type", content_type.encode()))
            messages.append(
                Message(
                    str(self._count),
                    pairs,
                    data,
                    {k: dict(v) for k, v in (bindings or {}).items()},
                    attempt,
                )
            )
        sent: list[SentMessage] = []
        dead_now: set[str] = set()

        async def publish(
            address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
        ) -> None:
            message = SentMessage(address, headers, payload, bindings)
            sent.append(message)
            self.sent.append(message)

        async def observed(
            scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable
        ) -> None:
            async def spy(event: AMGISendEvent) -> None:
                await send(event)
                if event.get("type") == "message.nack" and event.get("retry") is False:
                    dead_now.add(str(event.get("id")))

            await self.app(scope, receive, spy)

        settlement = await call_app(
            observed,
            Batch(address, messages),
            publish,
            self.config,
            state=self._state,
            extensions=self.extensions or None,
        )
        outcome: dict[str, Delivery] = {}
        for m in settlement.acked:
            outcome[m.id] = Delivery(m.id, True, sent=sent)
        for retry in settlement.retry:
            mid = retry.message.id
            outcome[mid] = Delivery(mid, False, retry.reason, mid in dead_now, sent)
        for dead in settlement.dead:
            mid = dead.message.id
            outcome[mid] = Delivery(mid, False, dead.reason, True, sent)
        return [outcome[m.id] for m in messages]


def _encode(payload: Any) -> tuple[bytes | None, str | None]:
    if payload is None or isinstance(payload, bytes):
        return payload, None
    if isinstance(payload, str):
        return payload.encode(), None
    data, content_type = encode_any(payload)
    return data, content_type


def _header_pairs(
    headers: Mapping[str, str | bytes] | Sequence[tuple[bytes, bytes]] | None,
) -> list[tuple[bytes, bytes]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()]
    return list(headers)
