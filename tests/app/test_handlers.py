"""amgi.app handlers: routing, payload decoding, injection, publishing, errors, batches."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from typing import Annotated, Any, Optional, Union

import pytest
from pydantic import AfterValidator, BaseModel, Field, field_validator
from typing_extensions import TypedDict

from amgi.app import (
    App,
    AppDefinitionError,
    Binding,
    DeadLetter,
    Failures,
    Header,
    MessageInfo,
    Meta,
    Outgoing,
    Publisher,
)
from amgi.app.testing import TestClient


class Order(BaseModel):
    id: int
    amount: float
    customer: str = "anon"


class Invoice(BaseModel):
    order_id: int
    total: float
    region: str


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Pair(TypedDict):
    a: str
    b: int


async def test_pydantic_payload_address_params_and_publish_to() -> None:
    app = App()

    @app.subscriber("orders.{region}", publish_to="invoices")
    async def on_order(
        order: Order,
        region: str,
        trace_id: Annotated[str, Header("trace-id")],
        key: Annotated[bytes | None, Binding("kafka", "key")] = None,
    ) -> Invoice:
        assert trace_id == "t-1"
        assert key == b"k1"
        return Invoice(order_id=order.id, total=order.amount * 2, region=region)

    async with TestClient(app) as client:
        result = await client.publish(
            "orders.eu",
            Order(id=7, amount=2.5),
            headers={"trace-id": "t-1"},
            bindings={"kafka": {"key": b"k1"}},
        )
    assert result.acked, result.reason
    (sent,) = result.sent
    assert sent.address == "invoices"
    assert json.loads(sent.payload or b"") == {"order_id": 7, "total": 5.0, "region": "eu"}
    assert (b"content-type", b"application/json") in sent.headers


async def test_typed_address_parameter_and_mismatch() -> None:
    app = App()
    seen: list[int] = []

    @app.subscriber("shard.{n}")
    async def on_shard(body: str, n: int) -> None:
        seen.append(n)

    async with TestClient(app) as client:
        assert (await client.publish("shard.12", b"x")).acked
        bad = await client.publish("shard.abc", b"x")
    assert seen == [12]
    assert bad.dead_lettered  # at once: it can never be handled
    assert (bad.reason or "").endswith(
        "on_shard: address parameter 'n'='abc': (root): Input should be a valid integer, "
        "unable to parse string as an integer"
    )


async def test_address_parameter_constraints_are_kept() -> None:
    app = App()

    @app.subscriber("shard.{n}")
    async def on_shard(body: bytes, n: Annotated[int, Field(gt=0)]) -> None: ...

    async with TestClient(app) as client:
        zero = await client.publish("shard.0", b"")
    assert zero.dead_lettered
    assert (zero.reason or "").endswith(
        "address parameter 'n'='0': (root): Input should be greater than 0"
    )


PositiveInt = Annotated[int, Field(gt=0)]


async def test_header_and_binding_constraints_are_kept() -> None:
    app = App()
    seen: list[Any] = []

    @app.subscriber("in")
    async def on_in(
        body: bytes,
        prio: Annotated[PositiveInt, Header("prio")],
        region: Annotated[str, Field(max_length=2), Header("region")],
        raw: Annotated[bytes | None, Field(max_length=1), Header("raw")] = None,
        key: Annotated[str, Field(pattern="^k"), Binding("kafka", "key")] = "k0",
    ) -> None:
        seen.append((prio, region, raw, key))

    ok = {"prio": "1", "region": "eu"}
    async with TestClient(app) as client:
        good = await client.publish("in", headers={**ok, "raw": b"x"})
        prio = await client.publish("in", headers={**ok, "prio": "-5"})
        region = await client.publish("in", headers={**ok, "region": "eur"})
        raw = await client.publish("in", headers={**ok, "raw": b"xy"})
        key = await client.publish("in", headers=ok, bindings={"kafka": {"key": "z"}})
    assert good.acked, good.reason
    assert seen == [(1, "eu", b"x", "k0")]
    assert "header 'prio': (root): Input should be greater than 0" in (prio.reason or "")
    assert "header 'region': (root): String should have at most 2 characters" in (
        region.reason or ""
    )
    assert "header 'raw': (root): Data should have at most 1 byte" in (raw.reason or "")
    assert "binding kafka.key: (root): String should match pattern '^k'" in (key.reason or "")
    assert all(r.dead_lettered for r in (prio, region, raw, key))
    headers = app.asyncapi()["components"]["messages"]["on_in.message"]["headers"]
    assert headers["properties"]["prio"] == {"type": "integer", "exclusiveMinimum": 0}
    assert headers["properties"]["region"] == {"type": "string", "maxLength": 2}


async def test_no_handler_for_address_nacks_with_reason() -> None:
    app = App()

    @app.subscriber("orders")
    async def on_order(order: Order) -> None: ...

    async with TestClient(app) as client:
        result = await client.publish("payments", b"{}")
    assert not result.acked
    assert result.reason == "no handler for address 'payments' (handlers: orders)"


async def test_routing_rule_exact_then_most_literal_then_error() -> None:
    app = App()
    hits: list[str] = []

    @app.subscriber("a.{x}.c")
    async def long_pattern(body: bytes, x: str) -> None:
        hits.append("a.{x}.c")

    @app.subscriber("a.{x}.{y}")
    async def short_pattern(body: bytes, x: str, y: str) -> None:
        hits.append("a.{x}.{y}")

    @app.subscriber("a.b.c")
    async def exact(body: bytes) -> None:
        hits.append("a.b.c")

    async with TestClient(app) as client:
        for address in ("a.b.c", "a.z.c", "a.z.d"):
            assert (await client.publish(address, b"")).acked
    assert hits == ["a.b.c", "a.{x}.c", "a.{x}.{y}"]

    with pytest.raises(TypeError, match=r"other: address pattern 'a\.\{q\}\.c' .* overlaps"):

        @app.subscriber("a.{q}.c")
        async def other(body: bytes) -> None: ...


async def test_a_filters_messages_are_routed_by_their_own_address() -> None:
    app = App()
    hits: list[tuple[str, str]] = []

    @app.subscriber("a.{x}")
    async def by_pattern(body: bytes, x: str) -> None:
        hits.append(("a.{x}", x))

    @app.subscriber("b.*")
    async def by_filter(body: bytes, address: Annotated[str, Meta("address")]) -> None:
        hits.append(("b.*", address))

    async with TestClient(app) as client:
        for filter_, subject in (("a.*", "a.eu"), ("a.>", "a.us"), ("b.*", "b.eu")):
            bindings = {"nats": {"subject": subject}}
            assert (await client.publish(filter_, b"", bindings=bindings)).acked
    # A filter's own handler still takes what no handler of the subject does.
    assert hits == [("a.{x}", "eu"), ("a.{x}", "us"), ("b.*", "b.eu")]


def test_patterns_of_equal_weight_that_share_an_address_are_refused() -> None:
    app = App()

    @app.subscriber("eu.{region}")
    async def by_region(body: bytes, region: str) -> None: ...

    @app.subscriber("{a}.x.{b}")
    async def middle_x(body: bytes, a: str, b: str) -> None: ...

    @app.subscriber("{a}.y.{b}")  # as many literal characters, but never the same address
    async def middle_y(body: bytes, a: str, b: str) -> None: ...

    @app.subscriber("{topic}.eu.{x}")  # more literal characters: it wins, no ambiguity
    async def longer(body: bytes, topic: str, x: str) -> None: ...

    with pytest.raises(AppDefinitionError) as info:

        @app.subscriber("{topic}.eu")
        async def by_topic(body: bytes, topic: str) -> None: ...

    assert str(info.value).endswith(
        "by_topic: address pattern '{topic}.eu' of "
        "test_patterns_of_equal_weight_that_share_an_address_are_refused.<locals>.by_topic "
        "overlaps 'eu.{region}': both match 'eu.eu' and neither has more literal characters"
    )


@pytest.mark.parametrize(
    ("annotation", "payload", "expected"),
    [
        (Point, b'{"x": 1, "y": 2}', Point(1, 2)),
        (Pair, b'{"a": "s", "b": 3}', {"a": "s", "b": 3}),
        (int, b"42", 42),
        (list[int], b"[1, 2]", [1, 2]),
        (bytes, b"\x00raw", b"\x00raw"),
        (str, "héllo".encode(), "héllo"),
        (dict[str, Any], b'{"k": [1]}', {"k": [1]}),
    ],
)
async def test_payload_types(annotation: Any, payload: bytes, expected: Any) -> None:
    app = App()
    got: list[Any] = []

    async def handler(value: Any) -> None:
        got.append(value)

    handler.__annotations__["value"] = annotation
    app.subscriber("in")(handler)
    async with TestClient(app) as client:
        result = await client.publish("in", payload)
    assert result.acked, result.reason
    assert got == [expected]


async def test_content_type_chooses_the_decoder() -> None:
    def parse_kv(data: bytes) -> dict[str, str]:
        return dict(part.split("=", 1) for part in data.decode().split(","))

    app = App(decoders={"application/x-kv": parse_kv})
    got: list[Pair] = []

    @app.subscriber("in")
    async def handler(value: Pair) -> None:
        got.append(value)

    async with TestClient(app) as client:
        ok = await client.publish(
            "in", b"a=x,b=5", headers={"content-type": "application/x-kv; charset=utf-8"}
        )
        json_ok = await client.publish("in", b'{"a": "y", "b": 6}')
        unknown = await client.publish("in", b"?", headers={"content-type": "application/xml"})
    assert ok.acked
    assert json_ok.acked
    assert got == [{"a": "x", "b": 5}, {"a": "y", "b": 6}]
    assert not unknown.acked
    assert "no decoder for content-type 'application/xml'" in (unknown.reason or "")


async def test_validation_error_names_the_field_path_and_dead_letters_now() -> None:
    class Line(BaseModel):
        price: float

    class Cart(BaseModel):
        items: list[Line]

    app = App()

    @app.subscriber("carts")
    async def on_cart(cart: Cart) -> None: ...

    async with TestClient(app) as client:
        result = await client.publish("carts", b'{"items": [{"price": 1}, {"price": "x"}]}')
        broken = await client.publish("carts", b"{not json")
    assert not result.acked
    assert result.reason is not None
    assert result.reason.startswith("invalid payload for ")
    assert "parameter 'cart': items.1.price: Input should be a valid number" in result.reason
    assert result.dead_lettered
    assert broken.dead_lettered
    assert "Invalid JSON" in (broken.reason or "")


class Coded(BaseModel):
    code: str

    @field_validator("code")
    @classmethod
    def known(cls, code: str) -> str:
        return {"a": "A", "b": "B"}[code]  # KeyError for an unknown code


async def test_a_validator_that_raises_nacks_its_message_only_on_every_path() -> None:
    app = App()
    calls: list[list[str]] = []

    @app.subscriber("fast")
    async def fast(item: Coded) -> None: ...

    @app.subscriber("injected")
    async def injected(item: Coded, mid: Annotated[str, Meta("id")]) -> None: ...

    @app.subscriber("batch", batch=True)
    async def batch(items: list[Coded]) -> None:
        calls.append([i.code for i in items])

    payloads = [{"code": c} for c in "azb"]
    async with TestClient(app) as client:
        for address in ("fast", "injected", "batch"):
            results = await client.publish_batch(address, payloads)
            assert [r.acked for r in results] == [True, False, True], address
            assert not results[1].dead_lettered  # retried, like an error of the handler
            assert (results[1].reason or "").endswith(
                f"{address}, parameter {'items' if address == 'batch' else 'item'!r}: "
                "decoding the payload raised KeyError: 'z'"
            )
    assert calls == [["A", "B"]]  # one call: the batch was not split


def tenant_of(code: str) -> str:
    return {"a": "tenant-a"}[code]  # KeyError: a lookup that failed, not a bad message


Tenant = Annotated[str, AfterValidator(tenant_of)]


async def test_a_header_binding_or_address_validator_that_raises_is_retried() -> None:
    app = App()

    @app.subscriber("h")
    async def by_header(body: bytes, tenant: Annotated[Tenant, Header("tenant")]) -> None: ...

    @app.subscriber("b")
    async def by_binding(body: bytes, tenant: Annotated[Tenant, Binding("x", "t")]) -> None: ...

    @app.subscriber("p.{tenant}")
    async def by_address(body: bytes, tenant: Tenant) -> None: ...

    async with TestClient(app) as client:
        header = await client.publish("h", headers={"tenant": "z"})
        binding = await client.publish("b", bindings={"x": {"t": "z"}})
        address = await client.publish("p.z")
        assert (await client.publish("p.a")).acked
    for result, where in (
        (header, "by_header: header 'tenant'"),
        (binding, "by_binding: binding x.t"),
        (address, "by_address: address parameter 'tenant'='z'"),
    ):
        assert not result.acked
        assert not result.dead_lettered, where  # the message is not at fault: retried
        assert (result.reason or "").endswith(f"{where}: its validator raised KeyError: 'z'")


async def test_without_the_extension_a_poison_message_is_a_plain_nack() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(order: Order) -> None:
        raise DeadLetter("never valid")

    async with TestClient(app, extensions={}) as client:
        result = await client.publish("in", Order(id=1, amount=1))
    assert not result.acked
    assert not result.dead_lettered  # attempt 1 of 3: the runtime retries it
    assert result.reason is not None
    assert result.reason.endswith("<locals>.on_in: dead-lettered: never valid")


async def test_exception_nacks_with_reason_and_retries() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(order: Order) -> None:
        raise RuntimeError("database is down")

    async with TestClient(app) as client:
        result = await client.publish("in", Order(id=1, amount=1))
        last = await client.publish("in", Order(id=1, amount=1), attempt=3)
    assert not result.acked
    assert not result.dead_lettered
    assert result.reason is not None
    assert result.reason.endswith("on_in raised RuntimeError: database is down")
    assert last.dead_lettered  # the runtime's last attempt


async def test_dead_letter_now() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(order: Order) -> None:
        if order.amount < 0:
            raise DeadLetter("negative amount")

    async with TestClient(app) as client:
        bad = await client.publish("in", Order(id=1, amount=-1))
        good = await client.publish("in", Order(id=2, amount=1))
    assert bad.dead_lettered
    assert bad.reason is not None
    assert bad.reason.endswith("negative amount")
    assert good.acked


async def test_missing_header_and_bad_header_type() -> None:
    app = App()
    seen: list[int] = []

    @app.subscriber("in")
    async def on_in(body: bytes, n: Annotated[int, Header("n")]) -> None:
        seen.append(n)

    async with TestClient(app) as client:
        missing = await client.publish("in", b"")
        wrong = await client.publish("in", b"", headers={"n": "x"})
        ok = await client.publish("in", b"", headers={"N": "5"})
    assert "missing header 'n'" in (missing.reason or "")
    assert "header 'n': (root): Input should be a valid integer" in (wrong.reason or "")
    assert ok.acked
    assert seen == [5]


async def test_metadata_injection() -> None:
    app = App()
    seen: list[Any] = []

    @app.subscriber("in.{x}")
    async def on_in(
        body: bytes,
        info: MessageInfo,
        mid: Annotated[str, Meta("id")],
        attempt: Annotated[int, Meta("attempt")],
        address: Annotated[str, Meta("address")],
    ) -> None:
        seen.append((info.id, info.attempt, info.address, mid, attempt, address, info.header("h")))

    async with TestClient(app) as client:
        result = await client.publish("in.q", b"", headers={"h": "v"}, attempt=2)
    assert result.acked
    assert seen == [(result.id, 2, "in.q", result.id, 2, "in.q", "v")]


async def test_sync_handler_runs_in_a_thread() -> None:
    app = App()
    threads: list[int] = []

    @app.subscriber("in")
    def on_in(order: Order) -> None:
        threads.append(threading.get_ident())

    async with TestClient(app) as client:
        assert (await client.publish("in", Order(id=1, amount=1))).acked
    assert threads
    assert threads[0] != threading.get_ident()


async def test_sync_handler_does_not_block_the_loop() -> None:
    app = App()
    release = threading.Event()

    @app.subscriber("in")
    def on_in(body: bytes) -> None:
        assert release.wait(10)

    async with TestClient(app) as client:
        task = asyncio.create_task(client.publish("in", b""))
        await asyncio.sleep(0)  # the loop still runs while the handler blocks its thread
        release.set()
        assert (await task).acked


async def test_an_outgoing_with_its_address_is_published_without_publish_to(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App()

    @app.subscriber("fast")
    async def fast(order: Order) -> Outgoing[Order]:
        return Outgoing(order, address="audit.fast")

    @app.subscriber("untyped.{region}")
    async def untyped(order: Order, region: str):  # type: ignore[no-untyped-def]
        return Outgoing(order, address="audit.{region}")

    @app.subscriber("many", batch=True)
    async def many(orders: list[Order]) -> list[Outgoing[Order]]:
        return [Outgoing(o, address="audit.many") for o in orders]

    @app.subscriber("nowhere")
    async def nowhere(order: Order) -> Outgoing[Order]:
        return Outgoing(order)

    with caplog.at_level(logging.WARNING, logger="amgi.app"):

        @app.subscriber("dropped")
        async def dropped(order: Order) -> Invoice:
            return Invoice(order_id=order.id, total=order.amount, region="eu")

        order = {"id": 1, "amount": 2.0}
        async with TestClient(app) as client:
            for address in ("fast", "untyped.eu", "many"):
                assert (await client.publish(address, order)).acked, address
            lost = await client.publish("nowhere", order)
            assert (await client.publish("dropped", order)).acked
    # They were acked with nothing published: the messages they returned were lost.
    assert [m.address for m in client.sent] == ["audit.fast", "audit.eu", "audit.many"]
    assert not lost.acked
    assert not lost.dead_lettered
    assert (lost.reason or "").endswith(
        "nowhere: its result could not be published, nothing was published: the Outgoing "
        "has no address and the handler no publish_to; give Outgoing(..., address=...) or "
        "publish_to=..."
    )
    (warning,) = (r.getMessage() for r in caplog.records)
    assert warning.endswith(
        "dropped returns Invoice but has no publish_to: what it returns is not published "
        "(give publish_to=..., return Outgoing(..., address=...), or annotate -> None)"
    )


async def test_outgoing_sets_headers_bindings_and_address() -> None:
    app = App()

    @app.subscriber("in", publish_to="out")
    async def on_in(order: Order) -> Outgoing[Order] | None:
        if order.id == 0:
            return None
        return Outgoing(
            order,
            headers={"x-id": str(order.id)},
            bindings={"kafka": {"key": b"k"}},
            address="special" if order.id == 2 else None,
        )

    async with TestClient(app) as client:
        none = await client.publish("in", Order(id=0, amount=1))
        one = await client.publish("in", Order(id=1, amount=1))
        two = await client.publish("in", Order(id=2, amount=1))
    assert none.acked
    assert not none.sent
    assert [s.address for s in client.sent] == ["out", "special"]
    assert (b"x-id", b"1") in one.sent[0].headers
    assert one.sent[0].bindings == {"kafka": {"key": b"k"}}
    assert two.acked


async def test_publisher_sends_several_to_any_address() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(order: Order, publisher: Publisher) -> None:
        await publisher.publish("audit", {"seen": order.id})
        if order.amount > 10:
            await publisher.publish("alerts", order, headers={"level": "high"})
        await publisher.publish("raw", b"\x01")

    async with TestClient(app) as client:
        result = await client.publish("in", Order(id=3, amount=20))
    assert result.acked
    assert [(s.address, s.payload) for s in result.sent] == [
        ("audit", b'{"seen":3}'),
        ("alerts", b'{"id":3,"amount":20.0,"customer":"anon"}'),
        ("raw", b"\x01"),
    ]
    assert (b"level", b"high") in result.sent[1].headers


async def test_output_that_fails_serialization_nacks_and_sends_nothing() -> None:
    app = App()

    @app.subscriber("in", publish_to="out")
    async def on_in(body: bytes) -> Invoice:
        return "not an invoice"  # type: ignore[return-value]

    async with TestClient(app) as client:
        result = await client.publish("in", b"")
    assert not result.acked
    assert "its result could not be serialized, nothing was published" in (result.reason or "")
    assert client.sent == []


async def test_failed_send_nacks_the_input() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(body: bytes, publisher: Publisher) -> None:
        await publisher.publish("out", b"x")

    async def refuse(*args: Any) -> None:
        raise ConnectionRefusedError("broker refused")

    async with TestClient(app):
        from amgi.runtime.batch import call_app
        from amgi.runtime.config import RuntimeConfig
        from amgi.transport import Batch, Message

        settlement = await call_app(
            app, Batch("in", [Message("1", [], b"", {}, 1)]), refuse, RuntimeConfig()
        )
    assert settlement.retry[0].reason.endswith("raised ConnectionRefusedError: broker refused")


class Priced(BaseModel):
    id: int
    price: float


async def test_batch_handler_gets_the_batch_and_fails_single_items() -> None:
    app = App()
    calls: list[list[int]] = []

    @app.subscriber("prices", batch=True, publish_to="out")
    async def on_prices(
        items: list[Priced], failures: Failures, infos: list[MessageInfo]
    ) -> list[Priced]:
        calls.append([p.id for p in items])
        assert [i.address for i in infos] == ["prices"] * len(items)
        for i, p in enumerate(items):
            if p.price < 0:
                failures.fail(i, "negative price", dead_letter=p.price < -100)
        return [p for p in items if p.price >= 0]

    async with TestClient(app) as client:
        results = await client.publish_batch(
            "prices",
            [
                Priced(id=1, price=1),
                b'{"id": 2, "price": "bad"}',
                Priced(id=3, price=-1),
                Priced(id=4, price=-500),
                Priced(id=5, price=2),
            ],
        )
    assert calls == [[1, 3, 4, 5]]  # one call, the invalid item left out
    assert [r.acked for r in results] == [True, False, False, False, True]
    assert "items.price" not in (results[1].reason or "")
    assert "price: Input should be a valid number" in (results[1].reason or "")
    assert results[1].dead_lettered
    assert results[2].reason is not None
    assert results[2].reason.endswith("negative price")
    assert not results[2].dead_lettered
    assert results[3].dead_lettered
    assert [json.loads(s.payload or b"")["id"] for s in client.sent] == [1, 5]


async def test_batch_handler_exception_nacks_every_item() -> None:
    app = App()

    @app.subscriber("in", batch=True)
    async def on_in(items: list[int]) -> None:
        raise ValueError("boom")

    async with TestClient(app) as client:
        results = await client.publish_batch("in", [1, 2])
    assert all(
        not r.acked and (r.reason or "").endswith("raised ValueError: boom") for r in results
    )


async def test_messages_are_handled_in_order_by_default() -> None:
    app = App()
    log: list[str] = []

    @app.subscriber("in")
    async def on_in(n: int) -> None:
        log.append(f"start {n}")
        await asyncio.sleep(0.01 if n == 1 else 0)
        log.append(f"end {n}")

    async with TestClient(app) as client:
        assert all(r.acked for r in await client.publish_batch("in", [1, 2]))
    assert log == ["start 1", "end 1", "start 2", "end 2"]


async def test_concurrency_opt_in_runs_messages_of_a_batch_at_once() -> None:
    app = App()
    running = 0
    peak = 0
    both = asyncio.Event()

    @app.subscriber("in", concurrency=4)
    async def on_in(n: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 3:
            both.set()
        await asyncio.wait_for(both.wait(), 5)
        running -= 1
        if n == 2:
            raise ValueError("two")

    async with TestClient(app) as client:
        results = await client.publish_batch("in", [1, 2, 3])
    assert peak == 3
    assert [r.acked for r in results] == [True, False, True]


async def test_middleware_runs_in_declared_order_around_the_handler() -> None:
    log: list[str] = []

    def named(name: str) -> Any:
        async def middleware(call: Any, call_next: Any) -> Any:
            log.append(f"{name} in {call.handler.rsplit('.', 1)[-1]} {call.messages[0].id}")
            try:
                return await call_next()
            finally:
                log.append(f"{name} out")

        return middleware

    app = App(middleware=[named("outer"), named("inner")])

    @app.subscriber("in")
    async def on_in(n: int) -> None:
        log.append(f"handler {n}")

    async with TestClient(app) as client:
        result = await client.publish("in", 5)
    assert result.acked
    assert log == [
        f"outer in on_in {result.id}",
        f"inner in on_in {result.id}",
        "handler 5",
        "inner out",
        "outer out",
    ]


async def test_batch_handler_dead_letter_and_unserializable_output() -> None:
    app = App()

    @app.subscriber("dead", batch=True)
    async def on_dead(items: list[int]) -> None:
        raise DeadLetter("whole batch is poison")

    @app.subscriber("bad-output", batch=True, publish_to="out")
    async def on_bad(items: list[int]) -> list[Invoice]:
        return [Invoice(order_id=1, total=1, region="x"), "nope"]  # type: ignore[list-item]

    async with TestClient(app) as client:
        dead = await client.publish_batch("dead", [1, 2])
        bad = await client.publish_batch("bad-output", [1, 2])
    assert all(r.dead_lettered for r in dead)
    assert all("could not be serialized, nothing was published" in (r.reason or "") for r in bad)
    assert not any(r.dead_lettered for r in bad)
    assert client.sent == []


async def test_sync_handler_result_is_published_and_middleware_sees_batches() -> None:
    seen: list[tuple[str, int]] = []

    async def count(call: Any, call_next: Any) -> Any:
        seen.append((call.address, len(call.messages)))
        return await call_next()

    app = App(middleware=[count])

    @app.subscriber("in", publish_to="out")
    def on_in(order: Order) -> Invoice:
        return Invoice(order_id=order.id, total=order.amount, region="sync")

    @app.subscriber("many", batch=True)
    async def on_many(items: list[int]) -> None: ...

    async with TestClient(app) as client:
        result = await client.publish("in", Order(id=9, amount=1))
        assert all(r.acked for r in await client.publish_batch("many", [1, 2, 3]))
    assert result.acked
    assert json.loads(result.sent[0].payload or b"")["region"] == "sync"
    assert seen == [("in", 1), ("many", 3)]


async def test_concurrent_handler_publishes_each_result() -> None:
    app = App()

    @app.subscriber("in", publish_to="out", concurrency=3)
    async def on_in(n: int) -> int:
        await asyncio.sleep(0.001 * (3 - n))
        return n * 10

    async with TestClient(app) as client:
        results = await client.publish_batch("in", [1, 2, 3])
    assert all(r.acked for r in results)
    assert sorted(json.loads(s.payload or b"") for s in client.sent) == [10, 20, 30]


@pytest.mark.parametrize(
    ("annotation", "payload", "expected"),
    [
        (str | None, b"hello world", "hello world"),
        (Optional[str], b"caf\xc3\xa9", "caf\u00e9"),  # noqa: UP045 - the form under test
        (Union[bytes, None], b"\x00raw", b"\x00raw"),  # noqa: UP007
        (Annotated[str, Field(max_length=5)], b"short", "short"),
        (Annotated[bytes | None, Field(min_length=1)], b"\x01", b"\x01"),
        (Optional[Annotated[str, Field(min_length=1)]], None, None),  # noqa: UP045
    ],
)
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/octet-stream"])
async def test_raw_payloads_in_optional_and_annotated_forms(
    annotation: Any, payload: bytes | None, expected: Any, content_type: str | None
) -> None:
    app = App()
    got: list[Any] = []

    async def handler(value: Any) -> None:
        got.append(value)

    handler.__annotations__["value"] = annotation
    app.subscriber("in")(handler)
    headers = {"content-type": content_type} if content_type else None
    async with TestClient(app) as client:
        result = await client.publish("in", payload, headers=headers)
    assert result.acked, result.reason
    assert got == [expected]


async def test_raw_payload_constraints_are_checked() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(text: Annotated[str, Field(max_length=5)]) -> None: ...

    async with TestClient(app) as client:
        long = await client.publish("in", b"far too long")
    assert long.dead_lettered
    assert (long.reason or "").endswith(
        "parameter 'text': (root): String should have at most 5 characters"
    )


async def test_a_content_type_header_of_the_user_replaces_the_layers() -> None:
    def parse_csv(data: bytes) -> dict[str, str]:
        name, city = data.decode().split(",")
        return {"name": name, "city": city}

    app = App(decoders={"text/csv": parse_csv})
    rows: list[dict[str, str]] = []

    @app.subscriber("in", publish_to="rows")
    async def on_in(body: bytes, publisher: Publisher) -> Outgoing[bytes]:
        await publisher.publish("rows", body, headers={"Content-Type": "text/csv"})
        return Outgoing(body, headers={"content-type": "text/csv", "x": "1"})

    @app.subscriber("rows")
    async def on_row(row: dict[str, str]) -> None:
        rows.append(row)

    async with TestClient(app) as client:
        result = await client.publish("in", b"ada,paris")
        for sent in result.sent:
            assert (await client.publish("rows", sent.payload, headers=sent.headers)).acked
    assert [s.headers for s in result.sent] == [
        [(b"Content-Type", b"text/csv")],
        [(b"content-type", b"text/csv"), (b"x", b"1")],
    ]
    assert rows == [{"name": "ada", "city": "paris"}] * 2


async def test_publish_to_placeholders_take_the_consumed_address_parameters() -> None:
    app = App()

    @app.subscriber("orders.{region}.{n}", publish_to="invoices.{region}.{n}")
    async def on_order(order: Order, n: int) -> Order:
        return order

    async with TestClient(app) as client:
        result = await client.publish("orders.eu.007", Order(id=1, amount=1))
    assert result.acked, result.reason
    assert [s.address for s in result.sent] == ["invoices.eu.007"]


async def test_publisher_takes_bytearray_and_memoryview() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(body: bytes, publisher: Publisher) -> None:
        await publisher.publish("a", bytearray(body))
        await publisher.publish("b", memoryview(body))

    async with TestClient(app) as client:
        result = await client.publish("in", b"\x00ab")
    assert result.acked, result.reason
    assert [(s.payload, s.headers) for s in result.sent] == [
        (b"\x00ab", [(b"content-type", b"application/octet-stream")])
    ] * 2


async def test_a_result_that_validates_into_the_declared_type_is_published() -> None:
    app = App()

    @app.subscriber("in", publish_to="out")
    async def on_in(spec: dict[str, Any]) -> Invoice:
        return spec  # type: ignore[return-value]

    async with TestClient(app) as client:
        ok = await client.publish("in", {"order_id": 1, "total": 2, "region": "eu"})
        bad = await client.publish("in", {"order_id": 1, "wrong": [1, 2]})
    assert ok.acked, ok.reason
    assert ok.sent[0].payload == b'{"order_id":1,"total":2.0,"region":"eu"}'
    assert not bad.acked
    assert (bad.reason or "").endswith(
        "its result could not be serialized, nothing was published: "
        "ValidationError: total: Field required; region: Field required"
    )


async def test_nack_reasons_are_one_line() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(body: bytes) -> None:
        raise RuntimeError("first line\n  second line")

    async with TestClient(app) as client:
        result = await client.publish("in", b"")
    assert (result.reason or "").endswith("raised RuntimeError: first line second line")


async def test_a_handler_failure_logs_its_traceback_once_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App()

    def lookup(order: Order) -> float:
        return {"eu": 1.0}[order.customer]

    @app.subscriber("one")
    async def on_one(order: Order) -> None:
        lookup(order)

    @app.subscriber("each")
    async def on_each(order: Order, attempt: Annotated[int, Meta("attempt")]) -> None:
        lookup(order)

    @app.subscriber("all", batch=True)
    async def on_all(orders: list[Order]) -> None:
        lookup(orders[0])

    with caplog.at_level(logging.DEBUG, logger="amgi.app"):
        async with TestClient(app) as client:
            for address in ("one", "each"):
                assert not (await client.publish(address, Order(id=1, amount=1))).acked
            batch = await client.publish_batch("all", [Order(id=2, amount=1)] * 2)
            assert not any(r.acked for r in batch)
            retried = await client.publish("one", Order(id=3, amount=1), attempt=2)
    assert not retried.acked
    records = [r for r in caplog.records if r.name == "amgi.app"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (
            logging.ERROR,
            f"message 1 from 'one' (attempt 1): {on_one.__qualname__} raised KeyError: 'anon'",
        ),
        (
            logging.ERROR,
            f"message 2 from 'each' (attempt 1): {on_each.__qualname__} raised KeyError: 'anon'",
        ),
        (
            logging.ERROR,
            f"a batch of 2 message(s) from 'all' (attempt 1): "
            f"{on_all.__qualname__} raised KeyError: 'anon'",
        ),
        (
            logging.DEBUG,
            f"message 5 from 'one' (attempt 2): {on_one.__qualname__} raised KeyError: 'anon'",
        ),
    ]
    for record in records:
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], KeyError)
    assert "in lookup" in caplog.text  # the line that raised, not only its message


async def test_a_cancelled_error_of_the_handler_is_its_failure_not_a_cancelled_call() -> None:
    app = App()

    async def cancelled() -> None:
        task = asyncio.create_task(asyncio.sleep(10))
        await asyncio.sleep(0)
        task.cancel()
        await task  # raises CancelledError here, in a call nobody cancelled

    @app.subscriber("one")
    async def on_one(order: Order) -> None:
        await cancelled()

    @app.subscriber("each")
    async def on_each(order: Order, attempt: Annotated[int, Meta("attempt")]) -> None:
        await cancelled()

    @app.subscriber("all", batch=True)
    async def on_all(orders: list[Order]) -> None:
        await cancelled()

    @app.subscriber("many", concurrency=2)
    async def on_many(order: Order, attempt: Annotated[int, Meta("attempt")]) -> None:
        await cancelled()

    async with TestClient(app) as client:
        results = [await client.publish(a, Order(id=1, amount=1)) for a in ("one", "each")]
        results += await client.publish_batch("all", [Order(id=2, amount=1)] * 2)
        results += await client.publish_batch("many", [Order(id=3, amount=1)] * 2)
    handlers = [on_one, on_each, on_all, on_all, on_many, on_many]
    for result, handler in zip(results, handlers, strict=True):
        assert not result.acked
        assert not result.dead_lettered  # retried, like any failure of the handler
        assert result.reason == (
            f"{handler.__qualname__} raised CancelledError, though its call was not "
            "cancelled (it awaited a task or future that was cancelled)"
        )


async def test_a_header_value_neither_str_nor_bytes_is_named_in_the_nack() -> None:
    app = App()

    @app.subscriber("returned", publish_to="out")
    async def on_returned(order: Order) -> Outgoing[Order]:
        return Outgoing(order, headers={"retries": 3})  # type: ignore[dict-item]

    @app.subscriber("published")
    async def on_published(order: Order, publisher: Publisher) -> None:
        await publisher.publish("out", order, headers={"retries": 3})  # type: ignore[dict-item]

    async with TestClient(app) as client:
        returned = await client.publish("returned", Order(id=1, amount=1))
        published = await client.publish("published", Order(id=1, amount=1))
    assert not client.sent
    assert returned.reason == (
        f"{on_returned.__qualname__}: its result could not be serialized, nothing was "
        "published: TypeError: header 'retries': its value must be str or bytes, not int"
    )
    assert published.reason == (
        f"{on_published.__qualname__} raised TypeError: header 'retries': its value must be "
        "str or bytes, not int"
    )
