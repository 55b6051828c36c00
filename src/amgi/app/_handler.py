"""One subscriber: its plan (built once at startup) and how it serves a batch.

The hot path is :meth:`Handler.serve`: per message it decodes the payload, runs the
precomputed getters, calls the function, publishes its result and settles, with no
reflection per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

from pydantic import ValidationError

from amgi.app._address import AddressPattern, fill, fill_template
from amgi.app._codec import (
    Decoder,
    Encoder,
    describe_validation_error,
    encode_any,
    make_decoder,
    make_encoder,
    strip_none,
)
from amgi.app._errors import (
    AppDefinitionError,
    DeadLetter,
    PayloadError,
    ValidatorFailed,
    first_line,
    one_line,
    validator_failed,
)
from amgi.app._inject import (
    Context,
    Parameter,
    Plan,
    analyse,
    checked_adapter,
    function_kind,
    in_thread,
    message_info,
    name_of,
    type_hints,
    type_name,
    unwrap_annotated,
)
from amgi.app._middleware import HandlerCall, Middleware, MiddlewareFailed, wrap
from amgi.app._params import Failures, Outgoing
from amgi.app._publisher import Publisher, encode_headers
from amgi.types import AMGIReceiveCallable, AMGISendCallable, MessageNackEvent

__all__ = ["Handler", "receive_all"]

logger = logging.getLogger("amgi.app")


class _Invalid(Exception):
    """The message could not be given to the handler; ``dead``: never worth a retry."""

    def __init__(self, reason: str, dead: bool = True) -> None:
        super().__init__(reason)
        self.dead = dead


class Handler:
    """A function subscribed to an address pattern."""

    def __init__(
        self,
        func: Callable[..., Any],
        address: str,
        *,
        publish_to: str | None,
        batch: bool,
        concurrency: int,
        summary: str | None,
        description: str | None,
        examples: Sequence[Any],
        localns: Mapping[str, Any] | None = None,
    ) -> None:
        self.func = func
        self.localns = localns
        self.name = name_of(func)
        try:
            self.pattern = AddressPattern.parse(address)
        except ValueError as exc:
            raise AppDefinitionError(f"{self.name}: {exc}") from None
        if concurrency < 1:
            raise AppDefinitionError(f"{self.name}: concurrency must be at least 1")
        if batch and concurrency != 1:
            raise AppDefinitionError(f"{self.name}: a batch handler gets the batch in one call")
        if function_kind(func) in ("asyncgen", "gen"):
            raise AppDefinitionError(f"{self.name}: a handler cannot be a generator")
        self.publish_to = publish_to
        self.output_pattern: AddressPattern | None = None
        self.output_extra: tuple[str, ...] = ()
        """Parameters of ``publish_to`` each result gives (``Outgoing(params=...)``)."""
        if publish_to is not None:
            try:
                self.output_pattern = AddressPattern.parse(publish_to)
            except ValueError as exc:
                raise AppDefinitionError(f"{self.name}, publish_to: {exc}") from None
            self.output_extra = tuple(
                n for n in self.output_pattern.params if n not in self.pattern.params
            )
        self.batch = batch
        self.concurrency = concurrency
        self.summary = summary
        self.description = description if description is not None else (func.__doc__ or None)
        self.examples = list(examples)
        # Filled by prepare():
        self.plan: Plan | None = None
        self.payload: Parameter | None = None
        self.payload_type: Any = None
        self.output_type: Any = None
        self.address_types: dict[str, Any] = {}
        self._decode: Decoder | None = None
        self._encode: Encoder | None = None
        self._converters: dict[str, Callable[[str], Any]] = {}
        self._call: Callable[[Any], Awaitable[Any]] | None = None
        self._middleware: Sequence[Middleware] = ()
        self._middleware_names: Sequence[str] = ()
        self._is_async = function_kind(func) == "async"
        self._fast = False
        self._needs_infos = False
        self._needs_failures = False

    # -- startup -----------------------------------------------------------------------

    def prepare(
        self, decoders: Mapping[str, Callable[[bytes], Any]], middleware: Sequence[Middleware]
    ) -> None:
        """Analyse the function once; raise AppDefinitionError naming what cannot be served."""
        plan, payload = analyse(
            self.func,
            address_params=self.pattern.params,
            allow_payload=True,
            batch=self.batch,
            localns=self.localns,
        )
        self.plan, self.payload = plan, payload
        self._middleware = tuple(middleware)
        self._middleware_names = tuple(name_of(mw) for mw in self._middleware)
        if payload is not None:
            item = payload.annotation
            if self.batch:
                base, _ = unwrap_annotated(item)
                if typing.get_origin(base) not in (list, Sequence, typing.Sequence):
                    raise AppDefinitionError(
                        f"{self.name}, parameter {payload.name!r}: a batch handler takes "
                        f"list[T] (one T per message), not {base!r}"
                    )
                (item,) = typing.get_args(base) or (Any,)
            self.payload_type = item
            try:
                self._decode = make_decoder(item, decoders)
            except Exception as exc:
                raise AppDefinitionError(
                    f"{self.name}, parameter {payload.name!r}: cannot decode payloads into "
                    f"{item!r}: {first_line(exc)}"
                ) from None
        self._prepare_address(plan)
        self._prepare_output()
        simple = (
            payload is not None
            and not plan.getters
            and not plan.dependencies
            and not self._middleware
            and not self.batch
        )
        # Decided afresh each time: middleware added since the last prepare() must not be
        # bypassed by a fast path chosen without it.
        self._call = self._simple_call(payload) if simple and self._is_async else None
        self._fast = self._call is not None and self.publish_to is None and self.concurrency == 1
        # A dependency may ask for the batch's infos or failures as well as the handler.
        kinds = {p.kind for p in plan.all_parameters()}
        self._needs_infos = "info" in kinds
        self._needs_failures = "failures" in kinds

    def _simple_call(self, payload: Parameter | None) -> Callable[[Any], Awaitable[Any]]:
        """The call of an async function whose only parameter is its payload."""
        assert payload is not None
        func, name = self.func, payload.name
        if inspect.signature(func).parameters[name].kind is not inspect.Parameter.KEYWORD_ONLY:
            return cast(Callable[[Any], Awaitable[Any]], func)

        async def call_simple(value: Any) -> Any:
            return await func(**{name: value})

        return call_simple

    def _prepare_address(self, plan: Plan) -> None:
        """One type per address parameter, shared by the handler and its dependencies."""
        declared: dict[str, Parameter] = {}
        for p in plan.all_parameters():
            if p.kind != "address" or p.annotation is inspect.Parameter.empty:
                continue
            first = declared.setdefault(p.name, p)
            if first.annotation != p.annotation:
                raise AppDefinitionError(
                    f"{self.name}: address parameter {{{p.name}}} is "
                    f"{type_name(first.annotation)} in {first.owner} but "
                    f"{type_name(p.annotation)} in {p.owner}; declare one type"
                )
        self.address_types = {}
        self._converters = {}
        for name in self.pattern.params:
            p_or_none = declared.get(name)
            annotation = str if p_or_none is None else p_or_none.annotation
            self.address_types[name] = annotation
            if annotation is str:
                continue
            assert p_or_none is not None
            where = f"{p_or_none.owner}, parameter {name!r}"
            adapter = checked_adapter(annotation, where)
            if _structured(adapter):
                raise AppDefinitionError(
                    f"{where}: {{{name}}} of the address {self.pattern.text!r} is one "
                    f"segment of text and cannot be {type_name(annotation)}; give it a scalar type "
                    "(str, int, an Enum ...), or rename the parameter if it is the payload"
                )
            self._converters[name] = adapter.validate_strings

    def _prepare_output(self) -> None:
        hints = type_hints(self.func, self.localns)
        returned = hints.get("return", None)
        if self.publish_to is None:
            self.output_type = None
            self._encode = None
            self._prepare_addressed_output(returned)
            return
        if "return" not in hints or returned is None or returned is type(None):
            raise AppDefinitionError(
                f"{self.name}, return: publish_to={self.publish_to!r} needs a return "
                "annotation (the type of the message to publish)"
            )
        base, _ = unwrap_annotated(returned)
        base = strip_none(base)
        if self.batch:
            if typing.get_origin(base) not in (list, Sequence, typing.Sequence):
                raise AppDefinitionError(
                    f"{self.name}, return: a batch handler with publish_to returns list[T], "
                    f"not {base!r}"
                )
            (base,) = typing.get_args(base) or (Any,)
        if typing.get_origin(base) is Outgoing or base is Outgoing:
            (base,) = typing.get_args(base) or (Any,)
        elif self.output_extra:
            name = self.output_extra[0]
            raise AppDefinitionError(
                f"{self.name}, publish_to={self.publish_to!r}: {{{name}}} is not a parameter "
                f"of the address {self.pattern.text!r}; return Outgoing[...] with "
                f"params={{{name!r}: ...}} to give it per result"
            )
        try:
            self._encode = make_encoder(base)
        except Exception as exc:
            raise AppDefinitionError(
                f"{self.name}, return: cannot serialize {base!r}: "
                f"{type(exc).__name__}: {first_line(exc)}"
            ) from None
        self.output_type = base

    def _prepare_addressed_output(self, returned: Any) -> None:
        """Without ``publish_to``: an ``Outgoing`` returned goes to its own address; any
        other result has nowhere to go (a warning names a return type that says one)."""
        if returned in (None, type(None), Any, object):
            return
        base = strip_none(unwrap_annotated(returned)[0])
        if self.batch and typing.get_origin(base) in (list, Sequence, typing.Sequence):
            (base,) = typing.get_args(base) or (Any,)
        if typing.get_origin(base) is Outgoing or base is Outgoing:
            (item,) = typing.get_args(base) or (Any,)
            if item is not Any:
                try:
                    self._encode = make_encoder(item)
                except Exception as exc:
                    raise AppDefinitionError(
                        f"{self.name}, return: cannot serialize {item!r}: "
                        f"{type(exc).__name__}: {first_line(exc)}"
                    ) from None
            return
        logger.warning(
            "%s returns %s but has no publish_to: what it returns is not published "
            "(give publish_to=..., return Outgoing(..., address=...), or annotate -> None)",
            self.name,
            type_name(returned),
        )

    def convert_address(self, raw: dict[str, str]) -> dict[str, Any]:
        """Address parameter values in their annotated types; PayloadError if one does not fit,
        ValidatorFailed if a validator raised anything else."""
        if not self._converters:
            return raw
        values = dict(raw)
        for name, convert in self._converters.items():
            try:
                values[name] = convert(raw[name])
            except ValidationError as exc:
                raise PayloadError(
                    f"address parameter {name!r}={raw[name]!r}: {describe_validation_error(exc)}"
                ) from None
            except Exception as exc:
                raise validator_failed(f"address parameter {name!r}={raw[name]!r}", exc) from None
        return values

    # -- one call ------------------------------------------------------------------------

    async def serve(
        self,
        receive: AMGIReceiveCallable,
        send: AMGISendCallable,
        address: str,
        params: dict[str, Any],
        state: Mapping[str, Any],
        dead_letter_ok: bool,
        raw: Mapping[str, str] | None = None,
    ) -> None:
        """Handle every message of one AMGI message call.

        ``raw``: the address parameters as matched (they fill ``publish_to``).
        """
        consumed = raw if raw is not None else {k: str(v) for k, v in params.items()}
        call = _BatchState(self, send, address, params, state, dead_letter_ok, consumed)
        pattern = self.output_pattern
        if pattern is not None and pattern.params and not self.output_extra:
            call.output_address = fill(pattern, consumed)
        if self._fast:
            await call.run_fast(receive)
        elif self.batch:
            await call.run_batch(receive)
        elif self.concurrency > 1:
            events = await receive_all(receive)
            limit = asyncio.Semaphore(self.concurrency)

            async def one(event: Mapping[str, Any]) -> None:
                async with limit:
                    await call.run_one(event)

            async with asyncio.TaskGroup() as group:
                for event in events:
                    group.create_task(one(event))
        else:
            run_one = call.run_one
            more = True
            while more:
                event = await receive()
                await run_one(event)
                more = event.get("more_messages", False)  # type: ignore[assignment]

    async def _invoke_one(self, event: Any, ctx: Context | None) -> Any:
        decode = self._decode
        value: Any = None
        if decode is not None:
            try:
                value = decode(event.get("payload"), event.get("headers"))
            except Exception as exc:
                raise self._undecodable(exc) from None
            call = self._call
            if call is not None:
                return await call(value)
        assert ctx is not None
        ctx.event = event
        return await self._invoke(ctx, value)

    async def _invoke(self, ctx: Context, value: Any) -> Any:
        """One call of the function, with dependencies resolved afresh.

        The cleanup of yield dependencies runs at once if the call raises (they see the
        exception); after a return it is kept in ``ctx`` until the result is published.
        """
        plan = self.plan
        assert plan is not None
        ctx.cache = None
        if not plan.needs_stack:
            return await self._run(await self._kwargs(plan, ctx, value))
        stack = ctx.stack = contextlib.AsyncExitStack()
        try:
            result = await self._run(await self._kwargs(plan, ctx, value))
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        ctx.keep(stack)
        return result

    async def _kwargs(self, plan: Plan, ctx: Context, value: Any) -> dict[str, Any]:
        try:
            kwargs = await plan.kwargs(ctx)
        except PayloadError as exc:
            raise _Invalid(f"{self.name}: {exc}") from None
        except ValidatorFailed as exc:
            raise _Invalid(f"{self.name}: {exc}", dead=False) from None
        if self.payload is not None:
            kwargs[self.payload.name] = value
        return kwargs

    async def _run(self, kwargs: dict[str, Any]) -> Any:
        if self._is_async:
            return await self.func(**kwargs)
        return await in_thread(self.func, **kwargs)

    def _undecodable(self, exc: Exception) -> _Invalid:
        """How a message whose payload could not be decoded is nacked (every path).

        An invalid payload is dead-lettered at once. Anything else a validator raises
        (a bug, a lookup that failed) is retried, like an exception of the handler.
        """
        where = f"{self.name}, parameter {self.payload.name!r}" if self.payload else self.name
        if isinstance(exc, ValidationError):
            return _Invalid(f"invalid payload for {where}: {describe_validation_error(exc)}")
        if isinstance(exc, PayloadError):
            return _Invalid(f"invalid payload for {where}: {exc}")
        return _Invalid(f"{where}: decoding the payload raised {_describe(exc)}", dead=False)

    def encode_output(
        self, result: Any, address: str, consumed: Mapping[str, str]
    ) -> tuple[str, list[tuple[bytes, bytes]], bytes, dict[str, Any]]:
        """The ``message.send`` parts of a returned value (raises if it cannot be serialized).

        ``address``: ``publish_to`` filled from ``consumed`` (the consumed address's
        parameters), where it goes unless the result is an Outgoing with its own address
        or parameters; _AddressError if an address cannot be filled.
        """
        encode = self._encode or encode_any  # no publish_to: an Outgoing of any type
        if isinstance(result, Outgoing):
            template = result.address if result.address is not None else self.publish_to
            if template is None:
                raise _AddressError(
                    "the Outgoing has no address and the handler no publish_to; give "
                    "Outgoing(..., address=...) or publish_to=..."
                )
            if result.address is not None or result.params or self.output_extra:
                address = _fill(template, consumed, result.params)
            data, ctype = encode(result.payload)
            bindings = {k: dict(v) for k, v in (result.bindings or {}).items()}
            return address, encode_headers(result.headers, ctype), data, bindings
        if self.output_extra:
            assert self.publish_to is not None
            address = _fill(self.publish_to, consumed, None)
        data, ctype = encode(result)
        return address, [(b"content-type", ctype.encode())], data, {}

    def with_middleware(
        self, invoke: Callable[[], Awaitable[Any]], call: Callable[[], HandlerCall]
    ) -> Callable[[], Awaitable[Any]]:
        """``invoke`` wrapped in the app's middleware, first declared outermost
        (:func:`amgi.app._middleware.wrap`)."""
        if not self._middleware:
            return invoke
        return wrap(invoke, self._middleware, self._middleware_names, self.name, call())


class _AddressError(ValueError):
    """A result's address cannot be filled (a parameter missing or invalid)."""


def _fill(template: str, consumed: Mapping[str, str], given: Mapping[str, Any] | None) -> str:
    try:
        return fill_template(template, consumed, given)
    except ValueError as exc:
        raise _AddressError(str(exc)) from None


def _structured(adapter: Any) -> bool:
    """True when values of ``adapter``'s type are JSON objects or arrays (not one segment)."""
    try:
        schema = adapter.json_schema()
    except Exception:
        return False  # not describable: let the conversion decide per message
    ref = schema.get("$ref", "")
    if ref.startswith("#/$defs/"):
        schema = schema.get("$defs", {}).get(ref[len("#/$defs/") :], schema)
    return schema.get("type") in ("object", "array")


async def receive_all(receive: AMGIReceiveCallable) -> list[Any]:
    """Every message event of the call, up to the one without ``more_messages``."""
    events = []
    more = True
    while more:
        event = await receive()
        events.append(event)
        more = bool(event.get("more_messages", False))
    return events


class _BatchState:
    """One AMGI call's shared state: send, address, parameters, lifespan state."""

    __slots__ = (
        "address",
        "consumed",
        "dead_letter_ok",
        "handler",
        "output_address",
        "params",
        "publisher",
        "send",
        "state",
    )

    def __init__(
        self,
        handler: Handler,
        send: AMGISendCallable,
        address: str,
        params: dict[str, Any],
        state: Mapping[str, Any],
        dead_letter_ok: bool,
        consumed: Mapping[str, str],
    ) -> None:
        self.handler = handler
        self.send = send
        self.address = address
        self.params = params
        self.state = state
        self.dead_letter_ok = dead_letter_ok
        self.consumed = consumed
        """The consumed address's parameters as matched (they fill outgoing addresses)."""
        self.publisher = Publisher(send, consumed)
        self.output_address = handler.publish_to or ""
        """``publish_to`` with the address parameters filled in."""

    def context(self, event: Any) -> Context:
        return Context(event, self.address, self.params, self.state, self.publisher)

    async def nack(self, mid: str, reason: str, dead: bool) -> None:
        if dead and self.dead_letter_ok:
            # The message.nack.retry extension: dead-letter now, no more attempts.
            event = {"type": "message.nack", "id": mid, "message": reason, "retry": False}
            await self.send(cast(MessageNackEvent, event))
        else:
            await self.send({"type": "message.nack", "id": mid, "message": reason})

    async def fail(self, event: Any, reason: str, exc: BaseException) -> None:
        """Nack ``event`` for an exception of the handler call, and log its traceback."""
        self.log_failure(reason, exc, 1, event)
        await self.nack(event["id"], reason, False)

    def log_failure(self, reason: str, exc: BaseException, count: int, first: Any) -> None:
        """Log the traceback of a failed handler call (the nack reason is one line, with
        no place in the code): at error on a first attempt, at debug on the retries,
        which the runtime's line of each nack already reports."""
        attempt = _attempt(first)
        level = logging.ERROR if attempt <= 1 else logging.DEBUG
        if not logger.isEnabledFor(level):
            return
        what = f"message {first['id']}" if count == 1 else f"a batch of {count} message(s)"
        error = exc.error if isinstance(exc, MiddlewareFailed) else exc
        logger.log(
            level,
            "%s from %r (attempt %d): %s",
            what,
            self.address,
            attempt,
            reason,
            exc_info=error,
        )

    async def publish(
        self,
        address: str,
        headers: list[tuple[bytes, bytes]],
        payload: bytes,
        bindings: dict[str, Any],
    ) -> None:
        await self.send(
            {
                "type": "message.send",
                "address": address,
                "headers": headers,
                "payload": payload,
                "bindings": bindings,
            }
        )

    async def run_fast(self, receive: AMGIReceiveCallable) -> None:
        """The loop of a handler that takes only the payload and publishes nothing."""
        handler = self.handler
        decode = handler._decode
        call = handler._call
        assert decode is not None
        assert call is not None
        send = self.send
        more = True
        while more:
            event: Any = await receive()
            mid = event["id"]
            try:
                value = decode(event.get("payload"), event.get("headers"))
            except Exception as exc:
                invalid = handler._undecodable(exc)
                await self.nack(mid, str(invalid), invalid.dead)
            else:
                try:
                    if (result := await call(value)) is not None:
                        # The one kind of result it publishes: an Outgoing naming its
                        # address (the fast path has no publish_to).
                        await self.publish_all([result])
                except _OutputError as exc:
                    await self.nack(mid, str(exc), False)
                except DeadLetter as exc:
                    await self.nack(mid, f"{handler.name}: dead-lettered: {exc}", True)
                except Exception as exc:
                    await self.fail(event, _raised(handler, exc), exc)
                except asyncio.CancelledError as exc:
                    if _cancelling():
                        raise
                    await self.fail(event, _not_cancelled(handler), exc)
                else:
                    await send({"type": "message.ack", "id": mid})
            more = event.get("more_messages", False)

    def encode_outputs(
        self, results: Sequence[Any]
    ) -> list[tuple[str, list[tuple[bytes, bytes]], bytes, dict[str, Any]]]:
        """The sends of the handler's results (None: nothing); _OutputError if one fails."""
        handler = self.handler
        address, consumed = self.output_address, self.consumed
        try:
            return [handler.encode_output(r, address, consumed) for r in results if r is not None]
        except _AddressError as exc:
            raise _OutputError(
                f"{handler.name}: its result could not be published, nothing was published: {exc}",
                exc,
            ) from None
        except Exception as exc:
            raise _OutputError(
                f"{handler.name}: its result could not be serialized, nothing was "
                f"published: {_describe(exc)}",
                exc,
            ) from None

    async def publish_all(self, results: Any) -> None:
        """Publish what the handler returned (a list of results for a batch handler)."""
        if self.handler.publish_to is None:
            # Only an Outgoing has somewhere to go: it names its address.
            if not isinstance(results, list | tuple):
                results = [results]
            results = [r for r in results if isinstance(r, Outgoing)]
            if not results:
                return
        for address, headers, payload, bindings in self.encode_outputs(results):
            await self.publish(address, headers, payload, bindings)

    async def handle_one(self, event: Any) -> None:
        """Decode, call, publish the result, then run the dependencies' cleanup."""
        handler = self.handler
        if handler._call is not None:
            await self.publish_all([await handler._invoke_one(event, None)])
            return
        ctx = self.context(event)
        invoke = handler._invoke_one
        try:
            if handler._middleware:
                result = await handler.with_middleware(
                    lambda: invoke(event, ctx),
                    lambda: HandlerCall(
                        handler.name, self.address, [message_info(event, self.address)]
                    ),
                )()
            else:
                result = await invoke(event, ctx)
            await self.publish_all([result])
        except BaseException as exc:
            await ctx.close(_seen(exc))
            raise
        await ctx.close(None)

    async def run_one(self, event: Any) -> None:
        handler = self.handler
        mid = event["id"]
        try:
            await self.handle_one(event)
        except _Invalid as exc:
            await self.nack(mid, str(exc), exc.dead)
        except DeadLetter as exc:
            await self.nack(mid, f"{handler.name}: dead-lettered: {exc}", True)
        except _OutputError as exc:
            await self.nack(mid, str(exc), False)
        except Exception as exc:
            await self.fail(event, _raised(handler, exc), exc)
        except asyncio.CancelledError as exc:
            if _cancelling():
                raise
            await self.fail(event, _not_cancelled(handler), exc)
        else:
            await self.send({"type": "message.ack", "id": mid})

    async def run_batch(self, receive: AMGIReceiveCallable) -> None:
        handler = self.handler
        decode = handler._decode
        # Only the ids are kept (the events are let go as they come) unless the handler or
        # a middleware asks for the messages' metadata.
        keep = handler._needs_infos or bool(handler._middleware)
        ids: list[str] = []
        kept: list[Any] = []
        values: list[Any] = []
        first = None
        """The first message handed to the handler (its attempt and id name the batch)."""
        more = True
        while more:
            event: Any = await receive()
            more = event.get("more_messages", False)
            if decode is not None:
                try:
                    value = decode(event.get("payload"), event.get("headers"))
                except Exception as exc:
                    invalid = handler._undecodable(exc)
                    await self.nack(event["id"], str(invalid), invalid.dead)
                    continue
                values.append(value)
            ids.append(event["id"])
            first = first or event
            if keep:
                kept.append(event)
        if not ids:
            return
        ctx = self.context(None)
        failures = ctx.failures = Failures(len(ids)) if handler._needs_failures else None
        if keep:
            ctx.infos = [message_info(e, self.address) for e in kept]
        invoke = handler._invoke
        try:
            try:
                if handler._middleware:

                    async def attempt() -> Any:
                        # Each call_next() fails items afresh; the last call that
                        # returned decides which items are nacked.
                        nonlocal failures
                        mine = ctx.failures = Failures(len(ids)) if failures is not None else None
                        outcome = await invoke(ctx, values)
                        failures = mine
                        return outcome

                    result = await handler.with_middleware(
                        attempt,
                        lambda: HandlerCall(handler.name, self.address, list(ctx.infos or ())),
                    )()
                else:
                    result = await invoke(ctx, values)
                await self.publish_all(result or ())
            except BaseException as exc:
                await ctx.close(_seen(exc))
                raise
            await ctx.close(None)
        except DeadLetter as exc:
            for mid in ids:
                await self.nack(mid, f"{handler.name}: dead-lettered: {exc}", True)
            return
        except _Invalid as exc:  # a dependency found the messages unusable (PayloadError)
            for mid in ids:
                await self.nack(mid, str(exc), exc.dead)
            return
        except Exception as exc:
            reason = str(exc) if isinstance(exc, _OutputError) else _raised(handler, exc)
            if not isinstance(exc, _OutputError):
                self.log_failure(reason, exc, len(ids), first)
            for mid in ids:
                await self.nack(mid, reason, False)
            return
        except asyncio.CancelledError as exc:
            if _cancelling():
                raise
            reason = _not_cancelled(handler)
            self.log_failure(reason, exc, len(ids), first)
            for mid in ids:
                await self.nack(mid, reason, False)
            return
        send = self.send
        if failures is None or not failures:
            for mid in ids:
                await send({"type": "message.ack", "id": mid})
            return
        for i, mid in enumerate(ids):
            failed = failures.get(i)
            if failed is None:
                await send({"type": "message.ack", "id": mid})
            else:
                await self.nack(mid, f"{handler.name}: {failed[0]}", failed[1])


class _OutputError(Exception):
    """The result could not be serialized; ``error`` is what the serializer raised."""

    def __init__(self, reason: str, error: Exception) -> None:
        super().__init__(reason)
        self.error = error


def _seen(exc: BaseException) -> BaseException:
    """The exception the dependencies' cleanup is given for ``exc``."""
    return exc.error if isinstance(exc, _OutputError | MiddlewareFailed) else exc


def _cancelling() -> bool:
    """True when the running task is being cancelled (a shutdown, a deadline): a
    CancelledError a handler raises otherwise came from something it awaited."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _not_cancelled(handler: Handler) -> str:
    """The nack reason of a handler that raised CancelledError in a call not cancelled."""
    return (
        f"{handler.name} raised CancelledError, though its call was not cancelled "
        "(it awaited a task or future that was cancelled)"
    )


def _attempt(event: Any) -> int:
    """The attempt of a received message (1 when the server does not count them)."""
    amgi = (event.get("bindings") or {}).get("amgi") or {}
    attempt = amgi.get("attempt", 1)
    return attempt if type(attempt) is int else 1


def _raised(handler: Handler, exc: Exception) -> str:
    """The nack reason of a handler call that raised ``exc``."""
    if isinstance(exc, MiddlewareFailed):
        return f"{handler.name}: middleware {exc.owner} raised {_describe(exc.error)}"
    return f"{handler.name} raised {_describe(exc)}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        # A TaskGroup's error: what its tasks raised.
        return "; ".join(_describe(e) for e in _leaves(exc))
    if isinstance(exc, ValidationError):
        return f"{type(exc).__name__}: {describe_validation_error(exc)}"
    return f"{type(exc).__name__}: {one_line(str(exc))}"


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    found: list[BaseException] = []
    for e in group.exceptions:
        found.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return found
