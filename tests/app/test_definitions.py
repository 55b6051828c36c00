"""Handlers the layer cannot serve fail at startup with one error naming function and parameter."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel

from amgi.app import App, AppDefinitionError, Depends, Header, Publisher
from amgi.app.testing import TestClient
from amgi.errors import StartupFailed


class Order(BaseModel):
    id: int


async def startup_error(app: App) -> str:
    with pytest.raises(StartupFailed) as info:
        async with TestClient(app):
            pass
    message = str(info.value)
    assert "\n" not in message
    return message


async def test_two_payload_parameters() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(order: Order, other: Order) -> None: ...

    message = await startup_error(app)
    assert (
        "on_in, parameter 'other': a second payload parameter (the payload is 'order')" in message
    )


async def test_unresolvable_annotation() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(order: NoSuchType) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    message = await startup_error(app)
    assert "on_in: cannot resolve its annotations: NameError: name 'NoSuchType'" in message


async def test_missing_annotation() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(order) -> None: ...  # type: ignore[no-untyped-def]

    assert "on_in, parameter 'order': has no type annotation" in await startup_error(app)


async def test_payload_type_pydantic_cannot_decode() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(sock: socket.socket) -> None: ...

    message = await startup_error(app)
    assert "on_in, parameter 'sock': cannot decode payloads into <class 'socket.socket'>" in message


async def test_publish_to_type_that_cannot_be_serialized() -> None:
    app = App()

    @app.subscriber("in", publish_to="out")
    async def on_in(order: Order) -> socket.socket:
        raise AssertionError

    assert "on_in, return: cannot serialize <class 'socket.socket'>" in await startup_error(app)


async def test_publish_to_without_return_annotation() -> None:
    app = App()

    @app.subscriber("in", publish_to="out")
    async def on_in(order: Order):  # type: ignore[no-untyped-def]
        return order

    assert "on_in, return: publish_to='out' needs a return annotation" in await startup_error(app)


async def test_dependency_that_wants_the_payload() -> None:
    async def needs_body(order: Order) -> int:
        return order.id

    app = App()

    @app.subscriber("in")
    async def on_in(order: Order, n: Annotated[int, Depends(needs_body)]) -> None: ...

    message = await startup_error(app)
    assert "needs_body, parameter 'order': a dependency cannot take the payload" in message


async def test_dependency_cycle() -> None:
    def a(x: int = Depends(lambda: 0)) -> int:
        return x

    def b(y: int = Depends(a)) -> int:
        return y

    a.__defaults__ = (Depends(b),)
    app = App()

    @app.subscriber("in")
    async def on_in(order: Order, v: int = Depends(a)) -> None: ...

    assert "depends on itself" in await startup_error(app)


async def test_batch_handler_needs_a_list() -> None:
    app = App()

    @app.subscriber("in", batch=True)
    async def on_in(order: Order) -> None: ...

    assert "on_in, parameter 'order': a batch handler takes list[T]" in await startup_error(app)


async def test_batch_handler_cannot_take_a_single_header() -> None:
    app = App()

    @app.subscriber("in", batch=True)
    async def on_in(orders: list[Order], h: Annotated[str, Header("h")]) -> None: ...

    assert "on_in, parameter 'h': a batch handler cannot take a single Header" in (
        await startup_error(app)
    )


def test_errors_at_declaration() -> None:
    app = App()
    with pytest.raises(AppDefinitionError, match=r"on_in: malformed parameter in address"):

        @app.subscriber("in.{x")
        async def on_in(body: bytes) -> None: ...

    with pytest.raises(AppDefinitionError, match=r"gen: a handler cannot be a generator"):

        @app.subscriber("g")
        async def gen(body: bytes) -> Any:
            yield body

    @app.subscriber("same")
    async def first(body: bytes) -> None: ...

    with pytest.raises(AppDefinitionError, match=r"second: address 'same' already has a handler"):

        @app.subscriber("same")
        async def second(body: bytes) -> None: ...


async def test_first_message_checks_the_app_when_lifespan_is_off() -> None:
    from amgi.testing import message, run_batch

    app = App()

    @app.subscriber("in")
    async def on_in(a: Order, b: Order, p: Publisher) -> None: ...

    result = await run_batch(app, [message(b"{}")], address="in")
    assert isinstance(result.error, StartupFailed)  # the runtime stops the run on it
    assert isinstance(result.error.__cause__, AppDefinitionError)
    assert result.unsettled == ["1"]


def test_amgi_run_stops_with_one_line_naming_function_and_parameter(tmp_path: Path) -> None:
    (tmp_path / "badapp.py").write_text(
        "from pydantic import BaseModel\n"
        "from amgi.app import App\n"
        "class Order(BaseModel):\n"
        "    id: int\n"
        "app = App()\n"
        "@app.subscriber('orders')\n"
        "async def on_order(order: Order, other: Order) -> None: ...\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "amgi", "run", "badapp:app", "orders", "--server", "memory"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "amgi: error: application startup failed: on_order, parameter 'other': a second "
        "payload parameter (the payload is 'order'); mark one with Header, Binding, Meta, "
        "State or Depends"
    )
    assert "Traceback" not in run.stderr


def test_amgi_run_without_lifespan_stops_at_the_first_message_and_loses_nothing(
    tmp_path: Path,
) -> None:
    from amgi.servers.sqlite import SqliteQueue

    (tmp_path / "badapp.py").write_text(
        "from amgi.app import App\n"
        "app = App()\n"
        "@app.subscriber('orders')\n"
        "async def on_order(order: dict[str, int], other: dict[str, int]) -> None: ...\n"
    )
    database = str(tmp_path / "q.db")
    queue = SqliteQueue(database)
    queue.put_many("orders", [([], b'{"id": %d}' % n, {}) for n in range(3)])
    command = ["run", "badapp:app", "orders", "--database", database, "--lifespan", "off"]
    run = subprocess.run(
        [sys.executable, "-m", "amgi", *command, "--crash-ledger", ""],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1, run.stderr
    assert (
        run.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "amgi: error: application startup failed: on_order, parameter 'other': a second "
            "payload parameter"
        )
    )
    assert "Traceback" not in run.stderr
    assert queue.count("orders") == 3
    assert queue.dead_letters("orders") == []
    attempts = queue.db.execute("SELECT attempts FROM amgi_messages").fetchall()
    queue.close()
    assert attempts == [(0,)] * 3  # handed back: the app never had them


async def test_sync_functions_cannot_take_a_publisher() -> None:
    app = App()

    @app.subscriber("in")
    def on_in(order: Order, publisher: Publisher) -> None: ...

    assert await startup_error(app) == (
        "test_sync_functions_cannot_take_a_publisher.<locals>.on_in, parameter 'publisher': "
        "a sync (def) function cannot await Publisher.publish; make "
        "test_sync_functions_cannot_take_a_publisher.<locals>.on_in an async def"
    )

    def audit(publisher: Publisher) -> None: ...

    app = App()

    @app.subscriber("in")
    async def on_other(order: Order, a: None = Depends(audit)) -> None: ...

    assert "audit, parameter 'publisher': a sync (def) function cannot await" in (
        await startup_error(app)
    )


async def test_an_address_parameter_must_fit_in_one_segment() -> None:
    app = App()

    @app.subscriber("orders.{order}")
    async def on_order(order: Order) -> None: ...

    assert (await startup_error(app)).endswith(
        "on_order, parameter 'order': {order} of the address 'orders.{order}' is one segment "
        "of text and cannot be Order; give it a scalar type (str, int, an Enum ...), or "
        "rename the parameter if it is the payload"
    )


async def test_publish_to_placeholders_are_address_parameters_or_given_by_an_outgoing() -> None:
    app = App()

    @app.subscriber("orders.{region}", publish_to="invoices.{country}")
    async def on_order(order: Order) -> Order: ...

    assert (await startup_error(app)).endswith(
        "on_order, publish_to='invoices.{country}': {country} is not a parameter of the "
        "address 'orders.{region}'; return Outgoing[...] with params={'country': ...} to "
        "give it per result"
    )


async def test_a_handler_the_lifespan_adds_is_checked_at_startup() -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[None]:
        @app.subscriber("late")
        async def on_late(a: Order, b: Order) -> None: ...

        yield None

    # Checked only at its first message before: every message failed, then was
    # dead-lettered, for a handler the app could never serve.
    assert (await startup_error(App(lifespan=lifespan))).endswith(
        "lifespan.<locals>.on_late, parameter 'b': a second payload parameter (the payload "
        "is 'a'); mark one with Header, Binding, Meta, State or Depends"
    )


async def test_a_handler_added_after_the_start_is_named_as_missing_from_documents(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[None]:
        @app.subscriber("late")
        async def on_late(order: Order) -> None: ...

        yield None

    app = App(lifespan=lifespan)
    with caplog.at_level(logging.WARNING, logger="amgi.app"):
        assert app.asyncapi()["channels"] == {}
        async with TestClient(app) as client:
            assert (await client.publish("late", b'{"id": 1}')).acked
            assert list(app.asyncapi()["channels"]) == ["late"]  # known once started
    empty, late = (r.getMessage() for r in caplog.records)
    assert empty == (
        "App 'AMGI application' has no handler: its AsyncAPI document lists no channel "
        "(handlers added once the app starts, in its lifespan, are not known before)"
    )
    assert late.endswith(
        "lifespan.<locals>.on_late was subscribed to 'late' once the app had started: "
        "an AsyncAPI document made without starting the app (amgi asyncapi, amgi docs) "
        "does not list it; declare the handler when the module is imported (its address "
        "may come from settings read then)"
    )
