"""No secret reaches a log record, an exception or the command line's output, per server.

Each test puts a unique marker into the server's password, token or key, drives its
failure paths against the real broker (refused credentials, unreachable broker, TLS
failure, send failure, reconnects), captures every log record at DEBUG (client
libraries' included) and runs ``amgi run`` / ``amgi send`` processes with the marker in
their options, then looks for the marker everywhere. (The http server's test is in
test_http_processes.py, the AMP server's beside its own tests; sqlite and memory take no
secrets; every server's options are checked in tests/core/test_secrets.py.)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from amgi.errors import BrokerUnavailable, ConfigurationError, SendError
from amgi.servers.amqp import AmqpOptions, AmqpTransport
from amgi.servers.kafka import KafkaOptions, KafkaTransport
from amgi.servers.mqtt import MqttOptions, MqttTransport
from amgi.servers.nats import NatsOptions, NatsTransport
from amgi.servers.redis import RedisOptions, RedisTransport
from amgi.servers.sqs import SqsOptions, SqsTransport
from tests.cli import amgi
from tests.moto_env import private_moto, use_moto_credentials
from tests.net import free_port
from tests.secrets import assert_hidden, capture_debug, exception_text, log_texts, new_marker
from tests.servers.kafka_helpers import ensure_broker, fresh, start_private_broker
from tests.servers.kafka_helpers import options as kafka_options
from tests.servers.mosquitto.broker import Mosquitto
from tests.servers.private_brokers import private_nats, private_redis
from tests.servers.test_amqp_support import new_queue, rabbitmq, rabbitmqctl

__all__ = ["rabbitmq"]

pytestmark = pytest.mark.timeout(120)

APP = "tests.servers.http_app:app"
"""An app for the command-line runs (it never gets a message: they fail before)."""
ROUTED = ["--server", "memory", "--lifespan", "off", "--log-level", "debug"]
"""A run that consumes from memory and sends through a route (connected at startup)."""


async def failure_text(call: Callable[[], Awaitable[Any]], *kinds: type[BaseException]) -> str:
    """Run ``call``, which must raise one of ``kinds``; the exception's whole text."""
    with pytest.raises(kinds) as info:
        await call()
    return exception_text(info.value)


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.05)


def logged(caplog: pytest.LogCaptureFixture, text: str) -> Callable[[], bool]:
    return lambda: any(text in line for line in log_texts(caplog))


def cli_texts(*runs: list[str], env: dict[str, str] | None = None) -> list[str]:
    """stdout and stderr of each ``amgi`` run (each must end: no run hangs)."""
    texts: list[str] = []
    for argv in runs:
        done = amgi(*argv, env=env)
        assert done.returncode in (0, 1, 2), done
        texts += [done.stdout, done.stderr]
    return texts


# -- AMQP ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("rabbitmq")
async def test_amqp_password_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    capture_debug(caplog)
    marker = new_marker()
    user, password = f"amgi-secret-{uuid.uuid4().hex[:8]}", f"pw-{marker}"
    await rabbitmqctl("add_user", user, password)
    try:
        await rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        good = f"amqp://{user}:{password}@127.0.0.1:5672/"
        wrong = f"amqp://{user}:wrong-{marker}@127.0.0.1:5672/"
        closed = f"amqp://{user}:{password}@127.0.0.1:{free_port()}/"
        texts = [
            await failure_text(
                AmqpTransport([new_queue()], AmqpOptions(url=wrong)).connect, BrokerUnavailable
            ),
            await failure_text(
                AmqpTransport([], AmqpOptions(url=closed)).connect, BrokerUnavailable
            ),
            await failure_text(  # TLS to a plaintext port
                AmqpTransport([], AmqpOptions(url="amqps" + good[4:])).connect, BrokerUnavailable
            ),
            await failure_text(
                AmqpTransport([], AmqpOptions(url=good.replace(":5672", ":port"))).connect,
                ConfigurationError,
            ),
        ]
        assert "refused the credentials" in texts[0]

        # Consuming, then the broker drops the connection and refuses the password for a
        # while: the reconnect attempts fail, then one succeeds.
        transport = AmqpTransport(
            [new_queue()], AmqpOptions(url=good, reconnect_delay_max=0.2, exchange="")
        )
        await transport.connect()
        try:
            texts.append(
                await failure_text(
                    lambda: transport.publish("no-such-exchange-x", [], b"x", {"amqp": {}}),
                    SendError,
                )
            )
            generation = transport._generation
            await rabbitmqctl("change_password", user, f"other-{marker}")
            await rabbitmqctl("close_all_user_connections", user, "test: connection dropped")
            await until(logged(caplog, "refused the credentials"))
            await rabbitmqctl("change_password", user, password)
            await until(lambda: transport._generation > generation)
        finally:
            await transport.close()
    finally:
        await rabbitmqctl("delete_user", user)
    assert logged(caplog, "lost the connection")()
    texts += log_texts(caplog)
    texts += cli_texts(
        ["run", APP, "q", "--server", "amqp", "--url", wrong, "--log-level", "debug"],
        ["send", "q", "x", "--server", "amqp", "--url", closed, "--log-level", "debug"],
        ["run", APP, "q", "--server", "amqp", "--url", good, "--prefetch", "0"],
        ["run", APP, "q", "--server", "amqp", "--url", good, "--help"],
        ["run", APP, "q", "--send-to", "x=amqp", "--amqp-url", good, "--amqp-prefetch", "0"],
        ["run", APP, "q", "--send-to", "x=amqp", "--amqp-url", good, "--help"],
        ["run", APP, "q", "--server", "amqp", "--ur", good],
        ["run", APP, "q", *ROUTED, "--send-to", "x=amqp", "--amqp-url", wrong],
    )
    assert "--prefetch must be 1 to 65535" in "".join(texts)
    assert_hidden(marker, texts)


# -- Kafka --------------------------------------------------------------------------------


async def test_kafka_sasl_password_never_shown(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """SASL against the test broker (it refuses the handshake), an unreachable broker,
    TLS to a plaintext port, a failed send, and a broker that goes away and comes back
    while the client reconnects; librdkafka's own debug lines routed through logging."""
    ensure_broker()
    capture_debug(caplog)
    marker = new_marker()
    secret: dict[str, Any] = {
        "sasl_mechanism": "PLAIN",
        "sasl_username": "amgi",
        "sasl_password": f"pw-{marker}",
        "ssl_key_password": f"key-{marker}",
        "connect_timeout": 3.0,
        "config": ["debug=security,broker,conf"],
    }

    def kafka(addresses: list[str], **values: Any) -> KafkaTransport:
        return KafkaTransport(addresses, KafkaOptions(**kafka_options(**{**secret, **values})))

    texts = [
        await failure_text(
            kafka([fresh("sasl")], security_protocol="sasl_plaintext").connect, BrokerUnavailable
        ),
        await failure_text(
            kafka([], security_protocol="sasl_plaintext", bootstrap_servers=unreachable()).connect,
            BrokerUnavailable,
        ),
        await failure_text(
            kafka([], security_protocol="sasl_ssl", connect_timeout=1.5).connect,
            BrokerUnavailable,
        ),
        await failure_text(
            kafka([], config=[f"debug=broker,conf,{marker}"]).connect, ConfigurationError
        ),
    ]
    # A plaintext producer with the secrets set (librdkafka ignores them): a send the
    # broker refuses, then the broker goes away while it is connected.
    port = free_port()
    broker = start_private_broker(port, port, tmp_path / "tansu.log")
    sender = kafka(
        [],
        bootstrap_servers=f"127.0.0.1:{port}",
        delivery_timeout_ms=20000,
        enable_idempotence=False,
        config=["debug=security,broker,conf", "reconnect.backoff.max.ms=200"],
    )
    try:
        await sender.connect()
        texts.append(
            await failure_text(
                lambda: sender.publish("t", [], b"x", {"kafka": {"partition": 99}}), SendError
            )
        )
        broker.kill()
        broker.wait(10)
        await until(logged(caplog, "Connection refused"))
        broker = start_private_broker(port, port, tmp_path / "tansu-again.log")
        create_private_topic(port, "back")
        await sender.publish("back", [], b"after the restart", {})
    finally:
        await sender.close()
        broker.kill()
        broker.wait(10)
    assert logged(caplog, "sasl.password = [redacted]")()  # librdkafka's debug lines came
    texts += log_texts(caplog)
    sasl = ["--security-protocol", "sasl_plaintext", "--sasl-mechanism", "PLAIN"]
    sasl += ["--sasl-username", "amgi", "--sasl-password", f"pw-{marker}"]
    texts += cli_texts(
        ["run", APP, "t", "--server", "kafka", *sasl, "--connect-timeout", "3",
         "--log-level", "debug", "--config", "debug=security"],
        ["send", "t", "x", "--server", "kafka", *sasl, "--bootstrap-servers", unreachable(),
         "--connect-timeout", "1", "--log-level", "debug"],
        ["run", APP, "t", "--server", "kafka", *sasl, "--max-batch-size", "0"],
        ["run", APP, "t", "--server", "kafka", "--config", f"sasl.password:{marker}"],
        ["run", APP, "t", "--server", "kafka", *sasl, "--help"],
        ["run", APP, "t", "--send-to", "x=kafka", "--kafka-sasl-password", marker,
         "--kafka-max-batch-size", "0"],
        ["run", APP, "t", "--send-to", "x=kafka", "--kafka-sasl-password", marker, "--help"],
        ["run", APP, "t", "--kafka-sasl-password", marker],
        ["run", APP, "t", *ROUTED, "--send-to", "x=kafka", "--kafka-security-protocol",
         "sasl_plaintext", "--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username", "amgi",
         "--kafka-sasl-password", marker, "--kafka-connect-timeout", "3"],
    )  # fmt: skip
    joined = "".join(texts)
    assert "--max-batch-size must be 1 to 1000000" in joined
    assert "--config expects NAME=VALUE items" in joined
    assert_hidden(marker, texts)


def unreachable() -> str:
    return f"127.0.0.1:{free_port()}"


def create_private_topic(port: int, name: str) -> None:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"})
    admin.create_topics([NewTopic(name, 1)])[name].result(timeout=10)


# -- MQTT ---------------------------------------------------------------------------------


async def test_mqtt_password_never_shown(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """A private Mosquitto with a password file: a wrong password, an unreachable broker,
    TLS to a plaintext listener, a refused send, and a broker restarted with another
    password (reconnects refused) and then with the right one (reconnected)."""
    capture_debug(caplog)
    marker = new_marker()
    password = f"pw-{marker}"
    broker = Mosquitto(tmp_path / "a", users={"amgi": password}, persistence=False)
    broker.start()
    port = broker.port
    try:

        def mqtt(addresses: list[str], **values: Any) -> MqttTransport:
            options = {"port": port, "username": "amgi", "password": password, **values}
            return MqttTransport(addresses, MqttOptions(connect_timeout=3, **options))

        texts = [
            await failure_text(
                mqtt(["a/b"], password=f"wrong-{marker}").connect, BrokerUnavailable
            ),
            await failure_text(mqtt(["a/b"], port=free_port()).connect, BrokerUnavailable),
            await failure_text(mqtt([], tls=True).connect, BrokerUnavailable),
        ]
        assert "refused the connection" in texts[0]
        transport = mqtt([f"secrets/{uuid.uuid4().hex[:8]}"], reconnect_delay_max=0.3)
        await transport.connect()
        try:
            texts.append(
                await failure_text(lambda: transport.publish("a/#", [], b"x", {}), SendError)
            )
            broker.stop()
            await until(logged(caplog, "reconnecting"))
            broker = Mosquitto(tmp_path / "b", port, users={"amgi": "other"}, persistence=False)
            broker.start()
            await until(logged(caplog, "reconnect failed"))
            broker.stop()
            broker = Mosquitto(tmp_path / "c", port, users={"amgi": password}, persistence=False)
            broker.start()
            await until(logged(caplog, "reconnected to"))
        finally:
            await transport.close()
    finally:
        broker.stop()
    texts += log_texts(caplog)
    closed = str(free_port())
    login = ["--server", "mqtt", "--username", "amgi", "--password", password]
    texts += cli_texts(
        ["run", APP, "a/b", *login, "--port", closed, "--log-level", "debug",
         "--connect-timeout", "2"],
        ["send", "a/b", "x", *login, "--port", closed, "--log-level", "debug",
         "--connect-timeout", "2"],
        ["run", APP, "a/b", "--server", "mqtt", "--password", password],  # needs --username
        ["run", APP, "a/b", *login, "--help"],
        ["run", APP, "a/b", "--send-to", "x=mqtt", "--mqtt-password", password],
        ["run", APP, "a/b", "--send-to", "x=mqtt", "--mqtt-password", password, "--help"],
        ["run", APP, "a/b", *ROUTED, "--send-to", "x=mqtt", "--mqtt-username", "amgi",
         "--mqtt-password", password, "--mqtt-port", closed, "--mqtt-connect-timeout", "2"],
    )  # fmt: skip
    assert "--password needs --username" in "".join(texts)
    assert_hidden(marker, texts)


# -- SQS ----------------------------------------------------------------------------------


async def test_sqs_aws_secret_key_and_session_token_never_shown(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials a checking moto refuses, an unreachable endpoint, a refused send, and
    receives that fail when the endpoint goes away; botocore's wire trace at DEBUG."""
    capture_debug(caplog)
    marker = new_marker()
    use_moto_credentials(monkeypatch, secret=marker)

    def sqs(addresses: list[str], endpoint: str, **values: Any) -> SqsTransport:
        return SqsTransport(addresses, SqsOptions(endpoint_url=endpoint, wait_time=0, **values))

    texts: list[str] = []
    with private_moto(check_credentials=True) as checking:  # one for the library and the CLI
        refused = await failure_text(sqs(["q"], checking).connect, BrokerUnavailable)
        assert "rejected the AWS credentials" in refused
        texts.append(refused)
        nowhere = f"http://127.0.0.1:{free_port()}"
        texts.append(
            await failure_text(sqs(["q"], nowhere, connect_timeout=0.5).connect, BrokerUnavailable)
        )
        queue = f"secrets-{uuid.uuid4().hex[:8]}"
        with private_moto() as url:
            admin = sqs([], url)
            await admin.connect()
            await admin.client.create_queue(QueueName=queue)
            await admin.close()
            transport = sqs([queue], url, connect_timeout=0.5)
            await transport.connect()
            texts.append(
                await failure_text(
                    lambda: transport.publish("no-such-queue", [], b"x", {}), SendError
                )
            )
        try:  # the endpoint is gone: receiving fails
            texts.append(await failure_text(transport.fetch, BrokerUnavailable))
        finally:
            await transport.close()
        assert logged(caplog, "x-amz-security-token:*****")()  # the wire trace was there, masked
        texts += log_texts(caplog)
        texts += cli_texts(
            ["run", APP, "q", "--server", "sqs", "--endpoint-url", checking,
             "--log-level", "debug"],
            ["send", "q", "x", "--server", "sqs", "--endpoint-url", nowhere, "--log-level", "debug",
             "--connect-timeout", "0.5"],
            ["send", "q", "x", "--server", "sqs", "--endpoint-url", checking, "--help"],
        )  # fmt: skip
    assert "rejected the AWS credentials" in "".join(texts)
    assert_hidden(marker, texts)


# -- Redis and NATS -----------------------------------------------------------------------


async def test_redis_password_never_shown(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """A private redis-server with a password: a wrong one, an unreachable server, TLS to
    a plaintext port, a send while the server is down, and a restart."""
    capture_debug(caplog)
    marker = new_marker()
    password = f"pw-{marker}"
    with private_redis(tmp_path / "redis", password=password) as broker:
        good = f"redis://:{password}@127.0.0.1:{broker.port}/0"

        def redis(url: str) -> RedisTransport:
            return RedisTransport([fresh("secrets")], RedisOptions(url=url, connect_timeout=2))

        texts = [
            await failure_text(redis(good.replace("pw-", "no-")).connect, BrokerUnavailable),
            await failure_text(redis(good.replace(str(broker.port), str(free_port()))).connect,
                               BrokerUnavailable),
            await failure_text(redis("rediss" + good[5:]).connect, BrokerUnavailable),
        ]  # fmt: skip
        assert "refused the credentials" in texts[0]
        transport = redis(good)
        await transport.connect()
        try:
            broker.stop()
            texts.append(
                await failure_text(
                    lambda: transport.publish("s", [], b"x", {}), SendError, BrokerUnavailable
                )
            )
            broker.start()
            deadline = time.monotonic() + 30
            while True:  # the server loads its data first ("LOADING"): a send error
                try:
                    await transport.publish("s", [], b"after the restart", {})
                    break
                except SendError as exc:
                    texts.append(exception_text(exc))
                    assert time.monotonic() < deadline, "no send after the restart"
                    await asyncio.sleep(0.1)
        finally:
            await transport.close()
    texts += log_texts(caplog)
    closed = f"redis://:{password}@127.0.0.1:{free_port()}/0"
    texts += cli_texts(
        ["run", APP, "s", "--server", "redis", "--url", closed, "--log-level", "debug",
         "--connect-timeout", "1"],
        ["send", "s", "x", "--server", "redis", "--url", closed, "--log-level", "debug",
         "--connect-timeout", "1"],
        ["run", APP, "s", "--server", "redis", "--url", closed, "--batch-size", "0"],
        ["run", APP, "s", "--server", "redis", "--url", closed, "--help"],
        ["run", APP, "s", *ROUTED, "--send-to", "x=redis", "--redis-url", closed,
         "--redis-connect-timeout", "1"],
    )  # fmt: skip
    assert "--batch-size must be" in "".join(texts)
    assert_hidden(marker, texts)


async def test_nats_password_and_token_never_shown(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A private nats-server with a user and password: a wrong password, credentials in
    the server URL, a token, an unreachable server, a restart. (Not TLS to a plaintext
    port: nats-py then connects without TLS, see the NATS server's docs.)"""
    capture_debug(caplog)
    marker = new_marker()
    password = f"pw-{marker}"
    with private_nats(tmp_path / "nats", user="app", password=password) as broker:
        here = f"nats://127.0.0.1:{broker.port}"

        def nats(**values: Any) -> NatsTransport:
            options = NatsOptions(
                **{"servers": here, "mode": "core", "connect_timeout": 2, **values}
            )
            return NatsTransport([f"secrets.{uuid.uuid4().hex[:8]}"], options)

        texts = [
            await failure_text(nats(user="app", password=f"no-{marker}").connect,
                               BrokerUnavailable),
            await failure_text(nats(token=f"tok-{marker}").connect, BrokerUnavailable),
            await failure_text(
                nats(servers=f"nats://app:no-{marker}@127.0.0.1:{broker.port}").connect,
                BrokerUnavailable,
            ),
            await failure_text(
                nats(servers=f"nats://app:{password}@127.0.0.1:{free_port()}").connect,
                BrokerUnavailable,
            ),
        ]  # fmt: skip
        assert "refused the credentials" in texts[0]
        transport = nats(user="app", password=password)
        await transport.connect()
        try:
            broker.restart()
            await until(logged(caplog, "reconnected to the NATS server"))
        finally:
            await transport.close()
    texts += log_texts(caplog)
    closed = f"nats://127.0.0.1:{free_port()}"
    login = ["--servers", closed, "--user", "app", "--password", password]
    texts += cli_texts(
        ["run", APP, "s", "--server", "nats", *login, "--log-level", "debug",
         "--connect-timeout", "1"],
        ["send", "s", "x", "--server", "nats", "--servers", f"nats://a:{password}@127.0.0.1:1",
         "--log-level", "debug", "--connect-timeout", "1"],
        ["run", APP, "s", "--server", "nats", "--password", password],  # needs --user
        ["run", APP, "s", "--server", "nats", "--token", password, "--help"],
        ["run", APP, "s", *ROUTED, "--send-to", "x=nats", "--nats-servers", closed,
         "--nats-user", "app", "--nats-password", password, "--nats-connect-timeout", "1"],
    )  # fmt: skip
    assert "--password needs --user" in "".join(texts)
    assert_hidden(marker, texts)
