"""message.send from inside a Lambda Kafka handler reaches a real Kafka-compatible broker.

The handler builds its publisher from the event's ``bootstrapServers`` (pointed at the test
broker started by scripts/brokers/kafka.sh) and keeps its own event loop, as in Lambda.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any

from amgi.runtime import RuntimeConfig
from amgi.serverless import KafkaHandler
from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope

FIXTURES = Path(__file__).parent / "fixtures"
BROKER = "127.0.0.1:9092"


def consume(topic: str, count: int, timeout: float = 30.0) -> list[Any]:
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": BROKER,
            "group.id": f"lambda-check-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        }
    )
    consumer.subscribe([topic])
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < count and time.monotonic() < deadline:
            records += [r for r in consumer.consume(count, 0.5) if r.error() is None]
    finally:
        consumer.close()
    return records


def test_message_send_from_a_kafka_handler_reaches_the_broker() -> None:
    event = copy.deepcopy(json.loads((FIXTURES / "msk.json").read_text()))
    event["bootstrapServers"] = BROKER
    expected = sum(len(records) for records in event["records"].values())
    out = f"lambda-out-{uuid.uuid4().hex[:8]}"

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        more = True
        while more:
            message: Any = await receive()
            await send(
                {
                    "type": "message.send",
                    "address": out,
                    "headers": [(b"via", b"lambda")],
                    "payload": b"echo:" + (message.get("payload") or b""),
                    "bindings": {"kafka": {"key": b"k-" + message["id"].encode()}},
                }
            )
            await send({"type": "message.ack", "id": message["id"]})
            more = message.get("more_messages", False)

    handler = KafkaHandler(app, handle_sigterm=False)
    try:
        result = handler(event, None)
    finally:
        handler.close()
    assert not result or not result.get("batchItemFailures")
    records = consume(out, expected)
    assert len(records) == expected
    for record in records:
        assert record.value().startswith(b"echo:")
        assert record.headers() == [("via", b"lambda")]
        assert record.key().startswith(b"k-")


def test_a_dead_letter_does_not_inherit_the_source_partition() -> None:
    """A record of partition 3 dead-lettered to a one-partition topic lands in partition 0."""
    from tests.servers.kafka_helpers import create_topic

    dead = create_topic(f"lambda-dlq-{uuid.uuid4().hex[:8]}", partitions=1)
    record = {
        "topic": "orders",
        "partition": 3,
        "offset": 41,
        "timestamp": 1545084651002,
        "timestampType": "CREATE_TIME",
        "key": "a2V5",
        "value": "cG9pc29u",
        "headers": [],
    }
    event = {"eventSource": "aws:kafka", "bootstrapServers": BROKER}
    event["records"] = {"orders-3": [record]}

    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        message: Any = await receive()
        await send({"type": "message.nack", "id": message["id"], "message": "bad"})

    config = RuntimeConfig(max_attempts=1)  # its first nack is its last
    handler = KafkaHandler(app, handle_sigterm=False, config=config, dead_letter_address=dead)
    try:
        result = handler(event, None)
    finally:
        handler.close()
    assert result == {"processed": 1, "dead_lettered": 1}
    (letter,) = consume(dead, 1)
    assert letter.partition() == 0
    assert letter.key() == b"key"
    assert letter.value() == b"poison"
