"""The asyncio layer: our client with our server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from amp_commands import (
    Ask,
    Big,
    Collect,
    DeclaredError,
    Fail,
    Hand,
    IsSecure,
    Nope,
    Notify,
    Peer,
    Ping,
    SwitchToEcho,
)
from amp_helpers import Cert

from amgi import amp


class Slow(amp.Command):
    arguments = [(b"delay", amp.Float())]
    response = [(b"done", amp.Boolean())]


class Counting(Peer):
    """Tracks concurrently running Slow responders."""

    running = 0
    peak = 0

    @Slow.responder
    async def slow(self, delay: float) -> dict[str, Any]:
        cls = type(self)
        cls.running += 1
        cls.peak = max(cls.peak, cls.running)
        try:
            await asyncio.sleep(delay)
        finally:
            cls.running -= 1
        return {"done": True}


class Server:
    def __init__(self, server: asyncio.Server, peers: list[amp.AMP]) -> None:
        self.server = server
        self.peers = peers
        self.port: int = server.sockets[0].getsockname()[1]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    servers: list[Server] = []

    async def start(factory: Callable[[], amp.AMP] = Counting) -> Server:
        peers: list[amp.AMP] = []

        def make() -> amp.AMP:
            peer = factory()
            peers.append(peer)
            return peer

        server = Server(await amp.serve(make, "127.0.0.1", 0), peers)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.server.close()
        for peer in server.peers:
            peer.close()
        await server.server.wait_closed()
        for peer in server.peers:
            await asyncio.wait_for(peer.wait_closed(), 5)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Anything reaching the event loop's exception handler is a bug."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(None)


async def test_calls_both_styles_and_bidirectional(serve: Any, loop_errors: list[Any]) -> None:
    server = await serve()
    async with await amp.connect("127.0.0.1", server.port, Peer) as conn:
        assert await conn.call_remote(Ping, text="a") == {"text": "ping:pong:a"}
        assert await conn.call_remote(Ping(text="b")) == {"text": "ping:pong:b"}
        assert await conn.call_remote(Notify, text="n") is None
        # The server calls us back: bidirectional on one connection.
        (peer,) = server.peers
        assert await peer.call_remote(Ping, text="c") == {"text": "ping:pong:c"}
        assert peer.notes == ["n"]
    assert loop_errors == []


async def test_errors(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = await serve()
    async with await amp.connect("127.0.0.1", server.port, Peer) as conn:
        with pytest.raises(DeclaredError, match=r"^declared text$"):
            await conn.call_remote(Fail, mode="declared")
        with (
            caplog.at_level(logging.ERROR, logger="amgi.amp"),
            pytest.raises(amp.UnknownRemoteError) as info,
        ):
            await conn.call_remote(Fail, mode="undeclared")
        assert info.value.description == "Unknown Error"
        assert "secret detail" in caplog.text  # logged locally, never sent
        with pytest.raises(amp.UnhandledCommand):
            await conn.call_remote(Nope)
        # Still usable after errors (we do not close on undeclared errors).
        assert await conn.call_remote(Ping, text="x") == {"text": "ping:pong:x"}
        with pytest.raises(amp.ArgumentError):
            await conn.call_remote(Ping, txt="typo")


async def test_fatal_error_closes_and_pending_calls_fail(serve: Any) -> None:
    server = await serve()
    conn = await amp.connect("127.0.0.1", server.port, Peer)
    pending = asyncio.ensure_future(conn.call_remote(Slow, delay=10.0))
    await asyncio.sleep(0.05)
    from amp_commands import FatalError

    with pytest.raises(FatalError):
        await conn.call_remote(Fail, mode="fatal")
    with pytest.raises(amp.ConnectionLost):
        await asyncio.wait_for(pending, 5)
    await conn.wait_closed()
    with pytest.raises(amp.ConnectionLost):
        await conn.call_remote(Ping, text="late")


async def test_timeout_and_cancel_drop_late_answers(
    serve: Any, caplog: pytest.LogCaptureFixture, loop_errors: list[Any]
) -> None:
    server = await serve()
    async with await amp.connect("127.0.0.1", server.port, Peer) as conn:
        with pytest.raises(TimeoutError):
            await conn.call_remote(Slow, delay=0.2, timeout=0.05)
        task = asyncio.ensure_future(conn.call_remote(Slow, delay=0.2))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with caplog.at_level(logging.DEBUG, logger="amgi.amp"):
            await asyncio.sleep(0.3)  # both late answers arrive and are dropped
        assert caplog.text.count("dropped late answer") == 2
        assert "unknown tag" not in caplog.text
        assert await conn.call_remote(Slow, delay=0.0) == {"done": True}
        assert conn._core.pending_tags == []
    assert loop_errors == []


async def test_default_call_timeout(serve: Any) -> None:
    server = await serve()
    conn = await amp.connect("127.0.0.1", server.port, lambda: Peer(call_timeout=0.05))
    async with conn:
        with pytest.raises(TimeoutError):
            await conn.call_remote(Slow, delay=1.0)


async def test_connection_lost_fails_pending_calls(serve: Any) -> None:
    server = await serve()
    conn = await amp.connect("127.0.0.1", server.port, Peer)
    calls = [asyncio.ensure_future(conn.call_remote(Slow, delay=5.0)) for _ in range(3)]
    await asyncio.sleep(0.05)
    server.peers[0].close()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert all(isinstance(r, amp.ConnectionLost) for r in results)
    await conn.wait_closed()


async def test_outstanding_call_limit(serve: Any) -> None:
    Counting.peak = 0
    server = await serve()
    conn = await amp.connect("127.0.0.1", server.port, lambda: Peer(max_outstanding_calls=3))
    async with conn:
        results = await asyncio.gather(*(conn.call_remote(Slow, delay=0.02) for _ in range(12)))
    assert results == [{"done": True}] * 12
    assert Counting.peak == 3


async def test_responder_limit_pauses_reading(serve: Any) -> None:
    Counting.peak = 0
    server = await serve(lambda: Counting(max_concurrent_responders=4))
    async with await amp.connect("127.0.0.1", server.port, Peer) as conn:
        results = await asyncio.gather(*(conn.call_remote(Slow, delay=0.02) for _ in range(40)))
        # Sync responders still answer while async ones are throttled.
        assert await conn.call_remote(IsSecure) == {"secure": False}
    assert results == [{"done": True}] * 40
    assert Counting.peak == 4


async def test_start_tls_between_our_peers(serve: Any, cert: Cert) -> None:
    server = await serve(lambda: Counting(tls_context=cert.server_context()))
    async with await amp.connect("127.0.0.1", server.port, Peer) as conn:
        assert await conn.call_remote(IsSecure) == {"secure": False}
        await conn.start_tls(cert.client_context(), server_hostname="localhost")
        assert await conn.call_remote(IsSecure) == {"secure": True}
        assert await conn.call_remote(Ping, text="s") == {"text": "ping:pong:s"}
        assert await server.peers[0].call_remote(Ping, text="t") == {"text": "ping:pong:t"}
        with pytest.raises(amp.AmpError, match="already"):
            await conn.start_tls(cert.client_context(), server_hostname="localhost")


async def test_start_tls_refused_without_context(serve: Any) -> None:
    server = await serve()
    async with await amp.connect("127.0.0.1", server.port, Peer) as conn:
        context = ssl.create_default_context()
        with pytest.raises(amp.TLSNotAvailable, match="TLS not available"):
            await conn.start_tls(context)
        assert await conn.call_remote(Ping, text="plain") == {"text": "ping:pong:plain"}


async def raw_exchange(
    port: int, data: bytes, wait: float = 0.3, *, expect: bool = False
) -> tuple[bytes, bool]:
    """Send raw bytes; return what came back and whether the server closed the connection.

    With ``expect`` the server is known to answer or close: wait up to 30 s for that
    (a loaded machine is slow), then ``wait`` seconds more to see whether it closes.
    Without it, ``wait`` seconds is all it gets (for outcomes where nothing happens).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    received = b""
    closed = False
    try:
        if expect:
            async with asyncio.timeout(30):
                while not received:
                    chunk = await reader.read(65536)
                    if not chunk:
                        closed = True
                        break
                    received += chunk
        if not closed:
            async with asyncio.timeout(wait):
                while chunk := await reader.read(65536):
                    received += chunk
                closed = True
    except TimeoutError:
        pass
    except ConnectionResetError:  # closed with our bytes still unread
        closed = True
    writer.close()
    with contextlib.suppress(ConnectionResetError):
        await writer.wait_closed()
    return received, closed


def raw(**items: bytes) -> bytes:
    return amp.encode_box({k.encode(): v for k, v in items.items()})


@pytest.mark.parametrize(
    ("data", "closes", "answer"),
    [
        (b"\x01\x00" + b"k" * 300, True, None),  # oversized key
        (raw(hello=b"x"), True, None),  # no _command/_answer/_error
        (raw(_answer=b"77", text=b"x"), True, None),  # no call waits for the tag
        (raw(_command=b"Ping", _ask=b"1"), False, b"UNKNOWN"),  # missing argument
        (raw(_command=b"Slow", _ask=b"1", delay=b"soon"), False, b"UNKNOWN"),  # undecodable
        (raw(_command=b"Nope", _ask=b"1"), False, b"UNHANDLED"),
        (b"\x00\x04_com", False, None),  # truncated: waits for more
    ],
)
async def test_bad_input_outcomes(
    serve: Any, loop_errors: list[Any], data: bytes, closes: bool, answer: bytes | None
) -> None:
    server = await serve()
    received, closed = await raw_exchange(server.port, data, expect=closes or answer is not None)
    assert closed is closes
    if answer is None:
        assert received == b""
    else:
        (box,) = amp.parse_boxes(received)
        assert box[b"_error"] == b"1"
        assert box[b"_error_code"] == answer
    assert loop_errors == []


async def test_responder_calls_peer_while_answering_many(serve: Any) -> None:
    server = await serve()
    async with await amp.connect("127.0.0.1", server.port, Peer) as conn:
        texts = [str(i) for i in range(200)]
        results = await asyncio.gather(*(conn.call_remote(Ping, text=t) for t in texts))
        assert [r["text"] for r in results if r] == [f"ping:pong:{t}" for t in texts]


async def test_invalid_response_from_responder_becomes_unknown(serve: Any) -> None:
    class Broken(Peer):
        @Ping.responder
        def ping_wrong(self, text: str) -> dict[str, Any]:
            return {"wrong": 1}

    server = await serve(Broken)
    async with await amp.connect("127.0.0.1", server.port, Peer) as conn:
        with pytest.raises(amp.UnknownRemoteError):
            await conn.call_remote(Ping, text="x")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_box_limits_close_with_one_clear_line(
    serve: Any, caplog: pytest.LogCaptureFixture, loop_errors: list[Any]
) -> None:
    server = await serve(lambda: Counting(max_box_size=4096, max_keys_per_box=8))
    ok = raw(_command=b"IsSecure", _ask=b"1")
    too_big = raw(_command=b"IsSecure", _ask=b"2", pad=b"x" * 5000)
    with caplog.at_level(logging.WARNING, logger="amgi.amp"):
        received, closed = await raw_exchange(server.port, ok + too_big + ok, wait=2)
    assert closed
    assert [box[b"_answer"] for box in amp.parse_boxes(received)] == [b"1"]  # before the limit
    (line,) = warnings_of(caplog)
    assert "closing AMP connection with 127.0.0.1:" in line
    assert line.endswith("box larger than 4096 bytes (max_box_size)")
    caplog.clear()
    flood = b"".join(b"\x00\x04k%03d\x00\x00" % i for i in range(1000))
    with caplog.at_level(logging.WARNING, logger="amgi.amp"):
        received, closed = await raw_exchange(server.port, flood, wait=2)
    assert closed
    assert received == b""
    (line,) = warnings_of(caplog)
    assert line.endswith("box with more than 8 keys (max_keys_per_box)")
    assert loop_errors == []


async def test_bogus_answers_close_after_one_warning(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve()
    flood = b"".join(raw(_answer=b"%x" % i, text=b"x") for i in range(1, 20_001))
    with caplog.at_level(logging.DEBUG, logger="amgi.amp"):
        received, closed = await raw_exchange(server.port, flood, wait=2)
    assert closed
    assert received == b""
    (line,) = warnings_of(caplog)
    assert "answer for tag b'1', which no call waits for" in line
    assert len([r for r in caplog.records if r.name == "amgi.amp"]) == 1


class QuietFail(amp.Command):
    """Like Fail, without an answer: a declared error can only be logged."""

    arguments = [(b"mode", amp.Unicode())]
    errors = {DeclaredError: b"DECLARED"}
    requires_answer = False


class QuietFailing(Counting):
    @QuietFail.responder
    async def quiet_fail(self, mode: str) -> None:
        raise DeclaredError(f"declared {mode}")


async def test_declared_error_of_a_call_without_answer_is_logged(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(QuietFailing)
    async with await amp.connect("127.0.0.1", server.port, Peer) as conn:
        with caplog.at_level(logging.WARNING, logger="amgi.amp"):
            assert await conn.call_remote(QuietFail, mode="one") is None
            assert await conn.call_remote(Ping, text="after") == {"text": "ping:pong:after"}
    (line,) = warnings_of(caplog)
    assert "responder for QuietFail raised DeclaredError (DECLARED: declared one)" in line


class Echo(amp.Command):
    arguments = [(b"data", amp.String())]
    response = [(b"data", amp.String())]


class Echoing(Counting):
    transports: ClassVar[list[asyncio.Transport]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transports.append(self.transport)

    @Echo.responder
    def echo(self, data: bytes) -> dict[str, bytes]:
        return {"data": data}


async def test_peer_that_never_reads_cannot_grow_the_answer_buffer(serve: Any) -> None:
    # The client writes echo calls and never reads: answers must stop piling up in
    # the server's write buffer; reading pauses until the peer reads again.
    server = await serve(Echoing)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=1 << 16)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    call = raw(_command=b"Echo", _ask=b"1", data=b"z" * 60_000)
    (transport,) = Echoing.transports[-1:]
    peak = 0
    sent = 0
    # Write until our own writes stall: that is the server no longer reading.
    while sent < 200 * 1024 * 1024:
        writer.write(call * 16)
        sent += len(call) * 16
        try:
            await asyncio.wait_for(writer.drain(), 1.0)
        except TimeoutError:
            break
        peak = max(peak, transport.get_write_buffer_size())
    peak = max(peak, transport.get_write_buffer_size())
    assert sent < 200 * 1024 * 1024, "the server kept reading"
    # Bounded: one read's worth of answers beyond the high-water mark, and at most
    # max_concurrent_responders calls waiting.
    assert peak < 2 * 1024 * 1024, peak
    (peer,) = [p for p in server.peers if p.transport is transport]
    assert 0 < len(peer._queue) <= peer.max_concurrent_responders + 300_000 // len(call)
    # Once the client reads, the server resumes and answers every call.
    parser = amp.BoxParser()
    answers = 0
    async with asyncio.timeout(30):
        while answers < sent // len(call):
            answers += len(parser.feed(await reader.read(1 << 20)))
    writer.close()


async def test_protocol_switch_between_our_peers(serve: Any) -> None:
    server = await serve(Peer)
    conn = await amp.connect("127.0.0.1", server.port, Peer)
    async with conn:
        with pytest.raises(TypeError, match="switch_protocol"):
            await conn.call_remote(SwitchToEcho, greeting="x")
        with pytest.raises(DeclaredError):
            await conn.switch_protocol(SwitchToEcho, Collect, greeting="refuse")
        assert await conn.call_remote(Ping, text="amp") == {"text": "ping:pong:amp"}
        new = await conn.switch_protocol(SwitchToEcho, Collect, greeting="ours")
        assert isinstance(new, Collect)
        assert await new.until(b"ours\n") == b"ours\n"
        assert new.transport is not None
        new.transport.write(b"q")
        assert await new.until(b"Q") == b"ours\nQ"
        await asyncio.wait_for(server.peers[0].wait_closed(), 5)
        assert server.peers[0].is_closed
        new.transport.close()


async def test_protocol_switch_from_a_side_whose_reading_is_paused(serve: Any) -> None:
    # The server's one responder is busy and a call waits, so it paused reading; its
    # switch must read the answer (call_remote did so, switch_protocol timed out).
    server = await serve(lambda: Counting(max_concurrent_responders=1))
    conn = await amp.connect("127.0.0.1", server.port, Peer)
    async with conn:
        slow = [asyncio.ensure_future(conn.call_remote(Slow, delay=30.0)) for _ in range(2)]
        async with asyncio.timeout(5):
            while not server.peers or not server.peers[0]._paused:
                await asyncio.sleep(0.02)
        new = await server.peers[0].switch_protocol(SwitchToEcho, Collect, greeting="hi", timeout=5)
        assert await new.until(b"hi\n") == b"hi\n"
        for call in slow:
            call.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
        assert new.transport is not None
        new.transport.close()


async def test_descriptors_between_our_peers_with_big_boxes(tmp_path: Path) -> None:
    path = tmp_path / "amp.sock"
    peers: list[Peer] = []

    def factory() -> Peer:
        peers.append(Peer())
        return peers[-1]

    async with await amp.serve_unix(factory, path):
        conn = await amp.connect_unix(path, Peer)
        async with conn:
            pipes = [os.pipe() for _ in range(20)]
            data = bytes(range(256)) * 2000  # large boxes between the descriptors
            calls = []
            for i, (_, write) in enumerate(pipes):
                calls.append(conn.call_remote(Hand, fd=write, text=f"p{i:02d}"))
                calls.append(conn.call_remote(Big, data=data))
            results = await asyncio.gather(*calls)
            assert results[0::2] == [{"written": 3}] * 20
            assert results[1::2] == [{"data": data[::-1], "size": len(data)}] * 20
            for i, (read, write) in enumerate(pipes):
                os.close(write)
                assert os.read(read, 10) == b"p%02d" % i
                os.close(read)
            answer = await conn.call_remote(Ask, text="ours")
            assert answer is not None
            with os.fdopen(answer["fd"], "rb") as received:
                assert received.read() == b"ours"
        await asyncio.wait_for(peers[0].wait_closed(), 5)
    assert not path.exists() or path.is_socket()


async def raw_unix(path: Path, data: bytes, fds: list[int]) -> bytes:
    """Send ``data`` with ``fds`` from a plain UNIX socket; return all it gets back."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, str(path))
        await loop.run_in_executor(None, socket.send_fds, sock, [data], fds)
        received = b""
        async with asyncio.timeout(10):
            while chunk := await loop.sock_recv(sock, 65536):
                received += chunk
                if amp.BoxParser().feed(received):
                    break
        return received


async def test_unix_descriptor_failure_paths(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "amp.sock"
    peers: list[Peer] = []

    def factory() -> Peer:
        peers.append(Peer())
        return peers[-1]

    async with await amp.serve_unix(factory, path):
        # A box naming a descriptor that never came: an error answer, nothing else.
        hand = raw(_command=b"Hand", _ask=b"1", fd=b"3", text=b"x")
        (answer,) = amp.parse_boxes(await raw_unix(path, hand, []))
        assert answer[b"_error_code"] == b"UNKNOWN"
        assert b"no file descriptor #3" in answer[b"_error_description"]
        # Descriptors no box claims are closed when the connection ends: once the
        # server's copy is closed, closing ours gives the read end its EOF.
        read, write = os.pipe()
        try:
            ping = raw(_command=b"IsSecure", _ask=b"1")
            assert amp.parse_boxes(await raw_unix(path, ping, [write]))[0][b"_answer"] == b"1"
            await asyncio.wait_for(peers[-1].wait_closed(), 5)
            os.close(write)
            assert os.read(read, 10) == b""
        finally:
            os.close(read)
        # More descriptors in one read than it takes: closed, with one clear line.
        pipes = [os.pipe() for _ in range(35)]  # 70 descriptors
        try:
            fds = [fd for pair in pipes for fd in pair]
            with caplog.at_level(logging.WARNING, logger="amgi.amp"):
                assert await raw_unix(path, ping, fds) == b""
            assert "more than 64 file descriptors at once" in caplog.text
        finally:
            for fd in fds:
                os.close(fd)


async def test_descriptor_answer_on_tcp_is_an_error(serve: Any) -> None:
    server = await serve(Peer)
    async with await amp.connect("127.0.0.1", server.port, Peer) as conn:
        with pytest.raises(amp.UnknownRemoteError):
            await conn.call_remote(Ask, text="x")
    for fd in server.peers[0].sent_fds:
        os.close(fd)
    server.peers[0].sent_fds.clear()
