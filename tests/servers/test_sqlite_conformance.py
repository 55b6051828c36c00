"""The conformance suite against the embedded SQLite server (real files, real processes)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from amgi.servers.sqlite import SqliteQueue
from amgi.testing.conformance import ConformanceSuite, DeadLetterView, DurabilitySuite, Harness


class SqliteHarness(Harness):
    server = "sqlite"
    send_bindings = {"kafka": {"key": b"k\x00"}, "amqp": {"routingKey": "rk", "priority": 3}}
    redelivery_timeout = 10.0
    startup_timeout = 15.0

    def __init__(self, folder: Path) -> None:
        self.database = str(folder / "queue.db")

    def options(self) -> dict[str, Any]:
        return {"database": self.database, "visibility_timeout": 1.5, "poll_interval": 0.02}

    async def new_address(self) -> str:
        return f"queue-{uuid.uuid4().hex[:8]}"

    async def dead_letters(self, address: str, count: int, timeout: float) -> list[DeadLetterView]:
        queue = SqliteQueue(self.database)
        try:
            deadline = time.monotonic() + timeout
            while True:
                rows = queue.dead_letters(address)
                if len(rows) >= count or time.monotonic() > deadline:
                    return [(r.headers, r.payload, r.reason) for r in rows]
                await asyncio.sleep(0.05)
        finally:
            queue.close()

    def check_bindings(self, sent: dict[str, Any], received: dict[str, Any]) -> None:
        for protocol, values in sent.items():
            assert received[protocol] == values


class TestSqliteConformance(ConformanceSuite, DurabilitySuite):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> SqliteHarness:
        return SqliteHarness(tmp_path)
