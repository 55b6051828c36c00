"""The Kafka client's error and log reporting: once per distinct reason, latest kept."""

from __future__ import annotations

import logging

import pytest

from amgi.servers._kafka_client_log import CLIENT_LOGGER, ClientErrors


def test_repeated_errors_are_logged_once_and_the_latest_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    errors = ClientErrors(logging.getLogger("test.kafka"))
    for ms in (1, 2, 7):
        errors(f"b/bootstrap: SSL handshake failed (after {ms}ms in state SSL_HANDSHAKE)")
    errors("1/1 brokers are down")
    logged = [r.getMessage() for r in caplog.records if r.name == "test.kafka"]
    assert logged == [
        "kafka client: b/bootstrap: SSL handshake failed",
        "kafka client: 1/1 brokers are down",
    ]
    assert errors.latest == "1/1 brokers are down"


def test_client_log_drops_connection_failures_and_repeats(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=CLIENT_LOGGER.name)
    line = "%s [%s] %s"
    CLIENT_LOGGER.error(line, "FAIL", "amgi#producer-1", "Connect to ipv4#127.0.0.1:1 failed")
    for _ in range(3):
        CLIENT_LOGGER.warning(line, "CONFWARN", "amgi#consumer-2", "property ignored (unique-1)")
    assert [r.getMessage() for r in caplog.records if r.name == CLIENT_LOGGER.name] == [
        "CONFWARN [amgi#consumer-2] property ignored (unique-1)"
    ]
