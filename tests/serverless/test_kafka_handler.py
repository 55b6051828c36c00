"""The Lambda Kafka adapter on the documented MSK and self-managed Kafka event shapes."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest

from amgi import servers
from amgi.runtime import RuntimeConfig
from amgi.serverless import BatchFailed, KafkaHandler, MalformedEvent
from amgi.testing.conformance import Recorder
from tests.serverless.helpers import Capture, Context, Stuck, settling_app
from tests.serverless.sending_app import SendingApp

FIXTURES = Path(__file__).parent / "fixtures"
QUICK = RuntimeConfig(max_attempts=3, retry_delay=0.01)
"""Three attempts with short retry delays, so that the in-invocation retries run quickly."""


def load(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return event


async def test_msk_records_are_decoded_partition_by_partition() -> None:
    app = Recorder()
    handler = KafkaHandler(app, handle_sigterm=False)
    assert await handler.handle(load("msk.json")) == {"processed": 7, "dead_lettered": 0}
    assert len(app.scopes) == 2, "one call per partition"
    by_partition: dict[int, list[Any]] = {}
    for r in app.received:
        by_partition.setdefault(r.bindings["kafka"]["partition"], []).append(r)
    p0, p1 = by_partition[0], by_partition[1]
    assert [r.payload for r in p0] == [b"p0-0", b"p0-1", b"p0-2", b"p0-3"]
    assert [r.bindings["kafka"]["offset"] for r in p0] == [15, 16, 17, 18]
    assert p0[0].bindings["kafka"]["key"] == b"key-0"
    assert p0[0].headers == [(b"headerKey", b"headerValue")]
    assert p0[0].id == "mytopic/0/15"
    assert p1[0].bindings["kafka"]["key"] is None
    assert p1[1].headers == [(b"trace", b"t1"), (b"trace", b"t2")]
    assert p1[2].payload is None  # tombstone
    assert {s["address"] for s in app.scopes} == {"mytopic"}


async def test_header_bytes_may_be_signed_as_java_writes_them() -> None:
    event = copy.deepcopy(load("msk.json"))
    event["records"]["mytopic-0"][0]["headers"] = [{"sig": [-1, -128, 0, 127]}]
    app = Recorder()
    await KafkaHandler(app, handle_sigterm=False).handle(event)
    first = next(r for r in app.received if r.bindings["kafka"]["offset"] == 15)
    assert first.headers == [(b"sig", bytes([0xFF, 0x80, 0x00, 0x7F]))]


async def test_a_null_header_value_is_an_empty_value_as_on_the_kafka_server() -> None:
    # Kafka allows a header without a value; refusing the event would block the partition.
    event = copy.deepcopy(load("msk.json"))
    event["records"]["mytopic-0"][0]["headers"] = [{"trace": None}, {"k": [104, 105]}]
    app = Recorder()
    result = await KafkaHandler(app, handle_sigterm=False).handle(event)
    assert result == {"processed": 7, "dead_lettered": 0}
    first = next(r for r in app.received if r.bindings["kafka"]["offset"] == 15)
    assert first.headers == [(b"trace", b""), (b"k", b"hi")]


async def test_partitions_run_concurrently_and_in_order_within() -> None:
    both_started = asyncio.Event()
    running: set[int] = set()
    seen: list[tuple[int, int]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        first = await receive()
        running.add(first["bindings"]["kafka"]["partition"])
        if len(running) == 2:
            both_started.set()
        await asyncio.wait_for(both_started.wait(), 5)  # fails unless both calls overlap
        event = first
        while True:
            kafka = event["bindings"]["kafka"]
            seen.append((kafka["partition"], kafka["offset"]))
            await send({"type": "message.ack", "id": event["id"]})
            if not event["more_messages"]:
                return
            event = await receive()

    await KafkaHandler(app, handle_sigterm=False).handle(load("msk.json"))
    assert [o for p, o in seen if p == 0] == [15, 16, 17, 18]
    assert [o for p, o in seen if p == 1] == [7, 8, 9]


def attempts_of(app: Recorder, payload: bytes) -> list[int]:
    return [r.attempt for r in app.received if r.payload == payload]


async def test_a_nack_on_every_attempt_fails_the_invocation_so_lambda_retries() -> None:
    app = Recorder(lambda r: "nack:bad record" if r.payload == b"p0-2" else "ack")
    handler = KafkaHandler(app, handle_sigterm=False, config=QUICK)
    with pytest.raises(BatchFailed, match="bad record"):
        await handler.handle(load("msk.json"))
    assert attempts_of(app, b"p0-2") == [1, 2, 3], "retried within the invocation first"
    assert attempts_of(app, b"p0-3") == [1], "the records after it go on, once"


async def test_a_nack_is_retried_within_the_invocation_after_the_retry_delay() -> None:
    """A passing failure costs neither a whole-batch retry nor a dead letter."""
    failing = {b"p0-2": 1, b"p1-0": 2}  # nacks left, then acks

    def decide(r: Any) -> str:
        if failing.get(r.payload, 0) > 0:
            failing[r.payload] -= 1
            return "nack:database away"
        return "ack"

    app = Recorder(decide)
    capture = Capture()
    config = RuntimeConfig(max_attempts=3, retry_delay=0.2)
    handler = KafkaHandler(
        app, handle_sigterm=False, config=config, publisher=capture, dead_letter_address="dlq"
    )
    started = time.monotonic()
    assert await handler.handle(load("msk.json"), Context(30)) == {
        "processed": 7,
        "dead_lettered": 0,
    }
    elapsed = time.monotonic() - started
    assert attempts_of(app, b"p0-2") == [1, 2]
    assert attempts_of(app, b"p1-0") == [1, 2, 3]
    assert capture.sent == []
    assert 0.2 + 0.4 <= elapsed < 5, "the doubling delays 0.2 s and 0.4 s, no more"
    retried = [s for s in app.scopes[2:] if s["type"] == "message"]
    assert len(retried) == 3, "a retry round is one call per partition with retries"


async def test_a_retry_that_would_not_fit_the_invocation_is_its_last_attempt() -> None:
    app = Recorder(lambda r: "nack:bad record" if r.payload == b"p0-2" else "ack")
    capture = Capture()
    config = RuntimeConfig(max_attempts=5, retry_delay=5.0)
    handler = KafkaHandler(
        app,
        handle_sigterm=False,
        config=config,
        publisher=capture,
        dead_letter_address="dlq",
        deadline_margin=0.2,
    )
    started = time.monotonic()
    assert (await handler.handle(load("msk.json"), Context(3)))["dead_lettered"] == 1
    assert time.monotonic() - started < 1, "no wait for a retry that cannot happen"
    ((_, headers, payload, _),) = capture.sent
    assert payload == b"p0-2"
    assert (b"amgi-attempt", b"1") in headers


async def test_records_a_call_never_received_are_given_to_the_next_call() -> None:
    """An app that takes one record per call and returns: the rest are handed back
    uncounted and run again at once, never dead-lettered, never a failed invocation."""
    received: list[tuple[bytes | None, int]] = []

    async def one_per_call(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "message":
            event = await receive()
            received.append((event["payload"], event["bindings"]["amgi"]["attempt"]))
            await send({"type": "message.ack", "id": event["id"]})

    capture = Capture()
    handler = KafkaHandler(
        one_per_call, handle_sigterm=False, publisher=capture, dead_letter_address="dlq"
    )
    assert await handler.handle(load("msk.json"), Context(30)) == {
        "processed": 7,
        "dead_lettered": 0,
    }
    p0 = [p for p, _ in received if p is not None and p.startswith(b"p0")]
    assert p0 == [b"p0-0", b"p0-1", b"p0-2", b"p0-3"], "in offset order"
    assert len(received) == 7
    assert {a for _, a in received} == {1}
    assert capture.sent == []


async def test_a_call_that_receives_nothing_is_retried_a_bounded_number_of_times() -> None:
    calls = 0

    async def returns_at_once(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        if scope["type"] == "message":
            calls += 1

    capture = Capture()
    handler = KafkaHandler(
        returns_at_once,
        handle_sigterm=False,
        config=QUICK,
        publisher=capture,
        dead_letter_address="dlq",
    )
    assert (await handler.handle(load("msk.json"), Context(30)))["dead_lettered"] == 7
    assert calls == 2 * 3, "one call per partition and attempt"
    assert {dict(h)[b"amgi-attempt"] for _, h, _, _ in capture.sent} == {b"3"}


async def test_a_nack_is_dead_lettered_by_sending_when_configured() -> None:
    capture = Capture()
    app = Recorder(
        lambda r: (
            "nack:bad record"
            if r.payload == b"p0-2"
            else "leave"
            if r.payload == b"p1-0"
            else "ack"
        )
    )
    handler = KafkaHandler(
        app,
        handle_sigterm=False,
        config=QUICK,
        publisher=capture,
        dead_letter_address="mytopic-dlq",
    )
    result = await handler.handle(load("msk.json"))
    assert result == {"processed": 7, "dead_lettered": 2}
    assert attempts_of(app, b"p1-0") == [1, 2, 3], "unsettled is a nack, retried alike"
    sent = {payload: (address, headers) for address, headers, payload, _ in capture.sent}
    assert set(sent) == {b"p0-2", b"p1-0"}
    address, headers = sent[b"p0-2"]
    assert address == "mytopic-dlq"
    assert (b"amgi-dead-letter-reason", b"bad record") in headers
    assert (b"amgi-original-address", b"mytopic") in headers
    assert (b"amgi-attempt", b"3") in headers, "dead on its last attempt"
    assert capture.connected == 1


async def test_self_managed_kafka_event_and_sends_from_the_app() -> None:
    capture = Capture()
    app = Recorder()
    app.sends = [("out", [(b"h", b"v")], b"reply", {"kafka": {"key": b"k"}})]
    handler = KafkaHandler(app, handle_sigterm=False, publisher=capture)
    assert (await handler.handle(load("self_managed_kafka.json")))["processed"] == 1
    assert app.received[0].payload == b"Hello, this is a test."
    assert capture.sent == [("out", [(b"h", b"v")], b"reply", {"kafka": {"key": b"k"}})]


class SlowCapture(Capture):
    """A capturing publisher whose connect takes a moment: concurrent sends wait for it."""

    async def connect(self) -> None:
        await asyncio.sleep(0.05)
        await super().connect()


def test_a_handler_used_again_after_close_sends_on_its_new_loop() -> None:
    """Both partitions send while the publisher connects, so they contend for the lock
    that guards it; after close() a new loop must not meet the old loop's lock."""
    capture = SlowCapture()
    errors: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        event = await receive()
        try:
            await send({"type": "message.send", "address": "out", "headers": [], "payload": b"x"})
        except Exception as exc:
            errors.append(exc)
        await send({"type": "message.ack", "id": event["id"]})

    event = load("msk.json")
    for records in event["records"].values():
        del records[1:]  # one record per partition: one send each
    handler = KafkaHandler(app, handle_sigterm=False, publisher=capture)
    for _ in range(2):
        assert handler(event, None) == {"processed": 2, "dead_lettered": 0}
        handler.close()
    assert errors == []
    assert len(capture.sent) == 4
    assert capture.connected == 2, "connected once on each loop"


async def test_unfinished_partitions_at_the_deadline_fail_the_invocation() -> None:
    never = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "message":
            await receive()
            await never.wait()

    class Context:
        def get_remaining_time_in_millis(self) -> int:
            return 500

    handler = KafkaHandler(app, handle_sigterm=False, deadline_margin=0.2)
    with pytest.raises(BatchFailed, match="cancelled"):
        await handler.handle(load("msk.json"), Context())


async def test_records_cut_by_the_deadline_are_retried_never_dead_lettered() -> None:
    seen: list[bytes | None] = []
    app = settling_app(stall=b"p0-0", seen=seen)  # one slow downstream call
    capture = Capture()
    handler = KafkaHandler(
        app,
        handle_sigterm=False,
        publisher=capture,
        dead_letter_address="mytopic-dlq",
        deadline_margin=0.3,
    )
    with pytest.raises(BatchFailed, match=r"4 record.* not finished in this invocation"):
        await handler.handle(load("msk.json"), Context(0.8))
    assert capture.sent == [], "neither the slow record nor those never received"
    assert b"p0-1" not in seen
    assert sorted(seen, key=repr) == sorted([b"p0-0", b"p1-0", b"p1-1", None], key=repr)


def nacking_for_good(extensions: list[Any]) -> Any:
    """An app that nacks p0-2 with ``retry: False`` and acks the rest."""
    return settling_app(final=lambda payload: payload == b"p0-2", extensions=extensions)


async def test_retry_false_is_advertised_only_with_a_dead_letter_address() -> None:
    extensions: list[Any] = []
    with pytest.raises(BatchFailed, match="bad schema"):
        await KafkaHandler(nacking_for_good(extensions), handle_sigterm=False, config=QUICK).handle(
            load("msk.json")
        )
    assert extensions == [None, None]

    extensions.clear()
    capture = Capture()
    handler = KafkaHandler(
        nacking_for_good(extensions),
        handle_sigterm=False,
        publisher=capture,
        dead_letter_address="mytopic-dlq",
    )
    assert await handler.handle(load("msk.json")) == {"processed": 7, "dead_lettered": 1}
    assert extensions == [{"message.nack.retry": {}}] * 2
    ((address, headers, payload, _),) = capture.sent
    assert (address, payload) == ("mytopic-dlq", b"p0-2")
    assert (b"amgi-dead-letter-reason", b"bad schema") in headers


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.pop("records"), "'records' object"),
        (lambda e: e.update(eventSource="aws:sqs"), "not a Kafka event"),
        (
            lambda e: e["records"]["mytopic-0"][0].update(value="%%%"),
            "value is not a base64 string",
        ),
        (lambda e: e["records"]["mytopic-0"][0].update(headers=[{"h": "text"}]), "byte array"),
        (lambda e: e["records"]["mytopic-0"][0].update(headers=[{"h": [1, 256]}]), "byte array"),
        (lambda e: e["records"]["mytopic-0"][0].update(headers=[{"h": [1, "2"]}]), "byte array"),
        (lambda e: e["records"]["mytopic-0"][1].update(partition=1), "not of partition"),
        (lambda e: e["records"]["mytopic-0"][0].pop("offset"), "integer 'offset'"),
        (lambda e: e["records"].update({"mytopic-0": {}}), "is not a list"),
    ],
)
async def test_a_malformed_event_is_a_clear_error_and_nothing_is_processed(
    mutate: Any, message: str
) -> None:
    event = copy.deepcopy(load("msk.json"))
    mutate(event)
    app = Recorder()
    with pytest.raises(MalformedEvent, match=message):
        await KafkaHandler(app, handle_sigterm=False).handle(event)
    assert app.received == []


async def test_a_send_without_bootstrap_servers_is_a_kafka_send_error_in_the_app() -> None:
    event = copy.deepcopy(load("msk.json"))
    del event["bootstrapServers"]
    app = SendingApp("out")
    handler = KafkaHandler(app, handle_sigterm=False, config=RuntimeConfig(max_attempts=1))
    with pytest.raises(BatchFailed):
        await handler.handle(event)
    assert len(app.errors) == 7
    assert all(type(e) is servers.load("kafka").send_error for e in app.errors)
    assert all("names no bootstrapServers" in str(e) for e in app.errors)


async def test_a_publisher_factory_that_fails_is_a_send_error_in_the_app() -> None:
    def factory(event: Any) -> Capture:
        raise KeyError("no PUBLISHER_URL")

    app = SendingApp("out")
    config = RuntimeConfig(max_attempts=1)
    handler = KafkaHandler(app, handle_sigterm=False, config=config, publisher=factory)
    with pytest.raises(BatchFailed):
        await handler.handle(load("msk.json"))
    assert len(app.errors) == 7
    assert all(
        "cannot make the publisher to send: 'no PUBLISHER_URL'" in str(e) for e in app.errors
    )


async def test_a_dead_letter_send_that_never_ends_fails_the_invocation_in_time() -> None:
    app = Recorder(lambda r: "nack:bad record" if r.payload == b"p0-2" else "ack")
    handler = KafkaHandler(
        app,
        handle_sigterm=False,
        config=QUICK,
        publisher=Stuck(),
        dead_letter_address="mytopic-dlq",
        deadline_margin=0.5,
    )
    with pytest.raises(BatchFailed, match="dead-letter"):
        await asyncio.wait_for(handler.handle(load("msk.json"), Context(3)), 10)


async def test_a_retry_cut_by_the_deadline_leaves_its_record_nacked_not_looping() -> None:
    # Nacked on attempt 1; its retry is slow (a downstream timeout) and the deadline cuts
    # it. Failing the invocation would start the batch over at attempt 1, every time.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        more = True
        while more:
            event = await receive()
            more = event["more_messages"]
            if event["payload"] != b"p0-2":
                await send({"type": "message.ack", "id": event["id"]})
            elif event["bindings"]["amgi"]["attempt"] == 1:
                await send({"type": "message.nack", "id": event["id"], "message": "bad record"})
            else:
                await asyncio.sleep(30)

    capture = Capture()
    handler = KafkaHandler(
        app,
        handle_sigterm=False,
        config=QUICK,
        publisher=capture,
        dead_letter_address="mytopic-dlq",
        deadline_margin=0.3,
    )
    result = await handler.handle(load("msk.json"), Context(1.5))
    assert result == {"processed": 7, "dead_lettered": 1}
    ((address, headers, payload, _),) = capture.sent
    assert (address, payload) == ("mytopic-dlq", b"p0-2")
    assert (b"amgi-dead-letter-reason", b"bad record") in headers
    assert (b"amgi-attempt", b"1") in headers, "the attempt the app nacked"
