"""AMGI over HTTP push: CloudEvents 1.0 and Google Pub/Sub push requests.

How AMGI maps onto HTTP push (see docs/servers/http.md for every header, byte by byte):

==================  ================================================================
request             a POST: a CloudEvent in binary mode (``ce-*`` headers, any body),
                    structured mode (``application/cloudevents+json``) or batched
                    mode (``application/cloudevents-batch+json``), or a Pub/Sub push
                    envelope (``application/json``)
address             ``address_from``: the event's ``type`` (default) or ``source``, or
                    the request path; Pub/Sub: ``pubsub_address_from``, the
                    subscription's short name (default) or the path
headers             ``ce-<attribute>`` for every CloudEvents attribute and extension,
                    ``content-type`` for ``datacontenttype``; Pub/Sub: the attributes
payload             the event data (binary: the body as received); Pub/Sub: ``data``
                    base64-decoded
bindings            Pub/Sub: ``googlepubsub`` (messageId, publishTime, subscription,
                    orderingKey)
batch               the requests waiting while the app was busy, up to ``batch_size``
                    messages (a batched-mode request is never split), one per address
ordering key        none: requests are independent, batches run concurrently
ack                 the request is answered 204 once every message of it is acked
nack (retry/dead)   the request is answered ``nack_status`` (500) with the reasons; the
                    sender owns the message until a 2xx and pushes it again
bad request         400 (not an event), 415 (content type), 413 (over ``max_body``),
                    404 (address not served), 405 (not POST); the app is not called
refused             401 (no token / no signature), 403 (wrong token / bad signature)
shutdown            in-flight requests are finished; queued and new ones get 503
send                a CloudEvent POSTed to ``send_url`` (binary or structured mode)
==================  ================================================================

``amgi run app:app --server http`` listens on ``--host``/``--port``; :mod:`amgi.http`
serves the same inside any ASGI stack.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.options import check, invalid, option
from amgi.servers.http._auth import RequestCheck
from amgi.servers.http._front import Front
from amgi.servers.http._inbox import Inbox
from amgi.servers.http._listener import Listener
from amgi.servers.http._sender import CloudEventSender, HttpSendError
from amgi.servers.kit.tls import server_context
from amgi.transport import Batch, Bindings, HeaderList, Settlement, Transport

__all__ = ["HttpOptions", "HttpSendError", "HttpTransport"]

logger = logging.getLogger("amgi.servers.http")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


@dataclass(slots=True)
class HttpOptions:
    """Options of the HTTP push server (and of the CloudEvents sender)."""

    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8080, "TCP port to listen on", ge=0, le=65535)
    address_from: Literal["type", "source", "path"] = option(
        "type", "where a CloudEvent's address comes from"
    )
    pubsub_address_from: Literal["subscription", "path"] = option(
        "subscription", "where a Pub/Sub push's address comes from"
    )
    batch_size: int = option(100, "most messages per batch", ge=1)
    max_body: int = option(1_048_576, "largest request body, bytes", ge=1)
    nack_status: int = option(500, "HTTP status of a nacked request (5xx, 408 or 429)")
    token: str | None = option(None, "require 'Authorization: Bearer TOKEN'", secret=True)
    hmac_secret: str | None = option(
        None, "require an HMAC signature of the body with this key", secret=True
    )
    hmac_header: str = option("x-signature", "header holding the body's HMAC signature")
    hmac_algorithm: Literal["sha256", "sha512", "sha1"] = option(
        "sha256", "hash of the HMAC signature"
    )
    ssl_certfile: str | None = option(None, "TLS certificate (PEM)")
    ssl_keyfile: str | None = option(None, "TLS private key (PEM)")
    ssl_ca_certs: str | None = option(None, "CA bundle: require client certificates it signed")
    close_timeout: float = option(
        3.0, "seconds open connections get to close at shutdown; then they are aborted", ge=0
    )
    keep_alive: float = option(5.0, "seconds an idle connection stays open", gt=0)
    read_timeout: float = option(30.0, "seconds a request may pause before its end (408)", gt=0)
    min_body_rate: int = option(
        500, "bytes/s a body must average after its first --read-timeout s (408); 0: any", ge=0
    )
    max_connections: int = option(
        1000, "open connections at most; one more is answered 503 and closed", ge=1
    )
    send_url: str | None = option(
        None, "URL message.send POSTs CloudEvents to ({address} ok)", secret=True
    )
    send_mode: Literal["binary", "structured"] = option(
        "binary", "CloudEvents content mode of sent events"
    )
    send_source: str = option("amgi", "source of sent events")
    send_token: str | None = option(None, "bearer token sent with each event", secret=True)
    send_timeout: float = option(30.0, "seconds to wait for an answer", gt=0)

    def check_together(self) -> None:
        """Rules that involve the value of a field beyond its bounds."""
        if not 500 <= self.nack_status <= 599 and self.nack_status not in (408, 429):
            raise invalid(self, "nack_status", "must be a 5xx, 408 or 429 (a retry status)")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise invalid(self, "ssl_keyfile", "needs --ssl-certfile")
        if self.send_url is not None:
            if not self.send_url.startswith(("http://", "https://")):
                raise invalid(self, "send_url", "must start with http:// or https://")
            if self.send_token and _has_user(self.send_url):
                raise invalid(self, "send_url", "holds a user and password: no --send-token too")


def _has_user(url: str) -> bool:
    """Whether ``url`` holds a user name (sent as Basic auth)."""
    try:
        return urlsplit(url).username is not None
    except ValueError:  # the sender's own check says what is wrong with it
        return False


class HttpTransport(Transport):
    """Serves HTTP pushes (listening itself, or behind :class:`amgi.http.PushApp`)."""

    name = "http"
    options = HttpOptions
    send_error = HttpSendError
    requires = ("httptools",)
    extra = "http"
    single_process_reason = "it listens on one --port itself"
    addresses_optional: ClassVar[bool] = True
    """``amgi run --server http`` without addresses serves every address."""

    def __init__(
        self, addresses: Sequence[str], options: HttpOptions | None = None, *, listen: bool = True
    ) -> None:
        super().__init__(addresses, options or HttpOptions())
        self.config: HttpOptions
        o = self.config
        self.close_needs = o.close_timeout  # the runtime waits for the listener's abort
        check(o)
        try:
            request_check = RequestCheck(o.token, o.hmac_secret, o.hmac_header, o.hmac_algorithm)
        except ValueError as exc:
            raise ConfigurationError(f"http: {exc}") from None
        self.inbox = Inbox()
        self.front = Front(
            self.inbox,
            addresses=self.addresses,
            address_from=o.address_from,
            pubsub_address_from=o.pubsub_address_from,
            max_body=o.max_body,
            nack_status=o.nack_status,
            check=request_check,
        )
        """The ASGI application that feeds this transport."""
        self._listen = listen
        self._listener: Listener | None = None
        self._sender: CloudEventSender | None = None

    @property
    def port(self) -> int | None:
        """The port listened on (useful with ``port=0``)."""
        return self._listener.port if self._listener is not None else None

    async def connect(self) -> None:
        self.check()
        if self.addresses:
            await self._start_listener()

    async def _start_listener(self) -> None:
        if not self._listen or self._listener is not None:
            return
        o = self.config
        tls = None
        if o.ssl_certfile:
            tls = server_context(
                "http",
                ("--ssl-certfile", o.ssl_certfile),
                ("--ssl-keyfile", o.ssl_keyfile),
                ("--ssl-ca-certs", o.ssl_ca_certs),
            )
        listener = Listener(
            self.front,
            o.host,
            o.port,
            tls=tls,
            keep_alive=o.keep_alive,
            read_timeout=o.read_timeout,
            min_body_rate=o.min_body_rate,
            close_timeout=o.close_timeout,
            max_connections=o.max_connections,
        )
        await listener.start()
        self._listener = listener
        if not (o.ssl_certfile or o.token or o.hmac_secret) and not _loopback(o.host):
            logger.warning(
                "http: listening on %s without TLS or authentication: any peer that reaches "
                "it can push messages into the app (see --token, --hmac-secret, --ssl-certfile)",
                o.host,
            )

    async def fetch(self) -> Sequence[Batch]:
        if self._listener is None:
            try:
                await self._start_listener()
            except BrokerUnavailable as exc:
                raise ConfigurationError(str(exc)) from None  # fatal: no retry loop
        return await self.inbox.take(self.config.batch_size)

    def stop_fetching(self) -> None:
        # Shutdown: requests no batch took are answered 503 now (the sender still owns
        # them), and so are new ones; batches in flight finish and are answered, and the
        # listener closes its connections as they fall idle.
        self.inbox.close()
        if self._listener is not None:
            self._listener.begin_stop()

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        # No dead-letter destination here: a dead letter is answered a retry status like
        # any nack, so its sender keeps it (Pub/Sub moves it to its own dead-letter
        # topic); the runtime's log and metrics then say "kept", not "dead-lettered".
        for dead in settlement.dead:
            dead.not_stored(
                f"the http server has no dead-letter destination: its request is answered "
                f"{self.config.nack_status} and its sender keeps it (see the sender's own "
                "dead letters)"
            )
        self.inbox.settle(settlement, batch.address)

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        sender = self._sender
        if sender is None:
            o = self.config
            if not o.send_url:
                raise HttpSendError("http: no send_url configured to send CloudEvents to")
            try:
                sender = CloudEventSender(
                    o.send_url, o.send_mode, o.send_source, o.send_token, o.send_timeout
                )
            except ValueError as exc:
                raise HttpSendError(f"http: {exc}") from None
            self._sender = sender
        await sender.send(address, headers, payload)

    async def close(self) -> None:
        self.inbox.close()
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._sender is not None:
            await self._sender.close()
            self._sender = None
