"""What every entry point does around an application: the check that it is async, and
the watch of its message calls for a :class:`~amgi.errors.StartupFailed`."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from amgi.errors import ConfigurationError, StartupFailed
from amgi.types import AMGIApplication, AMGIReceiveCallable, AMGISendCallable, Scope

__all__ = ["check_app", "describe", "watched"]


def describe(app: Any) -> str:
    """A short name for ``app`` in error messages."""
    target = app
    while isinstance(target, functools.partial):
        target = target.func
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    module = getattr(target, "__module__", None)
    return f"{module}:{name}" if module and module != "builtins" else str(name)


def _sync_def(function: Any) -> bool:
    """Whether ``function`` is a plain ``def`` that is not a wrapper of an async one."""
    if inspect.iscoroutinefunction(function):
        return False
    unwrapped = inspect.unwrap(function)
    return not inspect.iscoroutinefunction(unwrapped)


def check_app(app: Any) -> None:
    """Refuse what cannot be an AMGI application, with one clear line.

    Valid: an ``async def`` function, an instance whose ``__call__`` is ``async def``,
    a ``functools.partial`` of either, a bound ``async def`` method, or a class whose
    instances are awaitable. A plain ``def`` (or an instance whose ``__call__`` is one)
    is refused: calling it does not return an awaitable.
    """
    if not callable(app):
        raise ConfigurationError(
            f"the application must be an async callable, not {type(app).__name__}"
        )
    target = app
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(target):
        return
    if inspect.isclass(target):
        if hasattr(target, "__await__"):
            return
        problem = "a class whose instances are not awaitable"
    elif inspect.isfunction(target) or inspect.ismethod(target):
        if inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(target):
            problem = "a generator function"
        elif not _sync_def(target):
            return
        else:
            problem = "a plain function ('def')"
    else:
        call = getattr(type(target), "__call__", None)  # noqa: B004
        if not (inspect.isfunction(call) and _sync_def(call)):
            return  # not inspectable (a builtin, a C extension ...): checked at each call
        problem = "an object whose __call__ is a plain 'def'"
    raise ConfigurationError(
        f"the application {describe(app)} is {problem}, not an async callable: "
        "define it with 'async def' (AMGI calls it as 'await app(scope, receive, send)')"
    )


def watched(
    app: AMGIApplication, cannot_serve: Callable[[StartupFailed], None]
) -> Callable[[Scope, AMGIReceiveCallable, AMGISendCallable], Any]:
    """``app`` for message calls, a :class:`StartupFailed` it raises (it cannot serve any
    message: see there) passed to ``cannot_serve`` and the call ended as cancelled, so
    that what it never received goes back without an attempt used up."""

    async def watch(call: Awaitable[None]) -> None:
        try:
            await call
        except StartupFailed as exc:
            cannot_serve(exc)
            raise asyncio.CancelledError from exc

    def call_app(scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable) -> Any:
        call: object = app(scope, receive, send)
        if not inspect.isawaitable(call):
            return call  # refused by the batch call, which says why
        return watch(call)

    return call_app
