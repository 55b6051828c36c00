"""The operations options of ``amgi run``: metrics listener, tracing, worker processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from amgi.options import check, invalid, option

__all__ = ["MAX_WORKERS", "OpsConfig", "TracingMode"]

TracingMode = Literal["auto", "on", "off"]
MAX_WORKERS = 1024


@dataclass(slots=True)
class OpsConfig:
    """Every operations option once; the flags map one-to-one onto these fields.

    Construction checks the values (types, choices, bounds) and raises
    :class:`amgi.errors.ConfigurationError` naming the flag.
    """

    metrics_port: int | None = option(
        None,
        "serve Prometheus /metrics and the /healthz and /readyz probes on this port "
        "(off when not given; 0: any free port; with --workers N, worker i uses PORT+i)",
        ge=0,
        le=65535,
    )
    metrics_host: str = option(
        "127.0.0.1",
        "address the metrics listener binds (0.0.0.0 or the pod's address to let "
        "Prometheus and Kubernetes probes in from outside the host)",
    )
    tracing: TracingMode = option(
        "auto",
        "OpenTelemetry tracing: auto (on when the app configured a tracer provider), on or off",
    )
    workers: int = option(
        1, "worker processes consuming together under one supervisor", ge=1, le=MAX_WORKERS
    )

    def __post_init__(self) -> None:
        check(self)

    def check_together(self) -> None:
        """Worker i listens on PORT+i: the last one must still be a port."""
        if self.metrics_port and self.metrics_port + self.workers - 1 > 65535:
            raise invalid(
                self,
                "metrics_port",
                f"leaves no port for worker {self.workers - 1} (PORT+{self.workers - 1} "
                "must be at most 65535)",
            )
