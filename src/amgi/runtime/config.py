"""Runtime settings shared by every protocol server."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Literal

from amgi.options import check, option
from amgi.servers.kit.backoff import doubling_delay

__all__ = ["LifespanMode", "RuntimeConfig"]

LifespanMode = Literal["auto", "on", "off"]

_DEFAULT_LEDGER = os.path.join(
    tempfile.gettempdir(), f"amgi-crash-ledger-{os.getuid() if hasattr(os, 'getuid') else 0}"
)


@dataclass(slots=True)
class RuntimeConfig:
    """Every runtime option once; the ``amgi run`` flags map one-to-one onto these fields.

    Declare an option with :func:`amgi.options.option` and its bounds (``ge``, ``gt``,
    ``le``, ``lt``); floats are refused when not finite. Construction checks them all.
    """

    concurrency: int = option(8, "batches in flight at once (different ordering keys)", ge=1)
    max_attempts: int = option(5, "deliveries of a message before it is dead-lettered", ge=1)
    retry_delay: float = option(1.0, "seconds before the first retry of a nacked message", ge=0)
    retry_delay_max: float = option(60.0, "upper bound of the doubling retry delay, seconds", ge=0)
    shutdown_timeout: float = option(
        30.0,
        "seconds in-flight batches get to finish at shutdown (and, after them, closing the "
        "connections)",
        ge=0,
    )
    startup_timeout: float = option(
        60.0, "seconds the application gets to complete lifespan startup", gt=0
    )
    lifespan_shutdown_timeout: float = option(
        30.0, "seconds the application gets to complete lifespan shutdown", gt=0
    )
    cancel_grace: float = option(
        5.0,
        "seconds a cancelled application call gets to stop before the runtime gives up on "
        "it, nacks what it left unsettled and exits",
        ge=0,
    )
    crash_ledger: str = option(
        _DEFAULT_LEDGER,
        "directory of the local crash ledger that tells which messages were in the "
        "application's hands when a process died ('' turns it off)",
    )
    lifespan: LifespanMode = option("auto", "lifespan protocol: auto, on or off")

    def __post_init__(self) -> None:
        check(self)

    def retry_delay_for(self, attempt: int) -> float:
        """Delay before redelivering a message whose ``attempt``-th delivery was nacked."""
        return doubling_delay(self.retry_delay, attempt, self.retry_delay_max)
