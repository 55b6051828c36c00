"""What the no-secret-leaks tests share: a unique marker, and the places it must not reach.

A test puts :func:`new_marker` into a password, token or key, drives the failure paths of
a server, and hands every text a user or an operator could see (log records captured at
DEBUG, exception texts, the output of ``amgi`` processes) to :func:`assert_hidden`.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Iterable

import pytest

__all__ = [
    "assert_hidden",
    "capture_debug",
    "exception_text",
    "log_texts",
    "new_marker",
]


def new_marker() -> str:
    """A string found nowhere else: put it in a secret, then look for it."""
    return f"MARKER-{uuid.uuid4().hex[:12]}"


def assert_hidden(marker: str, texts: Iterable[str]) -> None:
    """Fail, showing the line, if ``marker`` is in any of ``texts``."""
    for text in texts:
        if marker in text:
            line = next(line for line in text.splitlines() if marker in line)
            raise AssertionError(f"a secret leaked: {line[:500]!r}")


def exception_text(exc: BaseException) -> str:
    """Everything an exception shows: its traceback with the chained ones, and its repr."""
    return "".join(traceback.format_exception(exc)) + repr(exc)


def capture_debug(caplog: pytest.LogCaptureFixture) -> None:
    """Capture every log record from here on, client libraries' included, at DEBUG."""
    caplog.set_level(logging.DEBUG)


def log_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Each captured record as a handler writes it (arguments merged, traceback added)."""
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    return [formatter.format(record) for record in caplog.records]
