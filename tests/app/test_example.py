"""The example order service through the test client (its Kafka run is in test_example_kafka)."""

from __future__ import annotations

import json

from examples.orders import Order, app

from amgi.app.testing import TestClient


async def test_an_order_becomes_an_invoice() -> None:
    async with TestClient(app) as client:
        order = {"id": 1, "customer": "ada", "lines": [{"sku": "pen", "qty": 2}]}
        result = await client.publish("orders.eu", json.dumps(order).encode())
        assert result.acked, result.reason
        (invoice,) = result.sent
        assert invoice.address == "invoices"
        assert json.loads(invoice.payload or b"") == {
            "order_id": 1,
            "customer": "ada",
            "region": "eu",
            "total": "3.00",
        }
        shown = await client.publish("invoices", invoice.payload)
        assert shown.acked


async def test_invalid_and_poison_orders_are_dead_lettered() -> None:
    async with TestClient(app) as client:
        invalid = await client.publish("orders.eu", b'{"id": 2, "customer": "bo", "lines": []}')
        blocked = await client.publish(
            "orders.eu",
            Order.model_validate(
                {"id": 3, "customer": "mallory", "lines": [{"sku": "pen", "qty": 1}]}
            ),
        )
        unknown = await client.publish(
            "orders.us", b'{"id": 4, "customer": "cy", "lines": [{"sku": "boat", "qty": 1}]}'
        )
    assert invalid.dead_lettered
    assert "parameter 'order': lines: List should have at least 1 item" in (invalid.reason or "")
    assert blocked.dead_lettered
    assert (blocked.reason or "").endswith("customer 'mallory' is blocked")
    assert unknown.dead_lettered
    assert client.sent == []


async def test_the_transaction_rolls_back_when_the_handler_fails() -> None:
    async with TestClient(app) as client:
        ledger = client.state["ledger"]
        await client.publish(
            "orders.eu", b'{"id": 5, "customer": "mallory", "lines": [{"sku": "pen", "qty": 1}]}'
        )
        ok = await client.publish(
            "orders.eu", b'{"id": 6, "customer": "di", "lines": [{"sku": "lamp", "qty": 1}]}'
        )
        assert ok.acked
        rows = ledger.execute("select order_id, total from invoices").fetchall()
    assert rows == [(6, "30.00")]
