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
==================  ================================================================

Roles: ``amgi run`` listens on ``--host``/``--port`` (at ``connect`` when it consumes
named addresses, otherwise at the first ``fetch``, accepting every address).
``amgi send`` (no listener) connects to ``--host``/``--port`` and calls ``Deliver``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from amgi import amp
from amgi.errors import BrokerUnavailable, SendError
from amgi.transport import Batch, Bindings, HeaderList, Message, Settlement, Transport

__all__ = ["AmpOptions", "AmpSendError", "AmpTransport", "Deliver", "Nacked", "Subscribe"]


class AmpSendError(SendError):
    """A message could not be delivered over AMP."""


class Nacked(Exception):
    """The receiving app nacked the message (error code ``NACK``); the text is the reason."""


class Deliver(amp.Command):
    """Deliver one message to ``address``; answered once the receiver's app acks it."""

    arguments = [
        (b"address", amp.Unicode()),
        (b"headers", amp.AmpList([(b"name", amp.String()), (b"value", amp.String())])),
        (b"payload", amp.BigBytes(optional=True)),
    ]
    errors = {Nacked: b"NACK"}


class Subscribe(amp.Command):
    """Receive, as ``Deliver`` calls, every message the app sends to ``address``."""

    arguments = [(b"address", amp.Unicode())]


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
        metadata={"gt": 0, "help": "seconds to wait for a Deliver answer when sending"},
    )


class _Peer(amp.AMP):
    """One connection to the AMGI-over-AMP server."""

    def __init__(self, transport: AmpTransport) -> None:
        super().__init__(max_concurrent_responders=transport.config.batch_size * 10)
        self.owner = transport
        self.subscriptions: set[str] = set()

    @Deliver.responder
    async def deliver(
        self, address: str, headers: list[dict[str, Any]], payload: bytes | None
    ) -> None:
        await self.owner._received(address, [(h["name"], h["value"]) for h in headers], payload)

    @Subscribe.responder
    def subscribe(self, address: str) -> None:
        self.subscriptions.add(address)
        self.owner._subscribers.setdefault(address, set()).add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
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
        self._peers: set[_Peer] = set()
        self._subscribers: dict[str, set[_Peer]] = {}
        self._ready: asyncio.Queue[Message] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._address_of: dict[str, str] = {}

    # ------------------------------------------------------------------ listener

    async def connect(self) -> None:
        self.check()
        if self.addresses:
            await self._listen()

    async def _listen(self) -> None:
        if self._server is not None:
            return

        def factory() -> _Peer:
            peer = _Peer(self)
            self._peers.add(peer)
            return peer

        try:
            self._server = await amp.serve(factory, self.config.host, self.config.port)
        except OSError as exc:
            raise BrokerUnavailable(
                f"amp: cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}"
            ) from None

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
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        message = Message(str(next(self._ids)), headers, payload, token=done)
        self._address_of[message.id] = address
        self._ready.put_nowait(message)
        try:
            await done
        finally:
            self._address_of.pop(message.id, None)

    async def fetch(self) -> Sequence[Batch]:
        await self._listen()
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

    async def _call(self, target: amp.AMP, values: dict[str, Any]) -> None:
        await target.call_remote(Deliver, timeout=self.config.call_timeout, **values)

    async def _client_connection(self) -> amp.AMP:
        if self._client is None or self._client.is_closed:
            try:
                self._client = await amp.connect(self.config.host, self.config.port)
            except OSError as exc:
                raise BrokerUnavailable(
                    f"amp: cannot connect to {self.config.host}:{self.config.port}: "
                    f"{exc.strerror or exc}"
                ) from None
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            await self._client.wait_closed()
            self._client = None
        if self._server is not None:
            self._server.close()
            peers = list(self._peers)
            for peer in peers:
                peer.close()
            for peer in peers:
                await peer.wait_closed()
            await self._server.wait_closed()
            self._server = None
        while not self._ready.empty():
            message = self._ready.get_nowait()
            if not message.token.done():
                message.token.cancel()
