"""Every listener the project opens binds 127.0.0.1 unless told otherwise: the AMP
server, the HTTP push server and the ``amgi docs`` page, each started with its defaults
(a free port aside) and its listening socket read back from the kernel."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amgi.servers.amp import AmpOptions, AmpTransport
from amgi.servers.http import HttpOptions, HttpTransport
from tests.cli import ROOT
from tests.net import free_port, port_open

pytestmark = pytest.mark.timeout(60)


def listening(port: int) -> set[str]:
    """The addresses TCP sockets listen on at ``port`` (from /proc/net/tcp and tcp6)."""
    found: set[str] = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # the kernel writes each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, words))
    return found


@pytest.fixture(autouse=True)
def _linux() -> None:
    assert Path("/proc/net/tcp").exists(), "reads listening sockets from /proc/net/tcp"


async def test_amp_server_listens_on_loopback_by_default() -> None:
    port = free_port()
    transport = AmpTransport(["orders"], AmpOptions(port=port))
    await transport.connect()
    try:
        assert listening(port) == {"127.0.0.1"}
    finally:
        await transport.close()


async def test_http_server_listens_on_loopback_by_default() -> None:
    port = free_port()
    transport = HttpTransport(["orders"], HttpOptions(port=port))
    await transport.connect()
    try:
        assert listening(port) == {"127.0.0.1"}
    finally:
        await transport.close()


def test_docs_page_listens_on_loopback_by_default() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "amgi", "docs", "examples.orders:app", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            assert proc.poll() is None, "amgi docs exited"
            assert time.monotonic() < deadline, "amgi docs did not start"
            time.sleep(0.05)
        assert listening(port) == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(10)


def test_listening_reads_a_wildcard_bind_too() -> None:
    """The check can fail: a socket bound to every address reads back as 0.0.0.0."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        assert listening(sock.getsockname()[1]) == {"0.0.0.0"}
