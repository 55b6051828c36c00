"""How a secret is shown: never. One owner for every masking rule.

* :func:`masked` is how the value of a ``secret=True`` option appears in help texts and
  errors: a URL keeps everything but its password, any other value is :data:`MASK`;
* :func:`mask_url` takes the password out of a URL (``amqp://user:*****@host/``), and
  secret-looking query values (``?password=*****``); :func:`userinfo_problem` refuses
  a URL whose password would be split by its client (an unencoded ``/``);
* :func:`redact` masks the secret option values of an options object wherever they
  occur in a text (a client library's error that quotes a setting's value);
* :func:`hide_flag_values` and :func:`unrecognized_flags` keep the values of
  command-line words out of usage errors (``--sasl-password=x``, an unknown flag);
* :func:`redact_client_logs` puts a filter on a client library's loggers that masks
  credentials they write at DEBUG (botocore's wire trace shows the session token).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit

__all__ = [
    "MASK",
    "hide_flag_values",
    "mask_url",
    "masked",
    "redact",
    "redact_client_logs",
    "unrecognized_flags",
    "url_secrets",
    "userinfo_problem",
]

MASK: Final = "*****"


def _url_parts(url: str) -> tuple[str, str | None, str] | None:
    """``(scheme, userinfo, rest)`` of a ``scheme://...`` URL, else None.

    The user information ends at the last ``@``, not at the first ``/``, ``?`` or
    ``#`` as RFC 3986 has it: a password holding one of those unencoded (clients take
    it so) would otherwise leave the whole URL unmasked. An ``@`` in the path or query
    makes more of the URL masked, never less.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    userinfo, at, after = rest.rpartition("@")
    return (scheme, userinfo, after) if at else (scheme, None, rest)


def _secret_query(rest: str) -> list[tuple[int, int]]:
    """Spans (start, end) in ``rest`` of the query values whose name looks secret
    (``?password=...``: redis-py takes the password so)."""
    start = rest.find("?")
    if start < 0:
        return []
    spans = []
    end_of_query = rest.find("#", start)
    query_end = len(rest) if end_of_query < 0 else end_of_query
    pos = start + 1
    while pos <= query_end:
        amp = rest.find("&", pos, query_end)
        item_end = query_end if amp < 0 else amp
        name, equals, _ = rest[pos:item_end].partition("=")
        if equals and _SECRET_NAME.search(name):
            spans.append((pos + len(name) + 1, item_end))
        pos = item_end + 1
    return spans


def mask_url(url: str) -> str:
    """``url`` with the password of its user information, and the values of query
    parameters whose name looks secret, replaced by :data:`MASK`."""
    parts = _url_parts(url)
    if parts is None:
        return url
    scheme, userinfo, rest = parts
    for start, end in reversed(_secret_query(rest)):
        rest = f"{rest[:start]}{MASK}{rest[end:]}"
    if userinfo is None:
        return f"{scheme}://{rest}"
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:{MASK}" if colon else MASK  # no colon: the user part may be a token
    return f"{scheme}://{shown}@{rest}"


def url_secrets(url: str) -> list[str]:
    """The secret texts of ``url``: its password (or the whole user information when it
    has no colon: a token) and the values of secret-looking query parameters."""
    parts = _url_parts(url)
    if parts is None:
        return []
    _, userinfo, rest = parts
    found = [rest[start:end] for start, end in _secret_query(rest)]
    if userinfo is not None:
        user, colon, password = userinfo.partition(":")
        found.append(password if colon else user)
    return [f for f in found if f]


def userinfo_problem(url: str) -> str | None:
    """Why the user information of broker URL ``url`` cannot be read as meant: a ``/``,
    ``?``, ``#`` or ``@`` in it that is not percent-encoded (clients split the URL there
    and quote a piece of the password in their errors); None if it is fine."""
    parts = _url_parts(url)
    userinfo = parts[1] if parts else None
    if userinfo is None or not any(c in userinfo for c in "/?#@"):
        return None
    return (
        "its user name or password holds '/', '?', '#' or '@': percent-encode them "
        "(%2F, %3F, %23, %40)"
    )


def masked(value: Any) -> str:
    """How the value of a secret option is shown: a URL without its password, else MASK."""
    if isinstance(value, str) and "://" in value:
        try:
            urlsplit(value)
        except ValueError:
            return MASK
        return mask_url(value)
    return MASK


_SECRET_NAME: Final = re.compile(r"pass|secret|token|jaas|key|cred|oauth|auth", re.IGNORECASE)
"""What the NAME of a secret option's ``NAME=VALUE`` item holds when its VALUE is secret
(``sasl.password``, ``ssl.key.pem``, ``sasl.jaas.config`` ...)."""


_LONG = 10
"""A ``NAME=VALUE`` item's value (or part) this long is masked whatever its NAME: it may
be a secret under a name :data:`_SECRET_NAME` does not know."""


def _secret_values(options: Any) -> list[str]:
    """The texts that give away a secret option of ``options``: each value; the value of
    each ``NAME=VALUE`` item, and the parts of a comma-separated one (librdkafka quotes
    the bad part of a list), when its NAME looks secret (:data:`_SECRET_NAME`) or it is
    at least :data:`_LONG` characters long (short values of other names, ``linger.ms=5``
    say, would mask every ``5`` of a message); each URL's password; longest first."""
    found: set[str] = set()
    for f in dataclasses.fields(options):
        if not f.metadata.get("secret"):
            continue
        value = getattr(options, f.name)
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str) or not item:
                continue
            found.add(item)
            name, equals, rest = item.partition("=")
            if equals:
                secret_name = bool(_SECRET_NAME.search(name))
                found.update(
                    part for part in (rest, *rest.split(",")) if secret_name or len(part) >= _LONG
                )
            found.update(url_secrets(item))
    found.discard("")
    return sorted(found, key=len, reverse=True)


def redact(text: str, options: Any) -> str:
    """``text`` with every secret option value of dataclass ``options`` masked."""
    for value in _secret_values(options):
        text = text.replace(value, MASK)
    return text


_FLAG_VALUE: Final = re.compile(r"(--[A-Za-z0-9][\w-]*)=\S*?(?=['\",\s]|$)")


def hide_flag_values(message: str) -> str:
    """``message`` with the value of every ``--flag=value`` word masked."""
    return _FLAG_VALUE.sub(rf"\1={MASK}", message)


def unrecognized_flags(words: Sequence[str]) -> str:
    """Unknown command-line words as an error shows them: the flags, and the words before
    the first flag; a word after an unknown flag may be its value, so it is counted."""
    shown: list[str] = []
    hidden = 0
    for word in words:
        if word.startswith("-"):
            shown.append(word.split("=", 1)[0])
        elif any(w.startswith("-") for w in shown):
            hidden += 1
        else:
            shown.append(word)
    text = " ".join(shown)
    if not hidden:
        return text
    return f"{text} (and {hidden} more word(s) not shown: they may be secret values)"


# Credential headers as botocore writes them at DEBUG: the canonical request
# ("x-amz-security-token:TOKEN") and the prepared request's header dict
# ("'X-Amz-Security-Token': b'TOKEN'").
_CREDENTIAL_HEADERS: Final = re.compile(
    r"(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,}]+", re.IGNORECASE
)


class _CredentialFilter(logging.Filter):
    """Masks the values of credential headers in a record's text."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = _CREDENTIAL_HEADERS.sub(rf"\1{MASK}", text)
        if clean != text:
            record.msg, record.args = clean, ()
        return True


_FILTER: Final = _CredentialFilter()


def redact_client_logs(*names: str) -> None:
    """Mask credential headers in what the loggers ``names`` write (idempotent).

    A logger's filters see the records it creates, so name the loggers that write the
    credentials, not a parent.
    """
    for name in names:
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)
