"""The MQTT server's orderly close (``amgi.servers.mqtt._linger``) on real sockets: the
connection stays open after the owner closes its socket, until the peer ends it."""

from __future__ import annotations

import asyncio
import socket
import time

from amgi.servers.mqtt._linger import linger_until_peer_closes


async def test_waits_for_the_peer_to_close_and_drops_what_arrives() -> None:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.sendall(b"unread publish")  # left unread in our buffer
    with linger_until_peer_closes(ours.fileno(), 10) as ended:
        ours.sendall(b"PUBACK+DISCONNECT")
        ours.close()  # what paho does right after writing DISCONNECT
        await asyncio.sleep(0.05)
        assert not ended.done(), "the connection must outlive the owner's socket"
        peer.setblocking(False)
        assert peer.recv(100) == b"PUBACK+DISCONNECT"
        peer.sendall(b"more")
        peer.close()  # the broker ends the connection after DISCONNECT
        await asyncio.wait_for(ended, 5)


async def test_gives_up_after_the_timeout() -> None:
    ours, peer = socket.socketpair()
    try:
        started = time.monotonic()
        with linger_until_peer_closes(ours.fileno(), 0.2) as ended:
            ours.close()
            await asyncio.wait_for(ended, 5)
        assert 0.15 < time.monotonic() - started < 2
        peer.settimeout(5)
        assert peer.recv(10) == b"", "the copy is closed when the block ends"
    finally:
        peer.close()
