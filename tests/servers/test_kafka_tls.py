"""The Kafka server over TLS, with client certificates, against a real broker.

The test broker (tansu 0.6) cannot serve TLS itself: its ``--cert`` and ``--key`` flags
refuse to be given together. So each test module run starts a private tansu that
advertises a TLS port, and a TLS front on that port (:class:`tests.net.TlsFront`) that
demands a client certificate and relays to the broker. Every connection the client makes,
bootstrap and after, goes through the front.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from amgi.errors import BrokerUnavailable
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.kafka import KafkaOptions, KafkaTransport
from tests.cli import amgi as amgi_cli
from tests.net import TlsFront, free_port, self_signed
from tests.servers.kafka_helpers import fresh, start_private_broker
from tests.servers.kafka_helpers import options as base_options

pytestmark = pytest.mark.timeout(60)


@dataclass
class TlsBroker:
    bootstrap: str
    server_cert: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path

    def flags(self, cert: Path | None, key: Path | None, ca: Path | None = None) -> list[str]:
        out = [
            "--bootstrap-servers", self.bootstrap,
            "--security-protocol", "ssl",
            "--ssl-ca-location", str(ca or self.server_cert),
        ]  # fmt: skip
        if cert is not None and key is not None:
            out += ["--ssl-certificate-location", str(cert), "--ssl-key-location", str(key)]
        return out


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    directory = tmp_path_factory.mktemp("kafka-tls")
    server_cert, server_key = self_signed(directory, "server")
    client_cert, client_key = self_signed(directory, "client")
    stranger_cert, stranger_key = self_signed(directory, "stranger")
    plain, tls = free_port(), free_port()
    broker = start_private_broker(plain, tls, directory / "tansu.log")
    try:
        with TlsFront(tls, plain, server_cert, server_key, client_ca=client_cert):
            yield TlsBroker(
                f"127.0.0.1:{tls}",
                server_cert,
                client_cert,
                client_key,
                stranger_cert,
                stranger_key,
            )
    finally:
        broker.terminate()
        broker.wait(10)


def options(broker: TlsBroker, **overrides: Any) -> KafkaOptions:
    """The test options (fresh group, fast joins) for the TLS front, with our client
    certificate and the broker's CA."""
    tls: dict[str, Any] = {
        "bootstrap_servers": broker.bootstrap,
        "security_protocol": "ssl",
        "ssl_ca_location": str(broker.server_cert),
        "ssl_certificate_location": str(broker.client_cert),
        "ssl_key_location": str(broker.client_key),
        "connect_timeout": 5.0,
    }
    return KafkaOptions(**base_options(**{**tls, **overrides}))


async def test_cli_send_and_server_consume_over_mutual_tls(tls_broker: TlsBroker) -> None:
    topic = fresh("tls")
    for i in range(3):
        out = amgi_cli(
            "send", topic, f'{{"id": {i}}}', "--server", "kafka", "--header", "trace=t-1",
            *tls_broker.flags(tls_broker.client_cert, tls_broker.client_key),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
    seen: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []
    done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            event = await receive()
            seen.append((event["payload"], list(event["headers"])))
            await send({"type": "message.ack", "id": event["id"]})
            if len(seen) == 3:
                done.set()
            if not event.get("more_messages"):
                return

    kafka = KafkaTransport([topic], options(tls_broker, auto_offset_reset="earliest"))
    runtime = Runtime(app, kafka, RuntimeConfig(lifespan="off"))
    server = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(server, 30) == 0
    assert sorted(payload for payload, _ in seen) == [b'{"id": 0}', b'{"id": 1}', b'{"id": 2}']
    assert all(headers == [(b"trace", b"t-1")] for _, headers in seen)


async def test_untrusted_broker_certificate_is_one_clear_error_at_once(
    tls_broker: TlsBroker,
) -> None:
    kafka = KafkaTransport(
        ["t"],
        options(tls_broker, ssl_ca_location=str(tls_broker.client_cert), connect_timeout=30),
    )
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"cannot connect.*certificate verify failed"):
        await kafka.connect()
    assert time.monotonic() - started < 10  # not the 30 s connect timeout: retrying cannot help
    await kafka.close()


@pytest.mark.parametrize("who", ["none", "stranger"])
async def test_refused_client_certificate_is_one_clear_error(
    tls_broker: TlsBroker, who: str
) -> None:
    cert, key = (
        (tls_broker.stranger_cert, tls_broker.stranger_key) if who == "stranger" else (None, None)
    )
    kafka = KafkaTransport(
        ["t"],
        options(
            tls_broker,
            ssl_certificate_location=cert and str(cert),
            ssl_key_location=key and str(key),
        ),
    )
    with pytest.raises(BrokerUnavailable, match="cannot reach Kafka"):
        await kafka.connect()
    await kafka.close()


def test_cli_with_untrusted_broker_is_one_clear_line(tls_broker: TlsBroker) -> None:
    out = amgi_cli(
        "send", "t", "x", "--server", "kafka", "--connect-timeout", "30",
        *tls_broker.flags(
            tls_broker.client_cert, tls_broker.client_key, ca=tls_broker.stranger_cert
        ),
    )  # fmt: skip
    assert out.returncode != 0
    assert "certificate verify failed" in out.stderr
    assert "Traceback" not in out.stderr
