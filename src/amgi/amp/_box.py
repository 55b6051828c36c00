"""Box framing: encode a mapping to bytes, and parse a byte stream into boxes.

A box is a sequence of key/value pairs, each written as a 2-byte big-endian
length followed by that many bytes; an empty key (two zero bytes) ends it.
Keys are 1..255 bytes, values 0..65,535 bytes. The protocol bounds neither the
number of keys nor the size of a box; :class:`BoxParser` does (``max_box_size``,
``max_keys_per_box``), so a peer cannot make a reader hold unbounded memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._errors import ProtocolError, TooLong

__all__ = [
    "DEFAULT_MAX_BOX_SIZE",
    "DEFAULT_MAX_KEYS_PER_BOX",
    "MAX_KEY_LENGTH",
    "MAX_VALUE_LENGTH",
    "Box",
    "BoxParser",
    "encode_box",
    "parse_boxes",
]

MAX_KEY_LENGTH = 0xFF
MAX_VALUE_LENGTH = 0xFFFF
# Default limits of a received box: its wire size (keys, values and their length
# prefixes) and its number of key/value pairs.
DEFAULT_MAX_BOX_SIZE = 16 * 1024 * 1024
DEFAULT_MAX_KEYS_PER_BOX = 1024

Box = dict[bytes, bytes]

_END = b"\x00\x00"
# Length prefixes for short values, so encoding a small box allocates nothing new.
_SHORT = [n.to_bytes(2, "big") for n in range(4096)]
_SHORT_LIMIT = len(_SHORT)
# Length-prefixed keys, computed once per distinct key.
_KEYS: dict[bytes, bytes] = {}
_KEYS_LIMIT = 10_000


def _prefixed_key(key: bytes) -> bytes:
    if type(key) is not bytes:
        raise TypeError(f"box keys must be bytes, not {type(key).__name__}")
    n = len(key)
    if n == 0:
        raise TooLong("box keys must not be empty")
    if n > MAX_KEY_LENGTH:
        raise TooLong(f"key of {n} bytes is longer than {MAX_KEY_LENGTH}: {key[:40]!r}...")
    prefixed = _SHORT[n] + key
    if len(_KEYS) < _KEYS_LIMIT:
        _KEYS[key] = prefixed
    return prefixed


# A precomputed encoding recipe for boxes whose keys are known in advance:
# (length-prefixed key, python name or None, encoder or None, special index).
Plan = tuple[tuple[bytes, str | None, Callable[[Any], bytes] | None, int], ...]


def make_plan(
    fields: Sequence[tuple[bytes, str, Callable[[Any], bytes]]], specials: Sequence[bytes]
) -> Plan | None:
    """Precompute the sorted key order of a box with fixed keys (None if keys clash)."""
    entries: list[tuple[bytes, str | None, Callable[[Any], bytes] | None, int]] = [
        (key, name, encoder, -1) for key, name, encoder in fields
    ]
    entries += [(key, None, None, index) for index, key in enumerate(specials)]
    if len({entry[0] for entry in entries}) != len(entries):
        return None
    entries.sort(key=lambda entry: entry[0])
    return tuple((_prefixed_key(key), name, enc, index) for key, name, enc, index in entries)


def encode_planned(plan: Plan, values: Mapping[str, Any], specials: Sequence[bytes]) -> bytes:
    """Encode ``values`` (exactly the plan's fields, none None) plus special values.

    Raises on anything unusual; callers fall back to the general path.
    """
    short = _SHORT
    parts: list[bytes] = []
    append = parts.append
    for prefixed, name, encoder, index in plan:
        if encoder is None:
            value = specials[index]
        else:
            raw = values[name]  # type: ignore[index]
            if raw is None:
                raise ValueError("None value")
            value = encoder(raw)
        n = len(value)
        if n >= _SHORT_LIMIT:
            raise ValueError("long value")
        append(prefixed)
        append(short[n])
        append(value)
    append(_END)
    return b"".join(parts)


def encode_box(box: Mapping[bytes, bytes]) -> bytes:
    """Serialise one box, keys sorted by their bytes (as Twisted does)."""
    keys = _KEYS
    short = _SHORT
    parts: list[bytes] = []
    append = parts.append
    for key in sorted(box):
        value = box[key]
        prefixed = keys.get(key)
        if prefixed is None:
            prefixed = _prefixed_key(key)
        n = len(value)
        if n < _SHORT_LIMIT:
            size = short[n]
        elif n <= MAX_VALUE_LENGTH:
            size = n.to_bytes(2, "big")
        else:
            raise TooLong(f"value of {n} bytes for key {key!r} is longer than {MAX_VALUE_LENGTH}")
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"box values must be bytes, not {type(value).__name__} for {key!r}")
        append(prefixed)
        append(size)
        append(value)
    append(_END)
    return b"".join(parts)


class BoxParser:
    """Incremental parser: :meth:`feed` bytes, get back the boxes they complete.

    Incomplete input is kept until more arrives. A key longer than 255 bytes, a
    box whose pairs take more than ``max_box_size`` bytes on the wire, or one with
    more than ``max_keys_per_box`` pairs sets :attr:`error` (the boxes completed
    before it are still returned); after that, :meth:`feed` raises
    :class:`ProtocolError`. Pairs of a repeated key count each time.
    """

    __slots__ = (
        "_box",
        "_buffer",
        "_bytes_left",
        "_keys_left",
        "error",
        "max_box_size",
        "max_keys_per_box",
        "stop",
    )

    def __init__(
        self,
        max_box_size: int = DEFAULT_MAX_BOX_SIZE,
        max_keys_per_box: int = DEFAULT_MAX_KEYS_PER_BOX,
    ) -> None:
        if max_box_size < 1 or max_keys_per_box < 1:
            raise ValueError("box limits must be at least 1")
        self.max_box_size = max_box_size
        self.max_keys_per_box = max_keys_per_box
        self._buffer = b""
        self._box: Box = {}
        # Room left in the current box: bytes of pairs, and pairs.
        self._bytes_left = max_box_size
        self._keys_left = max_keys_per_box
        self.error: ProtocolError | None = None
        # When set, called with each completed box; True stops parsing right after
        # it, leaving the rest unparsed (see :meth:`take_unparsed`).
        self.stop: Callable[[Box], bool] | None = None

    @property
    def buffered(self) -> int:
        """Number of bytes held that do not yet form a complete box."""
        return len(self._buffer) + self.max_box_size - self._bytes_left

    def take_unparsed(self) -> bytes:
        """Return and forget the raw bytes not yet parsed (for a protocol switch).

        Only meaningful between boxes: pairs of a box already parsed are not returned.
        """
        data = self._buffer
        self._buffer = b""
        return data

    def feed(self, data: bytes) -> list[Box]:
        """Consume ``data``; return the list of boxes it completes (often empty)."""
        if self.error is not None:
            raise self.error
        buf = self._buffer + data if self._buffer else bytes(data)
        n = len(buf)
        pos = 0
        box = self._box
        # The current box's pairs may not end past ``limit`` in ``buf``; ``room``
        # more pairs fit in it.
        limit = self._bytes_left
        room = self._keys_left
        stop = self.stop
        boxes: list[Box] = []
        try:  # an IndexError means the rest is incomplete (no length check per pair)
            while True:
                if buf[pos]:  # a key length over 255
                    klen = (buf[pos] << 8) | buf[pos + 1]
                    return self._fail(boxes, f"key length {klen} is longer than {MAX_KEY_LENGTH}")
                vpos = pos + 2 + buf[pos + 1]
                if vpos == pos + 2:  # the empty key: end of box
                    boxes.append(box)
                    pos = vpos
                    limit = pos + self.max_box_size
                    room = self.max_keys_per_box
                    box = {}
                    if pos == n or (stop is not None and stop(boxes[-1])):
                        break
                    continue
                end = vpos + 2 + ((buf[vpos] << 8) | buf[vpos + 1])
                if end > limit or not room:
                    return self._over_limit(boxes, end > limit)
                if n < end:
                    break
                box[buf[pos + 2 : vpos]] = buf[vpos + 2 : end]
                room -= 1
                pos = end
        except IndexError:
            pass
        self._box = box
        self._bytes_left = limit - pos
        self._keys_left = room
        self._buffer = buf[pos:] if pos < n else b""
        return boxes

    def _over_limit(self, boxes: list[Box], too_large: bool) -> list[Box]:
        if too_large:
            return self._fail(boxes, f"box larger than {self.max_box_size} bytes (max_box_size)")
        reason = f"box with more than {self.max_keys_per_box} keys (max_keys_per_box)"
        return self._fail(boxes, reason)

    def _fail(self, boxes: list[Box], reason: str) -> list[Box]:
        self.error = ProtocolError(reason)
        self._buffer = b""
        self._box = {}
        self._bytes_left = self.max_box_size
        self._keys_left = self.max_keys_per_box
        return boxes


def parse_boxes(data: bytes) -> list[Box]:
    """Parse a complete byte string into boxes; trailing partial data is an error."""
    parser = BoxParser()
    boxes = parser.feed(data)
    if parser.error is not None:
        raise parser.error
    if parser.buffered:
        raise ProtocolError("truncated box")
    return boxes
