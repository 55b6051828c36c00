"""The CloudEvents HTTP sender: ``message.send`` as a POST in binary or structured mode.

A small HTTP/1.1 client on asyncio streams (responses parsed by httptools) with a pool
of keep-alive connections, so that sends in flight at once each have a connection and
sequential sends reuse them. Message -> CloudEvent:

* headers ``ce-x`` are the attributes ``x`` (binary mode: sent as they are, values
  percent-encoded where the HTTP binding asks; structured: JSON strings);
  ``content-type`` is ``datacontenttype``; other headers are not sent;
* missing required attributes are filled in: ``specversion`` 1.0, ``id`` a random UUID,
  ``source`` the ``send_source`` option, ``type`` the send address;
* structured mode puts a JSON payload (``datacontenttype`` JSON or absent, payload strict
  JSON of Unicode text, as :func:`load_json` reads it) in ``data`` and any other payload
  in ``data_base64``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import ssl
import uuid
from typing import Any
from urllib.parse import quote_from_bytes, unquote, urlsplit

from amgi.errors import SendError
from amgi.servers.http._events import load_json, string_problem
from amgi.servers.kit import mask_url
from amgi.transport import HeaderList

__all__ = ["CloudEventSender", "HttpSendError"]

_VISIBLE = bytes(range(0x21, 0x7F))
_SAFE = _VISIBLE.replace(b'"', b"").replace(b"%", b"")


class HttpSendError(SendError):
    """A CloudEvent could not be delivered over HTTP (no answer, or not a 2xx)."""


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
"""An HTTP field name (RFC 9110, 5.1)."""


def _sendable(name: bytes, value: bytes) -> None:
    """Refuse, before anything is written, a header HTTP cannot carry as it is (CR, LF,
    NUL would end or split it) or that is no CloudEvents String (not UTF-8, or with a C1
    control: a receiver refuses it, structured mode would mangle it): the send fails
    alone, the connection is untouched."""
    if not _TOKEN(name):
        raise HttpSendError(f"http: header name {name!r} is not an HTTP field name")
    problem = string_problem(value)
    if problem:
        raise HttpSendError(f"http: header {name.decode()} {problem}")


def _percent(value: bytes) -> bytes:
    return quote_from_bytes(value, safe=_SAFE).encode("ascii")


def encode_binary(
    address: str, headers: HeaderList, payload: bytes | None, source: str
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Request headers and body of a binary-mode CloudEvent."""
    out: list[tuple[bytes, bytes]] = []
    seen: set[bytes] = set()
    for name, value in headers:
        lower = name.lower()
        if lower.startswith(b"ce-"):
            _sendable(lower, value)
            seen.add(lower)
            out.append((lower, _percent(value)))
        elif lower == b"content-type":
            _sendable(lower, value)
            out.append((b"content-type", value))
    for name, default in (
        (b"ce-specversion", b"1.0"),
        (b"ce-id", str(uuid.uuid4()).encode()),
        (b"ce-source", source.encode("utf-8")),
        (b"ce-type", address.encode("utf-8")),
    ):
        if name not in seen:
            _sendable(name, default)
            out.append((name, _percent(default)))
    return out, payload or b""


def encode_structured(
    address: str, headers: HeaderList, payload: bytes | None, source: str
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Request headers and body of a structured-mode CloudEvent."""
    event: dict[str, Any] = {}
    content_type: str | None = None
    for name, value in headers:
        lower = name.lower()
        if lower.startswith(b"ce-"):
            _sendable(lower, value)
            event[lower[3:].decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        elif lower == b"content-type":
            _sendable(lower, value)
            content_type = value.decode("utf-8", "replace")
            event["datacontenttype"] = content_type
    if "type" not in event:
        _sendable(b"ce-type", address.encode("utf-8"))
    event.setdefault("specversion", "1.0")
    event.setdefault("id", str(uuid.uuid4()))
    event.setdefault("source", source)
    event.setdefault("type", address)
    if payload is not None:
        base = (content_type or "application/json").split(";", 1)[0].strip().lower()
        data: Any = None
        if base == "application/json" or base.endswith("+json"):
            try:
                data = load_json(payload, "payload")
                event["data"] = data
            except ValueError:  # (not strict JSON, or nested too deeply)
                data = None
        if "data" not in event:
            event["data_base64"] = binascii.b2a_base64(payload, newline=False).decode()
    try:
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:  # read, but too deep to write: sent as it is
        del event["data"]
        event["data_base64"] = binascii.b2a_base64(payload or b"", newline=False).decode()
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    body = text.encode("utf-8")
    return [(b"content-type", b"application/cloudevents+json; charset=utf-8")], body


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer


class _Response:
    def __init__(self) -> None:
        self.done = False
        self.keep_alive = True
        self.received = False
        """Bytes of it came (a send is tried again only on a reused connection that
        closed before any: the request may have been processed otherwise)."""
        self.headed = False
        self.framed = False
        """It has a Content-Length or ends chunked: else its body ends with the
        connection (RFC 9112, 6.3), and so the answer does."""
        self.body: list[bytes] = []
        self.parser: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self.framed = True
        elif name == b"transfer-encoding":
            self.framed = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"

    def on_headers_complete(self) -> None:
        self.headed = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints ...; RFC 9110, 15.2): the
            # final one follows. Taken for the answer, it failed a delivered event and
            # left the final one to be read as the next send's answer.
            self.headed = self.framed = False
            self.body.clear()
            return
        self.done = True
        # read here: once the answer is complete, the parser has forgotten
        self.keep_alive = self.parser.should_keep_alive()


class CloudEventSender:
    """POSTs CloudEvents to ``url`` (``{address}`` in it is replaced by the address), with
    ``token`` as a bearer token, or the user and password of ``url`` as Basic auth."""

    def __init__(self, url: str, mode: str, source: str, token: str | None, timeout: float) -> None:
        self.shown = mask_url(url)
        try:
            parts = urlsplit(url)
            port = parts.port  # its error quotes what stands for the port: not shown
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "send_url must be an http:// or https:// URL (a password percent-encoded), "
                f"not {self.shown!r}"
            )
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = port or (443 if self._https else 80)
        self._authority = (parts.netloc.rsplit("@", 1)[-1]).encode("idna")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # A request target is visible ASCII: other characters (a space would split the
        # request line) go percent-encoded, the ones already encoded as they are.
        self._path_template = quote_from_bytes(target.encode("utf-8"), safe=_VISIBLE)
        self._encode = encode_structured if mode == "structured" else encode_binary
        self._source = source
        if parts.username is not None and token:
            raise ValueError("give the credentials in send_url or a send token, not both")
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._token: bytes | None = b"Basic " + base64.b64encode(pair.encode())
        else:
            self._token = b"Bearer " + token.encode() if token else None
        self.timeout = timeout
        self._idle: list[_Connection] = []

    async def send(self, address: str, headers: HeaderList, payload: bytes | None) -> None:
        """POST one event; :class:`HttpSendError` unless the answer is a 2xx."""
        request_headers, body = self._encode(address, headers, payload, self._source)
        path = self._path_template.replace("{address}", quote_from_bytes(address.encode()))
        lines = [
            b"POST " + path.encode("ascii") + b" HTTP/1.1",
            b"host: " + self._authority,
            b"content-length: " + str(len(body)).encode(),
        ]
        if self._token is not None:
            lines.append(b"authorization: " + self._token)
        lines.extend(name + b": " + value for name, value in request_headers)
        request = b"\r\n".join(lines) + b"\r\n\r\n" + body
        try:
            async with asyncio.timeout(self.timeout):
                status, text = await self._exchange(request)
        except TimeoutError:
            raise HttpSendError(
                f"http: no answer from {self.shown} within {self.timeout:g}s"
            ) from None
        except (OSError, ValueError) as exc:
            raise HttpSendError(f"http: cannot POST to {self.shown}: {exc}") from None
        if not 200 <= status < 300:
            raise HttpSendError(
                f"http: {self.shown} answered {status} for {address!r}: {text[:200]!r}"
            )

    async def _exchange(self, request: bytes) -> tuple[int, str]:
        import httptools

        reused = bool(self._idle)
        connection = self._idle.pop() if reused else await self._open()
        response = _Response()
        try:
            connection.writer.write(request)
            await connection.writer.drain()
            parser = response.parser = httptools.HttpResponseParser(response)
            while not response.done:
                data = await connection.reader.read(65536)
                if not data:
                    if response.headed and not response.framed:
                        break  # its body ended with the connection: it is complete
                    ended = " before the end of its answer" if response.received else ""
                    raise ConnectionResetError(f"the server closed the connection{ended}")
                response.received = True
                parser.feed_data(data)
            status = parser.get_status_code()
            keep = response.done and response.keep_alive
        except (OSError, httptools.HttpParserError) as exc:
            connection.writer.close()
            if (
                reused
                and not response.received
                and isinstance(exc, ConnectionResetError | BrokenPipeError)
            ):
                return await self._exchange(request)  # an idle connection the peer had closed
            raise OSError(str(exc) or type(exc).__name__) from None
        except BaseException:
            connection.writer.close()
            raise
        if keep:
            self._idle.append(connection)
        else:
            connection.writer.close()
        return status, b"".join(response.body).decode("utf-8", "replace")

    async def _open(self) -> _Connection:
        context = ssl.create_default_context() if self._https else None
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=context)
        return _Connection(reader, writer)

    async def close(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.writer.close()
        for connection in idle:
            with contextlib.suppress(OSError):
                await connection.writer.wait_closed()
