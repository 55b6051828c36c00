"""The operations options of ``amgi run``: metrics listener, tracing, worker processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from amgi.errors import ConfigurationError

__all__ = ["OpsConfig", "TracingMode"]

TracingMode = Literal["auto", "on", "off"]


@dataclass(slots=True)
class OpsConfig:
    """Every operations option once; the flags map one-to-one onto these fields."""

    metrics_port: int | None = field(
        default=None,
        metadata={
            "help": "serve Prometheus /metrics and the /healthz and /readyz probes on this "
            "port (off when not given; with --workers N, worker i uses PORT+i)"
        },
    )
    metrics_host: str = field(
        default="0.0.0.0",  # probes and scrapes come from outside the host
        metadata={"help": "address the metrics listener binds"},
    )
    tracing: TracingMode = field(
        default="auto",
        metadata={
            "help": "OpenTelemetry tracing: auto (on when the app configured a tracer "
            "provider), on or off"
        },
    )
    workers: int = field(
        default=1,
        metadata={"help": "worker processes consuming together under one supervisor"},
    )

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigurationError(f"--metrics-port must be 0..65535, not {self.metrics_port}")
        if self.workers < 1:
            raise ConfigurationError(f"--workers must be at least 1, not {self.workers}")
        if self.tracing not in ("auto", "on", "off"):
            raise ConfigurationError(f"--tracing must be auto, on or off, not {self.tracing!r}")
