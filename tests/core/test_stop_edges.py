"""The stop at its edges: batches waiting for their ordering key, settles under way or
hanging, lease extensions and application calls that do not end the usual way."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest

from amgi.runtime import Runtime, RuntimeConfig, server
from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport
from amgi.servers.nats import NatsOptions, NatsTransport
from amgi.transport import Batch, Bindings, HeaderList, Message, Settlement, Transport

pytestmark = pytest.mark.timeout(30)


class OneBatch(Transport):
    """Hands out one batch of one message, then waits; records what was settled."""

    name = "one-batch"
    options = MemoryOptions

    def __init__(self) -> None:
        super().__init__(["a"], MemoryOptions())
        self.given = False
        self.acked: list[str] = []
        self.settling = asyncio.Event()
        self.closed = False

    async def connect(self) -> None:
        pass

    async def fetch(self) -> Sequence[Batch]:
        if not self.given:
            self.given = True
            return [Batch("a", [Message("1", [], b"x")])]
        await asyncio.sleep(3600)
        return []

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        self.settling.set()
        await asyncio.sleep(0.5)  # one slow broker round trip
        self.acked += [m.id for m in settlement.acked]

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        pass

    async def close(self) -> None:
        self.closed = True


async def stop_when(runtime: Runtime, ready: Awaitable[object], within: float = 10) -> int:
    """Serve ``runtime`` until ``ready`` is done, then stop it; its exit code (the stop
    must end within ``within`` seconds)."""
    served = asyncio.create_task(runtime.serve())
    await ready
    runtime.request_stop()
    return await asyncio.wait_for(served, within)


async def acking(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "message":
        event = await receive()
        await send({"type": "message.ack", "id": event["id"]})


class Holding:
    """An app whose calls receive one message (recorded in ``seen``), set ``holding``,
    and then hold on past any shutdown timeout."""

    def __init__(self) -> None:
        self.holding = asyncio.Event()
        self.seen: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        self.seen.append((await receive())["payload"])
        self.holding.set()
        await asyncio.sleep(30)


async def test_batches_waiting_for_their_key_at_a_stop_go_back_uncounted() -> None:
    """Three batches of one ordering key; the first holds the app past the shutdown
    timeout. The two waiting for their turn were cancelled unsettled: handed back at
    close with an attempt used up (the app never had them), and the cancel reached the
    turn of the batch before them (an ``InvalidStateError`` logged as a failed task).
    Now they go back uncounted, and nothing fails."""
    name = uuid.uuid4().hex
    broker = MemoryBroker.reset(name)
    for i in range(3):
        broker.put("q", [], b"%d" % i)
    app = Holding()
    transport = MemoryTransport(["q"], MemoryOptions(broker=name, batch_size=1))
    config = RuntimeConfig(lifespan="off", shutdown_timeout=0.2, concurrency=8)
    runtime = Runtime(app, transport, config)

    async def three_in_flight() -> None:
        await asyncio.wait_for(app.holding.wait(), 5)
        while runtime.in_flight < 3:  # the other two wait for their turn
            await asyncio.sleep(0.01)

    assert await stop_when(runtime, three_in_flight()) == 0
    back = [*broker.queues.get("q", ()), *(m for _, _, _, m in broker._delayed)]
    assert app.seen == [b"0"]
    assert sorted((m.payload, m.attempt) for m in back) == [(b"0", 2), (b"1", 1), (b"2", 1)]


async def test_a_settle_under_way_at_the_shutdown_deadline_is_not_cut_off() -> None:
    """The app acked in time; its settle (a slow broker round trip) was still running
    when the shutdown timeout ended, and was cancelled with the calls: the ack never
    reached the broker, the message came again. Now a settle under way ends."""
    transport = OneBatch()
    runtime = Runtime(acking, transport, RuntimeConfig(lifespan="off", shutdown_timeout=0.2))
    assert await stop_when(runtime, asyncio.wait_for(transport.settling.wait(), 5)) == 0
    assert transport.acked == ["1"]


async def test_a_settle_that_never_ends_after_an_abandoned_call_does_not_hang_the_stop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The app ignores cancellation, so the stop settles its batch itself, and that settle
    never ends (a broker that stopped answering): the stop waited for it forever. Now it
    gives up after the time a close gets (here 0.5 s), says so, and exits with 1."""
    monkeypatch.setattr(server, "_MIN_CLOSE", 0.5)

    class Stuck(OneBatch):
        async def settle(self, batch: Batch, settlement: Settlement) -> None:
            await asyncio.Event().wait()

    holding = asyncio.Event()
    let_go = asyncio.Event()  # (at the end of the test: the event loop's close cancels it)

    async def stubborn(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        await receive()
        holding.set()
        while not let_go.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    transport = Stuck()
    config = RuntimeConfig(lifespan="off", shutdown_timeout=0.2, cancel_grace=0.2)
    runtime = Runtime(stubborn, transport, config)
    try:
        assert await stop_when(runtime, asyncio.wait_for(holding.wait(), 5), within=5) == 1
    finally:
        let_go.set()
    assert transport.closed
    assert any("did not end within 0.5s" in r.getMessage() for r in caplog.records)


async def test_a_lease_extension_that_swallows_the_cancel_does_not_hang_the_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client library may swallow the cancel that ends the lease loop (as the fetch
    loop's comment says of ``asyncio.wait_for`` on 3.11): the loop went on leasing and
    the stop waited for it forever. Now the loop ends, or is left after the grace."""
    inside = asyncio.Event()
    extends = 0

    class Leasing(OneBatch):
        lease_interval = 0.05

        async def fetch(self) -> Sequence[Batch]:
            await asyncio.sleep(3600)
            return []

        async def extend(self, batches: Sequence[Batch]) -> None:
            nonlocal extends
            extends += 1
            inside.set()
            with contextlib.suppress(asyncio.CancelledError):  # swallowed
                await asyncio.sleep(0.01)  # a broker round trip

    transport = Leasing()
    config = RuntimeConfig(lifespan="off", shutdown_timeout=0.5, cancel_grace=0.5)
    runtime = Runtime(acking, transport, config)
    assert await stop_when(runtime, asyncio.wait_for(inside.wait(), 5), within=5) == 0
    assert transport.closed
    count = extends
    await asyncio.sleep(0.2)
    assert extends == count, "the lease loop went on after the stop"


class Stop(BaseException):
    pass


async def test_an_app_raising_a_base_exception_fails_its_call_and_loses_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ``BaseExceptionGroup`` (a task group whose child raised a ``BaseException``)
    escaped the call: no settlement, the message unacked in the server's hands with no
    lease and no word but "batch task failed". Now it is a failed call like any other:
    retried, then dead-lettered."""
    caplog.set_level(logging.ERROR, "amgi.runtime")
    name = uuid.uuid4().hex
    broker = MemoryBroker.reset(name)
    broker.put("q", [], b"x")
    calls = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        if scope["type"] != "message":
            return
        calls += 1
        await receive()
        raise BaseExceptionGroup("group", [Stop()])

    transport = MemoryTransport(["q"], MemoryOptions(broker=name))
    runtime = Runtime(app, transport, RuntimeConfig(lifespan="off", retry_delay=0, max_attempts=2))

    async def dead_lettered() -> None:
        async with asyncio.timeout(10):
            while not broker.dead.get("q"):
                await asyncio.sleep(0.02)

    assert await stop_when(runtime, dead_lettered()) == 0
    assert calls == 2
    assert not any("batch task failed" in r.getMessage() for r in caplog.records)


async def test_batches_waiting_for_a_slot_at_the_shutdown_deadline_go_back_uncounted() -> None:
    """One fetch returns batches of two queues; the one slot is held by the first past
    the shutdown timeout. The other batch, never started, was left to the transport's
    close, which hands back what was not settled as a delivery: an attempt used up that
    no application had. Now it is released uncounted, like a batch waiting for its key."""
    name = uuid.uuid4().hex
    broker = MemoryBroker.reset(name)
    broker.put("a", [], b"held")
    broker.put("b", [], b"waiting")
    app = Holding()
    transport = MemoryTransport(["a", "b"], MemoryOptions(broker=name))
    config = RuntimeConfig(lifespan="off", shutdown_timeout=0.2, concurrency=1)
    runtime = Runtime(app, transport, config)
    assert await stop_when(runtime, asyncio.wait_for(app.holding.wait(), 5)) == 0
    back = [
        m
        for q in ("a", "b")
        for m in [*broker.queues.get(q, ())] + [m for _, _, a, m in broker._delayed if a == q]
    ]
    assert app.seen == [b"held"]
    assert sorted((m.payload, m.attempt) for m in back) == [(b"held", 2), (b"waiting", 1)]


class HandsOver(OneBatch):
    """One batch in flight, one more handed over at the stop; at-most-once or not."""

    def __init__(self, at_most_once: bool) -> None:
        super().__init__()
        self.at_most_once = at_most_once

    async def hand_over(self) -> Sequence[Batch]:
        return [Batch("a", [Message("2", [], b"y")])]


@pytest.mark.parametrize("at_most_once", [False, True])
async def test_the_line_at_the_shutdown_deadline_says_where_the_rest_goes(
    caplog: pytest.LogCaptureFixture, at_most_once: bool
) -> None:
    """A batch handed over at the stop never gets the one slot before the deadline: an
    at-most-once server (core NATS, Redis Pub/Sub) never sends it again, and the line
    said it "goes back to the broker"."""
    app = Holding()
    transport = HandsOver(at_most_once)
    config = RuntimeConfig(lifespan="off", shutdown_timeout=0.2, concurrency=1)
    runtime = Runtime(app, transport, config)
    assert await stop_when(runtime, asyncio.wait_for(app.holding.wait(), 5)) == 0
    said = [r.getMessage() for r in caplog.records if "shutdown timeout ended" in r.getMessage()]
    if at_most_once:
        assert said == [
            "the shutdown timeout ended before 1 delivered message(s) were processed: "
            "they are lost (one-batch delivers at most once)"
        ]
    else:
        assert said == [
            "the shutdown timeout ended before every delivered message was processed: "
            "1 not started go back to the broker"
        ]


async def test_on_core_nats_the_messages_the_deadline_leaves_are_said_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Core NATS never sends again what a stop leaves unprocessed: the message held past
    the shutdown timeout and the four waiting for the one slot are lost, and said to be
    (the runtime said the four "go back to the broker")."""
    import nats

    from tests.servers.nats_helpers import URL, ensure_broker, fresh

    ensure_broker()
    subject = fresh("stop-core")
    transport = NatsTransport(
        [subject], NatsOptions(servers=URL, mode="core", queue="q", batch_size=1)
    )
    app = Holding()
    config = RuntimeConfig(lifespan="off", shutdown_timeout=0.3, concurrency=1)
    runtime = Runtime(app, transport, config)
    serving = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        nc = await nats.connect(URL)
        try:
            for payload in (b"0", b"1", b"2", b"3", b"4"):
                await nc.publish(subject, payload)
            await nc.flush()
        finally:
            await nc.close()
        await asyncio.wait_for(app.holding.wait(), 10)
    finally:
        runtime.request_stop()
    assert await asyncio.wait_for(serving, 20) == 0
    assert app.seen == [b"0"]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("back to the broker" in line for line in said), said
    assert (
        sum(
            int(n)
            for line in said
            for n in re.findall(r"(\d+) (?:delivered |)message\(s\)[^:]*(?:: they)? are lost", line)
        )
        == 5
    ), said
