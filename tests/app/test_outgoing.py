"""amgi.app publishing to templated addresses: ``Outgoing(address=..., params=...)``,
``publish_to`` with parameters of the result, and ``Publisher.publish``."""

from __future__ import annotations

import enum

import pytest
from pydantic import BaseModel

from amgi.app import App, Outgoing, Publisher
from amgi.app.testing import TestClient


class Order(BaseModel):
    id: int
    customer: str = "acme"


class Invoice(BaseModel):
    order_id: int


class Tier(enum.Enum):
    GOLD = "gold"


async def test_outgoing_address_is_filled_from_the_consumed_address() -> None:
    app = App()

    @app.subscriber("orders.{region}", publish_to="invoices")
    async def on_order(order: Order) -> Outgoing[Invoice]:
        return Outgoing(Invoice(order_id=order.id), address="audit.{region}")

    async with TestClient(app) as client:
        result = await client.publish("orders.eu", Order(id=1))
    assert result.acked, result.reason
    assert [m.address for m in result.sent] == ["audit.eu"]


async def test_publish_to_takes_parameters_from_the_outgoing() -> None:
    app = App()

    @app.subscriber("orders.{region}", publish_to="invoices.{region}.{customer}")
    async def on_order(order: Order) -> Outgoing[Invoice]:
        return Outgoing(Invoice(order_id=order.id), params={"customer": order.customer})

    @app.subscriber("upgrades", publish_to="tiers.{tier}.{n}")
    async def on_upgrade(order: Order) -> Outgoing[Invoice]:
        return Outgoing(Invoice(order_id=order.id), params={"tier": Tier.GOLD, "n": order.id})

    @app.subscriber("moves.{region}", publish_to="invoices.{region}")
    async def on_move(order: Order) -> Outgoing[Invoice]:
        return Outgoing(Invoice(order_id=order.id), params={"region": "us"})  # given wins

    async with TestClient(app) as client:
        first = await client.publish("orders.eu", Order(id=1, customer="bob"))
        second = await client.publish("upgrades", Order(id=2))
        third = await client.publish("moves.eu", Order(id=3))
    assert [r.acked for r in (first, second, third)] == [True, True, True]
    assert [m.address for m in client.sent] == ["invoices.eu.bob", "tiers.gold.2", "invoices.us"]


@pytest.mark.parametrize(
    ("params", "error"),
    [
        (
            None,
            "address 'invoices.{customer}': no value for {customer}; give it in "
            "params={'customer': ...}",
        ),
        (
            {"customer": "a.b"},
            "address 'invoices.{customer}': {customer}='a.b' is not one "
            "segment (one or more characters, neither '.' nor '/')",
        ),
        (
            {"customer": ""},
            "address 'invoices.{customer}': {customer}='' is not one segment "
            "(one or more characters, neither '.' nor '/')",
        ),
        (
            {"customer": "x", "tenant": "y"},
            "address 'invoices.{customer}' has no parameter {tenant} (its parameters: customer)",
        ),
        (
            {"customer": 1.5},
            "address 'invoices.{customer}': {customer} must be a str, an int or an Enum, not float",
        ),
    ],
)
async def test_a_missing_or_invalid_parameter_nacks_and_publishes_nothing(
    params: dict[str, object] | None, error: str
) -> None:
    app = App()

    @app.subscriber("orders", publish_to="invoices.{customer}")
    async def on_order(order: Order) -> Outgoing[Invoice]:
        return Outgoing(Invoice(order_id=order.id), params=params)  # type: ignore[arg-type]

    async with TestClient(app) as client:
        result = await client.publish("orders", Order(id=1))
    assert not result.acked
    assert result.reason == (
        "test_a_missing_or_invalid_parameter_nacks_and_publishes_nothing.<locals>.on_order: "
        f"its result could not be published, nothing was published: {error}"
    )
    assert client.sent == []


async def test_a_malformed_outgoing_address_is_refused() -> None:
    app = App()

    @app.subscriber("orders", publish_to="invoices")
    async def on_order(order: Order) -> Outgoing[Invoice]:
        return Outgoing(Invoice(order_id=order.id), address="invoices.{x")

    async with TestClient(app) as client:
        result = await client.publish("orders", Order(id=1))
    assert (result.reason or "").endswith(
        "its result could not be published, nothing was published: "
        "malformed parameter in address 'invoices.{x'"
    )
    assert client.sent == []


async def test_publisher_fills_templates_like_publish_to() -> None:
    app = App()

    @app.subscriber("orders.{region}")
    async def on_order(order: Order, publisher: Publisher) -> None:
        await publisher.publish("audit.{region}", order)
        await publisher.publish("audit.{region}.{customer}", order, params={"customer": "z"})
        await publisher.publish(
            "x", Outgoing(order, address="ignored.{region}")
        )  # the address argument wins
        await publisher.publish("audit.{customer}", order)

    async with TestClient(app) as client:
        result = await client.publish("orders.eu", Order(id=1))
    assert [m.address for m in client.sent] == ["audit.eu", "audit.eu.z", "x"]
    assert (result.reason or "").endswith(
        "on_order raised ValueError: address 'audit.{customer}': no value for {customer}; "
        "give it in params={'customer': ...}"
    )
