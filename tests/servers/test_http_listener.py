"""The server's own HTTP/1.1 listener on raw sockets: keep-alive, pipelining in order,
chunked bodies, ``Expect: 100-continue``, HTTP/1.0, malformed and oversize requests,
timeouts, shutdown, clients that go away, and a failure inside the server."""

from __future__ import annotations

import asyncio
import logging
import socket
import tracemalloc
from typing import Any

import pytest

from amgi.runtime import RuntimeConfig
from amgi.servers.http import HttpOptions
from amgi.servers.http._connection import MAX_HEAD
from tests.servers.http_helpers import WAYS, Recorder, Served, Stepped, serving

pytestmark = pytest.mark.timeout(60)

FAST = RuntimeConfig(shutdown_timeout=5.0)


def request(
    payload: bytes = b"{}",
    *,
    type_: str = "orders",
    version: bytes = b"HTTP/1.1",
    extra: bytes = b"",
    chunked: bool = False,
) -> bytes:
    """A binary-mode CloudEvent POST of ``payload`` to ``type_``."""
    head = (
        b"POST / " + version + b"\r\nhost: test\r\nce-specversion: 1.0\r\nce-id: 1\r\n"
        b"ce-source: /tests\r\nce-type: " + type_.encode() + b"\r\n" + extra
    )
    if chunked:
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[:2], payload[2:]) if p)
        return head + b"transfer-encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"
    return head + b"content-length: %d\r\n\r\n" % len(payload) + payload


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer: status, headers (lower-case names), body."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def closed(reader: asyncio.StreamReader, within: float = 10) -> bool:
    """Whether the server closes the connection (EOF) within ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            return await reader.read() == b""
    except (TimeoutError, ConnectionResetError):
        return False


async def connect(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = int(served.url.rsplit(":", 1)[1])
    return await asyncio.open_connection("127.0.0.1", port)


async def reading_nothing(served: Served) -> socket.socket:
    """A client that sends requests (each answered 405 at once) and reads none of the
    answers, until the server stops reading from it: the answers it left unread fill the
    buffers between them, and the server holds the rest."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", served.transport.port))
    requests = b"GET / HTTP/1.1\r\nhost: test\r\n\r\n" * 2048
    left = b""
    refused = 0
    async with asyncio.timeout(30):
        while refused < 20:  # the server (in this loop) read nothing for twenty turns
            try:
                left = left[sock.send(left or requests) :]  # (whole requests, in order)
                refused = 0
            except BlockingIOError:
                refused += 1
            await asyncio.sleep(0.01 if refused else 0)
    return sock


class Paced(Recorder):
    """Acks ``fast``, nacks ``slow`` once ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.holding = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "message" and scope["address"] == "slow":
            self.holding.set()
            await self.release.wait()
        await super().__call__(scope, receive, send)


async def test_keep_alive_serves_one_request_after_another_on_one_connection() -> None:
    app = Recorder()
    async with serving("own", app, config=FAST) as served:
        reader, writer = await connect(served)
        answers = []
        for i in range(3):
            writer.write(request(b"%d" % i))
            answers.append(await read_answer(reader))
        writer.close()
    assert [status for status, _, _ in answers] == [204, 204, 204]
    assert all("date" in headers and "connection" not in headers for _, headers, _ in answers)
    assert [m["payload"] for m in app.received] == [b"0", b"1", b"2"]


async def test_pipelined_requests_are_answered_in_request_order() -> None:
    app = Paced()
    async with serving("own", app, config=RuntimeConfig(concurrency=2)) as served:
        reader, writer = await connect(served)
        writer.write(request(b"nack slow", type_="slow") + request(b"quick", type_="fast"))
        while not any(m["payload"] == b"quick" for m in app.received):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the second answer is ready; it must wait for the first
        assert not reader.at_eof()
        assert len(reader._buffer) == 0  # type: ignore[attr-defined]
        app.release.set()
        first, second = await read_answer(reader), await read_answer(reader)
        writer.close()
    assert (first[0], second[0]) == (500, 204)
    assert first[2] == b"nacked: told to\n"


async def test_more_pipelined_requests_than_the_reading_limit_are_all_answered() -> None:
    app = Paced()
    async with serving("own", app, config=FAST) as served:
        reader, writer = await connect(served)
        payloads = [b"nack %d" % i if i % 2 else b"%d" % i for i in range(80)]
        writer.write(b"".join(request(p, type_="slow") for p in payloads))
        await asyncio.sleep(0.3)
        app.release.set()
        statuses = [(await read_answer(reader))[0] for _ in payloads]
        writer.close()
    assert statuses == [500 if i % 2 else 204 for i in range(80)]
    assert sorted(m["payload"] for m in app.received) == sorted(payloads)


async def test_a_chunked_body_arrives_whole() -> None:
    app = Recorder()
    async with serving("own", app, config=FAST) as served:
        reader, writer = await connect(served)
        writer.write(request(b'{"order": 12}', chunked=True))
        status, _, _ = await read_answer(reader)
        writer.close()
    assert status == 204
    assert app.received[0]["payload"] == b'{"order": 12}'


async def test_expect_100_continue_is_answered_before_the_body() -> None:
    app = Recorder()
    async with serving("own", app, HttpOptions(token="t0ken"), config=FAST) as served:
        reader, writer = await connect(served)
        whole = request(b"later", extra=b"authorization: Bearer t0ken\r\nexpect: 100-continue\r\n")
        head, body = whole.split(b"\r\n\r\n", 1)
        writer.write(head + b"\r\n\r\n")
        assert (await read_answer(reader))[0] == 100
        writer.write(body)
        assert (await read_answer(reader))[0] == 204
        # refused by its headers: the final answer at once, no 100, and the connection closes
        refused = request(b"never", extra=b"expect: 100-continue\r\n")
        writer.write(refused.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
        status, headers, _ = await read_answer(reader)
        assert await closed(reader)
        writer.close()
    assert (status, headers["connection"]) == (401, "close")
    assert [m["payload"] for m in app.received] == [b"later"]


async def test_an_http_1_0_request_that_expects_100_continue_gets_only_its_answer() -> None:
    """A server must not send a 1xx to an HTTP/1.0 client (RFC 9110, 15.2), which takes
    the first answer for the final one: it read ``100 Continue`` as its answer."""
    app = Recorder()
    async with serving("own", app, config=FAST) as served:
        reader, writer = await connect(served)
        writer.write(request(b"a", version=b"HTTP/1.0", extra=b"expect: 100-continue\r\n"))
        status, headers, _ = await read_answer(reader)
        assert await closed(reader)
        writer.close()
    assert (status, headers["connection"]) == (204, "close")
    assert [m["payload"] for m in app.received] == [b"a"]


async def test_http_1_0_closes_unless_it_asks_for_keep_alive() -> None:
    app = Recorder()
    async with serving("own", app, config=FAST) as served:
        reader, writer = await connect(served)
        writer.write(request(b"a", version=b"HTTP/1.0"))
        status, headers, _ = await read_answer(reader)
        assert (status, headers["connection"]) == (204, "close")
        assert await closed(reader)
        writer.close()
        reader, writer = await connect(served)
        for payload in (b"b", b"c"):
            writer.write(request(payload, version=b"HTTP/1.0", extra=b"connection: keep-alive\r\n"))
            status, headers, _ = await read_answer(reader)
            assert (status, headers["connection"]) == (204, "keep-alive")
        writer.close()
    assert [m["payload"] for m in app.received] == [b"a", b"b", b"c"]


@pytest.mark.parametrize(
    ("raw", "status", "says"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed HTTP request"),
        (b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n", 400, "malformed HTTP request"),
        (
            request(b"x", extra=b"x-big: " + b"a" * MAX_HEAD + b"\r\n"),
            431,
            "request line and headers over",
        ),
        (
            request(b"x", extra=b"connection: upgrade\r\nupgrade: h2c\r\n"),
            400,
            "upgrades are not supported",
        ),
        # the next four used to be served (the app got a gzipped body as the payload)
        (
            request(b"x", chunked=True).replace(b"encoding: chunked", b"encoding: gzip, chunked"),
            501,
            "transfer coding 'gzip, chunked' is not supported",
        ),
        (request(b"x", version=b"HTTP/2.0"), 505, "HTTP/2.0 is not served"),
        (
            request(b"x", version=b"HTTP/1.0", chunked=True),
            400,
            "an HTTP/1.0 request has no Transfer-Encoding",
        ),
        (request(b"x").replace(b"host: test\r\n", b""), 400, "needs one Host header"),
        (request(b"x", extra=b"host: other\r\n"), 400, "needs one Host header"),
    ],
)
async def test_a_request_the_server_cannot_read_is_refused_and_closed(
    raw: bytes, status: int, says: str
) -> None:
    app = Recorder()
    async with serving("own", app, config=FAST) as served:
        reader, writer = await connect(served)
        writer.write(raw)
        answer = await read_answer(reader)
        assert await closed(reader)
        writer.close()
        reader, writer = await connect(served)  # the server serves the next connection
        writer.write(request(b"next"))
        assert (await read_answer(reader))[0] == 204
        writer.close()
    assert answer[0] == status
    assert says in answer[2].decode()
    assert [m["payload"] for m in app.received] == [b"next"]


async def test_a_body_over_the_limit_sent_at_once_still_gets_its_413() -> None:
    app = Recorder()
    async with serving("own", app, HttpOptions(max_body=1000), config=FAST) as served:
        reader, writer = await connect(served)
        writer.write(request(b"x" * 200_000, chunked=True))  # read until over the limit
        status, headers, body = await read_answer(reader)
        assert await closed(reader)
        writer.close()
    assert (status, headers["connection"]) == (413, "close")
    assert b"over the limit of 1000" in body
    assert app.received == []


async def test_an_idle_connection_closes_after_keep_alive_and_a_silent_request_gets_408() -> None:
    app = Recorder()
    options = HttpOptions(keep_alive=1, read_timeout=1)
    async with serving("own", app, options, config=FAST) as served:
        reader, writer = await connect(served)
        writer.write(request(b"one"))
        assert (await read_answer(reader))[0] == 204
        assert await closed(reader, within=4)
        writer.close()
        reader, writer = await connect(served)
        writer.write(request(b"never ends")[:-3])
        status, _, body = await read_answer(reader)
        assert await closed(reader, within=4)
        writer.close()
    assert status == 408
    assert b"no bytes of the request for 1 s" in body
    assert [m["payload"] for m in app.received] == [b"one"]


async def test_shutdown_closes_idle_connections_and_answers_open_requests_then_closes() -> None:
    app = Paced()
    async with serving("own", app, config=FAST) as served:
        idle_reader, idle_writer = await connect(served)
        idle_writer.write(request(b"before"))
        assert (await read_answer(idle_reader))[0] == 204
        reader, writer = await connect(served)
        writer.write(request(b"in flight", type_="slow"))
        await asyncio.wait_for(app.holding.wait(), 10)
        stopping = asyncio.create_task(served.stop())
        assert await closed(idle_reader, within=5)
        assert not stopping.done()
        app.release.set()
        status, headers, _ = await read_answer(reader)
        assert await closed(reader)
        assert await stopping == 0
        for w in (writer, idle_writer):
            w.close()
    assert (status, headers["connection"]) == (204, "close")


async def test_a_failure_inside_the_server_is_a_500_and_one_log_record(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Recorder()
    async with serving("own", app, config=FAST) as served:

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(served.transport.front, "complete", broken)
        reader, writer = await connect(served)
        writer.write(request(b"x"))
        status, _, body = await read_answer(reader)
        monkeypatch.undo()
        writer.write(request(b"after"))  # the connection still serves
        assert (await read_answer(reader))[0] == 204
        writer.close()
    assert (status, body) == (500, b"internal server error\n")
    failures = [r for r in caplog.records if "a request failed in the server" in r.getMessage()]
    assert len(failures) == 1
    assert "a bug" in str(failures[0].exc_info)
    assert [m["payload"] for m in app.received] == [b"after"]


async def test_other_methods_get_405_and_head_gets_no_body() -> None:
    app = Recorder()
    async with serving("own", app, config=FAST) as served:
        reader, writer = await connect(served)
        writer.write(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        status, headers, body = await read_answer(reader)
        assert (status, headers["allow"]) == (405, "POST")
        assert body == b"only POST is accepted\n"
        writer.write(b"HEAD / HTTP/1.1\r\nhost: test\r\n\r\n" + request(b"after"))
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 405 ")
        assert b"content-length: 22" in head
        # no body follows: the next bytes are the next answer
        assert (await read_answer(reader))[0] == 204
        writer.close()
    assert [m["payload"] for m in app.received] == [b"after"]


async def test_the_address_from_the_path_is_percent_decoded_without_the_query() -> None:
    app = Recorder()
    options = HttpOptions(address_from="path")
    async with serving("own", app, options, config=FAST) as served:
        reader, writer = await connect(served)
        for target in (b"/orders%2Eeu?from=test", b"/"):
            writer.write(request(b"x").replace(b"POST / ", b"POST " + target + b" ", 1))
            answer = await read_answer(reader)
            if target == b"/":
                assert answer[0] == 400
                assert b"the request path names no address" in answer[2]
            else:
                assert answer[0] == 204
        writer.close()
    assert [s["address"] for s in app.scopes] == ["orders.eu"]


async def test_headers_that_trickle_in_for_longer_than_the_read_timeout_get_408() -> None:
    app = Recorder()
    async with serving("own", app, HttpOptions(read_timeout=1), config=FAST) as served:
        reader, writer = await connect(served)
        head = request(b"x").split(b"\r\n\r\n")[0]
        answer = None
        for i in range(len(head)):  # a byte every 0.2 s: never silent for a whole second
            writer.write(head[i : i + 1])
            await asyncio.sleep(0.2)
            if reader._buffer:  # type: ignore[attr-defined]
                answer = await read_answer(reader)
                break
        assert await closed(reader)
        writer.close()
    assert answer is not None, "the server waited for the whole trickle"
    assert answer[0] == 408
    assert b"request headers not complete within 1 s" in answer[2]
    assert app.received == []


async def _head_only(
    served: Served, payload: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Connect and send the head of a request for ``payload``; its body is the caller's."""
    reader, writer = await connect(served)
    head, _, body = request(payload).partition(b"\r\n\r\n")
    writer.write(head + b"\r\n\r\n")
    return reader, writer, body


async def test_a_body_that_trickles_in_slower_than_min_body_rate_gets_408() -> None:
    """A byte every 0.2 s is never silent for the read timeout; the body's rate bound
    ends it instead of letting the sender hold the connection for as long as it likes."""
    app = Recorder()
    options = HttpOptions(read_timeout=1, min_body_rate=100)
    async with serving("own", app, options, config=FAST) as served:
        reader, writer, body = await _head_only(served, b"x" * 1000)
        loop = asyncio.get_running_loop()
        began = loop.time()
        answer = None
        for i in range(len(body)):
            writer.write(body[i : i + 1])
            await asyncio.sleep(0.2)
            if reader._buffer:  # type: ignore[attr-defined]
                answer = await read_answer(reader)
                break
        took = loop.time() - began
        assert await closed(reader)
        writer.close()
    assert answer is not None, "the server waited for the whole trickle"
    assert answer[0] == 408
    assert b"request body slower than 100 bytes/s after its first 1 s" in answer[2]
    assert took < 4, took
    assert app.received == []


async def test_a_slow_body_above_min_body_rate_is_served_past_the_read_timeout() -> None:
    """The rate bound extends the time a body may take with what it has sent: 300 bytes/s
    against a bound of 100 gets there although it takes twice the read timeout."""
    app = Recorder()
    options = HttpOptions(read_timeout=1, min_body_rate=100)
    async with serving("own", app, options, config=FAST) as served:
        reader, writer, body = await _head_only(served, b"y" * 600)
        for i in range(0, len(body), 60):
            await asyncio.sleep(0.2)
            writer.write(body[i : i + 60])
        assert (await read_answer(reader))[0] == 204
        writer.close()
    assert [m["payload"] for m in app.received] == [b"y" * 600]


async def test_a_connection_over_max_connections_is_answered_503_and_the_next_is_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each connection holds a file descriptor: past ``--max-connections`` a new one is
    answered 503 (its sender keeps the message and tries again) and closed; once one
    closes, a new connection is served. One warning, not one per refusal."""
    app = Recorder()
    options = HttpOptions(max_connections=2)
    async with serving("own", app, options, config=FAST) as served:
        held = [await connect(served) for _ in range(2)]
        for reader, writer in held:
            writer.write(request(b"held"))
            assert (await read_answer(reader))[0] == 204
        for _ in range(2):
            reader, writer = await connect(served)
            writer.write(request(b"refused"))
            status, headers, body = await read_answer(reader)
            assert (status, headers["connection"]) == (503, "close")
            assert b"too many connections" in body
            assert await closed(reader)
            writer.close()
        held[0][1].close()
        await asyncio.sleep(0.2)
        reader, writer = await connect(served)
        writer.write(request(b"after"))
        assert (await read_answer(reader))[0] == 204
        writer.close()
        held[1][1].close()
    assert [m["payload"] for m in app.received] == [b"held", b"held", b"after"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "max-connections" in w] == [
        "http: 2 connections open (--max-connections): answering new ones 503"
    ]


async def test_a_client_that_reads_no_answer_is_aborted_once_its_close_stalls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its connection closed after --keep-alive (or its 408), but asyncio's close waits
    until the answers are sent: it stayed open for good, holding them, and counted
    against --max-connections. It is aborted when its close has not ended within
    --read-timeout, with a warning naming it."""
    app = Recorder()
    options = HttpOptions(max_connections=1, keep_alive=1, read_timeout=1)
    async with serving("own", app, options, config=FAST) as served:
        sock = await reading_nothing(served)
        port = sock.getsockname()[1]
        statuses = []
        try:
            async with asyncio.timeout(20):
                while 204 not in statuses:  # 503 while it holds the only place
                    reader, writer = await connect(served)
                    writer.write(request(b"next"))
                    statuses.append((await read_answer(reader))[0])
                    writer.close()
                    await asyncio.sleep(0.2)
        finally:
            sock.close()
    assert set(statuses[:-1]) <= {503}
    assert [m["payload"] for m in app.received] == [b"next"]
    aborted = [r.getMessage() for r in caplog.records if "aborted" in r.getMessage()]
    assert len(aborted) == 1, aborted
    assert "whose client read no answer in the 1 s after their close" in aborted[0]
    assert f"127.0.0.1:{port} (" in aborted[0]


async def test_a_stop_aborts_a_connection_whose_client_reads_no_answer_and_exits_0(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the default --close-timeout (30 s then) the runtime's bound on closing the
    transport (max(--shutdown-timeout, 5) s) ended first: the run exited 1, and the
    listener never aborted the connection nor said which it was."""
    app = Recorder()
    async with serving("own", app, config=FAST) as served:
        sock = await reading_nothing(served)
        port = sock.getsockname()[1]
        try:
            assert await asyncio.wait_for(served.stop(), 20) == 0
        finally:
            sock.close()
    aborted = [r.getMessage() for r in caplog.records if "aborted" in r.getMessage()]
    assert len(aborted) == 1, aborted
    assert "still open 3 s into the stop" in aborted[0]
    assert f"127.0.0.1:{port} (" in aborted[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_close_timeout_past_the_runtimes_own_bound_is_waited_for_then_aborts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A --close-timeout longer than the runtime's bound on a close (5 s here) was refused
    (3 s at most): the runtime gave up on the close before the listener's abort. The
    transport now tells the runtime how long its close may take: the connection gets the
    whole 6 s, is aborted and named, and the run exits 0."""
    app = Recorder()
    options = HttpOptions(close_timeout=6)
    async with serving("own", app, options, config=FAST) as served:
        sock = await reading_nothing(served)
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            assert await asyncio.wait_for(served.stop(), 30) == 0
        finally:
            sock.close()
        took = loop.time() - began
    assert took >= 6, took
    aborted = [r.getMessage() for r in caplog.records if "aborted" in r.getMessage()]
    assert len(aborted) == 1, aborted
    assert "still open 6 s into the stop" in aborted[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("start", "status", "says"),
    [
        (b"POST / HTTP/1.1\r\nhost: x\r\nx-flood: ", 431, "request line and headers over"),
        (
            request(b"", chunked=True).replace(b"0\r\n\r\n", b"1\r\na\r\n0\r\nx-trailer: "),
            400,
            "chunk framing or trailers over",
        ),
    ],
)
async def test_a_header_line_that_never_ends_is_refused_once_past_the_head_limit(
    start: bytes, status: int, says: str
) -> None:
    """httptools gathers a header (or trailer) line until it ends: the bytes are counted
    as they arrive, so a line without its end is refused soon after 64 KiB instead of
    being buffered (and copied over and over) until the read timeout."""
    app = Recorder()
    async with serving("own", app, config=FAST) as served:
        reader, writer = await connect(served)
        writer.write(start)
        sent = 0
        while sent < 4 * 1024 * 1024 and not reader._buffer:  # type: ignore[attr-defined]
            writer.write(b"a" * 16384)
            sent += 16384
            await asyncio.sleep(0.002)
        answer = await read_answer(reader)
        writer.close()
    assert sent < 4 * MAX_HEAD, sent
    assert answer[0] == status
    assert says in answer[2].decode()
    assert app.received == []


async def test_a_body_of_tiny_chunks_costs_about_its_size_in_memory() -> None:
    """Each chunk of a chunked body used to be kept as its own bytes object (about 35 bytes
    for two bytes of body): 25,000 two-byte chunks held 1 MB; now they take one buffer."""
    app = Recorder()
    size = 50_000
    async with serving("own", app, HttpOptions(max_body=size), config=FAST) as served:
        reader, writer = await connect(served)
        head = request(b"", chunked=True).removesuffix(b"0\r\n\r\n")
        tracemalloc.start()
        try:
            writer.write(head + b"2\r\nzz\r\n" * (size // 2))
            await writer.drain()
            await asyncio.sleep(0.5)  # the server reads it all; the body's end is not sent
            snapshot = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        held = snapshot.filter_traces([tracemalloc.Filter(True, "*/amgi/servers/http/*")])
        used = sum(stat.size for stat in held.statistics("filename"))
        writer.write(b"0\r\n\r\n")
        status, _, _ = await read_answer(reader)
        writer.close()
    assert used < 2 * size, used
    assert status == 204
    assert app.received[0]["payload"] == b"z" * size


async def test_keep_alive_counts_from_the_answer_not_from_the_request() -> None:
    """An app slower than --keep-alive: the connection stays open for --keep-alive seconds
    after the answer (it used to close at the next sweep, racing the sender's next POST)."""
    app = Paced()
    async with serving("own", app, HttpOptions(keep_alive=2), config=FAST) as served:
        reader, writer = await connect(served)
        writer.write(request(b"slow", type_="slow"))
        await asyncio.wait_for(app.holding.wait(), 10)
        await asyncio.sleep(3)
        app.release.set()
        assert (await read_answer(reader))[0] == 204
        await asyncio.sleep(1.2)
        writer.write(request(b"next"))
        assert (await read_answer(reader))[0] == 204
        writer.close()
    assert [m["payload"] for m in app.received] == [b"slow", b"next"]


async def test_a_client_that_half_closes_after_its_request_still_gets_the_answer() -> None:
    """A sender that shuts its sending side after the request (``nc -N``) reads the answer,
    from a fast app or a slow one, and then the connection closes; a request cut short by
    the half-close gets 400 and never reaches the app. Before, asyncio closed the
    connection at the client's end of stream: no answer, yet the app got the message."""
    app = Paced()
    async with serving("own", app, config=FAST) as served:
        answers = []
        for raw in (request(b"fast"), request(b"slow", type_="slow"), request(b"cut")[:-2]):
            reader, writer = await connect(served)
            writer.write(raw)
            writer.write_eof()
            if raw.endswith(b"slow"):
                await asyncio.wait_for(app.holding.wait(), 10)
                await asyncio.sleep(0.2)
                app.release.set()
            answer = await read_answer(reader)
            if answer[0] == 100:  # written at the half-close while requests are open
                answer = await read_answer(reader)
            answers.append(answer)
            assert await closed(reader)
            writer.close()
    assert [a[0] for a in answers] == [204, 204, 400]
    assert b"before the request's end" in answers[2][2]
    assert [m["payload"] for m in app.received] == [b"fast", b"slow"]


async def test_a_request_still_arriving_at_shutdown_gets_503_at_once() -> None:
    """Its headers and part of its body came before the stop: 503 at once, and the
    connection closes once the client is quiet. Before, the rest of the request was
    ignored, it got no answer, and the stop waited the whole --close-timeout."""
    app = Recorder()
    async with serving("own", app, HttpOptions(close_timeout=3), config=FAST) as served:
        reader, writer = await connect(served)
        whole = request(b"x" * 1000)
        writer.write(whole[:-500])
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        began = loop.time()
        stopping = asyncio.create_task(served.stop())
        status, headers, body = await read_answer(reader)
        writer.write(whole[-500:])
        assert await closed(reader)
        assert await asyncio.wait_for(stopping, 10) == 0
        took = loop.time() - began
        writer.close()
    assert (status, headers["connection"]) == (503, "close")
    assert b"shutting down" in body
    assert took < 5, took
    assert app.received == []


async def test_pipelined_requests_in_flight_at_shutdown_are_all_answered() -> None:
    """Two requests of one connection in the app when the stop comes: both answers are
    written, the last with ``connection: close`` (the first answer used to close the
    connection, and the second, processed by the app, was never answered)."""
    app = Paced()
    async with serving("own", app, config=FAST) as served:
        reader, writer = await connect(served)
        writer.write(request(b"one", type_="slow") + request(b"two", type_="slow"))
        await asyncio.wait_for(app.holding.wait(), 10)
        assert served.transport.inbox.waiting == 0  # one batch has both
        stopping = asyncio.create_task(served.stop())
        await asyncio.sleep(0.2)
        app.release.set()
        first, second = await read_answer(reader), await read_answer(reader)
        assert await closed(reader)
        assert await asyncio.wait_for(stopping, 10) == 0
        writer.close()
    assert (first[0], "connection" in first[1]) == (204, False)
    assert (second[0], second[1]["connection"]) == (204, "close")


ONE_AT_A_TIME = RuntimeConfig(concurrency=1, shutdown_timeout=5.0)


@pytest.mark.parametrize("way", WAYS)
async def test_requests_queued_when_their_client_goes_away_never_reach_the_app(way: str) -> None:
    """The app is busy: requests wait in the queue. Their clients give up (as a pusher
    does at its deadline): the requests are dropped, not processed for nobody (the
    pusher, without a 2xx, pushes each again) nor held in memory meanwhile. (A client
    that closes looks like one that half-closes until the server writes: its queued
    requests go at the next sweep after its reset. Under uvicorn, ``PushApp`` hears of it
    as ASGI's ``http.disconnect``.)"""
    app = Paced()
    async with serving(way, app, config=ONE_AT_A_TIME) as served:
        busy_reader, busy_writer = await connect(served)
        busy_writer.write(request(b"busy", type_="slow"))
        await asyncio.wait_for(app.holding.wait(), 10)
        for i in range(2):
            reader, writer = await connect(served)
            writer.write(request(b"abandoned %d" % i))
            while served.transport.inbox.waiting < 1:
                await asyncio.sleep(0.01)
            writer.close()
            await writer.wait_closed()
            while served.transport.inbox.waiting:
                await asyncio.sleep(0.01)
        reader, writer = await connect(served)
        writer.write(request(b"kept"))
        while served.transport.inbox.waiting < 1:
            await asyncio.sleep(0.01)
        app.release.set()
        assert (await read_answer(busy_reader))[0] == 204
        assert (await read_answer(reader))[0] == 204
        for w in (busy_writer, writer):
            w.close()
    assert [m["payload"] for m in app.received] == [b"busy", b"kept"]


async def test_a_connection_stops_reading_once_its_unanswered_bodies_pass_max_body() -> None:
    """Pipelined requests wait for a busy app: the connection stops reading once the
    bodies it holds pass --max-body (not only past 32 requests), so a connection holds
    about twice --max-body at most; every request is answered once the app is free."""
    app = Paced()
    async with serving("own", app, HttpOptions(max_body=1000), config=ONE_AT_A_TIME) as served:
        busy_reader, busy_writer = await connect(served)
        busy_writer.write(request(b"busy", type_="slow"))
        await asyncio.wait_for(app.holding.wait(), 10)
        reader, writer = await connect(served)
        for i in range(10):  # one read each (a read is parsed whole, up to 256 KiB)
            writer.write(request(b"%d" % i + b"x" * 600))
            await asyncio.sleep(0.05)
        queued = served.transport.inbox.waiting
        app.release.set()
        statuses = [(await read_answer(reader))[0] for _ in range(10)]
        assert (await read_answer(busy_reader))[0] == 204
        for w in (busy_writer, writer):
            w.close()
    assert queued == 2
    assert statuses == [204] * 10
    assert len(app.received) == 11


async def test_a_100_continue_waits_for_the_answers_before_it() -> None:
    """A pipelined request asks for 100 Continue while the one before it is in the app:
    the 100 comes after that one's answer (written at once, it read as an interim
    answer to the first request)."""
    app = Paced()
    async with serving("own", app, config=FAST) as served:
        reader, writer = await connect(served)
        second = request(b"second", extra=b"expect: 100-continue\r\n")
        head, body = second.split(b"\r\n\r\n", 1)
        writer.write(request(b"first", type_="slow") + head + b"\r\n\r\n")
        await asyncio.wait_for(app.holding.wait(), 10)
        await asyncio.sleep(0.2)
        assert len(reader._buffer) == 0  # type: ignore[attr-defined]
        app.release.set()
        statuses = [(await read_answer(reader))[0] for _ in range(2)]
        writer.write(body)
        statuses.append((await read_answer(reader))[0])
        writer.close()
    assert statuses == [204, 100, 204]
    assert [m["payload"] for m in app.received] == [b"first", b"second"]


@pytest.mark.parametrize("way", WAYS)
async def test_a_request_waiting_for_a_slot_whose_client_goes_away_never_runs(
    way: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The one slot is busy while requests for two addresses queue; it frees up and
    runs the first address's batch. Only then does the client of the other give up (as
    a pusher does at its deadline): its request, still waiting for a slot, is dropped
    with a warning, never run, never acked (its sender pushes it again). Before, one
    fetch took both batches and the second, waiting in the runtime for the slot, ran
    for nobody once the slot was free."""
    app = Stepped()
    caplog.set_level(logging.WARNING, "amgi.servers.http")
    async with serving(way, app, config=ONE_AT_A_TIME) as served:
        inbox = served.transport.inbox
        busy_reader, busy_writer = await connect(served)
        busy_writer.write(request(b"busy"))
        while app.calls < 1:
            await asyncio.sleep(0.01)
        first_reader, first_writer = await connect(served)
        first_writer.write(request(b"first"))
        while inbox.waiting < 1:
            await asyncio.sleep(0.01)
        _, gone_writer = await connect(served)
        gone_writer.write(request(b"gone", type_="invoices"))
        while inbox.waiting < 2:
            await asyncio.sleep(0.01)
        app.go.release()  # "busy" ends; the slot runs the batch of "orders"
        assert (await read_answer(busy_reader))[0] == 204
        while app.calls < 2:
            await asyncio.sleep(0.01)
        gone_writer.close()  # its client gives up while it waits for the slot
        await gone_writer.wait_closed()
        for _ in range(300):  # the client's reset is seen within a sweep or two
            if not inbox.waiting and caplog.records:
                break
            await asyncio.sleep(0.01)
        app.go.release()
        assert (await read_answer(first_reader))[0] == 204
        await asyncio.sleep(0.3)  # a batch held by the runtime would start now
        app.go.release()  # (and be let through)
        await asyncio.sleep(0.1)
        for w in (busy_writer, first_writer):
            w.close()
    assert [m["payload"] for m in app.received] == [b"busy", b"first"]
    assert app.calls == 2
    (record,) = [r for r in caplog.records if "went away" in r.getMessage()]
    assert record.levelno == logging.WARNING


async def seen_gone(served: Served, way: str) -> None:
    """Wait until the server saw that its clients went away (own listener: the
    connection is lost; behind uvicorn: ``PushApp`` heard ``http.disconnect``)."""
    transport: Any = served.transport
    async with asyncio.timeout(5):
        while transport._listener.connections if way == "own" else transport.front._unanswered:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("payload", [b"acked", b"nack me"])
async def test_a_request_whose_client_goes_away_while_the_app_runs_it_is_answered_to_nobody(
    way: str, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """The app has the request when its client goes away: the app finishes it, nothing
    is answered or claimed, and one warning says that the sender, without a 2xx, pushes
    it again (an acked one reaches the app twice)."""
    app = Paced()
    caplog.set_level(logging.WARNING, "amgi.servers.http")
    async with serving(way, app, config=FAST) as served:
        reader, writer = await connect(served)
        writer.write(request(payload, type_="slow"))
        await asyncio.wait_for(app.holding.wait(), 10)
        writer.close()
        await writer.wait_closed()
        await seen_gone(served, way)
        app.release.set()
        while not app.received:
            await asyncio.sleep(0.01)
        reader, writer = await connect(served)
        writer.write(request(b"next"))
        assert (await read_answer(reader))[0] == 204
        writer.close()
    assert [m["payload"] for m in app.received] == [payload, b"next"]
    (record,) = [r for r in caplog.records if "went away" in r.getMessage()]
    acked = payload == b"acked"
    assert record.levelno == logging.WARNING
    assert f"({int(acked)} acked, {int(not acked)} nacked)" in record.getMessage()
    assert "'slow'" in record.getMessage()
