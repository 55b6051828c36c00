"""The sending side of AmpTransport (amgi send, an app's sends without a listener)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from amgi import amp
from amgi.errors import BrokerUnavailable
from amgi.servers.amp import AmpOptions, AmpTransport, Authenticate, Deliver


class Receiver(amp.AMP):
    """Counts connections and Authenticate calls; acks every Deliver."""

    made: list[Receiver] = []
    authenticated = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.made.append(self)

    @Authenticate.responder
    def authenticate(self, token: bytes) -> None:
        type(self).authenticated += 1

    @Deliver.responder
    async def deliver(self, **message: Any) -> None:
        await asyncio.sleep(0.01)


async def test_concurrent_sends_share_one_connection_that_close_closes() -> None:
    Receiver.made = []
    Receiver.authenticated = 0
    server = await amp.serve(Receiver, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = AmpTransport([], AmpOptions(port=port, auth_token="t"))
    try:
        async with asyncio.timeout(10):
            sends = (sender.publish("orders", [], b"m%d" % i, {}) for i in range(10))
            await asyncio.gather(*sends)
            await sender.publish("orders", [], b"later", {})
            assert len(Receiver.made) == 1
            assert Receiver.authenticated == 1
    finally:
        async with asyncio.timeout(10):
            await sender.close()
            (peer,) = Receiver.made
            await peer.wait_closed()  # the sender closed the one connection it had
            server.close()
            await server.wait_closed()


async def test_a_send_racing_close_leaves_no_connection_open() -> None:
    """close() waits for a connect in progress and closes it; a send after close() fails
    at once (the connect of a send in flight finished after close() and was left open)."""
    import pytest

    from amgi.errors import SendError

    Receiver.made = []
    server = await amp.serve(Receiver, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = AmpTransport([], AmpOptions(port=port, auth_token="t"))
    try:
        async with asyncio.timeout(10):
            sending = asyncio.create_task(sender.publish("orders", [], b"m", {}))
            await asyncio.sleep(0)  # the send is connecting
            await sender.close()
            await asyncio.gather(sending, return_exceptions=True)
            with pytest.raises(SendError, match="the transport is closed"):
                await sender.publish("orders", [], b"after", {})
            for peer in Receiver.made:
                await peer.wait_closed()  # every connection the sender made was closed
    finally:
        server.close()
        await server.wait_closed()


async def test_a_send_cancelled_while_it_authenticates_leaves_no_connection_open() -> None:
    """The connection of a send cancelled during its Authenticate was neither closed nor
    kept for close() to see: it stayed open."""
    hung_up = asyncio.Event()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        hung_up.set()
        writer.close()

    server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = AmpTransport([], AmpOptions(port=port, auth_token="t", call_timeout=30))
    try:
        sending = asyncio.create_task(sender.publish("orders", [], b"m", {}))
        await asyncio.sleep(0.3)  # connected; Authenticate awaits its answer
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await sender.close()
        await asyncio.wait_for(hung_up.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_message_over_max_box_size_fails_alone_with_a_clear_error() -> None:
    """It was sent anyway: the receiver closed the connection at its box limit, so every
    send in flight on it failed too, all with a bare "connection closed"."""
    import pytest

    from amgi.servers.amp import AmpSendError

    limit = 100_000
    Receiver.made = []
    server = await amp.serve(lambda: Receiver(max_box_size=limit), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = AmpTransport([], AmpOptions(port=port, max_box_size=limit))
    try:
        async with asyncio.timeout(10):
            small = asyncio.create_task(sender.publish("orders", [], b"small", {}))
            with pytest.raises(AmpSendError, match="over --max-box-size"):
                await sender.publish("orders", [(b"h", b"v")], b"x" * limit, {})
            await small  # its connection stayed up
            await sender.publish("orders", [], b"y" * (limit - 100), {})  # fits
    finally:
        await sender.close()
        server.close()
        await server.wait_closed()


async def test_a_message_over_max_keys_per_box_fails_before_connecting() -> None:
    import pytest

    from amgi.servers.amp import AmpSendError

    sender = AmpTransport([], AmpOptions(port=1, max_keys_per_box=5))  # nothing listens
    big = b"x" * (2 * amp.BigBytes.chunk_size)  # 2 payload keys, 6 in all
    with pytest.raises(AmpSendError, match=r"6 keys, over --max-keys-per-box \(5\)"):
        await sender.publish("orders", [], big, {})
    await sender.close()


@pytest.mark.parametrize("stalls", ["connect", "tls"])
async def test_a_receiver_that_never_answers_fails_the_send_within_call_timeout(
    stalls: str,
) -> None:
    """Opening the connection had no deadline: a receiver whose accept queue is full
    (the SYN dropped) held the send, and every send behind it, for the kernel's two
    minutes of SYN retries; one that never answered the TLS handshake, for 60 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0 if stalls == "connect" else 8)  # (never accepted)
    port = listener.getsockname()[1]
    filler = None
    if stalls == "connect":  # the one connection the queue holds: the next SYN is dropped
        _, filler = await asyncio.open_connection("127.0.0.1", port)
    sender = AmpTransport([], AmpOptions(port=port, call_timeout=0.5, tls=stalls == "tls"))
    try:
        async with asyncio.timeout(20):
            with pytest.raises(BrokerUnavailable, match=r"no answer within 0\.5s"):
                await sender.publish("orders", [], b"m", {})
    finally:
        await sender.close()
        if filler is not None:
            filler.close()
        listener.close()
