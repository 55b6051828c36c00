"""How AMGI headers travel as NATS headers (byte-exact).

NATS headers are ``Name: value`` lines: a name is a token, a value is text without line
breaks whose outer whitespace does not survive, and the client keeps one value per name.
So a header goes out as it is when its name is a token not used before in the message
(and not starting with ``Amgi-H-``) and its value is UTF-8 text without control
characters or outer whitespace. Any other header, the ``i``-th of the message, goes out
as ``Amgi-H-<i>: <base64url(name)>.<base64url(value)>`` (no padding) at its place, so
order, repeated names and binary values come back exactly. ``Nats-Msg-Id`` is the
``msgId`` binding, not a header. A dead letter or a replay carries its ``Nats-`` headers
encoded too, so JetStream does not act on them again.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping

from amgi.transport import HeaderList

__all__ = ["MSG_ID", "PLAIN_VALUE", "decode", "encode", "over_max_payload"]

MSG_ID = "Nats-Msg-Id"
_ENCODED = "Amgi-H-"
_JETSTREAM = "nats-"
"""The prefix of the headers JetStream acts on."""
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_END = r"[^\s\x00-\x20\x7f]"
PLAIN_VALUE = re.compile(rf"(?:{_END}|{_END}[^\x00-\x1f\x7f]*{_END})?")
"""A header value that travels as it is: no control characters, no outer whitespace
(Unicode whitespace too, such as NBSP or U+2028: nats-py strips a value with
``str.strip()``)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_ENCODED_VALUE = re.compile(r"([A-Za-z0-9_-]*)\.([A-Za-z0-9_-]*)")
"""The value of an encoded header: ``<base64url(name)>.<base64url(value)>``, unpadded."""


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _decoded(value: str) -> tuple[bytes, bytes] | None:
    """The header an ``Amgi-H-`` value encodes; None when it is no such value (another
    client's header of that name: the decoder would skip what is not base64 in it)."""
    found = _ENCODED_VALUE.fullmatch(value)
    if found is None:
        return None
    try:
        return _unb64(found[1]), _unb64(found[2])
    except ValueError:  # a length no base64 text has
        return None


def encode(
    headers: Iterable[tuple[bytes, bytes]], msg_id: str | None = None, *, republish: bool = False
) -> dict[str, str]:
    """The NATS header dict (insertion order is wire order) of AMGI ``headers``.

    ``republish``: the headers of a message published again (a dead letter, a replay).
    Its ``Nats-`` headers told JetStream what to do with its first publish (an expected
    last sequence, a rollup, a TTL); they go encoded, so they do nothing a second time.
    """
    out: dict[str, str] = {}
    for i, (name, value) in enumerate(headers):
        key = name.decode("ascii", "replace")
        text: str | None
        try:
            text = value.decode()
        except UnicodeDecodeError:
            text = None
        if (
            text is not None
            and key not in out
            and _TOKEN.fullmatch(name)
            and not key.startswith(_ENCODED)
            and key.lower() != MSG_ID.lower()
            and not (republish and key.lower().startswith(_JETSTREAM))
            and PLAIN_VALUE.fullmatch(text)
        ):
            out[key] = text
        else:
            out[f"{_ENCODED}{i}"] = f"{_b64(name)}.{_b64(value)}"
    if msg_id is not None:
        out[MSG_ID] = msg_id
    return out


def decode(header: Mapping[str, str] | None) -> tuple[HeaderList, str | None]:
    """``(headers, msg_id)`` of a received NATS header dict."""
    if not header:
        return [], None
    headers: HeaderList = []
    msg_id = None
    for key, value in header.items():
        if key.startswith(_ENCODED):
            decoded = _decoded(value)
            if decoded is not None:
                headers.append(decoded)
                continue
        elif key == MSG_ID:
            msg_id = value
            continue
        headers.append((key.encode(), value.encode()))
    return headers, msg_id


def over_max_payload(max_payload: int, payload: bytes, header: Mapping[str, str] | None) -> str:
    """Why a message is too big for the server ("" when it is not).

    The server holds payload and headers to its max_payload, nats-py the payload alone: a
    message over it with its headers makes the server close the connection, and nats-py
    then closes the client for good. The header block is sized as nats-py writes it.
    """
    size = len(payload)
    if header:
        size += 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in header.items())
    if size <= max_payload:
        return ""
    return f"{size} bytes with its headers, over the server's max_payload of {max_payload}"
