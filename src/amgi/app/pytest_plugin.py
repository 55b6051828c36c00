"""A pytest fixture for :class:`~amgi.app.testing.TestClient`.

Enable it with ``pytest_plugins = ["amgi.app.pytest_plugin"]`` in ``conftest.py`` and define
a fixture ``amgi_app`` returning your App; tests then take ``amgi_client``, a started
TestClient (lifespan run before the test, shut down after it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from amgi.app.testing import TestClient
from amgi.types import AMGIApplication

__all__ = ["amgi_client"]


@pytest_asyncio.fixture
async def amgi_client(amgi_app: AMGIApplication) -> AsyncIterator[TestClient]:
    """A started :class:`TestClient` for the ``amgi_app`` fixture."""
    async with TestClient(amgi_app) as client:
        yield client
