"""An AMGI app for the ``amgi run --server http`` process tests.

Each call first receives its whole batch and writes one line per ``slow`` payload to
``HTTP_TEST_LOG`` (so a test knows those requests are in flight), then, if there was one,
sleeps ``HTTP_TEST_DELAY`` seconds (default 1). A message with header ``ce-target`` is
echoed there (``message.send``) before it is acked; a failed send nacks it. With
``HTTP_TEST_DONE`` set, each message's payload is written there (one line) before its ack.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

LOG = os.environ.get("HTTP_TEST_LOG", "http-test.log")
DELAY = float(os.environ.get("HTTP_TEST_DELAY", "1"))
DONE = os.environ.get("HTTP_TEST_DONE")


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "message":
        return
    batch = [await receive()]
    while batch[-1].get("more_messages", False):
        batch.append(await receive())
    slow = sum(1 for m in batch if m.get("payload") == b"slow")
    if slow:
        with open(LOG, "a") as f:  # noqa: ASYNC230 - a test log line
            f.write("started\n" * slow)
        await asyncio.sleep(DELAY)
    for message in batch:
        headers = dict(message["headers"])
        target = headers.get(b"ce-target")
        if target is not None:
            try:
                await send(
                    {
                        "type": "message.send",
                        "address": target.decode(),
                        "headers": [(b"via", b"http")],
                        "payload": message.get("payload"),
                        "bindings": {"kafka": {"key": headers.get(b"ce-id", b"")}},
                    }
                )
            except OSError as exc:
                await send({"type": "message.nack", "id": message["id"], "message": str(exc)})
                continue
        if DONE is not None:
            with open(DONE, "ab") as f:  # noqa: ASYNC230 - a test log line
                f.write(message.get("payload", b"") + b"\n")
        await send({"type": "message.ack", "id": message["id"]})
