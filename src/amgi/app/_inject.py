"""What a handler or dependency parameter gets, worked out once per function at startup.

Each parameter becomes a getter ``get(context) -> value`` (headers, bindings, metadata,
lifespan state, address parameters, the publisher) or a dependency to resolve. Nothing is
inspected per message: the message only runs the getters.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from pydantic import TypeAdapter, ValidationError

from amgi.app._codec import describe_validation_error, strip_none
from amgi.app._errors import AppDefinitionError, PayloadError, first_line, validator_failed
from amgi.app._params import Binding, Depends, Failures, Header, MessageInfo, Meta, State
from amgi.app._publisher import Publisher

__all__ = [
    "Context",
    "Dependency",
    "Parameter",
    "Plan",
    "analyse",
    "checked_adapter",
    "type_name",
    "unwrap_annotated",
]

_MISSING: Any = inspect.Parameter.empty

logger = logging.getLogger("amgi.app")

T = TypeVar("T")


class Context:
    """The per-message (or per-batch) state getters read from."""

    __slots__ = (
        "address",
        "cache",
        "event",
        "exits",
        "failures",
        "infos",
        "params",
        "publisher",
        "send",
        "stack",
        "state",
    )

    def __init__(
        self,
        event: Mapping[str, Any] | None,
        address: str,
        params: dict[str, Any],
        state: Mapping[str, Any],
        publisher: Publisher,
    ) -> None:
        self.event = event
        self.address = address
        self.params = params
        self.state = state
        self.publisher = publisher
        self.cache: dict[Any, Any] | None = None
        self.stack: contextlib.AsyncExitStack | None = None
        self.exits: contextlib.AsyncExitStack | None = None
        self.failures: Failures | None = None
        self.infos: list[MessageInfo] | None = None

    def keep(self, stack: contextlib.AsyncExitStack) -> None:
        """Hold the cleanup of a call that returned until :meth:`close`."""
        if self.exits is None:
            self.exits = contextlib.AsyncExitStack()
        self.exits.push_async_exit(stack)

    async def close(self, error: BaseException | None) -> None:
        """Run the kept cleanups (last call first); ``error`` is thrown into them."""
        exits, self.exits = self.exits, None
        if exits is None:
            return
        if error is None:
            await exits.aclose()
        else:
            # A cleanup that swallows the error does not turn the failure into success:
            # the caller raises it anyway.
            await exits.__aexit__(type(error), error, error.__traceback__)


def message_info(event: Mapping[str, Any], address: str) -> MessageInfo:
    """The :class:`MessageInfo` of a received event."""
    bindings = event.get("bindings") or {}
    return MessageInfo(
        id=event["id"],
        address=address,
        attempt=int(bindings.get("amgi", {}).get("attempt", 1)),
        headers=list(event.get("headers", ())),
        payload=event.get("payload"),
        bindings=bindings,
    )


@dataclass(slots=True)
class Parameter:
    """One injected parameter, as the AsyncAPI document and error messages need it."""

    name: str
    kind: str  # payload, header, binding, meta, state, address, publisher, info, failures, depends
    annotation: Any
    source: Any = None  # the Header / Binding / ... marker
    default: Any = _MISSING
    owner: str = ""  # the function that declares it


@dataclass(slots=True)
class Dependency:
    """A ``Depends`` target and the plan of its own parameters."""

    func: Callable[..., Any]
    use_cache: bool
    plan: Plan
    kind: str  # async, sync, asyncgen, gen


@dataclass(slots=True)
class Plan:
    """How to call one function: its getters and its dependencies."""

    owner: str
    getters: list[tuple[str, Callable[[Context], Any]]] = field(default_factory=list)
    dependencies: list[tuple[str, Dependency]] = field(default_factory=list)
    parameters: list[Parameter] = field(default_factory=list)
    needs_stack: bool = False
    needs_publisher: bool = False

    async def kwargs(self, ctx: Context) -> dict[str, Any]:
        """The keyword arguments for one call."""
        values = {name: get(ctx) for name, get in self.getters}
        for name, dep in self.dependencies:
            values[name] = await resolve(dep, ctx)
        return values

    def all_parameters(self) -> list[Parameter]:
        """Own parameters and those of every dependency, depth first."""
        found = list(self.parameters)
        for _, dep in self.dependencies:
            found.extend(dep.plan.all_parameters())
        return found


async def resolve(dep: Dependency, ctx: Context) -> Any:
    """The value of ``dep`` for this message (cached per message unless told otherwise)."""
    if dep.use_cache:
        cache = ctx.cache
        if cache is None:
            cache = ctx.cache = {}
        elif dep.func in cache:
            return cache[dep.func]
    kwargs = await dep.plan.kwargs(ctx)
    kind = dep.kind
    if kind == "async":
        value = await dep.func(**kwargs)
    elif kind == "sync":
        value = await in_thread(dep.func, **kwargs)
    else:
        stack = ctx.stack
        assert stack is not None
        if kind == "asyncgen":
            value = await stack.enter_async_context(
                contextlib.asynccontextmanager(dep.func)(**kwargs)
            )
        else:
            manager = contextlib.contextmanager(dep.func)(**kwargs)
            # A thread cannot be cancelled: a call cancelled during the setup still waits
            # for it to finish, then cleans up what it acquired.
            entered = asyncio.ensure_future(asyncio.to_thread(manager.__enter__))

            async def leave(*exc: Any) -> bool | None:
                if not entered.done():
                    await asyncio.wait({entered})
                if entered.cancelled() or entered.exception() is not None:
                    return None  # the setup failed: nothing to clean up
                return await in_thread(manager.__exit__, *exc)

            stack.push_async_exit(leave)
            value = await asyncio.shield(entered)
    if dep.use_cache:
        assert ctx.cache is not None
        ctx.cache[dep.func] = value
    return value


async def in_thread(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` in a worker thread; cancelled, it waits for the thread.

    A thread cannot be cancelled. Returning at the cancel would leave it running with no
    owner (the process then hangs at its exit, waiting for the executor's threads);
    waiting, the call outlives the cancel, and the runtime abandons it loudly once its
    grace is over.
    """
    running = asyncio.ensure_future(asyncio.to_thread(func, *args, **kwargs))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        if not running.done():
            logger.warning(
                "%s was cancelled while it runs in a thread, which cannot be cancelled: "
                "its call ends when the function returns",
                name_of(func),
            )
            await asyncio.wait({running})
        if not running.cancelled():
            running.exception()  # retrieved: the call ends cancelled whatever it did
        raise


def unwrap_annotated(annotation: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, a, b]`` -> (T, [a, b]); anything else -> (annotation, [])."""
    if typing.get_origin(annotation) is Annotated:
        args = typing.get_args(annotation)
        return args[0], list(args[1:])
    return annotation, []


def type_name(annotation: Any) -> str:
    """A short readable name: ``Order``, ``Order | None``, ``list[Order]``."""
    base, _ = unwrap_annotated(annotation)
    origin = typing.get_origin(base)
    args = typing.get_args(base)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if base is type(None):
        return "None"
    if origin is not None:
        name = getattr(origin, "__name__", None) or str(origin).removeprefix("typing.")
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    return getattr(base, "__name__", None) or str(base).removeprefix("typing.")


def function_kind(func: Callable[..., Any]) -> str:
    """async, sync, asyncgen or gen."""
    if inspect.isasyncgenfunction(func):
        return "asyncgen"
    if inspect.isgeneratorfunction(func):
        return "gen"
    if inspect.isclass(func):
        return "sync"  # Depends(SomeClass): calling it builds an instance
    if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - an object with an async __call__
    ):
        return "async"
    return "sync"


def name_of(func: Callable[..., Any]) -> str:
    """The name errors use for ``func``."""
    return getattr(func, "__qualname__", None) or repr(func)


def type_hints(
    func: Callable[..., Any], localns: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Resolved annotations of ``func``, or one error naming the function.

    ``localns``: the names of the scope that declared it (for classes defined in a function).
    """
    target: Any = func
    if inspect.isclass(func):
        # A class dependency is called with the parameters of its __init__.
        target = func.__init__
        if target is object.__init__:
            return {}
    elif not (inspect.isfunction(func) or inspect.ismethod(func)):
        target = func.__call__  # type: ignore[operator]
    try:
        return typing.get_type_hints(target, localns=dict(localns or {}), include_extras=True)
    except Exception as exc:
        raise AppDefinitionError(
            f"{name_of(func)}: cannot resolve its annotations: {type(exc).__name__}: "
            f"{first_line(exc)}"
        ) from None


def analyse(
    func: Callable[..., Any],
    *,
    address_params: tuple[str, ...],
    allow_payload: bool,
    batch: bool,
    localns: Mapping[str, Any] | None = None,
    seen: tuple[Callable[..., Any], ...] = (),
) -> tuple[Plan, Parameter | None]:
    """Work out how to call ``func``; returns its plan and its payload parameter, if any.

    Raises :class:`AppDefinitionError` naming the function and parameter it cannot serve.
    """
    owner = name_of(func)
    if func in seen:
        raise AppDefinitionError(f"{owner}: depends on itself (through {name_of(seen[-1])})")
    hints = type_hints(func, localns)
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise AppDefinitionError(f"{owner}: cannot read its signature: {exc}") from None
    plan = Plan(owner)
    payload: Parameter | None = None
    sync = function_kind(func) in ("sync", "gen")
    for p in signature.parameters.values():
        where = f"{owner}, parameter {p.name!r}"
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise AppDefinitionError(f"{where}: *args and **kwargs cannot be injected")
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise AppDefinitionError(f"{where}: positional-only parameters cannot be injected")
        annotation = hints.get(p.name, _MISSING)
        base, extras = unwrap_annotated(annotation)
        markers = [e for e in extras if isinstance(e, Header | Binding | Meta | State | Depends)]
        if isinstance(p.default, Depends):
            markers.append(p.default)
        if len(markers) > 1:
            raise AppDefinitionError(f"{where}: more than one of Header/Binding/Depends/...")
        default = p.default if not isinstance(p.default, Depends) else _MISSING
        marker = markers[0] if markers else None
        if isinstance(marker, Depends):
            sub, _ = analyse(
                marker.dependency,
                address_params=address_params,
                allow_payload=False,
                batch=batch,
                localns=localns,
                seen=(*seen, func),
            )
            kind = function_kind(marker.dependency)
            plan.dependencies.append(
                (p.name, Dependency(marker.dependency, marker.use_cache, sub, kind))
            )
            plan.parameters.append(Parameter(p.name, "depends", base, marker))
            plan.needs_stack |= sub.needs_stack or kind in ("asyncgen", "gen")
            plan.needs_publisher |= sub.needs_publisher
            continue
        if isinstance(marker, Header | Binding) and batch:
            raise AppDefinitionError(
                f"{where}: a batch handler cannot take a single {type(marker).__name__}; "
                "take list[MessageInfo] for per-item headers and bindings"
            )
        if annotation is _MISSING and marker is None and p.name not in address_params:
            raise AppDefinitionError(f"{where}: has no type annotation")
        getter: Callable[[Context], Any]
        if isinstance(marker, Header | Binding):
            # The type with its constraints (Annotated extras other than the marker).
            kept = [e for e in extras if e is not marker]
            checked = Annotated[(base, *kept)] if kept else base
            if isinstance(marker, Header):
                getter = _header_getter(marker, checked, default, where)
                plan.parameters.append(Parameter(p.name, "header", checked, marker, default))
            else:
                getter = _binding_getter(marker, checked, default, where)
                plan.parameters.append(Parameter(p.name, "binding", checked, marker, default))
        elif isinstance(marker, Meta):
            getter = _meta_getter(marker, batch, where)
            plan.parameters.append(Parameter(p.name, "meta", base, marker))
        elif isinstance(marker, State):
            getter = _state_getter(marker.key or p.name, default, where)
            plan.parameters.append(Parameter(p.name, "state", base, marker, default))
        elif p.name in address_params:
            name = p.name
            getter = _address_getter(name)
            # The annotation as written (constraints kept); _MISSING: no type declared.
            plan.parameters.append(Parameter(name, "address", annotation))
        elif base is Publisher:
            if sync:
                raise AppDefinitionError(
                    f"{where}: a sync (def) function cannot await Publisher.publish; "
                    f"make {owner} an async def"
                )
            getter = _get_publisher
            plan.needs_publisher = True
            plan.parameters.append(Parameter(p.name, "publisher", base))
        elif base is MessageInfo:
            if batch:
                raise AppDefinitionError(
                    f"{where}: a batch handler takes list[MessageInfo], one per item"
                )
            getter = _get_info
            plan.parameters.append(Parameter(p.name, "info", base))
        elif batch and base == list[MessageInfo]:
            getter = _get_infos
            plan.parameters.append(Parameter(p.name, "info", base))
        elif base is Failures:
            if not batch:
                raise AppDefinitionError(f"{where}: Failures is only given to batch handlers")
            getter = _get_failures
            plan.parameters.append(Parameter(p.name, "failures", base))
        else:
            if not allow_payload:
                raise AppDefinitionError(
                    f"{where}: a dependency cannot take the payload; mark the parameter "
                    "with Header, Binding, Meta, State or Depends"
                )
            if payload is not None:
                raise AppDefinitionError(
                    f"{where}: a second payload parameter (the payload is {payload.name!r}); "
                    "mark one with Header, Binding, Meta, State or Depends"
                )
            payload = Parameter(p.name, "payload", annotation, default=default)
            plan.parameters.append(payload)
            continue
        plan.getters.append((p.name, getter))
    for parameter in plan.parameters:
        parameter.owner = owner
    return plan, payload


def checked_adapter(annotation: Any, where: str) -> TypeAdapter[Any]:
    """A TypeAdapter for ``annotation``, or one AppDefinitionError naming ``where``."""
    try:
        return TypeAdapter(annotation)
    except Exception as exc:
        raise AppDefinitionError(
            f"{where}: unsupported type {annotation!r}: {first_line(exc)}"
        ) from None


def _converter(annotation: Any, where: str) -> Callable[[str], Any]:
    if annotation is str or annotation is _MISSING or annotation is Any:
        return _identity
    return checked_adapter(annotation, where).validate_strings


def _identity(value: Any) -> Any:
    return value


def _header_getter(
    marker: Header, annotation: Any, default: Any, where: str
) -> Callable[[Context], Any]:
    wanted = marker.name.lower().encode()
    base, constraints = unwrap_annotated(annotation)
    base = strip_none(base)
    raw = base is bytes  # taken as it came; other headers are UTF-8 text
    checked = Annotated[(base, *constraints)] if constraints else base
    convert: Callable[[Any], Any]
    if raw:
        convert = checked_adapter(checked, where).validate_python if constraints else _identity
    else:
        convert = _converter(checked, where)
    missing_ok = default is not _MISSING

    def get(ctx: Context) -> Any:
        assert ctx.event is not None
        for name, value in ctx.event.get("headers", ()):
            if name == wanted or name.lower() == wanted:
                try:
                    return convert(value if raw else value.decode("utf-8"))
                except (ValidationError, UnicodeDecodeError) as exc:
                    raise PayloadError(f"header {marker.name!r}: {_short(exc)}") from None
                except Exception as exc:
                    raise validator_failed(f"header {marker.name!r}", exc) from None
        if missing_ok:
            return default
        raise PayloadError(f"missing header {marker.name!r}")

    return get


def _binding_getter(
    marker: Binding, annotation: Any, default: Any, where: str
) -> Callable[[Context], Any]:
    protocol, key = marker.protocol, marker.key
    check: Callable[[Any], Any]
    if annotation is Any or annotation is _MISSING:
        check = _identity
    else:
        check = checked_adapter(annotation, where).validate_python
    missing_ok = default is not _MISSING

    def get(ctx: Context) -> Any:
        assert ctx.event is not None
        values = (ctx.event.get("bindings") or {}).get(protocol)
        if values is not None and key in values:
            try:
                return check(values[key])
            except ValidationError as exc:
                raise PayloadError(f"binding {protocol}.{key}: {_short(exc)}") from None
            except Exception as exc:
                raise validator_failed(f"binding {protocol}.{key}", exc) from None
        if missing_ok:
            return default
        raise PayloadError(f"missing binding {protocol}.{key}")

    return get


def _meta_getter(marker: Meta, batch: bool, where: str) -> Callable[[Context], Any]:
    if marker.field == "address":
        return _get_address
    if batch:
        raise AppDefinitionError(f"{where}: a batch handler takes list[MessageInfo] for ids")
    if marker.field == "id":
        return _get_id
    if marker.field == "attempt":
        return _get_attempt
    raise AppDefinitionError(f"{where}: Meta takes 'id', 'address' or 'attempt'")


def _state_getter(key: str, default: Any, where: str) -> Callable[[Context], Any]:
    def get(ctx: Context) -> Any:
        try:
            return ctx.state[key]
        except KeyError:
            if default is not _MISSING:
                return default
            raise LookupError(f"the lifespan state has no {key!r} ({where})") from None

    return get


def _address_getter(name: str) -> Callable[[Context], Any]:
    def get(ctx: Context) -> Any:
        return ctx.params[name]

    return get


def _get_publisher(ctx: Context) -> Any:
    return ctx.publisher


def _get_info(ctx: Context) -> Any:
    assert ctx.event is not None
    return message_info(ctx.event, ctx.address)


def _get_infos(ctx: Context) -> Any:
    return ctx.infos


def _get_failures(ctx: Context) -> Any:
    return ctx.failures


def _get_address(ctx: Context) -> Any:
    return ctx.address


def _get_id(ctx: Context) -> Any:
    assert ctx.event is not None
    return ctx.event["id"]


def _get_attempt(ctx: Context) -> Any:
    assert ctx.event is not None
    return int((ctx.event.get("bindings") or {}).get("amgi", {}).get("attempt", 1))


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return describe_validation_error(exc)
    return str(exc)
