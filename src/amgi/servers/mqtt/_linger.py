"""An orderly end of an MQTT connection: wait until the broker has read what was sent.

Closing a socket whose receive buffer still holds data (messages the broker pushed that
nobody read) resets the connection, and a broker that is slow to read can then lose the
acknowledgements written just before; a broker can also hand the session to the next
connection before reading them. After DISCONNECT the broker reads everything before it and
closes its side: waiting for that end of file means every PUBACK sent was taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def linger_until_peer_closes(fileno: int, timeout: float) -> Iterator[asyncio.Future[None]]:
    """Keep a duplicate of the socket ``fileno`` open; the future yielded resolves when the
    peer closes the connection (what arrives meanwhile is dropped), or after ``timeout``.

    Call from a coroutine on the running loop; await the future inside the block."""
    loop = asyncio.get_running_loop()
    copy = socket.socket(fileno=os.dup(fileno))
    copy.setblocking(False)
    ended: asyncio.Future[None] = loop.create_future()

    def end() -> None:
        if not ended.done():
            ended.set_result(None)

    def readable() -> None:
        try:
            while copy.recv(65536):
                pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        end()

    loop.add_reader(copy.fileno(), readable)
    timer = loop.call_later(timeout, end)
    try:
        yield ended
    finally:
        timer.cancel()
        loop.remove_reader(copy.fileno())
        copy.close()
        if not ended.done():
            ended.cancel()
