"""An AMGI app for the ``amgi run --server http`` process tests.

A payload ``slow`` makes its batch take ``HTTP_TEST_DELAY`` seconds (default 1) and
writes a line to ``HTTP_TEST_LOG`` when the batch starts, so a test knows it is in
flight. A message with header ``ce-target`` is echoed there (``message.send``) before it
is acked; a failed send nacks it.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

LOG = os.environ.get("HTTP_TEST_LOG", "http-test.log")
DELAY = float(os.environ.get("HTTP_TEST_DELAY", "1"))


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "message":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_messages", False)
        payload = message.get("payload") or b""
        if payload == b"slow":
            with open(LOG, "a") as f:  # noqa: ASYNC230 - a test log line
                f.write("started\n")
            await asyncio.sleep(DELAY)
        headers = dict(message["headers"])
        target = headers.get(b"ce-target")
        if target is not None:
            try:
                await send(
                    {
                        "type": "message.send",
                        "address": target.decode(),
                        "headers": [(b"via", b"http")],
                        "payload": payload,
                        "bindings": {"kafka": {"key": headers.get(b"ce-id", b"")}},
                    }
                )
            except OSError as exc:
                await send({"type": "message.nack", "id": message["id"], "message": str(exc)})
                continue
        await send({"type": "message.ack", "id": message["id"]})
