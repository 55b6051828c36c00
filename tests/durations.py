"""A pytest plugin for runs on several interpreters (``-p tests.durations``, used by
``scripts/pytest-versions``): one run records how long each test took, a later run leaves
out the tests that took at least a given time in it.

The record lives in pytest's cache (key ``amgi/durations``), per test id, in seconds
(setup, call and teardown together); a run updates the ids it ran and keeps the others.
A test with no record is never left out.
"""

from __future__ import annotations

from typing import Any

import pytest

CACHE_KEY = "amgi/durations"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("amgi durations")
    group.addoption(
        "--record-durations",
        action="store_true",
        help="store each test's duration in the pytest cache for a later --leave-out-slower-than",
    )
    group.addoption(
        "--leave-out-slower-than",
        type=float,
        metavar="SECONDS",
        help="deselect the tests whose recorded duration is at least SECONDS",
    )


def _cache(config: pytest.Config) -> Any:
    return getattr(config, "cache", None)  # None under -p no:cacheprovider


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("record_durations"):
        config.pluginmanager.register(_Recorder(config), "amgi-durations-recorder")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    limit = config.getoption("leave_out_slower_than")
    cache = _cache(config)
    if limit is None or cache is None:
        return
    recorded: dict[str, float] = cache.get(CACHE_KEY, {})
    slow = [item for item in items if recorded.get(item.nodeid, 0.0) >= limit]
    if slow:
        left_out = set(map(id, slow))
        items[:] = [item for item in items if id(item) not in left_out]
        config.hook.pytest_deselected(items=slow)


def pytest_report_header(config: pytest.Config) -> str | None:
    limit = config.getoption("leave_out_slower_than")
    if limit is None:
        return None
    if _cache(config) is None:
        return "durations: no pytest cache, so no test is left out"
    return f"durations: tests that took {limit:g} s or more in the recorded run are deselected"


class _Recorder:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self) -> None:
        cache = _cache(self.config)
        if cache is None or not self.seconds:
            return
        recorded: dict[str, float] = cache.get(CACHE_KEY, {})
        recorded.update({nodeid: round(s, 3) for nodeid, s in self.seconds.items()})
        cache.set(CACHE_KEY, recorded)
