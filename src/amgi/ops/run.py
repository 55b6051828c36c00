"""What ``amgi run`` adds around the runtime: metrics, probes and tracing, set up before
the event loop starts (so that bad options fail before the application's lifespan).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from dataclasses import dataclass

from amgi.errors import ConfigurationError
from amgi.ops.config import OpsConfig, TracingMode
from amgi.ops.workers import report_serving
from amgi.runtime.app import check_app
from amgi.runtime.metrics import MetricsHook
from amgi.runtime.server import Runtime
from amgi.transport import Transport
from amgi.types import AMGIApplication

__all__ = ["Operations", "check_workers", "prepare", "serve", "tracing_enabled"]

logger = logging.getLogger("amgi.ops")


def tracing_enabled(mode: TracingMode) -> bool:
    """Whether to trace: ``auto`` is on only when the OpenTelemetry API is already imported
    (by the app or an auto-instrumentation launcher) and a real tracer provider is set.
    """
    if mode == "off":
        return False
    if mode == "auto":
        trace = sys.modules.get("opentelemetry.trace")
        if trace is None:
            return False
        provider = trace.get_tracer_provider()
        return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "--tracing on needs the OpenTelemetry API: pip install 'amgi[tracing]'"
        ) from None
    return True


@dataclass(slots=True)
class Operations:
    """The app as it runs (traced or not), the metrics hook and the bound probe sockets
    (one per address of ``--metrics-host``, all on one port)."""

    app: AMGIApplication
    metrics: MetricsHook | None
    socks: list[socket.socket]

    @property
    def sock(self) -> socket.socket | None:
        """The first probe socket (its port is every one's), ``None`` without probes."""
        return self.socks[0] if self.socks else None

    def close(self) -> None:
        """Close the probe sockets (when they will not be served)."""
        for sock in self.socks:
            sock.close()


def prepare(
    config: OpsConfig, app: AMGIApplication, server: str, worker: int | None = None
) -> Operations:
    """Check and set up everything ``config`` asks for; raise ``ConfigurationError``."""
    metrics: MetricsHook | None = None
    socks: list[socket.socket] = []
    check_app(app)  # the app itself: the runtime would only see the tracing wrapper
    if tracing_enabled(config.tracing):
        from amgi.ops.tracing import instrument

        app = instrument(app, server)
    if config.metrics_port is not None:
        from amgi.ops.listener import bind
        from amgi.ops.metrics import PrometheusMetrics

        metrics = PrometheusMetrics(server)
        port = config.metrics_port + (worker or 0) if config.metrics_port else 0
        socks = bind(config.metrics_host, port)
    return Operations(app, metrics, socks)


async def serve(runtime: Runtime, ops: Operations) -> int:
    """Run ``runtime`` with the probe listener (when there is one) beside it; in a worker,
    tell the supervisor once it serves (:func:`~amgi.ops.workers.report_serving`)."""
    reporter = asyncio.create_task(report_serving(runtime.started))
    try:
        return await _serve(runtime, ops)
    finally:
        reporter.cancel()


async def _serve(runtime: Runtime, ops: Operations) -> int:
    if not ops.socks:
        return await runtime.serve()
    from amgi.ops.listener import OpsListener, url
    from amgi.ops.metrics import PrometheusMetrics

    metrics = ops.metrics if isinstance(ops.metrics, PrometheusMetrics) else None
    exposition = None
    if metrics is not None:
        metrics.track_in_flight(lambda: runtime.in_flight)
        if type(runtime.transport).backlog is not Transport.backlog:
            metrics.track_backlog(runtime.transport.backlog)
        exposition = metrics.exposition

    def readiness() -> str | None:
        if runtime.draining:
            return "draining"
        if not runtime.started.is_set():
            return "starting"
        if metrics is not None and not metrics.broker_ok:
            return "broker unreachable"
        return None

    listener = OpsListener(ops.socks, readiness, exposition)
    await listener.start()
    urls = ", ".join(url(sock) for sock in ops.socks)
    logger.info("probes%s on %s", " and metrics" if exposition else "", urls)
    try:
        return await runtime.serve()
    finally:
        await listener.close()


def check_workers(
    transport: Transport, config: OpsConfig, app: AMGIApplication, server: str
) -> None:
    """Refuse ``--workers N`` where N processes cannot work, and what each worker's
    :func:`prepare` would refuse: once, before any worker starts."""
    why = transport.workers_refusal()
    if why is not None:
        raise ConfigurationError(
            f"--workers: the {transport.name} server runs in one process: {why}"
        )
    prepare(config, app, server).close()
    if config.metrics_port:
        from amgi.ops.listener import bind

        for i in range(1, config.workers):  # worker 0's port: prepare bound it
            for sock in bind(config.metrics_host, config.metrics_port + i):
                sock.close()
