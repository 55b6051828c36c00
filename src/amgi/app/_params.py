"""What a handler parameter can ask for: markers used with ``Annotated`` and injectable types."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Literal, TypeVar

__all__ = [
    "Binding",
    "Depends",
    "Failures",
    "Header",
    "MessageInfo",
    "Meta",
    "Outgoing",
    "State",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Header:
    """``Annotated[str, Header("trace-id")]``: the value of a message header.

    The value is decoded as UTF-8 and converted to the annotated type (``bytes`` keeps it
    raw). A missing header takes the parameter's default, or fails the message.
    """

    name: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class Binding:
    """``Annotated[bytes | None, Binding("kafka", "key")]``: a value of the message's bindings."""

    protocol: str
    key: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class Meta:
    """``Annotated[int, Meta("attempt")]``: the message's ``id``, ``address`` or ``attempt``."""

    field: Literal["id", "address", "attempt"]


@dataclass(frozen=True, slots=True)
class State:
    """``Annotated[Pool, State("pool")]``: a value the lifespan yielded (default key: the name)."""

    key: str | None = None


class Depends:
    """A dependency: ``Annotated[Session, Depends(session)]`` or ``session=Depends(session)``.

    ``dependency`` is a sync or async function, a class (called with its ``__init__``
    parameters injected), or a sync or async generator function whose code after
    ``yield`` runs once the handler's result is published (it sees the exception of the
    handler, or of serializing or publishing its result). Its own parameters are injected
    like a handler's. Within one handler call the value is computed once and shared
    (``use_cache=False`` computes it per use).
    """

    __slots__ = ("dependency", "use_cache")

    def __init__(self, dependency: Callable[..., Any], *, use_cache: bool = True) -> None:
        if not callable(dependency):
            raise TypeError(f"Depends() takes a callable, not {type(dependency).__name__}")
        self.dependency = dependency
        self.use_cache = use_cache

    def __repr__(self) -> str:
        return f"Depends({getattr(self.dependency, '__qualname__', self.dependency)!r})"


@dataclass(slots=True)
class MessageInfo:
    """Everything about the message being handled (inject by annotating a parameter)."""

    id: str
    address: str
    attempt: int
    headers: list[tuple[bytes, bytes]]
    payload: bytes | None
    bindings: Mapping[str, Mapping[str, Any]]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), decoded as UTF-8."""
        wanted = name.lower().encode()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("utf-8", "replace")
        return None


@dataclass(slots=True)
class Outgoing(Generic[T]):
    """A message to publish, with headers and bindings: return it, or give it to a Publisher.

    ``address`` overrides the handler's ``publish_to``. Either may hold ``{name}``
    parameters (``"invoices.{region}"``): each is filled from ``params``, else from the
    parameter of that name of the consumed address. A value must be one segment of text
    (``str``, ``int`` or an ``Enum`` of them, without ``.`` or ``/``).
    """

    payload: T
    headers: Mapping[str, str | bytes] | None = None
    bindings: Mapping[str, Mapping[str, Any]] | None = None
    address: str | None = None
    params: Mapping[str, str | int | Enum] | None = None


class Failures:
    """Injected into a batch handler: fail single items of the batch, the rest is acked.

    Indexes are positions in the list the handler was given.
    """

    __slots__ = ("_failed", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._failed: dict[int, tuple[str, bool]] = {}

    def fail(self, index: int, reason: str, *, dead_letter: bool = False) -> None:
        """Nack item ``index`` with ``reason`` (``dead_letter=True``: without retries)."""
        if not 0 <= index < self._size:
            raise IndexError(f"batch item {index} out of range (the batch has {self._size})")
        self._failed[index] = (reason, dead_letter)

    def __contains__(self, index: object) -> bool:
        return index in self._failed

    def __len__(self) -> int:
        return len(self._failed)

    def get(self, index: int) -> tuple[str, bool] | None:
        """The reason and dead-letter flag of a failed item, or None."""
        return self._failed.get(index)
