"""Fixtures of the operations tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from tests.servers.mosquitto.broker import mosquitto

__all__ = ["amqp_queue", "mosquitto"]


@pytest.fixture
async def amqp_queue() -> AsyncIterator[Callable[[], str]]:
    """Makes RabbitMQ queue names of this test's own, deleted (with their dead-letter
    queues) when it ends. Their prefix is not the one other test sessions sharing the
    broker sweep away at their end."""
    import aiormq

    from tests.servers.test_amqp_support import URL

    names: list[str] = []

    def new() -> str:
        name = f"amgi-ops-{uuid.uuid4().hex[:12]}"
        names.append(name)
        return name

    yield new
    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        for name in names:
            for queue in (name, name + ".dead-letter"):
                await channel.queue_delete(queue)
    finally:
        await connection.close()
