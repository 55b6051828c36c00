"""Argument types: how Python values become AMP values and back."""

from __future__ import annotations

import datetime as _dt
import decimal as _decimal
import keyword
import operator
import os
import pathlib
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from ._box import MAX_VALUE_LENGTH, Box, encode_box, parse_boxes
from ._errors import ArgumentError, TooLong

__all__ = [
    "AmpList",
    "Argument",
    "BigBytes",
    "Boolean",
    "DateTime",
    "Decimal",
    "Descriptor",
    "Float",
    "Integer",
    "ListOf",
    "Path",
    "String",
    "Unicode",
    "compile_arguments",
    "decode_arguments",
    "encode_arguments",
    "python_name",
]

T = TypeVar("T")


class Argument(Generic[T]):
    """Base class of argument types.

    Subclasses implement :meth:`to_bytes` and :meth:`from_bytes`. Types spread
    over several keys override :meth:`to_box` and :meth:`from_box` instead and
    set ``single_key = False``.
    """

    single_key = True

    def __init__(self, optional: bool = False) -> None:
        self.optional = optional

    def to_bytes(self, value: T) -> bytes:
        """Encode one Python value as one AMP value."""
        raise NotImplementedError

    def from_bytes(self, data: bytes) -> T:
        """Decode one AMP value."""
        raise NotImplementedError

    def to_box(self, key: bytes, value: T, box: Box) -> None:
        """Write ``value`` into ``box`` under ``key`` (and related keys)."""
        box[key] = self.to_bytes(value)

    def from_box(self, key: bytes, box: Mapping[bytes, bytes]) -> T | None:
        """Read the value stored under ``key``; ``None`` if it is absent."""
        raw = box.get(key)
        return None if raw is None else self.from_bytes(raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(optional={self.optional})"


class Integer(Argument[int]):
    """An integer in decimal: ``123`` is ``b"123"``; at most as many digits as Python
    converts (``sys.get_int_max_str_digits()``, 4,300 by default), as in Twisted.

    Sends an ``int`` or any type with ``__index__``; a float or Decimal is refused
    rather than truncated (Twisted's ``b"%d"`` writes 1.7 as ``1``).
    """

    def to_bytes(self, value: int) -> bytes:
        try:
            number = operator.index(value)
        except TypeError:
            raise TypeError(f"Integer needs an integer, not {type(value).__name__}") from None
        try:
            return b"%d" % (number,)
        except ValueError:
            raise ValueError(
                f"more than {sys.get_int_max_str_digits()} digits (Python's int/str "
                "conversion limit, sys.set_int_max_str_digits)"
            ) from None

    def from_bytes(self, data: bytes) -> int:
        return int(data)


class Descriptor(Integer):
    """A file descriptor, passed over a UNIX socket (Twisted's ``Descriptor``).

    The descriptor itself travels beside the bytes (``SCM_RIGHTS``); the box holds
    its ordinal among the descriptors sent on the connection, from 0. The
    :class:`Connection` swaps descriptors and ordinals; the sender keeps its
    descriptor, the receiver owns the copy it gets. Only at the top level of a
    command's arguments or response.
    """


class String(Argument[bytes]):
    """Raw bytes, unchanged."""

    def to_bytes(self, value: bytes) -> bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"String needs bytes, not {type(value).__name__}")
        return bytes(value)

    def from_bytes(self, data: bytes) -> bytes:
        return data


class Unicode(Argument[str]):
    """Text, as UTF-8."""

    def to_bytes(self, value: str) -> bytes:
        return value.encode("utf-8")

    def from_bytes(self, data: bytes) -> str:
        return data.decode("utf-8")


class Path(Argument[pathlib.Path]):
    """A filesystem path, on the wire as UTF-8 text (Twisted's ``Path``, whose values
    are ``FilePath`` objects). Sends ``str``, ``bytes`` or any ``os.PathLike``;
    receives a :class:`pathlib.Path`."""

    def to_bytes(self, value: str | os.PathLike[str] | os.PathLike[bytes] | bytes) -> bytes:
        return os.fsdecode(value).encode("utf-8")

    def from_bytes(self, data: bytes) -> pathlib.Path:
        return pathlib.Path(data.decode("utf-8"))


class Float(Argument[float]):
    """A float as Python prints it: ``b"1.5"``, ``b"inf"``, ``b"-inf"``, ``b"nan"``."""

    def to_bytes(self, value: float) -> bytes:
        if not isinstance(value, float):
            raise TypeError(f"Float needs a float, not {type(value).__name__}")
        return repr(value).encode("ascii")

    def from_bytes(self, data: bytes) -> float:
        return float(data)


class Boolean(Argument[bool]):
    """``b"True"`` or ``b"False"``; anything else is refused when decoding."""

    def to_bytes(self, value: bool) -> bytes:
        return b"True" if value else b"False"

    def from_bytes(self, data: bytes) -> bool:
        if data == b"True":
            return True
        if data == b"False":
            return False
        raise ValueError(f"bad boolean value {data[:20]!r}")


class Decimal(Argument[_decimal.Decimal]):
    """A :class:`decimal.Decimal` as ``str()`` writes it: ``b"1.50"``, ``b"-Infinity"``."""

    def to_bytes(self, value: _decimal.Decimal) -> bytes:
        if not isinstance(value, _decimal.Decimal):
            raise TypeError(f"Decimal needs a decimal.Decimal, not {type(value).__name__}")
        return str(value).encode("ascii")

    def from_bytes(self, data: bytes) -> _decimal.Decimal:
        return _decimal.Decimal(data.decode("ascii"))


class DateTime(Argument[_dt.datetime]):
    """An aware datetime, always 32 characters: ``2012-01-23T12:34:56.054321+01:30``.

    A zero offset is written ``-00:00`` (as Twisted does); seconds of an offset
    are dropped. Naive datetimes are refused.
    """

    def to_bytes(self, value: _dt.datetime) -> bytes:
        offset = value.utcoffset()
        if offset is None:
            raise ValueError("DateTime cannot encode a naive datetime")
        minutes = (offset.days * 86400 + offset.seconds) // 60
        sign = "+" if minutes > 0 else "-"
        hours, mins = divmod(abs(minutes), 60)
        return (
            f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:"
            f"{value.minute:02d}:{value.second:02d}.{value.microsecond:06d}"
            f"{sign}{hours:02d}:{mins:02d}"
        ).encode("ascii")

    def from_bytes(self, data: bytes) -> _dt.datetime:
        if len(data) != 32:
            raise ValueError(f"DateTime needs 32 bytes, got {len(data)}")
        s = data.decode("ascii")
        if s[26] not in "+-":
            raise ValueError(f"bad timezone sign {s[26]!r}")
        minutes = int(s[27:29]) * 60 + int(s[30:32])
        if s[26] == "-":
            minutes = -minutes
        tz = _dt.timezone(_dt.timedelta(minutes=minutes))
        return _dt.datetime(
            int(s[0:4]),
            int(s[5:7]),
            int(s[8:10]),
            int(s[11:13]),
            int(s[14:16]),
            int(s[17:19]),
            int(s[20:26]),
            tzinfo=tz,
        )


class ListOf(Argument[list[T]]):
    """A list of one single-key type; each element is written with a 2-byte length."""

    def __init__(self, element: Argument[T], optional: bool = False) -> None:
        super().__init__(optional)
        if not element.single_key:
            raise TypeError("ListOf needs a single-key element type")
        self.element = element

    def to_bytes(self, value: list[T]) -> bytes:
        parts: list[bytes] = []
        to_bytes = self.element.to_bytes
        for item in value:
            data = to_bytes(item)
            if len(data) > MAX_VALUE_LENGTH:
                raise TooLong(f"list element of {len(data)} bytes")
            parts.append(len(data).to_bytes(2, "big"))
            parts.append(data)
        return b"".join(parts)

    def from_bytes(self, data: bytes) -> list[T]:
        from_bytes = self.element.from_bytes
        out: list[T] = []
        pos, n = 0, len(data)
        while pos < n:
            if n - pos < 2:
                raise ValueError("truncated list element length")
            end = pos + 2 + ((data[pos] << 8) | data[pos + 1])
            if end > n:
                raise ValueError("truncated list element")
            out.append(from_bytes(data[pos + 2 : end]))
            pos = end
        return out


class AmpList(Argument[list[dict[str, Any]]]):
    """A list of dicts, each written as a nested box (keys sorted, empty-key end)."""

    def __init__(
        self, arguments: Iterable[tuple[bytes | str, Argument[Any]]], optional: bool = False
    ) -> None:
        super().__init__(optional)
        self.specs = compile_arguments(arguments)

    def to_bytes(self, value: list[dict[str, Any]]) -> bytes:
        return b"".join([encode_box(encode_arguments(self.specs, item)) for item in value])

    def from_bytes(self, data: bytes) -> list[dict[str, Any]]:
        return [decode_arguments(self.specs, box) for box in parse_boxes(data)]


class BigBytes(Argument[bytes]):
    """Bytes of any size, spread over keys ``name``, ``name.2``, ``name.3``, ...

    Each chunk holds at most 65,535 bytes. A Twisted peer can read and write
    it with an ``Argument`` subclass that uses the same recipe (see docs/amp.md).
    """

    single_key = False
    chunk_size = MAX_VALUE_LENGTH

    def to_bytes(self, value: bytes) -> bytes:
        if len(value) > MAX_VALUE_LENGTH:
            raise TooLong("BigBytes over 65,535 bytes cannot be a single value")
        return bytes(value)

    def from_bytes(self, data: bytes) -> bytes:
        return data

    def to_box(self, key: bytes, value: bytes, box: Box) -> None:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"BigBytes needs bytes, not {type(value).__name__}")
        size = self.chunk_size
        view = memoryview(value)
        box[key] = bytes(view[:size])
        counter = 2
        for start in range(size, len(view), size):
            box[b"%s.%d" % (key, counter)] = bytes(view[start : start + size])
            counter += 1

    def from_box(self, key: bytes, box: Mapping[bytes, bytes]) -> bytes | None:
        first = box.get(key)
        if first is None:
            return None
        chunks = [first]
        counter = 2
        while True:
            chunk = box.get(b"%s.%d" % (key, counter))
            if chunk is None:
                break
            chunks.append(chunk)
            counter += 1
        return b"".join(chunks)


# A compiled argument list: (wire key, python name, argument type).
Spec = tuple[bytes, str, Argument[Any]]


def python_name(key: bytes) -> str:
    """The keyword name for a wire key: dashes become underscores, keywords get a capital."""
    name = key.replace(b"-", b"_").decode("utf-8")
    return name.title() if keyword.iskeyword(name) else name


def compile_arguments(arguments: Iterable[tuple[bytes | str, Argument[Any]]]) -> tuple[Spec, ...]:
    """Normalise a declaration list into ``(key, python_name, argument)`` triples."""
    specs: list[Spec] = []
    for key, argument in arguments:
        wire = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        if not isinstance(argument, Argument):
            raise TypeError(f"{wire!r}: {argument!r} is not an Argument instance")
        specs.append((wire, python_name(wire), argument))
    return tuple(specs)


def encode_arguments(specs: Sequence[Spec], values: Mapping[str, Any]) -> Box:
    """Encode keyword values into a box; absent or ``None`` optionals are left out."""
    box: Box = {}
    used = 0
    for key, name, argument in specs:
        if name in values:
            used += 1
            value = values[name]
        else:
            value = None
        if value is None:
            if argument.optional:
                continue
            raise ArgumentError(f"missing argument {name!r}")
        try:
            if argument.single_key:
                box[key] = argument.to_bytes(value)
            else:
                argument.to_box(key, value, box)
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            if isinstance(exc, TooLong | ArgumentError):
                raise
            raise ArgumentError(f"cannot encode {name!r}={brief(value)}: {exc}") from exc
    if used != len(values):
        known = {name for _, name, _ in specs}
        extra = sorted(set(values) - known)
        raise ArgumentError(f"unexpected argument(s): {', '.join(extra)}")
    return box


def brief(value: Any, width: int = 80) -> str:
    """The start of ``repr(value)`` for an error message (repr itself may fail)."""
    try:
        return f"{value!r:.{width}}"
    except Exception:
        return f"<{type(value).__name__}>"


def decode_arguments(specs: Sequence[Spec], box: Mapping[bytes, bytes]) -> dict[str, Any]:
    """Decode a box into keyword values; absent optionals become ``None``."""
    out: dict[str, Any] = {}
    for key, name, argument in specs:
        try:
            if argument.single_key:
                raw = box.get(key)
                value = None if raw is None else argument.from_bytes(raw)
            else:
                value = argument.from_box(key, box)
        except Exception as exc:
            raise ArgumentError(f"cannot decode {name!r}: {exc}") from exc
        if value is None and not argument.optional:
            raise ArgumentError(f"missing argument {name!r}")
        out[name] = value
    return out


# A decoding recipe for boxes of single-key arguments:
# (wire key, python name, from_bytes, optional) for each argument.
DecodePlan = tuple[tuple[bytes, str, Callable[[bytes], Any], bool], ...]


def make_decode_plan(specs: Sequence[Spec]) -> DecodePlan | None:
    """The recipe of :func:`decode_planned`, or None if an argument spans several keys."""
    if any(not argument.single_key for _, _, argument in specs):
        return None
    return tuple(
        (key, name, argument.from_bytes, argument.optional) for key, name, argument in specs
    )


def decode_planned(plan: DecodePlan, box: Mapping[bytes, bytes]) -> dict[str, Any]:
    """:func:`decode_arguments` for single-key arguments, without per-argument lookups."""
    out: dict[str, Any] = {}
    get = box.get
    for key, name, from_bytes, optional in plan:
        raw = get(key)
        if raw is None:
            if not optional:
                raise ArgumentError(f"missing argument {name!r}")
            out[name] = None
            continue
        try:
            out[name] = from_bytes(raw)
        except Exception as exc:
            raise ArgumentError(f"cannot decode {name!r}: {exc}") from exc
    return out
