"""PUBLISH decoding and the MQTT 5 properties AMGI maps (private)."""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amgi.servers.kit import PACKED_HEADER, pack_header, unpack_header
from amgi.servers.mqtt.options import NOT_MQTT_TEXT
from amgi.transport import HeaderList

if TYPE_CHECKING:
    pass

logger = logging.getLogger("amgi.servers.mqtt")


@dataclass(slots=True)
class Publish:
    """An incoming PUBLISH packet, decoded."""

    topic: str
    mid: int
    qos: int
    retain: bool
    payload: bytes
    user_properties: list[tuple[str, str]]
    bindings: dict[str, Any]
    dup: bool = False
    """The broker sends it again (after a reconnect), with its original packet id."""


def _varint(data: bytes | bytearray, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ValueError("malformed variable byte integer")


def _string(data: bytes | bytearray, pos: int) -> tuple[str, int]:
    (size,) = struct.unpack_from("!H", data, pos)
    pos += 2
    return data[pos : pos + size].decode(), pos + size


def decode_publish(command: int, packet: bytes | bytearray, v5: bool) -> Publish:
    """Decode the variable header and payload of a PUBLISH (everything after the fixed header).

    paho's own decoder builds a generic ``Properties`` object per message, which costs more
    than the rest of the receive path together; this one reads what AMGI maps.
    """
    qos = (command & 0x06) >> 1
    topic, pos = _string(packet, 0)
    mid = 0
    if qos:
        (mid,) = struct.unpack_from("!H", packet, pos)
        pos += 2
    user: list[tuple[str, str]] = []
    bindings: dict[str, Any] = {"qos": qos, "retain": bool(command & 0x01), "topic": topic}
    if v5:
        size, pos = _varint(packet, pos)
        end = pos + size
        while pos < end:
            ident, pos = _varint(packet, pos)
            if ident == 0x26:
                name, pos = _string(packet, pos)
                value, pos = _string(packet, pos)
                user.append((name, value))
            elif ident == 0x01:
                bindings["payloadFormatIndicator"] = packet[pos]
                pos += 1
            elif ident == 0x02:
                (bindings["messageExpiryInterval"],) = struct.unpack_from("!I", packet, pos)
                pos += 4
            elif ident == 0x03:
                bindings["contentType"], pos = _string(packet, pos)
            elif ident == 0x08:
                bindings["responseTopic"], pos = _string(packet, pos)
            elif ident == 0x09:
                (length,) = struct.unpack_from("!H", packet, pos)
                bindings["correlationData"] = bytes(packet[pos + 2 : pos + 2 + length])
                pos += 2 + length
            elif ident == 0x0B:
                _, pos = _varint(packet, pos)
            elif ident == 0x23:
                pos += 2
            else:
                raise ValueError(f"unexpected PUBLISH property 0x{ident:02x}")
    retain = bool(command & 0x01)
    dup = bool(command & 0x08)
    return Publish(topic, mid, qos, retain, bytes(packet[pos:]), user, bindings, dup)


def _user_properties(headers: HeaderList) -> list[tuple[str, str]]:
    """Headers as MQTT 5 user properties, which are UTF-8 strings without NUL, control
    characters or noncharacters (:data:`~amgi.servers.mqtt.options.NOT_MQTT_TEXT`).

    A header that is not such a string on both sides, or is named ``amgi-b64`` itself,
    travels as a ``amgi-b64`` property whose value is ``base64(name).base64(value)``;
    :func:`_headers` turns it back.
    """
    out: list[tuple[str, str]] = []
    for name, value in headers:
        try:
            text_name, text_value = name.decode(), value.decode()
        except UnicodeDecodeError:
            pass
        else:
            if not (
                NOT_MQTT_TEXT.search(text_name)
                or NOT_MQTT_TEXT.search(text_value)
                or text_name == PACKED_HEADER
            ):
                out.append((text_name, text_value))
                continue
        out.append((PACKED_HEADER, pack_header(name, value)))
    return out


def _headers(pairs: Sequence[tuple[str, str]]) -> HeaderList:
    """MQTT 5 user properties as headers (see :func:`_user_properties`)."""
    out: HeaderList = []
    for name, value in pairs:
        if name == PACKED_HEADER:
            unpacked = unpack_header(value)
            if unpacked is not None:
                out.append(unpacked)
                continue
        out.append((name.encode(), value.encode()))
    return out


_PROPERTY_BINDINGS: tuple[tuple[str, str], ...] = (
    ("MessageExpiryInterval", "messageExpiryInterval"),
    ("ContentType", "contentType"),
    ("CorrelationData", "correlationData"),
    ("ResponseTopic", "responseTopic"),
    ("PayloadFormatIndicator", "payloadFormatIndicator"),
)


_BINDING_TYPES: dict[str, type | tuple[type, ...]] = {
    "messageExpiryInterval": int,
    "contentType": str,
    "correlationData": (bytes, bytearray),
    "responseTopic": str,
    "payloadFormatIndicator": int,
}


_BINDING_TYPE_NAMES = {
    "messageExpiryInterval": "an int (seconds)",
    "contentType": "a str",
    "correlationData": "bytes or a str",
    "responseTopic": "a str",
    "payloadFormatIndicator": "0 or 1",
}
