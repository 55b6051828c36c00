"""nats-py as the NATS server uses it: one connection, one-line errors, logged callbacks."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.servers.kit import client_context, mask_url, untrusted_certificate

if TYPE_CHECKING:
    from nats.aio.client import Client

    from amgi.servers.nats import NatsOptions

__all__ = ["Refusals", "Refused", "flush", "open_connection"]

logger = logging.getLogger("amgi.servers.nats")

T = TypeVar("T")


_REFUSED = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"')
"""The server's line (lowercased by nats-py); a subscription's may end in ``using queue``."""

_API = "$js.api."
"""Where JetStream's API requests go (lowercased, as the server's line has it)."""


class Refused(Exception):
    """The server refused a permission :class:`Refusals` was watching for (the server's
    line, if one publish's)."""


class Refusals:
    """Permission violations the server reported that consuming cannot go on without.

    The server drops a publish or a subscription the user may not make with an ``-ERR``
    line and keeps the connection; nats-py passes that line to the error callback alone.
    Refused, a pull request or a subscription gets nothing, for ever, and an ack is
    lost (the message comes again after the ack wait, for ever). Only the subjects
    consuming needs are noted (``publish`` and ``subscribe``: whole subjects, or their
    start when ending in ``.``): a refused send or dead letter fails that publish alone,
    and JetStream's advisories only make a clearer error line.
    """

    def __init__(self, *, publish: tuple[str, ...] = (), subscribe: tuple[str, ...] = ()):
        # nats-py lowercases the server's error line, subject included.
        self._needed = {
            "publish": tuple(s.lower() for s in publish),
            "subscription": tuple(s.lower() for s in subscribe),
        }
        self.first = ""
        """The first one noted (the server's line, lowercased), or ""."""
        self.wake: Callable[[], None] = lambda: None
        """Called when one is noted, for a reader waiting for messages to look."""
        self._needed_refused = asyncio.Event()
        self._api_refused = asyncio.Event()
        """Set at a JetStream API request refused, needed or not."""
        self._publishes: dict[str, set[asyncio.Future[str]]] = {}
        """Per subject (lowercased), the publishes awaiting an answer (:meth:`publishing`)."""

    def note(self, error: object) -> None:
        text = str(error).removeprefix("nats: ")
        found = _REFUSED.match(text)
        if found is None:
            return
        what, subject = found.groups()
        if what == "publish" and subject.startswith(_API):
            self._api_refused.set()
        if what == "publish":
            for waiter in self._publishes.get(subject, ()):
                if not waiter.done():
                    waiter.set_result(text)
        if self.first:
            return
        for needed in self._needed[what]:
            if subject == needed or (needed.endswith(".") and subject.startswith(needed)):
                self.first = text
                self._needed_refused.set()
                self.wake()
                return

    async def unless_refused(self, work: Awaitable[T], *, api: bool = False) -> T:
        """``work``'s result; :class:`Refused` (``work`` cancelled) as soon as a permission
        consuming needs is refused (``api``: or any JetStream API request). The server
        answers a refused request with nothing: it would wait out its whole timeout."""
        refused = self._api_refused if api else self._needed_refused
        return await _unless(work, refused.wait())

    async def publishing(self, subject: str, work: Awaitable[T]) -> T:
        """``work``'s result, a publish to ``subject`` that awaits an answer (a JetStream
        publish); :class:`Refused` with the server's line as soon as it refuses this user
        publishing to ``subject``: it answers nothing, and the publish would wait out its
        timeout. (nats-py lowercases the line: a publish to a subject that differs from
        a refused one in case alone, made at that moment, is taken as refused too.)"""
        key = subject.lower()
        refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        waiters = self._publishes.setdefault(key, set())
        waiters.add(refused)
        try:
            return await _unless(work, refused)
        finally:
            waiters.discard(refused)
            if not waiters:
                self._publishes.pop(key, None)

    def check(self) -> None:
        """Raise :class:`ConfigurationError` naming the first refusal noted, if any."""
        if self.first:
            raise ConfigurationError(
                "nats: the NATS server refused this user a permission consuming needs "
                f"({self.first}): allow the user to publish to $JS.API.> and $JS.ACK.> "
                "and to subscribe to _INBOX.> (JetStream), or to subscribe to the "
                "addresses (core)"
            )


async def flush(client: Any, timeout: float) -> None:
    """``client.flush(timeout)``, but a ``PONG`` that comes after the timeout is harmless.

    nats-py cancels its flush's future at the timeout and leaves it queued: the server's
    late ``PONG`` (a server that stalled for longer, then woke) then fails on it and ends
    nats-py's reading loop for good, the connection up but deaf (no message, no ack,
    no publish answer) until its pings run out, minutes later. Here the future is never
    cancelled: the late ``PONG`` resolves it and nobody minds."""
    from nats import errors as nats_errors

    reading, flushing = client._reading_task, client._flusher_task
    if client.is_closed or not reading or reading.done() or not flushing or flushing.done():
        await client.flush(timeout)  # (no PING then: nats-py raises or writes out)
        return
    pong: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    await client._send_ping(pong)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(pong)
    except TimeoutError:
        raise nats_errors.FlushTimeoutError from None


async def _unless(work: Awaitable[T], refusal: Awaitable[object]) -> T:
    """``work``'s result, unless ``refusal`` comes first: then ``work`` is cancelled and
    :class:`Refused` raised (with ``refusal``'s result if it is a line)."""
    working = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(refusal)
    try:
        await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
        done = working.done()
    finally:
        working.cancel()
        watching.cancel()
        await asyncio.gather(working, watching, return_exceptions=True)
    if not done:
        line = watching.result()
        raise Refused(line if isinstance(line, str) else "")
    return working.result()


def _tls(options: NatsOptions) -> ssl.SSLContext | None:
    """The TLS context of the options, ``None`` without TLS; a file that does not load
    is one :class:`ConfigurationError` naming it."""
    if not (options.tls or options.tls_ca or options.tls_cert):
        return None
    return client_context(
        "nats",
        ("--tls-ca", options.tls_ca),
        ("--tls-cert", options.tls_cert),
        ("--tls-key", options.tls_key),
    )


def _check_credential_files(options: NatsOptions) -> None:
    """Read ``--nkey-seed`` and ``--creds`` before connecting: nats-py reads them only when
    the server asks (a missing file would pass unnoticed until then) and fails with
    errors that do not name the file."""
    import nkeys

    if options.nkey_seed:
        seed = _read(options.nkey_seed, "nkey-seed")
        try:
            nkeys.from_seed(bytearray(seed.strip())).wipe()
        except (nkeys.NkeysError, ValueError) as exc:
            raise ConfigurationError(
                f"nats: --nkey-seed {options.nkey_seed} is not an nkey seed ({exc})"
            ) from None
    if options.creds:
        text = _read(options.creds, "creds")
        for block in ("NATS USER JWT", "USER NKEY SEED"):
            if f"-----BEGIN {block}-----" not in text.decode(errors="replace"):
                raise ConfigurationError(
                    f"nats: --creds {options.creds} is not a .creds file (no {block} block)"
                )


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigurationError(
            f"nats: cannot read --{flag} {path}: {exc.strerror or exc}"
        ) from None


def _tls_only_client() -> Client:
    """A nats-py client that never sends CONNECT (and its credentials) outside TLS.

    nats-py upgrades to TLS only when the server's INFO line says ``tls_required``; a
    server, or anything in between, that leaves it out would get the credentials in
    plaintext. This client refuses such a server instead, on every (re)connect.
    """
    from nats import errors as nats_errors
    from nats.aio.client import Client as NatsClient

    class TlsOnly(NatsClient):
        async def _process_info(
            self, info: dict[str, Any], initial_connection: bool = False
        ) -> None:
            if initial_connection and not (
                info.get("tls_required") or self.options.get("tls_handshake_first")
            ):
                raise nats_errors.Error(
                    "the server does not require TLS although TLS is configured: "
                    "refusing to send the credentials in plaintext"
                )
            await super()._process_info(info, initial_connection)

    return TlsOnly()


def _why(reason: object, otherwise: str) -> str:
    """``reason`` as the end of a connect error line; ``otherwise`` if nothing is clearer."""
    refused = untrusted_certificate(reason)
    if refused is not None:
        return f"the server's certificate is not trusted ({refused}); give its CA with --tls-ca"
    return otherwise


async def open_connection(options: NatsOptions, refusals: Refusals | None = None) -> Client:
    """Connect to ``options.servers`` (reconnecting by itself afterwards, without limit);
    the permission violations the server reports are noted in ``refusals``."""
    from nats import errors as nats_errors
    from nats.aio.client import Client as NatsClient

    servers = [s.strip() for s in options.servers.split(",") if s.strip()]

    async def on_error(exc: Exception) -> None:
        logger.warning("connection error: %s", exc or type(exc).__name__)
        if refusals is not None:
            refusals.note(exc)

    connected: list[Client] = []

    async def on_disconnected() -> None:
        if connected and not connected[0].is_closed:
            logger.warning("disconnected from the NATS server; reconnecting")

    async def on_reconnected() -> None:
        logger.info("reconnected to the NATS server")

    kwargs: dict[str, Any] = {
        "servers": servers,
        "connect_timeout": options.connect_timeout,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
        "name": "amgi",
    }
    if options.user:
        kwargs["user"] = options.user
        kwargs["password"] = options.password
    if options.token:
        kwargs["token"] = options.token
    if options.creds:
        kwargs["user_credentials"] = options.creds
    if options.nkey_seed:
        kwargs["nkeys_seed"] = options.nkey_seed
    _check_credential_files(options)
    kwargs["tls"] = _tls(options)
    shown = ", ".join(mask_url(s) for s in servers)  # a server URL may hold user:password
    first_error: list[BaseException] = []

    async def on_first_error(exc: Exception) -> None:
        first_error.append(exc)

    kwargs["error_cb"] = on_first_error
    wants_tls = kwargs["tls"] is not None or any(s.startswith("tls://") for s in servers)
    client = _tls_only_client() if wants_tls else NatsClient()
    try:
        # Two tries per server at startup (nats-py would otherwise retry for ever).
        await client.connect(**{**kwargs, "allow_reconnect": False, "max_reconnect_attempts": 1})
    except nats_errors.NoServersError:
        reason = first_error[0] if first_error else "no server answered"
        if (
            isinstance(reason, nats_errors.AuthorizationError)
            or "authorization" in str(reason).lower()
        ):
            raise BrokerUnavailable(f"nats: {shown} refused the credentials") from None
        why = _why(reason, str(reason))
        raise BrokerUnavailable(f"nats: cannot connect to {shown}: {why}") from None
    except (nats_errors.Error, OSError, TimeoutError) as exc:
        if "authorization" in str(exc).lower():
            raise BrokerUnavailable(f"nats: {shown} refused the credentials") from None
        why = _why(exc, repr(exc))
        raise BrokerUnavailable(f"nats: cannot connect to {shown}: {why}") from None
    connected.append(client)
    # Connected once: from now on reconnect without limit.
    client.options["allow_reconnect"] = True
    client.options["max_reconnect_attempts"] = -1
    client._error_cb = on_error
    return client
