"""Prometheus metrics of a running server (needs ``pip install 'amgi[metrics]'``).

Names follow OpenTelemetry's messaging semantic conventions where they define one
(``messaging.client.consumed.messages``, ``messaging.process.duration``,
``messaging.client.sent.messages``), exported the way OpenTelemetry's Prometheus exporter
spells them (dots become underscores, counters end in ``_total``, units are suffixed);
the settlement counters AMGI adds are prefixed ``amgi_``. Every series carries
``messaging_system`` and ``messaging_destination_name`` (at most :data:`MAX_DESTINATIONS`
names each for the consumed metrics, the consumer lag included, and the sent metrics).

Counts are updated once per settled batch; the in-flight gauge and the consumer lag
(``amgi_consumer_lag_messages``, for servers whose :meth:`~amgi.transport.Transport.backlog`
can tell it without a broker round trip: Kafka, memory) are read at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from amgi.errors import ConfigurationError
from amgi.ops.semconv import messaging_system
from amgi.runtime.metrics import BatchStats, MetricsHook

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import Counter, Histogram

__all__ = ["MAX_DESTINATIONS", "OTHER_DESTINATION", "PrometheusMetrics"]

logger = logging.getLogger("amgi.ops")

_LABELS = ("messaging_system", "messaging_destination_name")
MAX_DESTINATIONS = 200
"""Distinct ``messaging_destination_name`` values kept for the consumed and for the sent
metrics each; past them (a wildcard subscription over many topics, sends to a reply
address per request) the rest are counted under :data:`OTHER_DESTINATION`, so neither
the process nor a scrape grows without bound."""
OTHER_DESTINATION = "(other)"
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _label(address: str) -> str:
    """``address`` as a label value the exposition can encode: what is not Unicode text (a
    lone surrogate, from bytes that were not UTF-8) is written as an escape, as one such
    label would make every scrape fail."""
    try:
        address.encode()
    except UnicodeEncodeError:
        return address.encode(errors="backslashreplace").decode()
    return address


class PrometheusMetrics(MetricsHook):
    """A :class:`MetricsHook` that keeps Prometheus metrics in its own registry.

    ``server`` is the ``--server`` name (it becomes ``messaging_system``).
    """

    def __init__(self, server: str) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise ConfigurationError(
                "--metrics-port needs prometheus-client: pip install 'amgi[metrics]'"
            ) from None
        self.system = messaging_system(server)
        self.registry: CollectorRegistry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry

        def counter(name: str, doc: str) -> Counter:
            return prom.Counter(name, doc, _LABELS, registry=r)

        self._consumed = counter(
            "messaging_client_consumed_messages",
            "Messages delivered to the application (messaging.client.consumed.messages)",
        )
        self._acked = counter("amgi_messages_acked", "Messages the application acked")
        self._nacked = counter(
            "amgi_messages_nacked",
            "Messages nacked or left unsettled (retried, dead-lettered, kept or lost)",
        )
        self._retried = counter("amgi_messages_retried", "Nacked messages scheduled for a retry")
        self._dead = counter("amgi_messages_dead_lettered", "Messages stored in the dead letters")
        self._kept = counter(
            "amgi_messages_kept",
            "Nacked messages whose retry or dead letter the broker did not take: kept "
            "unacknowledged, they come back",
        )
        self._lost = counter(
            "amgi_dead_letters_lost",
            "Dead letters the broker did not take, of messages it cannot deliver again "
            "(core NATS, Redis Pub/Sub): lost",
        )
        self._sent = prom.Counter(
            "messaging_client_sent_messages",
            "Messages the application sent (messaging.client.sent.messages); "
            "error_type is set on failed sends",
            (*_LABELS, "error_type"),
            registry=r,
        )
        self._batch = prom.Histogram(
            "amgi_batch_messages",
            "Messages per application call (messaging.batch.message_count)",
            _LABELS,
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self._duration = prom.Histogram(
            "messaging_process_duration_seconds",
            "Seconds from the start of a batch's application call to the end of its "
            "settlement (messaging.process.duration, per batch)",
            _LABELS,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self._in_flight = prom.Gauge(
            "amgi_batches_in_flight",
            "Batches being processed now",
            ("messaging_system",),
            registry=r,
        )
        self.broker_ok = True
        """False while fetching from the broker fails (the readiness probe reports it)."""
        self._children: dict[str, tuple[Counter, ...]] = {}
        self._histograms: dict[str, tuple[Histogram, Histogram]] = {}
        self._consumed_names: dict[str, str] = {}
        self._sent_names: dict[str, str] = {}
        self._warned: set[str] = set()

    def _bounded(self, address: str, seen: dict[str, str], what: str) -> str:
        """The label of ``address`` (:func:`_label`), or :data:`OTHER_DESTINATION` once
        ``seen`` (address -> label) is full."""
        label = seen.get(address)
        if label is not None:
            return label
        if len(seen) < MAX_DESTINATIONS:
            label = seen[address] = _label(address)
            return label
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(
                "metrics: more than %d %s addresses; the others are counted as "
                "messaging_destination_name=%r",
                MAX_DESTINATIONS,
                what,
                OTHER_DESTINATION,
            )
        return OTHER_DESTINATION

    def batch_settled(self, stats: BatchStats) -> None:
        address = stats.address
        children = self._children.get(address)
        if children is None:
            address = self._bounded(address, self._consumed_names, "consumed")
            children = self._children.get(address) or self._add_children(address)
        consumed, acked, nacked, retried, dead, kept, lost = children
        consumed.inc(stats.received)
        if stats.acked:
            acked.inc(stats.acked)
        if stats.nacked:
            nacked.inc(stats.nacked)
            retried.inc(stats.retried)
            dead.inc(stats.dead_lettered)
            kept.inc(stats.kept)
            lost.inc(stats.lost)
        size, duration = self._histograms[address]
        size.observe(stats.received)
        duration.observe(stats.duration)

    def _add_children(self, address: str) -> tuple[Counter, ...]:
        labels = (self.system, address)
        children = self._children[address] = tuple(
            c.labels(*labels)
            for c in (
                self._consumed,
                self._acked,
                self._nacked,
                self._retried,
                self._dead,
                self._kept,
                self._lost,
            )
        )
        self._histograms[address] = (self._batch.labels(*labels), self._duration.labels(*labels))
        return children

    def broker_reachable(self, ok: bool) -> None:
        self.broker_ok = ok

    def message_sent(self, address: str, ok: bool) -> None:
        address = self._bounded(address, self._sent_names, "sent-to")
        self._sent.labels(self.system, address, "" if ok else "send_error").inc()

    def track_backlog(self, read: Callable[[], dict[str, int] | None]) -> None:
        """Report ``read()`` (called at scrape time) as the consumer-lag gauge, per address."""
        from prometheus_client.core import GaugeMetricFamily
        from prometheus_client.registry import Collector

        system = self.system
        bounded = self._bounded_lag

        class Backlog(Collector):
            def collect(self) -> Iterator[GaugeMetricFamily]:
                family = GaugeMetricFamily(
                    "amgi_consumer_lag_messages",
                    "Messages waiting on the broker for this consumer, where the broker "
                    "tells it cheaply (Kafka: high watermark minus processed offset; Redis: "
                    "group lag plus pending; NATS: consumer pending; SQS: approximate "
                    "visible messages)",
                    labels=_LABELS,
                )
                try:
                    values = read()
                except Exception:  # a failing probe must not break the scrape
                    logger.warning("reading the consumer lag failed", exc_info=True)
                    values = None
                for label, lag in bounded(values or {}).items():
                    family.add_metric([system, label], lag)
                yield family

        self.registry.register(Backlog())

    def _bounded_lag(self, values: dict[str, int]) -> dict[str, int]:
        """``values`` by label, sorted: the addresses past :data:`MAX_DESTINATIONS` (those
        the consumed metrics already count, then the rest by name) summed under
        :data:`OTHER_DESTINATION`."""
        labels: dict[str, int] = {}
        for address in sorted(values):
            label = self._bounded(address, self._consumed_names, "consumer-lag")
            labels[label] = labels.get(label, 0) + values[address]
        return dict(sorted(labels.items()))

    def track_in_flight(self, read: Callable[[], float]) -> None:
        """Report ``read()`` (called at scrape time) as the batches-in-flight gauge."""
        self._in_flight.labels(self.system).set_function(read)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
