"""amgi.app on AMQP: a queue bound to a topic exchange has its messages routed by the
routing key they were sent with, when no handler takes the queue's name."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import pytest

from amgi.app import App, Meta
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.amqp import AmqpOptions, AmqpTransport
from tests.servers.test_amqp_support import URL, delete_exchange, ensure_broker, new_queue


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


async def test_a_queue_of_a_topic_exchange_routes_each_message_by_its_routing_key() -> None:
    """The scope's address is the queue: a handler of ``orders.{region}`` never matched,
    and every message failed "no handler for address" until it was dead-lettered. A
    retry copy (sent through the default exchange) comes back to the same handler."""
    queue = new_queue()
    exchange = queue + "-x"
    app = App()
    seen: list[tuple[str, str, int]] = []

    @app.subscriber("orders.{region}")
    async def on_order(
        order: dict[str, Any],
        region: str,
        address: Annotated[str, Meta("address")],
        attempt: Annotated[int, Meta("attempt")],
    ) -> None:
        seen.append((region, address, attempt))
        if region == "eu" and attempt == 1:
            raise RuntimeError("later")

    options = AmqpOptions(
        url=URL, exchange=exchange, exchange_type="topic", routing_keys=["orders.*"], linger=0.01
    )
    config = RuntimeConfig(lifespan="off", retry_delay=0.05, crash_ledger="")
    runtime = Runtime(app, AmqpTransport([queue], options), config)
    serving = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        sender = AmqpTransport([], AmqpOptions(url=URL, exchange=exchange))
        await sender.connect()
        try:
            for region in ("eu", "us"):
                await sender.publish(f"orders.{region}", [], b"{}", {})
        finally:
            await sender.close()
        deadline = time.monotonic() + 10
        while len(seen) < 3:
            assert not serving.done(), serving.result()
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.02)
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(serving, 10) == 0
        await delete_exchange(exchange)
    assert sorted(seen) == [
        ("eu", "orders.eu", 1),
        ("eu", "orders.eu", 2),
        ("us", "orders.us", 1),
    ]
