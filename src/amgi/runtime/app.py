"""The check every entry point makes before calling an application: is it async?"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from amgi.errors import ConfigurationError

__all__ = ["check_app", "describe"]


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
