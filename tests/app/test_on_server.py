"""amgi.app on the in-memory server: what reaches the broker, the retries and the dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import pytest
from pydantic import BaseModel

from amgi.app import App, Depends, State
from amgi.errors import StartupFailed
from amgi.runtime.config import RuntimeConfig
from amgi.runtime.server import Runtime
from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport

JSON = [(b"content-type", b"application/json")]


@contextlib.asynccontextmanager
async def serving(app: App, broker: str, addresses: list[str]) -> AsyncIterator[None]:
    """``app`` consuming ``addresses`` of the named memory broker for the block."""
    config = RuntimeConfig(max_attempts=3, retry_delay=0.01, retry_delay_max=0.05, crash_ledger="")
    transport = MemoryTransport(addresses, MemoryOptions(broker=broker))
    runtime = Runtime(app, transport, config)
    task = asyncio.create_task(runtime.serve())
    started = asyncio.create_task(runtime.started.wait())
    await asyncio.wait({task, started}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert started.done(), task.result() if task.done() else "the server did not start"
    try:
        yield
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(task, 30) == 0


async def until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def new_broker() -> tuple[str, MemoryBroker]:
    name = f"app-{uuid.uuid4().hex[:8]}"
    return name, MemoryBroker.reset(name)


async def test_a_dependency_gets_the_address_parameter_in_its_declared_type() -> None:
    name, broker = new_broker()
    app = App()
    seen: list[str] = []

    def shard_db(shard: int) -> str:
        return f"db{shard + 1}"

    @app.subscriber("events.{shard}")
    async def on_event(payload: dict[str, int], db: Annotated[str, Depends(shard_db)]) -> None:
        seen.append(db)

    broker.put("events.7", JSON, b"{}")
    broker.put("events.abc", JSON, b"{}")
    async with serving(app, name, ["events.7", "events.abc"]):
        await until(lambda: bool(seen) and bool(broker.dead.get("events.abc")), "both")
    assert seen == ["db8"]
    ((message, reason),) = broker.dead["events.abc"]
    assert message.attempt == 1  # never worth a retry: dead-lettered at once
    assert reason == (
        "test_a_dependency_gets_the_address_parameter_in_its_declared_type.<locals>.on_event: "
        "address parameter 'shard'='abc': (root): Input should be a valid integer, "
        "unable to parse string as an integer"
    )


async def test_a_decoder_that_raises_dead_letters_that_message_only() -> None:
    name, broker = new_broker()
    app = App(decoders={"application/x-j": json.loads})
    calls: list[list[dict[str, int]]] = []

    @app.subscriber("batch", batch=True)
    async def on_batch(items: list[dict[str, int]]) -> None:
        calls.append(items)

    custom = [(b"content-type", b"application/x-j")]
    for payload in (b'{"n": 1}', b"{not json", b'{"n": 3}'):
        broker.put("batch", custom, payload)
    async with serving(app, name, ["batch"]):
        await until(lambda: bool(calls) and bool(broker.dead.get("batch")), "the batch")
        await asyncio.sleep(0.1)  # nothing comes back for a second call
    assert calls == [[{"n": 1}, {"n": 3}]]
    ((message, reason),) = broker.dead["batch"]
    assert message.payload == b"{not json"
    assert message.attempt == 1
    assert reason.startswith("invalid payload for ")
    assert reason.endswith(
        "parameter 'items': content-type 'application/x-j': the decoder raised "
        "JSONDecodeError: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)"
    )
    assert broker.pending("batch") == 0


class Invoice(BaseModel):
    total: float


async def test_yield_cleanup_runs_after_the_result_is_published() -> None:
    name, broker = new_broker()
    app = App()
    log: list[str] = []

    async def transaction() -> AsyncIterator[str]:
        log.append("begin")
        try:
            yield "tx"
        except Exception as exc:
            log.append(f"rollback {type(exc).__name__}")
            raise
        log.append(f"commit with {broker.pending('invoices')} invoice(s) published")

    @app.subscriber("orders", publish_to="invoices")
    async def on_order(order: dict[str, Any], tx: Annotated[str, Depends(transaction)]) -> Invoice:
        return order["result"]  # type: ignore[no-any-return]

    broker.put("orders", JSON, b'{"result": {"total": 2}}')
    async with serving(app, name, ["orders"]):
        await until(lambda: len(log) == 2, "the first order")
        broker.put("orders", JSON, b'{"result": {"wrong": 1}}')
        await until(lambda: bool(broker.dead.get("orders")), "the dead letter")
    assert log[:2] == ["begin", "commit with 1 invoice(s) published"]
    assert log[2:] == ["begin", "rollback ValidationError"] * 3  # each attempt rolls back
    ((message, reason),) = broker.dead["orders"]
    assert message.attempt == 3
    assert reason.endswith(
        "its result could not be serialized, nothing was published: "
        "ValidationError: total: Field required"
    )
    assert [m.payload for m in broker.queue("invoices")] == [b'{"total":2.0}']


class Order(BaseModel):
    id: int


async def test_a_broken_handler_without_lifespan_stops_the_run_and_loses_nothing() -> None:
    name, broker = new_broker()
    app = App()

    @app.subscriber("orders")
    async def on_order(order: Order, other: Order) -> None: ...

    for n in range(3):
        broker.put("orders", JSON, b'{"id": %d}' % n)
    broker.put("refunds", JSON, b'{"id": 9}')
    config = RuntimeConfig(max_attempts=2, retry_delay=0, crash_ledger="", lifespan="off")
    options = MemoryOptions(broker=name, batch_size=2)
    runtime = Runtime(app, MemoryTransport(["orders", "refunds"], options), config)
    with pytest.raises(StartupFailed) as info:
        await asyncio.wait_for(runtime.serve(), 20)
    assert ".on_order, parameter 'other': a second payload parameter" in str(info.value)
    assert broker.dead == {}
    await asyncio.sleep(0.01)
    broker.promote_due()  # (handed back with no delay)
    left = [*broker.queue("orders"), *broker.queue("refunds")]
    assert sorted(m.payload or b"" for m in left) == [b'{"id": %d}' % n for n in (0, 1, 2, 9)]
    assert {m.attempt for m in left} == {1}  # the app never had them


async def test_a_handler_needing_the_lifespan_state_without_lifespan_stops_the_run() -> None:
    name, broker = new_broker()

    @contextlib.asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[dict[str, Any]]:
        yield {"pool": "db"}

    app = App(lifespan=lifespan)

    async def session(pool: Annotated[str, State("pool")]) -> str:
        return pool

    @app.subscriber("orders")
    async def on_order(order: Order, db: Annotated[str, Depends(session)]) -> None: ...

    broker.put("orders", JSON, b'{"id": 1}')
    config = RuntimeConfig(max_attempts=2, retry_delay=0, crash_ledger="", lifespan="off")
    runtime = Runtime(app, MemoryTransport(["orders"], MemoryOptions(broker=name)), config)
    with pytest.raises(StartupFailed) as info:
        await asyncio.wait_for(runtime.serve(), 20)
    assert str(info.value).endswith(
        ".session, parameter 'pool': State('pool') is not in the lifespan state: the app "
        "runs without lifespan (the server's lifespan is off), so its lifespan did not run"
    )
    assert broker.dead == {}
    await asyncio.sleep(0.01)
    broker.promote_due()
    assert [(m.payload, m.attempt) for m in broker.queue("orders")] == [(b'{"id": 1}', 1)]


async def test_a_sync_handler_stuck_at_the_stop_is_abandoned_not_left_unowned() -> None:
    name, broker = new_broker()
    app = App()
    release = threading.Event()
    started = threading.Event()

    @app.subscriber("orders")
    def on_order(order: Order) -> None:
        started.set()
        release.wait(30)  # a blocking call without timeout: the thread cannot be cancelled

    broker.put("orders", JSON, b'{"id": 1}')
    config = RuntimeConfig(crash_ledger="", shutdown_timeout=0.2, cancel_grace=0.2)
    transport = MemoryTransport(["orders"], MemoryOptions(broker=name))
    runtime = Runtime(app, transport, config, handle_signals=False)
    task = asyncio.create_task(runtime.serve())
    try:
        await until(started.is_set, "the handler")
        runtime.request_stop()
        # The call returned at the cancel, its thread still running: nothing owned the
        # thread, and the process hung at exit waiting for it (asyncio's executor).
        code = await asyncio.wait_for(task, 20)
        assert runtime.abandoned
        assert code == 1
        assert broker.dead == {}
    finally:
        release.set()


@pytest.mark.parametrize("lifespan", ["on", "off"])
async def test_an_app_without_handlers_does_not_start(lifespan: str) -> None:
    name, broker = new_broker()
    app = App(title="billing")  # its handlers sit in a module nothing imported
    for n in range(3):
        broker.put("orders", JSON, b'{"id": %d}' % n)
    config = RuntimeConfig(max_attempts=2, retry_delay=0, crash_ledger="", lifespan=lifespan)
    runtime = Runtime(app, MemoryTransport(["orders"], MemoryOptions(broker=name)), config)
    with pytest.raises(StartupFailed) as info:
        await asyncio.wait_for(runtime.serve(), 20)
    assert str(info.value) == (
        "App 'billing' has no handler, so it can handle no message: subscribe functions "
        "with @app.subscriber(...) in the module of the app, or in one it imports"
    )
    assert broker.dead == {}
    await asyncio.sleep(0.01)
    broker.promote_due()
    left = broker.queue("orders")
    assert sorted(m.payload or b"" for m in left) == [b'{"id": %d}' % n for n in range(3)]
    assert {m.attempt for m in left} == {1}
