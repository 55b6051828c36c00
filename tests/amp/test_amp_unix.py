"""UNIX-socket connections: the listening socket file, and descriptor traffic."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from amp_commands import Peer, Ping

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
