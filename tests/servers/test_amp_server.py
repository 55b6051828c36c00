"""AMGI over AMP: Deliver/Subscribe against the runtime, with our client, Twisted's and the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from amgi import amp
from amgi.errors import ConfigurationError
from amgi.runtime import Runtime
from amgi.servers.amp import (
    AmpOptions,
    AmpSendError,
    AmpTransport,
    Authenticate,
    Deliver,
    Forbidden,
    Nacked,
    Subscribe,
    Unauthenticated,
)
from amgi.testing.conformance import DeadLetterView, Harness, Received, Recorder, serving
from tests.net import free_port, self_signed

HERE = Path(__file__).parent


class AmpHarness(Harness):
    server = "amp"

    def __init__(self, **extra: Any) -> None:
        self.extra = extra

    def options(self) -> dict[str, Any]:
        return {
            "host": "127.0.0.1",
            "port": 0,
            "batch_size": 50,
            "subscribe_addresses": ["replies"],
            **self.extra,
        }

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


# ------------------------------------------------------------------------- security


async def twisted_client(port: int, *args: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "amp_twisted_client.py"),
        str(port),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    report: dict[str, Any] = json.loads(out)
    return report


async def test_listens_on_loopback_unless_told_otherwise() -> None:
    assert AmpOptions().host == "127.0.0.1"
    transport = AmpTransport(["orders"], AmpOptions(port=0))
    await transport.connect()
    try:
        assert transport._server is not None
        hosts = {sock.getsockname()[0] for sock in transport._server.sockets}
        assert hosts == {"127.0.0.1"}
    finally:
        await transport.close()


async def test_token_refuses_twisted_clients_without_it(caplog: pytest.LogCaptureFixture) -> None:
    app = Recorder(decide)
    app.sends = [("replies", [], b"pong", {})]
    token = "s3cret-" + uuid.uuid4().hex
    async with serving(AmpHarness(auth_token=token), app, ["orders"]) as runtime:
        port = port_of(runtime)
        with caplog.at_level(logging.WARNING, logger="amgi"):
            refused = await twisted_client(port, "--only-deliver")
            wrong = await twisted_client(port, "--token", "guess", "--only-deliver")
        assert refused == {
            "deliver": {"error": "Unauthenticated", "text": "authenticate first"},
            "closed": True,
        }
        assert wrong == {"authenticate": {"error": "Unauthenticated"}}
        assert app.received == []
        assert "refused Deliver from 127.0.0.1:" in caplog.text
        assert "refused Authenticate from 127.0.0.1:" in caplog.text
        report = await twisted_client(port, "--token", token)
    assert report["ack"] == {}
    assert report["nack"] == "bad payload"
    assert report["received"]["payload"] == "pong"
    assert b"twisted" in [r.payload for r in app.received]


async def until_closed(runtime: Runtime, data: bytes) -> bytes:
    """Write ``data`` on a new raw connection; return what comes back until the server
    closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(runtime))
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_connection_that_never_authenticates_is_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = AmpHarness(auth_token="t", auth_timeout=0.3)
    async with serving(harness, Recorder(), ["orders"]) as runtime:
        with caplog.at_level(logging.WARNING, logger="amgi"):
            assert await until_closed(runtime, b"") == b""
        assert "no Authenticate within 0.3s" in caplog.text
        # Authenticated in time: stays open past the deadline.
        conn = await amp.connect("127.0.0.1", port_of(runtime))
        async with conn:
            await conn.call_remote(Authenticate, token=b"t")
            await asyncio.sleep(0.5)
            assert not conn.is_closed


async def test_deliver_before_authenticate_in_one_write_is_refused() -> None:
    # The check happens in order of arrival: an Authenticate written right behind the
    # Deliver (same segment) must not let the Deliver through.
    app = Recorder()
    async with serving(AmpHarness(auth_token="t"), app, ["orders"]) as runtime:
        deliver = {b"_command": b"Deliver", b"_ask": b"1", b"address": b"orders"}
        deliver |= {b"headers": b"", b"payload": b"early"}
        authenticate = {b"_command": b"Authenticate", b"_ask": b"2", b"token": b"t"}
        received = await until_closed(
            runtime, amp.encode_box(deliver) + amp.encode_box(authenticate)
        )
        answers = amp.parse_boxes(received)
        assert answers[0][b"_error"] == b"1"
        assert answers[0][b"_error_code"] == b"UNAUTHENTICATED"
        await asyncio.sleep(0.05)
    assert app.received == []


async def test_a_refused_call_before_authenticate_closes_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An unknown command is refused by the AMP core itself, before any responder could
    # check the token: an unauthenticated peer could make the server answer such calls
    # until the auth timeout. Now the first one closes its connection (the calls read
    # with it are still answered).
    harness = AmpHarness(auth_token="t", auth_timeout=60)
    async with serving(harness, Recorder(), ["orders"]) as runtime:
        with caplog.at_level(logging.WARNING, logger="amgi"):
            nope = (amp.encode_box({b"_command": b"Nope", b"_ask": b"%d" % i}) for i in range(50))
            received = await until_closed(runtime, b"".join(nope))
        assert "a refused call before Authenticate" in caplog.text
        assert {box[b"_error_code"] for box in amp.parse_boxes(received)} == {b"UNHANDLED"}
        # Authenticated, a refused call is only answered.
        conn = await amp.connect("127.0.0.1", port_of(runtime))
        async with conn:
            await conn.call_remote(Authenticate, token=b"t")

            class Nope(amp.Command):
                pass

            with pytest.raises(amp.UnhandledCommand):
                await conn.call_remote(Nope)
            assert not conn.is_closed


async def test_authenticate_without_a_server_token_is_refused() -> None:
    async with serving(AmpHarness(), Recorder(), ["orders"]) as runtime:
        conn = await amp.connect("127.0.0.1", port_of(runtime))
        async with conn:
            with pytest.raises(Unauthenticated, match="takes no token"):
                await conn.call_remote(Authenticate, token=b"anything")
            await asyncio.wait_for(conn.wait_closed(), 5)


async def test_token_with_our_client_and_unauthorised_subscribe() -> None:
    app = Recorder()
    token = "tok-" + uuid.uuid4().hex
    async with serving(AmpHarness(auth_token=token), app, ["orders"]) as runtime:
        port = port_of(runtime)
        async with await amp.connect("127.0.0.1", port) as conn:
            with pytest.raises(Unauthenticated, match="authenticate first"):
                await conn.call_remote(Subscribe, address="replies")
            await asyncio.wait_for(conn.wait_closed(), 5)
        async with await amp.connect("127.0.0.1", port) as conn:
            assert await conn.call_remote(Authenticate, token=token.encode()) == {}
            assert await conn.call_remote(Subscribe, address="replies") == {}
            with pytest.raises(Forbidden, match="'orders' is not allowed"):
                await conn.call_remote(Subscribe, address="orders")
            await asyncio.wait_for(conn.wait_closed(), 5)
        # amgi send authenticates by itself when given the token.
        sender = AmpTransport([], AmpOptions(port=port, auth_token=token))
        try:
            await sender.publish("orders", [], b"by token", {})
        finally:
            await sender.close()
        wrong = AmpTransport([], AmpOptions(port=port, auth_token="nope"))
        try:
            with pytest.raises(AmpSendError, match="authentication refused"):
                await wrong.publish("orders", [], b"never", {})
        finally:
            await wrong.close()
    assert [r.payload for r in app.received] == [b"by token"]


async def test_tls_with_and_without_client_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "server")
    client_cert, client_key = self_signed(tmp_path, "client")
    client_pem = tmp_path / "client-both.pem"
    client_pem.write_bytes(client_cert.read_bytes() + client_key.read_bytes())
    app = Recorder()
    options = {
        "tls": True,
        "cert_file": str(cert),
        "key_file": str(key),
        "ca_file": str(client_cert),
    }
    async with serving(AmpHarness(**options), app, ["orders"]) as runtime:
        port = port_of(runtime)
        refused = await twisted_client(port, "--ca", str(cert), "--only-deliver")
        assert refused["deliver"]["error"] in {"ConnectionLost", "ConnectionDone", "Error"}
        assert app.received == []
        with_cert = await twisted_client(
            port, "--ca", str(cert), "--cert", str(client_pem), "--only-deliver"
        )
        assert with_cert == {"deliver": {}}
        # Our own sending side over TLS, with and without its certificate.
        ours = AmpTransport(
            [],
            AmpOptions(
                port=port,
                tls=True,
                ca_file=str(cert),
                cert_file=str(client_cert),
                key_file=str(client_key),
            ),
        )
        try:
            await ours.publish("orders", [], b"over tls", {})
        finally:
            await ours.close()
        plain = AmpTransport([], AmpOptions(port=port))
        try:
            with pytest.raises(AmpSendError):
                await plain.publish("orders", [], b"plaintext", {})
        finally:
            await plain.close()
    assert [r.payload for r in app.received] == [b"from twisted", b"over tls"]


async def test_warning_when_listening_beyond_loopback_unprotected(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)

    async def warnings(**options: Any) -> list[str]:
        caplog.clear()
        transport = AmpTransport(["orders"], AmpOptions(port=0, **options))
        with caplog.at_level(logging.WARNING, logger="amgi"):
            await transport.connect()
        await transport.close()
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    (line,) = await warnings(host="0.0.0.0")
    assert line.startswith("amp: listening on 0.0.0.0:")
    assert "without TLS or authentication" in line
    (line,) = await warnings(host="0.0.0.0", auth_token="t")
    assert "without TLS:" in line
    tls = {"tls": True, "cert_file": str(cert), "key_file": str(key)}
    (line,) = await warnings(host="0.0.0.0", **tls)
    assert "without authentication:" in line
    assert await warnings(host="0.0.0.0", auth_token="t", **tls) == []
    assert await warnings() == []  # loopback


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tls": True}, "--tls needs --cert-file and --key-file"),
        ({"auth_token": ""}, "--auth-token must not be empty"),
        ({"max_box_size": 0}, "must be at least 1"),
        ({"auth_timeout": float("nan")}, "--auth-timeout must be a finite number"),
        (
            {"tls": True, "cert_file": "/no.pem", "key_file": "/no.pem"},
            "amp: cannot load --cert-file '/no.pem' with --key-file '/no.pem': No such file",
        ),
    ],
)
async def test_bad_security_options_refused_at_startup(
    options: dict[str, Any], message: str
) -> None:
    transport = AmpTransport(["orders"], AmpOptions(port=0, **options))
    with pytest.raises(ConfigurationError, match=message):
        await transport.connect()
    await transport.close()


async def run_cli(*args: str, timeout: float = 30) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amgi",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_token_never_reaches_a_log_an_exception_or_the_cli(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    marker = "MARK" + uuid.uuid4().hex
    token = f"server-{marker}"
    wrong = f"client-{marker}"
    cert, key = self_signed(tmp_path)
    outputs: list[str] = []
    exceptions: list[BaseException] = []
    app = Recorder()
    caplog.set_level(logging.DEBUG)
    async with serving(AmpHarness(auth_token=token), app, ["orders"]) as runtime:
        port = str(port_of(runtime))
        # Started together (each CLI start takes a while); awaited below.
        cli_runs = asyncio.gather(
            # A wrong token.
            run_cli(
                "send", "orders", "x", "--server", "amp", "--port", port,
                "--auth-token", wrong,
            ),
            # TLS towards a plaintext server, with the token.
            run_cli(
                "send", "orders", "x", "--server", "amp", "--port", port, "--tls",
                "--ca-file", str(cert), "--auth-token", token,
            ),
            # Nothing listens there.
            run_cli(
                "send", "orders", "x", "--server", "amp", "--port", str(free_port()),
                "--auth-token", token,
            ),
            # A server that cannot load its certificate, and one given a bad option.
            run_cli(
                "run", "tests.servers.test_amp_server:never_called", "orders", "--server",
                "amp", "--port", str(free_port()), "--tls", "--cert-file",
                str(tmp_path / "missing.pem"), "--key-file", str(key), "--auth-token", token,
            ),
            run_cli(
                "run", "tests.servers.test_amp_server:never_called", "orders", "--server",
                "amp", "--port", "70000", "--auth-token", token,
            ),
            run_cli("run", "--server", "amp", "--help"),
        )  # fmt: skip
        # A wrong token from the Python API.
        sender = AmpTransport([], AmpOptions(port=int(port), auth_token=wrong))
        with pytest.raises(AmpSendError) as info:
            await sender.publish("orders", [], b"x", {})
        exceptions.append(info.value)
        await sender.close()
        outputs.append(repr(sender.config))
        # Calls before authenticating.
        async with await amp.connect("127.0.0.1", int(port)) as conn:
            with pytest.raises(Unauthenticated) as refused:
                await conn.call_remote(Deliver, address="orders", headers=[], payload=b"x")
            exceptions.append(refused.value)
        results = await cli_runs
    assert "authentication refused" in results[0][1]
    assert "amp: cannot load --cert-file" in results[3][1]
    assert all(code != 0 for code, _ in results[:5])
    assert results[5][0] == 0  # --help
    outputs += [out for _, out in results]
    assert app.received == []
    records = caplog.records
    assert any("refused" in r.getMessage() for r in records)
    texts = [r.getMessage() for r in records] + [r.exc_text or "" for r in records]
    texts += [str(e) + repr(e) + repr(e.__cause__) + repr(e.__context__) for e in exceptions]
    texts += outputs
    assert all(marker not in text for text in texts)


async def never_called(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the app must not be called")


async def test_listening_at_the_first_fetch_on_a_busy_port_is_fatal() -> None:
    """Without addresses the server listens at the first fetch; a busy port there was a
    BrokerUnavailable, which the runtime retries: it logged once and ran on, serving
    nothing. Now a ConfigurationError, as at connect with addresses (and over HTTP)."""
    blocker = await amp.serve(amp.AMP, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    transport = AmpTransport([], AmpOptions(port=port))
    try:
        await transport.connect()
        async with asyncio.timeout(10):
            with pytest.raises(ConfigurationError, match=f"cannot listen on 127.0.0.1:{port}"):
                await transport.fetch()
    finally:
        await transport.close()
        blocker.close()
        await blocker.wait_closed()


async def test_a_busy_port_at_the_first_fetch_ends_the_run_with_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The runtime leads a fatal fetch error with the server's name, which the AMP error
    already began with ('amp: amp: cannot listen ...')."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

    blocker = await amp.serve(amp.AMP, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    runtime = Runtime(app, AmpTransport([], AmpOptions(port=port)))
    try:
        with caplog.at_level(logging.ERROR, logger="amgi"):
            async with asyncio.timeout(20):
                code = await runtime.serve()
    finally:
        blocker.close()
        await blocker.wait_closed()
    assert code != 0
    lines = [r.getMessage() for r in caplog.records if "cannot listen" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"amp: cannot listen on 127.0.0.1:{port}: "), lines
