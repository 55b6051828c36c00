"""Address patterns (``orders.{region}``) and the rule that picks a handler for an address.

A ``{name}`` parameter matches one or more characters other than ``.`` and ``/`` (the
separators of Kafka, AMQP and MQTT names). Routing rule, checked at startup:

1. an address without parameters that equals the message's address wins;
2. otherwise the matching pattern with the most literal characters wins;
3. two patterns with the same literal skeleton (``a.{x}`` and ``a.{y}``) are an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["AddressPattern", "Router", "fill"]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CACHE_LIMIT = 4096

H = TypeVar("H")


@dataclass(frozen=True, slots=True)
class AddressPattern:
    """A compiled address pattern."""

    text: str
    params: tuple[str, ...]
    regex: re.Pattern[str] | None
    skeleton: str
    literal_length: int

    @classmethod
    def parse(cls, text: str) -> AddressPattern:
        """Compile ``text``; raise ValueError on an empty address or a malformed parameter."""
        if not text:
            raise ValueError("an address must not be empty")
        params: list[str] = []
        parts: list[str] = []
        skeleton: list[str] = []
        pos = 0
        for m in _PARAM.finditer(text):
            literal = text[pos : m.start()]
            if "{" in literal or "}" in literal:
                raise ValueError(f"malformed parameter in address {text!r}")
            name = m.group(1)
            if name in params:
                raise ValueError(f"parameter {{{name}}} appears twice in address {text!r}")
            params.append(name)
            parts.append(re.escape(literal))
            parts.append(f"(?P<{name}>[^./]+)")
            skeleton.append(literal)
            skeleton.append("{}")
            pos = m.end()
        tail = text[pos:]
        if "{" in tail or "}" in tail:
            raise ValueError(f"malformed parameter in address {text!r}")
        parts.append(re.escape(tail))
        skeleton.append(tail)
        regex = re.compile("".join(parts)) if params else None
        literal_length = len(_PARAM.sub("", text))
        return cls(text, tuple(params), regex, "".join(skeleton), literal_length)

    def match(self, address: str) -> dict[str, str] | None:
        """The parameter values if ``address`` fits this pattern, else None."""
        if self.regex is None:
            return {} if address == self.text else None
        m = self.regex.fullmatch(address)
        return m.groupdict() if m else None


def fill(pattern: AddressPattern, values: Mapping[str, str]) -> str:
    """``pattern`` with each ``{name}`` replaced by ``values[name]``."""
    return _PARAM.sub(lambda m: values[m.group(1)], pattern.text)


class Router(Generic[H]):
    """Finds the handler of an address; results are cached per address."""

    def __init__(self) -> None:
        self._exact: dict[str, H] = {}
        self._patterns: list[tuple[AddressPattern, H]] = []
        self._cache: dict[str, tuple[H, dict[str, str]] | None] = {}

    def add(self, pattern: AddressPattern, handler: H, owner: str) -> None:
        """Register ``handler``; ``owner`` names it in the error of an ambiguous pattern."""
        if pattern.regex is None:
            if pattern.text in self._exact:
                raise ValueError(f"address {pattern.text!r} already has a handler")
            self._exact[pattern.text] = handler
        else:
            for other, _ in self._patterns:
                if other.skeleton == pattern.skeleton:
                    raise ValueError(
                        f"address pattern {pattern.text!r} of {owner} overlaps {other.text!r}: "
                        "both match the same addresses"
                    )
            self._patterns.append((pattern, handler))
            self._patterns.sort(key=lambda item: -item[0].literal_length)
        self._cache.clear()

    def route(self, address: str) -> tuple[H, dict[str, str]] | None:
        """The handler for ``address`` and its parameter values, or None."""
        try:
            return self._cache[address]
        except KeyError:
            pass
        found: tuple[H, dict[str, str]] | None = None
        exact = self._exact.get(address)
        if exact is not None:
            found = (exact, {})
        else:
            for pattern, handler in self._patterns:
                values = pattern.match(address)
                if values is not None:
                    found = (handler, values)
                    break
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[address] = found
        return found
