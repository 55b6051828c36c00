"""A small YAML emitter for AsyncAPI documents (plain data: dicts, lists, scalars)."""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["to_yaml"]

_PLAIN = re.compile(r"[A-Za-z_/$#][A-Za-z0-9_ .\-/$#{}]*")
_RESERVED = {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}
# What JSON leaves raw but YAML reads as a line break or refuses (non-printable).
_ESCAPE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufeff\ufffe\uffff]")


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    text = str(value)
    if (
        _PLAIN.fullmatch(text)
        and text.lower() not in _RESERVED
        and not text.endswith(" ")
        and " #" not in text
        and not text.startswith("#")
        and "{" not in text
    ):
        return text
    # A JSON string is a YAML double-quoted scalar, once YAML's special characters are escaped.
    quoted = json.dumps(text, ensure_ascii=False)
    return _ESCAPE.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted)


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            name = _scalar(str(key))
            if isinstance(item, dict | list) and item:
                out.append(f"{pad}{name}:")
                out.extend(_lines(item, indent + (2 if isinstance(item, dict) else 0)))
            else:
                out.append(f"{pad}{name}: {_inline(item)}")
    else:
        for item in value:
            if isinstance(item, dict | list) and item:
                nested = _lines(item, indent + 2)
                out.append(f"{pad}- {nested[0].lstrip()}")
                out.extend(nested[1:])
            else:
                out.append(f"{pad}- {_inline(item)}")
    return out


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml(document: Any) -> str:
    """``document`` as YAML 1.2 text."""
    if not isinstance(document, dict | list) or not document:
        return _inline(document) + "\n"
    return "\n".join(_lines(document, 0)) + "\n"
