"""Depends (sync, async, generators with cleanup, cached, nested), lifespan state, fixture."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import pytest
from pydantic import BaseModel

from amgi.app import (
    App,
    AppDefinitionError,
    Depends,
    Failures,
    Header,
    MessageInfo,
    PayloadError,
    State,
)
from amgi.app.testing import TestClient
from amgi.errors import StartupFailed

pytest_plugins = ["amgi.app.pytest_plugin"]


class Order(BaseModel):
    id: int


async def test_dependencies_nested_cached_with_cleanup_after_the_handler() -> None:
    log: list[str] = []
    calls = {"settings": 0}

    def settings(region: Annotated[str, Header("region")]) -> dict[str, str]:
        calls["settings"] += 1
        log.append(
            f"settings in thread {threading.current_thread() is not threading.main_thread()}"
        )
        return {"region": region}

    async def connection(s: Annotated[dict[str, str], Depends(settings)]) -> AsyncIterator[str]:
        log.append("connect")
        try:
            yield f"conn-{s['region']}"
        except Exception as exc:
            log.append(f"rollback {exc}")
            raise
        finally:
            log.append("disconnect")

    def sync_session(conn: Annotated[str, Depends(connection)]) -> Iterator[str]:
        log.append("session open")
        yield f"session({conn})"
        log.append("session close")

    async def user(s: Annotated[dict[str, str], Depends(settings)]) -> str:
        return f"user@{s['region']}"

    app = App()

    @app.subscriber("orders")
    async def on_order(
        order: Order,
        session: Annotated[str, Depends(sync_session)],
        who: str = Depends(user),
        again: dict[str, str] = Depends(settings),
    ) -> None:
        log.append(f"handler {order.id} {session} {who} {again['region']}")
        if order.id == 0:
            raise ValueError("zero")

    async with TestClient(app) as client:
        ok = await client.publish("orders", Order(id=1), headers={"region": "eu"})
        assert ok.acked
        assert calls["settings"] == 1  # cached within the message
        assert log == [
            "settings in thread True",
            "connect",
            "session open",
            "handler 1 session(conn-eu) user@eu eu",
            "session close",
            "disconnect",
        ]
        log.clear()
        failed = await client.publish("orders", Order(id=0), headers={"region": "us"})
    assert not failed.acked
    assert (failed.reason or "").endswith("raised ValueError: zero")
    assert calls["settings"] == 2  # a new message computes it again
    assert log[-2:] == ["rollback zero", "disconnect"]


async def test_use_cache_false_computes_per_use() -> None:
    counter = {"n": 0}

    async def tick() -> int:
        counter["n"] += 1
        return counter["n"]

    app = App()

    @app.subscriber("in")
    async def on_in(
        body: bytes,
        a: int = Depends(tick, use_cache=False),
        b: int = Depends(tick, use_cache=False),
    ) -> None:
        assert a != b

    async with TestClient(app) as client:
        assert (await client.publish("in", b"")).acked


def make_app(events: list[str]) -> App:
    @contextlib.asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[dict[str, Any]]:
        events.append(f"start {app.title}")
        yield {"pool": ["conn"], "rate": 3}
        events.append("stop")

    app = App(title="billing", lifespan=lifespan)

    async def rate_dep(rate: Annotated[int, State()]) -> int:
        return rate * 10

    @app.subscriber("in")
    async def on_in(
        order: Order,
        pool: Annotated[list[str], State("pool")],
        scaled: int = Depends(rate_dep),
    ) -> None:
        events.append(f"handle {order.id} {pool} {scaled}")

    return app


async def test_lifespan_state_is_injectable_and_travels_as_amgi_state() -> None:
    events: list[str] = []
    app = make_app(events)
    async with TestClient(app) as client:
        assert (await client.publish("in", Order(id=4))).acked
    assert events == ["start billing", "handle 4 ['conn'] 30", "stop"]


async def test_lifespan_failure_fails_startup() -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[None]:
        raise ConnectionError("database unreachable")
        yield

    app = App(lifespan=lifespan)
    with pytest.raises(StartupFailed, match="ConnectionError: database unreachable"):
        async with TestClient(app):
            pass


async def test_a_state_key_the_lifespan_does_not_yield_fails_startup() -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[dict[str, Any]]:
        yield {"rate": 3}

    app = App(lifespan=lifespan)

    async def session(pool: Annotated[Any, State("pool")]) -> Any:
        return pool

    @app.subscriber("in")
    async def on_in(body: bytes, db: Annotated[Any, Depends(session)]) -> None: ...

    with pytest.raises(StartupFailed) as info:
        async with TestClient(app):
            pass
    assert str(info.value).endswith(
        ".session, parameter 'pool': State('pool') is not in the lifespan state (it holds "
        "'rate'); yield it from the App's lifespan, or give the parameter a default"
    )


async def test_a_state_key_with_a_default_may_be_missing() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(body: bytes, pool: Annotated[Any, State("pool")] = None) -> None:
        assert pool is None

    async with TestClient(app) as client:
        assert (await client.publish("in", b"")).acked


@pytest.fixture
def amgi_app() -> App:
    return make_app([])


async def test_pytest_fixture(amgi_client: TestClient) -> None:
    result = await amgi_client.publish("in", Order(id=1))
    assert result.acked
    result = await amgi_client.publish("in", b'{"id": "x"}')
    assert result.dead_lettered
    assert "id: Input should be a valid integer" in (result.reason or "")


async def test_lifespan_that_yields_no_mapping_fails_startup() -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[Any]:
        yield ["not", "a", "mapping"]

    with pytest.raises(StartupFailed, match=r"the lifespan must yield a mapping .* not list"):
        async with TestClient(App(lifespan=lifespan)):
            pass


async def test_cleanup_sees_a_failed_publish_and_a_swallowed_error_still_nacks() -> None:
    from amgi.runtime.batch import call_app
    from amgi.runtime.config import RuntimeConfig
    from amgi.transport import Batch, Message

    log: list[str] = []

    async def transaction() -> AsyncIterator[str]:
        try:
            yield "tx"
        except Exception as exc:
            log.append(f"rollback {type(exc).__name__}")  # and forgets to re-raise
        else:
            log.append("commit")

    app = App()
    calls = {"n": 0}

    @app.subscriber("orders", publish_to="invoices")
    async def on_order(order: Order, tx: Annotated[str, Depends(transaction)]) -> Order:
        calls["n"] += 1
        if order.id == 0:
            raise ValueError("zero")
        return order

    async def broker_down(*args: Any) -> None:
        raise ConnectionRefusedError("broker down")

    async with TestClient(app) as client:
        settlement = await call_app(
            app,
            Batch("orders", [Message("1", [], b'{"id": 1}', {}, 1)]),
            broker_down,
            RuntimeConfig(),
        )
        assert settlement.retry[0].reason.endswith("raised ConnectionRefusedError: broker down")
        assert log == ["rollback ConnectionRefusedError"]
        failed = await client.publish("orders", Order(id=0))
        assert (failed.reason or "").endswith("raised ValueError: zero")  # not acked
        assert calls["n"] == 2  # the handler ran once per message
        ok = await client.publish("orders", Order(id=2))
    assert ok.acked
    assert log == ["rollback ConnectionRefusedError", "rollback ValueError", "commit"]


async def test_each_call_next_gets_fresh_dependencies() -> None:
    log: list[str] = []
    opened = {"n": 0}

    async def connection() -> AsyncIterator[int]:
        opened["n"] += 1
        n = opened["n"]
        log.append(f"open {n}")
        try:
            yield n
        except Exception as exc:
            log.append(f"rollback {n}: {exc}")
            raise
        log.append(f"close {n}")

    def settings() -> dict[str, int]:
        return {"calls": opened["n"]}

    async def retry_once(call: Any, call_next: Any) -> Any:
        try:
            return await call_next()
        except ConnectionError:
            log.append("retry")
            return await call_next()

    app = App(middleware=[retry_once])

    @app.subscriber("orders", publish_to="out")
    async def on_order(
        order: Order,
        conn: Annotated[int, Depends(connection)],
        s: Annotated[dict[str, int], Depends(settings)],
    ) -> int:
        log.append(f"handler with {conn}, settings {s}")
        if conn == 1:
            raise ConnectionError("deadlock")
        return conn

    async with TestClient(app) as client:
        result = await client.publish("orders", Order(id=1))
    assert result.acked, result.reason
    assert [s.payload for s in result.sent] == [b"2"]
    assert log == [
        "open 1",
        "handler with 1, settings {'calls': 1}",
        "rollback 1: deadlock",
        "retry",
        "open 2",
        "handler with 2, settings {'calls': 2}",
        "close 2",
    ]


async def test_conflicting_address_parameter_types_fail_at_startup() -> None:
    def shard_db(shard: int) -> str:
        return f"db{shard}"

    app = App()

    @app.subscriber("events.{shard}")
    async def on_event(body: bytes, shard: str, db: Annotated[str, Depends(shard_db)]) -> None: ...

    with pytest.raises(StartupFailed) as info:
        async with TestClient(app):
            pass
    assert str(info.value) == (
        "test_conflicting_address_parameter_types_fail_at_startup.<locals>.on_event: "
        "address parameter {shard} is str in "
        "test_conflicting_address_parameter_types_fail_at_startup.<locals>.on_event but int in "
        "test_conflicting_address_parameter_types_fail_at_startup.<locals>.shard_db; "
        "declare one type"
    )


class Tenant:
    def __init__(self, tenant: Annotated[str, Header("tenant")], region: str) -> None:
        self.name = f"{tenant}@{region}"


@dataclasses.dataclass
class Paging:
    limit: Annotated[int, Header("limit")] = 10


async def test_classes_and_dataclasses_are_dependencies() -> None:
    app = App()
    seen: list[Any] = []

    @app.subscriber("orders.{region}")
    async def on_order(
        order: Order,
        tenant: Annotated[Tenant, Depends(Tenant)],
        paging: Paging = Depends(Paging),
    ) -> None:
        seen.append((tenant.name, paging))

    async with TestClient(app) as client:
        assert (await client.publish("orders.eu", Order(id=1), headers={"tenant": "acme"})).acked
        got = await client.publish("orders.eu", Order(id=1), headers={"tenant": "b", "limit": "5"})
        assert got.acked, got.reason
    assert seen == [("acme@eu", Paging(10)), ("b@eu", Paging(5))]


async def test_a_batch_dependency_gets_the_infos_and_failures() -> None:
    app = App()

    def ids(infos: list[MessageInfo]) -> list[str]:
        return [info.id for info in infos]

    def fail_first(failures: Failures) -> Failures:
        failures.fail(0, "first item refused")
        return failures

    seen: list[list[str]] = []

    @app.subscriber("many", batch=True)
    async def on_many(
        items: list[int],
        got: Annotated[list[str], Depends(ids)],
        failures: Annotated[Failures, Depends(fail_first)],
    ) -> None:
        seen.append(got)

    async with TestClient(app) as client:
        results = await client.publish_batch("many", [1, 2])
    assert seen == [[r.id for r in results]]
    assert [r.acked for r in results] == [False, True]
    assert (results[0].reason or "").endswith("on_many: first item refused")
    assert not results[0].dead_lettered


@pytest.mark.parametrize("batch", [False, True])
async def test_a_dependency_raising_payload_error_dead_letters_alike_in_batches(
    batch: bool,
) -> None:
    """A dependency that finds the message unusable raises ``PayloadError``: dead-lettered
    at once with its reason. A batch handler retried it instead, with an internal class
    name for the reason (``on_b raised _Invalid: ...``)."""
    app = App()

    def tenant() -> int:
        raise PayloadError("bad tenant")

    if batch:

        @app.subscriber("b", batch=True)
        async def on_b(items: list[dict[str, Any]], t: Annotated[int, Depends(tenant)]) -> None:
            pass

    else:

        @app.subscriber("b")
        async def on_b(item: dict[str, Any], t: Annotated[int, Depends(tenant)]) -> None:
            pass

    async with TestClient(app) as client:
        result = await client.publish("b", {})
    assert (result.acked, result.dead_lettered) == (False, True)
    assert (result.reason or "").endswith(".on_b: bad tenant"), result.reason


async def test_a_cancelled_sync_generator_setup_is_still_cleaned_up() -> None:
    log: list[str] = []
    started, release = threading.Event(), threading.Event()

    def connection() -> Iterator[str]:
        started.set()
        release.wait(5)
        log.append("acquired")
        try:
            yield "conn"
        except BaseException as exc:  # not GeneratorExit: the exit stack, not the GC
            log.append(f"released after {type(exc).__name__}")
            raise

    app = App()

    @app.subscriber("in")
    async def on_in(body: bytes, conn: Annotated[str, Depends(connection)]) -> None:
        log.append("handler")

    async with TestClient(app) as client:
        call = asyncio.create_task(client.publish("in"))
        assert await asyncio.to_thread(started.wait, 5)
        call.cancel()  # while the setup runs in its thread
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert log == ["acquired", "released after CancelledError"]


async def test_a_lifespan_that_is_no_context_manager_gets_one_clear_error() -> None:
    async def undecorated(app: App) -> AsyncIterator[dict[str, Any]]:
        yield {"pool": 1}

    with pytest.raises(AppDefinitionError) as info:
        App(lifespan=undecorated)  # type: ignore[arg-type]
    assert str(info.value).endswith(
        ".undecorated is an async generator function: decorate it with "
        "@contextlib.asynccontextmanager"
    )

    async def plain(app: App) -> dict[str, Any]:
        return {"pool": 1}

    with pytest.raises(StartupFailed) as failed:
        async with TestClient(App(lifespan=plain)):  # type: ignore[arg-type]
            pass
    assert str(failed.value).endswith(
        ".plain returned a coroutine, not an async context manager: make it an async "
        "generator that yields the state, decorated with @contextlib.asynccontextmanager"
    )
