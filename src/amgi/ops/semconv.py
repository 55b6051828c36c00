"""OpenTelemetry messaging semantic-convention names shared by metrics and tracing."""

from __future__ import annotations

__all__ = ["messaging_system"]

# The convention's well-known ``messaging.system`` values where a server maps onto one.
_SYSTEMS = {"amqp": "rabbitmq", "sqs": "aws_sqs"}


def messaging_system(server: str) -> str:
    """The ``messaging.system`` value for the server called ``server`` (``--server``)."""
    return _SYSTEMS.get(server, server)
