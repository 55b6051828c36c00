"""One HTTP/1.1 connection of the server's own listener: httptools parses, the front decides.

Per request: the headers go to :meth:`Front.head` as soon as they are complete (a
refusal that needs no body, such as a declared size over the limit, is answered
before the body is read), the body is gathered up to ``max_body``, and
:meth:`Front.complete` hands the messages to the inbox with an :class:`_Slot`
as their reply. Settlement fills the slot, which writes the HTTP answer at once: no
task and no future per request. Answers leave in request order (pipelining).

Connection rules: keep-alive unless the client or the server closes it; HTTP/1.0
closes after each answer unless it asked for keep-alive; an ``Expect: 100-continue``
request gets its ``100 Continue`` once its headers are accepted; a malformed request
gets 400, headers over :data:`MAX_HEAD` bytes 431, an ``Upgrade`` request 400 (the
body would be lost to the upgrade), and the connection closes after each of these.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote

from amgi.servers.http._front import (
    METHOD_NOT_ALLOWED,
    UNAVAILABLE,
    Answer,
    Front,
    Head,
    over_limit,
    text_answer,
)

__all__ = ["MAX_HEAD", "Acceptor", "Connection", "encode"]

httptools: Any
try:
    import httptools
except ModuleNotFoundError:  # no [http] extra: the CLI says so before a listener starts
    httptools = None

logger = logging.getLogger("amgi.servers.http")

MAX_HEAD = 65_536
"""The most bytes of request line and headers a request may have (431 beyond)."""
MAX_HEADERS = 200
"""The most header fields a request may have (431 beyond)."""
MAX_PENDING = 32
"""Unanswered pipelined requests after which the connection stops reading (it also
stops once their bodies hold over ``max_body`` bytes: a connection holds about twice
``max_body`` at most, the queue about that per connection)."""
LINGER = 5
"""The most seconds a refused request's connection stays open for the rest of it."""

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_ACKED: Answer = (204, b"", [])
_NO_UPGRADE = text_answer(400, "protocol upgrades are not supported")
_TOO_LARGE = text_answer(
    431, f"request line and headers over {MAX_HEAD} bytes, or over {MAX_HEADERS} fields"
)
_FRAMING_TOO_LARGE = text_answer(400, f"chunk framing or trailers over {MAX_HEAD} bytes")
_TOO_MANY = text_answer(503, "too many connections: try again later")
_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}


class _Stop(Exception):
    """Raised in a parser callback: this connection reads no further."""


def encode(answer: Answer, date: bytes, connection: bytes | None, body: bool = True) -> bytes:
    """The bytes of an HTTP/1.1 answer (``connection``: the Connection header's value;
    ``body`` false for an answer to HEAD, which has the headers only)."""
    status, content, headers = answer
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b"")), date]
    lines += [b"%s: %s\r\n" % header for header in headers]
    if connection is not None:
        lines.append(b"connection: " + connection + b"\r\n")
    lines += [b"\r\n", content if body else b""]
    return b"".join(lines)


class _Slot:
    """One request's place in the connection's answer order; the inbox's reply."""

    __slots__ = (
        "answer", "bodiless", "connection", "keep_alive", "old", "outcome", "settled", "size",
    )  # fmt: skip

    def __init__(
        self,
        connection: Connection,
        keep_alive: bool,
        old: bool = False,
        bodiless: bool = False,
        size: int = 0,
    ) -> None:
        self.connection = connection
        self.size = size
        """The bytes of the request's body (held until it is answered)."""
        self.keep_alive = keep_alive
        self.old = old
        """An HTTP/1.0 request kept alive: its answer says so (``connection: keep-alive``)."""
        self.bodiless = bodiless
        """The answer to a HEAD request: its headers only."""
        self.settled = False
        self.outcome: list[str] | None = None
        self.answer: Answer | None = None

    def done(self) -> bool:
        return self.settled

    def set_result(self, outcome: list[str] | None, /) -> None:
        """The nack reasons (``[]``: all acked; ``None``: shut down): answer now."""
        self.settled = True
        self.outcome = outcome
        self.connection.flush()

    def refuse(self, answer: Answer) -> None:
        self.settled = True
        self.answer = answer
        self.connection.flush()


class Acceptor(Protocol):
    """What a connection needs of the listener that accepted it (the ``Listener``)."""

    front: Front
    tls: ssl.SSLContext | None
    stopping: bool
    """Shutdown began: a new connection is closed as it comes."""
    date: bytes
    """The ``date`` header line of answers."""
    acked: bytes
    """The whole answer to an acked request kept alive."""
    connections: set[Connection]
    """The open connections: each adds itself when made and leaves when lost."""

    def full(self) -> bool:
        """Whether a new connection is one too many."""

    def lost(self) -> None:
        """A connection closed (called by it)."""

    def secure(self, connection: Connection, transport: asyncio.Transport, over: bool) -> None:
        """Run the TLS handshake of a connection just accepted."""


class Connection(asyncio.Protocol):
    """The protocol of one accepted connection (see the module docstring)."""

    def __init__(self, listener: Acceptor) -> None:
        self.listener = listener
        self.front: Front = listener.front
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.handshaking = False
        """In the TLS handshake (``transport`` is the plain one; see Listener.secure)."""
        self.slots: deque[_Slot] = deque()
        self.reading = False
        """Inside a request (its first bytes came, its end did not)."""
        self.idle = 0
        """Sweeps of the listener since the last bytes came or the last answer left."""
        self.closing = False
        """No request is read any more; the connection closes after the last answer."""
        self._paused_writing = False
        self._paused_pending = False
        self._held = 0
        """Body bytes of the requests read and not answered yet."""
        self._version = "1.1"
        """The HTTP version of the last request."""
        self._continue_due = False
        """The request waits for its ``100 Continue`` until the answers before it left."""
        self._coding: bytes | None = None
        """Its Transfer-Encoding (several headers joined with commas)."""
        self._hosts = 0
        """How many Host headers it has."""
        self._probed = False
        """The client ended its side and was sent ``100 Continue`` (see :meth:`eof_received`)."""
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: Head | None = None
        self._refusal: Answer | None = None
        self._body: bytes | bytearray = b""
        """The body so far: the first part as httptools gave it, then one bytearray (a
        body of tiny chunks costs its size, not an object per chunk)."""
        self._size = 0
        self._head_size = 0
        self._expect = False
        self._keep_alive = True
        self._old = False
        self._bodiless = False
        self._request_sweeps = 0
        """Sweeps since the request began."""
        self._framing = True
        """The parser reads no body bytes: a request's head, a chunk size line, trailers."""
        self._framed = 0
        """Bytes fed in the current stretch of :attr:`_framing` (see :meth:`_feed`)."""
        self._turns = 0
        """Changes of :attr:`_framing` so far (a feed that saw none stayed in one stretch)."""
        self._unread = False
        self.lingering: int | None = None
        """Sweeps since the last answer was written, while waiting to close."""
        self._unclosed = 0
        """Sweeps since its close began (asyncio ends it once the answers are sent)."""

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        listener = self.listener
        if listener.stopping:
            self.closing = True
            transport.close()
        elif listener.tls is not None:  # counted now; served once the handshake is done
            self.handshaking = True
            transport.pause_reading()  # type: ignore[attr-defined]
            listener.secure(self, self.transport, listener.full())  # type: ignore[arg-type]
        elif listener.full():
            self._finish(_TOO_MANY)  # answered at once; closes once the client is quiet
        listener.connections.add(self)

    def secured(self, transport: asyncio.Transport, over: bool) -> None:
        """The TLS handshake is done: ``transport`` carries the requests from now on."""
        self.transport = transport
        self.handshaking = False
        self.idle = 0
        if over:
            self._finish(_TOO_MANY)

    def connection_lost(self, exc: Exception | None) -> None:
        # Requests still queued (waiting for a slot) are dropped: the app would process
        # them for nobody, and the queue holds only requests of open connections
        # (bounded by --max-connections). Requests in flight stay with the runtime;
        # marked done, their outcome finds nobody and the inbox says so (see
        # Inbox.settle): no answer, and the sender, having none, pushes them again.
        self.transport = None
        self.closing = True
        self.listener.connections.discard(self)
        self.listener.lost()
        slots = self.slots
        if slots:
            unanswered = [slot for slot in slots if not slot.settled]
            slots.clear()
            self.front.inbox.withdraw(unanswered)
            for slot in unanswered:
                slot.settled = True

    def eof_received(self) -> bool:
        """The client shut its sending side (a half-close, as ``nc -N`` and some senders
        do): what it sent is still answered, then the connection closes; a request cut
        short by it is answered 400. Over TLS asyncio has no half-close and closes the
        connection: requests in flight then lose their answers, as when a client goes."""
        if self.reading:
            self._finish(text_answer(400, "the client ended its side before the request's end"))
        self.closing = True
        transport = self.transport
        if not self.slots or self.listener.tls is not None or transport is None:
            return False  # nothing left to answer (or TLS): asyncio closes the connection
        if self._version == "1.1":
            # A half-close and a client gone look alike until something is written: a
            # 1xx, which every HTTP/1.1 client reads past (RFC 9110, 15.2), makes a gone
            # client's host reset the connection; the sweep sees that and drops its
            # queued requests (see connection_lost).
            transport.write(_CONTINUE)
            self._probed = True
        return True

    def data_received(self, data: bytes) -> None:
        self.idle = 0
        if self.closing:
            return  # dropped: the connection closes after its last answer
        try:
            self._feed(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Stop):
                logger.exception("http: a request failed in the server", exc_info=exc.__context__)
                self._finish(text_answer(500, "internal server error"))
        except httptools.HttpParserUpgrade:
            self.closing = True  # the request was refused (see on_headers_complete)
        except httptools.HttpParserError as exc:
            self._finish(text_answer(400, f"malformed HTTP request: {exc}"))

    def _feed(self, data: bytes) -> None:
        """Parse ``data``, bounding a head (or a chunk's framing and trailers) as it arrives.

        httptools gathers a header line across feeds and hands it over only once it ends,
        so the bound of :data:`MAX_HEAD` is enforced here, on the bytes fed while the
        parser reads no body: a feed that stays in one such stretch counts whole, and a
        long one is cut where the stretch would pass the bound. A stretch that begins
        inside a feed (a pipelined request after a body) counts from the next feed on, so
        it may pass the bound by one read of the transport (256 KiB) at most.
        """
        feed = self.parser.feed_data
        framing = self._framing  # (not narrowed: the feeds below change it)
        if not framing:
            feed(data)  # a body (and what follows it in this read)
            return
        rest: bytes | memoryview = data
        if len(data) > MAX_HEAD + 1 - self._framed:
            rest = memoryview(data)  # cut below without copies (httptools reads views)
        while rest:
            room = MAX_HEAD + 1 - self._framed
            piece, rest = (rest[:room], rest[room:]) if len(rest) > room else (rest, b"")
            turns = self._turns
            feed(piece)
            if self.closing:
                return
            if self._turns == turns:
                self._framed += len(piece)
                if self._framed > MAX_HEAD:
                    headers_done = self._head is not None or self._refusal is not None
                    self._finish(_FRAMING_TOO_LARGE if headers_done else _TOO_LARGE)
                    return
            elif not self._framing:
                if rest:
                    feed(rest)
                return

    def _turn(self, framing: bool) -> None:
        """The parser begins (``framing``) or ends a stretch without body bytes."""
        self._framing = framing
        self._framed = 0
        self._turns += 1

    def pause_writing(self) -> None:
        self._paused_writing = True
        self._pause_or_resume()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._pause_or_resume()

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.closing:
            raise _Stop  # no request is read any more (nobody would get its answer)
        self.reading = True
        self._url = b""
        self._headers = []
        self._head = None
        self._refusal = None
        self._body = b""
        self._size = 0
        self._head_size = 0
        self._expect = False
        self._continue_due = False
        self._coding = None
        self._hosts = 0
        self._bodiless = False
        self._request_sweeps = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > MAX_HEAD:
            self._finish(_TOO_LARGE)
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEAD or len(self._headers) > MAX_HEADERS:
            self._finish(_TOO_LARGE)
            raise _Stop
        if name == b"expect":
            self._expect = value.lower() == b"100-continue"
        elif name == b"host":
            self._hosts += 1
        elif name == b"transfer-encoding":
            coding = self._coding
            self._coding = value if coding is None else coding + b"," + value

    def on_headers_complete(self) -> None:
        self._turn(False)
        parser = self.parser
        self._keep_alive = keep_alive = parser.should_keep_alive()
        self._version = version = parser.get_http_version()
        self._old = keep_alive and version == "1.0"
        refused = self._refused_framing(version)
        if refused is not None:
            self._finish(refused)
            raise _Stop
        if version != "1.1":
            self._expect = False  # an HTTP/1.0 client takes a 1xx for its answer (RFC 9110, 15.2)
        method = parser.get_method()
        if method != b"POST":
            self._refusal = METHOD_NOT_ALLOWED
            self._bodiless = method == b"HEAD"
        elif parser.should_upgrade():  # its body would be handed over as the new protocol
            self._refusal = _NO_UPGRADE
            self._keep_alive = False
            self._unread = True
        else:
            head = self.front.head(self._headers)
            if isinstance(head, Head):
                self._head = head
            else:
                self._refusal = head
        if self._expect:
            if self._refusal is not None:  # the body is not sent: answer now, and close
                self._finish(self._refusal)
                raise _Stop
            assert self.transport is not None
            if self.slots:  # a 100 now would read as an interim answer to those
                self._continue_due = True  # written by flush, after their answers
            else:
                self.transport.write(_CONTINUE)
        elif self._refusal is not None and self._refusal[0] == 413:
            self._finish(self._refusal)  # declared over the limit: its body is not read
            raise _Stop

    def _refused_framing(self, version: str) -> Answer | None:
        """The answer refusing a request this server cannot read as HTTP/1.1 (RFC 9112):
        another version, no Host or two, a transfer coding other than chunked (its
        bytes would reach the app still encoded), any in HTTP/1.0 (which has none: its
        framing is faulty, 6.1)."""
        if version not in ("1.1", "1.0"):
            return text_answer(505, f"HTTP/{version} is not served (HTTP/1.1 and 1.0 are)")
        if self._hosts > 1 or (not self._hosts and version == "1.1"):
            return text_answer(400, "a request needs one Host header")
        coding = self._coding
        if coding is not None and version == "1.0":
            return text_answer(400, "an HTTP/1.0 request has no Transfer-Encoding")
        if coding is not None and coding.strip().lower() != b"chunked":
            codings = [c.strip().lower() for c in coding.split(b",")]
            if codings != [b"chunked"]:
                shown = coding.decode("latin-1")
                return text_answer(501, f"transfer coding {shown!r} is not supported (chunked is)")
        return None

    def on_chunk_header(self) -> None:
        self._turn(True)  # the chunk's data follows, or (the last chunk) trailers

    def on_chunk_complete(self) -> None:
        self._turn(True)  # the next chunk's size line follows

    def on_body(self, body: bytes) -> None:
        if self._framing:
            self._turn(False)
        if self._continue_due:
            self._continue_due = False  # the body comes without it
        self._size += len(body)
        if self._size > self.front.max_body:
            self._finish(self._refusal or over_limit(self.front.max_body))
            raise _Stop
        if self._refusal is None:
            gathered = self._body
            if not gathered:
                self._body = body
            elif type(gathered) is bytes:
                self._body = bytearray(gathered) + body
            else:
                gathered += body

    def on_message_complete(self) -> None:
        self.reading = False
        self._turn(True)
        size = self._size if self._head is not None else 0
        slot = _Slot(self, self._keep_alive, self._old, self._bodiless, size)
        self.slots.append(slot)
        self._held += size
        head = self._head
        if head is None:
            slot.refuse(self._refusal or METHOD_NOT_ALLOWED)
        else:
            body = self._body
            whole = bytes(body) if isinstance(body, bytearray) else body
            front = self.front
            path = self._path() if front.needs_path else ""
            try:
                outcome = front.complete(head, whole, path, slot)
            except Exception:
                logger.exception("http: a request failed in the server")
                outcome = text_answer(500, "internal server error")
            if isinstance(outcome, tuple):
                slot.refuse(outcome)
        self._head = self._refusal = None
        if not self._paused_pending and (
            len(self.slots) > MAX_PENDING or self._held > self.front.max_body
        ):
            self._paused_pending = True
            self._pause_or_resume()

    # -- answers ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Write the answers that are ready, in request order."""
        slots = self.slots
        transport = self.transport
        listener = self.listener
        inbox = self.front.inbox  # closed at shutdown: answers then close their connection
        while slots and slots[0].settled:
            slot = slots.popleft()
            self._held -= slot.size
            if transport is None:
                continue  # the client went away: nobody to answer
            self.idle = 0  # --keep-alive counts from the last answer
            last = not slot.keep_alive or (not slots and (self.closing or inbox.closed))
            answer = slot.answer
            if answer is None:
                outcome = slot.outcome
                if outcome is not None and not outcome:  # every message acked
                    if not last and not slot.old:
                        transport.write(listener.acked)  # the hot path: constant bytes
                        continue
                    answer = _ACKED
                else:
                    answer = self.front.settled(outcome)
            connection = b"close" if last else b"keep-alive" if slot.old else None
            transport.write(encode(answer, listener.date, connection, not slot.bodiless))
            if last:
                self.closing = True
                if self._unread or self.reading:  # the client may be sending
                    self.reading = False
                    self._linger(transport)
                else:
                    transport.close()
                transport = None
        if self._continue_due and not slots and transport is not None:
            self._continue_due = False
            transport.write(_CONTINUE)
        if (
            self._paused_pending
            and len(slots) <= MAX_PENDING // 2
            and self._held <= self.front.max_body // 2
        ):
            self._paused_pending = False
            self._pause_or_resume()

    def _finish(self, answer: Answer) -> None:
        """Answer with ``answer`` after the answers before it, and close (lingering:
        the client may still be sending the request this answer refuses)."""
        self.reading = False
        self.closing = True
        self._unread = True
        slot = _Slot(self, keep_alive=False)
        self.slots.append(slot)
        slot.refuse(answer)

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close once the client stopped sending: closing with unread bytes would reset
        the connection, and the client might lose the answer. What still comes is
        dropped; the sweep closes the connection after a quiet second, or after
        :data:`LINGER` seconds in any case."""
        self.lingering = 0
        self.idle = 0
        if transport.can_write_eof():
            transport.write_eof()

    def close_when_idle(self) -> None:
        """At shutdown: close now if no request is open, else after the last answer; a
        request still arriving is answered 503 at once (after the answers before it),
        and the connection closes once its client is quiet (see :meth:`_linger`)."""
        if self.closing:
            return
        if self.reading:
            self._finish(UNAVAILABLE)
            return
        self.closing = True
        if not self.slots and self.transport is not None:
            self.transport.close()

    def sweep(self, keep_alive: int, read_timeout: int, min_body_rate: int) -> bool:
        """Once a second: close a connection idle too long (408 when mid-request), or
        with a request that trickles in: headers not complete within ``read_timeout``,
        or a body slower than that plus a second per ``min_body_rate`` bytes (0: no
        bound). Each byte may come just before the idle bound, so without these a
        sender could hold the connection for as long as it liked.

        True when its close has not ended ``read_timeout`` seconds after it began: the
        client reads none of its answers (the close waits until they are sent), and
        the listener aborts it, else it would stay open (and counted) for good."""
        self.idle += 1
        if self.handshaking:
            return False  # bounded by the handshake's own timeout
        transport = self.transport
        if transport is None:
            return False
        if transport.is_closing():
            self._unclosed += 1
            return self._unclosed > read_timeout
        if self._probed and self.slots:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                transport.abort()  # reset after the 1xx: the client is gone
                return False
        if self.lingering is not None:
            self.lingering += 1
            if self.idle > 1 or self.lingering >= LINGER:  # a whole quiet second, as above
                transport.close()
            return False
        if self.slots:
            return False  # the app has its requests: the sender's timeout governs
        if self.reading:
            self._request_sweeps += 1
            took = self._request_sweeps
            if self.idle > read_timeout:  # (a sweep may come just after the last bytes)
                self._finish(text_answer(408, f"no bytes of the request for {read_timeout} s"))
            elif self._head is None and self._refusal is None:  # headers not complete yet
                if took > read_timeout:
                    self._finish(
                        text_answer(408, f"request headers not complete within {read_timeout} s")
                    )
            elif min_body_rate and took > read_timeout + self._size // min_body_rate:
                self._finish(
                    text_answer(
                        408,
                        f"request body slower than {min_body_rate} bytes/s"
                        f" after its first {read_timeout} s",
                    )
                )
        elif self.idle > keep_alive:
            self.closing = True
            transport.close()
        return False

    def describe(self) -> str:
        """Its client's address, and how many bytes of answers it has not read yet."""
        transport = self.transport
        if transport is None:
            return "(closed)"
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
            peer = f"{host}:{peer[1]}"
        return f"{peer} ({transport.get_write_buffer_size()} bytes of answers unsent)"

    def abort(self) -> None:
        """Close at once, dropping what is not sent yet."""
        if self.transport is not None:
            self.transport.abort()

    def _pause_or_resume(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self._paused_writing or self._paused_pending:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _path(self) -> str:
        """The request path, percent-decoded (the address may come from it)."""
        try:
            raw = httptools.parse_url(self._url).path or b"/"
        except httptools.HttpParserInvalidURLError:
            return ""
        return unquote(raw.decode("latin-1"))
