"""redis-py's asyncio client as the Redis server uses it: raw replies, one-line errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.servers.kit import mask_url, untrusted_certificate

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RAW_COMMANDS", "execute_packed", "open_client", "pack", "raise_if_cancelled"]

RAW_COMMANDS = (
    "XREADGROUP", "XAUTOCLAIM", "XCLAIM", "XPENDING", "XADD", "XACK", "XGROUP CREATE", "XRANGE",
    "XREVRANGE", "XINFO GROUPS",
)  # fmt: skip
"""Commands whose replies are taken as the server sent them (entry fields may repeat)."""


_BULK = b"$%d\r\n%b\r\n"


def pack(args: Sequence[bytes]) -> bytes:
    """``args`` as one command in Redis's wire format (RESP arrays of bulk strings)."""
    return b"*%d\r\n%b" % (
        len(args),
        b"".join(map(_BULK.__mod__, zip(map(len, args), args, strict=True))),
    )


async def execute_packed(
    client: Redis, command: bytes, lost: Callable[[], None] | None = None
) -> Any:
    """Send a ``pack``-ed command and return its raw reply.

    redis-py packs a command argument by argument in Python, about a microsecond each: an
    ``XACK`` of a thousand ids is packed here in one join instead. The connection pool,
    reconnect-and-retry and the error types stay redis-py's. ``lost`` is called when a
    connection fails under the command: Redis may have run it without its reply coming.
    """
    pool: Any = client.connection_pool
    conn = await pool.get_connection()

    async def attempt() -> Any:
        await conn.send_packed_command(command)
        return await conn.read_response()

    async def failed(_: Exception) -> None:
        if lost is not None:
            lost()
        await conn.disconnect()

    try:
        return await conn.retry.call_with_retry(attempt, failed)
    finally:
        await pool.release(conn)


def _raw(response: Any, **_: Any) -> Any:
    return response


TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
"""``rediss://`` query arguments that name files: the CA, the client certificate and key."""


def check_url(url: str, shown: str) -> None:
    """Fail before connecting on what redis-py would fail on unclearly or take silently:
    a URL that does not parse, a database that is no number (redis-py uses 0), a TLS file
    named in the query that cannot be read."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"redis: bad url {shown}: {exc}") from None
    db = parts.path.strip("/")
    if parts.scheme in ("redis", "rediss") and db and not (db.isascii() and db.isdigit()):
        raise ConfigurationError(
            f"redis: bad url {shown}: the database (the URL's path) must be a number"
        )
    query = parse_qs(parts.query)
    for name in TLS_FILES:
        for value in query.get(name, []):
            if not Path(value).is_file():
                raise ConfigurationError(f"redis: {name} {value!r} of {shown} is not a file")


def _connect_failure(exc: BaseException) -> str:
    """Why a connection failed, in words: an untrusted TLS certificate said as such."""
    refused = untrusted_certificate(exc)
    if refused is not None:
        return (
            f"the server's TLS certificate is not trusted ({refused}); "
            "name the CA that signed it with ?ssl_ca_certs=FILE"
        )
    return str(exc) or type(exc).__name__


async def open_client(url: str, connect_timeout: float, read_timeout: float) -> Redis:
    """A connected client for ``url`` (RESP2, bytes replies), checked with PING, that waits
    at most ``read_timeout`` seconds for a reply (longer than any blocking read: redis-py
    8 waits 5 s by default, which cut an ``XREADGROUP BLOCK`` of 5 s or more short, and
    older ones without end, which hung on a server that went silent)."""
    import redis.asyncio as aioredis
    from redis import exceptions as redis_errors

    shown = mask_url(url)
    check_url(url, shown)
    try:
        client = aioredis.Redis.from_url(
            url,
            protocol=2,
            socket_connect_timeout=connect_timeout,
            socket_timeout=read_timeout,
            health_check_interval=0,
        )
    except ValueError as exc:
        raise ConfigurationError(f"redis: bad url {shown}: {exc}") from None
    for command in RAW_COMMANDS:
        client.set_response_callback(command, _raw)
    try:
        await client.ping()
    except (redis_errors.AuthenticationError, redis_errors.AuthenticationWrongNumberOfArgsError):
        await client.aclose()
        raise BrokerUnavailable(f"redis: the server at {shown} refused the credentials") from None
    except redis_errors.ResponseError as exc:
        await client.aclose()
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise BrokerUnavailable(
                f"redis: the server at {shown} refused the credentials"
            ) from None
        raise BrokerUnavailable(f"redis: the server at {shown} answered: {exc}") from None
    except (redis_errors.RedisError, OSError) as exc:
        await client.aclose()
        raise BrokerUnavailable(
            f"redis: cannot connect to {shown}: {_connect_failure(exc)}"
        ) from None
    return client


def raise_if_cancelled() -> None:
    """Raise when this task was asked to stop: redis-py can swallow a cancellation that
    arrives while it opens a connection, and the next blocking read would then wait."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
