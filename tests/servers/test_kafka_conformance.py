"""The conformance and durability suites against the Kafka test broker."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest

from amgi.servers.kit import DEAD_LETTER_REASON_HEADER
from amgi.testing.conformance import ConformanceSuite, DeadLetterView, DurabilitySuite, Harness
from tests.servers.kafka_helpers import BOOTSTRAP, create_topic, ensure_broker, fresh, read_all


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


class KafkaHarness(Harness):
    server = "kafka"
    send_bindings: ClassVar[dict[str, dict[str, Any]]] = {
        "kafka": {"key": b"order-7", "partition": 0},
        "amqp": {"priority": 5},
    }
    redelivery_timeout = 15.0
    startup_timeout = 20.0

    def __init__(self) -> None:
        self.group = fresh("group")

    def options(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": BOOTSTRAP,
            "group_id": self.group,
            "session_timeout_ms": 1000,
            "heartbeat_interval_ms": 200,
        }

    async def new_address(self) -> str:
        return await asyncio.to_thread(create_topic, fresh("conf"), 1)

    async def dead_letters(self, address: str, count: int, timeout: float) -> list[DeadLetterView]:
        records = await asyncio.to_thread(read_all, f"{address}.dlq", count, timeout)
        views: list[DeadLetterView] = []
        for record in records:
            headers = [(n.encode(), v or b"") for n, v in record.headers() or []]
            reason = dict(headers).get(DEAD_LETTER_REASON_HEADER, b"").decode()
            views.append((headers, record.value(), reason))
        return views

    def check_bindings(self, sent: dict[str, Any], received: dict[str, Any]) -> None:
        assert received["kafka"]["key"] == sent["kafka"]["key"]
        assert received["kafka"]["partition"] == sent["kafka"]["partition"]
        assert isinstance(received["kafka"]["offset"], int)


class TestKafkaConformance(ConformanceSuite, DurabilitySuite):
    @pytest.fixture
    def harness(self) -> KafkaHarness:
        return KafkaHarness()
