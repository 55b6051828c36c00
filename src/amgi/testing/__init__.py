"""Drive an AMGI application in-process, without a server or a broker.

>>> result = await run_batch(app, [message(b"hello")])
>>> assert result.acked == ["1"]

The call goes through the same code as on every server (:class:`amgi.runtime.BatchCall`
and the call the runtime makes: validation, unsettled means nack), so what passes here
behaves the same in production. Sends are recorded instead of published.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from amgi.errors import InvalidEvent
from amgi.runtime.app import check_app
from amgi.runtime.batch import (
    NACK_RETRY_EXTENSION,
    BatchCall,
    call_once,
    failure_reason,
    message_scope,
)
from amgi.runtime.config import RuntimeConfig
from amgi.runtime.lifespan import Lifespan
from amgi.transport import Batch, Bindings, HeaderList, Message, Settlement
from amgi.types import AMGIApplication

__all__ = [
    "BatchResult",
    "LifespanRunner",
    "SentMessage",
    "message",
    "run_batch",
]


def message(
    payload: bytes | None = b"",
    headers: HeaderList | None = None,
    bindings: Bindings | None = None,
    *,
    id: str | None = None,
    attempt: int = 1,
) -> Message:
    """Build a message to feed to :func:`run_batch` (ids default to "1", "2", ...)."""
    return Message(id or "", list(headers or []), payload, dict(bindings or {}), attempt)


@dataclass(slots=True, frozen=True)
class SentMessage:
    """A ``message.send`` the application made."""

    address: str
    headers: HeaderList
    payload: bytes | None
    bindings: Bindings


@dataclass(slots=True)
class BatchResult:
    """What the application did with a batch."""

    acked: list[str] = field(default_factory=list)
    nacked: dict[str, str] = field(default_factory=dict)
    """Messages the application nacked itself, with its reason."""
    unsettled: list[str] = field(default_factory=list)
    """Messages it neither acked nor nacked (a server nacks these)."""
    sent: list[SentMessage] = field(default_factory=list)
    error: BaseException | None = None
    """The exception the application raised, if it did."""
    settlement: Settlement = field(default_factory=Settlement)
    """How a server places each message after this one call, under the given RuntimeConfig
    (a server then calls the app again with messages it never received, and delivers
    the messages of a call that raised again in smaller batches before nacking them)."""


async def run_batch(
    app: AMGIApplication,
    messages: Sequence[Message],
    *,
    address: str = "test",
    state: dict[str, Any] | None = None,
    config: RuntimeConfig | None = None,
    send_error: BaseException | None = None,
    timeout: float = 10.0,
) -> BatchResult:
    """Call ``app`` once with ``messages`` as one batch and report what it did.

    ``send_error``, when given, is raised into the app by every ``message.send`` (it
    should be an ``OSError``, as a server's would be). Exceptions the app raises are
    captured in :attr:`BatchResult.error`, not raised. A call still running after
    ``timeout`` seconds is cancelled (a :class:`TimeoutError` in ``error``); if it ignores
    the cancellation for ``config.cancel_grace`` seconds it is left behind and
    ``run_batch`` returns anyway. An app that is not async raises
    :class:`amgi.errors.ConfigurationError`.
    """
    check_app(app)
    config = config or RuntimeConfig()
    numbered = [
        m if m.id else Message(str(i), m.headers, m.payload, m.bindings, m.attempt, m.token)
        for i, m in enumerate(messages, start=1)
    ]
    result = BatchResult()

    async def publish(
        address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        if send_error is not None:
            raise send_error
        result.sent.append(SentMessage(address, headers, payload, bindings))

    batch = Batch(address, numbered)
    call = BatchCall(batch, publish)
    scope = message_scope(batch, state, {NACK_RETRY_EXTENSION: {}})
    task = asyncio.create_task(call_once(app, scope, call))
    done, _ = await asyncio.wait({task}, timeout=timeout)
    failure: str | None = None
    if done:
        result.error = task.result()
        if result.error is not None:
            failure = failure_reason(result.error)
    else:
        task.cancel()
        await asyncio.wait({task}, timeout=config.cancel_grace)
        failure = f"the application timed out after {timeout:g}s"
        if not task.done():
            call.end()
            failure += f" and ignored cancellation for {config.cancel_grace:g}s"
        result.error = TimeoutError(failure)
    for m, outcome in zip(numbered, call.outcomes(), strict=True):
        if outcome is True:
            result.acked.append(m.id)
        elif outcome is None:
            result.unsettled.append(m.id)
        else:
            result.nacked[m.id] = str(outcome)
    result.settlement = call.settlement(config, failure)
    return result


class LifespanRunner:
    """Run an application's lifespan: ``async with LifespanRunner(app) as state: ...``.

    Raises :class:`amgi.errors.StartupFailed` if startup fails; :attr:`shutdown_ok` tells
    whether shutdown completed.
    """

    def __init__(self, app: AMGIApplication, mode: str = "auto") -> None:
        if mode not in ("auto", "on", "off"):
            raise InvalidEvent(f"lifespan mode must be auto, on or off, not {mode!r}")
        check_app(app)
        self._lifespan = Lifespan(app, mode)  # type: ignore[arg-type]
        self.shutdown_ok: bool | None = None

    @property
    def supported(self) -> bool:
        """False when the application does not speak lifespan."""
        return self._lifespan.supported

    async def __aenter__(self) -> dict[str, Any]:
        await self._lifespan.startup()
        return self._lifespan.state

    async def __aexit__(self, *_: object) -> None:
        self.shutdown_ok = await self._lifespan.shutdown(10.0)
