"""The AMGI conformance suite against a private Mosquitto (MQTT 5, QoS 1, persistent sessions)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, ClassVar

import pytest

from amgi.servers.kit import DEAD_LETTER_REASON_HEADER
from amgi.servers.mqtt import MqttOptions, MqttTransport
from amgi.testing.conformance import ConformanceSuite, DurabilitySuite, Harness
from amgi.transport import Bindings, HeaderList, Settlement


async def ensure_session(options: MqttOptions, topic_filter: str) -> None:
    """Create the persistent session a server on ``topic_filter`` resumes, so that messages
    published before the server starts wait for it (MQTT drops messages nobody subscribed to).
    """
    transport = MqttTransport([topic_filter], options)
    await transport.connect()
    await transport.close()


class MqttHarness(Harness):
    server = "mqtt"
    send_bindings: ClassVar[Bindings] = {
        "mqtt": {
            "qos": 1,
            "contentType": "application/octet-stream",
            "correlationData": b"corr-\x00\x01",
            "responseTopic": "amgi/replies/x",
            "messageExpiryInterval": 300,
        }
    }
    redelivery_timeout = 10.0
    startup_timeout = 15.0

    def __init__(self, port: int) -> None:
        self.port = port

    def options(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port}

    def _options(self) -> MqttOptions:
        return MqttOptions(**self.options())

    async def new_address(self) -> str:
        topic = f"amgi-test/{uuid.uuid4().hex}"
        options = self._options()
        await ensure_session(options, topic)
        await ensure_session(options, f"{options.dead_letter_prefix}/{topic}")
        return topic

    async def dead_letters(
        self, address: str, count: int, timeout: float
    ) -> list[tuple[HeaderList, bytes | None, str]]:
        options = self._options()
        transport = MqttTransport([f"{options.dead_letter_prefix}/{address}"], options)
        await transport.connect()
        found: list[tuple[HeaderList, bytes | None, str]] = []
        try:
            async with asyncio.timeout(timeout):
                while len(found) < count:
                    for batch in await transport.fetch():
                        for m in batch.messages:
                            reason = next(
                                (v for n, v in m.headers if n == DEAD_LETTER_REASON_HEADER), b""
                            )
                            found.append((m.headers, m.payload, reason.decode()))
                        await transport.settle(batch, Settlement(acked=list(batch.messages)))
        finally:
            await transport.close()
        return found

    def check_bindings(self, sent: Bindings, received: Bindings) -> None:
        got = received["mqtt"]
        want = sent["mqtt"]
        for key in ("qos", "contentType", "correlationData", "responseTopic"):
            assert got.get(key) == want[key], (key, got)
        assert 0 < got["messageExpiryInterval"] <= want["messageExpiryInterval"]


class TestMqttConformance(ConformanceSuite, DurabilitySuite):
    @pytest.fixture
    def harness(self, mosquitto: Any) -> MqttHarness:
        return MqttHarness(mosquitto.port)
