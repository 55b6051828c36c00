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
