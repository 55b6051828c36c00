"""The conformance suite against the in-memory server.

Only the in-process part: the memory server keeps nothing outside the process by design,
so the SIGTERM/SIGKILL process tests of DurabilitySuite do not apply to it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from amgi.servers.memory import MemoryBroker
from amgi.testing.conformance import ConformanceSuite, DeadLetterView, Harness


class MemoryHarness(Harness):
    server = "memory"
    send_bindings = {"mqtt": {"qos": 1, "retain": False}}
    redelivery_timeout = 5.0

    def __init__(self) -> None:
        self.name = f"test-{uuid.uuid4().hex[:8]}"
        self.broker = MemoryBroker.reset(self.name)

    def options(self) -> dict[str, Any]:
        return {"broker": self.name, "batch_size": 7}

    async def new_address(self) -> str:
        return f"queue-{uuid.uuid4().hex[:8]}"

    async def dead_letters(self, address: str, count: int, timeout: float) -> list[DeadLetterView]:
        deadline = time.monotonic() + timeout
        while len(self.broker.dead.get(address, [])) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return [(m.headers, m.payload, reason) for m, reason in self.broker.dead.get(address, [])]

    def check_bindings(self, sent: dict[str, Any], received: dict[str, Any]) -> None:
        for protocol, values in sent.items():
            assert received[protocol] == values


class TestMemoryConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self) -> MemoryHarness:
        return MemoryHarness()
