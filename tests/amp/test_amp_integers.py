"""Integer's size limit: Python's int/str conversion limit, on both sides, as in Twisted."""

from __future__ import annotations

import asyncio
import decimal
import sys
from typing import Any

import pytest
from amp_commands import CASES, AllTypes, Peer

from amgi import amp

LIMIT = sys.get_int_max_str_digits()


def all_types_call(digits: bytes) -> bytes:
    """An AllTypes call, valid except for ``i``, which holds ``digits``."""
    box = AllTypes.encode_arguments(CASES[0])
    box |= {b"_command": b"AllTypes", b"_ask": b"1", b"i": digits}
    return amp.encode_box(box)


async def answer_of(port: int, data: bytes) -> dict[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        parser = amp.BoxParser()
        async with asyncio.timeout(10):
            while not (boxes := parser.feed(await reader.read(65536))):
                pass
        return boxes[0]
    finally:
        writer.close()


async def test_integers_up_to_the_limit_travel_and_beyond_it_fail_clearly(
    twisted_server: int,
) -> None:
    server = await amp.serve(Peer, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        async with await amp.connect("127.0.0.1", port, Peer) as conn:
            values: dict[str, Any] = {**CASES[0], "i": -(10 ** (LIMIT - 1))}
            answer = await asyncio.wait_for(conn.call_remote(AllTypes, **values), 10)
            assert answer is not None
            assert answer["i"] == values["i"]
            # One digit more cannot be sent: ArgumentError, with a message of its own.
            with pytest.raises(amp.ArgumentError, match=f"more than {LIMIT} digits") as info:
                await conn.call_remote(AllTypes, **{**values, "i": 10**LIMIT})
            assert "'i'=<int>" in str(info.value)
            assert await conn.call_remote(AllTypes, **CASES[0]) is not None  # still usable
        # Receiving more digits than that: an UNKNOWN error answer, as Twisted gives.
        too_long = all_types_call(b"1" * (LIMIT + 1))
        ours, twisted = await asyncio.gather(
            answer_of(port, too_long), answer_of(twisted_server, too_long)
        )
        assert ours[b"_error"] == twisted[b"_error"] == b"1"
        assert ours[b"_error_code"] == twisted[b"_error_code"] == b"UNKNOWN"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("value", [1.7, -0.5, float("inf"), decimal.Decimal("2.5"), "12"])
async def test_a_value_that_is_no_integer_is_refused_not_truncated(value: object) -> None:
    """``b"%d"`` wrote 1.7 as ``1`` and Decimal 2.5 as ``2`` (the receiver got another
    number); infinity failed with "cannot convert float infinity to integer". Now each
    is an ArgumentError that names the type, and nothing is sent."""
    server = await amp.serve(Peer, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        async with await amp.connect("127.0.0.1", port, Peer) as conn:
            with pytest.raises(amp.ArgumentError, match=r"'i'=.*an integer") as info:
                await conn.call_remote(AllTypes, **{**CASES[0], "i": value})
            assert type(info.value.__cause__) is TypeError
            # the connection is still usable, and an int subclass goes as its integer
            answer = await asyncio.wait_for(conn.call_remote(AllTypes, **CASES[0]), 10)
            assert answer is not None
            assert answer["i"] == CASES[0]["i"]
            answer = await asyncio.wait_for(
                conn.call_remote(AllTypes, **{**CASES[0], "i": True}), 10
            )
            assert answer is not None
            assert answer["i"] == 1
    finally:
        server.close()
        await server.wait_closed()
