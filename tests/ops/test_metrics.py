"""Metrics and probes: a real ``amgi run`` scraped by ``promtool`` and a real Prometheus
server, and ``/readyz`` flipping to not-ready while the runtime drains."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from amgi.ops.config import OpsConfig
from amgi.ops.run import prepare, serve
from amgi.ops.semconv import messaging_system
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport
from amgi.transport import Transport
from tests.apps import send_all
from tests.net import free_port
from tests.ops.helpers import ROOT, amgi, get, until, write_app

pytestmark = pytest.mark.timeout(90)


def _ensure_prometheus() -> None:
    if shutil.which("promtool") is None or shutil.which("prometheus") is None:
        subprocess.run(["bash", "scripts/brokers/prometheus.sh"], cwd=ROOT, check=True)


def _promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` of an exposition."""
    _ensure_prometheus()
    return subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the series ``name{labels}`` in a Prometheus text exposition."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{labels} in the exposition")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, int, subprocess.Popen[bytes]]]:
    """``amgi run`` on the SQLite server with --metrics-port; yields (folder, port, proc)."""
    write_app(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", "opsapp:app", "q", "--metrics-port", str(port),
         "--metrics-host", "127.0.0.1", "--max-attempts", "2", "--retry-delay", "0",
         "--poll-interval", "0.02"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "STARTED": str(tmp_path / "started")},
        stderr=open(tmp_path / "amgi.err", "w"),  # noqa: SIM115
    )  # fmt: skip
    try:
        until(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200 if _up(port) else False,
              30, "the server to be ready")  # fmt: skip
        yield tmp_path, port, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, (tmp_path / "amgi.err").read_text()


def _up(port: int) -> bool:
    from tests.net import port_open

    return port_open(port)


def test_metrics_pass_promtool_and_a_real_prometheus_scrapes_the_acked_count(
    served: tuple[Path, int, subprocess.Popen[bytes]],
) -> None:
    _ensure_prometheus()
    folder, port, _ = served
    for i in range(5):
        assert amgi("send", "q", f"good {i}", cwd=folder).returncode == 0
    assert amgi("send", "q", "bad", cwd=folder).returncode == 0
    url = f"http://127.0.0.1:{port}/metrics"

    def settled() -> bool:
        text = get(url)[1]
        try:
            return sample(text, "amgi_messages_dead_lettered_total") == 1
        except AssertionError:
            return False

    until(settled, 30, "the bad message to be dead-lettered")
    status, text = get(url)
    assert status == 200
    labels = {"messaging_system": "sqlite", "messaging_destination_name": "q"}
    assert sample(text, "amgi_messages_acked_total", **labels) == 5
    assert sample(text, "amgi_messages_retried_total", **labels) == 1
    assert sample(text, "amgi_messages_nacked_total", **labels) == 2
    assert sample(text, "messaging_client_consumed_messages_total", **labels) == 7
    assert sample(text, "amgi_batches_in_flight", messaging_system="sqlite") == 0
    assert sample(text, "messaging_process_duration_seconds_count", **labels) >= 2
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr

    prom_port = free_port()
    config = folder / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: amgi\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n"
    )
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "prometheus.log", "w"),  # noqa: SIM115
    )  # fmt: skip
    try:
        query = urllib.parse.quote('sum(amgi_messages_acked_total{messaging_destination_name="q"})')
        api = f"http://127.0.0.1:{prom_port}/api/v1/query?query={query}"
        answer: dict[str, object] = {}

        def scraped() -> bool:
            nonlocal answer
            if not _up(prom_port):
                return False
            status, body = get(api)
            answer = json.loads(body) if status == 200 else {}
            return bool(answer.get("data", {}).get("result"))  # type: ignore[attr-defined]

        until(scraped, 45, "Prometheus to scrape the amgi server")
        result = answer["data"]["result"]  # type: ignore[index]
        assert float(result[0]["value"][1]) == 5
    finally:
        prometheus.terminate()
        prometheus.wait(30)


def test_probes_and_404(served: tuple[Path, int, subprocess.Popen[bytes]]) -> None:
    _, port, _ = served
    assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
    assert get(f"http://127.0.0.1:{port}/readyz") == (200, "ready\n")
    assert get(f"http://127.0.0.1:{port}/nothing")[0] == 404


async def test_readyz_is_not_ready_while_draining() -> None:
    broker = MemoryBroker.reset("readyz")
    broker.put("q", [], b"slow")
    entered = asyncio.Event()
    release = asyncio.Event()

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] != "message":
            return
        message = await receive()  # type: ignore[operator]
        entered.set()
        await release.wait()
        await send({"type": "message.ack", "id": message["id"]})  # type: ignore[operator]

    ops = prepare(OpsConfig(metrics_port=0, metrics_host="127.0.0.1"), app, "memory")
    assert ops.sock is not None
    port = ops.sock.getsockname()[1]
    transport = MemoryTransport(["q"], MemoryOptions(broker="readyz"))
    runtime = Runtime(ops.app, transport, RuntimeConfig(lifespan="off"), metrics=ops.metrics)
    served = asyncio.create_task(serve(runtime, ops))
    try:
        await asyncio.wait_for(entered.wait(), 10)
        url = f"http://127.0.0.1:{port}"
        assert await asyncio.to_thread(get, url + "/readyz") == (200, "ready\n")
        text = (await asyncio.to_thread(get, url + "/metrics"))[1]
        assert sample(text, "amgi_batches_in_flight") == 1
        runtime.request_stop()
        assert await asyncio.to_thread(get, url + "/readyz") == (503, "not ready: draining\n")
        assert await asyncio.to_thread(get, url + "/healthz") == (200, "ok\n")
        release.set()
        assert await asyncio.wait_for(served, 10) == 0
    finally:
        release.set()
        if not served.done():
            runtime.request_stop()
            await served
    assert broker.pending("q") == 0
    assert not _up(port), "the listener outlived the runtime"


async def lag_shows_and_drains(transport: Transport, address: str, n: int) -> None:
    """Serve ``transport`` (``n`` messages waiting on ``address``) with metrics on and an
    app that holds its first batch: the lag gauge must show a backlog; once the app acks
    everything, it must drain to zero."""
    release = asyncio.Event()
    acked = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal acked
        if scope["type"] != "message":
            return
        await release.wait()
        more = True
        while more:
            m = await receive()
            await send({"type": "message.ack", "id": m["id"]})
            acked += 1
            more = m.get("more_messages", False)

    ops = prepare(OpsConfig(metrics_port=0, metrics_host="127.0.0.1"), app, transport.name)
    assert ops.sock is not None
    url = f"http://127.0.0.1:{ops.sock.getsockname()[1]}/metrics"
    runtime = Runtime(
        ops.app, transport, RuntimeConfig(lifespan="off", concurrency=1), metrics=ops.metrics
    )
    served = asyncio.create_task(serve(runtime, ops))
    system = messaging_system(transport.name)
    labels = {"messaging_system": system, "messaging_destination_name": address}

    async def lag() -> float | None:
        text = (await asyncio.to_thread(get, url))[1]
        try:
            return sample(text, "amgi_consumer_lag_messages", **labels)
        except AssertionError:
            return None

    try:
        async with asyncio.timeout(30):
            while not (await lag() or 0) > 0:
                await asyncio.sleep(0.1)
        release.set()
        async with asyncio.timeout(30):
            while acked < n or await lag() != 0:
                await asyncio.sleep(0.1)
    finally:
        release.set()
        runtime.request_stop()
        assert await asyncio.wait_for(served, 30) == 0


async def test_kafka_consumer_lag_is_reported_and_drains_to_zero() -> None:
    from amgi.servers.kafka import KafkaOptions, KafkaTransport
    from tests.servers.kafka_helpers import create_topic, ensure_broker, fresh, options, produce

    ensure_broker()
    topic = create_topic(fresh("lag"), partitions=1)
    for i in range(30):  # one record per produce: one record batch each
        produce(topic, [(None, b"%d" % i, [])])
    transport = KafkaTransport([topic], KafkaOptions(**options(max_batch_size=2)))
    await lag_shows_and_drains(transport, topic, 30)


async def test_redis_consumer_lag_is_reported_and_drains_to_zero() -> None:
    from amgi.servers.redis import RedisOptions, RedisTransport
    from tests.servers.redis_helpers import URL, ensure_broker, fresh

    ensure_broker()
    stream = fresh("lag")
    sender = RedisTransport([], RedisOptions(url=URL))
    await send_all(sender, ((stream, b"%d" % i) for i in range(30)))
    transport = RedisTransport([stream], RedisOptions(url=URL, batch_size=2, block=0.1))
    await lag_shows_and_drains(transport, stream, 30)


async def test_nats_consumer_lag_is_reported_and_drains_to_zero() -> None:
    from amgi.servers.nats import NatsOptions, NatsTransport
    from tests.servers.nats_helpers import PREFIX, URL, ensure_broker, ensure_stream, fresh

    ensure_broker()
    await ensure_stream()
    subject = f"{PREFIX}.{fresh('lag')}"
    sender = NatsTransport([], NatsOptions(servers=URL))
    await send_all(sender, ((subject, b"%d" % i) for i in range(30)))
    options = NatsOptions(servers=URL, durable=fresh("lag"), batch_size=2, fetch_expiry=0.2)
    await lag_shows_and_drains(NatsTransport([subject], options), subject, 30)


async def test_sqs_queue_depth_is_reported_and_drains_to_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from amgi.servers.sqs import SqsOptions, SqsTransport
    from tests.moto_env import ENDPOINT, use_moto_credentials

    use_moto_credentials(monkeypatch)
    queue = f"lag-{uuid.uuid4().hex[:12]}"
    sender = SqsTransport([], SqsOptions(endpoint_url=ENDPOINT))
    await sender.connect()
    try:
        await sender.client.create_queue(QueueName=queue)
        for i in range(0, 40, 10):
            await asyncio.gather(
                *(sender.publish(queue, [], b"%d" % j, {}) for j in range(i, i + 10))
            )
    finally:
        await sender.close()
    # Two long polls of up to 10 messages run beside the held batch: 20 or more stay visible.
    monkeypatch.setattr("amgi.servers.sqs.DEPTH_EVERY", 0.5)  # re-read sooner than every 5 s
    options = SqsOptions(endpoint_url=ENDPOINT, wait_time=1, max_messages=10, receivers=2)
    await lag_shows_and_drains(SqsTransport([queue], options), queue, 40)


async def test_listener_answers_bad_requests_and_head() -> None:
    from amgi.ops.listener import OpsListener, bind

    (sock,) = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    listener = OpsListener([sock], lambda: None)  # probes only: no /metrics

    async def ask(request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        writer.write_eof()
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer

    await listener.start()
    try:
        assert (await ask(b"POST /healthz HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
        head = await ask(b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert head.endswith(b"\r\n\r\n"), "HEAD has no body"
        assert (await ask(b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        huge = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 10_000 + b"\r\n\r\n"
        assert (await ask(huge)).startswith(b"HTTP/1.1 431 ")
        many = b"GET /healthz HTTP/1.1\r\n" + b"X: a\r\n" * 2000 + b"\r\n"
        assert (await ask(many)).startswith(b"HTTP/1.1 431 "), "short lines, too many"
        assert await ask(b"GET /healthz") == b"", "a request cut short is dropped"
    finally:
        await listener.close()


async def test_listener_drops_a_client_that_never_finishes_its_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from amgi.ops.listener import OpsListener, bind

    monkeypatch.setattr("amgi.ops.listener._REQUEST_TIMEOUT", 0.2)
    (sock,) = bind("127.0.0.1", 0)
    listener = OpsListener([sock], lambda: None)
    await listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # and then nothing, connection left open
        await writer.drain()
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b"", "closed without an answer"
        assert time.monotonic() - started >= 0.15, "dropped only when the timeout ran out"
        writer.close()
    finally:
        await listener.close()


async def test_readyz_is_not_ready_while_the_broker_cannot_be_reached(tmp_path: Path) -> None:
    import sqlite3

    from amgi.servers.sqlite import SqliteOptions, SqliteTransport

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "message":  # nack: the message comes back every 20 ms
            m = await receive()
            await send({"type": "message.nack", "id": m["id"], "message": "again"})

    db = tmp_path / "amgi.db"
    ops = prepare(OpsConfig(metrics_port=0, metrics_host="127.0.0.1"), app, "sqlite")
    assert ops.sock is not None
    url = f"http://127.0.0.1:{ops.sock.getsockname()[1]}/readyz"
    options = SqliteOptions(database=str(db), busy_timeout=0.1, poll_interval=0.02)
    config = RuntimeConfig(
        lifespan="off", max_attempts=1_000_000, retry_delay=0.02, retry_delay_max=0.02
    )
    runtime = Runtime(ops.app, SqliteTransport(["q"], options), config, metrics=ops.metrics)
    served = asyncio.create_task(serve(runtime, ops))

    async def readyz_becomes(answer: tuple[int, str]) -> None:
        async with asyncio.timeout(30):
            while await asyncio.to_thread(get, url) != answer:
                await asyncio.sleep(0.05)

    try:
        await readyz_becomes((200, "ready\n"))
        await runtime.transport.publish("q", [], b"x", {})
        lock = sqlite3.connect(db, isolation_level=None)
        # Every lease (a write) of the server now fails: "database is locked".
        lock.execute("BEGIN EXCLUSIVE")
        try:
            await readyz_becomes((503, "not ready: broker unreachable\n"))
        finally:
            lock.execute("COMMIT")
            lock.close()
        await readyz_becomes((200, "ready\n"))
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(served, 30) == 0


def test_destination_names_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """A wildcard consumer over many topics, or sends to a reply address per request,
    made one set of series per address without end (300 topics: 13,201 sample lines)."""
    from amgi.ops.metrics import MAX_DESTINATIONS, OTHER_DESTINATION, PrometheusMetrics
    from amgi.runtime.metrics import BatchStats

    metrics = PrometheusMetrics("mqtt")
    extra = 50
    for i in range(MAX_DESTINATIONS + extra):
        metrics.batch_settled(BatchStats(f"devices/{i}/temp", 2, 2, 0, 0, 0.01))
        metrics.message_sent(f"reply.{i}", True)
    metrics.batch_settled(BatchStats("devices/0/temp", 1, 1, 0, 0, 0.01))  # a known one
    text = metrics.exposition().decode()

    def samples(name: str) -> dict[str, float]:
        found = re.findall(
            rf'^{name}\{{.*messaging_destination_name="([^"]*)".*\}} (\S+)$', text, re.M
        )
        return {label: float(value) for label, value in found}

    consumed = samples("messaging_client_consumed_messages_total")
    assert len(consumed) == MAX_DESTINATIONS + 1
    assert consumed[OTHER_DESTINATION] == 2 * extra
    assert consumed["devices/0/temp"] == 3
    assert sum(consumed.values()) == 2 * (MAX_DESTINATIONS + extra) + 1
    sent = samples("messaging_client_sent_messages_total")
    assert len(sent) == MAX_DESTINATIONS + 1
    assert sent[OTHER_DESTINATION] == extra
    assert caplog.text.count("the others are counted as") == 2  # once per kind


async def test_an_address_that_is_not_unicode_text_does_not_break_the_scrape() -> None:
    """A send to an address holding a lone surrogate (bytes that were not UTF-8) made
    every later scrape fail: the label could not be encoded, and /metrics never answered."""
    broker = MemoryBroker.reset("surrogate")
    broker.put("q", [], b"x")
    sent = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        m = await receive()
        await send({"type": "message.send", "address": "reply.\udcff", "headers": [],
                    "payload": b"y"})  # fmt: skip
        await send({"type": "message.ack", "id": m["id"]})
        sent.set()

    ops = prepare(OpsConfig(metrics_port=0, metrics_host="127.0.0.1"), app, "memory")
    assert ops.sock is not None
    url = f"http://127.0.0.1:{ops.sock.getsockname()[1]}/metrics"
    transport = MemoryTransport(["q"], MemoryOptions(broker="surrogate"))
    runtime = Runtime(ops.app, transport, RuntimeConfig(lifespan="off"), metrics=ops.metrics)
    served = asyncio.create_task(serve(runtime, ops))
    try:
        await asyncio.wait_for(sent.wait(), 10)
        status, text = await asyncio.to_thread(get, url)
        assert status == 200
        # The surrogate is written as an escape, whose backslash the exposition escapes.
        labels = {"messaging_destination_name": r"reply.\\udcff"}
        assert sample(text, "messaging_client_sent_messages_total", **labels) == 1
        check = await asyncio.to_thread(_promtool_check, text)
        assert check.returncode == 0, check.stdout + check.stderr
        assert sample(text, "messaging_client_consumed_messages_total") == 1
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(served, 10) == 0


async def test_listener_drops_a_client_that_does_not_read_its_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that asked for /metrics and never read the answer held the connection (and
    its copy of the exposition) for ever."""
    from amgi.ops.listener import OpsListener, bind

    monkeypatch.setattr("amgi.ops.listener._REQUEST_TIMEOUT", 0.2)
    body = b"# more than the kernel buffers hold\n" * 500_000
    (sock,) = bind("127.0.0.1", 0)
    listener = OpsListener([sock], lambda: None, lambda: body)
    await listener.start()
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    try:
        await loop.sock_connect(client, sock.getsockname())
        await loop.sock_sendall(client, b"GET /metrics HTTP/1.1\r\n\r\n")  # then reads nothing
        await asyncio.sleep(1.0)  # well past the timeout: the server gave up on it
        got = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 10):
                got += len(chunk)
        assert got < len(body), "the answer was dropped, not kept waiting for the client"
        await asyncio.wait_for(listener.close(), 10)
    finally:
        client.close()
        await listener.close()


FD_LIMITED_LISTENER = """
import asyncio, resource, socket, sys
from amgi.ops.listener import OpsListener, bind

async def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
    (sock,) = bind("127.0.0.1", 0)
    listener = OpsListener([sock], lambda: None)
    await listener.start()
    print(sock.getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # the clients are connected
    try:
        socket.socket().close()  # what a broker connection needs
        print("ok", flush=True)
    except OSError as exc:
        print(exc.strerror, flush=True)
    await listener.close()

asyncio.run(main())
"""


def test_idle_clients_cannot_use_up_the_servers_file_descriptors() -> None:
    """Every connection was kept until its request came or 5s passed, however many there
    were: clients that connect and send nothing used up the process's file descriptors,
    and the server could open no broker connection, no file."""
    server = subprocess.Popen(
        [sys.executable, "-c", FD_LIMITED_LISTENER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    clients: list[socket.socket] = []
    try:
        assert server.stdout is not None
        assert server.stdin is not None
        port = int(server.stdout.readline())
        for _ in range(200):  # more than the server's descriptors
            with contextlib.suppress(OSError):
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)  # let the server accept what it can
        server.stdin.write("go\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == "ok"
        assert server.wait(10) == 0
    finally:
        for client in clients:
            client.close()
        if server.poll() is None:
            server.kill()
            server.wait()


async def test_closing_the_listener_does_not_wait_for_idle_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From Python 3.12 the server's wait_closed() waits for every connection: a client
    that connected and sent nothing held up the stop of the process."""
    from amgi.ops.listener import OpsListener, bind

    monkeypatch.setattr("amgi.ops.listener._REQUEST_TIMEOUT", 600)
    (sock,) = bind("127.0.0.1", 0)
    listener = OpsListener([sock], lambda: None)
    await listener.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
    try:
        await asyncio.sleep(0.2)  # accepted: its request is awaited
        await asyncio.wait_for(listener.close(), 10)
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()


async def test_consumer_lag_series_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """A server consuming more addresses than :data:`MAX_DESTINATIONS` (a wildcard over
    many topics) reported one lag series per address without end."""
    from amgi.ops.metrics import MAX_DESTINATIONS, OTHER_DESTINATION

    extra = 30
    names = [f"q{i:03d}" for i in range(MAX_DESTINATIONS + extra)]
    broker = MemoryBroker.reset("lagcap")
    for name in names:
        for _ in range(3):  # more than the runtime takes ahead of its app
            broker.put(name, [], b"x")
    held = asyncio.Event()
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        m = await receive()
        held.set()
        await release.wait()
        await send({"type": "message.ack", "id": m["id"]})

    ops = prepare(OpsConfig(metrics_port=0, metrics_host="127.0.0.1"), app, "memory")
    assert ops.sock is not None
    url = f"http://127.0.0.1:{ops.sock.getsockname()[1]}/metrics"
    transport = MemoryTransport(names, MemoryOptions(broker="lagcap", batch_size=1))
    config = RuntimeConfig(lifespan="off", concurrency=1)
    runtime = Runtime(ops.app, transport, config, metrics=ops.metrics)
    served = asyncio.create_task(serve(runtime, ops))

    async def scrape() -> dict[str, float]:
        text = (await asyncio.to_thread(get, url))[1]
        found = re.findall(
            r'^amgi_consumer_lag_messages\{.*messaging_destination_name="([^"]*)".*\} (\S+)$',
            text,
            re.M,
        )
        return {label: float(value) for label, value in found}

    try:
        await asyncio.wait_for(held.wait(), 10)
        async with asyncio.timeout(10):
            while True:  # until what the runtime fetches ahead of the held app is taken
                lag = await scrape()
                waiting = {name: broker.pending(name) for name in names}
                if sum(lag.values()) == sum(waiting.values()):
                    break
                await asyncio.sleep(0.1)
        await scrape()  # the warning comes once, not per scrape
        assert len(lag) == MAX_DESTINATIONS + 1, len(lag)
        assert lag[OTHER_DESTINATION] == sum(waiting[n] for n in names[MAX_DESTINATIONS:]) > 0
        assert lag[names[0]] == waiting[names[0]]
    finally:
        release.set()
        runtime.request_stop()
        assert await asyncio.wait_for(served, 30) == 0
    assert caplog.text.count("consumer-lag addresses") == 1


async def refused_dead_letter_counts(mode: str) -> str:
    """Serve a Redis address in ``mode`` whose dead-letter key is no stream (every dead
    letter is refused) with an app that nacks, send one message; the exposition once the
    nack is counted."""
    from amgi.servers.redis import RedisOptions, RedisTransport
    from tests.servers.redis_helpers import URL, client, ensure_broker, fresh

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "message":
            m = await receive()
            await send({"type": "message.nack", "id": m["id"], "message": "bad"})

    ensure_broker()
    address = fresh("refused")
    redis = await client()
    await redis.set(f"{address}.dlq", b"not a stream")
    ops = prepare(OpsConfig(metrics_port=0, metrics_host="127.0.0.1"), app, "redis")
    assert ops.sock is not None
    url = f"http://127.0.0.1:{ops.sock.getsockname()[1]}/metrics"
    transport = RedisTransport([address], RedisOptions(url=URL, mode=mode, block=0.1))
    config = RuntimeConfig(lifespan="off", max_attempts=1)
    runtime = Runtime(ops.app, transport, config, metrics=ops.metrics)
    served = asyncio.create_task(serve(runtime, ops))
    try:
        await asyncio.wait_for(runtime.started.wait(), 30)
        await transport.publish(address, [], b"poison", {})
        async with asyncio.timeout(30):
            while True:
                text = (await asyncio.to_thread(get, url))[1]
                with contextlib.suppress(AssertionError):
                    if sample(text, "amgi_messages_nacked_total") >= 1:
                        return text
                await asyncio.sleep(0.05)
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(served, 30) == 0
        await redis.delete(address, f"{address}.dlq")
        await redis.aclose()


async def test_a_lost_dead_letter_has_a_counter_of_its_own() -> None:
    """A dead letter Redis refused, of a Pub/Sub message (which cannot come back), was only
    one more in amgi_messages_nacked_total: nothing told that a message was lost."""
    text = await refused_dead_letter_counts("pubsub")
    assert sample(text, "amgi_dead_letters_lost_total") == 1
    assert sample(text, "amgi_messages_kept_total") == 0
    assert sample(text, "amgi_messages_dead_lettered_total") == 0
    check = await asyncio.to_thread(_promtool_check, text)
    assert check.returncode == 0, check.stdout + check.stderr


async def test_a_dead_letter_kept_unacknowledged_has_a_counter_of_its_own() -> None:
    """A refused dead letter of a stream entry (it stays pending, and comes back) has its
    own counter too, apart from the lost ones."""
    text = await refused_dead_letter_counts("streams")
    assert sample(text, "amgi_messages_kept_total") >= 1
    assert sample(text, "amgi_dead_letters_lost_total") == 0
    assert sample(text, "amgi_messages_dead_lettered_total") == 0


async def test_listener_answers_a_request_whose_lines_end_in_bare_newlines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A probe that ends its lines with "\\n" alone (no "\\r") was never answered: the
    listener waited for "\\r\\n\\r\\n" until it dropped the connection."""
    from amgi.ops.listener import OpsListener, bind

    monkeypatch.setattr("amgi.ops.listener._REQUEST_TIMEOUT", 2.0)
    (sock,) = bind("127.0.0.1", 0)
    listener = OpsListener([sock], lambda: None)
    await listener.start()
    try:
        for request in (b"GET /healthz HTTP/1.1\n\n", b"GET /readyz HTTP/1.0\nHost: x\r\n\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            writer.write(request)  # and the connection stays open for the answer
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), (request, answer)
    finally:
        await listener.close()


def resolving(monkeypatch: pytest.MonkeyPatch, name: str, *addresses: str) -> None:
    """Make ``name`` resolve to ``addresses``, in that order (as a resolver may have it)."""
    resolve = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != name:
            return resolve(host, *args, **kwargs)
        return [info for address in addresses for info in resolve(address, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


async def test_listener_binds_every_address_its_host_name_resolves_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--metrics-host localhost`` where the name resolves to ::1 and 127.0.0.1 (as most
    systems have it) bound ::1 alone: a probe of 127.0.0.1 was refused."""
    resolving(monkeypatch, "localhost", "::1", "127.0.0.1")
    broker = MemoryBroker.reset("dual")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    ops = prepare(OpsConfig(metrics_port=0, metrics_host="localhost"), app, "memory")
    assert ops.sock is not None
    port = ops.sock.getsockname()[1]
    transport = MemoryTransport(["q"], MemoryOptions(broker="dual"))
    runtime = Runtime(ops.app, transport, RuntimeConfig(lifespan="off"), metrics=ops.metrics)
    served = asyncio.create_task(serve(runtime, ops))
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        for host in ("[::1]", "127.0.0.1"):
            assert await asyncio.to_thread(get, f"http://{host}:{port}/healthz") == (200, "ok\n")
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(served, 10) == 0
    assert broker.pending("q") == 0
    for host in ("::1", "127.0.0.1"):
        with pytest.raises(ConnectionRefusedError):  # closed with the runtime
            socket.create_connection((host, port), timeout=5).close()


def test_binding_every_address_keeps_one_port_and_one_line_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from amgi.errors import ConfigurationError
    from amgi.ops.listener import bind

    # An address the host does not have (::1 where IPv6 is off) is left out.
    resolving(monkeypatch, "partly", "192.0.2.1", "127.0.0.1")
    (sock,) = bind("partly", 0)
    sock.close()
    assert sock.family == socket.AF_INET
    resolving(monkeypatch, "nowhere", "192.0.2.1")
    with pytest.raises(ConfigurationError, match="cannot listen on nowhere: Cannot assign"):
        bind("nowhere", 0)
    # One address's port in use: one error line, and nothing left bound on the other.
    resolving(monkeypatch, "both", "::1", "127.0.0.1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"--metrics-port {port}: the port is already"):
            bind("both", port)
    with socket.create_server(("::1", port), family=socket.AF_INET6):
        pass  # free again
