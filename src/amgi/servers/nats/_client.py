"""nats-py as the NATS server uses it: one connection, one-line errors, logged callbacks."""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING, Any

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.servers.kit import mask_url

if TYPE_CHECKING:
    from nats.aio.client import Client

    from amgi.servers.nats import NatsOptions

__all__ = ["open_connection"]

logger = logging.getLogger("amgi.servers.nats")


def _tls(options: NatsOptions) -> ssl.SSLContext | None:
    if not (options.tls or options.tls_ca or options.tls_cert):
        return None
    context = ssl.create_default_context(cafile=options.tls_ca or None)
    if options.tls_cert:
        context.load_cert_chain(options.tls_cert, options.tls_key or None)
    return context


async def open_connection(options: NatsOptions) -> Client:
    """Connect to ``options.servers`` (reconnecting by itself afterwards, without limit)."""
    import nats
    from nats import errors as nats_errors

    servers = [s.strip() for s in options.servers.split(",") if s.strip()]

    async def on_error(exc: Exception) -> None:
        logger.warning("connection error: %s", exc or type(exc).__name__)

    connected: list[Client] = []

    async def on_disconnected() -> None:
        if connected and not connected[0].is_closed:
            logger.warning("disconnected from the NATS server; reconnecting")

    async def on_reconnected() -> None:
        logger.info("reconnected to the NATS server")

    kwargs: dict[str, Any] = {
        "servers": servers,
        "connect_timeout": options.connect_timeout,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
        "name": "amgi",
    }
    if options.user:
        kwargs["user"] = options.user
        kwargs["password"] = options.password
    if options.token:
        kwargs["token"] = options.token
    if options.creds:
        kwargs["user_credentials"] = options.creds
    if options.nkey_seed:
        kwargs["nkeys_seed"] = options.nkey_seed
    try:
        kwargs["tls"] = _tls(options)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"nats: cannot load the TLS files: {exc}") from None
    shown = ", ".join(mask_url(s) for s in servers)  # a server URL may hold user:password
    first_error: list[BaseException] = []

    async def on_first_error(exc: Exception) -> None:
        first_error.append(exc)

    kwargs["error_cb"] = on_first_error
    try:
        # Two tries per server at startup (nats-py would otherwise retry for ever).
        client = await nats.connect(
            **{**kwargs, "allow_reconnect": False, "max_reconnect_attempts": 1}
        )
    except nats_errors.NoServersError:
        reason = first_error[0] if first_error else "no server answered"
        if (
            isinstance(reason, nats_errors.AuthorizationError)
            or "authorization" in str(reason).lower()
        ):
            raise BrokerUnavailable(f"nats: {shown} refused the credentials") from None
        raise BrokerUnavailable(f"nats: cannot connect to {shown}: {reason}") from None
    except (nats_errors.Error, OSError, TimeoutError) as exc:
        if "authorization" in str(exc).lower():
            raise BrokerUnavailable(f"nats: {shown} refused the credentials") from None
        raise BrokerUnavailable(f"nats: cannot connect to {shown}: {exc!r}") from None
    connected.append(client)
    # Connected once: from now on reconnect without limit.
    client.options["allow_reconnect"] = True
    client.options["max_reconnect_attempts"] = -1
    client._error_cb = on_error
    return client
