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
    """Dead letters stored (or that the transport did not say it failed to store)."""
    duration: float
    """Seconds from the start of the application call to the end of settlement."""
    kept: int = 0
    """Nacked messages whose retry or dead letter the transport could not move: they stay
    unacknowledged and are tried again later."""
    lost: int = 0
    """Dead letters not stored whose message the broker cannot deliver again."""

    @property
    def nacked(self) -> int:
        return self.retried + self.dead_lettered + self.kept + self.lost


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
