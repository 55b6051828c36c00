"""A small YAML emitter for AsyncAPI documents (plain data: dicts, lists, scalars)."""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["to_yaml"]

_PLAIN = re.compile(r"^[A-Za-z_/$#][A-Za-z0-9_ .\-/$#{}]*$")
_RESERVED = {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}


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
        _PLAIN.match(text)
        and text.lower() not in _RESERVED
        and not text.endswith(" ")
        and " #" not in text
        and not text.startswith("#")
        and "{" not in text
    ):
        return text
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


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
