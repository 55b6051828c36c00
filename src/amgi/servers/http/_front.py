"""The ASGI side of the HTTP push server: one request in, one answer out.

Per request, in this order, stopping at the first refusal: method (405), shutdown (503),
bearer token (401/403), declared size (413), body read within the limit (413), body
signature (401/403), content mode (415), event parse (400), address (400/404); then the
messages go to the :class:`~amgi.servers.http._inbox.Inbox` and the answer waits for
their settlement: 204 when every message was acked, ``nack_status`` with the reasons
otherwise, 503 when the server shut down before the app took them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from amgi.servers.http._auth import Refused, RequestCheck
from amgi.servers.http._events import (
    BATCH,
    JSON,
    STRUCTURED,
    BadRequest,
    binary_event,
    media_type,
    pubsub_envelope,
    structured_batch,
    structured_event,
)
from amgi.servers.http._inbox import Inbox, Item

__all__ = ["Answer", "Front"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]

_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
_CE_MEDIA = b"application/cloudevents"
"""The start of the structured and batched content types (any case)."""
_CE_MEDIA_LEN = len(_CE_MEDIA)
_ACKED_START = {"type": "http.response.start", "status": 204, "headers": []}
_EMPTY_BODY = {"type": "http.response.body", "body": b""}
_PERCENT = ord("%")
_KNOWN_MOST = 1024
"""The most address header values a front remembers (each names a served address)."""


def _text(status: int, reason: str, *extra: tuple[bytes, bytes]) -> Answer:
    body = reason.encode("utf-8", "replace") + b"\n"
    return status, body, [*_TEXT, (b"content-length", str(len(body)).encode()), *extra]


_METHOD = _text(405, "only POST is accepted", (b"allow", b"POST"))
_UNAVAILABLE = _text(503, "shutting down: send again later")


class Front:
    """The ASGI application bound to one inbox (see the module docstring)."""

    def __init__(
        self,
        inbox: Inbox,
        *,
        addresses: list[str],
        address_from: str,
        pubsub_address_from: str,
        max_body: int,
        nack_status: int,
        check: RequestCheck,
    ) -> None:
        self.inbox = inbox
        self.addresses = frozenset(addresses)
        self.address_from = address_from
        self.pubsub_address_from = pubsub_address_from
        self.max_body = max_body
        self.nack_status = nack_status
        self.check = check
        self._want = f"ce-{address_from}".encode()
        self._from_event = address_from != "path"
        """Whether a binary event's address is its own attribute (not the path)."""
        self._limit_digits = len(str(max_body))
        self._known: dict[bytes, str] = {}
        """Address header values of valid binary events -> the served address they name."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one HTTP request (the app runs meanwhile, through the inbox).

        Only ``http`` scopes are served: the listener runs without the ASGI lifespan (the
        AMGI lifespan is the runtime's) and websockets are not served.
        """
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":
            return await _respond(send, _METHOD)
        inbox = self.inbox
        if inbox.closed:
            return await _respond(send, _UNAVAILABLE)
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        kept: list[tuple[bytes, bytes]] = []  # ce- headers and Content-Type, in order
        content_type = b""
        declared = None
        for header in headers:  # one pass over the headers, nothing else parsed
            name = header[0]
            if name[:3] == b"ce-":  # (a slice compares cheaper than startswith)
                kept.append(header)
            elif name == b"content-type":
                content_type = header[1]
                kept.append(header)
            elif name == b"content-length":
                declared = header[1]
        check = self.check
        signature = None
        if check.enabled:
            try:
                signature = check.headers(headers)
            except Refused as exc:
                return await _respond(send, _text(exc.status, exc.reason))
        limit = self.max_body
        # a malformed Content-Length is the HTTP server's to refuse; here it only
        # allows refusing a body over the limit before reading it (a value shorter than
        # the limit's digits is under it, and needs no parsing)
        if declared is not None and len(declared) >= self._limit_digits and declared.isdigit():
            length = int(declared)
            if length > limit:
                return await _respond(
                    send, _text(413, f"body of {length} bytes is over the limit of {limit}")
                )
        event = await receive()
        if event["type"] != "http.request":
            return  # the client went away before its body arrived: nobody to answer
        body: bytes = event.get("body", b"")
        if event.get("more_body", False):
            try:
                whole = await self._rest(receive, body, limit)
            except _Gone:
                return
            if whole is None:
                return await _respond(send, _text(413, f"body is over the limit of {limit} bytes"))
            body = whole
        elif len(body) > limit:
            return await _respond(send, _text(413, f"body is over the limit of {limit} bytes"))
        if check.enabled:
            try:
                check.body(signature, body)
            except Refused as exc:
                return await _respond(send, _text(exc.status, exc.reason))
        attributes = dict(kept)
        get = attributes.get
        version = get(b"ce-specversion")
        try:
            binary = version is not None
            if binary and content_type[:_CE_MEDIA_LEN].lower() != _CE_MEDIA:
                # The hot path: a valid binary event whose address header was seen before.
                address = self._known.get(get(self._want, b""))
                if (
                    address is None
                    or version != b"1.0"
                    or not (get(b"ce-id") and get(b"ce-source") and get(b"ce-type"))
                    or _PERCENT in b"".join(attributes.values())
                ):
                    address = self._binary_address(kept, attributes, scope)
                future = inbox.submit_one(address, kept, body)
            else:
                future = inbox.submit(self._items(scope, content_type, binary, kept, body))
        except BadRequest as exc:
            return await _respond(send, _text(400, str(exc)))
        except _Answered as exc:
            return await _respond(send, exc.answer)
        reasons = await future
        if reasons:
            await _respond(send, _text(self.nack_status, "nacked: " + "; ".join(reasons)))
        elif reasons is None:
            await _respond(send, _UNAVAILABLE)
        else:  # the hot path: every message acked, two constant events
            await send(_ACKED_START)
            await send(_EMPTY_BODY)

    def _binary_address(
        self, kept: list[tuple[bytes, bytes]], attributes: dict[bytes, bytes], scope: Scope
    ) -> str:
        """The address of a binary event, checking the event (400 if invalid) and the
        address (404 if not served); an address header value that named a served address
        as it is (no percent-encoding) is remembered for the hot path."""
        raw = attributes.get(self._want)
        address, _ = binary_event(kept, attributes, self._want)  # decodes ``kept`` in place
        served = self.addresses
        if self._from_event and address and (not served or address in served):
            if raw is not None and _PERCENT not in raw and len(self._known) < _KNOWN_MOST:
                self._known[raw] = address
            return address
        return self._address(address, scope, False)  # refuses, or the path

    @staticmethod
    async def _rest(receive: Receive, body: bytes, limit: int) -> bytes | None:
        """The whole of a body sent in parts; None (reading stops) once over ``limit``.

        Raises :class:`_Gone` when the client disconnects before the end.
        """
        chunks = [body]
        size = len(body)
        more = True
        while more:
            event = await receive()
            if event["type"] != "http.request":
                raise _Gone
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            more = event.get("more_body", False)
        return b"".join(chunks)

    def _items(
        self,
        scope: Scope,
        content_type: bytes,
        binary: bool,
        kept: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> list[Item]:
        mode = media_type(content_type) if content_type else ""
        pubsub = False
        if mode == STRUCTURED:
            parsed = [structured_event(body, self.address_from)]
        elif mode == BATCH:
            parsed = structured_batch(body, self.address_from)
            if not parsed:
                raise BadRequest("event batch: the array is empty")
        elif binary:
            address, kept = binary_event(kept, dict(kept), self._want)
            parsed = [(address, kept, body, {}, 1)]
        elif mode == JSON:
            parsed = [pubsub_envelope(body, self.pubsub_address_from)]
            pubsub = True
        else:
            shown = content_type.decode("latin-1") or "none"
            raise _Answered(
                _text(
                    415,
                    f"Content-Type {shown} is not a CloudEvent or a Pub/Sub push "
                    "(binary mode needs ce-specversion; structured: "
                    "application/cloudevents+json; batched: application/cloudevents-batch+json;"
                    " Pub/Sub: application/json)",
                )
            )
        return [(self._address(p[0], scope, pubsub), *p[1:]) for p in parsed]

    def _address(self, address: str | None, scope: Scope, pubsub: bool) -> str:
        """The address of a parsed message: from the event or the path; served here?"""
        if (self.pubsub_address_from if pubsub else self.address_from) == "path":
            address = self._path_address(scope)
        if not address:
            raise BadRequest("the event names no address")
        served = self.addresses
        if served and address not in served:
            raise _Answered(_text(404, f"address {address!r} is not served here"))
        return address

    @staticmethod
    def _path_address(scope: Scope) -> str:
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        address = path.strip("/")
        if not address:
            raise BadRequest("the request path names no address")
        return address


async def _respond(send: Send, answer: Answer) -> None:
    status, body, headers = answer
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Gone(Exception):
    """The client disconnected while its body was being read."""


class _Answered(Exception):
    def __init__(self, answer: Answer) -> None:
        super().__init__(answer[0])
        self.answer = answer
