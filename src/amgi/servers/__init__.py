"""The protocol servers, by the name given to ``--server``.

Each entry points at a :class:`amgi.transport.Transport` subclass. A server module is
importable without its client library; :func:`installed` tells which ones can run here.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import TYPE_CHECKING

from amgi.errors import ConfigurationError

if TYPE_CHECKING:
    from amgi.transport import Transport

__all__ = ["DEFAULT_SERVER", "SERVERS", "installed", "load"]

logger = logging.getLogger("amgi.servers")

DEFAULT_SERVER = "sqlite"

SERVERS: dict[str, str] = {
    "sqlite": "amgi.servers.sqlite:SqliteTransport",
    "memory": "amgi.servers.memory:MemoryTransport",
    "kafka": "amgi.servers.kafka:KafkaTransport",
    "amqp": "amgi.servers.amqp:AmqpTransport",
    "mqtt": "amgi.servers.mqtt:MqttTransport",
    "sqs": "amgi.servers.sqs:SqsTransport",
    "amp": "amgi.servers.amp:AmpTransport",
    "http": "amgi.servers.http:HttpTransport",
    "redis": "amgi.servers.redis:RedisTransport",
    "nats": "amgi.servers.nats:NatsTransport",
}


def load(name: str) -> type[Transport]:
    """Return the transport class registered as ``name``."""
    try:
        target = SERVERS[name]
    except KeyError:
        known = ", ".join(sorted(SERVERS))
        raise ConfigurationError(f"unknown server {name!r} (known: {known})") from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ConfigurationError(f"server {name!r} is not part of this build") from None
        raise
    transport: type[Transport] = getattr(module, attr)
    return transport


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package of a dotted name is missing
        return False


def missing_requirements(transport: type[Transport]) -> list[str]:
    """The client modules ``transport`` needs that are not installed."""
    return [mod for mod in transport.requires if not _installed(mod)]


def installed() -> dict[str, type[Transport]]:
    """Servers whose module exists, by name (their client library may still be missing)."""
    found: dict[str, type[Transport]] = {}
    for name in SERVERS:
        try:
            found[name] = load(name)
        except ConfigurationError:
            continue
        except Exception as exc:  # a broken server module must not break the others
            logger.warning("server %r cannot be loaded: %s: %s", name, type(exc).__name__, exc)
    return found
