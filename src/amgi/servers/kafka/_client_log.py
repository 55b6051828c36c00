"""What the Kafka client library reports on its own: errors and log lines.

librdkafka retries a failing connection (refused, TLS handshake, authentication) every
few hundred milliseconds and reports every attempt, as an error and as a log line.
:class:`ClientErrors` logs each distinct error once a minute at most and keeps the latest,
so that a connect that times out can say why instead of only that it timed out. The
client's own log lines go to :data:`CLIENT_LOGGER`, without the connection failures
(reported as errors already) and with repeats dropped the same way.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Final

__all__ = ["CLIENT_LOGGER", "ClientErrors", "Repeats"]

_REPEAT_AFTER: Final = 60.0
# "(after 1ms in state SSL_HANDSHAKE)": differs between otherwise equal reports.
_TIMING: Final = re.compile(
    r"\s*\(after \d+ms in state \w+(, \d+ identical error\(s\) suppressed)?\)"
)


_MAX_DISTINCT: Final = 100
"""Most distinct texts reported in a minute; the rest wait for a place."""
# "timeout #3", "Timed out 5 in-flight, 0 retry-queued": counts that differ between
# reports of one event (not a number of an address, a broker id or a version).
_COUNT: Final = re.compile(r"(?<![\w.:/-])\d+(?![\w.:/-])|\(after \d+ms")


class Repeats:
    """Says whether a text was already reported in the last minute (counts in it aside)."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def fresh(self, text: str) -> bool:
        now = time.monotonic()
        key = _COUNT.sub("#", text)
        if now - self._seen.get(key, -_REPEAT_AFTER) < _REPEAT_AFTER:
            return False
        if len(self._seen) >= _MAX_DISTINCT:
            # Only texts reported over a minute ago are forgotten: forgetting them all
            # made a flood of more distinct texts than that a line per error again.
            self._seen = {k: t for k, t in self._seen.items() if now - t < _REPEAT_AFTER}
            if len(self._seen) >= _MAX_DISTINCT:
                return False
        self._seen[key] = now
        return True


class _ClientLogFilter(logging.Filter):
    """Drops librdkafka's connection-failure lines (``FAIL``) and repeats of a line."""

    def __init__(self) -> None:
        super().__init__()
        self._repeats = Repeats()

    def filter(self, record: logging.LogRecord) -> bool:
        # confluent-kafka logs ("%s [%s] %s", facility, client name, text).
        args = record.args
        if isinstance(args, tuple) and len(args) == 3:
            if args[0] == "FAIL":
                return False
            return self._repeats.fresh(_TIMING.sub("", str(args[2])))
        return True


CLIENT_LOGGER: Final = logging.getLogger("amgi.servers.kafka.client")
"""Where librdkafka's own log lines go (its ``logger`` setting), instead of stderr."""
CLIENT_LOGGER.addFilter(_ClientLogFilter())


# librdkafka error codes (stable parts of its ABI), so that this module needs no client.
_ALL_BROKERS_DOWN: Final = -187
_AUTHENTICATION: Final = -169


class ClientErrors:
    """The client's ``error_cb``: logs each distinct error once a minute, keeps the latest.

    :attr:`latest` is the latest error other than "all brokers down", which says nothing
    of why. :meth:`hopeless` tells a connect to stop waiting: every broker is down and
    the last reason was a refused certificate or refused credentials, which retrying
    the same settings cannot fix.
    """

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._repeats = Repeats()
        self.connecting = True
        """While True, errors are kept but logged at DEBUG only: a connect that fails
        raises them as its own error, once (set to False once connected)."""
        self.latest: str | None = None
        self._all_down = False
        self._refused: str | None = None

    def __call__(self, err: Any) -> None:
        text = err.str() if hasattr(err, "str") else str(err)
        code = err.code() if hasattr(err, "code") else None
        reason = _TIMING.sub("", text)
        if code == _ALL_BROKERS_DOWN:
            self._all_down = True
        else:
            self.latest = reason
            refused = code == _AUTHENTICATION or "certificate verify failed" in reason
            self._refused = reason if refused else None
        if self.connecting:
            self._log.debug("kafka client, connecting: %s", reason)
        elif self._repeats.fresh(reason):
            self._log.warning("kafka client: %s", reason)

    def hopeless(self) -> str | None:
        """Why waiting longer to connect cannot help, or None while it still might."""
        return self._refused if self._all_down else None
