"""Flow control over real sockets: write back-pressure on callers, and reading that goes
on for answers to our own calls while the peer's calls are held back."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest
from amp_commands import Peer, Ping
from amp_helpers import Drop, twisted_peer_output

from amgi import amp

MB = 1_000_000


class Put(amp.Command):
    arguments = [(b"data", amp.BigBytes())]


@pytest.mark.parametrize("command", [Put, Drop])
async def test_every_caller_waits_while_writing_is_paused(
    silent_port: int, command: type[amp.Command]
) -> None:
    # 100 callers start in one loop iteration, before the transport can pause writing;
    # 20 of them wait for a slot of max_outstanding_calls and get it later.
    conn = await amp.connect(
        "127.0.0.1", silent_port, lambda: amp.AMP(max_outstanding_calls=80, close_timeout=0.1)
    )
    calls = [asyncio.ensure_future(conn.call_remote(command, data=b"x" * MB)) for _ in range(100)]
    try:
        await asyncio.sleep(0.3)
        assert conn.transport is not None
        high = conn.transport.get_write_buffer_limits()[1]
        # The high-water mark plus one box (plus what the kernel took).
        assert conn.transport.get_write_buffer_size() <= high + 1.1 * MB
        # Nothing is answered; of the calls without answer, the few written returned.
        assert sum(call.done() for call in calls) <= (0 if command is Put else 10)
    finally:
        for call in calls:
            call.cancel()
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), 5)


async def serve_limited(**limits: int) -> tuple[asyncio.Server, int]:
    server = await amp.serve(lambda: Peer(**limits), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(("count", "queued"), [(8, 16), (40, 64)])
async def test_responders_calling_back_at_the_responder_limit(count: int, queued: int) -> None:
    # Each Ping responder awaits a Pong call to the caller: with the responders at
    # their limit and calls waiting, the Pong answers must still be read.
    server, port = await serve_limited(max_concurrent_responders=4, max_queued_calls=queued)
    try:
        async with asyncio.timeout(5), await amp.connect("127.0.0.1", port, Peer) as conn:
            texts = [str(i) for i in range(count)]
            answers = await asyncio.gather(*(conn.call_remote(Ping, text=t) for t in texts))
            assert answers == [{"text": f"ping:pong:{t}"} for t in texts]
    finally:
        server.close()
        await server.wait_closed()


async def test_twisted_client_calling_a_responder_that_calls_back() -> None:
    server, port = await serve_limited(max_concurrent_responders=4, max_queued_calls=64)
    try:
        out = await twisted_peer_output("pings", str(port), "40")
        assert json.loads(out) == [f"ping:pong:{i}" for i in range(40)]
    finally:
        server.close()
        await server.wait_closed()


async def test_calls_held_back_while_ours_await_answers_are_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A peer that floods calls and never answers the server's Pong calls: reading goes
    # on (the Pong answers could come), so the calls held back are bounded instead.
    server, port = await serve_limited(max_concurrent_responders=4, max_queued_calls=8)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        pings = [amp.encode_box({b"_command": b"Ping", b"_ask": b"%x" % i, b"text": b"x"})
                 for i in range(1, 41)]  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="amgi.amp"):
            async with asyncio.timeout(5):
                writer.write(b"".join(pings[:8]))  # 4 responders call Pong back, 4 wait
                parser = amp.BoxParser()
                pongs: list[dict[bytes, bytes]] = []
                while len(pongs) < 4:
                    pongs += parser.feed(await reader.read(65536))
                writer.write(b"".join(pings[8:]))
                while await reader.read(65536):  # until the server closes
                    pass
        writer.close()
        assert [box[b"_command"] for box in pongs] == [b"Pong"] * 4
        assert "over max_queued_calls (8), while 4 of ours await answers" in caplog.text
    finally:
        server.close()
        await server.wait_closed()


async def open_small(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection with a small receive buffer (a peer that reads nothing soon
    makes the server pause writing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return reader, writer


async def flood_unknown_calls(writer: asyncio.StreamWriter, limit: int) -> int:
    """Send calls to an unknown command, reading nothing, until the server stops taking
    them (a second without progress) or ``limit`` bytes went out; return the bytes sent."""
    calls = b"".join(
        amp.encode_box({b"_command": b"Nope", b"_ask": b"%x" % i}) for i in range(1000)
    )
    sent = 0
    while sent < limit:
        writer.write(calls)
        sent += len(calls)
        try:
            await asyncio.wait_for(writer.drain(), 1.0)
        except (TimeoutError, ConnectionError):
            break
    return sent


async def test_refused_calls_of_a_peer_that_reads_nothing_pause_reading(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each call to an unknown command is answered with an error by the core itself; a
    # peer that never reads those answers made them pile up without bound (150 MB of
    # calls, over 300 MB of answers buffered). Now they count as calls held back: once
    # writing is paused and max_concurrent_responders of them wait, reading pauses.
    peers: list[Peer] = []

    def factory() -> Peer:
        peers.append(Peer(max_concurrent_responders=4))
        return peers[-1]

    server = await amp.serve(factory, "127.0.0.1", 0)
    try:
        with caplog.at_level(logging.DEBUG, logger="amgi.amp"):
            _, writer = await open_small(server.sockets[0].getsockname()[1])
            sent = await flood_unknown_calls(writer, 20 * MB)
        assert sent < 20 * MB, "the server read on"
        (peer,) = peers
        assert peer.transport is not None
        assert peer.transport.get_write_buffer_size() < 2 * MB
        # The first five refusals are warnings, the rest (thousands) debug lines.
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 5
        assert "further refused calls of this connection" in warnings[-1].message
        assert sum(r.levelno == logging.DEBUG for r in caplog.records) > 1000
        writer.transport.abort()
    finally:
        server.close()
        await server.wait_closed()


async def test_refused_calls_while_ours_await_answers_are_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Reading goes on while a call of the server awaits its answer (the Pong of a Ping
    # responder, never answered here): the refusals left unsent are bounded like the
    # calls held back, by disconnecting the peer.
    server, port = await serve_limited(max_concurrent_responders=4, max_queued_calls=8)
    try:
        reader, writer = await open_small(port)
        writer.write(amp.encode_box({b"_command": b"Ping", b"_ask": b"1", b"text": b"x"}))
        async with asyncio.timeout(5):
            (pong,) = amp.BoxParser().feed(await reader.read(65536))
        assert pong[b"_command"] == b"Pong"
        with caplog.at_level(logging.WARNING, logger="amgi.amp"):
            sent = await flood_unknown_calls(writer, 50 * MB)
            async with asyncio.timeout(5):
                while "over max_queued_calls (8)" not in caplog.text:
                    await asyncio.sleep(0.05)
        assert sent < 50 * MB
        assert "or for their answer to be sent" in caplog.text
        writer.transport.abort()
    finally:
        server.close()
        await server.wait_closed()
