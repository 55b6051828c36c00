"""The runtime's own behaviour, on the in-memory server and on a scripted transport."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from amgi.errors import ConfigurationError, InvalidEvent, SendError, StartupFailed
from amgi.runtime import BatchStats, MetricsHook, Runtime, RuntimeConfig, server
from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport
from amgi.transport import Batch, Bindings, HeaderList, Message, Settlement, Transport
from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope


class Scripted(Transport):
    """A transport that hands out prepared batches and records settlements."""

    name = "scripted"
    options = MemoryOptions

    def __init__(self, batches: Sequence[Batch], publish_error: Exception | None = None) -> None:
        super().__init__(["a"], MemoryOptions())
        self.pending = list(batches)
        self.settled: list[tuple[Batch, Settlement]] = []
        self.published: list[tuple[str, HeaderList, bytes | None, Bindings]] = []
        self.publish_error = publish_error
        self.all_settled = asyncio.Event()
        self.closed = False
        self.fetches = 0

    async def connect(self) -> None:
        pass

    async def fetch(self) -> Sequence[Batch]:
        self.fetches += 1
        if self.pending:
            return [self.pending.pop(0)]
        await asyncio.sleep(3600)
        return []

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        self.settled.append((batch, settlement))
        if not self.pending and len(self.settled) >= self.expected:
            self.all_settled.set()

    expected = 1

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        if self.publish_error is not None:
            raise self.publish_error
        self.published.append((address, headers, payload, bindings))

    async def close(self) -> None:
        self.closed = True


def batch(address: str, *payloads: bytes, key: Any = None, attempt: int = 1) -> Batch:
    return Batch(
        address,
        [Message(f"{address}-{i}", [], p, {}, attempt) for i, p in enumerate(payloads)],
        key=key,
    )


async def serve_until_settled(
    app: Any, transport: Scripted, expected: int, **config: Any
) -> Runtime:
    transport.expected = expected
    runtime = Runtime(app, transport, RuntimeConfig(lifespan="off", **config))
    task = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(transport.all_settled.wait(), 10)
    runtime.request_stop()
    assert await asyncio.wait_for(task, 10) == 0
    return runtime


def per_message(handle: Callable[[Any, AMGISendCallable], Awaitable[None]]) -> Any:
    """An app that receives every message of its call and hands each to ``handle``."""

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        more = True
        while more:
            m: Any = await receive()
            await handle(m, send)
            more = m.get("more_messages", False)

    return app


ack_all = per_message(lambda m, send: send({"type": "message.ack", "id": m["id"]}))


async def test_receive_hands_out_in_order_with_more_messages() -> None:
    seen: list[tuple[bytes | None, bool]] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        for _ in range(3):
            m: Any = await receive()
            seen.append((m["payload"], m["more_messages"]))
            await send({"type": "message.ack", "id": m["id"]})

    t = Scripted([batch("a", b"1", b"2", b"3")])
    await serve_until_settled(app, t, 1)
    assert seen == [(b"1", True), (b"2", True), (b"3", False)]
    assert [m.payload for m in t.settled[0][1].acked] == [b"1", b"2", b"3"]


async def test_receive_after_last_waits_until_the_call_ends() -> None:
    outcome: list[str] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        m = await receive()
        await send({"type": "message.ack", "id": m["id"]})  # type: ignore[typeddict-item]

        async def late() -> None:
            try:
                await receive()
            except InvalidEvent as exc:
                outcome.append(str(exc))

        waiter = asyncio.create_task(late())
        await asyncio.sleep(0.05)
        assert not waiter.done(), "receive() after the last message must wait"
        outcome.append("returning")
        # The call ends when we return; the waiter then gets a clear error.
        asyncio.get_running_loop().call_later(0.01, lambda: None)
        app.waiter = waiter  # type: ignore[attr-defined]

    t = Scripted([batch("a", b"x")])
    await serve_until_settled(app, t, 1)
    await asyncio.wait_for(app.waiter, 1)  # type: ignore[attr-defined]
    assert outcome[0] == "returning"
    assert "after the batch call ended" in outcome[1]


async def test_unsettled_and_exceptions_become_nacks_with_reasons() -> None:
    calls: list[list[bytes]] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message" or scope["address"] == "idle":
            return
        seen: list[bytes] = []
        calls.append(seen)
        more = True
        while more:
            m: Any = await receive()
            more = m["more_messages"]
            seen.append(m["payload"])
            if m["payload"] == b"nack":
                await send({"type": "message.nack", "id": m["id"], "message": "bad data"})
            elif m["payload"] == b"raise":
                raise ValueError("kaput")
            elif m["payload"] == b"return":
                return
            elif m["payload"] != b"leave":
                await send({"type": "message.ack", "id": m["id"]})

    t = Scripted(
        [
            batch("a", b"nack", b"leave", b"return", b"ok"),
            batch("b", b"ok", b"raise", b"ok2"),
            batch("idle", b"x", b"y"),
        ]
    )
    await serve_until_settled(app, t, 3, max_attempts=3)
    a, b, idle = (s for _, s in t.settled)
    reasons = {r.message.payload: r.reason for r in a.retry}
    assert reasons == {
        b"nack": "bad data",
        b"leave": "not acked or nacked by the application",
        b"return": "not acked or nacked by the application",
    }
    assert [m.payload for m in a.acked] == [b"ok"], "a message never received is called again"
    assert [m.payload for m in b.acked] == [b"ok", b"ok2"]
    assert [r.message.payload for r in b.retry] == [b"raise"]
    assert "ValueError: kaput" in b.retry[0].reason
    assert [r.reason for r in idle.retry] == [
        "not received by the application before its call ended"
    ] * 2, "a call that receives nothing is not repeated"
    assert calls == [
        [b"nack", b"leave", b"return"],
        [b"ok"],
        [b"ok", b"raise"],
        [b"raise"],
        [b"ok2"],
    ]
    assert all(r.delay > 0 for r in a.retry)


async def test_retry_policy_backoff_then_dead_letter() -> None:
    config = RuntimeConfig(retry_delay=0.5, retry_delay_max=3.0, max_attempts=4)
    assert [config.retry_delay_for(a) for a in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]

    async def nack(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        m = await receive()
        await send({"type": "message.nack", "id": m["id"], "message": "no"})  # type: ignore[typeddict-item]

    t = Scripted([batch("a", b"x", attempt=3), batch("b", b"y", attempt=4)])
    await serve_until_settled(nack, t, 2, max_attempts=4, retry_delay=0.5, retry_delay_max=3.0)
    first, last = (s for _, s in t.settled)
    assert [(r.reason, r.delay) for r in first.retry] == [("no", 2.0)]
    assert first.dead == []
    assert [(d.message.payload, d.reason) for d in last.dead] == [(b"y", "no")]


async def test_a_nack_at_a_very_high_attempt_is_retried_after_the_longest_delay() -> None:
    # The doubling delay overflowed past attempt 1025: the batch failed and its message
    # was settled neither way until the stop.
    async def nack(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] == "message":
            m = await receive()
            await send({"type": "message.nack", "id": m["id"], "message": "no"})  # type: ignore[typeddict-item]

    t = Scripted([batch("a", b"x", attempt=1030)])
    await serve_until_settled(nack, t, 1, max_attempts=5000, retry_delay=0.5, retry_delay_max=3.0)
    ((_, settlement),) = t.settled
    assert [(r.reason, r.delay) for r in settlement.retry] == [("no", 3.0)]


async def test_exhausted_messages_are_dead_lettered_before_the_app_sees_them() -> None:
    seen: list[bytes | None] = []

    async def ack(m: Any, send: AMGISendCallable) -> None:
        seen.append(m["payload"])
        await send({"type": "message.ack", "id": m["id"]})

    b = Batch("a", [Message("1", [], b"ok", {}, 1), Message("2", [], b"crashy", {}, 9)])
    t = Scripted([b])
    await serve_until_settled(per_message(ack), t, 1, max_attempts=5)
    settlement = t.settled[0][1]
    assert seen == [b"ok"]
    assert [m.payload for m in settlement.acked] == [b"ok"]
    assert [d.message.payload for d in settlement.dead] == [b"crashy"]
    assert t.settled[0][0].messages == b.messages, "settle must see the whole batch"


async def test_attempt_reaches_the_app_in_bindings() -> None:
    attempts: list[int] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        m: Any = await receive()
        attempts.append(m["bindings"]["amgi"]["attempt"])
        await send({"type": "message.ack", "id": m["id"]})

    await serve_until_settled(app, Scripted([batch("a", b"x", attempt=2)]), 1)
    assert attempts == [2]


@pytest.mark.parametrize(
    ("event", "match"),
    [
        ({"type": "message.frobnicate", "id": "a-0"}, "unknown event type"),
        ({"type": "lifespan.startup.complete"}, "unknown event type"),
        ({"type": "message.ack", "id": "nope"}, "unknown message id"),
        ({"type": "message.ack", "id": 7}, "needs 'id': str"),
        ({"type": "message.ack"}, "needs 'id': str"),
        ({"type": "message.nack", "id": "a-0"}, "needs 'message': str"),
        ({"type": "message.nack", "id": "a-0", "message": 3}, "needs 'message': str"),
        ({"type": "message.send", "headers": []}, "needs 'address'"),
        ({"type": "message.send", "address": "x", "headers": [("a", b"b")]}, "(bytes, bytes)"),
        ({"type": "message.send", "address": "x", "headers": 5}, "sequence of (bytes, bytes)"),
        ({"type": "message.send", "address": "x", "headers": [], "payload": "s"}, "bytes or None"),
        ({"type": "message.send", "address": "x", "headers": [], "bindings": []}, "bindings"),
        ({"id": "a-0"}, "needs 'type'"),
        (["message.ack"], "event dict"),
    ],
)
async def test_bad_events_raise_invalid_event_and_leave_broker_state(
    event: Any, match: str
) -> None:
    errors: list[InvalidEvent] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        m = await receive()
        try:
            await send(event)
        except InvalidEvent as exc:
            errors.append(exc)
        await send({"type": "message.ack", "id": m["id"]})  # type: ignore[typeddict-item]

    t = Scripted([batch("a", b"x")])
    await serve_until_settled(app, t, 1)
    assert len(errors) == 1
    assert match in str(errors[0])
    assert isinstance(errors[0], TypeError)
    assert [m.payload for m in t.settled[0][1].acked] == [b"x"]
    assert t.published == []


async def test_double_settlement_is_rejected() -> None:
    errors: list[str] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        m: Any = await receive()
        await send({"type": "message.nack", "id": m["id"], "message": "x"})
        again: Any
        for again in (
            {"type": "message.ack", "id": m["id"]},
            {"type": "message.nack", "id": m["id"], "message": "y"},
        ):
            try:
                await send(again)
            except InvalidEvent as exc:
                errors.append(str(exc))

    t = Scripted([batch("a", b"x")])
    await serve_until_settled(app, t, 1)
    assert len(errors) == 2
    assert all("already nacked" in e for e in errors)
    assert [r.reason for r in t.settled[0][1].retry] == ["x"]


async def test_ack_of_a_message_not_yet_received_is_rejected() -> None:
    errors: list[str] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        try:
            await send({"type": "message.ack", "id": "a-1"})
        except InvalidEvent as exc:
            errors.append(str(exc))
        await ack_all(scope, receive, send)

    t = Scripted([batch("a", b"x", b"y")])
    await serve_until_settled(app, t, 1)
    assert errors
    assert "unknown message id 'a-1'" in errors[0]
    assert len(t.settled[0][1].acked) == 2


async def test_send_publishes_and_failures_raise_the_servers_oserror() -> None:
    class ScriptedSendError(SendError):
        pass

    class Failing(Scripted):
        send_error = ScriptedSendError

    caught: list[BaseException] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        m = await receive()
        try:
            await send(
                {
                    "type": "message.send",
                    "address": "out",
                    "headers": [(b"h", b"v")],
                    "payload": b"p",
                    "bindings": {"kafka": {"key": b"k"}},
                }
            )
        except OSError as exc:
            caught.append(exc)
        await send({"type": "message.ack", "id": m["id"]})  # type: ignore[typeddict-item]

    ok = Scripted([batch("a", b"x")])
    await serve_until_settled(app, ok, 1)
    assert ok.published == [("out", [(b"h", b"v")], b"p", {"kafka": {"key": b"k"}})]
    assert caught == []

    failing = Failing([batch("a", b"x")], publish_error=RuntimeError("broker said no"))
    await serve_until_settled(app, failing, 1)
    assert len(caught) == 1
    assert isinstance(caught[0], ScriptedSendError)
    assert isinstance(caught[0], OSError)
    assert "broker said no" in str(caught[0])
    assert len(failing.settled[0][1].acked) == 1


async def test_same_key_runs_in_order_different_keys_concurrently() -> None:
    log: list[str] = []
    gate = asyncio.Event()

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        m: Any = await receive()
        log.append(f"start {m['payload'].decode()}")
        if m["payload"] == b"k1-first":
            await asyncio.wait_for(gate.wait(), 5)
        if m["payload"] == b"k2-only":
            gate.set()
        log.append(f"end {m['payload'].decode()}")
        await send({"type": "message.ack", "id": m["id"]})

    t = Scripted(
        [
            batch("a", b"k1-first", key=1),
            batch("b", b"k1-second", key=1),
            batch("c", b"k2-only", key=2),
        ]
    )
    await serve_until_settled(app, t, 3, concurrency=4)
    # k2 ran while k1's first batch was blocked; k1's second waited for its first.
    assert log.index("start k2-only") < log.index("end k1-first")
    assert log.index("end k1-first") < log.index("start k1-second")


class PeakApp:
    """Acks everything after a short pause and records the most calls running at once."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0

    async def __call__(
        self, scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable
    ) -> None:
        if scope["type"] != "message":
            return
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(0.02)
        self.running -= 1
        await ack_all(scope, receive, send)


async def test_concurrency_bounds_batches_in_flight() -> None:
    app = PeakApp()
    t = Scripted([batch(f"q{i}", b"x", key=i) for i in range(12)])
    await serve_until_settled(app, t, 12, concurrency=3)
    assert app.peak == 3


async def test_shutdown_waits_for_in_flight_then_cancels_after_timeout() -> None:
    started = asyncio.Event()

    async def slow(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        m = await receive()
        await send({"type": "message.ack", "id": m["id"]})  # type: ignore[typeddict-item]
        await receive()
        started.set()
        await asyncio.sleep(60)

    t = Scripted([batch("a", b"acked", b"stuck")])
    runtime = Runtime(slow, t, RuntimeConfig(lifespan="off", shutdown_timeout=0.2))
    task = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(started.wait(), 5)
    runtime.request_stop()
    assert await asyncio.wait_for(task, 5) == 0
    settlement = t.settled[0][1]
    assert [m.payload for m in settlement.acked] == [b"acked"]
    assert "cancelled" in settlement.retry[0].reason
    assert t.closed


async def test_metrics_hook_counts_per_batch() -> None:
    stats: list[BatchStats] = []
    sends: list[tuple[str, bool]] = []

    class Hook(MetricsHook):
        def batch_settled(self, s: BatchStats) -> None:
            stats.append(s)

        def message_sent(self, address: str, ok: bool) -> None:
            sends.append((address, ok))

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        a: Any = await receive()
        b: Any = await receive()
        await send({"type": "message.send", "address": "o", "headers": []})
        await send({"type": "message.ack", "id": a["id"]})
        await send({"type": "message.nack", "id": b["id"], "message": "x", "retry": False})

    t = Scripted([batch("a", b"1", b"2")])
    runtime = Runtime(app, t, RuntimeConfig(lifespan="off", max_attempts=5), metrics=Hook())
    task = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(t.all_settled.wait(), 5)
    runtime.request_stop()
    await task
    assert stats[0].received == 2
    assert (stats[0].acked, stats[0].retried, stats[0].dead_lettered) == (1, 0, 1)
    assert stats[0].nacked == 1
    assert stats[0].duration >= 0
    assert sends == [("o", True)]


async def test_messages_handed_back_unseen_are_one_line_not_nacks_and_not_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop cut the call: the message the app never received was logged as "nacked
    (attempt 1 of 5) ... retrying in 0s" (one warning per message) and counted as
    retried, though nothing failed and no attempt was counted. And a real nack on the
    memory server was logged at the attempt after it (the server counted it on the
    settled message before the runtime reported)."""
    caplog.set_level(logging.INFO, "amgi.runtime")
    stats: list[BatchStats] = []

    class Hook(MetricsHook):
        def batch_settled(self, s: BatchStats) -> None:
            stats.append(s)

    holding = asyncio.Event()

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        m: Any = await receive()
        await send({"type": "message.nack", "id": m["id"], "message": "later"})
        await receive()
        holding.set()
        await asyncio.sleep(30)  # only the stop ends this call

    name = f"handed-back-{uuid.uuid4().hex}"
    broker = MemoryBroker.named(name)
    for i in range(3):
        broker.put("q", [], b"%d" % i)
    transport = MemoryTransport(["q"], MemoryOptions(broker=name, batch_size=3))
    config = RuntimeConfig(
        lifespan="off", max_attempts=5, retry_delay=5, shutdown_timeout=0.2, crash_ledger=""
    )
    runtime = Runtime(app, transport, config, metrics=Hook())
    served = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(holding.wait(), 10)
    runtime.request_stop()
    assert await asyncio.wait_for(served, 10) == 0
    lines = [r.getMessage() for r in caplog.records]
    nacks = [line for line in lines if "nacked" in line]
    assert len(nacks) == 2, lines
    assert "nacked (attempt 1 of 5): later; retrying in 5s" in nacks[0], nacks
    assert "nacked (attempt 1 of 5): the application call was cancelled" in nacks[1], nacks
    handed_back = [line for line in lines if "handed back unspent" in line]
    assert handed_back == [
        "1 message(s) from 'q' handed back unspent, no attempt counted: not received by the "
        "application before its call ended (the application call was cancelled (shutdown or "
        "deadline)) (3)"
    ], lines
    assert stats[0].retried == 2, stats[0]


async def test_a_settle_that_raises_is_not_reported_as_retried_or_dead_lettered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The transport's settle raised: nothing reached the broker, yet the log said
    "retrying in 5s" and the dead letter was counted as stored. Both stay unacknowledged
    on the broker: the log and the metrics say so."""
    stats: list[BatchStats] = []

    class Hook(MetricsHook):
        def batch_settled(self, s: BatchStats) -> None:
            stats.append(s)

    class Refusing(Scripted):
        async def settle(self, batch: Batch, settlement: Settlement) -> None:
            await super().settle(batch, settlement)
            raise OSError("the broker went away")

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        a: Any = await receive()
        b: Any = await receive()
        await send({"type": "message.nack", "id": a["id"], "message": "later"})
        await send({"type": "message.nack", "id": b["id"], "message": "bad", "retry": False})

    t = Refusing([batch("a", b"1", b"2")])
    runtime = Runtime(app, t, RuntimeConfig(lifespan="off", max_attempts=5), metrics=Hook())
    task = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(t.all_settled.wait(), 5)
    runtime.request_stop()
    await task
    assert (stats[0].retried, stats[0].dead_lettered, stats[0].kept) == (0, 0, 2)
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if "retrying in" in line]
    assert any(
        "its retry could not be scheduled: the settle failed: the broker went away" in line
        for line in lines
    )


async def test_a_batch_settled_set_on_the_hook_instance_is_called() -> None:
    # The runtime skips building BatchStats only for the base class's no-op.
    stats: list[BatchStats] = []
    hook = MetricsHook()
    hook.batch_settled = stats.append  # type: ignore[method-assign]
    t = Scripted([batch("a", b"1")])
    runtime = Runtime(ack_all, t, RuntimeConfig(lifespan="off"), metrics=hook)
    task = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(t.all_settled.wait(), 5)
    runtime.request_stop()
    await task
    assert [(s.address, s.received, s.acked) for s in stats] == [("a", 1, 1)]


async def test_failures_are_logged_one_line_per_message(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        m = await receive()
        await send({"type": "message.nack", "id": m["id"], "message": "why not"})  # type: ignore[typeddict-item]

    caplog.set_level(logging.WARNING, "amgi.runtime")
    await serve_until_settled(app, Scripted([batch("a", b"x")]), 1)
    lines = [r.getMessage() for r in caplog.records if "nacked" in r.getMessage()]
    assert len(lines) == 1
    assert "a-0" in lines[0]
    assert "why not" in lines[0]


class Refusing(Scripted):
    """Stores no dead letter of a payload starting with ``kept`` or ``lost`` and schedules
    no retry of ``busy``; says nothing of the others."""

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        for d in settlement.dead:
            payload = d.message.payload or b""
            if payload.startswith((b"kept", b"lost")):
                d.not_stored("the store is full", lost=payload.startswith(b"lost"))
        for r in settlement.retry:
            if r.message.payload == b"busy":
                r.not_scheduled("no confirm in time")
        await super().settle(batch, settlement)


async def test_a_dead_letter_the_transport_did_not_store_is_reported_as_such(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dead letter the transport could not store was logged "dead-lettered" and counted
    as such; now the line and the metrics say what the transport did."""
    stats: list[BatchStats] = []

    class Hook(MetricsHook):
        def batch_settled(self, s: BatchStats) -> None:
            stats.append(s)

    async def nack(m: Any, send: AMGISendCallable) -> None:
        retry = m["payload"] == b"busy"
        await send({"type": "message.nack", "id": m["id"], "message": "bad", "retry": retry})

    caplog.set_level(logging.WARNING, "amgi.runtime")
    t = Refusing([batch("a", b"kept", b"lost", b"busy", b"fine")])
    config = RuntimeConfig(lifespan="off", max_attempts=5)
    runtime = Runtime(per_message(nack), t, config, metrics=Hook())
    task = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(t.all_settled.wait(), 5)
    runtime.request_stop()
    assert await task == 0
    lines = {r.getMessage().split()[1]: r.getMessage() for r in caplog.records}
    assert lines["a-0"] == (
        "message a-0 from 'a': its dead letter (after attempt 1: bad) could not be stored: "
        "the store is full; the message stays unacknowledged and is tried again later"
    )
    assert lines["a-1"].endswith(
        "could not be stored: the store is full; the message is lost "
        "(the broker cannot deliver it again)"
    )
    assert lines["a-2"] == (
        "message a-2 from 'a' nacked (attempt 1 of 5): bad; its retry could not be scheduled: "
        "no confirm in time; the message stays unacknowledged and is tried again later"
    )
    assert lines["a-3"] == "message a-3 from 'a' dead-lettered after attempt 1: bad"
    (s,) = stats
    assert (s.retried, s.dead_lettered, s.kept, s.lost, s.nacked) == (0, 1, 2, 1, 4)
    (record,) = [r for r in caplog.records if "a-0" in r.getMessage()]
    assert record.amgi["error"] == "the store is full"  # type: ignore[attr-defined]


# -- lifespan ------------------------------------------------------------------------


def lifespan_app(log: list[str], *, fail: str | None = None, raise_in: str | None = None) -> Any:
    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                log.append(event["type"])
                if event["type"] == "lifespan.startup":
                    if raise_in == "startup":
                        raise RuntimeError("db down")
                    if fail:
                        await send({"type": "lifespan.startup.failed", "message": fail})
                        return
                    scope["state"]["pool"] = "ready"
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        else:
            log.append(f"message state={scope.get('state')}")
            await ack_all(scope, receive, send)

    return app


async def test_lifespan_runs_first_and_last_and_shares_state() -> None:
    log: list[str] = []
    t = Scripted([batch("a", b"x")])
    runtime = Runtime(lifespan_app(log), t, RuntimeConfig())
    task = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(t.all_settled.wait(), 5)
    runtime.request_stop()
    assert await task == 0
    assert log == [
        "lifespan.startup",
        "message state={'pool': 'ready'}",
        "lifespan.shutdown",
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"fail": "no database"}, "no database"), ({"raise_in": "startup"}, "db down")],
)
async def test_startup_failure_delivers_nothing(kwargs: dict[str, Any], match: str) -> None:
    log: list[str] = []
    t = Scripted([batch("a", b"x")])
    runtime = Runtime(lifespan_app(log, **kwargs), t, RuntimeConfig())
    with pytest.raises(StartupFailed, match=match):
        await runtime.serve()
    assert t.fetches == 0
    assert t.settled == []


async def test_app_without_lifespan_is_tolerated_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        assert scope["type"] == "message"
        await ack_all(scope, receive, send)

    caplog.set_level(logging.INFO, "amgi.runtime")
    t = Scripted([batch("a", b"x")])
    runtime = Runtime(app, t, RuntimeConfig(lifespan="auto"))
    task = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(t.all_settled.wait(), 5)
    runtime.request_stop()
    assert await task == 0
    notes = [r for r in caplog.records if "does not speak lifespan" in r.getMessage()]
    assert len(notes) == 1


async def test_lifespan_on_requires_support() -> None:
    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        return

    with pytest.raises(StartupFailed, match="does not speak lifespan"):
        await Runtime(app, Scripted([]), RuntimeConfig(lifespan="on")).serve()


async def test_connect_failure_raises_before_lifespan_startup() -> None:
    log: list[str] = []
    closed: list[bool] = []

    class Down(Scripted):
        async def connect(self) -> None:
            raise OSError("connection refused")

        async def close(self) -> None:
            closed.append(True)

    with pytest.raises(OSError, match="connection refused"):
        await Runtime(lifespan_app(log), Down([]), RuntimeConfig()).serve()
    assert log == []  # the application's startup never ran
    assert closed == [True]


async def test_failed_startup_closes_the_connected_transport() -> None:
    closed: list[bool] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    class Up(Scripted):
        async def close(self) -> None:
            closed.append(True)

    with pytest.raises(StartupFailed, match="no database"):
        await Runtime(app, Up([]), RuntimeConfig()).serve()
    assert closed == [True]


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ConfigurationError):
        RuntimeConfig(concurrency=0)
    with pytest.raises(ConfigurationError):
        RuntimeConfig(max_attempts=0)
    with pytest.raises(ConfigurationError):
        RuntimeConfig(lifespan="maybe")  # type: ignore[arg-type]


# -- memory server specifics ------------------------------------------------------------


async def test_memory_close_returns_unsettled_messages() -> None:
    name = uuid.uuid4().hex
    broker = MemoryBroker.reset(name)
    broker.put("q", [], b"1")
    broker.put("q", [], b"2")
    t = MemoryTransport(["q"], MemoryOptions(broker=name, batch_size=10))
    await t.connect()
    (b,) = await t.fetch()
    assert [m.payload for m in b.messages] == [b"1", b"2"]
    await t.settle(b, Settlement(acked=[b.messages[0]]))
    await t.close()
    assert [(m.payload, m.attempt) for m in broker.queues["q"]] == [(b"2", 2)]


async def test_transient_fetch_errors_are_retried_and_fatal_ones_stop_with_1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Flaky(Scripted):
        failures = 2

        async def fetch(self) -> Sequence[Batch]:
            if self.failures:
                self.failures -= 1
                raise OSError("connection reset")
            return await super().fetch()

    caplog.set_level(logging.INFO, "amgi.runtime")
    flaky = Flaky([batch("a", b"x")])
    await serve_until_settled(ack_all, flaky, 1)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("connection reset" in m for m in messages) == 1, "one line per failure streak"
    assert any("recovered" in m for m in messages)

    class Broken(Scripted):
        async def fetch(self) -> Sequence[Batch]:
            raise ConfigurationError("topic 'x' does not exist")

    broken = Broken([])
    code = await asyncio.wait_for(Runtime(ack_all, broken, RuntimeConfig()).serve(), 5)
    assert code == 1
    assert broken.closed


async def test_leases_of_running_batches_are_renewed() -> None:
    extended: list[list[str]] = []

    class Leasing(Scripted):
        lease_interval = 0.05

        async def extend(self, batches: Sequence[Batch]) -> None:
            extended.append([b.address for b in batches])

    async def slow(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        await asyncio.sleep(0.3)
        await ack_all(scope, receive, send)

    await serve_until_settled(slow, Leasing([batch("long", b"x")]), 1)
    running = [e for e in extended if e]  # (with none in flight it is called too)
    assert len(running) >= 3
    assert all(e == ["long"] for e in running)


async def test_a_slow_extension_does_not_stretch_the_lease_rhythm() -> None:
    """The interval was slept after each ``extend`` returned: an extension taking most
    of an interval (a broker slow to answer) made the renewals come at nearly twice the
    interval, and a lease sized on it lapsed. They are timed from each one's start now."""
    starts: list[float] = []

    class SlowLeasing(Scripted):
        lease_interval = 0.2

        async def extend(self, batches: Sequence[Batch]) -> None:
            starts.append(asyncio.get_running_loop().time())
            await asyncio.sleep(0.15)

    runtime = Runtime(ack_all, SlowLeasing([]), RuntimeConfig(lifespan="off"))
    task = asyncio.create_task(runtime.serve())
    await asyncio.sleep(2.1)
    runtime.request_stop()
    assert await asyncio.wait_for(task, 10) == 0
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) >= 8, gaps  # 10 due; one every 0.35 s before (6 at most)
    assert sorted(gaps)[len(gaps) // 2] < 0.25, gaps


async def test_the_lease_goes_on_while_the_fetch_backs_off_with_nothing_in_flight() -> None:
    """A transport holds what it fetched and has not handed out yet; while its fetch fails
    and nothing runs, ``extend`` is still called (with no batch), every interval."""
    extended: list[list[Batch]] = []

    class FailingLeasing(Scripted):
        lease_interval = 0.05

        async def fetch(self) -> Sequence[Batch]:
            self.fetches += 1
            raise OSError("connection reset")

        async def extend(self, batches: Sequence[Batch]) -> None:
            extended.append(list(batches))

    transport = FailingLeasing([])
    runtime = Runtime(ack_all, transport, RuntimeConfig(lifespan="off"))
    task = asyncio.create_task(runtime.serve())
    await asyncio.sleep(0.5)  # backing off: 0.1, 0.2, 0.4 s
    runtime.request_stop()
    assert await asyncio.wait_for(task, 10) == 0
    assert 1 < transport.fetches <= 4
    assert len(extended) >= 5
    assert all(e == [] for e in extended)


async def test_concurrency_holds_when_one_fetch_returns_many_batches() -> None:
    class Wide(Scripted):
        async def fetch(self) -> Sequence[Batch]:
            if self.pending:
                batches, self.pending = self.pending, []
                return batches
            await asyncio.sleep(3600)
            return []

    app = PeakApp()
    t = Wide([batch(f"topic{i}", b"x", key=i) for i in range(10)])
    await serve_until_settled(app, t, 10, concurrency=2)
    assert app.peak == 2
    assert len(t.settled) == 10


async def test_a_fetch_that_swallows_the_stop_ends_the_loop_and_its_batch_runs_in_the_stop() -> (
    None
):
    """As a client's ``asyncio.wait_for`` does on 3.11 when its future completes just as
    it is cancelled: the fetch returns a batch instead of raising CancelledError. The
    loop fetches no more; the batch, delivered to this process, runs within the stop."""
    fetching = asyncio.Event()

    class Swallowing(Scripted):
        async def fetch(self) -> Sequence[Batch]:
            self.fetches += 1
            fetching.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)
            return [batch("late", b"x")]

    called: list[Scope] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        called.append(scope)

    t = Swallowing([])
    runtime = Runtime(app, t, RuntimeConfig(lifespan="off", cancel_grace=30))
    served = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(fetching.wait(), 5)
    runtime.request_stop()
    assert await asyncio.wait_for(served, 5) == 0, "the stop waited on the fetch loop"
    assert t.fetches == 1, "fetched again after the stop"
    assert [scope["address"] for scope in called] == ["late"]
    assert [b.address for b, _ in t.settled] == ["late"]
    assert t.closed


async def test_a_fetch_that_ignores_cancellation_is_left_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fetching = asyncio.Event()

    class Stubborn(Scripted):
        async def fetch(self) -> Sequence[Batch]:
            fetching.set()
            while not self.closed:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.01)
            return []

    t = Stubborn([])
    runtime = Runtime(ack_all, t, RuntimeConfig(lifespan="off", cancel_grace=0.2))
    served = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(fetching.wait(), 5)
    runtime.request_stop()
    assert await asyncio.wait_for(served, 5) == 0
    assert t.closed
    assert any("ignored cancellation" in r.getMessage() for r in caplog.records)
    assert not runtime.abandoned, "closing the transport ended the fetch"


def one_by_one(
    seen: list[bytes | None], started: asyncio.Event, sleeps: dict[bytes, float], pause: float = 0
) -> Any:
    """An app taking one message per call: records its payload, sets ``started``, sleeps
    ``sleeps[payload]`` (else ``pause``) seconds, then acks it."""

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        m = await receive()
        payload = m["payload"]  # type: ignore[typeddict-item]
        seen.append(payload)
        started.set()
        await asyncio.sleep(sleeps.get(payload or b"", pause))
        await send({"type": "message.ack", "id": m["id"]})  # type: ignore[typeddict-item]

    return app


class HandingOver(Scripted):
    """Hands ``held`` over at the stop (or raises ``error``)."""

    def __init__(self, first: Batch, held: list[Batch], error: Exception | None = None) -> None:
        super().__init__([first])
        self.held = held
        self.error = error
        self.handed = 0

    async def hand_over(self) -> Sequence[Batch]:
        self.handed += 1
        if self.error is not None:
            raise self.error
        return self.held


async def test_a_stop_runs_the_batches_handed_over_within_the_shutdown_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Held batches start as slots free up; one still running at the deadline is
    cancelled like any batch in flight, and the deadline is one for both steps."""
    started = asyncio.Event()
    seen: list[bytes | None] = []
    app = one_by_one(seen, started, {b"slow": 60.0})

    held = [batch("a", b"held"), batch("b", b"slow"), batch("c", b"never")]
    t = HandingOver(batch("a", b"first"), held)
    config = RuntimeConfig(lifespan="off", concurrency=1, shutdown_timeout=0.5)
    runtime = Runtime(app, t, config)
    task = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(started.wait(), 5)
    stopping = time.monotonic()
    runtime.request_stop()
    assert await asyncio.wait_for(task, 5) == 0
    took = time.monotonic() - stopping
    assert seen == [b"first", b"held", b"slow"]  # "never" waited for a slot past the deadline
    outcomes = {b.messages[0].payload: s for b, s in t.settled}
    assert [m.payload for m in outcomes[b"held"].acked] == [b"held"]
    assert "cancelled" in outcomes[b"slow"].retry[0].reason
    assert b"never" not in outcomes  # not started: it goes back to the broker at close
    assert took < 0.5 + 1.0, "the deadline is shared by the hand-over and the drain"
    assert t.handed == 1
    assert t.closed
    assert "every delivered message was processed" in caplog.text


class ThreeAtOnce(HandingOver):
    """One fetch returns three batches; ``counts`` says whether the broker counts
    deliveries."""

    def __init__(self, counts: bool, error: Exception | None = None) -> None:
        super().__init__(batch("a", b"first"), [], error)
        self.counts_deliveries = counts
        self.pending = []
        self.given = False

    async def fetch(self) -> Sequence[Batch]:
        if not self.given:
            self.given = True
            return [batch("a", b"first"), batch("b", b"second"), batch("c", b"third")]
        await asyncio.sleep(3600)
        return []


@pytest.mark.parametrize(
    ("counts", "error"), [(True, None), (True, OSError("channel closed")), (False, None)]
)
async def test_a_stop_runs_the_fetched_batches_still_waiting_for_a_slot(
    counts: bool, error: Exception | None
) -> None:
    """A fetch returned more batches than slots; the stop comes while the first runs.
    Handed back, the others would come again counted where the broker counts deliveries
    (and a push server's senders would get no answer): the stop runs them, even when
    the hand-over fails."""
    started = asyncio.Event()
    seen: list[bytes | None] = []
    app = one_by_one(seen, started, {}, pause=0.05)

    t = ThreeAtOnce(counts, error)
    runtime = Runtime(app, t, RuntimeConfig(lifespan="off", concurrency=1))
    task = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(started.wait(), 5)
    runtime.request_stop()
    assert await asyncio.wait_for(task, 5) == 0
    expected = [b"first", b"second", b"third"]
    assert seen == expected
    assert [b.messages[0].payload for b, s in t.settled if s.acked] == expected
    assert t.handed == 1


async def test_a_failed_hand_over_is_one_warning_and_the_stop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] == "message":
            m = await receive()
            await send({"type": "message.ack", "id": m["id"]})  # type: ignore[typeddict-item]

    t = HandingOver(batch("a", b"first"), [], error=OSError("channel closed"))
    await serve_until_settled(app, t, 1)  # stops it, and checks the exit code is 0
    assert t.handed == 1
    assert t.closed
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines == ["taking the delivered messages at the stop failed: channel closed"]


async def test_a_close_that_never_ends_is_given_up_after_the_shutdown_timeout(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that stops reading can hold a transport's close forever (seen on AMP): the
    stop goes on after ``shutdown_timeout`` (or the minimum a close gets, when that is
    longer), says so, and exits non-zero."""
    release = asyncio.Event()

    class Stuck(Scripted):
        async def close(self) -> None:
            await release.wait()

    monkeypatch.setattr(server, "_MIN_CLOSE", 0.3)
    runtime = Runtime(lifespan_app([]), Stuck([]), RuntimeConfig(shutdown_timeout=0.1))
    serving = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(runtime.started.wait(), 5)
    runtime.request_stop()
    started = time.monotonic()
    code = await asyncio.wait_for(serving, 5)
    assert 0.25 < time.monotonic() - started < 3
    assert code == 1
    assert "the scripted transport did not close within 0.3s" in caplog.text
    assert not runtime.abandoned  # the close took its cancellation
    release.set()


async def test_a_zero_shutdown_timeout_still_lets_a_close_finish(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``--shutdown-timeout 0`` is about the application's calls: a close that takes a
    moment (final commits) still completes, and the stop exits 0."""
    closed: list[bool] = []

    class Slow(Scripted):
        async def close(self) -> None:
            await asyncio.sleep(0.2)
            closed.append(True)

    runtime = Runtime(lifespan_app([]), Slow([]), RuntimeConfig(shutdown_timeout=0))
    serving = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(runtime.started.wait(), 5)
    runtime.request_stop()
    assert await asyncio.wait_for(serving, 5) == 0
    assert closed == [True]
    assert "did not close" not in caplog.text


async def test_messages_a_cancelled_call_never_received_keep_their_attempt() -> None:
    """Handed back at a stop, they are no delivery: Retry.uncounted, and the memory server
    (like SQLite and the servers that republish retries) does not count them."""
    name = uuid.uuid4().hex
    broker = MemoryBroker.reset(name)
    for i in range(3):
        broker.put("q", [], b"%d" % i)
    got_one = asyncio.Event()

    async def slow(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        await receive()
        got_one.set()
        await asyncio.sleep(30)

    transport = MemoryTransport(["q"], MemoryOptions(broker=name, batch_size=3))
    runtime = Runtime(slow, transport, RuntimeConfig(lifespan="off", shutdown_timeout=0.2))
    served = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(got_one.wait(), 5)
    runtime.request_stop()
    assert await asyncio.wait_for(served, 10) == 0
    waiting = [*broker.queues.get("q", ()), *(m for _, _, _, m in broker._delayed)]
    back = sorted((m.payload, m.attempt) for m in waiting)
    assert back == [(b"0", 2), (b"1", 1), (b"2", 1)]  # only the one the app had counts
