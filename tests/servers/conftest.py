"""Fixtures shared by the server test modules."""

from __future__ import annotations

from tests.servers.mosquitto.broker import mosquitto

__all__ = ["mosquitto"]
