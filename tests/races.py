"""Cancel a call just as the thing it waits for completes (see tests/core/test_cancel_races.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

STEPS = 6  # loop iterations between completion and cancel: past the longest hand-off


async def settle_loop(iterations: int) -> None:
    for _ in range(iterations):
        await asyncio.sleep(0)


async def cancel_after_completion(
    call: Awaitable[Any], complete: Callable[[], object], steps: int
) -> asyncio.Future[Any]:
    """Run ``call`` until it waits, ``complete()`` what it waits for, cancel it ``steps``
    iterations later, and return its finished task: cancelled when it accepted the cancel
    (it was still running); the test fails if it accepted it and then ended otherwise."""
    task = asyncio.ensure_future(call)
    await settle_loop(STEPS)
    assert not task.done(), "the call must be waiting before it is completed"
    complete()
    await settle_loop(steps)
    accepted = task.cancel()
    try:
        async with asyncio.timeout(5):
            result = await task
    except asyncio.CancelledError:
        assert accepted, "nobody else cancels this task"
        return task
    except TimeoutError:
        raise AssertionError("the cancel was lost: the call went on waiting") from None
    assert not accepted, f"the cancel was lost: the call returned {result!r}"
    return task
