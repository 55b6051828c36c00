"""No hangs: an app that ignores cancellation or never answers lifespan, as `amgi run` runs it.

Each test runs a real ``amgi run`` process on the embedded SQLite server and signals it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amgi.errors import StartupFailed
from amgi.runtime import Runtime, RuntimeConfig
from amgi.runtime.ledger import CrashLedger
from amgi.servers.memory import MemoryOptions, MemoryTransport
from amgi.servers.sqlite import SqliteQueue
from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope
from tests.net import free_port

APPS = """
import asyncio, os, time

def mark(text):
    with open(os.environ["OUT"], "a") as f:
        f.write(text + "\\n")

async def stubborn_batch(scope, receive, send):
    if scope["type"] != "message":
        return
    await receive()
    mark("in batch")
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            mark("swallowed")

async def stubborn_shutdown(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        mark("shutdown")
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                mark("swallowed")
    m = await receive()
    await send({"type": "message.ack", "id": m["id"]})

async def endless_startup(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        mark("starting")
        await asyncio.sleep(3600)

async def blocking(scope, receive, send):
    if scope["type"] != "message":
        return
    await receive()
    mark("in batch")
    time.sleep(60)
"""


def start(project: Path, app: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", f"apps:{app}", "q", *args],
        cwd=project,
        env={**os.environ, "OUT": str(project / "out")},
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_mark(project: Path, text: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    out = project / "out"
    while not (out.exists() and text in out.read_text()):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, f"the app never reached {text!r}"
        time.sleep(0.05)


def stop(proc: subprocess.Popen[str], within: float) -> tuple[int, str]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(within + 20)
    finally:
        proc.kill()
    took = time.monotonic() - started
    stderr = proc.stderr.read() if proc.stderr else ""
    assert took < within, f"took {took:.1f}s to stop:\n{stderr}"
    return code, stderr


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "apps.py").write_text(APPS)
    queue = SqliteQueue(str(tmp_path / "amgi.db"))
    queue.put("q", [], b"work", {})
    queue.close()
    return tmp_path


def test_sigterm_gives_up_on_a_batch_that_swallows_cancellation(project: Path) -> None:
    proc = start(project, "stubborn_batch", "--shutdown-timeout", "0.5", "--cancel-grace", "0.5")
    wait_for_mark(project, "in batch", proc)
    code, stderr = stop(proc, 10)
    assert "swallowed" in (project / "out").read_text()
    assert code == 1
    assert "ignored cancellation" in stderr
    queue = SqliteQueue(str(project / "amgi.db"))
    try:
        assert queue.count("q") == 1, "the unsettled message must not be acked"
        (row,) = queue.db.execute("SELECT lease FROM amgi_messages").fetchall()
        assert row == (None,), "the unsettled message must be nacked (released), not left leased"
    finally:
        queue.close()


def test_sigterm_gives_up_on_a_lifespan_shutdown_that_swallows_cancellation(
    project: Path,
) -> None:
    proc = start(
        project, "stubborn_shutdown", "--lifespan-shutdown-timeout", "0.5", "--cancel-grace", "0.5"
    )
    deadline = time.monotonic() + 30
    queue = SqliteQueue(str(project / "amgi.db"))
    while queue.count("q"):
        assert time.monotonic() < deadline
        assert proc.poll() is None
        time.sleep(0.05)
    queue.close()
    _, stderr = stop(proc, 10)
    assert "shutdown" in (project / "out").read_text()
    assert "ignored cancellation" in stderr


def test_sigterm_during_a_startup_that_never_finishes_stops_the_process(project: Path) -> None:
    proc = start(project, "endless_startup")
    wait_for_mark(project, "starting", proc)
    code, _ = stop(proc, 10)
    assert code == 0
    queue = SqliteQueue(str(project / "amgi.db"))
    assert queue.count("q") == 1
    queue.close()


def test_a_startup_that_never_finishes_fails_after_the_startup_timeout(project: Path) -> None:
    proc = start(project, "endless_startup", "--startup-timeout", "0.5")
    try:
        code = proc.wait(30)
    finally:
        proc.kill()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert code == 1
    errors = [line for line in stderr.splitlines() if line.startswith("amgi: error:")]
    assert errors == [
        "amgi: error: application startup failed: "
        "the application did not complete lifespan startup within 0.5s"
    ]
    queue = SqliteQueue(str(project / "amgi.db"))
    assert queue.count("q") == 1
    queue.close()


def test_a_second_signal_ends_a_process_whose_loop_is_blocked(project: Path) -> None:
    proc = start(project, "blocking", "--shutdown-timeout", "30")
    wait_for_mark(project, "in batch", proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(20)
    finally:
        proc.kill()
    assert time.monotonic() - started < 5, "the second signal did not end the blocked process"
    assert code != 0
    assert "exiting now" in (proc.stderr.read() if proc.stderr else "")


def test_a_second_signal_does_not_count_a_crash_in_the_ledger(project: Path) -> None:
    """The user, not the message, ended the call: the next start must not make its
    message a suspect (delivered alone, an attempt used up)."""
    ledger = project / "ledger"
    proc = start(project, "blocking", "--shutdown-timeout", "30", "--crash-ledger", str(ledger))
    wait_for_mark(project, "in batch", proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(20) != 0
    finally:
        proc.kill()
    assert os.listdir(ledger), "the call in progress was not in the ledger"
    heir = CrashLedger(str(ledger), f"sqlite:{project / 'amgi.db'}")
    heir.open()
    assert heir.suspects == {}, "a second signal was counted as a crash"
    heir.close()


@pytest.mark.parametrize("server", ["amqp", "mqtt"])
def test_a_stop_while_connecting_to_a_broker_that_never_answers_ends_at_once(
    project: Path, server: str
) -> None:
    """A broker that takes the connection and never answers: the stop waited for the
    client's own connect timeout (MQTT: 10 s), or for ever (AMQP)."""
    listener = socket.create_server(("127.0.0.1", free_port()))
    port = listener.getsockname()[1]
    url = ["--url", f"amqp://127.0.0.1:{port}/"] if server == "amqp" else ["--port", str(port)]
    proc = start(project, "blocking", "--server", server, *url)
    try:
        listener.settimeout(30)
        accepted, _ = listener.accept()  # the client is connecting now
        code, stderr = stop(proc, 5)
        accepted.close()
    finally:
        listener.close()
    assert code == 0, stderr
    assert "stopped while connecting" in stderr


async def test_lifespan_startup_timeout_fails_startup() -> None:
    async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        await receive()
        while True:
            try:
                await __import__("asyncio").sleep(3600)
            except BaseException:
                return

    config = RuntimeConfig(startup_timeout=0.2, cancel_grace=0.2)
    runtime = Runtime(app, MemoryTransport(["q"], MemoryOptions()), config)
    with pytest.raises(StartupFailed, match=r"did not complete lifespan startup within 0.2s"):
        await runtime.serve()


async def test_a_lambda_invocation_answers_in_time_when_the_app_swallows_cancellation() -> None:
    import json

    from amgi.serverless import SqsHandler

    release = asyncio.Event()

    async def stubborn(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
        if scope["type"] != "message":
            return
        await receive()
        while not release.is_set():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await asyncio.sleep(0)

    class Context:
        def __init__(self, seconds: float) -> None:
            self.end = asyncio.get_running_loop().time() + seconds

        def get_remaining_time_in_millis(self) -> int:
            return int((self.end - asyncio.get_running_loop().time()) * 1000)

    fixture = Path(__file__).parent.parent / "serverless" / "fixtures" / "sqs_standard.json"
    event = json.loads(fixture.read_text())
    handler = SqsHandler(stubborn, handle_sigterm=False, config=RuntimeConfig(lifespan="off"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await asyncio.wait_for(handler.handle(event, Context(1.5)), 10)
    release.set()
    assert loop.time() - started < 1.5, "the invocation must answer before its deadline"
    ids = [r["messageId"] for r in event["Records"]]
    assert sorted(f["itemIdentifier"] for f in result["batchItemFailures"]) == sorted(ids)
