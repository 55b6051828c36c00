"""Exceptions raised by AMGI servers, into applications and at users."""

from __future__ import annotations

__all__ = [
    "AMGIError",
    "BrokerUnavailable",
    "ConfigurationError",
    "InvalidEvent",
    "SendError",
    "StartupFailed",
]


class AMGIError(Exception):
    """Base class of the errors this package raises on purpose."""


class ConfigurationError(AMGIError, ValueError):
    """A server option, address or application reference is not usable.

    The message is one line meant for the user, e.g. printed by the ``amgi`` command.
    """


class BrokerUnavailable(AMGIError, OSError):
    """The broker cannot be reached or refused the connection (address, credentials)."""


class StartupFailed(AMGIError):
    """The application reported ``lifespan.startup.failed`` or raised during startup.

    An application may also raise it from a message call, before receiving anything, to
    say that it cannot serve any message (a handler it cannot run, found at its first
    message when there was no lifespan startup): the runtime then stops with this error
    and hands the messages back without using up an attempt.
    """


class InvalidEvent(AMGIError, TypeError):
    """The application sent an event the server cannot accept.

    Raised inside the application, from ``send()``; broker state is left untouched.
    """


class SendError(AMGIError, OSError):
    """A ``message.send`` could not be delivered to the broker.

    Every server raises a subclass of its own (e.g. ``KafkaSendError``) so that an
    application may catch failures of one server or of all (``OSError``).
    """
