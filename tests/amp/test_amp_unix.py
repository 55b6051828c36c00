"""UNIX-socket connections: the listening socket file, and descriptors in numbers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

import pytest
from amp_commands import Hand, Peer, Ping

from amgi import amp


async def test_close_removes_the_socket_file_so_serving_again_works(tmp_path: Path) -> None:
    path = tmp_path / "amp.sock"
    server = await amp.serve_unix(Peer, path)
    server.close()
    await server.wait_closed()
    assert not path.exists()
    # A clean restart on the same path.
    async with await amp.serve_unix(Peer, path), await amp.connect_unix(path, Peer) as conn:
        assert await conn.call_remote(Ping, text="again") == {"text": "ping:pong:again"}
    assert not path.exists()


async def test_close_leaves_a_socket_file_that_is_no_longer_ours(tmp_path: Path) -> None:
    path = tmp_path / "amp.sock"
    server = await amp.serve_unix(Peer, path)
    path.unlink()  # someone else took the path over since
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        identity = os.stat(path).st_ino
        server.close()
        assert path.exists()
        assert os.stat(path).st_ino == identity


async def hand_many(conn: amp.AMP, count: int) -> None:
    """``count`` Hand calls at once (one flush), each passing a pipe's write end."""
    pipes = [os.pipe() for _ in range(count)]
    try:
        async with asyncio.timeout(10):
            results = await asyncio.gather(
                *(conn.call_remote(Hand, fd=w, text=f"{i:03d}") for i, (_, w) in enumerate(pipes))
            )
        assert results == [{"written": 3}] * count
        for i, (read, write) in enumerate(pipes):
            os.close(write)
            assert os.read(read, 10) == b"%03d" % i
    finally:
        for read, write in pipes:
            os.close(read)
            with contextlib.suppress(OSError):
                os.close(write)


async def test_many_descriptors_in_one_flush_to_our_server(tmp_path: Path) -> None:
    path = tmp_path / "amp.sock"
    async with await amp.serve_unix(Peer, path), await amp.connect_unix(path, Peer) as conn:
        await hand_many(conn, 100)  # more than a read takes (64) and in one flush


async def test_many_descriptors_in_one_flush_to_twisted(twisted_unix_server: str) -> None:
    async with await amp.connect_unix(twisted_unix_server, Peer) as conn:
        await hand_many(conn, 300)  # more than Linux passes in one message (253)


class Pipe:
    """A pipe whose write end a test hands out: :meth:`copies_closed` tells whether
    every copy the other side got was closed (ours was then the last write end)."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()
        os.set_blocking(self.read, False)

    def copies_closed(self) -> bool:
        os.close(self.write)
        self.write = -1
        try:
            return os.read(self.read, 10) == b""
        except BlockingIOError:  # a copy is still open somewhere
            return False

    def close(self) -> None:
        os.close(self.read)
        if self.write >= 0:
            os.close(self.write)


async def test_descriptors_no_box_claims_are_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "amp.sock"
    peers: list[Peer] = []

    def factory() -> Peer:
        peers.append(Peer(max_unclaimed_fds=100))
        return peers[-1]

    pipe = Pipe()
    write = pipe.write
    try:
        async with await amp.serve_unix(factory, path):
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.setblocking(False)
                await loop.sock_connect(sock, str(path))
                with caplog.at_level(logging.WARNING, logger="amgi.amp"):
                    # 50 copies of one descriptor at a time, beside an unfinished box.
                    for part in (b"\x00", b"\x08", b"_"):
                        await loop.run_in_executor(
                            None, socket.send_fds, sock, [part], [write] * 50
                        )
                    async with asyncio.timeout(5):
                        assert await loop.sock_recv(sock, 100) == b""  # closed by the server
                        await peers[0].wait_closed()
            assert "over max_unclaimed_fds (100)" in caplog.text
        assert pipe.copies_closed()
    finally:
        pipe.close()


class Hold(amp.Command):
    """The responder keeps the descriptor until it is cancelled, then closes it."""

    arguments = [(b"fd", amp.Descriptor())]


class Holder(amp.AMP):
    def __init__(self) -> None:
        super().__init__(max_concurrent_responders=1)

    @Hold.responder
    async def hold(self, fd: int) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            os.close(fd)


async def test_descriptors_of_calls_still_queued_are_closed_when_the_connection_ends(
    tmp_path: Path,
) -> None:
    # One call runs, nine wait in the queue with their descriptors claimed; the server
    # closes. The queued calls' descriptors were dropped with the queue, never closed.
    path = tmp_path / "amp.sock"
    peers: list[Holder] = []

    def factory() -> Holder:
        peers.append(Holder())
        return peers[-1]

    pipe = Pipe()
    try:
        async with await amp.serve_unix(factory, path), await amp.connect_unix(path) as conn:
            hold = (conn.call_remote(Hold, fd=pipe.write) for _ in range(10))
            calls = [asyncio.ensure_future(call) for call in hold]
            async with asyncio.timeout(5):
                while not peers or len(peers[0]._queue) < 9:
                    await asyncio.sleep(0.02)
            peers[0].close()
            await asyncio.wait_for(peers[0].wait_closed(), 5)
            await asyncio.gather(*calls, return_exceptions=True)
        assert pipe.copies_closed()
    finally:
        pipe.close()


async def test_connect_unix_cancelled_while_starting_leaves_nothing_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The socket was closed under a transport still starting: its protocol was made
    and never told the end, and the loop kept watching the closed descriptor (a socket
    given that number next could not be watched: "Exception in callback")."""
    path = tmp_path / "amp.sock"
    made: list[amp.AMP] = []

    def factory() -> amp.AMP:
        made.append(amp.AMP())
        return made[-1]

    async with await amp.serve_unix(Peer, path):
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for _ in range(3):
                connecting = asyncio.ensure_future(amp.connect_unix(path, factory))
                await asyncio.sleep(0)  # connected: the transport starts next
                connecting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await connecting
                async with asyncio.timeout(5), await amp.connect_unix(path, Peer) as conn:
                    assert await conn.call_remote(Ping, text="x") == {"text": "ping:pong:x"}
            async with asyncio.timeout(5):
                for protocol in made:
                    await protocol.wait_closed()
        assert "Exception in callback" not in caplog.text
