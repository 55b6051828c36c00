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
from collections.abc import Callable

import pytest

from amgi.runtime import Lifespan
from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport
from amgi.transport import Message
from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope
from tests.races import STEPS, cancel_after_completion


@pytest.mark.parametrize("steps", range(STEPS))
async def test_memory_fetch_keeps_a_cancel_that_meets_an_arriving_message(steps: int) -> None:
    name = f"race-{uuid.uuid4().hex}"
    broker = MemoryBroker.reset(name)
    transport = MemoryTransport(["q"], MemoryOptions(broker=name))
    await transport.connect()
    # a retry due later makes the fetch wait with a timeout (the hazard needs one)
    broker.put_later("q", Message("retry", [], b"later", {}), 60)
    try:
        fetch = await cancel_after_completion(
            transport.fetch(), lambda: broker.put("q", [], b"m"), steps
        )
        if fetch.cancelled():  # a cancelled fetch took nothing: the message waits for the next one
            async with asyncio.timeout(5):
                batches = await transport.fetch()
            assert [m.payload for b in batches for m in b.messages] == [b"m"]
        else:
            assert broker.pending("q") == 1  # only the retry
    finally:
        await transport.close()
    if steps == 0:
        assert fetch.cancelled(), "a cancel in the completing iteration lands while it waits"


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
        call = await cancel_after_completion(lifespan.startup(5), app.open("startup"), steps)
    finally:
        await lifespan.cancel()
    if steps == 0:
        assert call.cancelled(), "a cancel in the completing iteration lands while it waits"


@pytest.mark.parametrize("steps", range(STEPS))
async def test_lifespan_shutdown_keeps_a_cancel_that_meets_the_answer(steps: int) -> None:
    app = GatedApp()
    lifespan = Lifespan(app, "on")
    app.open("startup")()
    await lifespan.startup(5)
    try:
        call = await cancel_after_completion(lifespan.shutdown(5), app.open("shutdown"), steps)
    finally:
        await lifespan.cancel()
    if steps == 0:
        assert call.cancelled(), "a cancel in the completing iteration lands while it waits"
