"""The typed application layer: decorated handlers, validation, publishing, DI, AsyncAPI.

>>> app = App(title="billing", version="1.0.0")
>>> @app.subscriber("orders.{region}", publish_to="invoices")
... async def on_order(order: Order, region: str) -> Invoice: ...

An :class:`App` is an ordinary AMGI application: ``amgi run billing:app orders.eu``.
Needs pydantic v2 (``pip install "amgi[app]"``).
"""

from __future__ import annotations

try:
    import pydantic
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("amgi.app needs pydantic v2: pip install 'amgi[app]'") from exc
if not pydantic.VERSION.startswith("2."):  # pragma: no cover
    raise ImportError(f"amgi.app needs pydantic v2, found {pydantic.VERSION}")

from amgi.app._app import NACK_RETRY, App, Lifespan
from amgi.app._errors import AppDefinitionError, DeadLetter, PayloadError
from amgi.app._middleware import HandlerCall, Middleware
from amgi.app._params import (
    Binding,
    Depends,
    Failures,
    Header,
    MessageInfo,
    Meta,
    Outgoing,
    State,
)
from amgi.app._publisher import Publisher

__all__ = [
    "NACK_RETRY",
    "App",
    "AppDefinitionError",
    "Binding",
    "DeadLetter",
    "Depends",
    "Failures",
    "HandlerCall",
    "Header",
    "Lifespan",
    "MessageInfo",
    "Meta",
    "Middleware",
    "Outgoing",
    "PayloadError",
    "Publisher",
    "State",
]
