"""The HTTP front's request checks as pure logic (no socket, no runtime): the declared
size refused before the body is read, and binary-mode headers decoded byte-exact."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from amgi.servers.http import HttpOptions, HttpTransport
from amgi.servers.http._events import BadRequest, binary_event

BINARY = [
    (b"content-type", b"application/json"),
    (b"ce-specversion", b"1.0"),
    (b"ce-id", b"1"),
    (b"ce-source", b"/s"),
    (b"ce-type", b"orders"),
]


async def _post(
    max_body: int, declared: bytes, body: bytes, headers: list[tuple[bytes, bytes]] = BINARY
) -> tuple[int, list[str], list[Any]]:
    """Post one event (binary by default) to a front; its status, the bodies read, the
    messages queued (each acked)."""
    transport = HttpTransport([], HttpOptions(max_body=max_body), listen=False)
    read: list[str] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if read:  # as an ASGI server does after the body: wait for a disconnect
            await asyncio.Event().wait()
        read.append("body")
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", declared), *headers],
    }
    answer = asyncio.ensure_future(transport.front(scope, receive, send))
    await asyncio.sleep(0)
    queued = [m for b in await _taken(transport) for m in b.messages]
    for message in queued:
        message.token.set_result([])
    await asyncio.wait_for(answer, 5)
    return sent[0]["status"], read, queued


async def _taken(transport: HttpTransport) -> list[Any]:
    if not transport.inbox.waiting:
        return []
    return await transport.inbox.take(10)


@pytest.mark.parametrize("declared", [b"101", b"1000", b"99999999999999999999"])
async def test_a_declared_size_over_the_limit_is_413_before_the_body_is_read(
    declared: bytes,
) -> None:
    status, read, queued = await _post(100, declared, b"x" * 10)
    assert (status, read, queued) == (413, [], [])


@pytest.mark.parametrize("declared", [b"100", b"99", b"7", b"abc"])
async def test_a_declared_size_within_the_limit_reads_the_body(declared: bytes) -> None:
    status, read, queued = await _post(100, declared, b"x" * 100)
    assert (status, read) == (204, ["body"])
    assert [m.payload for m in queued] == [b"x" * 100]


async def test_a_body_over_the_limit_is_413_whatever_was_declared() -> None:
    status, read, queued = await _post(100, b"5", b"x" * 101)
    assert (status, read, queued) == (413, ["body"], [])


def test_binary_headers_are_percent_decoded_except_the_content_type() -> None:
    kept = [
        (b"content-type", b"text/plain; name=a%20b"),
        *BINARY[1:],
        (b"ce-tenant", b"z%C3%BCrich%20100%25"),
    ]
    address, headers = binary_event(list(kept), dict(kept), b"ce-type")
    assert address == "orders"
    assert headers == [*kept[:-1], (b"ce-tenant", "zürich 100%".encode())]


def test_binary_headers_without_percent_are_kept_as_received() -> None:
    address, headers = binary_event(list(BINARY), dict(BINARY), b"ce-source")
    assert (address, headers) == ("/s", BINARY)


@pytest.mark.parametrize(
    ("drop", "says"),
    [
        (b"ce-specversion", "ce-specversion '' is not 1.0"),
        (b"ce-id", "missing or empty header(s) ce-id"),
        (b"ce-type", "missing or empty header(s) ce-type"),
    ],
)
def test_binary_events_missing_an_attribute_are_refused(drop: bytes, says: str) -> None:
    kept = [h for h in BINARY if h[0] != drop]
    with pytest.raises(BadRequest, match=says.replace("(", r"\(").replace(")", r"\)")):
        binary_event(kept, dict(kept), b"ce-type")


async def test_a_structured_content_type_in_any_case_wins_over_ce_headers() -> None:
    body = b'{"specversion": "1.0", "id": "9", "source": "/j", "type": "json-type"}'
    headers = [(b"content-type", b"Application/CloudEvents+JSON; charset=utf-8"), *BINARY[1:]]
    status, _, queued = await _post(1000, str(len(body)).encode(), body, headers)
    assert status == 204
    assert [m.headers for m in queued] == [
        [
            (b"ce-specversion", b"1.0"),
            (b"ce-id", b"9"),
            (b"ce-source", b"/j"),
            (b"ce-type", b"json-type"),
        ]
    ]


async def test_a_front_answers_each_binary_event_alike_however_often_its_address_came() -> None:
    """The front remembers address headers it saw: the answers, addresses and headers
    must not change from one request to the next, served or not, percent-encoded or not."""
    transport = HttpTransport(["orders"], HttpOptions(), listen=False)

    async def post(type_: bytes, drop: bytes = b"", version: bytes = b"1.0") -> Any:
        headers = [
            (n, {b"ce-type": type_, b"ce-specversion": version}.get(n, v))
            for n, v in BINARY
            if n != drop
        ]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(event: dict[str, Any]) -> None:
            sent.append(event)

        scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
        answer = asyncio.ensure_future(transport.front(scope, receive, send))
        await asyncio.sleep(0)
        taken = await _taken(transport)
        for batch in taken:
            for message in batch.messages:
                message.token.set_result([])
        await asyncio.wait_for(answer, 5)
        return sent[0]["status"], [(b.address, m.headers[-1]) for b in taken for m in b.messages]

    for _ in range(3):
        assert await post(b"orders") == (204, [("orders", (b"ce-type", b"orders"))])
        assert await post(b"or%64ers") == (204, [("orders", (b"ce-type", b"orders"))])
        assert await post(b"other") == (404, [])
        assert await post(b"orders", drop=b"ce-id") == (400, [])
        assert await post(b"orders", version=b"0.3") == (400, [])
