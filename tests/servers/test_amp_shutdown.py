"""The AMP server at shutdown: the stop, and the close (bounded, and answering what
was settled)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from amgi import amp
from amgi.runtime import Runtime
from amgi.runtime.config import RuntimeConfig
from amgi.servers import amp as amp_server
from amgi.servers.amp import AmpOptions, AmpTransport, Deliver, Nacked
from amgi.testing.conformance import Recorder
from amgi.transport import DeadLetter, Settlement


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


async def test_a_delivery_settled_right_before_close_is_answered() -> None:
    """settle() only decides the answer; a close() right after it closed the connection
    before the responder wrote it: the sender saw the connection drop and sent again."""
    transport = AmpTransport(["orders"], AmpOptions(port=0))
    await transport.connect()
    assert transport.port is not None
    client = await amp.connect("127.0.0.1", transport.port)
    try:
        calls = [
            asyncio.ensure_future(
                client.call_remote(Deliver, address="orders", headers=[], payload=p)
            )
            for p in (b"acked", b"nacked")
        ]
        async with asyncio.timeout(5):
            batches = []
            while sum(len(b.messages) for b in batches) < 2:
                batches += await transport.fetch()
        messages = [m for b in batches for m in b.messages]
        acked, nacked = sorted(messages, key=lambda m: m.payload or b"")
        settlement = Settlement(acked=[acked], dead=[DeadLetter(nacked, "bad")])
        await transport.settle(batches[0], settlement)
        await transport.close()
        ack, nack = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        assert ack == {}
        assert isinstance(nack, Nacked)
        assert str(nack) == "bad"
    finally:
        client.close()


async def test_deliveries_after_the_stop_began_are_nacked_at_once() -> None:
    """A push server refuses new and queued deliveries once the runtime stops fetching:
    they waited until the close and then saw the connection drop."""
    app = Recorder()
    app.delay = 1.0  # each batch takes its time
    transport = AmpTransport(["orders"], AmpOptions(port=0, batch_size=1))
    runtime = Runtime(app, transport, RuntimeConfig(shutdown_timeout=10.0))
    serve = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        assert transport.port is not None
        conn = await amp.connect("127.0.0.1", transport.port)
        first = asyncio.ensure_future(
            conn.call_remote(Deliver, address="orders", headers=[], payload=b"A")
        )
        async with asyncio.timeout(5):
            while not app.received:
                await asyncio.sleep(0.01)
        queued = [
            asyncio.ensure_future(
                conn.call_remote(Deliver, address="orders", headers=[], payload=b"B%d" % i)
            )
            for i in range(8)
        ]
        await asyncio.sleep(0.2)  # beyond what the runtime fetched ahead, they wait
        runtime.request_stop()
        started = time.monotonic()
        with pytest.raises(Nacked, match="shutting down"):
            await conn.call_remote(Deliver, address="orders", headers=[], payload=b"C")
        assert time.monotonic() - started < 1.5, "it waited for the batch in flight"
        assert await asyncio.wait_for(first, 10) == {}
        outcomes = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 10)
        assert await asyncio.wait_for(serve, 10) == 0
        # Each was run and acked, or nacked (by the runtime's stop, or as the server's
        # refusal of those no batch took); none saw the connection drop.
        ran = [b"B%d" % i for i, outcome in enumerate(outcomes) if outcome == {}]
        nacked = [o for o in outcomes if isinstance(o, Nacked)]
        assert len(ran) + len(nacked) == 8, outcomes
        assert any("shutting down" in str(o) for o in nacked), outcomes
        assert [r.payload for r in app.received] == [b"A", *ran]
        conn.close()
    finally:
        if not serve.done():
            runtime.request_stop()
            await asyncio.gather(serve, return_exceptions=True)
