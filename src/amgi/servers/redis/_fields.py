"""How a message is stored in the fields of a Redis stream entry (byte-exact).

An entry is an ordered list of field/value pairs (names may repeat):

* ``payload``: the payload; absent when the payload is ``None``;
* every other field is one header, in order, name and value as they are;
* a header named ``payload``, or whose name starts with ``amgi.``, is stored under
  ``amgi.header.`` + its name;
* ``amgi.none`` (empty value) stands alone for a message with neither payload nor
  headers (an entry needs one field); it is no header.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from amgi.transport import HeaderList

__all__ = ["PAYLOAD", "decode", "encode"]

PAYLOAD = b"payload"
_ESCAPE = b"amgi.header."
_RESERVED = b"amgi."
_NONE = b"amgi.none"


def encode(headers: Iterable[tuple[bytes, bytes]], payload: bytes | None) -> list[bytes]:
    """The flat field/value list of an entry holding ``headers`` and ``payload``."""
    fields: list[bytes] = []
    for name, value in headers:
        if name == PAYLOAD or name.startswith(_RESERVED):
            name = _ESCAPE + name
        fields += (name, value)
    if payload is not None:
        fields += (PAYLOAD, payload)
    elif not fields:
        fields += (_NONE, b"")
    return fields


def decode(fields: Sequence[bytes]) -> tuple[HeaderList, bytes | None]:
    """``(headers, payload)`` of an entry's flat field/value list."""
    n = len(fields)
    if n >= 2 and fields[n - 2] == PAYLOAD:
        # The layout this server writes: plain headers, then the payload last.
        headers: HeaderList = []
        for i in range(0, n - 2, 2):
            name = fields[i]
            if name == PAYLOAD or name.startswith(_RESERVED):
                break
            headers.append((name, fields[i + 1]))
        else:
            return headers, fields[n - 1]
    headers = []
    payload: bytes | None = None
    it = iter(fields)
    for name, value in zip(it, it, strict=True):
        if name == PAYLOAD:
            payload = value
        elif name.startswith(_ESCAPE):
            headers.append((name[len(_ESCAPE) :], value))
        elif name != _NONE:
            headers.append((name, value))
    return headers, payload
