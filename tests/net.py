"""Network helpers the broker tests share: free ports, test certificates, a TLS front.

The TLS front (:class:`TlsFront`) terminates TLS in front of a plaintext broker, for
brokers whose test build cannot serve TLS itself (tansu, the Kafka test broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import random
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

__all__ = ["TlsFront", "free_port", "pipe", "port_open", "self_signed"]


_RESERVED = Path(tempfile.gettempdir()) / "amgi-test-ports"
_RESERVED_FOR = 15 * 60  # seconds: longer than any test that stops and restarts a server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that no other
    caller of this function (any worker, any Python version run beside this one) was
    given in the last 15 minutes.

    Taken below the kernel's ephemeral range (32768 and up), so that the client sockets
    of tests running meanwhile cannot take it before the server binds it. The reservation
    (a file per port) covers a test that kills its server and starts another on the same
    port: meanwhile the port is free, and a test in another run could otherwise be given
    it and talk to the wrong server.
    """
    _RESERVED.mkdir(exist_ok=True)
    rng = random.SystemRandom()
    now = time.time()
    for _ in range(400):
        port = rng.randrange(20000, 32000)
        if not _reserve(_RESERVED / str(port), now):
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found between 20000 and 32000")


def _reserve(marker: Path, now: float) -> bool:
    """Create ``marker``, or take it over when its reservation has run out."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        pass
    try:
        if now - marker.stat().st_mtime < _RESERVED_FOR:
            return False
        # Expired: whoever renames it first takes it over (rename is atomic).
        taken = marker.with_name(f"{marker.name}.{os.getpid()}.{time.monotonic_ns()}")
        marker.rename(taken)
    except OSError:
        return False
    taken.unlink(missing_ok=True)
    return _reserve(marker, now)


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends or fails, then close ``dst``."""
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
            dst.close()


def self_signed(directory: Path, stem: str = "cert") -> tuple[Path, Path]:
    """A certificate for ``127.0.0.1`` and ``localhost`` that is its own CA, and its key.

    Written to ``directory`` as ``{stem}.pem`` and ``{stem}-key.pem``; usable as a server
    certificate, a client certificate and the CA file that trusts it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"amgi test {stem}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


class ThreadedFront:
    """A relay on 127.0.0.1:``port`` to 127.0.0.1:``upstream``, on its own event loop in a
    thread (the loop of the test may be the one held up); a context manager. Subclasses
    say how the listening socket is made (:meth:`_listen_options`) and how the client's
    bytes go upstream (:meth:`_forward`)."""

    name = "front"

    def __init__(self, port: int, upstream: int) -> None:
        self.port = port
        self.upstream = upstream
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{self.name} on port {self.port} did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        stop = self._stop
        if stop is not None:
            self._loop.call_soon_threadsafe(stop.set)
        self._thread.join(10)

    def _listen_options(self) -> dict[str, Any]:
        return {}

    async def _forward(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        await pipe(src, dst)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        relays: set[asyncio.Task[None]] = set()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.ensure_future(self._relay(reader, writer))
            relays.add(task)
            task.add_done_callback(relays.discard)

        server = await asyncio.start_server(
            accepted, "127.0.0.1", self.port, **self._listen_options()
        )
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            for task in list(relays):
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._forward(reader, up_writer), pipe(up_reader, writer))


class TlsFront(ThreadedFront):
    """Accept TLS on 127.0.0.1:``port`` and relay each connection, in plaintext, to
    127.0.0.1:``upstream``; with ``client_ca`` set, clients must show a certificate it
    signed. Runs its own event loop in a thread; use as a context manager."""

    name = "TLS front"

    def __init__(
        self,
        port: int,
        upstream: int,
        cert: Path,
        key: Path,
        client_ca: Path | None = None,
    ) -> None:
        super().__init__(port, upstream)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(client_ca)

    def _listen_options(self) -> dict[str, Any]:
        return {"ssl": self.context, "ssl_handshake_timeout": 5}
