"""``amgi run --server http`` processes: SIGTERM during requests, SIGKILL mid-stream and a
restart, send routing to the real Kafka broker from the command line, and no secret in any
output."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.cli import amgi
from tests.net import free_port, port_open
from tests.secrets import assert_hidden, new_marker
from tests.servers.http_helpers import binary, cloud_event
from tests.servers.kafka_helpers import (
    BOOTSTRAP,
    ROOT,
    create_topic,
    ensure_broker,
    fresh,
    read_all,
)

pytestmark = pytest.mark.timeout(90)


class Server:
    """One ``python -m amgi run tests.servers.http_app:app --server http`` process."""

    def __init__(
        self, tmp: Path, *flags: str, env: dict[str, str] | None = None, port: int = 0
    ) -> None:
        self.port = port or free_port()
        self.log = tmp / "app.log"
        self.out = tmp / f"server-{self.port}.out"
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "amgi", "run", "tests.servers.http_app:app",
                "--server", "http", "--port", str(self.port), "--lifespan", "off", *flags,
            ],
            cwd=ROOT,
            env={**os.environ, "HTTP_TEST_LOG": str(self.log), **(env or {})},
            stdout=open(self.out, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start:\n{self.output()}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/"

    def output(self) -> str:
        return self.out.read_text()

    def stop(self) -> int:
        """SIGTERM (a graceful shutdown); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        """At the end of a test: no process outlives it, passed or failed."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def _wait_for_line(path: Path, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while _lines(path) < count:
        assert time.monotonic() < deadline, f"{path} never had {count} line(s)"
        await asyncio.sleep(0.02)


async def test_sigterm_finishes_requests_in_flight_and_answers_new_ones_503(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server = Server(tmp_path, env={"HTTP_TEST_DELAY": "1.5"})
    request.addfinalizer(server.kill)
    async with httpx.AsyncClient(timeout=30) as client:
        in_flight = [
            asyncio.create_task(client.post(server.url, headers=h, content=b"slow"))
            for h, _ in (binary(cloud_event("orders", i)) for i in range(3))
        ]
        await _wait_for_line(server.log, 3)  # all three taken by the app
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while "batch(es) in flight" not in server.output():  # fetching has stopped
            assert time.monotonic() < deadline, server.output()
            await asyncio.sleep(0.02)
        headers, _ = binary(cloud_event("orders", "late"))
        try:
            late = await client.post(server.url, headers=headers, content=b"late")
            assert late.status_code == 503
        except httpx.TransportError:
            pass  # already closed: the sender keeps the message just the same
        answers = await asyncio.gather(*in_flight)
    assert [a.status_code for a in answers] == [204, 204, 204]
    assert server.proc.wait(30) == 0
    output = server.output()
    assert "Traceback" not in output
    assert "SIGTERM received" in output


async def test_sigkill_mid_stream_then_restart_loses_nothing(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Senders retry until a 2xx, as pushing services do; the server is killed with
    SIGKILL mid-stream and started again on its port. No request is answered 2xx before
    the app processed its message, and every message is processed."""
    done = tmp_path / "done.log"
    env = {"HTTP_TEST_DONE": str(done), "HTTP_TEST_DELAY": "0"}
    first = Server(tmp_path, env=env)
    request.addfinalizer(first.kill)
    n = 300
    answered: list[bytes] = []

    async def push(client: httpx.AsyncClient, i: int) -> None:
        payload = b"%d" % i
        headers, _ = binary(cloud_event("orders", i))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                answer = await client.post(first.url, headers=headers, content=payload)
                if answer.status_code == 204:
                    answered.append(payload)
                    return
            except httpx.TransportError:
                pass  # killed, or not restarted yet: the sender keeps the message
            await asyncio.sleep(0.05)
        raise AssertionError(f"message {i} was never accepted")

    async with httpx.AsyncClient(timeout=10) as client:
        gate = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with gate:
                await push(client, i)

        senders = asyncio.gather(*(one(i) for i in range(n)))
        while len(answered) < n // 3:
            await asyncio.sleep(0.01)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        killed_at = len(answered)
        before = set(done.read_bytes().splitlines())  # what the killed server processed
        assert set(answered) <= before, "a request was answered 2xx before its processing"
        second = Server(tmp_path, env=env, port=first.port)
        request.addfinalizer(second.kill)
        await asyncio.wait_for(senders, 80)
    assert second.stop() == 0
    processed = done.read_bytes().splitlines()
    assert killed_at < n, "killed too late to test anything"
    assert set(answered) == {b"%d" % i for i in range(n)}
    assert set(processed) == set(answered)
    assert len(processed) - n <= 8, "more duplicates than the requests in flight at the kill"


async def test_send_routing_from_the_command_line_to_kafka(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    ensure_broker()
    topic = create_topic(fresh("http-out"), partitions=1)
    server = Server(
        tmp_path,
        "--send-to", "http-out-*=kafka", "--kafka-bootstrap-servers", BOOTSTRAP,
    )  # fmt: skip
    request.addfinalizer(server.kill)
    async with httpx.AsyncClient(timeout=30) as client:
        routed = [binary(cloud_event("orders", None, id=f"e{i}", target=topic)) for i in range(3)]
        answers = [
            await client.post(server.url, headers=h, content=f"body {i}".encode())
            for i, (h, _) in enumerate(routed)
        ]
        unrouted_headers, _ = binary(cloud_event("orders", None, target="elsewhere"))
        unrouted = await client.post(server.url, headers=unrouted_headers, content=b"x")
    assert [a.status_code for a in answers] == [204, 204, 204]
    assert unrouted.status_code == 500  # the http server itself has no send_url
    assert "no send_url" in unrouted.text
    records = await asyncio.to_thread(read_all, topic, 3)
    assert sorted(r.value() for r in records) == [b"body 0", b"body 1", b"body 2"]
    assert {r.key() for r in records} == {b"e0", b"e1", b"e2"}
    assert all(r.headers() == [("via", b"http")] for r in records)
    assert server.stop() == 0
    assert "sending to kafka for 'http-out-*'" in server.output()


async def test_no_secret_reaches_the_output_or_an_answer(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    marker = new_marker()
    token, key = f"tok-{marker}", f"key-{marker}"
    # A port bound here and never listened on refuses connections, and no other test run
    # can start a server on it meanwhile (a free port could be taken and answer).
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    request.addfinalizer(refusing.close)
    closed = refusing.getsockname()[1]
    server = Server(
        tmp_path,
        "--log-level", "debug",
        "--token", token, "--hmac-secret", key,
        "--send-to", "out-*=http",
        "--http-send-url", f"http://user:{marker}@127.0.0.1:{closed}/",  # sent as Basic
    )  # fmt: skip
    request.addfinalizer(server.kill)
    headers, _ = binary(cloud_event("orders", None, target="out-1"))
    body = b"routed"
    signature = hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
    good = {**headers, "authorization": f"Bearer {token}", "x-signature": signature}
    answers = []
    async with httpx.AsyncClient(timeout=30) as client:
        for extra in (
            {},
            {"authorization": f"Bearer {marker}"},
            {"authorization": f"Bearer {token}"},
            {"authorization": f"Bearer {token}", "x-signature": "00" * 32},
            good,
        ):
            answers.append(
                await client.post(server.url, headers={**headers, **extra}, content=body)
            )
    assert [a.status_code for a in answers] == [401, 403, 401, 403, 500]
    assert "cannot POST to http://user:*****@127.0.0.1" in answers[-1].text  # nacked
    assert server.stop() == 0
    assert_hidden(marker, [server.output(), *(a.text for a in answers)])


def test_no_secret_in_option_errors_or_help() -> None:
    marker = new_marker()
    token = f"tok-{marker}"
    texts = []
    for argv in (
        ["--server", "http", "--token", token, "--nack-status", "200"],
        ["--server", "http", "--send-to", "x=http", "--http-send-url", f"ftp://u:{marker}@h/"],
        ["--server", "http", "--token", token, "--help"],
        ["--server", "http", "--tokn", token],
    ):
        done = amgi("run", "tests.servers.http_app:app", *argv)
        texts += [done.stdout, done.stderr]
        assert done.returncode in (0, 1, 2)
    assert "--nack-status must be" in "".join(texts)
    assert "--http-send-url must start with" in "".join(texts)
    assert (
        "unrecognized arguments: --tokn (and 1 more word(s) not shown: they may be secret values)"
        in "".join(texts)
    )
    assert_hidden(marker, texts)
