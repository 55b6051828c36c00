"""The App: an ordinary AMGI application that routes each batch to a typed handler."""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar

from amgi.app._address import Router
from amgi.app._asyncapi import document
from amgi.app._errors import AppDefinitionError, PayloadError, ValidatorFailed
from amgi.app._handler import Handler, receive_all
from amgi.app._inject import name_of
from amgi.app._middleware import Middleware, check
from amgi.errors import StartupFailed
from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope

__all__ = ["NACK_RETRY", "App", "Lifespan"]

logger = logging.getLogger("amgi.app")

F = TypeVar("F", bound=Callable[..., Any])
Lifespan = Callable[["App"], contextlib.AbstractAsyncContextManager[Mapping[str, Any] | None]]
"""``@asynccontextmanager async def lifespan(app): ...; yield {"db": pool}; ...``"""

NACK_RETRY = "message.nack.retry"
"""The extension that lets a nack say ``"retry": False`` (dead-letter now)."""


class App:
    """A typed AMGI application: ``app = App(title=..., version=...)``; decorate handlers.

    The App is the AMGI callable (``amgi run myapp:app ADDRESS``). ``lifespan`` is an
    async context manager factory; the mapping it yields becomes the AMGI lifespan state,
    injectable with ``State``. ``middleware`` wraps every handler call, first declared
    outermost. ``decoders`` maps a content type to ``bytes -> object`` for payloads that
    are not JSON.
    """

    def __init__(
        self,
        *,
        title: str = "AMGI application",
        version: str = "0.1.0",
        description: str | None = None,
        lifespan: Lifespan | None = None,
        middleware: Sequence[Middleware] = (),
        decoders: Mapping[str, Callable[[bytes], Any]] | None = None,
    ) -> None:
        self.title = title
        self.version = version
        self.description = description
        self.handlers: list[Handler] = []
        self._lifespan = _checked_lifespan(lifespan)
        self._middleware = list(middleware)
        self._decoders = {k.lower(): v for k, v in (decoders or {}).items()}
        self._router: Router[Handler] = Router()
        self._prepared = False
        self._started = False
        """The app has started (lifespan startup, or a first message without lifespan)."""

    def subscriber(
        self,
        address: str,
        *,
        publish_to: str | None = None,
        batch: bool = False,
        concurrency: int = 1,
        summary: str | None = None,
        description: str | None = None,
        examples: Sequence[Any] = (),
    ) -> Callable[[F], F]:
        """Subscribe the decorated function to ``address`` (may hold ``{name}`` parameters).

        ``publish_to``: the address its return value is published to (``None`` returned:
        nothing is published). ``batch``: the function takes ``list[T]``, a whole AMGI
        batch per call. ``concurrency``: messages of one batch handled at once (default 1:
        in order).
        """

        # Names of the declaring scope, for annotations naming classes defined there.
        caller = sys._getframe(1)
        localns = dict(caller.f_locals) if caller.f_code.co_name != "<module>" else None
        del caller

        def register(func: F) -> F:
            handler = Handler(
                func,
                address,
                publish_to=publish_to,
                batch=batch,
                concurrency=concurrency,
                summary=summary,
                description=description,
                examples=examples,
                localns=localns,
            )
            try:
                self._router.add(handler.pattern, handler, handler.name)
            except ValueError as exc:
                raise AppDefinitionError(f"{handler.name}: {exc}") from None
            self.handlers.append(handler)
            self._prepared = False
            if self._started:
                # Documents are made from the handlers declared at import (amgi asyncapi
                # and amgi docs do not start the app): say that this one is missing there.
                logger.warning(
                    "%s was subscribed to %r once the app had started: an AsyncAPI "
                    "document made without starting the app (amgi asyncapi, amgi docs) "
                    "does not list it; declare the handler when the module is imported "
                    "(its address may come from settings read then)",
                    handler.name,
                    address,
                )
            return func

        return register

    def add_middleware(self, middleware: Middleware) -> None:
        """Append ``middleware`` (innermost so far)."""
        self._middleware.append(middleware)
        self._prepared = False

    def prepare(self) -> None:
        """Check every handler (raises AppDefinitionError naming function and parameter).

        Runs at lifespan startup, or at the first message when the server has no lifespan.
        """
        if self._prepared:
            return
        for middleware in self._middleware:
            check(middleware, name_of(middleware))
        for handler in self.handlers:
            handler.prepare(self._decoders, self._middleware)
        self._prepared = True

    def _check_served(self) -> None:
        """Raise AppDefinitionError if the app has no handler: served, every message it
        is given would fail until dead-lettered (handlers declared in a module that
        nothing imports are never subscribed)."""
        if not self.handlers:
            raise AppDefinitionError(
                f"App {self.title!r} has no handler, so it can handle no message: subscribe "
                "functions with @app.subscriber(...) in the module of the app, or in one it "
                "imports"
            )

    def _check_state(self, state: Mapping[str, Any] | None) -> None:
        """Raise AppDefinitionError if a handler takes a ``State`` without default that
        ``state`` (the lifespan state; None: no lifespan ran) does not hold: the state
        is made once at startup, so each of its messages would fail until dead-lettered."""
        for handler in self.handlers:
            assert handler.plan is not None
            for p in handler.plan.all_parameters():
                if p.kind != "state" or p.default is not inspect.Parameter.empty:
                    continue
                key = p.source.key or p.name
                if state is not None and key in state:
                    continue
                where = (
                    f"{p.owner}, parameter {p.name!r}: State({key!r}) is not in the lifespan state"
                )
                if state is None:
                    raise AppDefinitionError(
                        f"{where}: the app runs without lifespan (the server's lifespan is "
                        "off), so its lifespan did not run"
                    )
                held = ", ".join(map(repr, state)) or "nothing"
                raise AppDefinitionError(
                    f"{where} (it holds {held}); yield it from the App's lifespan, or give "
                    "the parameter a default"
                )

    @property
    def addresses(self) -> list[str]:
        """The subscribed addresses (patterns as written)."""
        return [h.pattern.text for h in self.handlers]

    def asyncapi(self) -> dict[str, Any]:
        """The AsyncAPI 3.0 document of this application."""
        self.prepare()
        if not self.handlers:
            logger.warning(
                "App %r has no handler: its AsyncAPI document lists no channel (handlers "
                "added once the app starts, in its lifespan, are not known before)",
                self.title,
            )
        return document(
            self.handlers, title=self.title, version=self.version, description=self.description
        )

    async def __call__(
        self, scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable
    ) -> None:
        if scope["type"] == "message":
            self._started = True
            if not self._prepared:
                self._prepare_at_message(scope)
            address = scope["address"]
            state = scope.get("state") or {}
            dead_letter_ok = NACK_RETRY in (scope.get("extensions") or {})
            if _is_filter(address):
                await self._serve_filtered(address, receive, send, state, dead_letter_ok)
            else:
                await self._serve(address, receive, send, state, dead_letter_ok)
        elif scope["type"] == "lifespan":
            await self._run_lifespan(scope, receive, send)

    def _prepare_at_message(self, scope: Scope) -> None:
        """Check the handlers at a message (no lifespan startup ran, or a handler was
        added since): a broken one is the app's failure to start, not the message's."""
        try:
            self.prepare()
            self._check_served()
            self._check_state(scope.get("state"))
        except AppDefinitionError as exc:
            # Raised before receiving anything: the runtime stops the run and hands the
            # messages back unspent, where a plain exception would fail (and in the end
            # dead-letter) every message it is given.
            raise StartupFailed(str(exc)) from exc

    async def _serve(
        self,
        address: str,
        receive: AMGIReceiveCallable,
        send: AMGISendCallable,
        state: Mapping[str, Any],
        dead_letter_ok: bool,
        fallback: str | None = None,
    ) -> None:
        """Route the messages of ``receive`` by ``address`` to their handler.

        ``fallback``: the subscription filter they came through, whose own handler (one
        declared with the filter as its literal address) takes what ``address`` does not.
        """
        found = self._router.route(address)
        if found is None and fallback is None:
            # No handler for the call's address (an AMQP queue): each message is routed
            # by the address it was sent to (its routing key), as a filter's are.
            await self._serve_filtered(address, receive, send, state, dead_letter_ok)
            return
        if found is None and fallback is not None:
            by_filter = self._router.route(fallback)
            if by_filter is not None and not by_filter[1]:
                found = by_filter
        if found is None:
            known = ", ".join(self.addresses) or "none"
            reason = f"no handler for address {address!r} (handlers: {known})"
            await _reject_all(receive, send, reason, False)
            return
        handler, raw = found
        try:
            params = handler.convert_address(raw)
        except PayloadError as exc:
            # It can never be handled: dead-lettered at once, like an invalid payload.
            await _reject_all(receive, send, f"{handler.name}: {exc}", dead_letter_ok)
            return
        except ValidatorFailed as exc:
            await _reject_all(receive, send, f"{handler.name}: {exc}", False)
            return
        await handler.serve(receive, send, address, params, state, dead_letter_ok, raw)

    async def _serve_filtered(
        self,
        address: str,
        receive: AMGIReceiveCallable,
        send: AMGISendCallable,
        state: Mapping[str, Any],
        dead_letter_ok: bool,
    ) -> None:
        """Serve a call whose address is a subscription filter (NATS ``orders.*``), or
        one no handler takes (an AMQP queue bound to a topic exchange).

        Its messages were published to several addresses: each is routed by its own
        (``bindings["nats"]["subject"]``, ``bindings["amqp"]["routingKey"]``), so that
        ``orders.{region}`` gets ``eu``, not ``*``. Runs of messages with one address are
        served in turn, in broker order.
        """
        events = await receive_all(receive)
        start = 0
        while start < len(events):
            own = _own_address(events[start], address)
            end = start + 1
            while end < len(events) and _own_address(events[end], address) == own:
                end += 1
            run = _replay(events[start:end], receive)
            await self._serve(own, run, send, state, dead_letter_ok, fallback=address)
            start = end

    async def _run_lifespan(
        self, scope: Any, receive: AMGIReceiveCallable, send: AMGISendCallable
    ) -> None:
        await receive()  # lifespan.startup
        self._started = True
        try:
            self.prepare()
            manager = _entered(self._lifespan, self) if self._lifespan else _no_lifespan()
            stack = contextlib.AsyncExitStack()
            state: Any = await stack.enter_async_context(manager)
            try:
                if state is not None and not isinstance(state, Mapping):
                    raise TypeError(
                        f"the lifespan must yield a mapping (the state) or None, "
                        f"not {type(state).__name__}"
                    )
                # Handlers the lifespan added are checked now, not at their first message
                # (each message would fail, then be dead-lettered, for the app's fault).
                self.prepare()
                self._check_served()
                self._check_state({**scope.get("state", {}), **(state or {})})
            except BaseException:
                await stack.aclose()
                raise
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": _one_line(exc)})
            return
        if state:
            scope.setdefault("state", {}).update(state)
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await stack.aclose()
        except Exception as exc:
            await send({"type": "lifespan.shutdown.failed", "message": _one_line(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})


async def _reject_all(
    receive: AMGIReceiveCallable, send: AMGISendCallable, reason: str, dead: bool
) -> None:
    """Nack every message of the call (``dead``: without retries)."""
    more = True
    while more:
        event = await receive()
        mid: str = event["id"]  # type: ignore[typeddict-item]
        nack: dict[str, Any] = {"type": "message.nack", "id": mid, "message": reason}
        if dead:
            nack["retry"] = False
        await send(nack)  # type: ignore[arg-type]
        more = bool(event.get("more_messages", False))


def _is_filter(address: str) -> bool:
    """True when ``address`` is a subscription filter with wildcards, not one address:
    a NATS ``*`` or ``>`` token, an MQTT ``+`` or ``#`` level."""
    nats = ("*" in address or ">" in address) and any(
        token in ("*", ">") for token in address.split(".")
    )
    mqtt = ("+" in address or "#" in address) and any(
        level in ("+", "#") for level in address.split("/")
    )
    return nats or mqtt


def _own_address(event: Any, address: str) -> str:
    """The address a message of a filter's (or a queue's) call was published to
    (``address`` if unknown)."""
    bindings = event.get("bindings") or {}
    for protocol, key in (("nats", "subject"), ("mqtt", "topic"), ("amqp", "routingKey")):
        own = (bindings.get(protocol) or {}).get(key)
        if isinstance(own, str) and own:
            return own
    return address


def _replay(events: list[Any], rest: AMGIReceiveCallable) -> AMGIReceiveCallable:
    """A ``receive`` handing out ``events`` (received already) as one call's messages,
    then what ``rest`` does past the last (the runtime's: wait for the call's end)."""
    pending = iter(range(len(events)))

    async def receive() -> Any:
        i = next(pending, None)
        if i is None:
            return await rest()
        return {**events[i], "more_messages": i < len(events) - 1}

    return receive


@contextlib.asynccontextmanager
async def _no_lifespan() -> AsyncIterator[None]:
    yield None


def _checked_lifespan(lifespan: Lifespan | None) -> Lifespan | None:
    """``lifespan``, or AppDefinitionError when it cannot make a context manager (each
    startup would fail with a protocol error that does not say what to change)."""
    if lifespan is None:
        return None
    if not callable(lifespan):
        raise AppDefinitionError(
            f"App(lifespan=...) takes a function of the app, not {type(lifespan).__name__}"
        )
    if inspect.isasyncgenfunction(lifespan):
        raise AppDefinitionError(
            f"App(lifespan=...): {name_of(lifespan)} is an async generator function: "
            "decorate it with @contextlib.asynccontextmanager"
        )
    return lifespan


def _entered(lifespan: Lifespan, app: App) -> Any:
    """What ``lifespan(app)`` returned, checked to be an async context manager."""
    manager: Any = lifespan(app)
    if not (hasattr(manager, "__aenter__") and hasattr(manager, "__aexit__")):
        if inspect.iscoroutine(manager):
            manager.close()  # never awaited: no "was never awaited" warning
        raise AppDefinitionError(
            f"the lifespan {name_of(lifespan)} returned a {type(manager).__name__}, not an "
            "async context manager: make it an async generator that yields the state, "
            "decorated with @contextlib.asynccontextmanager"
        )
    return manager


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, AppDefinitionError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
