"""The Lambda SQS adapter on the documented event shapes (fixtures/)."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from amgi.runtime import RuntimeConfig
from amgi.serverless import MalformedEvent, SqsHandler
from amgi.testing.conformance import Received, Recorder
from tests.serverless.helpers import Capture, Context, Stuck, settling_app
from tests.serverless.sending_app import SendingApp

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return event


def failures(result: dict[str, Any]) -> list[str]:
    return [f["itemIdentifier"] for f in result["batchItemFailures"]]


def handler_for(app: Any, **kwargs: Any) -> SqsHandler:
    return SqsHandler(app, handle_sigterm=False, **kwargs)


async def test_records_reach_the_app_as_the_sqs_server_maps_them() -> None:
    app = Recorder()
    handler = handler_for(app)
    result = await handler.handle(load("sqs_standard.json"))
    assert result == {"batchItemFailures": []}
    assert len(app.scopes) == 1, "one app call per batch of records"
    assert app.scopes[0]["address"] == "my-queue"
    first, second, third = app.received
    assert first.payload == b"Test message."
    assert first.headers == [(b"myAttribute", b"myValue")]
    assert first.attempt == 1
    assert first.bindings["sqs"]["message_id"] == "059f36b4-87a3-44ab-83d2-661975830a7d"
    assert first.bindings["sqs"]["attributes"]["SentTimestamp"] == "1545082649183"
    assert second.headers == [(b"count", b"42"), (b"blob", b"\x00\x01\xfe")]
    assert second.bindings["sqs"]["attribute_types"] == {"count": "Number", "blob": "Binary"}
    assert second.attempt == 2
    assert third.payload == b"\xff\xfe binary payload"
    assert third.headers == []
    assert [r.more_messages for r in app.received] == [True, True, False]
    await handler.aclose()


async def test_nacked_unsettled_and_raising_records_are_batch_item_failures() -> None:
    event = load("sqs_standard.json")
    ids = [r["messageId"] for r in event["Records"]]

    def decide(r: Received) -> str:
        return {ids[0]: "ack", ids[1]: "nack:bad", ids[2]: "leave"}[r.id]

    handler = handler_for(Recorder(decide))
    assert failures(await handler.handle(event)) == ids[1:]

    raising = handler_for(Recorder(lambda r: "ack" if r.id == ids[0] else "raise"))
    assert failures(await raising.handle(event)) == ids[1:]


async def test_a_body_md5_mismatch_fails_that_record_only() -> None:
    event = load("sqs_standard.json")
    event["Records"][1]["body"] = "tampered"
    app = Recorder()
    result = await handler_for(app).handle(event)
    assert failures(result) == [event["Records"][1]["messageId"]]
    assert [r.payload for r in app.received] == [b"Test message.", b"\xff\xfe binary payload"]


async def test_fifo_stops_a_group_at_its_first_failure() -> None:
    event = load("sqs_fifo.json")
    records = event["Records"]  # groups: a0 b0 a1 a2 b1 a3
    app = Recorder(lambda r: "nack:a1 broke" if r.payload == b"a1" else "ack")
    result = await handler_for(app).handle(event)
    by_body = {r["messageId"]: r["body"] for r in records}
    assert [by_body[i] for i in failures(result)] == ["a1", "a2", "a3"]
    assert app.received[0].bindings["sqs"]["message_group_id"] == "a"


async def test_a_fair_queue_group_is_not_held_behind_a_failure() -> None:
    """A standard queue's records may carry a MessageGroupId (fair queues): not FIFO, so
    a nack fails that record alone, never the ones the app acked after it."""
    event = load("sqs_standard.json")
    for record in event["Records"]:
        record["attributes"]["MessageGroupId"] = "tenant-1"
    first = event["Records"][0]["messageId"]
    app = Recorder(lambda r: "nack:poison" if r.id == first else "ack")
    result = await handler_for(app).handle(event)
    assert failures(result) == [first]
    assert app.received[1].bindings["sqs"]["message_group_id"] == "tenant-1"


async def test_records_unfinished_at_the_deadline_are_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The record the app never received could be on its last receive: it is sent back
    to the queue when the time left allows. Here it does not (0.1 s): making the client
    alone held the event loop past the deadline, 3.4 s on a busy machine."""
    event = load("sqs_standard.json")
    ids = [r["messageId"] for r in event["Records"]]
    stuck = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        first = await receive()
        await send({"type": "message.ack", "id": first["id"]})
        await receive()
        await stuck.wait()  # never set: the deadline has to end this call

    handler = handler_for(app, deadline_margin=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await handler.handle(event, Context(0.7))
    assert failures(result) == ids[1:]
    assert 0.4 < loop.time() - started < 2.0
    assert "too little to make the source queue's client" in caplog.text
    assert handler._source is None


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.clear(), "'Records' list"),
        (lambda e: e.update(Records="nope"), "'Records' list"),
        (lambda e: e["Records"].append("x"), r"Records\[3\] is not an object"),
        (lambda e: e["Records"][0].pop("body"), r"Records\[0\] has no string 'body'"),
        (
            lambda e: e["Records"][1]["messageAttributes"]["blob"].update(binaryValue="**"),
            "not base64",
        ),
        (lambda e: e["Records"][0].update(eventSource="aws:sns"), "not from SQS"),
        (lambda e: e["Records"][1].update(messageId=e["Records"][0]["messageId"]), "repeats"),
        (
            lambda e: e["Records"][0]["attributes"].update(ApproximateReceiveCount="x"),
            "not a number",
        ),
    ],
)
async def test_a_malformed_event_is_a_clear_error_and_nothing_is_processed(
    mutate: Any, message: str
) -> None:
    event = copy.deepcopy(load("sqs_standard.json"))
    mutate(event)
    app = Recorder()
    with pytest.raises(MalformedEvent, match=message):
        await handler_for(app).handle(event)
    assert app.received == []


async def test_lifespan_runs_once_per_container() -> None:
    app = Recorder()
    handler = handler_for(app)
    for _ in range(3):
        assert failures(await handler.handle(load("sqs_standard.json"))) == []
    assert app.lifespan == ["lifespan.startup"]
    assert all(s["state"]["ready"] is True for s in app.scopes)
    await handler.aclose()
    assert app.lifespan == ["lifespan.startup", "lifespan.shutdown"]


async def test_the_last_allowed_attempt_still_fails_so_the_redrive_policy_acts() -> None:
    event = load("sqs_standard.json")
    app = Recorder(lambda r: "nack:no")
    handler = handler_for(app, config=RuntimeConfig(max_attempts=2))
    result = await handler.handle(event)
    assert len(failures(result)) == 3


def test_sync_entry_point_keeps_one_event_loop_across_invocations() -> None:
    loops: list[asyncio.AbstractEventLoop] = []
    app = Recorder()

    async def spy(scope: Any, receive: Any, send: Any) -> None:
        loops.append(asyncio.get_running_loop())
        await app(scope, receive, send)

    handler = SqsHandler(spy, handle_sigterm=False)
    for _ in range(2):
        assert handler(load("sqs_standard.json"), None) == {"batchItemFailures": []}
    assert len(set(map(id, loops))) == 1
    assert app.lifespan == ["lifespan.startup"]
    handler.close()
    assert app.lifespan == ["lifespan.startup", "lifespan.shutdown"]


def app_nacking_for_good(extensions: list[Any]) -> Any:
    """An app that nacks every message with ``retry: False``."""
    return settling_app(final=lambda _: True, extensions=extensions)


async def test_retry_false_is_not_advertised_without_a_dead_letter_address() -> None:
    event = load("sqs_standard.json")
    extensions: list[Any] = []
    result = await handler_for(app_nacking_for_good(extensions)).handle(event)
    assert extensions == [None], "retry False cannot be honoured: not advertised"
    assert len(failures(result)) == 3  # ordinary failures: the redrive policy acts


async def test_retry_false_goes_to_the_dead_letter_address_at_once() -> None:
    event = load("sqs_standard.json")
    ids = [r["messageId"] for r in event["Records"]]
    capture = Capture()
    extensions: list[Any] = []
    handler = handler_for(
        app_nacking_for_good(extensions), publisher=capture, dead_letter_address="my-queue-dlq"
    )
    result = await handler.handle(event)
    assert extensions == [{"message.nack.retry": {}}]
    assert failures(result) == [], "dead-lettered at once: Lambda deletes them"
    assert [payload for _, _, payload, _ in capture.sent] == [
        b"Test message.",
        b"Test message 2.",
        b"\xff\xfe binary payload",
    ]
    address, headers, _, bindings = capture.sent[1]
    assert address == "my-queue-dlq"
    assert (b"amgi-dead-letter-reason", b"bad schema") in headers
    assert (b"amgi-original-address", b"my-queue") in headers
    assert (b"amgi-attempt", b"2") in headers
    assert bindings["sqs"]["attribute_types"] == {"count": "Number", "blob": "Binary"}

    capture.fail = True  # a dead letter that cannot be sent comes back through SQS
    assert failures(await handler.handle(event)) == ids


@pytest.mark.parametrize(
    ("attributes", "why"),
    [
        ({"amgi-body-encoding": {"stringValue": "gzip", "dataType": "String"}}, "gzip"),
        (
            {"amgi-headers": {"binaryValue": "AAAACWFiYw==", "dataType": "Binary"}},
            "amgi-headers is not packed headers",
        ),
        (
            {"amgi-headers": {"stringValue": "hello", "dataType": "String"}},
            "amgi-headers is not packed headers",
        ),
    ],
)
async def test_content_that_does_not_decode_fails_that_record_only(
    attributes: dict[str, Any], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    event = load("sqs_standard.json")
    bad = event["Records"][0]
    bad["messageAttributes"] = attributes
    app = Recorder()
    result = await handler_for(app).handle(event)
    assert failures(result) == [bad["messageId"]]
    assert [r.id for r in app.received] == [r["messageId"] for r in event["Records"][1:]]
    (logged,) = [r.getMessage() for r in caplog.records if bad["messageId"] in r.getMessage()]
    assert why in logged


@pytest.mark.parametrize("damage", ["md5", "content"])
async def test_fifo_a_record_failed_before_the_app_holds_its_group_back(damage: str) -> None:
    event = load("sqs_fifo.json")
    records = event["Records"]  # groups: a0 b0 a1 a2 b1 a3
    a1 = next(r for r in records if r["body"] == "a1")
    if damage == "md5":
        a1["md5OfBody"] = "0" * 32
    else:
        a1["messageAttributes"] = {
            "amgi-body-encoding": {"stringValue": "zz", "dataType": "String"}
        }
    app = Recorder()
    result = await handler_for(app).handle(event)
    by_id = {r["messageId"]: r["body"] for r in records}
    assert app.payloads() == [b"a0", b"b0", b"b1"], "a2 and a3 never reach the app before a1"
    assert [by_id[i] for i in failures(result)] == ["a1", "a2", "a3"]


async def test_a_dead_letter_send_that_never_ends_fails_the_record_in_time() -> None:
    event = load("sqs_standard.json")
    ids = [r["messageId"] for r in event["Records"]]
    handler = handler_for(
        app_nacking_for_good([]),
        publisher=Stuck(),
        dead_letter_address="my-queue-dlq",
        deadline_margin=0.5,
    )
    # Within the invocation's time, not killed by Lambda: SQS redelivers them.
    result = await asyncio.wait_for(handler.handle(event, Context(1.5)), 10)
    assert failures(result) == ids


async def test_fifo_dead_letters_of_a_group_stop_at_the_first_that_cannot_be_sent() -> None:
    # What comes back behind an unsent dead letter must not already be in the DLQ: it
    # would be there twice, and ahead of the one before it in its group.
    event = load("sqs_fifo.json")
    ids = [r["messageId"] for r in event["Records"]]

    class RefusingA1(Capture):
        async def publish(self, address: str, headers: Any, payload: Any, bindings: Any) -> None:
            if payload == b"a1":
                raise ConnectionError("throttled")
            await super().publish(address, headers, payload, bindings)

    capture = RefusingA1()
    handler = handler_for(
        app_nacking_for_good([]), publisher=capture, dead_letter_address="dlq.fifo"
    )
    result = await handler.handle(event)
    assert failures(result) == [ids[2], ids[3], ids[5]], "a1 and the rest of group a"
    assert sorted(payload for _, _, payload, _ in capture.sent) == [b"a0", b"b0", b"b1"]


async def test_a_connect_cut_by_the_deadline_closes_the_half_connected_publisher() -> None:
    class SlowToConnect(Capture):
        def __init__(self) -> None:
            super().__init__()
            self.closed = 0

        async def connect(self) -> None:
            self.connected += 1
            if self.connected == 1:
                await asyncio.sleep(30)  # a broker that accepts and never answers

        async def close(self) -> None:
            self.closed += 1

    publisher = SlowToConnect()
    handler = handler_for(SendingApp("replies"), publisher=publisher, deadline_margin=0.4)
    event = load("sqs_standard.json")
    result = await handler.handle(event, Context(1.0))
    assert len(failures(result)) == 3
    assert publisher.closed == 1, "what the cut connect opened is closed, not leaked"
    assert failures(await handler.handle(event, Context(5))) == []
    assert len(publisher.sent) == 3
