"""Error answers from responders, over a real connection."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from amp_commands import Peer, Ping

from amgi import amp


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no description")


class Explode(amp.Command):
    errors = {Unprintable: b"UNPRINTABLE"}


class Exploding(Peer):
    @Explode.responder
    async def explode(self) -> None:
        raise Unprintable()


async def test_declared_error_without_a_description_is_answered_unknown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await amp.serve(Exploding, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10), await amp.connect("127.0.0.1", port, Peer) as conn:
            with (
                caplog.at_level(logging.ERROR, logger="amgi.amp"),
                pytest.raises(amp.UnknownRemoteError) as info,
            ):
                await conn.call_remote(Explode)
            assert (info.value.code, info.value.description) == (b"UNKNOWN", "Unknown Error")
            assert "responder for Explode failed" in caplog.text
            answer: Any = await conn.call_remote(Ping, text="after")  # the connection works
            assert answer == {"text": "ping:pong:after"}
    finally:
        server.close()
        await server.wait_closed()


class Noting(Peer):
    @Ping.responder
    def ping(self, text: str) -> dict[str, Any]:
        self.notes.append(text)
        return {"text": text}


async def test_calls_after_a_fatal_error_in_the_same_read_are_not_run() -> None:
    """A fatal error closes the connection: the calls the peer wrote behind it, read in
    the same chunk, ran all the same (an Authenticate behind a refused Deliver did)."""
    from amp_commands import Fail

    from amgi.amp._box import encode_box

    peers: list[Noting] = []

    def factory() -> Noting:
        peers.append(Noting())
        return peers[-1]

    server = await amp.serve(factory, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            fail = encode_box({b"_command": Fail.name, b"_ask": b"1", b"mode": b"fatal"})
            ping = encode_box({b"_command": Ping.name, b"_ask": b"2", b"text": b"x"})
            writer.write(fail + ping)
            answered = await reader.read()  # until the server closes the connection
            writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert b"FATAL" in answered
    assert b"_answer" not in answered  # the Ping was not answered ...
    assert peers[0].notes == []  # ... nor run
