"""The conformance and durability suites against a real RabbitMQ."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from amgi.servers.amqp import table_to_headers
from amgi.testing.conformance import ConformanceSuite, DeadLetterView, DurabilitySuite, Harness
from tests.servers.test_amqp_support import URL, drain, new_queue, rabbitmq

__all__ = ["rabbitmq"]

pytestmark = pytest.mark.usefixtures("rabbitmq")


class AmqpHarness(Harness):
    server = "amqp"
    send_bindings: ClassVar[dict[str, dict[str, Any]]] = {
        "amqp": {
            "contentType": "application/octet-stream",
            "contentEncoding": "identity",
            "correlationId": "corr-7",
            "replyTo": "replies",
            "messageId": "msg-7",
            "messageType": "conformance.sent",
            "appId": "conformance",
            "priority": 5,
            "timestamp": 1_700_000_000,
            "expiration": 600_000,
        },
        "mqtt": {"qos": 1},
    }
    redelivery_timeout = 10.0
    startup_timeout = 20.0

    def options(self) -> dict[str, Any]:
        return {"url": URL, "batch_size": 7, "linger": 0.005}

    async def new_address(self) -> str:
        import aiormq

        name = new_queue()
        connection = await aiormq.connect(URL)
        try:
            channel = await connection.channel()
            await channel.queue_declare(name, durable=True)
        finally:
            await connection.close()
        return name

    async def dead_letters(self, address: str, count: int, timeout: float) -> list[DeadLetterView]:
        found = await drain(f"{address}.dead-letter", count, timeout)
        views: list[DeadLetterView] = []
        for delivered in found:
            _, headers = table_to_headers(delivered.header.properties.headers)
            reason = dict(headers).get(b"amgi-dead-letter-reason", b"").decode()
            views.append((headers, delivered.body, reason))
        return views

    def check_bindings(self, sent: dict[str, Any], received: dict[str, Any]) -> None:
        for key, value in sent["amqp"].items():
            assert received["amqp"][key] == value, key
        assert received["amqp"]["routingKey"]
        assert received["amqp"]["redelivered"] is False


class TestAmqpConformance(ConformanceSuite, DurabilitySuite):
    @pytest.fixture
    def harness(self) -> AmqpHarness:
        return AmqpHarness()
