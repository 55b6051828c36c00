"""Shared helpers for the AMP tests (imported by conftest and tests)."""

from __future__ import annotations

import asyncio
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from amgi import amp

HERE = Path(__file__).parent
TWISTED_PEER = HERE / "twisted_peer.py"


@dataclass
class Cert:
    pem: Path  # certificate + key, for Twisted
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cert))
        return context


class Drop(amp.Command):
    """A large call without answer (fills the write buffer towards a stalled peer)."""

    arguments = [(b"data", amp.BigBytes())]
    requires_answer = False


async def twisted_peer_output(*args: str, timeout: float = 20) -> str:
    """Run ``twisted_peer.py ARGS`` to its end and return its output (killed after
    ``timeout`` seconds)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(TWISTED_PEER), *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()
