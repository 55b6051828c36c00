"""The conformance and durability suites against a real Redis (streams mode)."""

from __future__ import annotations

from typing import Any

import pytest

from amgi.testing.conformance import ConformanceSuite, DeadLetterView, DurabilitySuite, Harness
from tests.servers.redis_helpers import URL, ensure_broker, fresh, wait_entries


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


class RedisHarness(Harness):
    server = "redis"
    redelivery_timeout = 10.0
    startup_timeout = 20.0

    def __init__(self) -> None:
        self.group = fresh("group")

    def options(self) -> dict[str, Any]:
        return {"url": URL, "group": self.group, "batch_size": 7, "block": 0.2, "claim_idle": 2.0}

    async def new_address(self) -> str:
        return fresh("stream")

    async def dead_letters(self, address: str, count: int, timeout: float) -> list[DeadLetterView]:
        found = await wait_entries(f"{address}.dlq", count, timeout)
        views: list[DeadLetterView] = []
        for _, headers, payload in found:
            reason = dict(headers).get(b"amgi-dead-letter-reason", b"").decode()
            views.append((headers, payload, reason))
        return views

    def check_bindings(self, sent: dict[str, Any], received: dict[str, Any]) -> None:
        assert received["redis"]["stream"]
        assert received["redis"]["id"]


class TestRedisConformance(ConformanceSuite, DurabilitySuite):
    @pytest.fixture
    def harness(self) -> RedisHarness:
        return RedisHarness()
