"""A measuring prototype, not a server: our runtime over aiokafka, for bench_kafka.py.

Issue #17 asks to measure confluent-kafka and aiokafka *under our server* before choosing.
This transport is the least a Kafka transport does on aiokafka, single-threaded: one
consumer on the event loop, ``getmany`` (at most ``MAX_RECORDS`` records), the product's
own record mapping (:func:`amgi.servers.kafka.records.message_from_record`), one batch
per partition (the partition is the ordering key), and after each batch one commit of
its last offset + 1 on a background task (so the next fetch does not wait for it). It has
none of the rebalance safety, retries, dead letters or reconnects of the real server:
those cost nothing in a drain that acks everything, so the prototype is an upper bound
for a server on aiokafka. It runs in ``.venv-bench`` (aiokafka, no confluent-kafka)
with ``src`` on the path, started like ``amgi run`` (INFO logging, GC tuning).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from amgi.servers.kafka.options import KafkaOptions
from amgi.servers.kafka.records import message_from_record
from amgi.transport import Batch, Bindings, HeaderList, Settlement, Transport

MAX_RECORDS = 1000
"""Records per ``getmany``: the real server's default batch size."""


class AioKafkaPrototype(Transport):
    """See the module docstring."""

    name = "kafka-aiokafka-prototype"
    options = KafkaOptions

    def __init__(
        self, topic: str, bootstrap: str, group: str, session_ms: int, beat_ms: int
    ) -> None:
        super().__init__([topic], KafkaOptions(bootstrap_servers=bootstrap, group_id=group))
        self.topic = topic
        self._settings = {
            "bootstrap_servers": bootstrap,
            "group_id": group,
            "auto_offset_reset": "earliest",
            "enable_auto_commit": False,
            "session_timeout_ms": session_ms,
            "heartbeat_interval_ms": beat_ms,
        }
        self._consumer: Any = None
        self._commits: set[asyncio.Task[None]] = set()

    async def connect(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self._consumer = AIOKafkaConsumer(self.topic, **self._settings)
        await self._consumer.start()

    async def fetch(self) -> Sequence[Batch]:
        topic = self.topic
        while True:
            fetched = await self._consumer.getmany(timeout_ms=100, max_records=MAX_RECORDS)
            batches = []
            for tp, records in fetched.items():
                messages = [
                    message_from_record(
                        topic, r.partition, r.offset, r.timestamp, r.key, r.value, r.headers
                    )
                    for r in records
                ]
                batches.append(Batch(topic, messages, key=tp.partition, context=tp))
            if batches:
                return batches

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        # The bench app acks everything: commit past the batch, in the background.
        last = batch.messages[-1].token
        task = asyncio.create_task(self._consumer.commit({batch.context: last + 1}))
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        raise NotImplementedError("the prototype only consumes")

    async def close(self) -> None:
        if self._commits:
            await asyncio.gather(*self._commits, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()


def run(app: Any, bootstrap: str, topic: str, group: str, session_ms: int, beat_ms: int) -> None:
    """Serve ``app`` on the prototype as ``amgi run`` would (INFO logging, GC tuning)."""
    from amgi.ops.logs import configure_logging
    from amgi.runtime import Runtime, RuntimeConfig
    from amgi.runtime.gc import tune_for_server

    configure_logging("info", "text")
    transport = AioKafkaPrototype(topic, bootstrap, group, session_ms, beat_ms)
    runtime = Runtime(app, transport, RuntimeConfig(), handle_signals=True)
    tune_for_server()
    asyncio.run(runtime.serve())
