"""Fixtures shared by the server test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers.mosquitto.broker import Mosquitto


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A private Mosquitto for one test module, stopped at its end."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()
