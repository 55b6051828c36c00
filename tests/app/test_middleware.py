"""amgi.app middleware: call_next() called again, concurrently, late, or left running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import pytest

from amgi.app import App, Depends, Failures, HandlerCall, Publisher
from amgi.app.testing import TestClient
from amgi.errors import StartupFailed

CallNext = Callable[[], Awaitable[Any]]


def tracked(log: list[str]) -> Callable[[], AsyncIterator[int]]:
    """A yield dependency that logs its opening and how it was cleaned up."""
    opened = [0]

    async def resource() -> AsyncIterator[int]:
        opened[0] += 1
        n = opened[0]
        log.append(f"open {n}")
        try:
            yield n
        except BaseException as exc:
            log.append(f"cleanup {n} after {type(exc).__name__}")
            raise
        log.append(f"close {n}")

    return resource


async def test_concurrent_call_next_is_refused_naming_the_middleware() -> None:
    log: list[str] = []
    resource = tracked(log)

    async def twice_at_once(call: HandlerCall, call_next: CallNext) -> Any:
        return await asyncio.gather(call_next(), call_next())

    app = App(middleware=[twice_at_once])

    @app.subscriber("in", publish_to="out")
    async def on_in(n: int, r: Annotated[int, Depends(resource)], publisher: Publisher) -> int:
        log.append(f"handler {r}")
        await asyncio.sleep(0.01)
        await publisher.publish("side", n)
        return n

    async with TestClient(app) as client:
        result = await client.publish("in", 1)
        await asyncio.sleep(0.05)  # a call left running would publish now
    assert not result.acked
    assert not result.dead_lettered  # a bug in code: retried like any exception
    assert result.reason == (
        "test_concurrent_call_next_is_refused_naming_the_middleware.<locals>.on_in raised "
        "RuntimeError: middleware "
        "test_concurrent_call_next_is_refused_naming_the_middleware.<locals>.twice_at_once "
        "called call_next() while its previous call_next() was still running; "
        "call it again only after the previous call returned or raised"
    )
    # The first call was cancelled when the middleware gave up; nothing ran afterwards.
    assert log == ["open 1", "handler 1", "cleanup 1 after CancelledError"]
    assert client.sent == []


async def test_concurrent_call_next_in_a_task_group_names_the_middleware() -> None:
    async def both(call: HandlerCall, call_next: CallNext) -> Any:
        async with asyncio.TaskGroup() as group:
            group.create_task(call_next())
            group.create_task(call_next())

    app = App(middleware=[both])

    @app.subscriber("in")
    async def on_in(n: int) -> None:
        await asyncio.sleep(0.01)

    async with TestClient(app) as client:
        result = await client.publish("in", 1)
    assert not result.acked
    assert "raised RuntimeError: middleware " in (result.reason or "")
    assert "both called call_next() while its previous call_next() was still running" in (
        result.reason or ""
    )


async def test_call_next_after_the_call_ended_is_refused() -> None:
    kept: list[CallNext] = []
    handled: list[int] = []

    async def keeper(call: HandlerCall, call_next: CallNext) -> Any:
        kept.append(call_next)
        return await call_next()

    app = App(middleware=[keeper])

    @app.subscriber("in", publish_to="out")
    async def on_in(n: int) -> int:
        handled.append(n)
        return n

    async with TestClient(app) as client:
        assert (await client.publish("in", 7)).acked
        try:
            await kept[0]()
        except RuntimeError as exc:
            error = str(exc)
        else:
            error = "no error"
    assert error == (
        "middleware test_call_next_after_the_call_ended_is_refused.<locals>.keeper called "
        "call_next() after the handler call of "
        "test_call_next_after_the_call_ended_is_refused.<locals>.on_in had ended "
        "(its message was settled)"
    )
    assert handled == [7]
    assert [m.payload for m in client.sent] == [b"7"]


async def test_middleware_returning_while_its_call_next_runs_fails_the_message() -> None:
    log: list[str] = []
    resource = tracked(log)
    tasks: list[asyncio.Task[Any]] = []

    async def fire_and_forget(call: HandlerCall, call_next: CallNext) -> Any:
        tasks.append(asyncio.ensure_future(call_next()))
        await asyncio.sleep(0)  # the handler starts
        return None

    app = App(middleware=[fire_and_forget])

    @app.subscriber("in", publish_to="out")
    async def on_in(n: int, r: Annotated[int, Depends(resource)]) -> int:
        log.append("handler")
        await asyncio.sleep(0.01)
        log.append("handler done")
        return n

    async with TestClient(app) as client:
        result = await client.publish("in", 1)
        await asyncio.sleep(0.05)
    assert not result.acked
    assert (result.reason or "").endswith(
        "fire_and_forget returned while its call_next() was still running; "
        "await call_next() before returning"
    )
    assert log == ["open 1", "handler", "cleanup 1 after CancelledError"]
    assert tasks[0].cancelled()
    assert client.sent == []


async def test_retry_middleware_calls_call_next_again_with_fresh_state() -> None:
    """A sequential second call is supported: a retry, each call on its own."""
    log: list[str] = []
    resource = tracked(log)
    attempts: list[int] = []

    async def retry(call: HandlerCall, call_next: CallNext) -> Any:
        for attempt in range(3):
            try:
                return await call_next()
            except ConnectionError:
                log.append(f"retry after {attempt + 1}")
        raise ConnectionError("gave up")

    app = App(middleware=[retry])

    @app.subscriber("in", publish_to="out")
    async def on_in(n: int, r: Annotated[int, Depends(resource)]) -> int:
        attempts.append(r)
        if r < 3:
            raise ConnectionError("flaky")
        return n * 10

    async with TestClient(app) as client:
        result = await client.publish("in", 4)
    assert result.acked, result.reason
    assert attempts == [1, 2, 3]
    assert [m.payload for m in result.sent] == [b"40"]  # the returned result, once
    assert log == [
        "open 1",
        "cleanup 1 after ConnectionError",
        "retry after 1",
        "open 2",
        "cleanup 2 after ConnectionError",
        "retry after 2",
        "open 3",
        "close 3",
    ]


async def test_retry_of_a_batch_starts_with_fresh_failures() -> None:
    calls: list[int] = []

    async def retry_once(call: HandlerCall, call_next: CallNext) -> Any:
        try:
            return await call_next()
        except ConnectionError:
            return await call_next()

    app = App(middleware=[retry_once])

    @app.subscriber("many", batch=True)
    async def on_many(items: list[int], failures: Failures) -> None:
        calls.append(len(failures))
        if len(calls) == 1:
            failures.fail(0, "first attempt only")
            raise ConnectionError("flaky")

    async with TestClient(app) as client:
        results = await client.publish_batch("many", [1, 2])
    assert calls == [0, 0]
    assert [r.acked for r in results] == [True, True], [r.reason for r in results]


async def test_two_returned_calls_publish_the_result_the_middleware_returns() -> None:
    log: list[str] = []
    resource = tracked(log)

    async def compare(call: HandlerCall, call_next: CallNext) -> Any:
        first = await call_next()
        second = await call_next()
        log.append(f"results {first} {second}")
        return second

    app = App(middleware=[compare])

    @app.subscriber("in", publish_to="out")
    async def on_in(n: int, r: Annotated[int, Depends(resource)]) -> int:
        return n + r

    async with TestClient(app) as client:
        result = await client.publish("in", 10)
    assert result.acked
    assert [m.payload for m in result.sent] == [b"12"]
    # Both calls' cleanups run once the result is published, the last call's first.
    assert log == ["open 1", "open 2", "results 11 12", "close 2", "close 1"]


async def test_middleware_added_after_the_app_was_prepared_runs() -> None:
    seen: list[str] = []

    async def audit(call: HandlerCall, call_next: CallNext) -> Any:
        seen.append(call.handler.rsplit(".", 1)[-1])
        return await call_next()

    app = App()

    @app.subscriber("in")
    async def on_in(n: int) -> None: ...

    app.asyncapi()  # prepares the app: its only handler takes just the payload
    app.add_middleware(audit)
    async with TestClient(app) as client:
        assert (await client.publish("in", 1)).acked
    assert seen == ["on_in"]


async def test_a_middleware_that_cannot_be_called_so_fails_the_startup() -> None:
    def factory(app: Any) -> Any:  # an ASGI-style middleware factory
        return app

    def sync_and_done(call: HandlerCall, call_next: CallNext) -> None:
        return None  # no awaitable: the handler call cannot go on

    app = App(middleware=[factory])

    @app.subscriber("in")
    async def on_in(body: bytes) -> None: ...

    # Each message failed, then was dead-lettered, for a middleware it could not be served by.
    with pytest.raises(StartupFailed) as info:
        async with TestClient(app):
            pass
    assert str(info.value).endswith(
        "middleware test_a_middleware_that_cannot_be_called_so_fails_the_startup.<locals>."
        "factory cannot be called as middleware(call, call_next): too many positional "
        "arguments"
    )
    other = App(middleware=[sync_and_done])
    other.subscriber("in")(on_in)
    async with TestClient(other) as client:
        result = await client.publish("in", b"")
    assert not result.acked
    assert (result.reason or "").endswith(
        "sync_and_done returned NoneType, not an awaitable; make it an async def "
        "that returns await call_next()"
    )


async def test_an_error_of_a_middleware_names_the_middleware_not_the_handler() -> None:
    log: list[str] = []
    resource = tracked(log)

    async def audit(call: HandlerCall, call_next: CallNext) -> Any:
        result = await call_next()
        raise ConnectionError("audit log unreachable")
        return result

    async def passes_on(call: HandlerCall, call_next: CallNext) -> Any:
        try:
            return await call_next()
        except KeyError:
            raise
        except ConnectionError as exc:
            log.append(f"seen {exc}")
            raise

    app = App(middleware=[passes_on, audit])

    @app.subscriber("in")
    async def on_in(n: int, r: Annotated[int, Depends(resource)]) -> None:
        if n < 0:
            raise KeyError(n)

    @app.subscriber("batch", batch=True)
    async def on_batch(items: list[int]) -> None: ...

    async with TestClient(app) as client:
        result = await client.publish("in", 1)
        by_handler = await client.publish("in", -1)
        (in_batch,) = await client.publish_batch("batch", [1])
    where = "test_an_error_of_a_middleware_names_the_middleware_not_the_handler.<locals>"
    assert result.reason == (
        f"{where}.on_in: middleware {where}.audit raised ConnectionError: audit log unreachable"
    )
    assert not result.dead_lettered
    # The outer middleware saw the error as it was raised; so did the cleanup, once done.
    assert log[:3] == ["open 1", "seen audit log unreachable", "cleanup 1 after ConnectionError"]
    assert by_handler.reason == f"{where}.on_in raised KeyError: -1"
    assert in_batch.reason == (
        f"{where}.on_batch: middleware {where}.audit raised ConnectionError: audit log unreachable"
    )
