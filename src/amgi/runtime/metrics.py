"""A small hook for metrics: subclass :class:`MetricsHook` and pass it to the runtime."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BatchStats", "MetricsHook"]


@dataclass(slots=True, frozen=True)
class BatchStats:
    """What happened to one batch, reported once it is settled."""

    address: str
    received: int
    acked: int
    retried: int
    dead_lettered: int
    duration: float
    """Seconds from the start of the application call to the end of settlement."""

    @property
    def nacked(self) -> int:
        return self.retried + self.dead_lettered


class MetricsHook:
    """Receives counters from the runtime; every method is a no-op by default.

    Methods are called once per batch or per send, never per message, and must not block.
    """

    def batch_settled(self, stats: BatchStats) -> None:
        """A batch was settled (or its settlement was attempted)."""

    def message_sent(self, address: str, ok: bool) -> None:
        """The application sent a message; ``ok`` is false when the send raised."""

    def broker_reachable(self, ok: bool) -> None:
        """Fetching from the broker started failing (``False``) or works again (``True``)."""
