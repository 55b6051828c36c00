"""The HTTP push server against real peers: uvicorn serving ``amgi.http.PushApp`` (and the
server's own listener), events built with the official CloudEvents SDK, posted with httpx."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat
from starlette.applications import Starlette
from starlette.routing import Mount

from amgi.errors import ConfigurationError, StartupFailed
from amgi.http import PushApp
from amgi.runtime import Runtime, RuntimeConfig
from amgi.runtime.routing import Router
from amgi.servers.http import HttpOptions, HttpSendError, HttpTransport
from amgi.servers.http._sender import encode_structured
from tests.net import self_signed
from tests.servers.http_helpers import (
    WAYS,
    Recorder,
    Stepped,
    batched,
    binary,
    cloud_event,
    serving,
    structured,
    uvicorn_serving,
)

pytestmark = pytest.mark.timeout(60)

FAST = RuntimeConfig(shutdown_timeout=5.0)


@pytest.fixture(params=WAYS)
def way(request: pytest.FixtureRequest) -> str:
    """Each test of this kind runs under uvicorn (``PushApp``) and on the own listener."""
    return str(request.param)


def _ce_headers(received: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    return list(received["headers"])


# -- content modes ---------------------------------------------------------------------------------


async def test_binary_mode_headers_are_the_attributes_byte_for_byte(way: str) -> None:
    app = Recorder()
    event = cloud_event(
        "orders.created",
        {"id": 7},
        subject="order/7",
        datacontenttype="application/json",
        tenant="zürich 100%",  # an extension the SDK percent-encodes
    )
    headers, body = binary(event)
    async with serving(way, app, config=FAST) as served, httpx.AsyncClient() as client:
        answer = await client.post(served.url + "/", headers=headers, content=body)
    assert answer.status_code == 204
    (message,) = app.received
    assert app.scopes[0]["address"] == "orders.created"
    expected = [
        (name.lower().encode(), unquote(value).encode("utf-8"))
        for name, value in headers.items()
        if name.lower().startswith("ce-") or name.lower() == "content-type"
    ]
    assert _ce_headers(message) == expected
    assert (b"ce-tenant", "zürich 100%".encode()) in message["headers"]
    assert message["payload"] == body
    assert json.loads(message["payload"]) == {"id": 7}


async def test_structured_mode_maps_attributes_and_data(way: str) -> None:
    app = Recorder()
    json_event = cloud_event("orders.created", {"id": 8, "name": "ä"}, subject="s", count=3)
    bytes_event = cloud_event(
        "orders.created", b"\x00\x01raw", datacontenttype="application/octet-stream"
    )
    async with serving(way, app, config=FAST) as served, httpx.AsyncClient() as client:
        for event in (json_event, bytes_event):
            headers, body = structured(event)
            answer = await client.post(served.url + "/", headers=headers, content=body)
            assert answer.status_code == 204, answer.text
    first, second = app.received
    doc = json.loads(structured(json_event)[1])
    expected = [
        (b"content-type" if k == "datacontenttype" else b"ce-" + k.encode(), str(v).encode())
        for k, v in doc.items()
        if k != "data"
    ]
    assert first["headers"] == expected
    assert (b"ce-count", b"3") in first["headers"]
    assert json.loads(first["payload"]) == {"id": 8, "name": "ä"}
    assert second["payload"] == b"\x00\x01raw"
    assert (b"content-type", b"application/octet-stream") in second["headers"]


async def test_batched_mode_is_one_app_call_per_address(way: str) -> None:
    app = Recorder()
    events = [cloud_event("orders", {"n": i}) for i in range(3)] + [cloud_event("refunds", 1)]
    headers, body = batched(*events)
    async with serving(way, app, config=FAST) as served, httpx.AsyncClient() as client:
        answer = await client.post(served.url + "/", headers=headers, content=body)
    assert answer.status_code == 204
    assert sorted(s["address"] for s in app.scopes) == ["orders", "refunds"]
    orders = [m for m in app.received if json.loads(m["payload"]) != 1]
    assert [json.loads(m["payload"])["n"] for m in orders] == [0, 1, 2]
    assert [m["more_messages"] for m in orders] == [True, True, False]


async def test_a_batch_with_one_nack_is_answered_as_a_retry(way: str) -> None:
    app = Recorder()
    headers, body = batched(cloud_event("orders", "ok"), cloud_event("orders", "nack me"))
    async with serving(way, app, config=FAST) as served, httpx.AsyncClient() as client:
        answer = await client.post(served.url + "/", headers=headers, content=body)
    assert answer.status_code == 500
    assert "told to" in answer.text
    assert len(app.received) == 2


async def test_pubsub_push_envelope(way: str) -> None:
    app = Recorder()
    envelope = {
        "message": {
            "attributes": {"kind": "invoice", "région": "eu"},
            "data": base64.b64encode(b'{"total": 12}').decode(),
            "messageId": "136969346945",
            "publishTime": "2026-11-30T10:00:00.000Z",
            "orderingKey": "customer-1",
        },
        "subscription": "projects/demo/subscriptions/billing-push",
        "deliveryAttempt": 2,
    }
    async with serving(way, app, config=FAST) as served, httpx.AsyncClient() as client:
        answer = await client.post(served.url + "/", json=envelope)
    assert answer.status_code == 204
    (message,) = app.received
    assert app.scopes[0]["address"] == "billing-push"
    assert message["headers"] == [(b"kind", b"invoice"), ("région".encode(), b"eu")]
    assert message["payload"] == b'{"total": 12}'
    assert message["bindings"]["googlepubsub"] == {
        "messageId": "136969346945",
        "publishTime": "2026-11-30T10:00:00.000Z",
        "orderingKey": "customer-1",
        "subscription": "projects/demo/subscriptions/billing-push",
    }
    assert message["bindings"]["amgi"]["attempt"] == 2


async def test_a_pubsub_push_past_its_attempts_is_answered_a_retry_and_logged_as_kept(
    way: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The server has no dead-letter destination: the sender keeps what the runtime
    # dead-letters (Pub/Sub moves it to its own dead-letter topic), and the log said
    # "dead-lettered" as if it were stored somewhere.
    app = Recorder()
    config = RuntimeConfig(shutdown_timeout=5.0, max_attempts=2)
    answers = []
    async with serving(way, app, config=config) as served, httpx.AsyncClient() as client:
        for attempt, data in ((2, b"nack: last try"), (3, b"over the attempts")):
            envelope = {
                "message": {"data": base64.b64encode(data).decode(), "messageId": "1"},
                "subscription": "projects/demo/subscriptions/billing",
                "deliveryAttempt": attempt,
            }
            answers.append(await client.post(served.url + "/", json=envelope))
    assert [a.status_code for a in answers] == [500, 500]
    assert [m["payload"] for m in app.received] == [b"nack: last try"]
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("amgi")]
    assert not [line for line in lines if "dead-lettered after" in line]
    kept = [line for line in lines if "no dead-letter destination" in line]
    assert len(kept) == 2, lines


# -- settlement, retries, batching -----------------------------------------------------------------


async def test_nack_answers_5xx_and_the_retried_request_is_processed(way: str) -> None:
    headers, body = binary(cloud_event("orders", "first try fails"))
    app = Recorder(nack_once={body})
    async with serving(way, app, config=FAST) as served, httpx.AsyncClient() as client:
        first = await client.post(served.url + "/", headers=headers, content=body)
        again = await client.post(
            served.url + "/", headers=headers, content=body
        )  # the sender retries
    assert first.status_code == 500
    assert first.text == "nacked: told to\n"
    assert again.status_code == 204
    assert [m["payload"] for m in app.received] == [body, body]


async def test_concurrent_requests_are_batched_in_the_runtime(way: str) -> None:
    gate = asyncio.Event()
    app = Recorder(gate=gate)
    async with (
        serving(way, app, config=RuntimeConfig(concurrency=1, shutdown_timeout=5.0)) as served,
        httpx.AsyncClient() as client,
    ):
        headers, body = binary(cloud_event("orders", 0))
        first = asyncio.create_task(client.post(served.url + "/", headers=headers, content=body))
        await asyncio.wait_for(app.entered.wait(), 10)
        rest = [
            asyncio.create_task(client.post(served.url + "/", headers=h, content=b))
            for h, b in (binary(cloud_event("orders", i)) for i in range(1, 11))
        ]
        while served.transport.inbox.waiting < 10:  # every request queued
            await asyncio.sleep(0.01)
        gate.set()
        answers = await asyncio.gather(first, *rest)
    assert [a.status_code for a in answers] == [204] * 11
    assert len(app.scopes) == 2  # the first request alone, then the ten queued as one batch
    assert len(app.received) == 11


async def test_shutdown_finishes_in_flight_requests_and_answers_new_ones_503(way: str) -> None:
    gate = asyncio.Event()
    app = Recorder(gate=gate)
    async with (
        serving(way, app, config=RuntimeConfig(concurrency=1, shutdown_timeout=10.0)) as served,
        httpx.AsyncClient() as client,
    ):
        h1, b1 = binary(cloud_event("orders", "in flight"))
        h2, b2 = binary(cloud_event("orders", "queued"))
        in_flight = asyncio.create_task(client.post(served.url + "/", headers=h1, content=b1))
        await asyncio.wait_for(app.entered.wait(), 10)
        queued = asyncio.create_task(client.post(served.url + "/", headers=h2, content=b2))
        while not served.transport.inbox.waiting:
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(served.stop())
        assert (await queued).status_code == 503  # not taken by the app: the sender keeps it
        try:
            late = await client.post(served.url + "/", headers=h2, content=b2)
            assert late.status_code == 503
        except httpx.TransportError:
            # the own listener closes connections as they fall idle, and new ones at once:
            # the sender keeps the message just the same
            assert way == "own"
        assert not in_flight.done()
        gate.set()
        assert (await in_flight).status_code == 204
        assert await stopping == 0
    assert [m["payload"] for m in app.received] == [b1]


async def test_a_stop_answers_the_request_in_flight_and_503_to_one_still_waiting_for_a_slot(
    way: str,
) -> None:
    """Requests of two addresses queue behind the one slot; it frees up and runs the
    first. At the stop that one finishes (204) and the other, never taken (a fetch
    takes one batch, so it waits in the inbox, not in the runtime), is answered 503 at
    once and never runs: its sender pushes it again. Every sender gets an answer."""
    app = Stepped()
    config = RuntimeConfig(concurrency=1, shutdown_timeout=10.0)
    async with serving(way, app, config=config) as served, httpx.AsyncClient() as client:

        def post(type_: str, n: int) -> asyncio.Task[httpx.Response]:
            headers, body = binary(cloud_event(type_, n))
            return asyncio.create_task(client.post(served.url + "/", headers=headers, content=body))

        first = post("orders", 0)
        while app.calls < 1:
            await asyncio.sleep(0.01)
        queued = [post("orders", 1), post("invoices", 2)]
        while served.transport.inbox.waiting < 2:
            await asyncio.sleep(0.01)
        app.go.release()  # the first call ends; the slot runs the next "orders"
        while app.calls < 2:
            await asyncio.sleep(0.01)
        assert served.transport.inbox.waiting == 1  # "invoices", still in the inbox
        stopping = asyncio.create_task(served.stop())
        assert (await asyncio.wait_for(queued[1], 10)).status_code == 503
        app.go.release()
        answers = await asyncio.wait_for(asyncio.gather(first, queued[0]), 20)
        assert await stopping == 0
    assert [a.status_code for a in answers] == [204, 204]
    assert [s["address"] for s in app.scopes] == ["orders", "orders"]


# -- bad input: the app is never called ------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body", "status", "says"),
    [
        ({"content-type": "application/cloudevents+json"}, b"{not json", 400, "not JSON"),
        (
            {"content-type": "application/cloudevents+json"},
            b'{"specversion": "1.0", "id": "1", "type": "t"}',
            400,
            "'source'",
        ),
        (
            {"content-type": "application/cloudevents+json"},
            b'{"specversion": "0.3", "id": "1", "source": "s", "type": "t"}',
            400,
            "not 1.0",
        ),
        (
            {"content-type": "application/cloudevents+json"},
            b'{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"@@"}',
            400,
            "base64",
        ),
        ({"content-type": "application/cloudevents-batch+json"}, b"{}", 400, "array"),
        ({"content-type": "application/cloudevents-batch+json"}, b"[]", 400, "empty"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t"}, b"x", 400, "ce-source"),
        ({"content-type": "application/json"}, b'{"no": "message"}', 400, "message"),
        (
            {"content-type": "application/json"},
            b'{"message": {"data": "not base64!"}, "subscription": "projects/p/subscriptions/s"}',
            400,
            "base64",
        ),
        (
            {"content-type": "application/json"},
            b'{"message": {"attributes": {"a": 1}}, "subscription": "s"}',
            400,
            "attribute 'a'",
        ),
        ({"content-type": "application/json"}, b'{"message": {}}', 400, "no subscription"),
        (
            {"content-type": "application/cloudevents+json"},
            b'{"specversion":"1.0","id":"1","source":"s","type":"t","ext":{"a":1}}',
            400,
            "attribute 'ext'",
        ),
        (
            {"content-type": "application/cloudevents+json"},
            b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":1,"data_base64":"AA=="}',
            400,
            "both",
        ),
        (
            {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": ""},
            b"x",
            400,
            "empty",
        ),
        ({"content-type": "text/plain"}, b"hello", 415, "text/plain"),
        ({}, b"hello", 415, "none"),
        ({"content-type": "application/xml", "ce-id": "1"}, b"<a/>", 415, "xml"),
    ],
)
async def test_malformed_events_and_wrong_content_types_never_reach_the_app(
    headers: dict[str, str], body: bytes, status: int, says: str, way: str
) -> None:
    app = Recorder()
    async with serving(way, app, config=FAST) as served, httpx.AsyncClient() as client:
        answer = await client.post(served.url + "/", headers=headers, content=body)
    assert answer.status_code == status
    assert says in answer.text
    assert app.received == []


_STRUCTURED = {"content-type": "application/cloudevents+json"}
_JSON = {"content-type": "application/json"}
_BASE = '{"specversion":"1.0","id":"1","source":"s","type":"t"'
_EVENT = _BASE + ',"data":%s}'
_BATCH = {"content-type": "application/cloudevents-batch+json"}
_LONE = "body is not Unicode text (a lone surrogate"


@pytest.mark.parametrize(
    ("headers", "body", "says"),
    [
        (_STRUCTURED, b"[" * 100_000, "structured event: body is not JSON (nested too deeply)"),
        (
            {"content-type": "application/cloudevents-batch+json"},
            b"[" * 100_000,
            "event batch: body is not JSON (nested too deeply)",
        ),
        ({"content-type": "application/json"}, b"[" * 100_000, "Pub/Sub push: body is not"),
        # deeper than any interpreter reads (3.13 reads 5,000 levels; 3.11 and 3.12 do not)
        (_STRUCTURED, (_EVENT % ("[" * 100_000 + "]" * 100_000)).encode(), "nested too deeply"),
        (_STRUCTURED, (_EVENT % "NaN").encode(), "NaN is not a JSON number"),
        (_STRUCTURED, (_EVENT % "[Infinity]").encode(), "Infinity is not a JSON number"),
        (_STRUCTURED, (_EVENT % "-Infinity").encode(), "-Infinity is not a JSON number"),
        (_STRUCTURED, (_EVENT % "1e400").encode(), "data holds a number out of range"),
        # names are lower-case a-z and 0-9, strings hold no control character (such
        # attributes reached the app as headers; CR LF then went out with message.send)
        (_STRUCTURED, (_BASE + ',"Tenant":"a"}').encode(), "name 'Tenant' is not lower-case"),
        (_STRUCTURED, (_BASE + ',"a\\r\\nb":"a"}').encode(), "name 'a\\r\\nb' is not"),
        (_STRUCTURED, (_BASE + ',"datacontenttype":"a\\nb: c"}').encode(), "control character"),
        (_STRUCTURED, (_BASE + ',"subject":"a\\u0000"}').encode(), "'subject' holds a control"),
        # Pub/Sub fields of the wrong type (an empty list was taken as no attributes,
        # a messageId object went into the bindings)
        (_JSON, b'{"message":{"attributes":[]},"subscription":"s"}', "attributes is not an"),
        (_JSON, b'{"message":{"messageId":{}},"subscription":"s"}', "messageId is not a string"),
        # a lone surrogate is no Unicode text: as an escape (an attribute, an extension,
        # data, a key), or as bytes (UTF-8 has none)
        (_JSON, b'{"message":{"attributes":{"k":"\\ud800"}},"subscription":"s"}', _LONE),
        (_STRUCTURED, (_BASE + ',"x":"a\\udfff"}').encode(), _LONE),
        (_STRUCTURED, (_EVENT % '{"\\udc00":1}').encode(), _LONE),
        (_BATCH, ("[" + _EVENT % '[[1,"\\uD800"]]' + "]").encode(), "event batch: " + _LONE),
        (
            _STRUCTURED,
            (_BASE + ',"x":"\udfff"}').encode("utf-8", "surrogatepass"),
            "body is not JSON ('utf-8' codec can't decode",
        ),
    ],
)
async def test_json_too_deep_or_not_strict_is_400_without_a_traceback(
    headers: dict[str, str], body: bytes, says: str, way: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A deeply nested body used to be a 500 (a retry for the pusher) with a traceback
    logged each time; NaN and Infinity (not JSON) reached the app labelled JSON; so did
    attributes that are no CloudEvents attribute. A lone surrogate was a 500 with a
    traceback (the own listener) or an exception into the ASGI server (PushApp)."""
    app = Recorder()
    async with serving(way, app, config=FAST) as served, httpx.AsyncClient() as client:
        answer = await client.post(served.url + "/", headers=headers, content=body)
    assert answer.status_code == 400
    assert says in answer.text
    assert app.received == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_surrogate_pair_escape_is_the_character_it_encodes(way: str) -> None:
    """Only a lone surrogate is refused: a pair (JSON's escape of a character past
    U+FFFF) is that character, in the headers and in the payload, as UTF-8."""
    app = Recorder()
    body = (_BASE + ',"x":"\\ud83d\\ude00","data":{"e":"\\uD83D\\uDE00"}}').encode()
    async with serving(way, app, config=FAST) as served, httpx.AsyncClient() as client:
        answer = await client.post(served.url + "/", headers=_STRUCTURED, content=body)
    assert answer.status_code == 204, answer.text
    (message,) = app.received
    assert (b"ce-x", "\U0001f600".encode()) in message["headers"]
    assert message["payload"] == '{"e":"\U0001f600"}'.encode()


_BINARY = "POST / HTTP/1.1\r\nhost: x\r\nce-specversion: 1.0\r\nce-id: 1\r\nce-source: s\r\n"


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ("ce-type: t\r\nce-tenant: a%0D%0Ab\r\n", "ce-tenant holds a control character"),
        ("ce-type: t\r\nce-specversion: 0.3\r\n", "ce-specversion given more than once"),
        ("ce-type: %FF\r\n", "ce-type is not UTF-8"),
        # the next three reached the app (structured mode refused the same event)
        ("ce-type: t\r\nce-foo_bar: 1\r\n", "header ce-foo_bar names no attribute"),
        ("ce-type: t\r\nce-: 1\r\n", "header ce- names no attribute"),
        ("ce-type: t\r\nce-tenant: a\tb\r\n", "ce-tenant holds a control character"),
        # C1 controls (U+0080-U+009F), percent-encoded or as UTF-8, and bytes that are no
        # UTF-8 reached the app (structured mode refused the same attribute)
        ("ce-type: t\r\nce-tenant: a%C2%85b\r\n", "ce-tenant holds a control character"),
        ("ce-type: t\r\nce-tenant: a\x9fb\r\n", "ce-tenant holds a control character"),
        ("ce-type: t\r\nce-tenant: a%FFb\r\n", "ce-tenant is not UTF-8"),
    ],
)
async def test_binary_headers_that_are_no_attribute_text_are_400(extra: str, says: str) -> None:
    """Percent-decoding gave CR LF, a repeated ce-specversion was read as the last one,
    and an address that is not UTF-8 became U+FFFD. A valid event of the same address
    comes first, so that the refused one takes the path of an address already known."""
    app = Recorder()
    async with serving("own", app, config=FAST) as served:
        port = int(served.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((_BINARY + "ce-type: t\r\ncontent-length: 2\r\n\r\nok").encode())
        async with asyncio.timeout(10):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 204 ")
        writer.write((_BINARY + extra + "content-length: 1\r\n\r\nx").encode())
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            text = (await reader.readexactly(length)).decode()
        writer.close()
    assert head.startswith(b"HTTP/1.1 400 ")
    assert says in text
    assert [m["payload"] for m in app.received] == [b"ok"]


async def test_oversize_bodies_get_413_declared_or_streamed(way: str) -> None:
    app = Recorder()
    headers, _ = binary(cloud_event("orders"))

    async def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 50

    async with (
        serving(way, app, HttpOptions(max_body=100), config=FAST) as served,
        httpx.AsyncClient() as client,
    ):
        declared = await client.post(served.url + "/", headers=headers, content=b"x" * 101)
        streamed = await client.post(served.url + "/", headers=headers, content=chunks())
        fits = await client.post(served.url + "/", headers=headers, content=b"x" * 100)
    assert declared.status_code == 413
    assert streamed.status_code == 413
    assert fits.status_code == 204
    assert len(app.received) == 1


async def test_wrong_method_and_unserved_address(way: str) -> None:
    app = Recorder()
    headers, body = binary(cloud_event("refunds"))
    async with (
        serving(way, app, config=FAST, addresses=["orders"]) as served,
        httpx.AsyncClient() as client,
    ):
        get = await client.get(served.url + "/")
        unserved = await client.post(served.url + "/", headers=headers, content=body)
    assert get.status_code == 405
    assert get.headers["allow"] == "POST"
    assert unserved.status_code == 404
    assert app.received == []


# -- inside an ASGI stack --------------------------------------------------------------------------


async def test_mounted_in_starlette_with_the_address_from_the_path() -> None:
    app = Recorder()
    push = PushApp(app, HttpOptions(address_from="path"), config=FAST)
    api = Starlette(routes=[Mount("/events", push)], lifespan=push.lifespan_context)
    headers, body = binary(cloud_event("ignored.type", "hi"))
    async with uvicorn_serving(api) as url, httpx.AsyncClient() as client:
        answer = await client.post(url + "/events/orders", headers=headers, content=body)
        missing = await client.post(url + "/events/", headers=headers, content=body)
    assert answer.status_code == 204
    assert missing.status_code == 400
    assert app.scopes[0]["address"] == "orders"


async def test_mounted_without_lifespan_starts_on_the_first_request() -> None:
    app = Recorder()
    push = PushApp(app, config=FAST)
    api = Starlette(routes=[Mount("/events", push)])
    headers, body = binary(cloud_event("orders", "hi"))
    async with uvicorn_serving(api) as url, httpx.AsyncClient() as client:
        answer = await client.post(url + "/events/", headers=headers, content=body)
    assert answer.status_code == 204
    assert await push.shutdown() == 0


# -- who may push ----------------------------------------------------------------------------------


async def test_bearer_token_refuses_missing_and_wrong_tokens(way: str) -> None:
    app = Recorder()
    headers, body = binary(cloud_event("orders", "x"))
    async with (
        serving(way, app, HttpOptions(token="s3cret-token"), config=FAST) as served,
        httpx.AsyncClient() as client,
    ):
        missing = await client.post(served.url + "/", headers=headers, content=body)
        wrong = await client.post(
            served.url + "/", headers={**headers, "authorization": "Bearer nope"}, content=body
        )
        good = await client.post(
            served.url + "/",
            headers={**headers, "authorization": "Bearer s3cret-token"},
            content=body,
        )
        basic = await client.post(
            served.url + "/",
            headers={**headers, "authorization": "Basic s3cret-token"},
            content=body,
        )
        lower = await client.post(
            served.url + "/",
            headers={**headers, "authorization": "bearer s3cret-token"},
            content=body,
        )
        # Which of two would be checked is a guess (the last one won): neither is.
        twice = await client.post(
            served.url + "/",
            headers=[
                *headers.items(),
                ("authorization", "Bearer nope"),
                ("authorization", "Bearer s3cret-token"),
            ],
            content=body,
        )
    statuses = [a.status_code for a in (missing, wrong, good, basic, lower, twice)]
    assert statuses == [401, 403, 204, 401, 204, 400]
    assert "given twice" in twice.text
    assert "s3cret" not in missing.text + wrong.text + basic.text + twice.text
    assert len(app.received) == 2


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
async def test_hmac_signature_of_the_body(algorithm: str, way: str) -> None:
    app = Recorder()
    options = HttpOptions(
        hmac_secret="k3y", hmac_header="X-Hub-Signature", hmac_algorithm=algorithm
    )
    headers, body = binary(cloud_event("orders", "signed"))
    digest = hmac.new(b"k3y", body, getattr(hashlib, algorithm)).hexdigest()
    async with serving(way, app, options, config=FAST) as served, httpx.AsyncClient() as client:
        missing = await client.post(served.url + "/", headers=headers, content=body)
        bad = await client.post(
            served.url + "/",
            headers={**headers, "x-hub-signature": "0" * len(digest)},
            content=body,
        )
        tampered = await client.post(
            served.url + "/", headers={**headers, "x-hub-signature": digest}, content=body + b" "
        )
        good = await client.post(
            served.url + "/",
            headers={**headers, "x-hub-signature": f"{algorithm}={digest}"},
            content=body,
        )
        plain = await client.post(
            served.url + "/", headers={**headers, "x-hub-signature": digest}, content=body
        )
        upper = await client.post(  # the prefix in capitals (was 403: it stayed on)
            served.url + "/",
            headers={**headers, "x-hub-signature": f"{algorithm.upper()}={digest.upper()}"},
            content=body,
        )
    statuses = [a.status_code for a in (missing, bad, tampered, good, plain, upper)]
    assert statuses == [401, 403, 403, 204, 204, 204]
    assert len(app.received) == 3


# -- the server's own listener (what amgi run --server http uses) ----------------------------------


async def test_own_listener_over_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    app = Recorder()
    options = HttpOptions(port=0, ssl_certfile=str(cert), ssl_keyfile=str(key))
    transport = HttpTransport(["orders"], options)
    runtime = Runtime(app, transport, FAST)
    serving = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(runtime.started.wait(), 10)
    headers, body = binary(cloud_event("orders", "over tls"))
    try:
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert)) as client:
            answer = await client.post(
                f"https://127.0.0.1:{transport.port}/", headers=headers, content=body
            )
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient() as plain:
                await plain.post(f"http://127.0.0.1:{transport.port}/", content=body)
    finally:
        runtime.request_stop()
        assert await serving == 0
    assert answer.status_code == 204
    assert app.received[0]["payload"] == body


async def test_own_listener_names_the_tls_file_it_cannot_load(tmp_path: Path) -> None:
    """A certificate file that does not load was ``BrokerUnavailable`` with ssl's words
    (``[SSL] PEM lib``): now one configuration error naming the option and the file."""
    cert, key = self_signed(tmp_path)
    missing = str(tmp_path / "missing.pem")
    for options, error in [
        ({"ssl_certfile": missing}, f"--ssl-certfile {missing!r}: No such file"),
        ({"ssl_certfile": str(key), "ssl_keyfile": str(key)}, "--ssl-certfile"),
        ({"ssl_certfile": str(cert), "ssl_keyfile": str(key), "ssl_ca_certs": missing},
         f"--ssl-ca-certs {missing!r}: No such file"),
    ]:  # fmt: skip
        transport = HttpTransport(["orders"], HttpOptions(port=0, **options))
        with pytest.raises(ConfigurationError, match=f"http: cannot load {re.escape(error)}"):
            await transport.connect()
        await transport.close()


async def test_own_listener_requires_client_certificates_from_its_ca(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    client_cert, client_key = self_signed(tmp_path, "client")
    other_cert, other_key = self_signed(tmp_path, "other")
    app = Recorder()
    options = HttpOptions(
        port=0, ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_ca_certs=str(client_cert)
    )
    transport = HttpTransport(["orders"], options)
    runtime = Runtime(app, transport, FAST)
    serving = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(runtime.started.wait(), 10)
    headers, body = binary(cloud_event("orders", "mutual tls"))
    url = f"https://127.0.0.1:{transport.port}/"

    def context(chain: tuple[Path, Path] | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=cert)
        if chain is not None:
            ctx.load_cert_chain(*chain)
        return ctx

    try:
        async with httpx.AsyncClient(verify=context((client_cert, client_key))) as client:
            answer = await client.post(url, headers=headers, content=body)
        for chain in (None, (other_cert, other_key)):
            with pytest.raises(httpx.HTTPError):
                async with httpx.AsyncClient(verify=context(chain)) as refused:
                    await refused.post(url, headers=headers, content=body)
    finally:
        runtime.request_stop()
        assert await serving == 0
    assert answer.status_code == 204
    assert len(app.received) == 1


async def test_tls_connections_count_from_accept_and_a_silent_handshake_is_closed(
    tmp_path: Path,
) -> None:
    """Connections that never begin the TLS handshake count toward --max-connections (one
    more is answered 503 after its handshake) and are closed after --read-timeout; they
    used to escape the count and stay open 60 s, and a few hundred used up the file
    descriptors."""
    cert, key = self_signed(tmp_path)
    app = Recorder()
    options = HttpOptions(
        port=0, ssl_certfile=str(cert), ssl_keyfile=str(key), max_connections=2, read_timeout=1
    )
    headers, body = binary(cloud_event("orders", "over tls"))
    verify = ssl.create_default_context(cafile=cert)
    async with serving("own", app, options, config=FAST) as served:
        url = served.url.replace("http:", "https:") + "/"
        port = int(served.url.rsplit(":", 1)[1])
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.1)
        async with httpx.AsyncClient(verify=verify) as client:
            refused = await client.post(url, headers=headers, content=body)
        for reader, writer in silent:
            async with asyncio.timeout(4):
                assert await reader.read() == b""  # closed by the server
            writer.close()
        async with httpx.AsyncClient(verify=verify) as client:
            served_now = await client.post(url, headers=headers, content=body)
    assert refused.status_code == 503
    assert "too many connections" in refused.text
    assert served_now.status_code == 204
    assert len(app.received) == 1


async def test_an_open_listener_without_checks_says_so(caplog: pytest.LogCaptureFixture) -> None:
    for host, checked, warned in (
        ("0.0.0.0", {}, True),
        ("0.0.0.0", {"token": "t"}, False),
        ("127.0.0.1", {}, False),
    ):
        caplog.clear()
        transport = HttpTransport(["orders"], HttpOptions(host=host, port=0, **checked))
        await transport.connect()
        await transport.close()
        lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("without TLS or authentication" in line for line in lines) is warned


async def test_own_listener_on_a_busy_port_is_one_error_line() -> None:
    blocker = HttpTransport(["orders"], HttpOptions(port=0))
    await blocker.connect()
    try:
        busy = HttpTransport(["orders"], HttpOptions(port=blocker.port or 0))
        with pytest.raises(OSError, match=r"http: cannot listen on 127\.0\.0\.1:\d+"):
            await busy.connect()
    finally:
        await blocker.close()


# -- the CloudEvents HTTP sender -------------------------------------------------------------------


class _Sink:
    """An ASGI app that parses each request with the CloudEvents SDK."""

    def __init__(self, status: int = 202) -> None:
        self.events: list[Any] = []
        self.paths: list[str] = []
        self.authorization: list[bytes] = []
        self.clients: list[Any] = []
        self.status = status

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            event = await receive()
            body += event.get("body", b"")
            more = event.get("more_body", False)
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"]}
        self.events.append(from_http(HTTPMessage(headers, body), JSONFormat()))
        self.paths.append(scope["path"])
        self.authorization.append(dict(scope["headers"]).get(b"authorization", b""))
        self.clients.append(scope["client"])
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_sends_routed_to_the_cloudevents_sender(mode: str) -> None:
    sink = _Sink()
    app = Recorder(sends={"orders": "audit.orders"})
    async with uvicorn_serving(sink) as sink_url:
        sender = HttpTransport(
            [],
            HttpOptions(send_url=sink_url + "/in/{address}", send_mode=mode, send_token="t0ken"),
        )
        push = PushApp(app, config=FAST, routes=Router([("audit.*", sender)]))
        headers, body = binary(cloud_event("orders", "payload"))
        async with uvicorn_serving(push) as url, httpx.AsyncClient() as client:
            answer = await client.post(url + "/", headers=headers, content=body)
    assert answer.status_code == 204
    (event,) = sink.events
    assert event.get_type() == "audit.orders"
    assert event.get_source() == "amgi"
    assert event.get_extension("via") is None  # only ce- headers become attributes
    data = event.get_data()
    assert (data if isinstance(data, bytes) else str(data).encode()) == b"echo:" + body
    assert sink.paths == ["/in/audit.orders"]
    assert sink.authorization == [b"Bearer t0ken"]


async def test_the_user_and_password_of_the_send_url_are_sent_as_basic_auth() -> None:
    """They were masked in every log line but never sent: the sink answered 401."""
    sink = _Sink()
    async with uvicorn_serving(sink) as sink_url:
        host = sink_url.removeprefix("http://")
        sender = HttpTransport([], HttpOptions(send_url=f"http://us%40er:p%3Ass%C3%A9@{host}/"))
        await sender.publish("audit", [], b"x", {})
        await sender.close()
    user_pass = base64.b64decode(sink.authorization[0].removeprefix(b"Basic "))
    assert user_pass == "us@er:p:ssé".encode()


def test_a_send_url_with_a_user_and_a_send_token_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="no --send-token too"):
        HttpTransport([], HttpOptions(send_url="https://u:p@sink.example/", send_token="t"))


async def test_a_refused_send_is_an_error_in_the_app_and_a_retry_for_the_pusher() -> None:
    sink = _Sink(status=500)
    app = Recorder(sends={"orders": "audit.orders"})
    async with uvicorn_serving(sink) as sink_url:
        sender = HttpTransport([], HttpOptions(send_url=sink_url + "/"))
        push = PushApp(app, config=FAST, routes=Router([("audit.*", sender)]))
        headers, body = binary(cloud_event("orders", "payload"))
        async with uvicorn_serving(push) as url, httpx.AsyncClient() as client:
            answer = await client.post(url + "/", headers=headers, content=body)
    assert answer.status_code == 500
    assert app.send_errors
    assert "answered 500" in app.send_errors[0]


async def test_amgi_send_posts_one_cloudevent(tmp_path: Path) -> None:
    sink = _Sink()
    async with uvicorn_serving(sink) as sink_url:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "amgi", "send", "orders.created", '{"id": 1}',
            "--header", "content-type=application/json", "--header", "ce-subject=order/1",
            "--server", "http", "--send-url", sink_url + "/", "--send-mode", "structured",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "sent 1 message" in out.decode()
    (event,) = sink.events
    assert event.get_type() == "orders.created"
    assert event.get_subject() == "order/1"
    assert event.get_data() == {"id": 1}


async def test_the_sender_reconnects_after_the_server_closed_an_idle_connection() -> None:
    sink = _Sink()
    async with uvicorn_serving(sink, timeout_keep_alive=0.1) as sink_url:
        sender = HttpTransport([], HttpOptions(send_url=sink_url + "/"))
        await sender.connect()
        try:
            await sender.publish("a", [], b"1", {})
            await asyncio.sleep(0.5)  # the server closes the idle keep-alive connection
            await sender.publish("b", [], b"2", {})
        finally:
            await sender.close()
    assert [e.get_type() for e in sink.events] == ["a", "b"]


async def test_the_sender_gives_up_after_send_timeout() -> None:
    never = asyncio.Event()

    async def silent(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await never.wait()

    async with uvicorn_serving(silent, timeout_graceful_shutdown=1) as url:
        sender = HttpTransport([], HttpOptions(send_url=url + "/", send_timeout=0.3))
        await sender.connect()
        try:
            with pytest.raises(HttpSendError, match=r"no answer from .* within 0\.3s"):
                await sender.publish("a", [], b"1", {})
        finally:
            await sender.close()
            never.set()


@pytest.mark.parametrize("parts", [1, 2])
async def test_a_client_gone_before_its_body_ends_never_reaches_the_app(
    parts: int, way: str
) -> None:
    app = Recorder()
    headers, _ = binary(cloud_event("orders"))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    async with serving(way, app, config=FAST) as served:
        port = int(served.url.rsplit(":", 1)[1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST / HTTP/1.1\r\nhost: x\r\n{head}content-length: 100\r\n\r\n".encode())
        for _ in range(parts):
            writer.write(b"x" * 10)
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.close()
        await writer.wait_closed()
        headers, body = binary(cloud_event("orders", "next"))
        async with httpx.AsyncClient() as client:  # the server still serves the next one
            answer = await client.post(served.url + "/", headers=headers, content=body)
    assert answer.status_code == 204
    assert [m["payload"] for m in app.received] == [body]


async def test_a_failed_app_startup_fails_the_asgi_lifespan() -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.failed", "message": "no database"})

    with pytest.raises(StartupFailed, match="no database"):
        await PushApp(failing, config=RuntimeConfig(lifespan="on")).startup()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await events.put({"type": "lifespan.startup"})
    sent: list[dict[str, Any]] = []

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    push = PushApp(failing, config=RuntimeConfig(lifespan="on"))
    await asyncio.wait_for(push({"type": "lifespan"}, events.get, send), 10)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "no database" in sent[0]["message"]


async def test_a_mounted_push_app_whose_startup_failed_answers_503_without_running_it_again() -> (
    None
):
    """Mounted where no ASGI lifespan reaches it, a PushApp starts on the first request. A
    startup that failed ran again for each request (the app's startup hook once per
    request) and each ended in a bare 500; now it runs once, and that request and every
    later one get 503 with its reason (the pusher keeps the message and sends it again)."""
    startups = 0

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        nonlocal startups
        if scope["type"] == "lifespan":
            await receive()
            startups += 1
            await send({"type": "lifespan.startup.failed", "message": "no database"})

    push = PushApp(failing, config=RuntimeConfig(lifespan="on"))
    asgi = Starlette(routes=[Mount("/events", push)])  # no lifespan reaches the PushApp
    transport = httpx.ASGITransport(app=asgi, raise_app_exceptions=False)
    headers = {"ce-specversion": "1.0", "ce-type": "orders", "ce-source": "s"}
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answers = [
            await client.post("/events/", headers={**headers, "ce-id": str(i)}, content=b"{}")
            for i in range(3)
        ]
    assert [a.status_code for a in answers] == [503, 503, 503]
    assert {a.text for a in answers} == {"application startup failed: no database\n"}
    assert startups == 1
    with pytest.raises(StartupFailed, match="no database"):
        await push.startup()
    assert startups == 1


@pytest.mark.parametrize("payload", [b"NaN", b"[Infinity]", b"[" * 100_000 + b"]" * 100_000])
def test_the_structured_sender_sends_a_payload_that_is_not_strict_json_as_data_base64(
    payload: bytes,
) -> None:
    """It used to parse NaN as JSON and write it back (not JSON), and to raise a bare
    RecursionError into the app for a deeply nested payload."""
    _, body = encode_structured("t", [(b"content-type", b"application/json")], payload, "s")
    event = json.loads(body)
    assert "data" not in event
    assert base64.b64decode(event["data_base64"]) == payload


@contextlib.asynccontextmanager
async def sending_to(
    answering: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[HttpTransport]:
    """A connected CloudEvents sender to a raw TCP server that answers with ``answering``."""
    server = await asyncio.start_server(answering, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    sender = HttpTransport([], HttpOptions(send_url=url, send_timeout=10))
    await sender.connect()
    try:
        yield sender
    finally:
        await sender.close()
        server.close()


_KEPT = (b"HTTP/1.1 204 No Content\r\n\r\n", False)


@pytest.mark.parametrize(
    ("answers", "fails"),
    [
        ([(b"HTTP/1.0 200 OK\r\nserver: stdlib\r\n\r\n", True)], None),  # http.server's
        ([_KEPT, (b"HTTP/1.1 200 OK\r\n\r\nok", True)], None),
        ([_KEPT, (b"HTTP/1.1 503 Busy\r\n\r\nbusy", True)], "answered 503 for 'e1': 'busy'"),
        (
            [_KEPT, (b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nok", True)],
            "closed the connection before the end of its answer",
        ),
    ],
)
async def test_an_answer_without_framing_ends_with_its_connection(
    answers: list[tuple[bytes, bool]], fails: str | None
) -> None:
    """An answer with neither Content-Length nor chunking ends when the server closes
    the connection (RFC 9112, 6.3). The sender took that close for a failure: an event
    delivered was reported failed, and POSTed again at once on a reused connection. A
    framed answer cut short is a failure, not sent again (the server has the event)."""
    got: list[bytes] = []

    async def answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:  # a request more than scripted gets the last answer again
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                got.append(await reader.readexactly(length))
                answer, close = answers[min(len(got), len(answers)) - 1]
                writer.write(answer)
                if close:
                    break
        writer.close()

    async with sending_to(answering) as sender:
        for i in range(len(answers) - 1):
            await sender.publish(f"e{i}", [], b"%d" % i, {})
        last = len(answers) - 1
        if fails is None:
            await sender.publish(f"e{last}", [], b"%d" % last, {})
        else:
            with pytest.raises(HttpSendError, match=re.escape(fails)):
                await sender.publish(f"e{last}", [], b"%d" % last, {})
    assert got == [b"%d" % i for i in range(len(answers))]  # each once


async def test_the_sender_reads_past_interim_answers_to_the_final_one() -> None:
    """A receiver may send 1xx answers (100 Continue, 103 Early Hints) before the final
    one (RFC 9110, 15.2). The sender took the 1xx for the answer: a delivered event was
    reported failed, and the next send on the connection read the stale 204 as its
    own answer (its 500 was never seen)."""
    got: list[bytes] = []
    answers = [
        (b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n"),
        (b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n", b"HTTP/1.1 500 Oops\r\n"
         b"content-length: 4\r\n\r\nfull"),
    ]  # fmt: skip

    async def answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while len(got) < len(answers):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                got.append(await reader.readexactly(length))
                interim, final = answers[len(got) - 1]
                writer.write(interim)
                await writer.drain()
                await asyncio.sleep(0.05)  # (the final answer in a read of its own)
                writer.write(final)
        writer.close()

    async with sending_to(answering) as sender:
        await sender.publish("e0", [], b"0", {})
        with pytest.raises(HttpSendError, match="answered 500 for 'e1': 'full'"):
            await sender.publish("e1", [], b"1", {})
    assert got == [b"0", b"1"]


@pytest.mark.parametrize("payload", [b'{"a":"\\ud800"}', b'["\xed\xa0\x80"]'])
async def test_the_structured_sender_sends_json_with_a_lone_surrogate_as_data_base64(
    payload: bytes,
) -> None:
    """An escaped lone surrogate is JSON syntax but no text UTF-8 encodes (its bytes are
    not UTF-8 at all): the send raised a bare UnicodeEncodeError into the app."""
    sink = _Sink()
    async with uvicorn_serving(sink) as sink_url:
        options = HttpOptions(send_url=sink_url + "/", send_mode="structured")
        sender = HttpTransport([], options)
        await sender.connect()
        try:
            await sender.publish("a", [(b"content-type", b"application/json")], payload, {})
        finally:
            await sender.close()
    (event,) = sink.events
    assert event.get_data() == payload


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        (b"ce-a\r\nx-injected", b"1", "is not an HTTP field name"),
        (b"ce-a b", b"1", "is not an HTTP field name"),
        (b"ce-tenant", b"a\r\nx-injected: 1", "ce-tenant holds a control character"),
        (b"ce-tenant", b"a\x00", "ce-tenant holds a control character"),
        (b"content-type", b"text/plain\r\nx-injected: 1", "content-type holds a control"),
        # no CloudEvents String: a C1 control went out (refused by a receiver that checks,
        # after the message was sent), bytes that are no UTF-8 went out as U+FFFD
        (b"ce-tenant", "a\x85".encode(), "ce-tenant holds a control character"),
        (b"ce-tenant", b"a\xff", "ce-tenant is not UTF-8"),
    ],
)
async def test_a_header_http_cannot_carry_fails_that_send_alone(
    mode: str, name: bytes, value: bytes, says: str
) -> None:
    """Such headers (a Pub/Sub attribute can be any text) went out verbatim: CR LF
    injected headers towards --send-url. The send fails before anything is written, and
    the next send goes out on the same connection."""
    sink = _Sink()
    async with uvicorn_serving(sink) as sink_url:
        sender = HttpTransport([], HttpOptions(send_url=sink_url + "/", send_mode=mode))
        await sender.connect()
        try:
            await sender.publish("a", [], b"1", {})
            with pytest.raises(HttpSendError, match=says) as refused:
                await sender.publish("b", [(name, value)], b"2", {})
            await sender.publish("c", [], b"3", {})
        finally:
            await sender.close()
    assert isinstance(refused.value, OSError)
    assert [e.get_type() for e in sink.events] == ["a", "c"]
    assert sink.clients[0] == sink.clients[1]


async def test_a_send_url_whose_password_splits_it_shows_no_piece_of_it() -> None:
    """An unencoded / in the password: urlsplit took what follows the first : for the
    port and quoted it ('Port could not be cast to integer value as 'se''), and the
    URL went unmasked."""
    sender = HttpTransport([], HttpOptions(send_url="http://u:se/cret@127.0.0.1:1/"))
    await sender.connect()
    try:
        with pytest.raises(HttpSendError, match="percent-encoded") as refused:
            await sender.publish("e", [], b"x", {})
        assert "se" not in str(refused.value).replace("send_url", "")
    finally:
        await sender.close()


async def test_a_send_url_path_with_non_ascii_or_spaces_is_percent_encoded() -> None:
    """A non-ASCII path raised a bare UnicodeEncodeError from every send (no
    HttpSendError), and a space split the request line (the receiver answered 400)."""
    sink = _Sink()
    async with uvicorn_serving(sink) as sink_url:
        options = HttpOptions(send_url=sink_url + "/évents in%2Fq/{address}")
        sender = HttpTransport([], options)
        await sender.connect()
        try:
            await sender.publish("a b", [], b"1", {})
        finally:
            await sender.close()
    assert sink.paths == ["/évents in/q/a b"]
