"""AMGI over AMP: Deliver/Subscribe against the runtime, with our client, Twisted's and the CLI."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from amgi import amp
from amgi.runtime import Runtime
from amgi.servers.amp import AmpTransport, Deliver, Nacked, Subscribe
from amgi.testing.conformance import DeadLetterView, Harness, Received, Recorder, serving

HERE = Path(__file__).parent


class AmpHarness(Harness):
    server = "amp"

    def options(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": 0, "batch_size": 50}

    async def new_address(self) -> str:
        return "orders"

    async def dead_letters(self, address: str, count: int, timeout: float) -> list[DeadLetterView]:
        return []


def decide(item: Received) -> str:
    return "nack:bad payload" if item.payload == b"bad" else "ack"


class Subscriber(amp.AMP):
    def __init__(self) -> None:
        super().__init__()
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    @Deliver.responder
    async def deliver(self, **message: Any) -> None:
        await self.inbox.put(message)


def port_of(runtime: Runtime) -> int:
    transport = runtime.transport
    assert isinstance(transport, AmpTransport)
    port = transport.port
    assert port is not None
    return port


async def test_deliver_ack_nack_batching_and_big_payloads() -> None:
    app = Recorder(decide)
    async with (
        serving(AmpHarness(), app, ["orders"]) as runtime,
        await amp.connect("127.0.0.1", port_of(runtime), Subscriber) as conn,
    ):
        if True:
            headers = [{"name": b"h-one", "value": b"1"}, {"name": b"bin", "value": b"\x00\xff"}]
            answer = await conn.call_remote(
                Deliver, address="orders", headers=headers, payload=b"first"
            )
            assert answer == {}
            results = await asyncio.gather(
                *(
                    conn.call_remote(Deliver, address="orders", headers=[], payload=b"m%d" % i)
                    for i in range(40)
                )
            )
            assert results == [{}] * 40

            # A command that does not declare NACK still gets a clear error.
            class Plain(amp.Command):
                command_name = b"Deliver"
                arguments = Deliver.arguments

            with pytest.raises(amp.UnknownRemoteError) as info:
                await conn.call_remote(Plain, address="orders", headers=[], payload=b"bad")
            assert info.value.code == b"NACK"
            assert info.value.description == "bad payload"
            with pytest.raises(Nacked, match=r"^bad payload$"):
                await conn.call_remote(Deliver, address="orders", headers=[], payload=b"bad")
            big = bytes(range(256)) * 1000
            assert await conn.call_remote(Deliver, address="orders", headers=[], payload=big) == {}
            assert await conn.call_remote(Deliver, address="orders", headers=[]) == {}
            with pytest.raises(Nacked, match="not served"):
                await conn.call_remote(Deliver, address="elsewhere", headers=[], payload=b"x")
    first = app.received[0]
    assert first.headers == [(b"h-one", b"1"), (b"bin", b"\x00\xff")]
    assert first.payload == b"first"
    payloads = [r.payload for r in app.received]
    assert big in payloads
    assert None in payloads
    assert sorted(p for p in payloads if p and p.startswith(b"m")) == sorted(
        b"m%d" % i for i in range(40)
    )
    # 40 concurrent deliveries ran in fewer app calls than messages.
    assert len(app.scopes) < len(app.received) - 30


async def test_subscribe_receives_app_sends() -> None:
    app = Recorder()
    app.sends = [("replies", [(b"k", b"v")], b"reply", {})]
    async with serving(AmpHarness(), app, ["orders"]) as runtime:
        port = port_of(runtime)
        async with (
            await amp.connect("127.0.0.1", port, Subscriber) as sub,
            await amp.connect("127.0.0.1", port, Subscriber) as sub2,
        ):
            assert await sub.call_remote(Subscribe, address="replies") == {}
            assert await sub2.call_remote(Subscribe, address="replies") == {}
            await sub.call_remote(Deliver, address="orders", headers=[], payload=b"go")
            for conn in (sub, sub2):
                message = await asyncio.wait_for(conn.inbox.get(), 5)
                assert message == {
                    "address": "replies",
                    "headers": [{"name": b"k", "value": b"v"}],
                    "payload": b"reply",
                }
    assert app.acked


async def test_send_without_subscriber_fails_the_app_call() -> None:
    app = Recorder()
    app.sends = [("nobody", [], b"x", {})]
    async with (
        serving(AmpHarness(), app, ["orders"]) as runtime,
        await amp.connect("127.0.0.1", port_of(runtime)) as conn,
    ):
        if True:
            with pytest.raises(Nacked):
                await conn.call_remote(Deliver, address="orders", headers=[], payload=b"go")


async def test_plain_twisted_client() -> None:
    app = Recorder(decide)
    # Every message the app handles makes it send a reply to "replies", which the
    # server pushes to the Twisted client because it subscribed to that address.
    app.sends = [("replies", [(b"r", b"1")], b"pong", {})]
    async with serving(AmpHarness(), app, ["orders"]) as runtime:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "amp_twisted_client.py"),
            str(port_of(runtime)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["ack"] == {}
    assert report["big"] == {}
    assert report["nack"] == "bad payload"
    assert report["reply_ack"] == {}
    assert report["received"]["address"] == "replies"
    assert report["received"]["payload"] == "pong"
    assert report["received"]["headers"] == [["r", "1"]]
    assert b"x" * 150_000 in [r.payload for r in app.received]


async def test_cli_send() -> None:
    app = Recorder(decide)
    async with serving(AmpHarness(), app, ["orders"]) as runtime:
        port = str(port_of(runtime))

        async def send(payload: str) -> int:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "amgi",
                "send",
                "orders",
                payload,
                "--server",
                "amp",
                "--port",
                port,
                "--header",
                "a=b",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode is not None
            return proc.returncode

        assert await send("hello") == 0
        assert await send("bad") != 0
    assert [r.payload for r in app.received] == [b"hello", b"bad"]
    assert app.received[0].headers == [(b"a", b"b")]
