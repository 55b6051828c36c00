"""Closing the AMP server while a subscriber has stopped reading is bounded."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from amgi import amp
from amgi.servers import amp as amp_server
from amgi.servers.amp import AmpOptions, AmpTransport


async def test_close_aborts_a_subscriber_that_stopped_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(amp_server, "_CLOSE_TIMEOUT", 0.3)
    transport = AmpTransport(["orders"], AmpOptions(port=0, subscribe_addresses=["feed"]))
    await transport.connect()
    assert transport.port is not None
    stalled = socket.create_connection(("127.0.0.1", transport.port))
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(
            amp.encode_box({b"_command": b"Subscribe", b"_ask": b"1", b"address": b"feed"})
        )
        async with asyncio.timeout(5):
            while not transport._subscribers.get("feed"):
                await asyncio.sleep(0.01)
        # The app's send fills the buffers towards the subscriber, which reads nothing.
        send = asyncio.ensure_future(transport.publish("feed", [], b"x" * 8_000_000, {}))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await asyncio.wait_for(transport.close(), 5)
        assert time.monotonic() - started < 3
        with pytest.raises(amp_server.AmpSendError):
            await asyncio.wait_for(send, 5)
    finally:
        stalled.close()
