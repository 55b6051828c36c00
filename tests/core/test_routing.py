"""Send routing: the Router's pattern choice and ownership, and the runtime sending through it
(memory brokers: two in-process brokers stand for two servers)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.runtime import Runtime, RuntimeConfig
from amgi.runtime.routing import Router, parse_route
from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport
from amgi.transport import Batch, Bindings, HeaderList, Settlement, Transport


def _memory(name: str) -> MemoryTransport:
    MemoryBroker.reset(name)
    return MemoryTransport([], MemoryOptions(broker=name))


def test_first_matching_pattern_wins_and_unmatched_is_none() -> None:
    invoices, audit, rest = _memory("r-inv"), _memory("r-audit"), _memory("r-rest")
    router = Router([("invoices.*", invoices), ("audit/?", audit), ("invoices.eu", rest)])
    assert router.target("invoices.eu") is invoices
    assert router.target("audit/1") is audit
    assert router.target("audit/12") is None
    assert router.target("orders") is None
    assert router.target("invoices.eu") is invoices  # cached answer, same choice


def test_parse_route() -> None:
    assert parse_route("invoices.*=kafka") == ("invoices.*", "kafka")
    assert parse_route("a=b=sqs") == ("a=b", "sqs")
    for bad in ("kafka", "=kafka", "x="):
        with pytest.raises(ConfigurationError, match="PATTERN=SERVER"):
            parse_route(bad)


class _Refusing(MemoryTransport):
    async def connect(self) -> None:
        raise BrokerUnavailable("refused")


class _Counting(MemoryTransport):
    connects = 0
    closes = 0

    async def connect(self) -> None:
        type(self).connects += 1

    async def close(self) -> None:
        type(self).closes += 1


async def test_a_shared_transport_is_connected_once_and_a_failure_closes_the_rest() -> None:
    shared = _Counting([], MemoryOptions(broker="r-count"))
    router = Router([("a.*", shared), ("b.*", shared)])
    await router.connect()
    await router.close()
    assert (_Counting.connects, _Counting.closes) == (1, 1)
    failing = Router([("a.*", shared), ("b.*", _Refusing([], MemoryOptions(broker="r-x")))])
    with pytest.raises(BrokerUnavailable):
        await failing.connect()
    assert (_Counting.connects, _Counting.closes) == (2, 2)


async def test_the_runtime_sends_routed_addresses_to_their_server() -> None:
    home = MemoryBroker.reset("r-home")
    other = MemoryBroker.reset("r-other")
    home.put("in", [], b"1", {})

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        message = await receive()
        for address in ("invoices.eu", "orders.done"):
            await send({"type": "message.send", "address": address, "headers": [], "payload": b"x"})
        await send({"type": "message.ack", "id": message["id"]})
        runtime.request_stop()

    transport = MemoryTransport(["in"], MemoryOptions(broker="r-home"))
    routes = Router([("invoices.*", MemoryTransport([], MemoryOptions(broker="r-other")))])
    runtime = Runtime(app, transport, RuntimeConfig(lifespan="off"), routes=routes)
    assert await asyncio.wait_for(runtime.serve(), 10) == 0
    assert other.pending("invoices.eu") == 1
    assert other.pending("orders.done") == 0
    assert home.pending("orders.done") == 1
    assert home.pending("invoices.eu") == 0


class _Unreachable(Transport):
    name = "unreachable"
    options = MemoryOptions

    async def connect(self) -> None:
        raise BrokerUnavailable("unreachable: nobody listens")

    async def fetch(self) -> Sequence[Batch]:
        raise NotImplementedError

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        raise NotImplementedError

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


async def test_an_unreachable_route_stops_startup_with_its_reason() -> None:
    MemoryBroker.reset("r-start")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    transport = MemoryTransport(["in"], MemoryOptions(broker="r-start"))
    routes = Router([("x.*", _Unreachable([], MemoryOptions()))])
    runtime = Runtime(app, transport, RuntimeConfig(lifespan="off"), routes=routes)
    with pytest.raises(BrokerUnavailable, match="nobody listens"):
        await asyncio.wait_for(runtime.serve(), 10)
