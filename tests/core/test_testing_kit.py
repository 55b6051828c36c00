"""amgi.testing: drive an app without a server."""

from __future__ import annotations

from typing import Any

import pytest

from amgi.errors import StartupFailed
from amgi.runtime import RuntimeConfig
from amgi.testing import LifespanRunner, message, run_batch
from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope


async def handler(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
    more = True
    while more:
        m: Any = await receive()
        if m["payload"] == b"bad":
            await send({"type": "message.nack", "id": m["id"], "message": "bad payload"})
        elif m["payload"] == b"skip":
            pass
        else:
            await send(
                {
                    "type": "message.send",
                    "address": "out",
                    "headers": m["headers"],
                    "payload": m["payload"].upper(),
                }
            )
            await send({"type": "message.ack", "id": m["id"]})
        more = m["more_messages"]


async def test_run_batch_reports_acks_nacks_unsettled_and_sends() -> None:
    result = await run_batch(
        handler,
        [message(b"hi", [(b"k", b"v")]), message(b"bad"), message(b"skip")],
        config=RuntimeConfig(max_attempts=1),
    )
    assert result.acked == ["1"]
    assert result.nacked == {"2": "bad payload"}
    assert result.unsettled == ["3"]
    assert [(s.address, s.payload, s.headers) for s in result.sent] == [
        ("out", b"HI", [(b"k", b"v")])
    ]
    assert result.error is None
    assert [d.reason for d in result.settlement.dead] == [
        "bad payload",
        "not acked or nacked by the application",
    ]


async def test_run_batch_captures_exceptions_and_send_errors() -> None:
    result = await run_batch(handler, [message(b"x")], send_error=OSError("down"))
    assert isinstance(result.error, OSError)
    assert result.unsettled == ["1"]
    assert "OSError: down" in result.settlement.retry[0].reason


async def test_lifespan_runner_gives_state_and_reports_failure() -> None:
    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        event = await receive()
        if event["type"] == "lifespan.startup":
            scope["state"]["n"] = 1  # type: ignore[typeddict-item]
            await send({"type": "lifespan.startup.complete"})
        event = await receive()
        await send({"type": "lifespan.shutdown.complete"})

    runner = LifespanRunner(app)
    async with runner as state:
        assert state == {"n": 1}
    assert runner.shutdown_ok is True

    async def failing(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "nope"})

    with pytest.raises(StartupFailed, match="nope"):
        async with LifespanRunner(failing):
            raise AssertionError("startup should have failed")
