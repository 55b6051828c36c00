"""The Lambda Kafka adapter on the documented MSK and self-managed Kafka event shapes."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from amgi.serverless import BatchFailed, KafkaHandler, MalformedEvent
from amgi.testing.conformance import Recorder
from amgi.transport import Bindings, HeaderList, Transport

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return event


class Capture(Transport):
    """A publisher that keeps what it was given."""

    name = "capture"
    options = dict

    def __init__(self) -> None:
        super().__init__([], {})
        self.sent: list[tuple[str, HeaderList, bytes | None, Bindings]] = []
        self.connected = 0

    async def connect(self) -> None:
        self.connected += 1

    async def fetch(self) -> Any:
        raise NotImplementedError

    async def settle(self, batch: Any, settlement: Any) -> None:
        raise NotImplementedError

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        self.sent.append((address, headers, payload, bindings))

    async def close(self) -> None:
        pass


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


async def test_a_nack_fails_the_invocation_so_lambda_retries() -> None:
    app = Recorder(lambda r: "nack:bad record" if r.payload == b"p0-2" else "ack")
    handler = KafkaHandler(app, handle_sigterm=False)
    with pytest.raises(BatchFailed, match="bad record"):
        await handler.handle(load("msk.json"))


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
        app, handle_sigterm=False, publisher=capture, dead_letter_address="mytopic-dlq"
    )
    result = await handler.handle(load("msk.json"))
    assert result == {"processed": 7, "dead_lettered": 2}
    sent = {payload: (address, headers) for address, headers, payload, _ in capture.sent}
    assert set(sent) == {b"p0-2", b"p1-0"}
    address, headers = sent[b"p0-2"]
    assert address == "mytopic-dlq"
    assert (b"amgi-dead-letter-reason", b"bad record") in headers
    assert (b"amgi-original-address", b"mytopic") in headers
    assert capture.connected == 1


async def test_self_managed_kafka_event_and_sends_from_the_app() -> None:
    capture = Capture()
    app = Recorder()
    app.sends = [("out", [(b"h", b"v")], b"reply", {"kafka": {"key": b"k"}})]
    handler = KafkaHandler(app, handle_sigterm=False, publisher=capture)
    assert (await handler.handle(load("self_managed_kafka.json")))["processed"] == 1
    assert app.received[0].payload == b"Hello, this is a test."
    assert capture.sent == [("out", [(b"h", b"v")], b"reply", {"kafka": {"key": b"k"}})]


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
