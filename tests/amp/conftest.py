"""Fixtures: a self-signed certificate, Twisted AMP servers in a subprocess, a stalled peer."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import pytest
from amp_helpers import TWISTED_PEER, Cert
from tests.net import self_signed


@pytest.fixture(scope="session")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = self_signed(directory)
    paths = Cert(directory / "both.pem", cert_file, key_file)
    paths.pem.write_bytes(cert_file.read_bytes() + key_file.read_bytes())
    return paths


@pytest.fixture(scope="session")
def twisted_server(cert: Cert) -> Iterator[int]:
    """Port of a Twisted AMP server (twisted_peer.Peer) on 127.0.0.1."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(TWISTED_PEER), "server", str(cert.pem)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT "), f"Twisted server did not start: {line!r}"
        yield int(line.split()[1])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def twisted_unix_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Path of a Twisted AMP server (twisted_peer.Peer) on a UNIX socket."""
    path = str(tmp_path_factory.mktemp("unix") / "amp.sock")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(TWISTED_PEER), "unix-server", path],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY"), f"Twisted UNIX server did not start: {line!r}"
        yield path
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """Port of a TCP server that accepts, then neither reads nor writes (a stalled peer)."""
    held: list[socket.socket] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    loop.add_reader(listener.fileno(), lambda: held.append(listener.accept()[0]))
    yield listener.getsockname()[1]
    loop.remove_reader(listener.fileno())
    listener.close()
    for conn in held:
        conn.close()
