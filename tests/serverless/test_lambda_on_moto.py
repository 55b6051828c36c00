"""The Lambda adapters with real SQS behaviour (moto, scripts/brokers/moto.sh): records
built from messages the SQS server sent, sends from inside a handler, and SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from amgi.runtime import RuntimeConfig
from amgi.serverless import KafkaHandler, SqsHandler
from amgi.servers.sqs import SqsOptions, SqsTransport
from amgi.testing.conformance import Recorder
from tests.moto_env import ENDPOINT, use_moto_credentials
from tests.serverless.helpers import Context

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    use_moto_credentials(monkeypatch, sqs_endpoint=True)


@pytest.fixture
async def sqs() -> AsyncIterator[SqsTransport]:
    transport = SqsTransport([], SqsOptions(endpoint_url=ENDPOINT))
    await transport.connect()
    yield transport
    await transport.close()


async def new_queue(sqs: SqsTransport) -> tuple[str, str]:
    name = f"lambda-{uuid.uuid4().hex[:10]}"
    url = (await sqs.client.create_queue(QueueName=name))["QueueUrl"]
    return name, url


async def receive_all(sqs: SqsTransport, url: str, n: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 15
    while len(got) < n and time.monotonic() < deadline:
        response = await sqs.client.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
        )
        got.extend(response.get("Messages", []))
    return got


def lambda_record(message: dict[str, Any], arn: str) -> dict[str, Any]:
    """The event record Lambda makes of a received SQS message (documented shape)."""
    attributes = {}
    for name, a in message.get("MessageAttributes", {}).items():
        entry: dict[str, Any] = {
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": a["DataType"],
        }
        if "BinaryValue" in a:
            entry["binaryValue"] = base64.b64encode(a["BinaryValue"]).decode()
        else:
            entry["stringValue"] = a["StringValue"]
        attributes[name] = entry
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": message.get("Attributes", {}),
        "messageAttributes": attributes,
        "md5OfBody": message["MD5OfBody"],
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": "us-east-1",
    }


async def test_an_app_sees_the_same_message_on_the_server_and_in_lambda(
    sqs: SqsTransport,
) -> None:
    name, url = await new_queue(sqs)
    sent = [
        ([(b"trace", b"1"), (b"trace", b"2")], b"\x00\xff binary"),
        ([(b"n", b"5"), (b"bin", b"\x01\x02")], None),
        ([], b"plain"),
    ]
    for headers, payload in sent:
        await sqs.publish(name, headers, payload, {"sqs": {"attribute_types": {"n": "Number"}}})
    raw = await receive_all(sqs, url, len(sent))
    arn = f"arn:aws:sqs:us-east-1:123456789012:{name}"
    for m in raw:  # moto's md5 is the one Lambda passes on
        assert m["MD5OfBody"] == hashlib.md5(m["Body"].encode()).hexdigest()
    app = Recorder()
    result = await SqsHandler(app, handle_sigterm=False).handle(
        {"Records": [lambda_record(m, arn) for m in raw]}
    )
    assert result == {"batchItemFailures": []}
    got = {r.payload: r.headers for r in app.received}
    assert got == {payload: headers for headers, payload in sent}
    assert app.scopes[0]["address"] == name


async def test_message_send_from_handlers_reaches_sqs(sqs: SqsTransport) -> None:
    name, url = await new_queue(sqs)
    app = Recorder()
    app.sends = [(name, [(b"from", b"lambda")], b"reply", {"sqs": {"delay_seconds": 0}})]
    # The default publisher: SQS from the function's environment.
    sqs_handler = SqsHandler(app, handle_sigterm=False)
    event = json.loads((FIXTURES / "sqs_standard.json").read_text())
    assert await sqs_handler.handle(event) == {"batchItemFailures": []}
    await sqs_handler.aclose()
    # A Kafka-triggered function sending to SQS.
    kafka_handler = KafkaHandler(
        app, handle_sigterm=False, publisher=SqsTransport([], SqsOptions(endpoint_url=ENDPOINT))
    )
    msk = json.loads((FIXTURES / "self_managed_kafka.json").read_text())
    await kafka_handler.handle(msk)
    await kafka_handler.aclose()
    got = await receive_all(sqs, url, 4)
    assert len(got) == 4  # one send per record: 3 SQS records + 1 Kafka record
    assert {m["Body"] for m in got} == {"reply"}
    assert got[0]["MessageAttributes"]["from"]["StringValue"] == "lambda"


async def test_a_failed_send_raises_the_send_error_into_the_app() -> None:
    errors: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        event = await receive()
        try:
            await send({"type": "message.send", "address": "no-such-queue-x", "headers": []})
        except OSError as exc:
            errors.append(exc)
            await send({"type": "message.nack", "id": event["id"], "message": str(exc)})

    event = json.loads((FIXTURES / "sqs_standard.json").read_text())
    handler = SqsHandler(app, handle_sigterm=False)
    try:
        result = await handler.handle(event)
    finally:
        await handler.aclose()  # its publisher, kept for the next invocation
    assert len(result["batchItemFailures"]) == 3
    assert "does not exist" in str(errors[0])


def test_sigterm_runs_lifespan_shutdown_once(tmp_path: Path) -> None:
    script = tmp_path / "container.py"
    record = tmp_path / "record.txt"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, os, signal, sys
            from amgi.serverless import SqsHandler

            async def app(scope, receive, send):
                with open({str(record)!r}, "a") as f:
                    if scope["type"] == "lifespan":
                        while True:
                            event = await receive()
                            f.write(event["type"] + "\\n"); f.flush()
                            kind = event["type"] + ".complete"
                            await send({{"type": kind}})
                            if event["type"] == "lifespan.shutdown":
                                return
                    event = await receive()
                    f.write("message\\n")
                    await send({{"type": "message.ack", "id": event["id"]}})

            handler = SqsHandler(app)
            event = json.load(open({str(FIXTURES / "sqs_standard.json")!r}))
            event["Records"] = event["Records"][:1]
            for _ in range(2):
                assert handler(event, None) == {{"batchItemFailures": []}}
            os.kill(os.getpid(), signal.SIGTERM)
            print("not reached")
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert done.returncode == 0, done.stderr
    assert "not reached" not in done.stdout
    assert record.read_text().split() == [
        "lifespan.startup",
        "message",
        "message",
        "lifespan.shutdown",
    ]


@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_during_an_invocation_waits_for_its_end(tmp_path: Path, signals: int) -> None:
    """One SIGTERM during an invocation: it ends, lifespan shutdown runs, exit 0 (it used
    to exit at once, the lifespan call destroyed pending). A second one exits at once."""
    script = tmp_path / "container.py"
    record = tmp_path / "record.txt"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, json, os, signal
            from amgi.serverless import SqsHandler

            def note(line):
                with open({str(record)!r}, "a") as f:
                    f.write(line + "\\n")

            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    await receive()
                    await send({{"type": "lifespan.startup.complete"}})
                    await receive()
                    note("shutdown")
                    await send({{"type": "lifespan.shutdown.complete"}})
                    return
                event = await receive()
                for _ in range({signals}):
                    os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(0.2)
                await send({{"type": "message.ack", "id": event["id"]}})
                note("acked")

            handler = SqsHandler(app)
            event = json.load(open({str(FIXTURES / "sqs_standard.json")!r}))
            event["Records"] = event["Records"][:1]
            handler(event, None)
            print("not reached")
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert done.returncode == 0, done.stderr
    assert "not reached" not in done.stdout
    if signals == 1:
        assert record.read_text().split() == ["acked", "shutdown"]
        assert "destroyed but it is pending" not in done.stderr
    else:
        assert not record.exists(), "a second SIGTERM waits for nothing"


async def test_content_that_does_not_decode_stops_neither_the_server_nor_lambda(
    sqs: SqsTransport,
) -> None:
    name, url = await new_queue(sqs)
    for i in range(3):
        attributes = {}
        if i == 1:  # another producer's attribute of our name, not packed headers
            attributes = {"amgi-headers": {"DataType": "String", "StringValue": "hello"}}
        await sqs.client.send_message(
            QueueUrl=url, MessageBody=f"m{i}", MessageAttributes=attributes
        )
    # Lambda fails that record alone; the others reach the app.
    raw = await receive_all(sqs, url, 3)
    arn = f"arn:aws:sqs:us-east-1:123456789012:{name}"
    app = Recorder()
    handler = SqsHandler(app, handle_sigterm=False)
    result = await handler.handle({"Records": [lambda_record(m, arn) for m in raw]})
    bad = next(m["MessageId"] for m in raw if m["Body"] == "m1")
    assert result == {"batchItemFailures": [{"itemIdentifier": bad}]}
    assert sorted(app.payloads()) == [b"m0", b"m2"]  # type: ignore[type-var]
    # The SQS server delivers it as it arrived (its fetch used to fail on it, every time).
    for m in raw:
        await sqs.client.change_message_visibility(
            QueueUrl=url, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0
        )
    server = SqsTransport([name], SqsOptions(endpoint_url=ENDPOINT, wait_time=1))
    await server.connect()
    try:
        delivered = []
        deadline = time.monotonic() + 15
        while len(delivered) < 3 and time.monotonic() < deadline:
            for batch in await server.fetch():
                delivered.extend(batch.messages)
    finally:
        await server.close()
    by_body = {m.payload: m for m in delivered}
    assert set(by_body) == {b"m0", b"m1", b"m2"}
    assert by_body[b"m1"].headers == [(b"amgi-headers", b"hello")]


async def test_retry_false_sends_the_message_to_the_dead_letter_queue_at_once(
    sqs: SqsTransport,
) -> None:
    name, url = await new_queue(sqs)
    dlq, dlq_url = await new_queue(sqs)
    await sqs.publish(name, [(b"n", b"7")], b"bad", {"sqs": {"attribute_types": {"n": "Number"}}})
    (raw,) = await receive_all(sqs, url, 1)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        assert "message.nack.retry" in scope["extensions"]
        event = await receive()
        nack = {"type": "message.nack", "id": event["id"], "message": "bad schema"}
        await send(nack | {"retry": False})

    handler = SqsHandler(app, handle_sigterm=False, dead_letter_address=dlq)
    arn = f"arn:aws:sqs:us-east-1:123456789012:{name}"
    try:
        result = await handler.handle({"Records": [lambda_record(raw, arn)]})
    finally:
        await handler.aclose()
    assert result == {"batchItemFailures": []}, "not redelivered: Lambda deletes it"
    (dead,) = await receive_all(sqs, dlq_url, 1)
    assert dead["Body"] == "bad"
    attributes = dead["MessageAttributes"]
    assert attributes["amgi-dead-letter-reason"]["StringValue"] == "bad schema"
    assert attributes["amgi-original-address"]["StringValue"] == name
    assert attributes["n"] == {"DataType": "Number", "StringValue": "7"}


def failing_startup_app(received: list[bytes]) -> Any:
    """An app whose lifespan startup fails (its database is down); it acks messages."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.failed", "message": "database down"})
            return
        event = await receive()
        received.append(event["payload"])
        await send({"type": "message.ack", "id": event["id"]})

    return app


async def invoke_like_lambda(
    sqs: SqsTransport, url: str, arn: str, handler: SqsHandler, n: int, context: Any = None
) -> None:
    """One receive of ``n`` messages and one invocation, settled as Lambda does: a raised
    error returns the whole batch, else the records not reported are deleted; what
    returns is made visible at once (its visibility timeout, cut short)."""
    raw = sorted(await receive_all(sqs, url, n), key=lambda m: m["Body"])
    assert len(raw) == n
    try:
        event = {"Records": [lambda_record(m, arn) for m in raw]}
        result = await handler.handle(event, context)
        failed = {f["itemIdentifier"] for f in result["batchItemFailures"]}
    except Exception:
        failed = {m["MessageId"] for m in raw}
    for m in raw:
        if m["MessageId"] in failed:
            await sqs.client.change_message_visibility(
                QueueUrl=url, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0
            )
        else:
            await sqs.client.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


async def queue_with_redrive(sqs: SqsTransport, max_receives: int) -> tuple[str, str, str]:
    """A queue (name, URL) whose redrive policy dead-letters to another (URL)."""
    dlq, dlq_url = await new_queue(sqs)
    name = f"lambda-{uuid.uuid4().hex[:10]}"
    redrive = json.dumps(
        {
            "deadLetterTargetArn": f"arn:aws:sqs:us-east-1:123456789012:{dlq}",
            "maxReceiveCount": max_receives,
        }
    )
    attributes = {"RedrivePolicy": redrive}
    url = (await sqs.client.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"]
    return name, url, dlq_url


async def test_a_record_the_app_never_had_is_not_dead_lettered_at_the_deadline(
    sqs: SqsTransport,
) -> None:
    """The app hangs on its first record until the deadline, so it never receives the
    second: that one goes back to the queue uncharged, not to the redrive policy's
    dead-letter queue with the culprit (it used to, on its last receive)."""
    name, url, dlq_url = await queue_with_redrive(sqs, 1)
    arn = f"arn:aws:sqs:us-east-1:123456789012:{name}"
    for body in ("1-slow", "2-innocent"):
        await sqs.client.send_message(QueueUrl=url, MessageBody=body)
    received: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        while True:
            event = await receive()
            received.append(event["payload"])
            if event["payload"] == b"1-slow":
                await asyncio.sleep(30)  # only the deadline ends this call
            await send({"type": "message.ack", "id": event["id"]})

    config = RuntimeConfig(retry_delay_max=1)  # the copy's delay
    # A wide margin: half of it sends the copy back (a client is made first), under load.
    handler = SqsHandler(app, handle_sigterm=False, deadline_margin=4.0, config=config)
    try:
        await invoke_like_lambda(sqs, url, arn, handler, 2, Context(5.0))
        assert received == [b"1-slow"]
        # The next receive: the culprit is dead-lettered, the innocent one comes back.
        (again,) = await receive_all(sqs, url, 1)
        assert again["Body"] == "2-innocent"
    finally:
        await handler.aclose()
    dead = await receive_all(sqs, dlq_url, 1)
    assert [m["Body"] for m in dead] == ["1-slow"]


def broken_handler_app(received: list[bytes]) -> Any:
    """A typed app whose handler cannot be called (two payload parameters), which it
    finds at its first message when there is no lifespan: it raises StartupFailed."""
    from amgi.app import App

    app = App()

    @app.subscriber("orders")
    async def handle(first: bytes, second: bytes) -> None:
        received.append(first)

    return app


@pytest.mark.parametrize(
    ("make_app", "lifespan"),
    [(failing_startup_app, "auto"), (broken_handler_app, "off")],
    ids=["lifespan-startup", "first-message-without-lifespan"],
)
async def test_a_failing_startup_dead_letters_nothing(
    sqs: SqsTransport, make_app: Any, lifespan: Any
) -> None:
    """Startup fails on every invocation (at the lifespan startup, or at the app's first
    message when it has none): the messages, which never reached the app, do not end in
    the redrive policy's dead-letter queue (they used to after maxReceiveCount
    invocations), and reach the app once it starts."""
    name, url, dlq_url = await queue_with_redrive(sqs, 2)
    arn = f"arn:aws:sqs:us-east-1:123456789012:{name}"
    for payload in (b"a", b"\xff"):  # the copy keeps its headers and encoding
        await sqs.publish(name, [(b"k", b"v")], payload, {})
    received: list[bytes] = []
    handler = SqsHandler(
        make_app(received),
        handle_sigterm=False,
        config=RuntimeConfig(retry_delay_max=1, lifespan=lifespan),  # the copies' delay
    )
    try:
        for _ in range(4):
            await invoke_like_lambda(sqs, url, arn, handler, 2)
    finally:
        await handler.aclose()
    assert received == []
    dead = await sqs.client.receive_message(QueueUrl=dlq_url, WaitTimeSeconds=0)
    assert dead.get("Messages", []) == [], "dead-lettered for the app's startup failure"
    app = Recorder()
    handler = SqsHandler(app, handle_sigterm=False)
    await invoke_like_lambda(sqs, url, arn, handler, 2)
    await handler.aclose()
    assert sorted(app.payloads()) == [b"a", b"\xff"]  # type: ignore[type-var]
    assert [r.headers for r in app.received] == [[(b"k", b"v")]] * 2


@pytest.mark.parametrize("kind", ["sqs", "kafka"])
def test_sigterm_gives_a_running_invocation_shutdown_timeout(tmp_path: Path, kind: str) -> None:
    """A SIGTERM during an invocation gives what runs ``shutdown_timeout``, then cancels
    it: nothing is acked after that, lifespan shutdown runs, exit 0 (the container used
    to wait for the slow call to end, far past the host's kill). On Kafka, a record the
    app nacked is not dead-lettered for the shutdown: the invocation fails instead."""
    script = tmp_path / "container.py"
    record = tmp_path / "record.txt"
    fixture = FIXTURES / ("sqs_standard.json" if kind == "sqs" else "self_managed_kafka.json")
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, json, os, signal
            from amgi.runtime import RuntimeConfig
            from amgi.serverless import KafkaHandler, SqsHandler
            from tests.serverless.helpers import Capture

            def note(line):
                with open({str(record)!r}, "a") as f:
                    f.write(line + "\\n")

            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    await receive()
                    await send({{"type": "lifespan.startup.complete"}})
                    await receive()
                    note("shutdown")
                    await send({{"type": "lifespan.shutdown.complete"}})
                    return
                event = await receive()
                if event["bindings"]["amgi"]["attempt"] == 1:
                    await send({{"type": "message.nack", "id": event["id"], "message": "x"}})
                    return
                os.kill(os.getpid(), signal.SIGTERM)
                try:
                    await asyncio.sleep(20)
                except asyncio.CancelledError:
                    note("cancelled")
                    raise
                await send({{"type": "message.ack", "id": event["id"]}})
                note("acked")

            dead = Capture()
            config = RuntimeConfig(shutdown_timeout=0.5, retry_delay=0.1)
            handler = {"SqsHandler" if kind == "sqs" else "KafkaHandler"}(
                app, config=config, publisher=dead, dead_letter_address="dead"
            )
            event = json.load(open({str(fixture)!r}))
            if {kind == "sqs"}:
                event["Records"] = event["Records"][:1]
                event["Records"][0]["attributes"]["ApproximateReceiveCount"] = "2"
            try:
                handler(event, None)
            finally:
                note("dead-lettered" if dead.sent else "nothing dead-lettered")
            """
        )
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert done.returncode == 0, done.stderr
    assert record.read_text().split() == ["cancelled", "shutdown", "nothing", "dead-lettered"]
    assert time.monotonic() - start < 15, "not held until the call's own end"
