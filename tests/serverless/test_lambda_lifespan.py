"""Cold starts: lifespan startup within the invocation's time, and failed startups that
leave nothing running."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from pathlib import Path
from typing import Any

import pytest

from amgi.errors import StartupFailed
from amgi.runtime import RuntimeConfig
from amgi.serverless import SqsHandler
from tests.serverless.helpers import Context

FIXTURES = Path(__file__).parent / "fixtures"


def one_record() -> dict[str, Any]:
    event: dict[str, Any] = json.loads((FIXTURES / "sqs_standard.json").read_text())
    event["Records"] = event["Records"][:1]
    return event


def app_starting_in(seconds: list[float], received: list[str]) -> Any:
    """Lifespan startup takes ``seconds[n]`` on the n-th cold start; messages hang."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await asyncio.sleep(seconds.pop(0))
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        event = await receive()
        received.append(event["id"])
        await asyncio.sleep(30)  # only the deadline ends this call

    return app


async def test_a_cold_start_counts_against_the_invocation_deadline() -> None:
    received: list[str] = []
    handler = SqsHandler(
        app_starting_in([0.6], received), handle_sigterm=False, deadline_margin=0.4
    )
    context = Context(1.3)
    result = await handler.handle(one_record(), context)
    assert len(result["batchItemFailures"]) == 1
    assert received, "the app had the record"
    # Answered within the margin kept back, not after Lambda's deadline.
    assert context.get_remaining_time_in_millis() >= 100
    await handler.aclose()


async def test_a_startup_longer_than_the_time_left_fails_in_time_and_is_tried_again() -> None:
    received: list[str] = []
    handler = SqsHandler(
        app_starting_in([30, 0], received),
        handle_sigterm=False,
        deadline_margin=0.4,
        config=RuntimeConfig(startup_timeout=60),
    )
    context = Context(1.0)
    with pytest.raises(StartupFailed, match="this invocation had left"):
        await handler.handle(one_record(), context)
    assert context.get_remaining_time_in_millis() >= 100
    assert received == [], "nothing delivered, nothing acked"
    # The next invocation starts the app again, and it runs.
    assert len((await handler.handle(one_record(), Context(0.6)))["batchItemFailures"]) == 1
    assert len(received) == 1
    await handler.aclose()


def test_a_failed_startup_ends_its_lifespan_call_and_close_leaves_nothing_pending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    running: list[int] = []
    cleaned: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            n = len(cleaned) + len(running) + 1
            running.append(n)
            try:
                await receive()
                if n == 1:
                    await send({"type": "lifespan.startup.failed", "message": "db down"})
                    await receive()  # as a lifespan loop does: waits for what comes next
                    return
                await send({"type": "lifespan.startup.complete"})
                await receive()
                await send({"type": "lifespan.shutdown.complete"})
            finally:
                running.remove(n)
                cleaned.append(n)
            return
        event = await receive()
        if event["payload"] == b"stubborn":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await asyncio.sleep(30)  # ignores the deadline's cancellation
        await send({"type": "message.ack", "id": event["id"]})

    handler = SqsHandler(app, handle_sigterm=False, deadline_margin=0.4)
    with pytest.raises(StartupFailed, match="db down"):
        handler(one_record(), None)
    assert running == []
    assert cleaned == [1], "the failed lifespan call was cancelled and its cleanup ran"
    assert handler(one_record(), None) == {"batchItemFailures": []}
    assert running == [2]
    # A call abandoned at the deadline is still on the loop when the container ends.
    stubborn = one_record()
    stubborn["Records"][0]["body"] = "stubborn"
    stubborn["Records"][0].pop("md5OfBody")
    assert len(handler(stubborn, Context(0.7))["batchItemFailures"]) == 1
    start = time.monotonic()
    handler.close()
    assert time.monotonic() - start < 5
    assert running == []
    assert cleaned == [1, 2]
    gc.collect()
    problems = [
        r.getMessage()
        for r in caplog.records
        if "destroyed but it is pending" in r.getMessage()
        or "Event loop is closed" in str(r.exc_info)
    ]
    assert problems == []
