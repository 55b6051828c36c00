"""No secret of a Lambda adapter's publisher reaches a log, an exception or the app.

The SQS adapter's default publisher holds AWS credentials a checking moto refuses; the
Kafka adapter's publisher a SASL password the test broker refuses; a send route to AMQP
a password RabbitMQ refuses. Each send fails into the app, the records fail, and the
marker is in no log record (DEBUG), no error the app saw and no error the handler raised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from amgi.runtime import RuntimeConfig
from amgi.runtime.routing import Router
from amgi.serverless import BatchFailed, KafkaHandler, SqsHandler
from amgi.servers.amqp import AmqpOptions, AmqpTransport
from amgi.servers.kafka import KafkaOptions, KafkaTransport
from tests.moto_env import private_moto, use_moto_credentials
from tests.secrets import assert_hidden, capture_debug, exception_text, log_texts, new_marker
from tests.serverless.sending_app import SendingApp
from tests.servers.kafka_helpers import BOOTSTRAP, ensure_broker
from tests.servers.test_amqp_support import ensure_broker as ensure_rabbitmq

pytestmark = pytest.mark.timeout(90)

FIXTURES = Path(__file__).parent / "fixtures"


def event(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return loaded


async def test_publisher_secrets_never_shown(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_broker()
    ensure_rabbitmq()
    capture_debug(caplog)
    marker = new_marker()
    texts: list[str] = []
    with private_moto(check_credentials=True) as checking:
        use_moto_credentials(monkeypatch, sqs_endpoint=checking, secret=marker)
        app = SendingApp("replies")
        handler = SqsHandler(app, handle_sigterm=False)
        try:
            result = await handler.handle(event("sqs_standard.json"))
        finally:
            await handler.aclose()
        assert len(result["batchItemFailures"]) == 3
        assert "rejected the AWS credentials" in str(app.errors[0])
        texts += [*map(exception_text, app.errors), json.dumps(result)]

    sasl = KafkaOptions(
        bootstrap_servers=BOOTSTRAP,
        security_protocol="sasl_plaintext",
        sasl_mechanism="PLAIN",
        sasl_username="amgi",
        sasl_password=f"pw-{marker}",
        connect_timeout=3.0,
    )
    wrong = AmqpOptions(url=f"amqp://guest:no-{marker}@127.0.0.1:5672/")
    for address in ("replies", "amqp-replies"):
        app = SendingApp(address)
        kafka_handler = KafkaHandler(
            app,
            publisher=KafkaTransport([], sasl),
            routes=Router([("amqp-*", AmqpTransport([], wrong))]),
            handle_sigterm=False,
            # Two attempts show the retry path; each Kafka one waits out the SASL
            # connect timeout, and the default delays would add 15 s per address.
            config=RuntimeConfig(max_attempts=2, retry_delay=0.01),
        )
        try:
            with pytest.raises(BatchFailed) as failed:
                await kafka_handler.handle(event("msk.json"))
        finally:
            await kafka_handler.aclose()
        assert app.errors
        texts += [*map(exception_text, app.errors), exception_text(failed.value)]
    assert "refused the credentials" in "".join(texts)  # the AMQP route
    assert "SASL" in "".join(texts)  # the Kafka publisher
    texts += log_texts(caplog)
    assert_hidden(marker, texts)
