"""The asyncio layer: our client with our server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from amp_commands import DeclaredError, Fail, IsSecure, Nope, Notify, Peer, Ping
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


async def raw_exchange(port: int, data: bytes, wait: float = 0.3) -> tuple[bytes, bool]:
    """Send raw bytes; return what came back and whether the server closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    received = b""
    closed = False
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                received += chunk
            closed = True
    except TimeoutError:
        pass
    writer.close()
    await writer.wait_closed()
    return received, closed


def raw(**items: bytes) -> bytes:
    return amp.encode_box({k.encode(): v for k, v in items.items()})


@pytest.mark.parametrize(
    ("data", "closes", "answer"),
    [
        (b"\x01\x00" + b"k" * 300, True, None),  # oversized key
        (raw(hello=b"x"), True, None),  # no _command/_answer/_error
        (raw(_answer=b"77", text=b"x"), False, None),  # unknown tag: ignored
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
    received, closed = await raw_exchange(server.port, data)
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
