"""The Kafka client's error and log reporting: once per distinct reason, latest kept."""

from __future__ import annotations

import logging

import pytest

from amgi.servers.kafka._client_log import CLIENT_LOGGER, ClientErrors, Repeats


@pytest.fixture(autouse=True)
def _fresh_repeats() -> None:
    """The client logger's repeat filter is one per process: the real clients of other
    tests in this worker fill its table of recent lines (then a new line waits up to a
    minute), so each test here starts from an empty one."""
    for log_filter in CLIENT_LOGGER.filters:
        if isinstance(getattr(log_filter, "_repeats", None), Repeats):
            log_filter._repeats = Repeats()  # type: ignore[attr-defined]


class Err:
    """What librdkafka hands the error callback: a code and a text."""

    def __init__(self, code: int, text: str) -> None:
        self._code, self._text = code, text

    def code(self) -> int:
        return self._code

    def str(self) -> str:
        return self._text


def test_repeated_errors_are_logged_once_and_the_latest_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    errors = ClientErrors(logging.getLogger("test.kafka"))
    errors.connecting = False
    for ms in (1, 2, 7):
        errors(Err(-181, f"b/bootstrap: SSL handshake failed (after {ms}ms in state CONNECT)"))
    errors(Err(-187, "1/1 brokers are down"))
    logged = [r.getMessage() for r in caplog.records if r.name == "test.kafka"]
    assert logged == [
        "kafka client: b/bootstrap: SSL handshake failed",
        "kafka client: 1/1 brokers are down",
    ]
    assert errors.latest == "b/bootstrap: SSL handshake failed"  # not "brokers are down"


def test_errors_while_connecting_are_kept_for_the_connect_error_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connect that fails says why in its own error: a warning before it said it twice."""
    errors = ClientErrors(logging.getLogger("test.kafka"))
    errors(Err(-195, "b/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused"))
    errors(Err(-187, "1/1 brokers are down"))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert errors.latest == "b/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused"
    errors.connecting = False
    errors(Err(-187, "1/1 brokers are down"))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "kafka client: 1/1 brokers are down"
    ]


@pytest.mark.parametrize(
    ("code", "text", "hopeless"),
    [
        (-181, "SSL handshake failed: certificate verify failed (after 2ms in state X)", True),
        (-169, "SASL authentication error: Authentication failed", True),
        (-195, "Connect to ipv4#127.0.0.1:1 failed: Connection refused", False),
        (-181, "SSL handshake failed: Disconnected", False),
    ],
)
def test_only_a_refused_certificate_or_credentials_with_every_broker_down_is_hopeless(
    code: int, text: str, hopeless: bool
) -> None:
    errors = ClientErrors(logging.getLogger("test.kafka"))
    errors(Err(code, text))
    assert errors.hopeless() is None  # some broker may still answer
    errors(Err(-187, "1/1 brokers are down"))
    assert (errors.hopeless() is not None) is hopeless
    assert errors.latest is not None
    assert "brokers are down" not in errors.latest


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


def test_reports_that_differ_only_in_counts_are_one(caplog: pytest.LogCaptureFixture) -> None:
    """librdkafka's lines for requests a slow broker did not answer, as logged (each
    timeout a line of its own): every one was new to the repeat filter, a line per
    request timed out for as long as the broker stayed slow."""
    caplog.set_level(logging.DEBUG, logger=CLIENT_LOGGER.name)
    line = "%s [%s] %s"
    who = "amgi#producer-2"
    thread = "[thrd:127.0.0.1:24210/111]"
    for ms, count in ((6001, 3), (6998, 5), (5999, 2)):
        for n in range(count):
            CLIENT_LOGGER.info(
                line,
                "REQTMOUT",
                who,
                f"{thread}: 127.0.0.1:24210/111: Timed out ProduceRequest in flight "
                f"(after {ms}ms, timeout #{n})",
            )
        CLIENT_LOGGER.warning(
            line,
            "REQTMOUT",
            who,
            f"{thread}: 127.0.0.1:24210/111: Timed out {count} in-flight, "
            f"0 retry-queued, {count % 2} out-queue, 0 partially-sent requests",
        )
    CLIENT_LOGGER.warning(
        line, "REQTMOUT", who, "[thrd:b/112]: 127.0.0.1:24211/112: Timed out 1 in-flight"
    )
    assert [r.getMessage().split("]: ", 1)[1] for r in caplog.records] == [
        "127.0.0.1:24210/111: Timed out ProduceRequest in flight (after 6001ms, timeout #0)",
        "127.0.0.1:24210/111: Timed out 3 in-flight, 0 retry-queued, 1 out-queue, "
        "0 partially-sent requests",
        "127.0.0.1:24211/112: Timed out 1 in-flight",  # another broker's: its own line
    ]


def test_a_flood_of_distinct_errors_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """More distinct errors in a minute than the filter keeps: it forgot them all and
    logged every one again, a line per error for as long as the flood lasted."""
    errors = ClientErrors(logging.getLogger("test.kafka"))
    errors.connecting = False
    for _ in range(3):
        for broker in range(150):
            errors(Err(-195, f"10.0.{broker}.1:9092/{broker}: Connect failed: refused"))
    logged = [r for r in caplog.records if r.name == "test.kafka"]
    assert len(logged) == 100
    assert errors.latest == "10.0.149.1:9092/149: Connect failed: refused"
