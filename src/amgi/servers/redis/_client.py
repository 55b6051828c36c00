"""redis-py's asyncio client as the Redis server uses it: raw replies, one-line errors."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.servers.kit import mask_url

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RAW_COMMANDS", "open_client", "raise_if_cancelled"]

RAW_COMMANDS = (
    "XREADGROUP", "XAUTOCLAIM", "XCLAIM", "XPENDING", "XADD", "XACK", "XGROUP CREATE", "XRANGE",
    "XREVRANGE", "XINFO GROUPS",
)  # fmt: skip
"""Commands whose replies are taken as the server sent them (entry fields may repeat)."""


def _raw(response: Any, **_: Any) -> Any:
    return response


async def open_client(url: str, connect_timeout: float) -> Redis:
    """A connected client for ``url`` (RESP2, bytes replies), checked with PING."""
    import redis.asyncio as aioredis
    from redis import exceptions as redis_errors

    shown = mask_url(url)
    try:
        client = aioredis.Redis.from_url(
            url, protocol=2, socket_connect_timeout=connect_timeout, health_check_interval=0
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
            f"redis: cannot connect to {shown}: {exc or type(exc).__name__}"
        ) from None
    return client


def raise_if_cancelled() -> None:
    """Raise when this task was asked to stop: redis-py can swallow a cancellation that
    arrives while it opens a connection, and the next blocking read would then wait."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
