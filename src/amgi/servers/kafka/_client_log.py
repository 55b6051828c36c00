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

__all__ = ["CLIENT_LOGGER", "ClientErrors"]

_REPEAT_AFTER: Final = 60.0
# "(after 1ms in state SSL_HANDSHAKE)": differs between otherwise equal reports.
_TIMING: Final = re.compile(
    r"\s*\(after \d+ms in state \w+(, \d+ identical error\(s\) suppressed)?\)"
)


class _Repeats:
    """Says whether a text was already reported in the last minute."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def fresh(self, text: str) -> bool:
        now = time.monotonic()
        if now - self._seen.get(text, -_REPEAT_AFTER) < _REPEAT_AFTER:
            return False
        if len(self._seen) > 100:
            self._seen.clear()
        self._seen[text] = now
        return True


class _ClientLogFilter(logging.Filter):
    """Drops librdkafka's connection-failure lines (``FAIL``) and repeats of a line."""

    def __init__(self) -> None:
        super().__init__()
        self._repeats = _Repeats()

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
        self._repeats = _Repeats()
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
