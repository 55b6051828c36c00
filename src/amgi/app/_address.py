"""Address patterns (``orders.{region}``) and the rule that picks a handler for an address.

A ``{name}`` parameter matches one or more characters other than ``.`` and ``/`` (the
separators of Kafka, AMQP and MQTT names). Routing rule, checked at startup:

1. an address without parameters that equals the message's address wins;
2. otherwise the matching pattern with the most literal characters wins;
3. two patterns with as many literal characters that can match one address are an error
   (``a.{x}`` and ``a.{y}``; ``eu.{region}`` and ``{topic}.eu``, which both match ``eu.eu``).
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["AddressPattern", "Router", "fill", "fill_template"]

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


def _tokens(pattern: AddressPattern) -> list[str | None]:
    """The pattern as characters, None standing for a parameter."""
    tokens: list[str | None] = []
    pos = 0
    for m in _PARAM.finditer(pattern.text):
        tokens.extend(pattern.text[pos : m.start()])
        tokens.append(None)
        pos = m.end()
    tokens.extend(pattern.text[pos:])
    return tokens


def common_address(a: AddressPattern, b: AddressPattern) -> str | None:
    """An address both patterns match, or None if there is none.

    A breadth-first walk over pairs of positions in the two patterns, one character at a
    time; a position inside a parameter that already took a character may also leave it.
    """
    ta, tb = _tokens(a), _tokens(b)
    # A state: (index in ta, inside a parameter of a, index in tb, inside one of b).
    State = tuple[int, bool, int, bool]

    def leave(state: State) -> list[State]:
        i, in_a, j, in_b = state
        found = [state]
        if in_a:
            found.append((i + 1, False, j, in_b))
        if in_b:
            found += [(k, f, j + 1, False) for k, f, _, _ in list(found)]
        return found

    def step(tokens: list[str | None], i: int, inside: bool, c: str) -> tuple[int, bool] | None:
        if i >= len(tokens):
            return None
        token = tokens[i]
        if token is None:
            return (i, True) if c not in "./" else None
        return (i + 1, False) if token == c and not inside else None

    start: State = (0, False, 0, False)
    came_from: dict[State, tuple[State, str] | None] = {start: None}
    queue = [start]
    for state in queue:
        for s in leave(state):
            i, in_a, j, in_b = s
            if i == len(ta) and j == len(tb) and not in_a and not in_b:
                text = []
                at: State = state
                while (back := came_from[at]) is not None:
                    at, c = back
                    text.append(c)
                return "".join(reversed(text))
            # The literal either side wants next, or any character two parameters take.
            chars = {"x"}
            for tokens, k in ((ta, i), (tb, j)):
                token = tokens[k] if k < len(tokens) else None
                if token is not None:
                    chars.add(token)
            for c in chars:
                na, nb = step(ta, i, in_a, c), step(tb, j, in_b, c)
                if na is None or nb is None:
                    continue
                target = (na[0], na[1], nb[0], nb[1])
                if target not in came_from:
                    came_from[target] = (state, c)
                    queue.append(target)
    return None


def fill(pattern: AddressPattern, values: Mapping[str, str]) -> str:
    """``pattern`` with each ``{name}`` replaced by ``values[name]``."""
    return _PARAM.sub(lambda m: values[m.group(1)], pattern.text)


@functools.lru_cache(maxsize=256)
def _parsed(template: str) -> AddressPattern:
    return AddressPattern.parse(template)


def fill_template(
    template: str, consumed: Mapping[str, str], given: Mapping[str, object] | None
) -> str:
    """The address ``template`` names once its ``{name}`` parameters are filled.

    A value comes from ``given`` (an Outgoing's or a publish call's ``params``), else from
    ``consumed`` (the parameters of the address being handled). Raises ValueError on a
    malformed template, a missing value, a given name the template lacks, or a value
    that is not one segment (what a subscriber's ``{name}`` would match).
    """
    if template and not given and "{" not in template and "}" not in template:
        return template
    pattern = _parsed(template)
    if given:
        for name in given:
            if name not in pattern.params:
                known = ", ".join(pattern.params) or "none"
                raise ValueError(
                    f"address {template!r} has no parameter {{{name}}} (its parameters: {known})"
                )
    values: dict[str, str] = {}
    for name in pattern.params:
        if given and name in given:
            values[name] = _segment(template, name, given[name])
        elif name in consumed:
            values[name] = consumed[name]
        else:
            raise ValueError(
                f"address {template!r}: no value for {{{name}}}; give it in "
                f"params={{{name!r}: ...}}"
            )
    return fill(pattern, values)


def _segment(template: str, name: str, value: object) -> str:
    raw = value.value if isinstance(value, enum.Enum) else value
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise ValueError(
            f"address {template!r}: {{{name}}} must be a str, an int or an Enum, "
            f"not {type(value).__name__}"
        )
    text = str(raw)
    if not text or "." in text or "/" in text:
        raise ValueError(
            f"address {template!r}: {{{name}}}={text!r} is not one segment "
            "(one or more characters, neither '.' nor '/')"
        )
    return text


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
                if other.literal_length != pattern.literal_length:
                    continue  # the one with more literal characters wins
                both = common_address(other, pattern)
                if both is not None:
                    raise ValueError(
                        f"address pattern {pattern.text!r} of {owner} overlaps {other.text!r}: "
                        f"both match {both!r} and neither has more literal characters"
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
