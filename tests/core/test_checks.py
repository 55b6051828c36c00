"""Strict checks: app events the spec does not allow, and apps that are not async."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest

from amgi.errors import ConfigurationError, InvalidEvent
from amgi.runtime import Runtime, RuntimeConfig
from amgi.runtime.app import check_app
from amgi.serverless import KafkaHandler, SqsHandler
from amgi.servers.memory import MemoryOptions, MemoryTransport
from amgi.testing import LifespanRunner, message, run_batch
from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope


def sending(event: Any) -> Any:
    """An app that sends ``event`` for its first message, records the error, then acks."""

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        m: Any = await receive()
        try:
            await send(event(m["id"]) if callable(event) else event)
        except InvalidEvent as exc:
            app.error = str(exc)  # type: ignore[attr-defined]
        await send({"type": "message.ack", "id": m["id"]})

    app.error = None  # type: ignore[attr-defined]
    return app


@pytest.mark.parametrize(
    ("event", "match"),
    [
        ({"type": "message.send", "address": "x"}, "message.send needs 'headers'"),
        (
            {"type": "message.send", "address": "x", "headers": [], "key": b"k"},
            "unknown key(s) 'key'",
        ),
        (lambda i: {"type": "message.ack", "id": i, "message": "ok"}, "unknown key(s) 'message'"),
        (lambda i: {"type": "message.nack", "id": i, "message": "m", "requeue": True}, "'requeue'"),
        (
            lambda i: {"type": "message.nack", "id": i, "message": "m", "retry": 0},
            "'retry' must be a bool",
        ),
        (
            {"type": "message.send", "address": "x", "headers": [("a", "b")]},
            "must hold (bytes, bytes) pairs, got (str, str)",
        ),
        ({"type": "message.send", "address": "x", "headers": [(b"a",)]}, "got 1 item(s)"),
        ({"type": "message.send", "address": "x", "headers": b"ab"}, "not bytes"),
        # Kafka, AMQP, MQTT and SQS consumers took it as the attempt (dead-lettering an
        # innocent message early); the others showed it as a header.
        (
            {"type": "message.send", "address": "x", "headers": [(b"Amgi-Attempt", b"9")]},
            "header 'amgi-attempt' is the server's",
        ),
    ],
)
async def test_bad_send_events_get_a_specific_invalid_event(event: Any, match: str) -> None:
    app = sending(event)
    result = await run_batch(app, [message(b"x")])
    assert app.error is not None
    assert match in app.error
    assert result.acked == ["1"]
    assert result.sent == []


@pytest.mark.parametrize("kind", ["lifespan.startup.failed", "lifespan.shutdown.failed"])
async def test_lifespan_failed_without_message_is_rejected(kind: str) -> None:
    errors: list[str] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        await receive()
        if kind == "lifespan.startup.failed":
            try:
                await send({"type": kind})  # type: ignore[typeddict-item]
            except InvalidEvent as exc:
                errors.append(str(exc))
        await send({"type": "lifespan.startup.complete"})
        await receive()
        if kind == "lifespan.shutdown.failed":
            try:
                await send({"type": kind})  # type: ignore[typeddict-item]
            except InvalidEvent as exc:
                errors.append(str(exc))
        await send({"type": "lifespan.shutdown.complete"})

    async with LifespanRunner(app):
        pass
    assert len(errors) == 1
    assert f"{kind} needs 'message': str" in errors[0]


async def test_run_batch_timeout_says_it_timed_out() -> None:
    async def slow(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        await receive()
        await asyncio.sleep(60)

    result = await run_batch(slow, [message(b"x")], timeout=0.2)
    assert isinstance(result.error, TimeoutError)
    reason = result.settlement.retry[0].reason
    assert reason == "the application timed out after 0.2s", reason


async def test_run_batch_returns_when_the_app_swallows_cancellation() -> None:
    release = asyncio.Event()

    async def stubborn(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        await receive()
        while not release.is_set():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await asyncio.sleep(0)  # swallowed: keeps going

    loop = asyncio.get_running_loop()
    started = loop.time()
    config = RuntimeConfig(cancel_grace=0.3)
    result = await asyncio.wait_for(
        run_batch(stubborn, [message(b"x")], timeout=0.3, config=config), 10
    )
    release.set()  # let the abandoned call end before the test's loop closes
    assert loop.time() - started < 3
    assert "ignored cancellation" in str(result.error)
    assert result.unsettled == ["1"]


def sync_app(scope: Any, receive: Any, send: Any) -> None:
    return None


class SyncCallable:
    def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return None


class AsyncCallable:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return None


async def async_app(scope: Any, receive: Any, send: Any, *, extra: int = 0) -> None:
    return None


def wrapper_of_async(scope: Any, receive: Any, send: Any) -> Any:
    return async_app(scope, receive, send)


wrapper_of_async.__wrapped__ = async_app  # type: ignore[attr-defined]


@pytest.mark.parametrize("app", [sync_app, SyncCallable(), functools.partial(sync_app), 3])
async def test_a_sync_app_is_refused_everywhere_with_one_line(app: Any) -> None:
    transport = MemoryTransport(["q"], MemoryOptions())
    with pytest.raises(ConfigurationError, match="async") as info:
        Runtime(app, transport, RuntimeConfig())
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigurationError, match="async"):
        await run_batch(app, [message(b"x")])
    with pytest.raises(ConfigurationError, match="async"):
        LifespanRunner(app)
    for handler in (SqsHandler, KafkaHandler):
        with pytest.raises(ConfigurationError, match="async"):
            handler(app, handle_sigterm=False)


@pytest.mark.parametrize(
    "app",
    [
        async_app,
        AsyncCallable(),
        functools.partial(async_app, extra=1),
        functools.partial(AsyncCallable()),
        wrapper_of_async,
    ],
)
def test_async_apps_of_every_shape_are_accepted(app: Any) -> None:
    check_app(app)
