"""A stop that arrives while a wait is ending is never lost.

On Python 3.11 ``asyncio.wait_for`` returns the result, and drops the caller's
cancellation, when the cancel lands in the same loop iteration as the awaited thing
completes; a server's stop then hangs because its fetch loop goes on fetching. Each test
completes what a call waits for and cancels the calling task 0, 1, 2, ... loop iterations
later: every task that accepted the cancel must end cancelled.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from amgi.runtime import Lifespan
from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport
from amgi.transport import Message
from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope

STEPS = 6  # loop iterations between completion and cancel: past the longest hand-off


async def settle_loop(iterations: int) -> None:
    for _ in range(iterations):
        await asyncio.sleep(0)


async def cancel_after_completion(
    call: Awaitable[Any], complete: Callable[[], object], steps: int
) -> bool:
    """Run ``call`` until it waits, ``complete()`` what it waits for, cancel it ``steps``
    iterations later. True when the task accepted the cancel (it was still running); the
    test fails if it then ends any other way than cancelled."""
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
        return True
    assert not accepted, f"the cancel was lost: the call returned {result!r}"
    return False


@pytest.mark.parametrize("steps", range(STEPS))
async def test_memory_fetch_keeps_a_cancel_that_meets_an_arriving_message(steps: int) -> None:
    name = f"race-{uuid.uuid4().hex}"
    broker = MemoryBroker.reset(name)
    transport = MemoryTransport(["q"], MemoryOptions(broker=name))
    await transport.connect()
    # a retry due later makes the fetch wait with a timeout (the hazard needs one)
    broker.put_later("q", Message("retry", [], b"later", {}), 60)
    try:
        accepted = await cancel_after_completion(
            transport.fetch(), lambda: broker.put("q", [], b"m"), steps
        )
        if accepted:  # a cancelled fetch took nothing: the message waits for the next one
            async with asyncio.timeout(5):
                batches = await transport.fetch()
            assert [m.payload for b in batches for m in b.messages] == [b"m"]
        else:
            assert broker.pending("q") == 1  # only the retry
    finally:
        await transport.close()
    if steps == 0:
        assert accepted, "a cancel in the completing iteration lands while the fetch waits"


class GatedApp:
    """A lifespan app that answers each lifespan event only once its gate opens."""

    def __init__(self) -> None:
        self.gates = {
            "startup": asyncio.get_running_loop().create_future(),
            "shutdown": asyncio.get_running_loop().create_future(),
        }

    def open(self, phase: str) -> Callable[[], None]:
        return lambda: self.gates[phase].set_result(None)

    async def __call__(
        self, scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable
    ) -> None:
        await receive()
        await self.gates["startup"]
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await self.gates["shutdown"]
        await send({"type": "lifespan.shutdown.complete"})


@pytest.mark.parametrize("steps", range(STEPS))
async def test_lifespan_startup_keeps_a_cancel_that_meets_the_answer(steps: int) -> None:
    app = GatedApp()
    lifespan = Lifespan(app, "on")
    try:
        accepted = await cancel_after_completion(lifespan.startup(5), app.open("startup"), steps)
    finally:
        await lifespan.cancel()
    if steps == 0:
        assert accepted, "a cancel in the completing iteration lands while the call waits"


@pytest.mark.parametrize("steps", range(STEPS))
async def test_lifespan_shutdown_keeps_a_cancel_that_meets_the_answer(steps: int) -> None:
    app = GatedApp()
    lifespan = Lifespan(app, "on")
    app.open("startup")()
    await lifespan.startup(5)
    try:
        accepted = await cancel_after_completion(lifespan.shutdown(5), app.open("shutdown"), steps)
    finally:
        await lifespan.cancel()
    if steps == 0:
        assert accepted, "a cancel in the completing iteration lands while the call waits"
