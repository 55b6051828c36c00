"""Exceptions of the application layer."""

from __future__ import annotations

__all__ = [
    "AppDefinitionError",
    "DeadLetter",
    "PayloadError",
    "ValidatorFailed",
    "first_line",
    "one_line",
    "validator_failed",
]


class AppDefinitionError(TypeError):
    """A handler the layer cannot serve; the message names the function and the parameter."""


class DeadLetter(Exception):
    """Raise from a handler to dead-letter the message now, without further retries.

    Where the server does not advertise the ``message.nack.retry`` extension, the message
    is nacked as for any other exception (the server retries it, then dead-letters it).
    """


class PayloadError(ValueError):
    """A payload (or header, binding, address parameter) that does not fit its type."""


class ValidatorFailed(Exception):
    """A validator of a header, binding or address parameter raised something other than
    a validation error (a lookup that failed, a bug): not the message's fault, retried."""


def validator_failed(what: str, exc: BaseException) -> ValidatorFailed:
    """The :class:`ValidatorFailed` of ``what`` (``header 'tenant'``) for ``exc``."""
    return ValidatorFailed(
        f"{what}: its validator raised {type(exc).__name__}: {one_line(str(exc))}"
    )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (pydantic's run over several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of blanks folded into single spaces."""
    return " ".join(text.split())
