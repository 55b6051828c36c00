"""The ASGI side of the HTTP push server: one request in, one answer out.

Per request, in this order, stopping at the first refusal: method (405), shutdown (503),
bearer token (401/403), declared size (413), body read within the limit (413), body
signature (401/403), content mode (415), event parse (400), address (400/404); then the
messages go to the :class:`~amgi.servers.http._inbox.Inbox` and the answer waits for
their settlement: 204 when every message was acked, ``nack_status`` with the reasons
otherwise, 503 when the server shut down before the app took them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from amgi.servers.http._auth import Refused, RequestCheck
from amgi.servers.http._events import (
    BATCH,
    BINARY_NAMES,
    BINARY_SUSPECT,
    JSON,
    STRUCTURED,
    BadRequest,
    binary_event,
    media_type,
    pubsub_envelope,
    structured_batch,
    structured_event,
)
from amgi.servers.http._inbox import Inbox, Item, Reply

__all__ = [
    "METHOD_NOT_ALLOWED",
    "UNAVAILABLE",
    "Answer",
    "Front",
    "Head",
    "over_limit",
    "respond",
    "text_answer",
]

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


def text_answer(status: int, reason: str, *extra: tuple[bytes, bytes]) -> Answer:
    """An answer of ``status`` with ``reason`` as its plain-text body."""
    body = reason.encode("utf-8", "replace") + b"\n"
    return status, body, [*_TEXT, (b"content-length", str(len(body)).encode()), *extra]


METHOD_NOT_ALLOWED = text_answer(405, "only POST is accepted", (b"allow", b"POST"))
UNAVAILABLE = text_answer(503, "shutting down: send again later")


class Head:
    """What a request's headers leave for its body: the ``ce-`` headers and Content-Type
    (in order), the content type, the signature to check the body against."""

    __slots__ = ("content_type", "kept", "signature")

    def __init__(
        self, kept: list[tuple[bytes, bytes]], content_type: bytes, signature: Any
    ) -> None:
        self.kept = kept
        self.content_type = content_type
        self.signature = signature


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
        self.needs_path = "path" in (address_from, pubsub_address_from)
        """Whether :meth:`complete` reads the request path (an address may come from it)."""
        self._unanswered: dict[asyncio.Future[list[str] | None], Receive] = {}
        """ASGI requests waiting for their outcome, and their ``receive``."""
        self._old: set[asyncio.Future[list[str] | None]] = set()
        """Those already waiting at the last sweep."""
        self._listening: dict[asyncio.Future[Any], asyncio.Future[Any]] = {}
        """Requests listened for (their client may go away), and the listening task."""
        self._sweep: asyncio.TimerHandle | None = None

    def _listen(self) -> None:
        """The sweep, every :data:`LISTEN_AFTER` seconds while ASGI requests wait: one
        still waiting since the last sweep listens for its client to go away (ASGI's
        ``http.disconnect``); then its messages still queued are withdrawn (nobody would
        get the answer, and the sender pushes them again). A task per request costs, so
        the many answered sooner never listen."""
        self._sweep = None
        unanswered = self._unanswered
        for future in self._old:
            receive = unanswered.get(future)
            if receive is not None and future not in self._listening and not future.done():
                listening = asyncio.ensure_future(receive())
                listening.add_done_callback(functools.partial(self._heard, future))
                self._listening[future] = listening
        self._old = set(unanswered)
        if unanswered:
            self._sweep = asyncio.get_running_loop().call_later(LISTEN_AFTER, self._listen)

    def _heard(self, future: asyncio.Future[Any], listening: asyncio.Future[Any]) -> None:
        if future.done() or listening.cancelled() or listening.exception() is not None:
            return
        if listening.result()["type"] == "http.disconnect":
            self.inbox.withdraw((future,))
            future.set_exception(_Gone())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one HTTP request (the app runs meanwhile, through the inbox).

        Only ``http`` scopes are served: the listener runs without the ASGI lifespan (the
        AMGI lifespan is the runtime's) and websockets are not served.
        """
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":
            return await respond(send, METHOD_NOT_ALLOWED)
        head = self.head(scope["headers"])
        if not isinstance(head, Head):
            return await respond(send, head)
        event = await receive()
        if event["type"] != "http.request":
            return  # the client went away before its body arrived: nobody to answer
        body: bytes = event.get("body", b"")
        limit = self.max_body
        if event.get("more_body", False):
            try:
                whole = await self._rest(receive, body, limit)
            except _Gone:
                return
            if whole is None:
                return await respond(send, over_limit(limit))
            body = whole
        elif len(body) > limit:
            return await respond(send, over_limit(limit))
        path = _scope_path(scope) if self.needs_path else ""
        outcome = self.complete(head, body, path)
        if isinstance(outcome, tuple):
            return await respond(send, outcome)
        future: asyncio.Future[list[str] | None] = outcome  # type: ignore[assignment]
        unanswered = self._unanswered  # (complete made the future: no reply was given)
        unanswered[future] = receive
        if self._sweep is None:
            self._sweep = future.get_loop().call_later(LISTEN_AFTER, self._listen)
        try:
            reasons = await future
        except _Gone:
            return
        finally:
            del unanswered[future]
            if self._listening:
                listening = self._listening.pop(future, None)
                if listening is not None:
                    listening.cancel()
        if reasons is not None and not reasons:  # the hot path: all acked, two constant events
            await send(_ACKED_START)
            await send(_EMPTY_BODY)
        else:
            await respond(send, self.settled(reasons))

    def head(self, headers: list[tuple[bytes, bytes]]) -> Head | Answer:
        """What a POST's headers decide before its body is read: a refusal (shutdown
        503, bearer token 401/403, declared size 413) or what the body needs."""
        if self.inbox.closed:
            return UNAVAILABLE
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
                return text_answer(exc.status, exc.reason)
        # a malformed Content-Length is the HTTP server's to refuse; here it only
        # allows refusing a body over the limit before reading it (a value shorter than
        # the limit's digits is under it, and needs no parsing)
        if declared is not None and len(declared) >= self._limit_digits and declared.isdigit():
            length = int(declared)
            limit = self.max_body
            if length > limit:
                return text_answer(413, f"body of {length} bytes is over the limit of {limit}")
        return Head(kept, content_type, signature)

    def complete(
        self, head: Head, body: bytes, path: str, reply: Reply | None = None
    ) -> Answer | Reply:
        """The request's messages handed to the inbox, answered through the returned
        ``reply`` (``reply`` itself when given, else a new future) with the nack reasons
        (``[]``: every message acked; ``None``: the server shut down first), or the
        answer refusing the request (body signature 401/403, content mode 415, event
        400, address 400/404). ``path`` (root path removed) is used when
        :attr:`needs_path`."""
        check = self.check
        if check.enabled:
            try:
                check.body(head.signature, body)
            except Refused as exc:
                return text_answer(exc.status, exc.reason)
        kept = head.kept
        content_type = head.content_type
        inbox = self.inbox
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
                    or BINARY_SUSPECT(b"".join(attributes.values()))  # % or control
                    or not BINARY_NAMES(b" ".join(attributes) + b" ")
                    or len(attributes) != len(kept)  # a header given twice
                ):
                    address = self._binary_address(kept, attributes, path)
                return inbox.submit_one(address, kept, body, reply=reply)
            return inbox.submit(self._items(path, content_type, binary, kept, body), reply)
        except BadRequest as exc:
            return text_answer(400, str(exc))
        except _Answered as exc:
            return exc.answer

    def settled(self, reasons: list[str] | None) -> Answer:
        """The answer to a request whose messages were not all acked: ``nack_status``
        with the reasons, or 503 (``None``: the server shut down before the app took
        them)."""
        if reasons is None:
            return UNAVAILABLE
        return text_answer(self.nack_status, "nacked: " + "; ".join(reasons))

    def _binary_address(
        self, kept: list[tuple[bytes, bytes]], attributes: dict[bytes, bytes], path: str
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
        return self._address(address, path, False)  # refuses, or the path

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
        path: str,
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
                text_answer(
                    415,
                    f"Content-Type {shown} is not a CloudEvent or a Pub/Sub push "
                    "(binary mode needs ce-specversion; structured: "
                    "application/cloudevents+json; batched: application/cloudevents-batch+json;"
                    " Pub/Sub: application/json)",
                )
            )
        return [(self._address(p[0], path, pubsub), *p[1:]) for p in parsed]

    def _address(self, address: str | None, path: str, pubsub: bool) -> str:
        """The address of a parsed message: from the event or the path; served here?"""
        if (self.pubsub_address_from if pubsub else self.address_from) == "path":
            address = path.strip("/")
            if not address:
                raise BadRequest("the request path names no address")
        if not address:
            raise BadRequest("the event names no address")
        served = self.addresses
        if served and address not in served:
            raise _Answered(text_answer(404, f"address {address!r} is not served here"))
        return address


def _scope_path(scope: Scope) -> str:
    """The request path of an ASGI scope, less the root path it is mounted at."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path


def over_limit(limit: int) -> Answer:
    """413 for a body found over ``limit`` while reading it."""
    return text_answer(413, f"body is over the limit of {limit} bytes")


async def respond(send: Send, answer: Answer) -> None:
    """Send ``answer`` as the ASGI response."""
    status, body, headers = answer
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


LISTEN_AFTER = 0.5
"""Seconds between the sweeps that make ASGI requests still waiting for their outcome
listen for their client going away (so after 0.5-1 s; a pusher's own deadline is seconds
to minutes: Pub/Sub's is 10 s by default)."""


class _Gone(Exception):
    """The client disconnected while its body was being read."""


class _Answered(Exception):
    def __init__(self, answer: Answer) -> None:
        super().__init__(answer[0])
        self.answer = answer
