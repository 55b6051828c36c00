"""A poison message takes nothing innocent with it (in-process, memory and scripted)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest

from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport
from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope


class PoisonApp:
    """Receives, acks each message, raises on a message whose payload is ``bad``.

    ``gather`` makes it receive the whole batch before handling any message (an app that
    works on the batch as a whole): then only bisection can find the culprit.
    """

    def __init__(self, gather: bool = False) -> None:
        self.gather = gather
        self.calls = 0
        self.seen: list[tuple[bytes, int]] = []
        self.acked: list[bytes] = []

    async def __call__(
        self, scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable
    ) -> None:
        if scope["type"] != "message":
            return
        self.calls += 1
        batch: list[Any] = []
        more = True
        while more:
            m: Any = await receive()
            self.seen.append((m["payload"], m["bindings"]["amgi"]["attempt"]))
            more = m["more_messages"]
            batch.append(m)
            if not self.gather:
                await self.handle(m, send)
        if self.gather:
            for m in batch:
                if m["payload"] == b"bad":
                    raise ValueError("cannot parse b'bad'")
            for m in batch:
                await self.handle(m, send)

    async def handle(self, m: Any, send: AMGISendCallable) -> None:
        if m["payload"] == b"bad":
            raise ValueError("cannot parse b'bad'")
        await send({"type": "message.ack", "id": m["id"]})
        self.acked.append(m["payload"])


CONFIG = RuntimeConfig(lifespan="off", max_attempts=5, retry_delay=0.01, retry_delay_max=0.02)


async def run_on_memory(app: Any, payloads: list[bytes], batch_size: int) -> MemoryBroker:
    name = f"iso-{uuid.uuid4().hex[:8]}"
    broker = MemoryBroker.reset(name)
    for p in payloads:
        broker.put("q", [], p)
    transport = MemoryTransport(["q"], MemoryOptions(broker=name, batch_size=batch_size))
    runtime = Runtime(app, transport, CONFIG)
    task = asyncio.create_task(runtime.serve())
    deadline = asyncio.get_running_loop().time() + 20
    while len(broker.dead.get("q", [])) < 1 or broker.pending("q") or transport._in_flight:
        assert asyncio.get_running_loop().time() < deadline, "the queue did not settle"
        await asyncio.sleep(0.01)
    runtime.request_stop()
    assert await asyncio.wait_for(task, 10) == 0
    return broker


def payloads_with_poison(n: int, at: int) -> list[bytes]:
    return [b"bad" if i == at else f"m{i:03d}".encode() for i in range(n)]


async def test_the_issue_scenario_one_poison_in_300_leaves_exactly_one_dead_letter() -> None:
    app = PoisonApp()
    payloads = payloads_with_poison(300, 150)
    broker = await run_on_memory(app, payloads, batch_size=100)
    dead = broker.dead["q"]
    assert [(m.payload, m.attempt) for m, _ in dead] == [(b"bad", 5)]
    assert "ValueError: cannot parse" in dead[0][1]
    assert sorted(app.acked) == sorted(p for p in payloads if p != b"bad")
    innocent_attempts = {a for p, a in app.seen if p != b"bad"}
    assert innocent_attempts == {1}, "a message the app never received used up an attempt"


async def test_a_batch_that_fails_as_a_whole_is_bisected_to_its_culprit() -> None:
    app = PoisonApp(gather=True)
    payloads = payloads_with_poison(64, 37)
    broker = await run_on_memory(app, payloads, batch_size=64)
    assert [m.payload for m, _ in broker.dead["q"]] == [b"bad"]
    assert sorted(app.acked) == sorted(p for p in payloads if p != b"bad")
    # The first delivery: 1 call, then halves down to the culprit (6 levels, 2 calls
    # each); then 4 more deliveries of the culprit alone.
    assert app.calls <= 1 + 2 * 6 + 4


async def test_explicit_nacks_are_the_apps_verdict_and_not_called_again() -> None:
    calls: list[list[bytes]] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        seen: list[bytes] = []
        calls.append(seen)
        more = True
        while more:
            m: Any = await receive()
            seen.append(m["payload"])
            more = m["more_messages"]
            if m["payload"] == b"no":
                await send({"type": "message.nack", "id": m["id"], "message": "refused"})
            else:
                await send({"type": "message.ack", "id": m["id"]})

    broker = await run_on_memory(app, [b"a", b"no", b"b"], batch_size=10)
    assert calls[0] == [b"a", b"no", b"b"]
    assert all(c == [b"no"] for c in calls[1:]), "acked messages were called again"
    assert len(calls) == 5
    assert [(m.payload, r) for m, r in broker.dead["q"]] == [(b"no", "refused")]


async def test_a_call_that_receives_nothing_is_bounded_by_attempts() -> None:
    calls = 0

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        nonlocal calls
        if scope["type"] != "message":
            return
        calls += 1
        if scope["address"] == "q":
            raise RuntimeError("database down")

    broker = await run_on_memory(app, [b"x", b"y"], batch_size=10)
    assert sorted(m.payload for m, _ in broker.dead["q"]) == [b"x", b"y"]
    assert all("RuntimeError: database down" in r for _, r in broker.dead["q"])
    # Nothing to isolate when nothing was received: one call for the first delivery,
    # then one per redelivered message (a redelivered message is delivered alone).
    assert calls == 1 + 2 * 4


async def test_nack_without_retry_dead_letters_at_once_and_is_advertised() -> None:
    scopes: list[Any] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        scopes.append(scope)
        more = True
        while more:
            m: Any = await receive()
            more = m["more_messages"]
            if m["payload"] == b"final":
                await send(
                    {"type": "message.nack", "id": m["id"], "message": "schema", "retry": False}
                )
            else:
                await send({"type": "message.ack", "id": m["id"]})

    broker = await run_on_memory(app, [b"ok", b"final"], batch_size=10)
    assert [(m.payload, m.attempt, r) for m, r in broker.dead["q"]] == [(b"final", 1, "schema")]
    assert all(s["extensions"]["message.nack.retry"] == {} for s in scopes)


async def test_a_failure_that_is_no_messages_fault_costs_few_calls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        nonlocal calls
        if scope["type"] != "message":
            return
        calls += 1
        more = True
        while more:
            m: Any = await receive()
            more = m["more_messages"]
        raise ConnectionError("database down")

    name = f"iso-{uuid.uuid4().hex[:8]}"
    broker = MemoryBroker.reset(name)
    for i in range(100):
        broker.put("q", [], b"%d" % i)
    transport = MemoryTransport(["q"], MemoryOptions(broker=name, batch_size=100))
    config = RuntimeConfig(lifespan="off", max_attempts=2, retry_delay=30)
    runtime = Runtime(app, transport, config)
    task = asyncio.create_task(runtime.serve())
    # Every message back in the broker, waiting for its retry (none ready, none in flight).
    while calls == 0 or broker.pending("q") < 100 or broker.queue("q"):
        await asyncio.sleep(0.01)
    runtime.request_stop()
    assert await asyncio.wait_for(task, 10) == 0
    # The first call, then at most 2 * (100).bit_length() = 14 failing calls while
    # isolating, plus one last call per group still queued: far below 2n - 1 = 199.
    assert calls <= 1 + 14 + 7, calls
    tracebacks = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert len(tracebacks) == 1, "one traceback per delivery, not one per isolating call"


async def test_at_shutdown_messages_never_received_are_handed_back_not_dead_lettered() -> None:
    from tests.core.test_runtime import Scripted, batch

    in_hands = asyncio.Event()

    async def slow(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        await receive()
        in_hands.set()
        await asyncio.sleep(3600)

    # On their last attempt: redelivered messages are delivered one per call, so only
    # the first is in the app's hands when the shutdown cancels the call.
    t = Scripted([batch("a", b"1", b"2", b"3", attempt=5)])
    runtime = Runtime(slow, t, RuntimeConfig(lifespan="off", max_attempts=5, shutdown_timeout=0.1))
    task = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(in_hands.wait(), 10)
    runtime.request_stop()
    assert await asyncio.wait_for(task, 10) == 0
    ((_, settlement),) = t.settled
    assert [(d.message.payload, d.reason) for d in settlement.dead] == [
        (b"1", "the application call was cancelled (shutdown or deadline)")
    ]
    assert [(r.message.payload, r.delay) for r in settlement.retry] == [(b"2", 0.0), (b"3", 0.0)]
    assert all(r.reason.startswith("not received by the application") for r in settlement.retry)
