"""amgi.app on NATS: a wildcard subscription's messages are routed by their own subject."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import pytest

from amgi.app import App, Meta
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.nats import NatsOptions, NatsTransport
from tests.apps import send_all
from tests.servers.nats_helpers import PREFIX, URL, ensure_broker, ensure_stream, fresh


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


async def test_a_wildcard_subscription_fills_parameters_from_each_subject() -> None:
    await ensure_stream()
    base = f"{PREFIX}.{fresh('app')}"
    app = App()
    seen: list[tuple[str, str]] = []

    @app.subscriber(base + ".{region}")
    async def on_order(
        order: dict[str, int], region: str, address: Annotated[str, Meta("address")]
    ) -> None:
        seen.append((region, address))

    options = NatsOptions(servers=URL, durable=fresh("d"), fetch_expiry=0.2)
    runtime = Runtime(app, NatsTransport([base + ".*"], options), RuntimeConfig(lifespan="off"))
    serving = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        sender = NatsTransport([], NatsOptions(servers=URL))
        await send_all(sender, [(base + ".eu", b"{}"), (base + ".us", b"{}")])
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        runtime.request_stop()
        await asyncio.wait_for(serving, 10)
    # The scope's address is the filter (base.*): '*' is no region.
    assert sorted(seen) == [("eu", base + ".eu"), ("us", base + ".us")]
