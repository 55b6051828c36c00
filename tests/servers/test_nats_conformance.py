"""The conformance and durability suites against a real nats-server (JetStream mode)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from amgi.testing.conformance import ConformanceSuite, DeadLetterView, DurabilitySuite, Harness
from tests.servers.nats_helpers import (
    PREFIX,
    URL,
    ensure_broker,
    ensure_stream,
    fresh,
    read_subject,
)


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


class NatsHarness(Harness):
    server = "nats"
    # A fresh id per run: JetStream drops a message whose id it saw in the last minutes.
    send_bindings: ClassVar[dict[str, dict[str, Any]]] = {"nats": {"msgId": fresh("msg")}}
    redelivery_timeout = 10.0
    startup_timeout = 20.0

    def __init__(self) -> None:
        self.durable = fresh("durable")

    def options(self) -> dict[str, Any]:
        return {
            "servers": URL,
            "durable": self.durable,
            "batch_size": 7,
            "fetch_expiry": 0.2,
            "ack_wait": 2.0,
        }

    async def new_address(self) -> str:
        await ensure_stream()
        return f"{PREFIX}.{fresh('subject')}"

    async def dead_letters(self, address: str, count: int, timeout: float) -> list[DeadLetterView]:
        found = await read_subject(f"{address}.dlq", count, timeout)
        views: list[DeadLetterView] = []
        for headers, payload, _ in found:
            reason = dict(headers).get(b"amgi-dead-letter-reason", b"").decode()
            views.append((headers, payload, reason))
        return views

    def check_bindings(self, sent: dict[str, Any], received: dict[str, Any]) -> None:
        assert received["nats"]["msgId"] == sent["nats"]["msgId"]
        assert received["nats"]["sequence"] >= 1
        assert received["nats"]["stream"] == "AMGI_TEST"


class TestNatsConformance(ConformanceSuite, DurabilitySuite):
    @pytest.fixture
    def harness(self) -> NatsHarness:
        return NatsHarness()
