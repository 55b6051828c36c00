"""The conformance suite against the SQS server on moto (scripts/brokers/moto.sh).

Addresses are FIFO queues with one message group, the SQS way of keeping one producer's
order (a standard queue does not promise order). ``wait_time`` is short because moto
checks a FIFO group's in-flight state once per long poll, and each stop waits for the
long polls in flight.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from amgi.servers.kit import DEAD_LETTER_REASON_HEADER, ORIGINAL_ADDRESS_HEADER
from amgi.servers.sqs import SqsOptions, SqsTransport
from amgi.testing.conformance import (
    ConformanceSuite,
    DeadLetterView,
    DurabilitySuite,
    Harness,
)
from tests.moto_env import ENDPOINT, use_moto_credentials


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    use_moto_credentials(monkeypatch)


class SqsHarness(Harness):
    server = "sqs"
    # Another protocol's binding rides along and must simply be ignored.
    send_bindings = {"sqs": {"message_group_id": "conformance"}, "kafka": {"key": b"k"}}
    redelivery_timeout = 20.0

    def __init__(self) -> None:
        self.prefix = f"conf-{uuid.uuid4().hex[:8]}"
        self.count = 0

    def options(self) -> dict[str, Any]:
        return {"endpoint_url": ENDPOINT, "wait_time": 1, "visibility_timeout": 4}

    async def _client_call(self, method: str, **params: Any) -> Any:
        transport = SqsTransport([], SqsOptions(**self.options()))
        await transport.connect()
        try:
            return await getattr(transport.client, method)(**params)
        finally:
            await transport.close()

    async def new_address(self) -> str:
        self.count += 1
        name = f"{self.prefix}-{self.count}.fifo"
        await self._client_call("create_queue", QueueName=name, Attributes={"FifoQueue": "true"})
        return name

    async def dead_letters(self, address: str, count: int, timeout: float) -> list[DeadLetterView]:
        dlq = address.removesuffix(".fifo") + "-dlq.fifo"
        deadline = time.monotonic() + timeout
        found: list[DeadLetterView] = []
        transport = SqsTransport([dlq], SqsOptions(**self.options()))
        try:
            while True:
                try:
                    await transport.connect()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)  # the queue is made on the first dead letter
            while len(found) < count and time.monotonic() < deadline:
                try:
                    async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                        batches = await transport.fetch()
                except TimeoutError:
                    break
                for batch in batches:
                    for m in batch.messages:
                        meta = dict(m.headers)
                        assert meta[ORIGINAL_ADDRESS_HEADER] == address.encode()
                        reason = meta[DEAD_LETTER_REASON_HEADER].decode()
                        headers = [
                            (n, v)
                            for n, v in m.headers
                            if n not in (DEAD_LETTER_REASON_HEADER, ORIGINAL_ADDRESS_HEADER)
                        ]
                        found.append((headers, m.payload, reason))
        finally:
            await transport.close()
        return found

    def key_bindings(self, key: str) -> dict[str, Any]:
        # One FIFO group holds later messages back behind a failing one (test_sqs.py
        # checks that); the suite's per-key checks use one group per key.
        return {"sqs": {"message_group_id": key}}

    def check_bindings(self, sent: dict[str, Any], received: dict[str, Any]) -> None:
        assert received["sqs"]["message_group_id"] == sent["sqs"]["message_group_id"]
        assert "kafka" not in received


class TestSqsConformance(ConformanceSuite, DurabilitySuite):
    kill_count = 40

    @pytest.fixture
    def harness(self) -> SqsHarness:
        return SqsHarness()
