"""Tracing through a real RabbitMQ: the sender's trace reaches the consumer span, the
app's message.send (a producer span) and the outgoing headers; checked with the
OpenTelemetry SDK's in-memory exporter. And tracing that is off imports nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import propagate
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from amgi.ops.tracing import instrument
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.amqp import AmqpOptions, AmqpTransport
from amgi.transport import Message
from tests.ops.helpers import ROOT
from tests.servers.test_amqp_support import URL, rabbitmq

__all__ = ["rabbitmq"]

pytestmark = [pytest.mark.usefixtures("rabbitmq"), pytest.mark.timeout(60)]


def hexed(span_id: int) -> str:
    return f"{span_id:016x}"


async def fetch_n(t: AmqpTransport, n: int) -> list[Message]:
    found: list[Message] = []
    async with asyncio.timeout(20):
        while len(found) < n:
            for batch in await t.fetch():
                found += batch.messages
    return found


async def test_trace_flows_from_sender_through_consumer_to_the_apps_send(
    amqp_queue: Callable[[], str],
) -> None:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("sender")
    inbox, outbox = amqp_queue(), amqp_queue()
    options = AmqpOptions(url=URL, batch_size=10, linger=0.05)

    declare = AmqpTransport([inbox, outbox], options)  # declares both queues
    await declare.connect()
    await declare.close()
    sender = AmqpTransport([], options)
    await sender.connect()
    with tracer.start_as_current_span("request") as root:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        traced_headers = [(k.encode(), v.encode()) for k, v in carrier.items()]
    await sender.publish(inbox, [(b"kind", b"traced"), *traced_headers], b"one", {})
    await sender.publish(inbox, [(b"kind", b"plain")], b"two", {})
    await sender.publish(inbox, [], b"bad", {})
    await sender.close()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        more = True
        while more:
            m = await receive()
            if m["payload"] == b"bad":
                await send({"type": "message.nack", "id": m["id"], "message": "refused"})
            else:
                event = {"type": "message.send", "address": outbox, "payload": m["payload"]}
                await send({**event, "headers": [(b"from", m["payload"])]})
                await send({"type": "message.ack", "id": m["id"]})
            more = m.get("more_messages", False)

    consumer = AmqpTransport([inbox], options)
    runtime = Runtime(
        instrument(app, "amqp", tracer_provider=provider),
        consumer,
        RuntimeConfig(lifespan="off", max_attempts=1),
    )
    served = asyncio.create_task(runtime.serve())
    reader = AmqpTransport([outbox], options)
    await reader.connect()
    try:
        out = await fetch_n(reader, 2)
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(served, 30) == 0
        await reader.close()

    spans: list[ReadableSpan] = list(exporter.get_finished_spans())
    ctx = root.get_span_context()

    by_payload = {dict(m.headers)[b"from"]: m for m in out}
    consumer_spans = [s for s in spans if "messaging.message.id" in (s.attributes or {})]
    assert len(consumer_spans) == 3
    traced = next(
        s for s in consumer_spans if s.context is not None and s.context.trace_id == ctx.trace_id
    )
    assert traced.kind is SpanKind.CONSUMER
    assert traced.name == f"process {inbox}"
    assert traced.parent is not None
    assert traced.parent.span_id == ctx.span_id
    assert traced.attributes is not None
    assert traced.attributes["messaging.system"] == "rabbitmq"
    assert traced.attributes["messaging.destination.name"] == inbox
    assert traced.attributes["amgi.attempt"] == 1
    assert traced.status.status_code is not StatusCode.ERROR

    producer = [s for s in spans if s.kind is SpanKind.PRODUCER]
    assert len(producer) == 2
    child = next(s for s in producer if s.parent and s.parent.span_id == traced.context.span_id)
    assert child.name == f"send {outbox}"
    assert child.context is not None
    assert child.context.trace_id == ctx.trace_id
    sent = dict(by_payload[b"one"].headers)
    assert (
        sent[b"traceparent"]
        .decode()
        .startswith(f"00-{ctx.trace_id:032x}-{hexed(child.context.span_id)}-")
    )
    assert sent[b"from"] == b"one"  # the app's own headers are kept

    batch_spans = [s for s in spans if "messaging.batch.message_count" in (s.attributes or {})]
    assert sum(s.attributes["messaging.batch.message_count"] for s in batch_spans) == 3  # type: ignore[index,misc]
    links = [link.context.span_id for s in batch_spans for link in s.links]
    assert links == [ctx.span_id], "only the traced message has a context to link"
    refused = [s for s in consumer_spans if s.status.status_code is StatusCode.ERROR]
    assert len(refused) == 1
    assert refused[0].status.description == "refused"
    (plain_consumer,) = [s for s in consumer_spans if s is not traced and s not in refused]
    assert plain_consumer.parent is not None
    assert plain_consumer.parent.span_id in {s.context.span_id for s in batch_spans if s.context}
    plain_send = next(s for s in producer if s is not child)
    assert plain_send.parent is not None
    assert plain_send.parent.span_id == plain_consumer.context.span_id  # type: ignore[union-attr]
    assert dict(by_payload[b"two"].headers)[b"traceparent"].decode().split("-")[1] == (
        f"{plain_consumer.context.trace_id:032x}"  # type: ignore[union-attr]
    )


def test_tracing_and_metrics_off_import_nothing() -> None:
    code = (
        "import sys\n"
        "from amgi.cli import main\n"
        "from amgi.ops.config import OpsConfig\n"
        "from amgi.ops.run import prepare\n"
        "async def app(scope, receive, send): pass\n"
        "ops = prepare(OpsConfig(), app, 'sqlite')\n"
        "assert ops.app is app and ops.metrics is None and ops.sock is None\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in "
        "('opentelemetry', 'prometheus_client')]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_auto_tracing_follows_a_configured_provider() -> None:
    code = (
        "from amgi.ops.run import tracing_enabled\n"
        "from opentelemetry import trace\n"
        "assert not tracing_enabled('auto')\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "trace.set_tracer_provider(TracerProvider())\n"
        "assert tracing_enabled('auto') and not tracing_enabled('off')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


TRACED_APP = """
import json, os
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult


class ToFile(SpanExporter):
    def export(self, spans):
        with open(os.environ["SPANS"], "a") as f:
            for s in spans:
                parent = s.parent.span_id if s.parent else None
                f.write(json.dumps([s.name, s.kind.name, s.context.trace_id, parent]) + "\\n")
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(ToFile()))
trace.set_tracer_provider(provider)


async def app(scope, receive, send):
    if scope["type"] != "message":
        return
    m = await receive()
    await send({"type": "message.ack", "id": m["id"]})
"""


def test_amgi_run_traces_when_the_app_configures_a_provider(tmp_path: Path) -> None:
    import json
    import os
    import signal

    from tests.ops.helpers import amgi, until

    (tmp_path / "traced.py").write_text(TRACED_APP)
    spans = tmp_path / "spans.jsonl"
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    sent = amgi(
        "send", "q", "x", "--header", f"traceparent=00-{trace_id}-{parent}-01", cwd=tmp_path
    )
    assert sent.returncode == 0, sent.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", "traced:app", "q", "--lifespan", "off"],
        cwd=tmp_path,
        env={**os.environ, "SPANS": str(spans)},
        stderr=subprocess.DEVNULL,
    )
    try:
        until(lambda: spans.exists() and len(spans.read_text().splitlines()) >= 2, 30, "spans")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    recorded = [json.loads(line) for line in spans.read_text().splitlines()]
    consumer = [r for r in recorded if r[0] == "process q" and r[3] == int(parent, 16)]
    assert len(consumer) == 1, recorded
    assert consumer[0][1] == "CONSUMER"
    assert consumer[0][2] == int(trace_id, 16)


async def test_a_relay_forwards_one_trace_context_and_the_baggage() -> None:
    """An app that forwards what it received (a relay) sends one traceparent, its own
    producer span's, whatever the case or pair type of the one it forwarded (the stale
    one stayed beside the new one, and came first); the incoming W3C baggage is the
    app's current baggage and travels on (it was dropped)."""
    from opentelemetry import baggage

    from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("sender").start_as_current_span("request"):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    stale = carrier["traceparent"].encode()
    name = "tracing-relay"
    broker = MemoryBroker.reset(name)
    broker.put("in", [(b"Traceparent", stale), (b"baggage", b"tenant=acme")], b"upper")
    broker.put("in", [(b"traceparent", stale), (b"BAGGAGE", b"tenant=beta")], b"list")
    seen: list[object] = []

    async def relay(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        more = True
        while more:
            m = await receive()
            seen.append(baggage.get_baggage("tenant"))
            headers = m["headers"]
            if m["payload"] == b"list":
                headers = [[n, v] for n, v in headers]  # what JSON-decoded headers look like
            await send(
                {"type": "message.send", "address": "out", "headers": headers, "payload": b"x"}
            )
            await send({"type": "message.ack", "id": m["id"]})
            more = m.get("more_messages", False)

    transport = MemoryTransport(["in"], MemoryOptions(broker=name, batch_size=1))
    runtime = Runtime(
        instrument(relay, "memory", tracer_provider=provider),
        transport,
        RuntimeConfig(lifespan="off"),
    )
    served = asyncio.create_task(runtime.serve())
    try:
        async with asyncio.timeout(10):
            while len(broker.queue("out")) < 2:
                await asyncio.sleep(0.01)
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(served, 10) == 0
    assert seen == ["acme", "beta"]
    producers = {
        hexed(s.context.span_id): s
        for s in exporter.get_finished_spans()
        if s.kind is SpanKind.PRODUCER and s.context is not None
    }
    for message in broker.queue("out"):
        names = [n.lower() for n, _ in message.headers]
        assert names.count(b"traceparent") == 1, message.headers
        assert names.count(b"baggage") == 1, message.headers
        parent = dict((n.lower(), v) for n, v in message.headers)[b"traceparent"]
        assert parent != stale
        assert parent.decode().split("-")[2] in producers
    assert sorted(
        dict((n.lower(), v) for n, v in m.headers)[b"baggage"] for m in broker.queue("out")
    ) == [
        b"tenant=acme",
        b"tenant=beta",
    ]


async def test_a_send_without_headers_is_refused_traced_or_not() -> None:
    """Tracing filled in the headers of a message.send that had none, so the send the
    spec refuses went through when tracing was on."""
    from amgi.testing import message, run_batch

    outcomes: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        m = await receive()
        try:
            await send({"type": "message.send", "address": "a", "payload": b"x"})
            outcomes.append("sent")
        except Exception as exc:  # the runtime's InvalidEvent
            outcomes.append(type(exc).__name__)
        await send({"type": "message.ack", "id": m["id"]})

    for candidate in (app, instrument(app, "memory", tracer_provider=TracerProvider())):
        result = await run_batch(candidate, [message(b"x")])
        assert result.sent == []
    assert outcomes == ["InvalidEvent", "InvalidEvent"]


def _memory_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_an_app_that_receives_in_its_own_tasks_logs_no_context_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The end of the call detached the context attached by the first receive(), made in
    the app's child task: OpenTelemetry logged "Failed to detach context" on every batch."""
    from amgi.testing import message, run_batch

    async def handle(receive: Any, send: Any) -> None:
        m = await receive()
        await send({"type": "message.ack", "id": m["id"]})

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(handle(receive, send))
            tasks.create_task(handle(receive, send))

    provider, exporter = _memory_provider()
    result = await run_batch(instrument(app, "memory", provider), [message(b"x"), message(b"y")])
    assert sorted(result.acked) == ["1", "2"]
    assert "Failed to detach context" not in caplog.text
    statuses = [s.status.status_code for s in exporter.get_finished_spans()]
    assert statuses == [StatusCode.UNSET] * 3, "two message spans and the batch span"


async def test_an_app_that_raises_marks_its_batch_span_failed() -> None:
    """The batch span of a call that raised ended as if all went well: the exception was
    on no span at all."""
    from amgi.testing import message, run_batch

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise RuntimeError("boom")

    provider, exporter = _memory_provider()
    await run_batch(instrument(app, "memory", provider), [message(b"x")])
    batch = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert len(batch) == 1
    assert batch[0].status.status_code == StatusCode.ERROR
    assert batch[0].status.description == "RuntimeError: boom"
    assert [e.name for e in batch[0].events] == ["exception"]
