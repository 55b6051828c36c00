"""Send routing in a Lambda adapter: an SQS-triggered function publishes to the real Kafka
broker for the addresses its routes match, and to its usual publisher for the rest."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from amgi.options import build
from amgi.runtime import RuntimeConfig
from amgi.runtime.routing import Router
from amgi.serverless import KafkaHandler, SqsHandler
from amgi.servers import load
from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport
from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope
from tests.net import free_port
from tests.serverless.sending_app import SendingApp
from tests.serverless.test_lambda_on_kafka import BROKER, consume

FIXTURES = Path(__file__).parent / "fixtures"


def test_an_sqs_handler_routes_sends_to_kafka() -> None:
    event = copy.deepcopy(json.loads((FIXTURES / "sqs_standard.json").read_text()))
    count = len(event["Records"])
    topic = f"sqs-to-kafka-{uuid.uuid4().hex[:8]}"
    fallback = MemoryBroker.reset("lambda-fallback")

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        more = True
        while more:
            message: Any = await receive()
            for address in (topic, "local.audit"):
                await send(
                    {
                        "type": "message.send",
                        "address": address,
                        "headers": [(b"from", b"sqs")],
                        "payload": message.get("payload"),
                        "bindings": {"kafka": {"key": message["id"].encode()}},
                    }
                )
            await send({"type": "message.ack", "id": message["id"]})
            more = message.get("more_messages", False)

    kafka = load("kafka")
    routes = Router(
        [("sqs-to-kafka-*", kafka([], build(kafka.options, {"bootstrap_servers": BROKER})))]
    )
    handler = SqsHandler(
        app,
        routes=routes,
        publisher=MemoryTransport([], MemoryOptions(broker="lambda-fallback")),
        handle_sigterm=False,
    )
    try:
        result = handler(event, None)
    finally:
        handler.close()
    assert result == {"batchItemFailures": []}
    records = consume(topic, count)
    assert len(records) == count
    assert {r.key().decode() for r in records} == {r["messageId"] for r in event["Records"]}
    assert all(r.headers() == [("from", b"sqs")] for r in records)
    assert fallback.pending("local.audit") == count
    assert fallback.pending(topic) == 0


def test_a_kafka_handler_routes_sends_too() -> None:
    event = copy.deepcopy(json.loads((FIXTURES / "msk.json").read_text()))
    event["bootstrapServers"] = BROKER
    count = sum(len(records) for records in event["records"].values())
    routed = MemoryBroker.reset("lambda-routed")
    topic = f"kafka-default-{uuid.uuid4().hex[:8]}"

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        batch: list[Any] = []
        while not batch or batch[-1].get("more_messages", False):
            batch.append(await receive())
        for message in batch:
            for address in ("audit.kafka", topic):
                payload = message.get("payload")
                await send(
                    {"type": "message.send", "address": address, "headers": [], "payload": payload}
                )
            await send({"type": "message.ack", "id": message["id"]})

    routes = Router([("audit.*", MemoryTransport([], MemoryOptions(broker="lambda-routed")))])
    handler = KafkaHandler(app, routes=routes, handle_sigterm=False)
    try:
        result = handler(event, None)
    finally:
        handler.close()
    assert not result or not result.get("batchItemFailures")
    assert routed.pending("audit.kafka") == count
    assert len(consume(topic, count)) == count  # unrouted: the event's own cluster


def test_an_unreachable_route_is_a_send_error_in_the_app_and_the_records_fail() -> None:
    event = copy.deepcopy(json.loads((FIXTURES / "sqs_standard.json").read_text()))
    app = SendingApp("out-1")

    kafka = load("kafka")
    options = build(kafka.options, {"bootstrap_servers": "127.0.0.1:1", "connect_timeout": 1.0})
    handler = SqsHandler(app, routes=Router([("out-*", kafka([], options))]), handle_sigterm=False)
    try:
        first = handler(event, None)
        second = handler(event, None)  # tried again on the next invocation, fails again
    finally:
        handler.close()
    ids = [{"itemIdentifier": r["messageId"]} for r in event["Records"]]
    assert first == second == {"batchItemFailures": ids}
    errors = [str(e) for e in app.errors]
    assert errors
    assert all("cannot connect to send" in e and "127.0.0.1:1" in e for e in errors)


def test_a_route_that_cannot_connect_fails_only_the_sends_routed_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis down, Kafka up: every send to Kafka arrives, Kafka connects once (for the two
    partitions' concurrent first sends) and stays connected across invocations; each send
    to Redis fails with Redis's own error, its connect tried again every time."""
    event = copy.deepcopy(json.loads((FIXTURES / "msk.json").read_text()))
    event["bootstrapServers"] = BROKER
    count = sum(len(records) for records in event["records"].values())
    topic = f"routed-ok-{uuid.uuid4().hex[:8]}"
    errors: list[OSError] = []

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        more = True
        while more:
            message: Any = await receive()
            more = message.get("more_messages", False)
            await send({"type": "message.send", "address": topic, "headers": [], "payload": b"x"})
            try:
                await send({"type": "message.send", "address": "audit.x", "headers": []})
            except OSError as exc:
                errors.append(exc)
            await send({"type": "message.ack", "id": message["id"]})

    kafka, redis = load("kafka"), load("redis")
    healthy = kafka([], build(kafka.options, {"bootstrap_servers": BROKER}))
    down = redis([], build(redis.options, {"url": f"redis://127.0.0.1:{free_port()}/0"}))
    connects = {"kafka": 0, "redis": 0}
    for transport in (healthy, down):
        connect = transport.connect

        async def counted(connect: Any = connect, name: str = transport.name) -> None:
            connects[name] += 1
            await connect()

        monkeypatch.setattr(transport, "connect", counted)
    routes = Router([("routed-ok-*", healthy), ("audit.*", down)])
    config = RuntimeConfig(max_attempts=1)
    handler = KafkaHandler(app, routes=routes, config=config, handle_sigterm=False)
    try:
        for _ in range(2):
            assert handler(event, None) == {"processed": count, "dead_lettered": 0}
    finally:
        handler.close()
    assert len(consume(topic, 2 * count)) == 2 * count
    assert connects == {"kafka": 1, "redis": 2 * count}
    assert len(errors) == 2 * count
    assert all(type(e) is redis.send_error for e in errors)
    assert all(str(e).startswith("redis: cannot connect to send:") for e in errors)
