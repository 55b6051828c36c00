"""AMGI over AMP: an AMP server that hands ``Deliver`` calls to the app, and delivers back.

How AMGI maps onto AMP (see docs/servers/amp.md for the wire contract):

==================  ================================================================
address             the ``address`` argument of a ``Deliver`` call
batch               the ``Deliver`` calls received on any connection while the app
                    was busy, up to ``batch_size``, grouped by address
ordering key        the address: batches of one address run one after another
ack                 the ``Deliver`` call is answered (empty answer)
nack (retry/dead)   the ``Deliver`` call fails with error code ``NACK`` and the reason;
                    the sender owns the message and decides whether to send it again
send                a ``Deliver`` call to every connection that sent ``Subscribe`` for
                    the address; fails (``AmpSendError``) if there is none or one nacks
close / crash       connections close; unanswered senders see the connection drop
security            TLS from the first byte (``--tls``, optionally client certificates);
                    ``--auth-token``: ``Authenticate`` first, else error and close;
                    ``Subscribe`` only to ``--subscribe-addresses``
==================  ================================================================

Roles: ``amgi run`` listens on ``--host``/``--port`` (at ``connect`` when it consumes
named addresses, otherwise at the first ``fetch``, accepting every address).
``amgi send`` (no listener) connects to ``--host``/``--port`` and calls ``Deliver``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import logging
import ssl
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from amgi import amp
from amgi.errors import BrokerUnavailable, ConfigurationError, SendError
from amgi.options import invalid
from amgi.servers.kit.tls import client_context, server_context
from amgi.transport import Batch, Bindings, HeaderList, Message, Settlement, Transport

__all__ = [
    "AmpOptions",
    "AmpSendError",
    "AmpTransport",
    "Authenticate",
    "Deliver",
    "Forbidden",
    "Nacked",
    "Subscribe",
    "Unauthenticated",
]

log = logging.getLogger("amgi.servers.amp")

_CLOSE_TIMEOUT = 2.0
"""Seconds a closing connection gets to send what is queued before it is aborted (a
peer that stopped reading); well within the runtime's shortest close (5 s)."""


_STOPPING = "the server is shutting down: send it again later"


class AmpSendError(SendError):
    """A message could not be delivered over AMP."""


class Nacked(Exception):
    """The receiving app nacked the message (error code ``NACK``); the text is the reason."""


class Unauthenticated(Exception):
    """Code ``UNAUTHENTICATED``: a wrong token, or a call before ``Authenticate``; closes."""


class Forbidden(Exception):
    """Code ``FORBIDDEN``: ``Subscribe`` to an address not allowed; the connection closes."""


_REFUSALS: dict[type[BaseException], bytes | str] = {
    Unauthenticated: b"UNAUTHENTICATED",
    Forbidden: b"FORBIDDEN",
}


class Authenticate(amp.Command):
    """Present the server's token (``--auth-token``); must precede every other call."""

    arguments = [(b"token", amp.String())]
    fatal_errors = _REFUSALS


class Deliver(amp.Command):
    """Deliver one message to ``address``; answered once the receiver's app acks it."""

    arguments = [
        (b"address", amp.Unicode()),
        (b"headers", amp.AmpList([(b"name", amp.String()), (b"value", amp.String())])),
        (b"payload", amp.BigBytes(optional=True)),
    ]
    errors = {Nacked: b"NACK"}
    fatal_errors = _REFUSALS


class Subscribe(amp.Command):
    """Receive, as ``Deliver`` calls, every message the app sends to ``address``."""

    arguments = [(b"address", amp.Unicode())]
    fatal_errors = _REFUSALS


@dataclass(slots=True)
class AmpOptions:
    """Options of the AMP server."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on / connect to"})
    port: int = field(
        default=7000, metadata={"ge": 0, "le": 65535, "help": "TCP port to listen on / connect to"}
    )
    batch_size: int = field(default=100, metadata={"ge": 1, "help": "most messages per batch"})
    call_timeout: float = field(
        default=30.0,
        metadata={
            "gt": 0,
            "help": "seconds to wait for a Deliver answer (or to connect) when sending",
        },
    )
    tls: bool = field(
        default=False,
        metadata={"help": "TLS from the first byte (listening: needs --cert-file and --key-file)"},
    )
    cert_file: str | None = field(
        default=None,
        metadata={"help": "certificate (PEM): the server's, or the client's when sending"},
    )
    key_file: str | None = field(default=None, metadata={"help": "key of --cert-file (PEM)"})
    ca_file: str | None = field(
        default=None,
        metadata={
            "help": "CA certificates (PEM): listening, require client certificates signed "
            "by them; sending, verify the server with them (default: the system's)"
        },
    )
    auth_token: str | None = field(
        default=None,
        repr=False,
        metadata={
            "help": "token a client must present with Authenticate before any other call",
            "secret": True,
        },
    )
    auth_timeout: float = field(
        default=10.0,
        metadata={
            "gt": 0,
            "help": "seconds a connection may take to Authenticate (with --auth-token)",
        },
    )
    subscribe_addresses: list[str] = field(
        default_factory=list,
        metadata={"help": "addresses clients may Subscribe to (default: none)"},
    )
    max_box_size: int = field(
        default=amp.DEFAULT_MAX_BOX_SIZE,
        metadata={"ge": 1, "help": "largest AMP box accepted, bytes (bounds a message's size)"},
    )
    max_keys_per_box: int = field(
        default=amp.DEFAULT_MAX_KEYS_PER_BOX, metadata={"ge": 1, "help": "most keys in an AMP box"}
    )

    def check_together(self) -> None:
        """Rules that involve several fields (and a present-but-empty token)."""
        if self.auth_token == "":
            raise invalid(self, "auth_token", "must not be empty")


class _Peer(amp.AMP):
    """One connection to the AMGI-over-AMP server."""

    def __init__(self, transport: AmpTransport) -> None:
        config = transport.config
        super().__init__(
            max_concurrent_responders=config.batch_size * 10,
            max_box_size=config.max_box_size,
            max_keys_per_box=config.max_keys_per_box,
            close_timeout=_CLOSE_TIMEOUT,
        )
        self.owner = transport
        self.subscriptions: set[str] = set()
        self.authenticated = transport._token is None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.authenticated:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self.owner.config.auth_timeout, self._too_late)

    def _too_late(self) -> None:
        if not self.authenticated and not self.is_closed:
            log.warning(
                "amp: closing the connection from %s: no Authenticate within %ss",
                self._peer_name(),
                self.owner.config.auth_timeout,
            )
            self.close()

    def _check_authenticated(self, command: str) -> None:
        if not self.authenticated:
            log.warning("amp: refused %s from %s: not authenticated", command, self._peer_name())
            raise Unauthenticated("authenticate first")

    def call_rejected(self, name: bytes, code: bytes, description: str) -> None:
        if not self.authenticated and not self.is_closed:
            log.warning(
                "amp: closing the connection from %s: a refused call before Authenticate",
                self._peer_name(),
            )
            self.close()

    async def answered(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for the responders whose answer is decided to queue it."""
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    @Authenticate.responder
    def authenticate(self, token: bytes) -> None:
        expected = self.owner._token
        if expected is None:
            log.warning("amp: refused Authenticate from %s: no token set", self._peer_name())
            raise Unauthenticated("this server takes no token (no --auth-token)")
        if not hmac.compare_digest(token, expected):
            log.warning("amp: refused Authenticate from %s: wrong token", self._peer_name())
            raise Unauthenticated("authentication failed")
        self.authenticated = True
        if self._deadline is not None:
            self._deadline.cancel()

    @Deliver.responder
    def deliver(
        self, address: str, headers: list[dict[str, Any]], payload: bytes | None
    ) -> Awaitable[None]:
        # Checked here, when the call is dispatched in order of arrival, not in the
        # coroutine: an Authenticate right behind it would have run by then.
        self._check_authenticated("Deliver")
        return self.owner._received(address, [(h["name"], h["value"]) for h in headers], payload)

    @Subscribe.responder
    def subscribe(self, address: str) -> None:
        self._check_authenticated("Subscribe")
        if address not in self.owner.config.subscribe_addresses:
            log.warning(
                "amp: refused Subscribe to %r from %s: not in --subscribe-addresses",
                address[:200],
                self._peer_name(),
            )
            raise Forbidden(f"subscribing to {address[:200]!r} is not allowed")
        self.subscriptions.add(address)
        self.owner._subscribers.setdefault(address, set()).add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._deadline is not None:
            self._deadline.cancel()
        self.owner._peers.discard(self)
        for address in self.subscriptions:
            self.owner._subscribers.get(address, set()).discard(self)


class AmpTransport(Transport):
    """The AMGI transport that serves AMP clients (and sends as one for ``amgi send``)."""

    name = "amp"
    options = AmpOptions
    send_error = AmpSendError
    single_process_reason = "it listens on one --port itself"

    def __init__(self, addresses: Sequence[str], options: AmpOptions | None = None) -> None:
        super().__init__(addresses, options or AmpOptions())
        self.config: AmpOptions
        self._server: asyncio.Server | None = None
        self._client: amp.AMP | None = None
        self._client_lock = asyncio.Lock()  # concurrent sends share one connection
        self._closed = False
        self._peers: set[_Peer] = set()
        self._subscribers: dict[str, set[_Peer]] = {}
        self._ready: asyncio.Queue[Message] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._address_of: dict[str, str] = {}
        self._unanswered: dict[str, asyncio.Future[None]] = {}
        self._stopping = False
        token = self.config.auth_token
        self._token = token.encode("utf-8") if token is not None else None

    # ------------------------------------------------------------------ listener

    async def connect(self) -> None:
        self.check()
        self._closed = self._stopping = False
        if self.addresses:
            await self._listen()

    def _ssl_context(self, server_side: bool) -> ssl.SSLContext | None:
        """The listener's (``server_side``) or the connector's TLS context; ``None``
        without ``--tls``."""
        c = self.config
        if not c.tls:
            return None
        ca, cert = ("--ca-file", c.ca_file), ("--cert-file", c.cert_file)
        key = ("--key-file", c.key_file)
        if server_side:
            return server_context("amp", cert, key, ca)
        return client_context("amp", ca, cert, key)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        c = self.config
        if c.tls and not (c.cert_file and c.key_file):
            raise ConfigurationError("amp: --tls needs --cert-file and --key-file to listen")
        context = self._ssl_context(server_side=True)

        def factory() -> _Peer:
            peer = _Peer(self)
            self._peers.add(peer)
            return peer

        try:
            self._server = await amp.serve(factory, c.host, c.port, ssl=context)
        except OSError as exc:
            raise BrokerUnavailable(
                f"amp: cannot listen on {c.host}:{c.port}: {exc.strerror}"
            ) from None
        missing = [n for n, on in (("TLS", c.tls), ("authentication", self._token)) if not on]
        if missing and not _is_loopback(c.host):
            log.warning(
                "amp: listening on %s:%s without %s: any peer that reaches this port can "
                "deliver messages to the application",
                c.host,
                self.port,
                " or ".join(missing),
            )

    @property
    def port(self) -> int | None:
        """The port actually listened on (useful with ``port=0``)."""
        if self._server is None:
            return None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _received(self, address: str, headers: HeaderList, payload: bytes | None) -> None:
        if self.addresses and address not in self.addresses:
            raise Nacked(f"address {address!r} is not served here")
        if self._stopping:
            raise Nacked(_STOPPING)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        message = Message(str(next(self._ids)), headers, payload, token=done)
        self._address_of[message.id] = address
        self._unanswered[message.id] = done
        self._ready.put_nowait(message)
        try:
            await done
        finally:
            self._address_of.pop(message.id, None)
            self._unanswered.pop(message.id, None)

    def stop_fetching(self) -> None:
        # Shutdown: deliveries no batch took, and new ones, are nacked now (their
        # senders still own them and learn at once); batches in flight are answered.
        self._stopping = True
        while not self._ready.empty():
            message = self._ready.get_nowait()
            if not message.token.done():
                message.token.set_exception(Nacked(_STOPPING))

    async def fetch(self) -> Sequence[Batch]:
        if self._server is None:
            try:
                await self._listen()
            except BrokerUnavailable as exc:
                # Fatal, as at connect: the runtime retries a fetch's errors, and would
                # run on serving nothing until the port is free.
                raise ConfigurationError(str(exc)) from None
        ready = self._ready
        first = await ready.get()
        messages = [first]
        while len(messages) < self.config.batch_size and not ready.empty():
            messages.append(ready.get_nowait())
        batches: dict[str, Batch] = {}
        for message in messages:
            future: asyncio.Future[None] = message.token
            address = self._address_of.get(message.id)
            if address is None or future.done():
                continue  # the sender went away before the app saw it
            batch = batches.get(address)
            if batch is None:
                batch = batches[address] = Batch(address, [], key=address)
            batch.messages.append(message)
        return list(batches.values())

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        for message in settlement.acked:
            if not message.token.done():
                message.token.set_result(None)
        nacked = [(r.message, r.reason) for r in settlement.retry]
        nacked += [(d.message, d.reason) for d in settlement.dead]
        for message, reason in nacked:
            if not message.token.done():
                message.token.set_exception(Nacked(reason))

    # ------------------------------------------------------------------- sending

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        values = {
            "address": address,
            "headers": [{"name": bytes(n), "value": bytes(v)} for n, v in headers],
            "payload": payload,
        }
        self._check_size(values)
        if self._server is not None:
            targets: list[amp.AMP] = list(self._subscribers.get(address, ()))
            if not targets:
                raise AmpSendError(f"amp: no subscriber for {address!r}")
        else:
            targets = [await self._client_connection()]
        results = await asyncio.gather(
            *(self._call(target, values) for target in targets), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise AmpSendError(f"amp: could not deliver to {address!r}: {result}") from result

    def _check_size(self, values: dict[str, Any]) -> None:
        """Refuse a Deliver box over --max-box-size or --max-keys-per-box: a receiver
        with those limits closes the connection at it, failing every other send in
        flight there, each time."""
        try:
            size, keys = _deliver_size(values)
        except amp.AmpError as exc:  # an argument that cannot be encoded at all
            raise AmpSendError(f"amp: cannot send to {values['address']!r}: {exc}") from None
        c = self.config
        over = f"an AMP box of {size} bytes, over --max-box-size ({c.max_box_size})"
        if size <= c.max_box_size:
            if keys <= c.max_keys_per_box:
                return
            over = f"an AMP box of {keys} keys, over --max-keys-per-box ({c.max_keys_per_box})"
        raise AmpSendError(
            f"amp: the message to {values['address']!r} makes {over}: a receiver with "
            "that limit would close the connection"
        )

    async def _call(self, target: amp.AMP, values: dict[str, Any]) -> None:
        await target.call_remote(Deliver, timeout=self.config.call_timeout, **values)

    async def _client_connection(self) -> amp.AMP:
        client = self._client
        if client is not None and not client.is_closed:
            return client
        async with self._client_lock:
            if self._closed:  # a send racing close() opens nothing close() would not see
                raise AmpSendError("amp: cannot send: the transport is closed")
            if self._client is None or self._client.is_closed:
                self._client = await self._open_client()
            return self._client

    async def _open_client(self) -> amp.AMP:
        """Connect to --host/--port (and authenticate, with a token)."""
        c = self.config
        context = self._ssl_context(server_side=False)
        try:
            # Bounded like the call: a host that drops the SYN, or a TLS handshake never
            # answered, held this send (and every send behind the lock) for minutes.
            async with asyncio.timeout(c.call_timeout):
                client = await amp.connect(
                    c.host, c.port, lambda: amp.AMP(close_timeout=_CLOSE_TIMEOUT), ssl=context
                )
        except TimeoutError:
            raise BrokerUnavailable(
                f"amp: cannot connect to {c.host}:{c.port}: no answer within {c.call_timeout:g}s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise BrokerUnavailable(f"amp: cannot connect to {c.host}:{c.port}: {reason}") from None
        if self._token is not None:
            try:
                await client.call_remote(Authenticate, token=self._token, timeout=c.call_timeout)
            except BaseException as exc:
                client.close()  # a cancelled send leaves no connection behind either
                if not isinstance(exc, amp.AmpError | Unauthenticated | OSError | TimeoutError):
                    raise
                raise AmpSendError(f"amp: authentication refused: {exc}") from None
        return client

    async def close(self) -> None:
        self._closed = True
        async with self._client_lock:  # a connect in progress finishes first
            client, self._client = self._client, None
        if client is not None:
            client.close()
            await client.wait_closed()
        if self._server is not None:
            self._server.close()
            # What the app settled is answered before the connections close, and what
            # it did not is nacked (the sender still owns it) rather than dropped.
            for done in list(self._unanswered.values()):
                if not done.done():
                    done.set_exception(Nacked(_STOPPING))
            peers = list(self._peers)
            await asyncio.gather(*(peer.answered(_CLOSE_TIMEOUT) for peer in peers))
            for peer in peers:
                peer.close()
            for peer in peers:
                await peer.wait_closed()
            await self._server.wait_closed()
            self._server = None
        while not self._ready.empty():  # all nacked above
            self._ready.get_nowait()


# The pairs a Deliver call adds to its arguments: _command, and _ask with a tag of at
# most 16 hex digits; each pair is a key and a value, each with a 2-byte length.
_CALL_KEYS_SIZE = (4 + len(b"_command") + len(Deliver.name)) + (4 + len(b"_ask") + 16)


def _deliver_size(values: dict[str, Any]) -> tuple[int, int]:
    """Bytes of the pairs of a Deliver box and their number (what a receiver's
    max_box_size and max_keys_per_box bound), without copying the payload into chunks."""
    box = Deliver.encode_arguments({**values, "payload": None})
    size = _CALL_KEYS_SIZE + sum(4 + len(key) + len(value) for key, value in box.items())
    keys = len(box) + 2
    payload: bytes | None = values["payload"]
    if payload is not None:
        chunks = max(1, -(-len(payload) // amp.BigBytes.chunk_size))
        names = len(b"payload") + sum(len(b"payload.%d" % n) for n in range(2, chunks + 1))
        size += 4 * chunks + names + len(payload)
        keys += chunks
    return size, keys


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
