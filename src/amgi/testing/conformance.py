"""A conformance suite every protocol server runs against its real broker.

Use it from a test module::

    from amgi.testing.conformance import ConformanceSuite, DurabilitySuite, Harness

    class MyHarness(Harness):
        server = "mybroker"
        ...

    class TestMyBroker(ConformanceSuite, DurabilitySuite):
        @pytest.fixture
        def harness(self) -> MyHarness:
            return MyHarness()

:class:`ConformanceSuite` runs the server in-process (the runtime over the transport);
:class:`DurabilitySuite` runs it as ``python -m amgi run`` processes and stops them with
SIGTERM (graceful drain) and SIGKILL (at-least-once after restart). A server that keeps no
state outside the process (the memory server) can only take the first.

The tests need ``pytest`` and ``pytest-asyncio`` (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from amgi.errors import InvalidEvent
from amgi.options import build, to_argv
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers import load
from amgi.servers.kit.bindings import unknown_keys
from amgi.transport import Bindings, HeaderList, Transport
from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope

__all__ = [
    "ConformanceSuite",
    "DurabilitySuite",
    "Harness",
    "Received",
    "Recorder",
    "serving",
]

DeadLetterView = tuple[HeaderList, bytes | None, str]


class Harness(abc.ABC):
    """How the suite reaches one broker. The fixture makes one harness per test.

    :meth:`options` must return the same values on every call of one harness instance
    (the suite restarts servers and expects them to resume, e.g. in the same consumer
    group); make fresh names in ``__init__`` instead.
    """

    server: ClassVar[str]
    send_bindings: ClassVar[Bindings] = {}
    """Bindings the app puts on a ``message.send`` that must reach the consumer."""
    runtime_overrides: ClassVar[dict[str, Any]] = {}
    """RuntimeConfig values this broker needs in tests."""
    redelivery_timeout: ClassVar[float] = 30.0
    """Seconds within which a killed consumer's unacked messages must come back."""
    startup_timeout: ClassVar[float] = 30.0
    """Seconds a server process may take until it consumes (group joins ...)."""

    @abc.abstractmethod
    def options(self) -> dict[str, Any]:
        """Transport option values by field name, e.g. ``{"group_id": "g1"}``."""

    @abc.abstractmethod
    async def new_address(self) -> str:
        """A fresh, empty address that keeps one producer's order (one partition/queue)."""

    @abc.abstractmethod
    async def dead_letters(self, address: str, count: int, timeout: float) -> list[DeadLetterView]:
        """Wait until ``count`` dead letters of ``address`` exist; return them."""

    def key_bindings(self, key: str) -> Bindings:
        """Bindings that put a produced message under ordering key ``key``.

        Brokers whose ordering key holds later messages back behind a failing one (SQS
        FIFO groups) return the binding that separates keys; by default all messages of
        an address share one key.
        """
        return {}

    def check_bindings(self, sent: Bindings, received: Bindings) -> None:  # noqa: B027
        """Assert that ``received`` carries the :attr:`send_bindings` that were ``sent``."""

    # -- derived helpers ---------------------------------------------------------------

    def transport_class(self) -> type[Transport]:
        return load(self.server)

    def transport(self, addresses: list[str]) -> Transport:
        """A new transport of this server for ``addresses``."""
        cls = self.transport_class()
        return cls(addresses, build(cls.options, self.options()))

    def cli_args(self) -> list[str]:
        """``--server NAME`` and the flags of :meth:`options`."""
        return ["--server", self.server, *to_argv(self.transport_class().options, self.options())]

    async def produce(
        self,
        address: str,
        payloads: list[bytes],
        headers: HeaderList | None = None,
        bindings: Bindings | None = None,
    ) -> None:
        """Publish ``payloads`` in order to ``address`` through this server's transport."""
        transport = self.transport([])
        await transport.connect()
        try:
            for payload in payloads:
                await transport.publish(address, list(headers or []), payload, dict(bindings or {}))
        finally:
            await transport.close()


@dataclass(slots=True)
class Received:
    """One message as the application saw it."""

    address: str
    id: str
    headers: list[tuple[bytes, bytes]]
    payload: bytes | None
    bindings: dict[str, Any]
    attempt: int
    more_messages: bool


class Recorder:
    """An AMGI app that records what it sees and settles by a rule (default: ack).

    ``decide(received)`` returns "ack", "nack:REASON", "leave" (unsettled) or "raise"
    (the call raises after the batch was read).
    """

    def __init__(self, decide: Callable[[Received], str] | None = None) -> None:
        self.decide = decide or (lambda _: "ack")
        self.received: list[Received] = []
        self.acked: list[Received] = []
        self.lifespan: list[str] = []
        self.scopes: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self.delay = 0.0
        self.sends: list[tuple[str, HeaderList, bytes | None, Bindings]] = []
        self._changed = asyncio.Event()

    async def __call__(
        self, scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                self.lifespan.append(event["type"])
                if event["type"] == "lifespan.startup":
                    scope.setdefault("state", {})["ready"] = True
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.scopes.append(dict(scope))
        raise_after = False
        more = True
        while more:
            event = await receive()
            assert event["type"] == "message.receive"
            bindings = dict(event.get("bindings") or {})
            item = Received(
                scope["address"],
                event["id"],
                list(event["headers"]),
                event.get("payload"),
                bindings,
                int(bindings.get("amgi", {}).get("attempt", 0)),
                bool(event.get("more_messages", False)),
            )
            self.received.append(item)
            self._changed.set()
            if self.delay:
                await asyncio.sleep(self.delay)
            for address, headers, payload, out_bindings in self.sends:
                await send(
                    {
                        "type": "message.send",
                        "address": address,
                        "headers": headers,
                        "payload": payload,
                        "bindings": out_bindings,
                    }
                )
            action = self.decide(item)
            if action == "ack":
                await send({"type": "message.ack", "id": item.id})
                self.acked.append(item)
            elif action.startswith("nack:"):
                await send({"type": "message.nack", "id": item.id, "message": action[5:]})
            elif action == "raise":
                raise_after = True
            more = item.more_messages
        if raise_after:
            raise RuntimeError("recorder was told to raise")

    def payloads(self) -> list[bytes | None]:
        return [r.payload for r in self.received]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until ``predicate()`` holds, or fail the test saying ``what`` was awaited."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"timed out after {timeout}s waiting for {what}; "
                    f"got {len(self.received)} message(s)"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.2)):
                    await self._changed.wait()


_TEST_DEFAULTS: dict[str, Any] = {
    "retry_delay": 0.05,
    "retry_delay_max": 0.2,
    "shutdown_timeout": 10.0,
}


@contextlib.asynccontextmanager
async def serving(
    harness: Harness, app: Any, addresses: list[str], **overrides: Any
) -> AsyncIterator[Runtime]:
    """Run the runtime in-process on ``addresses`` for the duration of the block."""
    config = RuntimeConfig(**{**_TEST_DEFAULTS, **harness.runtime_overrides, **overrides})
    runtime = Runtime(app, harness.transport(addresses), config)
    task = asyncio.create_task(runtime.serve())
    started = asyncio.create_task(runtime.started.wait())
    await asyncio.wait(
        {task, started}, timeout=harness.startup_timeout, return_when=asyncio.FIRST_COMPLETED
    )
    if task.done():
        started.cancel()
        task.result()  # raises the startup error
        pytest.fail("the server stopped during startup")
    if not started.done():
        started.cancel()
        runtime.request_stop()
        await asyncio.gather(task, return_exceptions=True)
        pytest.fail(f"the server did not start within {harness.startup_timeout}s")
    try:
        yield runtime
    finally:
        runtime.request_stop()
        async with asyncio.timeout(config.shutdown_timeout + 30):
            code = await task
        assert code == 0, f"the server exited with {code}"


def _payloads(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}-{i:04d}".encode() for i in range(n)]


class ConformanceSuite:
    """Semantics every AMGI server keeps, checked in-process against the real broker."""

    async def test_batch_delivery_and_order(self, harness: Harness) -> None:
        address = await harness.new_address()
        headers = [(b"h-one", b"1"), (b"h-two", b"\x00\xffbinary")]
        payloads = _payloads("order", 20)
        await harness.produce(address, payloads, headers)
        app = Recorder()
        async with serving(harness, app, [address]):
            await app.wait_for(lambda: len(app.acked) >= 20, 30, "20 messages")
        assert [r.payload for r in app.received[:20]] == payloads, "order was not kept"
        for r in app.received:
            assert r.address == address
            assert r.attempt == 1
            assert r.headers == headers, f"headers changed: {r.headers!r}"
        assert all(s["address"] == address and s["type"] == "message" for s in app.scopes)
        assert all(s["amgi"]["version"] == "1.0" for s in app.scopes)
        # Every call ends with a message whose more_messages is false.
        ends = [r for r in app.received if not r.more_messages]
        assert len(ends) == len(app.scopes)

    async def test_headers_a_broker_cannot_hold_as_text_arrive_byte_exact(
        self, harness: Harness
    ) -> None:
        """A header name that is not UTF-8 or longer than 128 bytes, control characters,
        an empty name or value, repeated names, names differing only in case, and the
        name servers pack such headers under (``amgi-b64``, with a value that reads as a
        packed one and one that does not): each message's headers arrive exactly as sent,
        in order."""
        address = await harness.new_address()
        cases: list[HeaderList] = [
            [(b"\xff\xfename", b"v"), (b"plain", b"after")],
            [(b"", b"empty name"), (b"e", b"")],
            [(b"dup", b"1"), (b"other", b"x"), (b"dup", b"2")],
            [(b"sp ace:colon", b"a\r\nb\x00c\x7f")],
            [(b"Content-Type", b"x"), (b"content-type", b"y")],
            [(b"n" * 300, b"long name"), (b"m" * 200, b"200"), (b"k" * 128, b"128")],
            [(b"amgi-b64", b"YQ==.Yg=="), (b"amgi-b64", b"not packed"), (b"a", b"b")],
        ]
        for i, headers in enumerate(cases):
            await harness.produce(address, [b"%d" % i], headers)
        app = Recorder()
        async with serving(harness, app, [address]):
            await app.wait_for(lambda: len(app.acked) >= len(cases), 30, "every message")
        got = {r.payload: r.headers for r in app.received}
        assert got == {b"%d" % i: headers for i, headers in enumerate(cases)}

    async def test_ack_removes(self, harness: Harness) -> None:
        address = await harness.new_address()
        await harness.produce(address, _payloads("acked", 5))
        first = Recorder()
        async with serving(harness, first, [address]):
            await first.wait_for(lambda: len(first.acked) >= 5, 30, "5 messages")
        await harness.produce(address, [b"marker"])
        second = Recorder()
        async with serving(harness, second, [address]):
            await second.wait_for(lambda: b"marker" in second.payloads(), 30, "the marker")
            await asyncio.sleep(0.3)
        assert second.payloads() == [b"marker"], "acked messages came back"

    async def test_nack_redelivers_then_dead_letters(self, harness: Harness) -> None:
        address = await harness.new_address()
        await harness.produce(address, [b"poison"], bindings=harness.key_bindings("poison"))
        await harness.produce(address, [b"fine"], bindings=harness.key_bindings("fine"))

        def decide(r: Received) -> str:
            return "nack:boom: cannot handle" if r.payload == b"poison" else "ack"

        app = Recorder(decide)
        async with serving(harness, app, [address], max_attempts=3):
            dead = await harness.dead_letters(address, 1, 30)
        attempts = [r.attempt for r in app.received if r.payload == b"poison"]
        assert attempts == [1, 2, 3], f"attempts seen by the app: {attempts}"
        assert [r.payload for r in app.acked] == [b"fine"]
        assert len(dead) == 1
        _, payload, reason = dead[0]
        assert payload == b"poison"
        assert "boom: cannot handle" in reason

    async def test_unsettled_means_nack(self, harness: Harness) -> None:
        address = await harness.new_address()
        await harness.produce(address, [b"left", b"raised"])

        def decide(r: Received) -> str:
            if r.attempt == 1:
                return "leave" if r.payload == b"left" else "raise"
            return "ack"

        app = Recorder(decide)
        async with serving(harness, app, [address]):
            await app.wait_for(lambda: len(app.acked) >= 2, 30, "both messages acked on retry")
        by_payload = {(r.payload, r.attempt) for r in app.received}
        assert (b"left", 2) in by_payload
        assert (b"raised", 2) in by_payload

    async def test_bad_events_raise_in_app_and_touch_nothing(self, harness: Harness) -> None:
        address = await harness.new_address()
        await harness.produce(address, [b"only"])
        errors: list[str] = []
        done = asyncio.Event()

        async def app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> None:
            if scope["type"] != "message":
                return
            event: Any = await receive()
            bad_events: list[Any] = [
                {"type": "message.bogus", "id": event["id"]},
                {"type": "message.ack", "id": "no-such-id"},
                {"type": "message.ack"},
                {"type": "message.nack", "id": event["id"]},
                {"type": "message.send", "address": address, "headers": [("str", b"x")]},
                "not a dict",
            ]
            for bad in bad_events:
                try:
                    await send(bad)
                except InvalidEvent as exc:
                    errors.append(str(exc))
            await send({"type": "message.ack", "id": event["id"]})
            try:
                await send({"type": "message.ack", "id": event["id"]})
            except InvalidEvent as exc:
                errors.append(str(exc))
            done.set()

        async with serving(harness, app, [address]):
            async with asyncio.timeout(30):
                await done.wait()
        assert len(errors) == 7, errors
        assert "already acked" in errors[-1]
        # The message was acked exactly once and nothing else happened to it.
        again = Recorder()
        await harness.produce(address, [b"marker"])
        async with serving(harness, again, [address]):
            await again.wait_for(lambda: b"marker" in again.payloads(), 30, "the marker")
        assert again.payloads() == [b"marker"]

    async def test_send_reaches_broker_intact(self, harness: Harness) -> None:
        source = await harness.new_address()
        target = await harness.new_address()
        headers = [(b"trace", b"abc"), (b"trace", b"second"), (b"bin", b"\x00\x01\xfe")]
        payload = bytes(range(256)) * 4
        app = Recorder()
        app.sends = [(target, headers, payload, dict(harness.send_bindings))]
        await harness.produce(source, [b"trigger"])
        sink = Recorder()
        async with serving(harness, app, [source]), serving(harness, sink, [target]):
            await sink.wait_for(lambda: len(sink.acked) >= 1, 30, "the sent message")
        got = sink.received[0]
        assert got.payload == payload
        assert got.headers == headers
        harness.check_bindings(harness.send_bindings, got.bindings)
        # Every binding key read on the send and emitted on receive is in the one table.
        assert not unknown_keys(harness.send_bindings, sent=True)
        for received in (app.received[0], got):
            assert not unknown_keys(received.bindings), received.bindings

    async def test_lifespan_order_and_state(self, harness: Harness) -> None:
        address = await harness.new_address()
        await harness.produce(address, [b"one"])
        app = Recorder()
        async with serving(harness, app, [address]):
            await app.wait_for(lambda: len(app.acked) >= 1, 30, "one message")
            assert app.lifespan == ["lifespan.startup"]
        assert app.lifespan == ["lifespan.startup", "lifespan.shutdown"]
        assert app.scopes[0].get("state", {}).get("ready") is True

    async def test_graceful_stop_finishes_in_flight(self, harness: Harness) -> None:
        address = await harness.new_address()
        await harness.produce(address, _payloads("drain", 3))
        app = Recorder()
        app.delay = 0.3
        async with serving(harness, app, [address]) as runtime:
            await app.wait_for(lambda: len(app.received) >= 1, 30, "the first message")
            runtime.request_stop()
        # Whatever the app started was finished and acked before the server stopped.
        assert len(app.acked) == len(app.received) >= 1
        rest = Recorder()
        async with serving(harness, rest, [address]):
            await rest.wait_for(
                lambda: len(rest.acked) + len(app.acked) >= 3, 30, "the remaining messages"
            )
            await asyncio.sleep(0.3)
        got = sorted(p for p in app.payloads() + rest.payloads() if p)
        assert got == _payloads("drain", 3), (
            f"before the stop {app.payloads()}, after it {rest.payloads()}"
        )


class _Process:
    """A ``python -m amgi run`` server process with the recorder app."""

    def __init__(
        self, harness: Harness, address: str, record: Path, delay: float, *extra: str
    ) -> None:
        env = dict(os.environ, AMGI_TEST_RECORD=str(record), AMGI_TEST_DELAY=str(delay))
        argv = [
            sys.executable,
            "-m",
            "amgi",
            "run",
            "amgi.testing.apps:recorder",
            address,
            *harness.cli_args(),
            "--retry-delay",
            "0.05",
            "--shutdown-timeout",
            "10",
            *extra,
        ]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"server process did not exit within {timeout}s:\n{self.output()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


async def _until(predicate: Callable[[], bool], timeout: float, what: str, proc: _Process) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.proc.poll() is not None:
            pytest.fail(
                f"server process exited ({proc.proc.returncode}) "
                f"while waiting for {what}:\n{proc.output()}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}:\n{proc.output()}")
        await asyncio.sleep(0.05)


@dataclass
class _Run:
    harness: Harness
    address: str
    record: Path
    procs: list[_Process] = field(default_factory=list)

    def start(self, delay: float, *extra: str) -> _Process:
        proc = _Process(self.harness, self.address, self.record, delay, *extra)
        self.procs.append(proc)
        return proc

    def acked(self) -> set[str]:
        return {r["payload"] for r in _records(self.record) if r["event"] == "ack"}

    def startups(self) -> int:
        return sum(1 for r in _records(self.record) if r["event"] == "lifespan.startup")

    def received(self) -> list[str]:
        return [r["payload"] for r in _records(self.record) if r["event"] == "receive"]

    async def finish(self, expected: set[str]) -> None:
        """Start one more process, wait until it started and every one of ``expected``
        is acked, then stop it gracefully (exit code 0)."""
        starts = self.startups() + 1
        proc = self.start(0.0)
        h = self.harness
        await _until(lambda: self.startups() >= starts, h.startup_timeout, "the next start", proc)
        await _until(
            lambda: self.acked() >= expected,
            h.redelivery_timeout + h.startup_timeout,
            "the rest",
            proc,
        )
        proc.proc.send_signal(signal.SIGTERM)
        assert await proc.wait(30) == 0, proc.output()


class DurabilitySuite:
    """Shutdown and crash behaviour of real ``amgi run`` processes."""

    kill_count: ClassVar[int] = 60

    @pytest.fixture
    def run(self, harness: Harness, tmp_path: Path) -> Any:
        runs: list[_Run] = []

        async def make() -> _Run:
            address = await harness.new_address()
            r = _Run(harness, address, tmp_path / f"record-{uuid.uuid4().hex[:8]}.jsonl")
            runs.append(r)
            return r

        yield make
        for r in runs:
            for p in r.procs:
                p.kill()

    async def test_sigterm_drains_and_exits_zero(self, harness: Harness, run: Any) -> None:
        r: _Run = await run()
        expected = {p.decode() for p in _payloads("term", 6)}
        await harness.produce(r.address, _payloads("term", 6))
        proc = r.start(delay=0.3)
        await _until(
            lambda: len(r.received()) >= 1, harness.startup_timeout, "a first message", proc
        )
        proc.proc.send_signal(signal.SIGTERM)
        code = await proc.wait(30)
        assert code == 0, proc.output()
        records = _records(r.record)
        assert records[-1]["event"] == "lifespan.shutdown", "lifespan shutdown did not run last"
        started = {x["payload"] for x in records if x["event"] == "receive"}
        assert started <= r.acked(), "a message in flight at SIGTERM was not finished"
        # The rest is delivered to the next process; nothing acked comes back.
        before = r.acked()
        await r.finish(expected)
        again = [p for p in r.received() if p in before]
        assert len(again) == len(before), f"acked messages were redelivered: {sorted(set(again))}"

    async def test_sigterm_uses_up_no_attempt(self, harness: Harness, run: Any) -> None:
        """What the broker delivered to a process that stops gracefully is processed
        there, or goes back uncounted: across a stop mid-stream (one slot, more
        delivered than taken), every message reaches the app on its first attempt."""
        r: _Run = await run()
        n = 30
        expected = {p.decode() for p in _payloads("attempt", n)}
        await harness.produce(r.address, _payloads("attempt", n))
        proc = r.start(0.05, "--concurrency", "1")
        await _until(lambda: len(r.acked()) >= 1, harness.startup_timeout, "a first ack", proc)
        proc.proc.send_signal(signal.SIGTERM)
        assert await proc.wait(30) == 0, proc.output()
        if r.acked() < expected:
            await r.finish(expected)
        attempts = [
            (x["payload"], x["attempt"]) for x in _records(r.record) if x["event"] == "receive"
        ]
        assert [p for p, a in attempts if a != 1] == [], f"a stop used up attempts: {attempts}"

    async def test_sigkill_mid_stream_loses_nothing(self, harness: Harness, run: Any) -> None:
        r: _Run = await run()
        n = self.kill_count
        expected = {p.decode() for p in _payloads("kill", n)}
        await harness.produce(r.address, _payloads("kill", n))
        proc = r.start(delay=0.02)
        await _until(
            lambda: len(r.acked()) >= n // 4,
            harness.startup_timeout + 30,
            "a quarter of the messages",
            proc,
        )
        proc.proc.send_signal(signal.SIGKILL)
        await proc.wait(10)
        assert r.acked() < expected, "the server finished before it could be killed mid-stream"
        proc2 = r.start(delay=0.0)
        await _until(lambda: r.startups() >= 2, harness.startup_timeout, "the restart", proc2)
        await _until(
            lambda: r.acked() >= expected,
            harness.redelivery_timeout + harness.startup_timeout + 30,
            f"all {n} messages after the restart",
            proc2,
        )
        proc2.proc.send_signal(signal.SIGTERM)
        assert await proc2.wait(30) == 0, proc2.output()
        assert set(r.received()) == expected
