"""Flow control over real sockets: write back-pressure on callers, and reading that goes
on for answers to our own calls while the peer's calls are held back."""

from __future__ import annotations

import asyncio

import pytest
from amp_helpers import Drop

from amgi import amp

MB = 1_000_000


class Put(amp.Command):
    arguments = [(b"data", amp.BigBytes())]


@pytest.mark.parametrize("command", [Put, Drop])
async def test_every_caller_waits_while_writing_is_paused(
    silent_port: int, command: type[amp.Command]
) -> None:
    # 100 callers start in one loop iteration, before the transport can pause writing;
    # 20 of them wait for a slot of max_outstanding_calls and get it later.
    conn = await amp.connect(
        "127.0.0.1", silent_port, lambda: amp.AMP(max_outstanding_calls=80, close_timeout=0.1)
    )
    calls = [asyncio.ensure_future(conn.call_remote(command, data=b"x" * MB)) for _ in range(100)]
    try:
        await asyncio.sleep(0.3)
        assert conn.transport is not None
        high = conn.transport.get_write_buffer_limits()[1]
        # The high-water mark plus one box (plus what the kernel took).
        assert conn.transport.get_write_buffer_size() <= high + 1.1 * MB
        # Nothing is answered; of the calls without answer, the few written returned.
        assert sum(call.done() for call in calls) <= (0 if command is Put else 10)
    finally:
        for call in calls:
            call.cancel()
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), 5)
