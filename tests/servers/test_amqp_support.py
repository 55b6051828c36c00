"""Shared helpers of the AMQP tests: the broker, fresh queue names, clean-up."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from amgi.transport import Batch, Transport
from tests.net import port_open

ROOT = Path(__file__).resolve().parents[2]
URL = "amqp://guest:guest@127.0.0.1:5672/"
PREFIX = f"amgi-test-{uuid.uuid4().hex[:6]}-"  # this session's own: others sweep theirs


def ensure_broker() -> None:
    """Start RabbitMQ with the project's script unless it already answers."""
    if port_open(5672):
        return
    subprocess.run(["bash", "scripts/brokers/rabbitmq.sh"], cwd=ROOT, check=True, timeout=300)


async def fetch_n(t: Transport, n: int, timeout: float = 10) -> list[Batch]:
    """Fetch from ``t`` until ``n`` messages came (or fail after ``timeout`` seconds)."""
    batches: list[Batch] = []
    async with asyncio.timeout(timeout):
        while sum(len(b.messages) for b in batches) < n:
            batches.extend(await t.fetch())
    return batches


def new_queue() -> str:
    """A queue name no other test uses."""
    return PREFIX + uuid.uuid4().hex[:12]


async def delete_test_queues() -> None:
    """Delete every queue a test of this session created (names start with its prefix)."""
    import aiormq

    listing = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        "list_queues",
        "name",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await listing.communicate()
    names = [n for n in out.decode().split() if n.startswith(PREFIX)]
    if not names:
        return
    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)
    finally:
        await connection.close()


async def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """``rabbitmqctl -q ARGS`` on the shared node; returns what it printed."""
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {err.decode().strip()}")
    return out.decode()


async def delete_exchange(name: str) -> None:
    import aiormq

    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        await channel.exchange_delete(name)
    finally:
        await connection.close()


async def queue_depth(queue: str, url: str = URL) -> int:
    """Ready + unacked messages of ``queue``, as the broker counts them."""
    import aiormq

    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(queue, passive=True)
        return int(ok.message_count or 0)
    finally:
        await connection.close()


async def drain(queue: str, count: int, timeout: float) -> list[Any]:
    """Take ``count`` messages off ``queue`` with basic.get, waiting up to ``timeout``."""
    import aiormq
    from pamqp.commands import Basic

    connection = await aiormq.connect(URL)
    found: list[Any] = []
    try:
        channel = await connection.channel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(found) < count:
            got = await channel.basic_get(queue, no_ack=True)
            if isinstance(got.delivery, Basic.GetOk):
                found.append(got)
                continue
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
    finally:
        await connection.close()
    return found


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[str]:
    """The broker URL; deletes the test queues at the end of the session."""
    ensure_broker()
    yield URL
    asyncio.run(delete_test_queues())


async def close_connections(name: str) -> int:
    """Close (as an operator would) the broker's connections named ``name`` (the URL's
    ``?name=``); returns how many."""
    listing = await rabbitmqctl("list_connections", "pid", "client_properties")
    tag = f'{{"connection_name","{name}"}}'
    pids = [line.split("\t")[0] for line in listing.splitlines() if tag in line]
    for pid in pids:
        await rabbitmqctl("close_connection", pid, "amgi test")
    return len(pids)
