"""An order service on the typed layer: orders in, invoices out.

    amgi run examples.orders:app orders.eu invoices                 # embedded queue
    amgi send orders.eu '{"id": 1, "customer": "ada", "lines": [{"sku": "pen", "qty": 2}]}'
    amgi run examples.orders:app orders.eu invoices --server kafka \\
        --bootstrap-servers 127.0.0.1:9092 --group-id billing      # on Kafka

What it shows: validation (a bad order is dead-lettered at once, with the field path), an
address parameter (``orders.{region}``), a lifespan resource (the price list, opened once),
a dependency with cleanup (a ledger transaction, committed or rolled back after the
handler), a return value published to ``invoices``, a poison message (a blocked customer)
dead-lettered without retries, and a logging middleware.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, Field

from amgi.app import App, DeadLetter, Depends, HandlerCall, Header, State

logger = logging.getLogger("orders")

PRICES = {"pen": Decimal("1.50"), "book": Decimal("12.00"), "lamp": Decimal("30.00")}
BLOCKED = {"mallory"}


class Line(BaseModel):
    sku: str = Field(description="product code")
    qty: int = Field(gt=0, description="how many")


class Order(BaseModel):
    """An order placed by a customer."""

    id: int
    customer: str
    lines: list[Line] = Field(min_length=1)

    model_config = {
        "json_schema_extra": {
            "examples": [{"id": 1, "customer": "ada", "lines": [{"sku": "pen", "qty": 2}]}]
        }
    }


class Invoice(BaseModel):
    """The invoice of one order."""

    order_id: int
    customer: str
    region: str
    total: Decimal


@contextlib.asynccontextmanager
async def lifespan(app: App) -> AsyncIterator[dict[str, Any]]:
    """Open the ledger (an SQLite database) and load the price list once per process."""
    ledger = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    ledger.execute("create table invoices (order_id integer primary key, total text)")
    logger.info("ledger opened")
    yield {"ledger": ledger, "prices": dict(PRICES)}
    ledger.close()
    logger.info("ledger closed")


def transaction(
    ledger: Annotated[sqlite3.Connection, State("ledger")],
) -> Iterator[sqlite3.Connection]:
    """A ledger transaction around one message: committed if the handler succeeds."""
    ledger.execute("begin")
    try:
        yield ledger
    except BaseException:
        ledger.execute("rollback")
        raise
    else:
        ledger.execute("commit")


async def log_calls(call: HandlerCall, call_next: Callable[[], Awaitable[Any]]) -> Any:
    """Log each handler call and how long it took."""
    start = time.perf_counter()
    try:
        return await call_next()
    finally:
        took = (time.perf_counter() - start) * 1000
        logger.info("%s handled %d message(s) in %.1f ms", call.handler, len(call.messages), took)


app = App(
    title="orders",
    version="1.0.0",
    description="Turns orders into invoices.",
    lifespan=lifespan,
    middleware=[log_calls],
)


@app.subscriber("orders.{region}", publish_to="invoices")
async def on_order(
    order: Order,
    region: str,
    prices: Annotated[dict[str, Decimal], State("prices")],
    ledger: Annotated[sqlite3.Connection, Depends(transaction)],
    trace_id: Annotated[str | None, Header("trace-id", "the caller's trace id")] = None,
) -> Invoice:
    """Price an order, record it in the ledger and publish its invoice."""
    if order.customer in BLOCKED:
        raise DeadLetter(f"customer {order.customer!r} is blocked")
    try:
        total = sum((prices[line.sku] * line.qty for line in order.lines), Decimal(0))
    except KeyError as exc:
        raise DeadLetter(f"unknown product {exc.args[0]!r}") from None
    ledger.execute("insert or replace into invoices values (?, ?)", (order.id, str(total)))
    logger.info("order %d (%s, trace %s): %s", order.id, region, trace_id, total)
    return Invoice(order_id=order.id, customer=order.customer, region=region, total=total)


@app.subscriber("invoices")
async def on_invoice(invoice: Invoice) -> None:
    """Show each invoice (stands in for the billing system)."""
    print(f"invoice for order {invoice.order_id}: {invoice.total} ({invoice.customer})", flush=True)
