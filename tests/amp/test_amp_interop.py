"""Live interop with real Twisted: our client with a Twisted server, Twisted's client with ours."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import sys
from typing import Any

import pytest
from amp_commands import (
    CASES,
    AllTypes,
    Ask,
    Big,
    Collect,
    DeclaredError,
    Fail,
    FatalError,
    GetNotes,
    Hand,
    IsSecure,
    ListCall,
    Nope,
    Notify,
    Peer,
    Ping,
    SwitchToEcho,
    Where,
    case_source,
    norm,
)
from amp_helpers import TWISTED_PEER, Cert

from amgi import amp


def expected(case: dict[str, Any]) -> Any:
    return norm({**case, "opt": case.get("opt")})


@pytest.mark.parametrize("index", range(len(CASES)))
async def test_all_types_with_twisted_server(twisted_server: int, index: int) -> None:
    async with await amp.connect("127.0.0.1", twisted_server, Peer) as conn:
        result = await conn.call_remote(AllTypes, **CASES[index])
        assert norm(result) == expected(CASES[index])


async def test_errors_with_twisted_server(twisted_server: int) -> None:
    async with await amp.connect("127.0.0.1", twisted_server, Peer) as conn:
        with pytest.raises(DeclaredError, match=r"^declared text$"):
            await conn.call_remote(Fail, mode="declared")
        with pytest.raises(amp.UnhandledCommand) as unhandled:
            await conn.call_remote(Nope)
        assert unhandled.value.code == b"UNHANDLED"
        assert unhandled.value.description == "Unhandled Command: b'Nope'"
        # Twisted closes the connection after an undeclared error.
        with pytest.raises(amp.UnknownRemoteError) as unknown:
            await conn.call_remote(Fail, mode="undeclared")
        assert unknown.value.code == b"UNKNOWN"
        assert unknown.value.description == "Unknown Error"
        await asyncio.wait_for(conn.wait_closed(), 5)


async def test_fatal_error_with_twisted_server(twisted_server: int) -> None:
    async with await amp.connect("127.0.0.1", twisted_server, Peer) as conn:
        with pytest.raises(FatalError, match=r"^fatal text$"):
            await conn.call_remote(Fail, mode="fatal")
        await asyncio.wait_for(conn.wait_closed(), 5)
        assert conn.is_closed
        with pytest.raises(amp.ConnectionLost):
            await conn.call_remote(Ping, text="after")


async def test_bidirectional_big_and_notify_with_twisted_server(twisted_server: int) -> None:
    async with await amp.connect("127.0.0.1", twisted_server, Peer) as conn:
        assert await conn.call_remote(Ping(text="hello")) == {"text": "ping:pong:hello"}
        data = bytes(range(256)) * 1100
        result = await conn.call_remote(Big, data=data)
        assert result == {"data": data[::-1], "size": len(data)}
        assert await conn.call_remote(Notify, text="n1") is None
        assert await conn.call_remote(Notify, text="n2") is None
        assert await conn.call_remote(GetNotes) == {"notes": ["n1", "n2"]}
        # Many calls in flight at once, answered by tag.
        results = await asyncio.gather(*(conn.call_remote(Ping, text=str(i)) for i in range(50)))
        assert [r["text"] for r in results if r] == [f"ping:pong:{i}" for i in range(50)]


async def test_path_with_twisted_server(twisted_server: int) -> None:
    async with await amp.connect("127.0.0.1", twisted_server, Peer) as conn:
        result = await conn.call_remote(Where, path=pathlib.Path("/tmp/d\u00e9j\u00e0 vu"))
        assert result == {
            "path": pathlib.Path("/tmp/d\u00e9j\u00e0 vu/child"),
            "name": "d\u00e9j\u00e0 vu",
        }
        # str and bytes paths are sent as the same text.
        assert await conn.call_remote(Where, path="/a b") == {
            "path": pathlib.Path("/a b/child"),
            "name": "a b",
        }
        assert (await conn.call_remote(Where, path=b"/c"))["name"] == "c"  # type: ignore[index]


async def test_start_tls_with_twisted_server(twisted_server: int, cert: Cert) -> None:
    async with await amp.connect("127.0.0.1", twisted_server, Peer) as conn:
        assert await conn.call_remote(IsSecure) == {"secure": False}
        await conn.start_tls(cert.client_context(), server_hostname="localhost")
        assert conn.transport is not None
        assert conn.transport.get_extra_info("ssl_object") is not None
        assert await conn.call_remote(IsSecure) == {"secure": True}
        assert await conn.call_remote(Ping, text="tls") == {"text": "ping:pong:tls"}
        data = b"\xab" * 200_000
        assert await conn.call_remote(Big, data=data) == {"data": data, "size": 200_000}


async def test_twisted_client_with_our_server(cert: Cert) -> None:
    peers: list[Peer] = []

    def factory() -> Peer:
        peer = Peer(tls_context=cert.server_context())
        peers.append(peer)
        return peer

    server = await amp.serve(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(TWISTED_PEER),
            "client",
            str(port),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        values = json.dumps([case_source(case) for case in CASES]).encode()
        out, err = await asyncio.wait_for(proc.communicate(values), 30)
        assert proc.returncode == 0, err.decode()
        report = json.loads(out)
    finally:
        server.close()
        await server.wait_closed()
    assert report["all_types"] == [expected(case) for case in CASES]
    assert report["declared"] == {"error": "DeclaredError", "text": "declared text"}
    assert report["undeclared"]["error"] == "UnknownRemoteError"
    assert "Unknown Error" in report["undeclared"]["text"]
    assert "secret" not in report["undeclared"]["text"]
    assert report["unhandled"]["error"] == "UnhandledCommand"
    assert "Nope" in report["unhandled"]["text"]
    assert report["ping"] == {"text": "ping:pong:hello"}
    assert report["where"] == ["/tmp/d\u00e9j\u00e0 vu/child", "d\u00e9j\u00e0 vu"]
    assert report["big"] == [281_600, True]
    assert report["notes"] == {"notes": ["n1", "n2"]}
    assert report["secure_before"] is False
    assert report["secure_after"] is True
    assert report["ping_tls"] == {"text": "ping:pong:tls"}
    assert report["big_tls"] == [281_600, True]
    assert report["fatal"] == {"error": "FatalError", "text": "fatal text"}
    assert report["closed_after_fatal"] is True
    assert len(peers) == 1
    await asyncio.wait_for(peers[0].wait_closed(), 5)


class TagRecorder(asyncio.Protocol):
    """A raw AMP server: records the ``_ask`` of each call and answers Ping at once."""

    def __init__(self, tags: list[bytes | None]) -> None:
        self.tags = tags
        self.parser = amp.BoxParser()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for box in self.parser.feed(data):
            tag = box.get(b"_ask")
            self.tags.append(tag)
            if tag is not None:
                reply = {b"_answer": tag, b"text": b"pong"}
                self.transport.write(amp.encode_box(reply))  # type: ignore[attr-defined]


async def record_tags(run: Any) -> list[bytes | None]:
    tags: list[bytes | None] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: TagRecorder(tags), "127.0.0.1", 0)
    try:
        await run(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()
    return tags


async def test_tags_after_refused_calls_match_twisted() -> None:
    async def twisted_client(port: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(TWISTED_PEER),
            "tags",
            str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        outcomes = json.loads(out)
        assert outcomes[0] == "TooLong"
        assert outcomes[2] == "InvalidSignature"  # the missing argument
        assert outcomes[3] == "error"  # struct.error: the list element is too long

    async def our_client(port: int) -> None:
        async with await amp.connect("127.0.0.1", port) as conn:
            with pytest.raises(amp.TooLong):
                await conn.call_remote(Ping, text="x" * 70000)
            await conn.call_remote(Ping, text="a")
            with pytest.raises(amp.ArgumentError):
                await conn.call_remote(Ping)
            with pytest.raises(amp.TooLong):
                await conn.call_remote(ListCall, items=["y" * 70000])
            await conn.call_remote(Ping, text="b")
            await conn.call_remote(Notify, text="n")
            await conn.call_remote(Ping, text="c")

    theirs = await record_tags(twisted_client)
    ours = await record_tags(our_client)
    assert theirs == [b"2", b"3", None, b"5"]
    assert ours == theirs


async def test_protocol_switch_with_twisted_server(twisted_server: int) -> None:
    conn = await amp.connect("127.0.0.1", twisted_server, Peer)
    async with conn:
        with pytest.raises(DeclaredError, match="not switching"):
            await conn.switch_protocol(SwitchToEcho, Collect, greeting="refuse")
        assert await conn.call_remote(Ping, text="amp") == {"text": "ping:pong:amp"}
        new = await conn.switch_protocol(SwitchToEcho, Collect, greeting="hello")
        assert isinstance(new, Collect)
        # Twisted writes the greeting right behind its answer, often in the same segment.
        assert await new.until(b"hello\n") == b"hello\n"
        assert new.transport is not None
        new.transport.write(b"abc")
        assert await new.until(b"ABC") == b"hello\nABC"
        with pytest.raises(amp.ProtocolSwitched):
            await conn.call_remote(Ping, text="after")
        await asyncio.wait_for(conn.wait_closed(), 5)  # the AMP side is over
        new.transport.close()


async def test_protocol_switch_from_twisted_client() -> None:
    server = await amp.serve(Peer, "127.0.0.1", 0)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(TWISTED_PEER),
            "switch",
            str(server.sockets[0].getsockname()[1]),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
    finally:
        server.close()
        await server.wait_closed()
    report = json.loads(out)
    assert report["refused"] == {"error": "DeclaredError", "text": "not switching"}
    assert report["ping"] == {"text": "ping:pong:still amp"}
    assert report["answer"] == {}
    assert report["echo"] == "hi\nXYZ"


async def test_descriptors_with_twisted_unix_server(twisted_unix_server: str) -> None:
    async with await amp.connect_unix(twisted_unix_server, Peer) as conn:
        pipes = [os.pipe() for _ in range(4)]
        try:
            # Several in flight at once: ordinals keep each descriptor with its call.
            results = await asyncio.gather(
                *(
                    conn.call_remote(Hand, fd=write, text=f"pipe {i}")
                    for i, (_, write) in enumerate(pipes)
                )
            )
            assert results == [{"written": 6}] * 4
            for _, write in pipes:
                os.close(write)
            assert [os.read(read, 100) for read, _ in pipes] == [b"pipe %d" % i for i in range(4)]
        finally:
            for read, _ in pipes:
                os.close(read)
        answer = await conn.call_remote(Ask, text="from twisted")
        assert answer is not None
        with os.fdopen(answer["fd"], "rb") as received:
            assert received.read() == b"from twisted"
        assert await conn.call_remote(Ping, text="unix") == {"text": "ping:pong:unix"}


async def test_descriptors_from_twisted_unix_client(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ours.sock"
    peers: list[Peer] = []

    def factory() -> Peer:
        peers.append(Peer())
        return peers[-1]

    async with await amp.serve_unix(factory, path):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(TWISTED_PEER),
            "unix-client",
            str(path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report == {"hand": {"written": 12}, "handed": "from twisted", "asked": "to twisted"}
    await asyncio.wait_for(peers[0].wait_closed(), 5)


async def test_descriptor_over_tcp_is_refused_clearly(twisted_server: int) -> None:
    read, write = os.pipe()
    try:
        async with await amp.connect("127.0.0.1", twisted_server, Peer) as conn:
            with pytest.raises(amp.AmpError, match="needs a UNIX connection"):
                await conn.call_remote(Hand, fd=write, text="x")
            assert await conn.call_remote(Ping, text="tcp") == {"text": "ping:pong:tcp"}
    finally:
        os.close(read)
        os.close(write)
