"""Shared by the Redis server tests: the broker, fresh stream names, reading dead letters."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from amgi.servers.redis._fields import decode
from amgi.transport import HeaderList
from tests.net import port_open
from tests.ops.helpers import HoldingFront

ROOT = Path(__file__).resolve().parents[2]
PORT = 6379
URL = f"redis://127.0.0.1:{PORT}/0"


def ensure_broker() -> None:
    """Start the shared Redis with the project's script when it does not answer."""
    if port_open(PORT):
        return
    done = subprocess.run(
        ["bash", "scripts/brokers/redis.sh"], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0 or not port_open(PORT):
        pytest.fail(f"could not start Redis:\n{done.stdout}\n{done.stderr}")


def fresh(prefix: str) -> str:
    return f"amgi-test-{prefix}-{uuid.uuid4().hex[:10]}"


async def client(url: str = URL) -> Any:
    import redis.asyncio as aioredis

    c = aioredis.Redis.from_url(url, protocol=2)
    for command in ("XRANGE", "XPENDING", "XREADGROUP", "XINFO GROUPS"):
        c.set_response_callback(command, lambda response, **_: response)
    return c


async def entries(stream: str, url: str = URL) -> list[tuple[bytes, HeaderList, bytes | None]]:
    """Every entry of ``stream``: ``(id, headers, payload)``."""
    c = await client(url)
    try:
        rows = await c.execute_command("XRANGE", stream, "-", "+")
    finally:
        await c.aclose()
    out = []
    for entry_id, fields in rows:
        headers, payload = decode(fields)
        out.append((entry_id, headers, payload))
    return out


async def wait_entries(
    stream: str, count: int, timeout: float, url: str = URL
) -> list[tuple[bytes, HeaderList, bytes | None]]:
    deadline = time.monotonic() + timeout
    while True:
        found = await entries(stream, url)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{stream}: {len(found)} of {count} entries after {timeout}s")
        await asyncio.sleep(0.05)


async def pending(stream: str, group: str, url: str = URL) -> int:
    """Entries of ``stream`` delivered to ``group`` and not acknowledged."""
    c = await client(url)
    try:
        summary = await c.execute_command("XPENDING", stream, group)
    finally:
        await c.aclose()
    return int(summary[0])


class Cutter(HoldingFront):
    """A TCP relay to the shared Redis that breaks the connection of a command naming a
    word: ``cut`` times before the command reaches Redis, ``lose`` times after Redis ran it
    (its reply never reaches the client). ``url`` is the relay's."""

    def __init__(self) -> None:
        super().__init__(PORT, b"", 0)
        self.cut: dict[bytes, int] = {}
        self.lose: dict[bytes, int] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _take(self, rule: dict[bytes, int], data: bytes) -> bool:
        for word, left in rule.items():
            if left and word in data:
                rule[word] = left - 1
                return True
        return False

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", PORT)
        muted = False

        async def up() -> None:
            nonlocal muted
            while data := await reader.read(65536):
                lose = self._take(self.lose, data)
                if self._take(self.cut, data):
                    return
                muted = lose
                up_writer.write(data)
                await up_writer.drain()
                if lose:
                    await asyncio.sleep(0.05)  # Redis runs it; its reply goes nowhere
                    return

        async def down() -> None:
            while (data := await up_reader.read(65536)) and not muted:
                writer.write(data)
                await writer.drain()

        try:
            ends = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            for task in ends:
                task.cancel()
            await asyncio.gather(*ends, return_exceptions=True)
        finally:
            writer.close()
            up_writer.close()


async def delivery_count(stream: str, group: str, entry_id: bytes | str, url: str = URL) -> int:
    """The delivery counter Redis keeps for a pending entry (0: not pending)."""
    c = await client(url)
    try:
        rows = await c.execute_command("XPENDING", stream, group, entry_id, entry_id, 1)
    finally:
        await c.aclose()
    return int(rows[0][3]) if rows else 0
