"""amgi.app on the in-memory server: what reaches the broker, the retries and the dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from amgi.app import App
from amgi.runtime.config import RuntimeConfig
from amgi.runtime.server import Runtime
from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport

JSON = [(b"content-type", b"application/json")]


@contextlib.asynccontextmanager
async def serving(app: App, broker: str, addresses: list[str]) -> AsyncIterator[None]:
    """``app`` consuming ``addresses`` of the named memory broker for the block."""
    config = RuntimeConfig(max_attempts=3, retry_delay=0.01, retry_delay_max=0.05, crash_ledger="")
    transport = MemoryTransport(addresses, MemoryOptions(broker=broker))
    runtime = Runtime(app, transport, config)
    task = asyncio.create_task(runtime.serve())
    started = asyncio.create_task(runtime.started.wait())
    await asyncio.wait({task, started}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert started.done(), task.result() if task.done() else "the server did not start"
    try:
        yield
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(task, 30) == 0


async def until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def new_broker() -> tuple[str, MemoryBroker]:
    name = f"app-{uuid.uuid4().hex[:8]}"
    return name, MemoryBroker.reset(name)


async def test_a_decoder_that_raises_dead_letters_that_message_only() -> None:
    name, broker = new_broker()
    app = App(decoders={"application/x-j": json.loads})
    calls: list[list[dict[str, int]]] = []

    @app.subscriber("batch", batch=True)
    async def on_batch(items: list[dict[str, int]]) -> None:
        calls.append(items)

    custom = [(b"content-type", b"application/x-j")]
    for payload in (b'{"n": 1}', b"{not json", b'{"n": 3}'):
        broker.put("batch", custom, payload)
    async with serving(app, name, ["batch"]):
        await until(lambda: bool(calls) and bool(broker.dead.get("batch")), "the batch")
        await asyncio.sleep(0.1)  # nothing comes back for a second call
    assert calls == [[{"n": 1}, {"n": 3}]]
    ((message, reason),) = broker.dead["batch"]
    assert message.payload == b"{not json"
    assert message.attempt == 1
    assert reason.startswith("invalid payload for ")
    assert reason.endswith(
        "parameter 'items': content-type 'application/x-j': the decoder raised "
        "JSONDecodeError: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)"
    )
    assert broker.pending("batch") == 0
