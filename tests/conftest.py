"""Fixtures for every test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """Put the root logger's handlers and level back after each test.

    ``amgi`` commands run in the test process install a handler on the root logger that
    writes to the ``sys.stderr`` of that moment, pytest's capture, which is closed after
    the test: left installed, every later log record would print ``--- Logging error ---``.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
