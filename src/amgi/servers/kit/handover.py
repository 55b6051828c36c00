"""Waiting, at a stop, for the broker's answer to a read in flight (see ``Transport.hand_over``).

A long poll (SQS ``ReceiveMessage``, Redis ``XREADGROUP BLOCK``) cannot be called off at the
broker: cut off at the client, what it takes is lost to this process and comes back with
its attempt counted. So a stop waits for the answer, which the broker gives within the
request's own wait time; one still open a little after that (the broker gone, a
reconnect) is left to ``close``, which cuts it off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

__all__ = ["ANSWER_SLACK", "await_answers"]

ANSWER_SLACK = 2.0
"""Seconds past a request's wait time that a stop waits for its answer."""


async def await_answers(reads: Iterable[asyncio.Future[Any]], wait_time: float) -> None:
    """Wait until ``reads`` are done, at most ``wait_time`` + :data:`ANSWER_SLACK` seconds."""
    pending = [r for r in reads if not r.done()]
    if pending:
        await asyncio.wait(pending, timeout=wait_time + ANSWER_SLACK)
