"""Shared helpers for the AMP tests (imported by conftest and tests)."""

from __future__ import annotations

import ssl
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
