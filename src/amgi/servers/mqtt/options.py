"""The options of the MQTT server, and topic and filter checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal

from amgi.servers.kit import (
    invalid,
)

__all__ = ["NOT_MQTT_TEXT", "MqttOptions", "validate_filter"]


@dataclass(slots=True)
class MqttOptions:
    """Options of the MQTT server; each becomes a ``--kebab-case`` flag."""

    host: str = field(default="127.0.0.1", metadata={"help": "broker host name or address"})
    port: int = field(
        default=1883, metadata={"ge": 1, "le": 65535, "help": "broker port (8883 is usual for TLS)"}
    )
    protocol: Literal["5", "3.1.1"] = field(
        default="5", metadata={"help": "MQTT protocol version: 5 or 3.1.1"}
    )
    client_id: str = field(
        default="",
        metadata={
            "help": "client id of the persistent session (default: derived from the topic "
            "filters; give each server of a shared subscription its own)"
        },
    )
    qos: int = field(default=1, metadata={"ge": 0, "le": 2, "help": "subscription QoS: 0, 1 or 2"})
    session_expiry: int = field(
        default=3600,
        metadata={
            "ge": 0,
            "le": 2**32 - 1,
            "help": "seconds the broker keeps the session while disconnected (MQTT 5)",
        },
    )
    batch_size: int = field(default=100, metadata={"ge": 1, "help": "most messages per batch"})
    batch_linger: float = field(
        default=0.005, metadata={"ge": 0, "help": "seconds to wait for a batch to fill up"}
    )
    receive_maximum: int = field(
        default=1000,
        metadata={
            "ge": 1,
            "le": 65535,
            "help": "unacknowledged messages the broker may send at once (MQTT 5)",
        },
    )
    dead_letter_prefix: str = field(
        default="amgi/dead-letter",
        metadata={"help": "dead letters of topic T are published to PREFIX/T"},
    )
    keep_dead_letters: bool = field(
        default=True,
        metadata={
            "help": "keep the dead letters of each topic filter in a persistent session on "
            "the broker (client id amgi-dl-...), for amgi dead-letters list|replay"
        },
    )
    username: str | None = field(default=None, metadata={"help": "user name to log in with"})
    password: str | None = field(
        default=None, repr=False, metadata={"help": "password to log in with", "secret": True}
    )
    tls: bool = field(default=False, metadata={"help": "connect with TLS"})
    ca_file: str | None = field(
        default=None, metadata={"help": "CA certificates file (default: the system's)"}
    )
    cert_file: str | None = field(
        default=None, metadata={"help": "client certificate file for TLS"}
    )
    key_file: str | None = field(default=None, metadata={"help": "client key file for TLS"})
    tls_insecure: bool = field(
        default=False, metadata={"help": "do not check the broker's certificate host name"}
    )
    keepalive: int = field(
        default=60, metadata={"ge": 0, "le": 65535, "help": "keepalive interval, seconds"}
    )
    connect_timeout: float = field(
        default=10.0,
        metadata={"gt": 0, "help": "seconds to wait for the broker to accept a connection"},
    )
    send_timeout: float = field(
        default=30.0,
        metadata={"gt": 0, "help": "seconds a send waits for the broker's acknowledgement"},
    )
    reconnect_delay_max: float = field(
        default=30.0,
        metadata={"gt": 0, "help": "upper bound of the doubling reconnect delay, seconds"},
    )

    def check_together(self) -> None:
        """A password needs a user name; the dead-letter prefix must be a topic; the
        client id, user name and password must fit in CONNECT."""
        if self.password is not None and self.username is None:
            raise invalid(self, "password", "needs --username")
        problem = _topic_problem(self.dead_letter_prefix)
        if problem:
            raise invalid(self, "dead_letter_prefix", f"is not a topic: {problem}")
        # CONNECT's strings: MQTT text of at most 65535 bytes (the password is binary
        # data, sent as UTF-8; a surrogate, a command-line byte that is not, cannot be).
        for name in ("client_id", "username", "password"):
            value = getattr(self, name)
            if value is None:
                continue
            if name == "password" and _SURROGATE.search(value):
                raise invalid(self, name, "must not contain surrogates (bytes not UTF-8)")
            if name != "password" and NOT_MQTT_TEXT.search(value):
                raise invalid(
                    self, name, "must not contain control characters, surrogates or noncharacters"
                )
            if _utf8_over(value, 65535):
                raise invalid(self, name, "must be at most 65535 bytes (UTF-8)")


def validate_filter(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid MQTT topic filter, or ``None`` when it is."""
    text = topic_filter
    if NOT_MQTT_TEXT.search(text):
        return (
            "a topic filter must not contain control characters, surrogates or Unicode "
            "noncharacters"
        )
    if text.startswith("$share/"):
        parts = text.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            return "a shared subscription is $share/GROUP/FILTER"
        if "+" in parts[1] or "#" in parts[1]:
            return "the share group name must not contain '+' or '#'"
        text = parts[2]
    if not text:
        return "a topic filter must not be empty"
    if len(text.encode()) > 65535:
        return "a topic filter is at most 65535 bytes"
    levels = text.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be the whole last level of a topic filter"
        if "+" in level and level != "+":
            return "'+' must be a whole level of a topic filter"
    return None


_NONCHARACTERS: Final = "\ufdd0-\ufdef" + "".join(
    chr(plane + 0xFFFE) + chr(plane + 0xFFFF) for plane in range(0, 0x110000, 0x10000)
)
NOT_MQTT_TEXT: Final = re.compile(f"[\x00-\x1f\x7f-\x9f\ud800-\udfff{_NONCHARACTERS}]")
"""What an MQTT string must not hold: NUL and surrogates (U+D800-U+DFFF, which UTF-8
cannot encode: Python reads a byte of the command line that is not UTF-8 as one), and
what MQTT 5 (1.5.4) lets a receiver treat as a malformed packet: the control characters
U+0001-U+001F and U+007F-U+009F and the Unicode noncharacters. Mosquitto does, and
disconnects the client."""


_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _utf8_over(text: str, limit: int) -> bool:
    """Whether ``text`` is over ``limit`` bytes in UTF-8; encoded only when its length
    alone cannot tell (a character is 1 to 4 bytes), so a send's short strings cost
    no copy."""
    if len(text) * 4 <= limit:
        return False
    return len(text) > limit or len(text.encode()) > limit


def _topic_problem(topic: str) -> str | None:
    if not topic:
        return "a topic must not be empty"
    if "+" in topic or "#" in topic:
        return "a topic to publish to must not contain '+' or '#'"
    if NOT_MQTT_TEXT.search(topic):
        return "a topic must not contain control characters, surrogates or Unicode noncharacters"
    if _utf8_over(topic, 65535):
        return "a topic must be at most 65535 bytes (UTF-8)"
    return None
