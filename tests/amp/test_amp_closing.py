"""Closing against a peer that stopped reading or answering: bounded, never a hang."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import pytest
from amp_commands import Notify, Peer, Ping
from amp_helpers import Drop

from amgi import amp


async def test_close_aborts_after_close_timeout_when_the_peer_stopped_reading(
    silent_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await amp.connect("127.0.0.1", silent_port, lambda: amp.AMP(close_timeout=0.3))
    await conn.call_remote(Drop, data=b"x" * 8_000_000)
    await asyncio.sleep(0.05)
    assert conn.transport is not None
    assert conn.transport.get_write_buffer_size() > 1_000_000  # the peer reads nothing
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="amgi.amp"):
        async with asyncio.timeout(5):
            async with conn:  # close() and wait_closed()
                pass
    assert 0.25 < time.monotonic() - started < 3
    assert conn.is_closed
    assert "bytes still unsent 0.3s after close" in caplog.text


async def test_start_tls_timeout_closes_the_connection_and_fails_calls_clearly(
    silent_port: int,
) -> None:
    conn = await amp.connect("127.0.0.1", silent_port, Peer)
    pending = asyncio.ensure_future(conn.call_remote(Ping, text="before"))
    await asyncio.sleep(0.01)
    context = ssl.create_default_context()
    async with asyncio.timeout(5):
        with pytest.raises(TimeoutError):
            await conn.start_tls(context, server_hostname="localhost", timeout=0.2)
        assert conn.is_closed
        with pytest.raises(amp.ConnectionLost, match="start_tls timed out"):
            await pending
        with pytest.raises(amp.ConnectionLost, match="start_tls timed out"):
            await conn.call_remote(Ping, text="after")
        await conn.wait_closed()


async def test_cancelled_start_tls_closes_the_connection(silent_port: int) -> None:
    conn = await amp.connect("127.0.0.1", silent_port, Peer)
    context = ssl.create_default_context()
    switching = asyncio.ensure_future(conn.start_tls(context, server_hostname="localhost"))
    await asyncio.sleep(0.05)
    switching.cancel()
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await switching
        with pytest.raises(amp.ConnectionLost, match="start_tls was cancelled"):
            await conn.call_remote(Ping, text="after")
        await conn.wait_closed()


async def test_calls_at_a_protocol_violation_fail_with_its_reason() -> None:
    """The peer's bad bytes closed the connection: pending calls said only "connection
    closed" and later ones "not connected", the reason was only in our log."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"\x01\x00")  # a key length of 256
        await reader.read()  # until the peer closes
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await amp.connect("127.0.0.1", port, amp.AMP)
        async with asyncio.timeout(5):
            with pytest.raises(amp.ConnectionLost, match="key length 256"):
                await conn.call_remote(Ping, text="pending")
            with pytest.raises(amp.ConnectionLost, match="key length 256"):
                await conn.call_remote(Ping, text="later")
            await conn.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_call_after_close_is_not_sent() -> None:
    """close() had not yet lost the connection: a call made then was still written, so
    the peer ran it while the caller was told the connection was lost."""
    peers: list[Peer] = []

    def make() -> Peer:
        peers.append(Peer())
        return peers[-1]

    server = await amp.serve(make, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await amp.connect("127.0.0.1", port, amp.AMP)
        async with asyncio.timeout(5):
            await conn.call_remote(Notify, text="before")
            conn.close()
            with pytest.raises(amp.ConnectionLost, match="closed"):
                await conn.call_remote(Notify, text="after close")
            with pytest.raises(amp.ConnectionLost, match="closed"):
                await conn.call_remote(Ping, text="after close")
            await conn.wait_closed()
            await peers[0].wait_closed()
        assert peers[0].notes == ["before"]
    finally:
        server.close()
        await server.wait_closed()
