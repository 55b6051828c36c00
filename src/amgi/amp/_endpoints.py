"""Opening AMP connections: connect to and serve on TCP and UNIX sockets."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

from ._protocol import AMP
from ._unix import UnixServer, open_unix_connection, start_unix_server

__all__ = ["connect", "connect_unix", "serve", "serve_unix"]

P = TypeVar("P", bound=AMP)


async def connect(
    host: str,
    port: int,
    protocol_factory: Callable[[], P] = AMP,  # type: ignore[assignment]
    **kwargs: Any,
) -> P:
    """Open a TCP connection and return the connected protocol instance.

    Extra keyword arguments go to :meth:`asyncio.loop.create_connection`
    (for example ``ssl=``).
    """
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(protocol_factory, host, port, **kwargs)
    return protocol


async def serve(
    protocol_factory: Callable[[], AMP],
    host: str = "127.0.0.1",
    port: int = 0,
    **kwargs: Any,
) -> asyncio.Server:
    """Start a TCP server; each connection gets ``protocol_factory()``.

    Extra keyword arguments go to :meth:`asyncio.loop.create_server`.
    """
    loop = asyncio.get_running_loop()
    return await loop.create_server(protocol_factory, host, port, **kwargs)


async def connect_unix(
    path: str | os.PathLike[str],
    protocol_factory: Callable[[], P] = AMP,  # type: ignore[assignment]
) -> P:
    """Connect to the UNIX socket ``path``; the connection can pass file descriptors
    (:class:`Descriptor` arguments), like Twisted's ``connectUNIX``."""
    _, protocol = await open_unix_connection(path, protocol_factory)
    return cast(P, protocol)


async def serve_unix(
    protocol_factory: Callable[[], AMP], path: str | os.PathLike[str]
) -> UnixServer:
    """Listen on the UNIX socket ``path`` (created; must not exist; ``close()`` removes
    it while it is still this server's); each connection gets ``protocol_factory()``
    and can pass file descriptors."""
    return await start_unix_server(protocol_factory, path)
