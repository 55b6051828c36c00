"""Helpers of the operations tests: the ``amgi`` command in a subprocess, test apps."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from amgi.runtime import Runtime, RuntimeConfig
from amgi.runtime.metrics import BatchStats, MetricsHook
from amgi.transport import Message, Transport
from tests.net import pipe

ROOT = Path(__file__).resolve().parents[2]

APP = """
import os
from pathlib import Path

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                Path(os.environ["STARTED"]).write_text("started")
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        m = await receive()
        if m["payload"].startswith(b"bad"):
            await send({"type": "message.nack", "id": m["id"], "message": "bad payload"})
        else:
            await send({"type": "message.ack", "id": m["id"]})
        more = m.get("more_messages")
"""


def write_app(folder: Path) -> Path:
    """``opsapp.py`` in ``folder``: acks, nacks payloads starting with ``bad``."""
    (folder / "opsapp.py").write_text(APP)
    return folder


def amgi(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AMGI_")}
    return subprocess.run(
        [sys.executable, "-m", "amgi", *args],
        cwd=cwd,
        env={**environ, "STARTED": str(cwd / "started"), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("amgi: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """HTTP GET: ``(status, body)``, also for error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Nacking(MetricsHook):
    """The dead letters a :func:`nacking` runtime made so far."""

    def __init__(self) -> None:
        self.dead = 0
        self.changed = asyncio.Event()

    def batch_settled(self, stats: BatchStats) -> None:
        self.dead += stats.dead_lettered
        self.changed.set()

    async def reach(self, n: int, timeout: float) -> None:
        """Wait until ``n`` were dead-lettered; fail after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while self.dead < n:
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def nacking(
    transport: Transport, *, with_id: bool = False, **config: Any
) -> AsyncIterator[Nacking]:
    """Serve ``transport``, while in the block, with an app that nacks every message
    (reason ``refused``, plus `` <id>`` when ``with_id``).

    ``config`` goes to :class:`RuntimeConfig` (default: one attempt, no lifespan).
    """

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        more = True
        while more:
            m = await receive()
            reason = f"refused {m['id']}" if with_id else "refused"
            await send({"type": "message.nack", "id": m["id"], "message": reason})
            more = m.get("more_messages", False)

    count = Nacking()
    settings = RuntimeConfig(**{"lifespan": "off", "max_attempts": 1, **config})
    runtime = Runtime(app, transport, settings, metrics=count)
    served = asyncio.create_task(runtime.serve())
    started = asyncio.create_task(runtime.started.wait())
    await asyncio.wait({served, started}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if served.done():
        raise AssertionError(f"the runtime ended before it started: {served.result()}")
    try:
        assert runtime.started.is_set(), "the runtime did not start within 60 s"
        yield count
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(served, 60) == 0


async def dead_letter_all(
    transport: Transport, n: int, *, with_id: bool = False, **config: Any
) -> None:
    """Serve ``transport`` with :func:`nacking`'s app until the runtime dead-lettered
    ``n`` messages."""
    async with nacking(transport, with_id=with_id, **config) as count:
        await count.reach(n, 60)


async def replay_beside_a_failing_consumer(
    replayer: Transport, consumer: Transport, address: str, n: int
) -> int:
    """Replay every dead letter of ``address`` (``n`` of them) with ``replayer`` while
    ``consumer`` runs an app that dead-letters each replayed message again; return how
    many the replay moved (it must end: 60 s at most).

    The replay starts once the consumer has dead-lettered a first message of its own
    (one more dead letter: ``n + 1`` in all), so it is consuming by then."""
    await replayer.connect()
    try:
        async with nacking(consumer) as count:
            await replayer.publish(address, [], b"warm-up", {})
            await count.reach(1, 60)
            moved = await asyncio.wait_for(replayer.replay_dead_letters(address, 10**9), 60)
            await count.reach(1 + moved, 60)  # every replayed message failed again
    finally:
        await replayer.close()
    return moved


async def kill_replay_when(
    ready: Callable[[], Awaitable[bool]], *args: str, env: dict[str, str] | None = None
) -> None:
    """Run ``amgi dead-letters replay ARGS`` and kill it (SIGKILL) as soon as ``await
    ready()`` holds (asked every 20 ms, for 60 s at most); fail if it ended before."""
    replay = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "amgi", "dead-letters", "replay", *args,
        cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not await ready():
            assert replay.returncode is None, "the replay ended before it was killed"
            assert time.monotonic() < deadline, "the replay moved nothing"
            await asyncio.sleep(0.02)
        assert replay.returncode is None, "the replay ended before it was killed"
        replay.send_signal(signal.SIGKILL)
        await asyncio.wait_for(replay.wait(), 10)
    finally:
        if replay.returncode is None:
            replay.kill()
            await replay.wait()


async def take(transport: Transport, n: int) -> list[Message]:
    """Connect ``transport``, fetch until ``n`` messages came (30 s each fetch), close."""
    await transport.connect()
    try:
        messages: list[Message] = []
        while len(messages) < n:
            batches = await asyncio.wait_for(transport.fetch(), 30)
            messages += [m for b in batches for m in b.messages]
    finally:
        await transport.close()
    return messages


class HoldingFront:
    """A TCP relay to 127.0.0.1:``upstream`` that stops a client at a chosen command.

    Bytes from the clients pass until ``marker`` (a command name, e.g. ``XDEL``) has
    passed ``count`` times, counted over every connection; from its next occurrence on,
    nothing more reaches the broker (which sees a command cut short and waits), and
    :attr:`held` is set. Use as ``async with HoldingFront(...) as front`` in the test's
    event loop; clients connect to ``front.port``.
    """

    def __init__(self, upstream: int, marker: bytes, count: int) -> None:
        self.upstream = upstream
        self.marker = marker
        self.count = count
        self.seen = 0
        self.held = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> HoldingFront:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._relay(reader, writer))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(self._up(reader, up_writer), self._down(up_reader, writer))
        except OSError:
            pass
        finally:
            writer.close()
            up_writer.close()

    async def _up(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        keep = len(self.marker) - 1
        tail = b""  # too short to hold a whole marker: none is counted twice
        while data := await src.read(65536):
            if self.held.is_set():
                continue
            window = tail + data
            cut = None
            at = window.find(self.marker)
            while at != -1:
                self.seen += 1
                if self.seen > self.count:
                    cut = max(0, at - len(tail))
                    break
                at = window.find(self.marker, at + 1)
            tail = window[-keep:] if keep else b""
            if cut is not None:
                dst.write(data[:cut])
                self.held.set()
            else:
                dst.write(data)
            await dst.drain()

    async def _down(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        await pipe(src, dst)


class CuttingFront(HoldingFront):
    """A relay to 127.0.0.1:``upstream`` whose connections :meth:`cut` closes (a network
    blip: the client reconnects through it, and everything passes again), and whose
    client-to-broker bytes can be ``stalled`` until then (dropped, as on a link gone
    dead). ``marker`` (optional): :attr:`sent` is set when a read holding it passes,
    :attr:`lost` when one is dropped by the stall."""

    def __init__(self, upstream: int, marker: bytes = b"") -> None:
        super().__init__(upstream, b"", 0)
        self.mark = marker
        self.stalled = False
        self.sent = asyncio.Event()
        self.lost = asyncio.Event()

    async def _up(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            marked = bool(self.mark) and self.mark in data
            if self.stalled:
                if marked:
                    self.lost.set()
                continue
            if marked:
                self.sent.set()
            dst.write(data)
            await dst.drain()

    async def cut(self) -> None:
        relays = list(self._relays)
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        self.stalled = False
