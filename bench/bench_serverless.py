"""Overhead of the Lambda adapters per record, in-process (no AWS, no broker).

Each row runs invocations of one event shape through the same persistent event loop:

* ``amgi SqsHandler`` / ``amgi KafkaHandler``: the adapter with a raw AMGI app that
  receives and acks every message;
* ``hand-written``: the minimal asyncio handler a user would write without AMGI: it loops
  over the records, decodes body/attributes (SQS) or base64 key/value/headers (Kafka),
  calls an async no-op per record and returns the (empty) failure list;
* ``batch protocol``: the AMGI batch call alone (``call_app``) over the same records
  already mapped to messages: what any AMGI adapter pays before reading a single record.

Run: ``.venv/bin/python bench/bench_serverless.py [--seconds S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import time
from collections.abc import Callable
from typing import Any

from amgi.runtime import RuntimeConfig, call_app
from amgi.serverless import KafkaHandler, SqsHandler
from amgi.serverless.kafka import kafka_batches
from amgi.transport import Batch


async def acking_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "message":
        return  # no lifespan
    while True:
        event = await receive()
        await send({"type": "message.ack", "id": event["id"]})
        if not event.get("more_messages"):
            return


def sqs_event(n: int) -> dict[str, Any]:
    records = []
    for i in range(n):
        body = f'{{"order": {i}, "item": "widget", "quantity": 3}}'
        records.append(
            {
                "messageId": f"00000000-0000-0000-0000-{i:012d}",
                "receiptHandle": f"AQEB{i:08d}",
                "body": body,
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": "1545082649183",
                    "SenderId": "AIDAIENQZJOLO23YVJ4VO",
                    "ApproximateFirstReceiveTimestamp": "1545082649185",
                },
                "messageAttributes": {
                    "trace": {
                        "stringValue": f"t-{i}",
                        "stringListValues": [],
                        "binaryListValues": [],
                        "dataType": "String",
                    }
                },
                "md5OfBody": hashlib.md5(body.encode()).hexdigest(),
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-2:123456789012:my-queue",
                "awsRegion": "us-east-2",
            }
        )
    return {"Records": records}


def kafka_event(n: int, partitions: int = 2) -> dict[str, Any]:
    records: dict[str, list[dict[str, Any]]] = {}
    for i in range(n):
        p = i % partitions
        records.setdefault(f"orders-{p}", []).append(
            {
                "topic": "orders",
                "partition": p,
                "offset": i,
                "timestamp": 1545084650987,
                "timestampType": "CREATE_TIME",
                "key": base64.b64encode(b"key-%d" % i).decode(),
                "value": base64.b64encode(b'{"order": %d, "item": "widget"}' % i).decode(),
                "headers": [{"trace": list(b"t-%d" % i)}],
            }
        )
    return {"eventSource": "aws:kafka", "bootstrapServers": "b-1:9092", "records": records}


async def _noop(payload: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    return None


def hand_written_sqs(loop: asyncio.AbstractEventLoop) -> Callable[[Any, Any], Any]:
    async def run(event: dict[str, Any]) -> dict[str, Any]:
        failures: list[dict[str, str]] = []
        for record in event["Records"]:
            headers = [
                (name.encode(), a["stringValue"].encode())
                for name, a in record["messageAttributes"].items()
            ]
            try:
                await _noop(record["body"].encode(), headers)
            except Exception:
                failures.append({"itemIdentifier": record["messageId"]})
        return {"batchItemFailures": failures}

    return lambda event, context: loop.run_until_complete(run(event))


def hand_written_kafka(loop: asyncio.AbstractEventLoop) -> Callable[[Any, Any], Any]:
    async def run(event: dict[str, Any]) -> None:
        for records in event["records"].values():
            for r in records:
                headers = [(k.encode(), bytes(v)) for h in r["headers"] for k, v in h.items()]
                await _noop(base64.b64decode(r["value"]), headers)
                base64.b64decode(r["key"])

    return lambda event, context: loop.run_until_complete(run(event))


def batch_protocol(
    loop: asyncio.AbstractEventLoop, batches: list[Batch], config: RuntimeConfig
) -> Callable[[Any, Any], Any]:
    """``call_app`` over pre-mapped messages, one call per batch, as the adapters make it."""

    async def publish(*args: Any) -> None:
        return None

    async def run() -> None:
        for batch in batches:
            await call_app(acking_app, Batch(batch.address, batch.messages), publish, config)

    return lambda event, context: loop.run_until_complete(run())


def measure(handler: Callable[[Any, Any], Any], event: Any, records: int, seconds: float) -> float:
    """Records per second over repeated invocations (best of three rounds)."""
    for _ in range(20):
        handler(event, None)
    best = 0.0
    for _ in range(3):
        count = 0
        start = time.perf_counter()
        deadline = start + seconds / 3
        while time.perf_counter() < deadline:
            handler(event, None)
            count += records
        best = max(best, count / (time.perf_counter() - start))
    return best


def row(
    name: str,
    event: dict[str, Any],
    records: int,
    hand_written: Callable[[asyncio.AbstractEventLoop], Callable[[Any, Any], Any]],
    adapter: type[SqsHandler] | type[KafkaHandler],
    premapped: list[Batch],
    config: RuntimeConfig,
    args: argparse.Namespace,
) -> tuple[str, float, float, float]:
    """One table row: the adapter, the hand-written loop and the batch protocol alone."""
    loop = asyncio.new_event_loop()
    raw = measure(hand_written(loop), event, records, args.seconds)
    premapped = (
        [Batch("q", SqsHandler._records(event))] if adapter is SqsHandler else kafka_batches(event)
    )
    floor = measure(batch_protocol(loop, premapped, config), event, records, args.seconds)
    loop.close()
    handler = adapter(acking_app, config=config, handle_sigterm=False)
    ours = measure(handler, event, records, args.seconds)
    handler.close()
    return name, ours, raw, floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per row")
    args = parser.parse_args()
    config = RuntimeConfig(lifespan="off")
    rows = []
    for n in (10, 100):
        event = sqs_event(n)
        premapped = [Batch("q", SqsHandler._records(event))]
        name = f"SQS, {n} records"
        rows.append(row(name, event, n, hand_written_sqs, SqsHandler, premapped, config, args))
    for n in (100, 500):
        event = kafka_event(n)
        name = f"Kafka, {n} records, 2 partitions"
        batches = kafka_batches(event)
        rows.append(row(name, event, n, hand_written_kafka, KafkaHandler, batches, config, args))

    print(
        f"{'event':<32} {'amgi rec/s':>12} {'hand rec/s':>12} {'amgi us/rec':>12} "
        f"{'hand us/rec':>12} {'protocol us/rec':>16} {'amgi/hand':>10} {'protocol/hand':>14}"
    )
    for name, ours, raw, floor in rows:
        print(
            f"{name:<32} {ours:>12,.0f} {raw:>12,.0f} {1e6 / ours:>12.2f} "
            f"{1e6 / raw:>12.2f} {1e6 / floor:>16.2f} {ours / raw:>10.0%} {floor / raw:>14.0%}"
        )


if __name__ == "__main__":
    main()
