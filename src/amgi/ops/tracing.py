"""OpenTelemetry tracing of an AMGI application (needs ``pip install 'amgi[tracing]'``).

:func:`instrument` wraps an application; the runtime never sees the difference. Per
application call it opens a batch span (``process ADDRESS``, kind consumer) that links
the trace context of every message received, and ends in error, with the exception, when
the app raises. Each received message gets its own
consumer span, whose parent is the W3C trace context in its headers (``traceparent``,
``tracestate``; the batch span when it has none); the span is current in the app while it
handles that message and ends when the app acks (ok) or nacks it (error, with the
reason). Each ``message.send`` gets a producer span (``send ADDRESS``), child of the
current span, whose context is injected into the outgoing headers.

Importing this module imports the OpenTelemetry API; :mod:`amgi.ops.run` imports it only
when tracing is on, so tracing that is off costs nothing at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import SpanKind, Status, StatusCode

from amgi import __version__
from amgi.ops.semconv import messaging_system
from amgi.types import AMGIApplication, AMGIReceiveEvent, Scope

__all__ = ["TRACE_HEADERS", "instrument"]

TRACE_HEADERS = (b"traceparent", b"tracestate")
"""Headers that carry the W3C trace context (replaced, not repeated, on a send)."""

_Headers = Iterable[tuple[bytes, bytes]]


class _HeaderGetter(Getter[_Headers]):
    def get(self, carrier: _Headers, key: str) -> list[str] | None:
        name = key.encode()
        found = [
            v.decode("latin-1")
            for n, v in carrier
            if type(n) is bytes and type(v) is bytes and n.lower() == name
        ]
        return found or None

    def keys(self, carrier: _Headers) -> list[str]:
        return [n.decode("latin-1") for n, _ in carrier if type(n) is bytes]


class _HeaderSetter(Setter[list[tuple[bytes, bytes]]]):
    def set(self, carrier: list[tuple[bytes, bytes]], key: str, value: str) -> None:
        carrier.append((key.encode(), value.encode("latin-1")))


_GETTER = _HeaderGetter()
_SETTER = _HeaderSetter()


def instrument(
    app: AMGIApplication, server: str, tracer_provider: trace.TracerProvider | None = None
) -> AMGIApplication:
    """``app`` with a consumer span per message, a batch span and producer spans.

    Spans go to ``tracer_provider``, by default the global one.
    """
    tracer = trace.get_tracer("amgi", __version__, tracer_provider=tracer_provider)
    system = messaging_system(server)

    async def traced(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            await app(scope, receive, send)
            return
        call = _TracedCall(tracer, system, scope["address"], receive, send)
        try:
            await app(scope, call.receive, call.send)
        except Exception as exc:
            call.failed(exc)
            raise
        finally:
            call.end()

    traced.__wrapped__ = app  # type: ignore[attr-defined]
    return traced


class _TracedCall:
    """The spans of one application call."""

    def __init__(
        self, tracer: trace.Tracer, system: str, address: str, receive: Any, send: Any
    ) -> None:
        self._tracer = tracer
        self._receive = receive
        self._send = send
        self._address = address
        self._attributes = {
            "messaging.system": system,
            "messaging.destination.name": address,
        }
        self._batch = tracer.start_span(
            f"process {address}",
            kind=SpanKind.CONSUMER,
            attributes={
                **self._attributes,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
            },
        )
        self._batch_context = trace.set_span_in_context(self._batch)
        self._fields = {f.lower().encode() for f in propagate.get_global_textmap().fields}
        self._open: dict[str, trace.Span] = {}
        self._count = 0
        self._token: object | None = None
        self._task = asyncio.current_task()
        """The task of the call: a context attached in another task (the app's own) is
        that task's, and goes with it."""

    async def receive(self) -> AMGIReceiveEvent:
        event: Any = await self._receive()
        self._count += 1
        parent = self._batch_context
        headers = event["headers"]
        fields = self._fields
        # Extract only when a header could carry context (the propagators' own names).
        if headers and any(type(n) is bytes and n.lower() in fields for n, _ in headers):
            extracted = propagate.extract(headers, getter=_GETTER)
            remote = trace.get_current_span(extracted).get_span_context()
            if remote.is_valid:
                self._batch.add_link(remote)
                parent = extracted
            else:  # no trace, but what else came with it (baggage) goes on
                parent = trace.set_span_in_context(self._batch, extracted)
        attributes: dict[str, Any] = {
            **self._attributes,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.message.id": event["id"],
        }
        attempt = event.get("bindings", {}).get("amgi", {}).get("attempt")
        if attempt is not None:
            attributes["amgi.attempt"] = attempt
        span = self._tracer.start_span(
            f"process {self._address}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        previous = self._open.pop(event["id"], None)
        if previous is not None:  # pragma: no cover - ids are unique in a batch
            previous.end()
        self._open[event["id"]] = span
        # The message's span is current in the app until the next receive() or the end
        # of the call: the app's own spans and sends become its children.
        # The message's context (its baggage included) is the app's, with its span.
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        if self._token is None and asyncio.current_task() is self._task:
            self._token = token
        received: AMGIReceiveEvent = event
        return received

    async def send(self, event: Any) -> None:
        kind = event.get("type") if isinstance(event, Mapping) else None
        if kind == "message.send":
            await self._send_traced(event)
            return
        await self._send(event)
        if kind == "message.ack":
            span = self._open.pop(event["id"], None)
            if span is not None:
                span.end()
        elif kind == "message.nack":
            span = self._open.pop(event["id"], None)
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, str(event.get("message"))))
                span.end()

    async def _send_traced(self, event: Any) -> None:
        address = event.get("address")
        span = self._tracer.start_span(
            f"send {address}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": self._attributes["messaging.system"],
                "messaging.destination.name": str(address),
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
            },
        )
        injected: list[tuple[bytes, bytes]] = []
        propagate.inject(injected, trace.set_span_in_context(span), setter=_SETTER)
        names = {n for n, _ in injected}
        try:  # what the propagators set replaces the app's, whatever its case or pair type
            headers = [
                h
                for h in event["headers"]
                if not (
                    isinstance(h, tuple | list)
                    and len(h) == 2
                    and isinstance(h[0], bytes)
                    and h[0].lower() in names
                )
            ]
        except (KeyError, TypeError):  # none or malformed: the runtime explains what is wrong
            headers = None
        if headers is not None:
            event = {**event, "headers": headers + injected}
        try:
            await self._send(event)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            span.end()

    def failed(self, exc: Exception) -> None:
        """Mark the batch span failed with the exception the app raised."""
        self._batch.record_exception(exc)
        self._batch.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

    def end(self) -> None:
        """Close every span of the call; messages left unsettled end in error."""
        for span in self._open.values():
            span.set_status(Status(StatusCode.ERROR, "not acked or nacked by the application"))
            span.end()
        self._open.clear()
        self._batch.set_attribute("messaging.batch.message_count", self._count)
        self._batch.end()
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None
