"""Runtime settings shared by every protocol server."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["LifespanMode", "RuntimeConfig"]

LifespanMode = Literal["auto", "on", "off"]

_DEFAULT_LEDGER = os.path.join(
    tempfile.gettempdir(), f"amgi-crash-ledger-{os.getuid() if hasattr(os, 'getuid') else 0}"
)


@dataclass(slots=True)
class RuntimeConfig:
    """Every runtime option once; the ``amgi run`` flags map one-to-one onto these fields."""

    concurrency: int = field(
        default=8, metadata={"help": "batches in flight at once (different ordering keys)"}
    )
    max_attempts: int = field(
        default=5, metadata={"help": "deliveries of a message before it is dead-lettered"}
    )
    retry_delay: float = field(
        default=1.0, metadata={"help": "seconds before the first retry of a nacked message"}
    )
    retry_delay_max: float = field(
        default=60.0, metadata={"help": "upper bound of the doubling retry delay, seconds"}
    )
    shutdown_timeout: float = field(
        default=30.0, metadata={"help": "seconds in-flight batches get to finish at shutdown"}
    )
    lifespan: LifespanMode = field(
        default="auto", metadata={"help": "lifespan protocol: auto, on or off"}
    )
    startup_timeout: float = field(
        default=60.0, metadata={"help": "seconds the application gets to complete lifespan startup"}
    )
    lifespan_shutdown_timeout: float = field(
        default=30.0,
        metadata={"help": "seconds the application gets to complete lifespan shutdown"},
    )
    cancel_grace: float = field(
        default=5.0,
        metadata={
            "help": "seconds a cancelled application call gets to stop before the runtime "
            "gives up on it, nacks what it left unsettled and exits"
        },
    )
    crash_ledger: str = field(
        default=_DEFAULT_LEDGER,
        metadata={
            "help": "directory of the local crash ledger that tells which messages were in "
            "the application's hands when a process died ('' turns it off)"
        },
    )

    def __post_init__(self) -> None:
        from amgi.errors import ConfigurationError

        if self.concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        if self.max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        if self.retry_delay < 0 or self.retry_delay_max < 0:
            raise ConfigurationError("retry delays must not be negative")
        for name in ("shutdown_timeout", "startup_timeout", "lifespan_shutdown_timeout"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"{name} must not be negative")
        if self.cancel_grace < 0:
            raise ConfigurationError("cancel_grace must not be negative")
        if self.lifespan not in ("auto", "on", "off"):
            raise ConfigurationError(f"lifespan must be auto, on or off, not {self.lifespan!r}")

    def retry_delay_for(self, attempt: int) -> float:
        """Delay before redelivering a message whose ``attempt``-th delivery was nacked."""
        return float(min(self.retry_delay * 2.0 ** max(0, attempt - 1), self.retry_delay_max))
