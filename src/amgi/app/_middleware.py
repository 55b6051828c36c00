"""The middleware chain of one handler call, and the ``call_next`` each middleware gets.

A middleware may call ``call_next`` again once its previous call returned or raised (a
retry); a call while another is running, or once the handler call ended, raises
RuntimeError naming the middleware. The chain owns every call made in it: one still
running when the outermost middleware is done is cancelled and waited for before the
message is settled.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from amgi.app._errors import AppDefinitionError, DeadLetter
from amgi.app._params import MessageInfo

__all__ = ["HandlerCall", "Middleware", "MiddlewareFailed", "check", "wrap"]


@dataclass(slots=True)
class HandlerCall:
    """What a middleware sees of one handler call."""

    handler: str
    address: str
    messages: list[MessageInfo]


Middleware = Callable[[HandlerCall, Callable[[], Awaitable[Any]]], Awaitable[Any]]
"""``async def mw(call, call_next): ...; return await call_next()`` (first declared: outermost)."""


class MiddlewareFailed(Exception):
    """What a handler call raises when a middleware raised ``error`` of its own (not one
    its ``call_next()`` passed on): the nack reason names the middleware, not the handler."""

    def __init__(self, owner: str, error: Exception) -> None:
        super().__init__(owner, error)
        self.owner = owner
        self.error = error


def check(middleware: Any, name: str) -> None:
    """Raise AppDefinitionError if ``middleware`` cannot be called as ``mw(call, call_next)``
    (at startup: each message would fail for it, then be dead-lettered)."""
    if not callable(middleware):
        raise AppDefinitionError(
            f"middleware {name} is not callable (a {type(middleware).__name__})"
        )
    try:
        signature = inspect.signature(middleware)
    except (TypeError, ValueError):
        return  # a callable without a signature to read: its first call tells
    try:
        signature.bind(None, None)
    except TypeError as exc:
        raise AppDefinitionError(
            f"middleware {name} cannot be called as middleware(call, call_next): {exc}"
        ) from None


def wrap(
    invoke: Callable[[], Awaitable[Any]],
    middleware: Sequence[Middleware],
    names: Sequence[str],
    handler: str,
    info: HandlerCall,
) -> Callable[[], Awaitable[Any]]:
    """``invoke`` inside ``middleware`` (named ``names``), first declared outermost."""
    chain = _Chain(handler)
    wrapped = invoke
    for mw, owner in zip(reversed(middleware), reversed(names), strict=True):
        step = _Step(chain, wrapped, owner)
        chain.steps.append(step)
        wrapped = _bind(mw, info, step, owner, chain)
    outer = wrapped
    return lambda: chain.run(outer)


def _bind(
    mw: Middleware,
    info: HandlerCall,
    call_next: Callable[[], Awaitable[Any]],
    owner: str,
    chain: _Chain,
) -> Callable[[], Awaitable[Any]]:
    async def step() -> Any:
        outcome = mw(info, call_next)
        if not inspect.isawaitable(outcome):
            raise TypeError(
                f"middleware {owner} returned {type(outcome).__name__}, not an awaitable; "
                "make it an async def that returns await call_next()"
            )
        try:
            return await outcome
        except Exception as exc:
            if not any(exc is passed for passed in chain.passed):
                chain.culprit = (exc, owner)  # its own, not the handler's
            raise

    return step


class _Chain:
    """The middleware chain of one handler call (one message, or one batch).

    It owns every ``call_next()`` made in it: when the outermost middleware is done, a
    call still running (in a task the middleware started and did not wait for) is
    cancelled and waited for before the message is settled, and later calls are refused.
    """

    __slots__ = ("culprit", "ended", "handler", "passed", "steps")

    def __init__(self, handler: str) -> None:
        self.handler = handler
        self.ended = False
        self.steps: list[_Step] = []
        self.passed: list[BaseException] = []
        """What came out of a ``call_next()``: the handler's (or an inner middleware's)."""
        self.culprit: tuple[Exception, str] | None = None
        """The last exception a middleware raised of its own, and that middleware."""

    async def run(self, outer: Callable[[], Awaitable[Any]]) -> Any:
        try:
            result = await outer()
        except BaseException as exc:
            self.ended = True
            await self._stop_left()
            culprit = self.culprit
            if culprit is not None and culprit[0] is exc and not isinstance(exc, DeadLetter):
                raise MiddlewareFailed(culprit[1], culprit[0]) from exc
            raise
        self.ended = True
        left = await self._stop_left()
        if left:
            raise RuntimeError(
                f"middleware {left[0].owner} returned while its call_next() was still "
                "running; await call_next() before returning"
            )
        return result

    async def _stop_left(self) -> list[_Step]:
        """Cancel the calls still running and wait for them; the steps they were in."""
        left = [s for s in self.steps if s.done is not None]
        if not left:
            return left
        current = asyncio.current_task()
        for task in {s.task for s in left}:
            if task is not None and task is not current:
                task.cancel()
        for s in left:
            if s.task is not current and s.done is not None:
                await s.done.wait()
        return left


class _Step:
    """The ``call_next`` one middleware is given: one call at a time, within the chain."""

    __slots__ = ("chain", "done", "inner", "owner", "task")

    def __init__(self, chain: _Chain, inner: Callable[[], Awaitable[Any]], owner: str) -> None:
        self.chain = chain
        self.inner = inner
        self.owner = owner
        self.task: asyncio.Task[Any] | None = None
        self.done: asyncio.Event | None = None
        """Set while a call runs; set (the event) when it ends."""

    async def __call__(self) -> Any:
        try:
            return await self._call()
        except BaseException as exc:
            # The handler's, an inner middleware's, or a refusal naming this middleware.
            self.chain.passed.append(exc)
            raise

    async def _call(self) -> Any:
        if self.chain.ended:
            raise RuntimeError(
                f"middleware {self.owner} called call_next() after the handler call of "
                f"{self.chain.handler} had ended (its message was settled)"
            )
        if self.done is not None:
            raise RuntimeError(
                f"middleware {self.owner} called call_next() while its previous call_next() "
                "was still running; call it again only after the previous call returned or "
                "raised"
            )
        done = self.done = asyncio.Event()
        self.task = asyncio.current_task()
        try:
            return await self.inner()
        finally:
            self.done = None
            self.task = None
            done.set()
