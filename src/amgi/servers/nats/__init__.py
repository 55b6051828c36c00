"""NATS server: JetStream durable pull consumers (at-least-once), or core NATS (at-most-once).

How AMGI maps onto JetStream (``--mode jetstream``, the default):

=================  ==================================================================
address            a subject (wildcards allowed), captured by a stream that must exist
                   (``--stream``, or the stream that captures the subject)
consume            a durable pull consumer per address (``--durable``; with several
                   addresses ``{durable}_{subject}``), filtered on the address,
                   explicit acks, no delivery limit (the runtime counts attempts);
                   an existing push consumer, or one with another ack policy, a
                   limit or a backoff is refused, at the start and when it is looked
                   at again while running
batch              one fetch of up to ``--batch-size`` messages (``--fetch-expiry``)
ordering key       the address
message id         the stream sequence (the same on every redelivery): the crash ledger
                   is kept, so a message that kills the process is dead-lettered alone
ack                one ``+ACK`` per message, published without waiting, flushed once
                   per batch; never AckAll (it would ack past a nacked message)
nack (retry)       ``-NAK`` with the retry delay; JetStream redelivers it
attempt            the delivery count in the message metadata
nack (dead)        published (ack awaited) to ``{subject}.dlq`` with the reason, attempt
                   and address headers, then ``+TERM``; refused for good (no stream
                   captures it, its stream has interest retention, too big): ``-NAK``
                   with an hour's delay, one error line; an interest stream found at
                   the start stops it; the stream found is remembered and asked
                   for alone (one request) at the next dead letter
lease              ``+WPI`` (in progress) for batches running or waiting for a slot
                   and for messages pulled that no batch took yet, every third of
                   the shortest ack wait (the consumers' own, read at the start, and
                   ``--ack-wait``); an ack_wait lowered below twice that while running
                   ends the run
send               JetStream publish, its ack awaited; headers as in ``_headers``;
                   binding ``msgId`` becomes ``Nats-Msg-Id`` (de-duplication)
bindings in        ``nats``: ``subject``, ``stream``, ``sequence`` (``msgId`` if set)
backlog (metrics)  the pending count in the last fetched message's ack subject
stop               no new pull request; the open ones are awaited (at most
                   ``--fetch-expiry``) and what arrived is processed before the stop ends;
                   what the shutdown timeout leaves unstarted is ``-NAK``ed at close
stream deleted     the run ends (one error line naming it)
permission refused one consuming needs (pull requests, acks, inboxes; the addresses
                   in core mode) ends the run, or the start (one error line naming it)
connection loss    nats-py reconnects by itself; acks of the lost connection are not
                   applied and JetStream redelivers after the ack wait
dead letters       read from the stream capturing the dead-letter subject (a stream
(CLI)              must, with limits or workqueue retention: otherwise none is
                   stored); replay: JetStream publish (ack awaited), then delete from
                   that stream
=================  ==================================================================

``--mode core``: addresses are subjects subscribed in queue group ``--queue``; a batch
is the messages on hand; acks do nothing; a nack is retried in memory, then
dead-lettered with a JetStream publish (stored only if a stream captures the subject).
A message published while no server listens, waiting for its retry when it stops, or
arriving while a slow app leaves too many waiting (dropped, counted in a warning), is
lost: core NATS delivers at most once. What arrived is processed before a stop ends.
``message.send`` is a core publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from amgi.errors import ConfigurationError, SendError
from amgi.servers.kit import (
    dead_letter_headers,
    invalid,
    mask_url,
    option,
    text_value,
    userinfo_problem,
)
from amgi.servers.nats._client import Refusals, Refused, open_connection
from amgi.servers.nats._core import Subscriptions
from amgi.servers.nats._dead_letter_streams import DeadLetterStreams
from amgi.servers.nats._dead_letters import DeadLetters, subject_matches
from amgi.servers.nats._headers import PLAIN_VALUE, encode, over_max_payload
from amgi.servers.nats._jetstream import Consumers
from amgi.transport import Batch, Bindings, HeaderList, Message, Settlement, Transport

__all__ = ["NatsOptions", "NatsSendError", "NatsTransport"]


_MSG_ID = re.compile("(?=.)" + PLAIN_VALUE.pattern)
_MSG_ID_RULE = "non-empty text without control characters or outer whitespace (a header value)"


_NOT_IN_SUBJECT = re.compile(r"[\x00-\x20\x7f]")
_NOT_IN_NAME = re.compile(r"[.*>/\\\s]")
"""What a JetStream stream or consumer name cannot hold."""


def _subject_problem(subject: str, *, wildcards: bool) -> str | None:
    """What makes ``subject`` unusable (None if nothing): NATS drops a message published
    to ``a..b`` or ``.a`` without a word, and ``*``/``>`` match subjects only when
    subscribing (``wildcards``)."""
    if not subject:
        return "it is empty"
    if _NOT_IN_SUBJECT.search(subject):
        return "it holds whitespace or a control character"
    tokens = subject.split(".")
    if "" in tokens:
        return "it has an empty token (a leading, trailing or doubled '.')"
    if not wildcards and ("*" in tokens or ">" in tokens):
        return "wildcards ('*', '>') match subjects when consuming; a send needs a whole subject"
    if wildcards and ">" in tokens[:-1]:
        return "'>' may only be its last token"
    return None


class NatsSendError(SendError):
    """NATS did not take a message (no stream for the subject, no ack, connection lost)."""


@dataclass(slots=True)
class NatsOptions:
    """Options of the NATS server."""

    servers: str = option("nats://127.0.0.1:4222", "server URLs, comma-separated")
    mode: Literal["jetstream", "core"] = option(
        "jetstream", "jetstream (durable consumers, at-least-once) or core (at-most-once)"
    )
    stream: str = option("", "JetStream stream (default: the one capturing the subject)")
    durable: str = option("amgi", "durable consumer name (JetStream)")
    queue: str = option("amgi", "queue group (core mode)")
    batch_size: int = option(500, "most messages per fetch", ge=1, le=100_000)
    fetch_expiry: float = option(1.0, "seconds one fetch waits for messages", gt=0, le=3600)
    ack_wait: float = option(30.0, "seconds before JetStream redelivers an unacked message", gt=0)
    max_ack_pending: int = option(20_000, "unacked messages a consumer may hold", ge=1)
    dead_letter_subject: str = option("{subject}.dlq", "subject of dead letters ({subject})")
    publish_timeout: float = option(10.0, "seconds to wait for a JetStream publish ack", gt=0)
    user: str = option("", "user name")
    password: str = option("", "password", secret=True)
    token: str = option("", "authentication token", secret=True)
    creds: str = option("", "path of a .creds file (JWT and nkey seed)")
    nkey_seed: str = option("", "path of an nkey seed file")
    tls: bool = option(False, "use TLS (implied by the TLS files)")
    tls_ca: str = option("", "CA file to verify the server")
    tls_cert: str = option("", "client certificate file")
    tls_key: str = option("", "client key file")
    connect_timeout: float = option(5.0, "seconds to reach a server", gt=0)

    def check_together(self) -> None:
        for server in self.servers.split(","):
            problem = userinfo_problem(server.strip())
            if problem:  # not through invalid(): --servers is shown, and may hold a password
                raise ConfigurationError(f"--servers {problem} (got {mask_url(server.strip())})")
        if not self.durable or _NOT_IN_NAME.search(self.durable):
            raise invalid(self, "durable", "must be a name without . * > / \\ or whitespace")
        if not self.queue or any(c.isspace() for c in self.queue):
            # Empty, core NATS would subscribe without a group: every process gets all.
            raise invalid(self, "queue", "must be a name without whitespace")
        if self.stream and _NOT_IN_NAME.search(self.stream):
            raise invalid(self, "stream", "must be a name without . * > / \\ or whitespace")
        if not self.dead_letter_subject:
            raise invalid(self, "dead_letter_subject", "must not be empty")
        # A dead letter goes to one whole subject: no empty token, wildcard or whitespace.
        problem = _subject_problem(
            self.dead_letter_subject.replace("{subject}", "s"), wildcards=False
        )
        if problem:
            raise invalid(self, "dead_letter_subject", f"is not a subject: {problem}")
        if self.password and not self.user:
            raise invalid(self, "password", "needs --user")
        if self.tls_key and not self.tls_cert:
            raise invalid(self, "tls_key", "needs --tls-cert")


class NatsTransport(DeadLetters, Transport):
    """The AMGI transport of NATS JetStream (and core NATS); lists and replays dead
    letters (:mod:`._dead_letters`)."""

    name = "nats"
    options = NatsOptions
    send_error = NatsSendError
    requires = ("nats",)
    extra = "nats"

    def __init__(self, addresses: Sequence[str], options: NatsOptions | None = None) -> None:
        super().__init__(addresses, options or NatsOptions())
        self.config: NatsOptions
        self._client: Any = None  # nats.aio.client.Client
        self._refusals: Refusals | None = None
        self._consumers: Consumers | None = None
        self._subscriptions: Subscriptions | None = None
        if self.config.mode == "jetstream" and addresses:
            self.lease_interval = self.config.ack_wait / 3
        self.at_most_once = self.config.mode == "core"
        self.counts_deliveries = self.config.mode == "jetstream"
        """JetStream's delivery count (the attempt) rises on every delivery."""
        # Transport declares it a ClassVar; here it depends on the mode.
        self.stable_ids = self.config.mode == "jetstream"
        """JetStream: the stream sequence comes again with every redelivery, so the crash
        ledger keeps a message that kills the process from taking the others it held
        along (core ids count this process's messages, and nothing comes again)."""

    def ledger_namespace(self) -> str:
        """The servers (no password), user and durable, and each address with its stream
        (found at the connection): a message id is a sequence of that stream, and which
        stream captures a wildcard address may change between runs."""
        c = self.config
        servers = ",".join(mask_url(s.strip()) for s in c.servers.split(","))
        if self._consumers is not None:
            streams = self._consumers.streams
        else:
            streams = [(address, c.stream) for address in self.addresses]
        read = " ".join(f"{address}@{stream}" for address, stream in sorted(streams))
        return f"nats {servers} user={c.user} durable={c.durable} {read}"

    def dead_letter_subject(self, subject: str) -> str:
        return self.config.dead_letter_subject.replace("{subject}", subject)

    def check(self) -> None:
        super().check()
        for address in self.addresses:
            problem = _subject_problem(address, wildcards=True)
            if problem:
                raise ConfigurationError(f"nats: {address!r} is not a subject: {problem}")
            # The address's own wildcards stand in for the subject: "a.>" makes "a.>.dlq".
            if subject_matches(self.dead_letter_subject(address), address):
                raise ConfigurationError(
                    f"nats: the dead letters of {address!r} would match it again; "
                    "set --dead-letter-subject, e.g. dlq.{subject}"
                )

    # -- lifecycle ------------------------------------------------------------------------

    async def connect(self) -> None:
        self.check()
        if self.config.mode == "jetstream":  # the pull requests, the acks, the inboxes
            refusals = Refusals(publish=("$JS.API.", "$JS.ACK."), subscribe=("_INBOX.",))
        else:  # the addresses alone: dead letters and sends fail alone
            refusals = Refusals(subscribe=tuple(self.addresses))
        self._client = await open_connection(self.config, refusals)
        self._refusals = refusals
        try:
            if not self.addresses:
                return
            # A request refused a permission gets no answer: stop at the refusal.
            await refusals.unless_refused(self._start(refusals))
        except Exception:
            await self.close()
            # A request refused a permission times out: the refusal is the clearer line.
            refusals.check()
            raise
        except BaseException:
            await self.close()
            raise

    async def _start(self, refusals: Refusals) -> None:
        await self.check_dead_letter_streams(refusals)
        streams = DeadLetterStreams(self._client, self.config.publish_timeout)
        if self.config.mode == "jetstream":
            consumers = Consumers(self._client, self.addresses, self.config, streams, refusals)
            self._consumers = consumers
            await consumers.start()
            # Existing consumers keep their own ack_wait: the lease follows the shortest.
            self.lease_interval = consumers.lease_interval
        else:
            subscriptions = Subscriptions(
                self._client, self.addresses, self.config, streams, refusals
            )
            self._subscriptions = subscriptions
            await subscriptions.start()

    async def close(self) -> None:
        consumers, self._consumers = self._consumers, None
        subscriptions, self._subscriptions = self._subscriptions, None
        client, self._client = self._client, None
        if consumers is not None:
            await consumers.stop()
        if subscriptions is not None:
            await subscriptions.stop()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.flush(self.config.connect_timeout)
            with contextlib.suppress(Exception):
                await client.close()

    # -- consuming ------------------------------------------------------------------------

    async def fetch(self) -> Sequence[Batch]:
        client = self._client
        if client is not None and client.is_closed:
            # nats-py closes the client for good on a server error it does not know (e.g.
            # 'maximum subscriptions exceeded'): fetching again would fail for ever.
            raise ConfigurationError(
                "nats: the server closed the connection for good "
                f"({client.last_error or 'no reason given'}); nats-py does not reconnect"
            )
        if self._consumers is not None:
            return await self._consumers.read()
        if self._subscriptions is not None:
            return await self._subscriptions.read()
        await asyncio.Event().wait()  # nothing to consume: wait until cancelled
        return []

    async def hand_over(self) -> Sequence[Batch]:
        """JetStream: wait for the open pull requests to end (at most ``--fetch-expiry``)
        and return the messages that arrived but were not fetched, for the runtime to
        process before it stops; given back, each would come again with its delivery
        count (the attempt) raised by one. Core: unsubscribe and return what arrived
        (it would be lost)."""
        if self._subscriptions is not None:
            return await self._subscriptions.hand_over()
        if self._consumers is None:
            return []
        return await self._consumers.hand_over()

    def _dead(self, message: Message, address: str, reason: str) -> tuple[Message, str, Any]:
        subject = message.bindings.get("nats", {}).get("subject", address)
        headers = dead_letter_headers(
            message.headers, attempt=message.attempt, address=subject, reason=reason
        )
        return message, self.dead_letter_subject(subject), encode(headers, republish=True)

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        dead = [self._dead(d.message, batch.address, d.reason) for d in settlement.dead]
        if self._consumers is not None:
            await self._consumers.settle(settlement, dead, batch.address)
        elif self._subscriptions is not None:
            await self._subscriptions.settle(settlement, dead, batch.address)

    def backlog(self) -> dict[str, int] | None:
        """Per subject, the consumer's pending count carried by the last message fetched
        (JetStream mode; free: it is in every message's ack subject)."""
        return dict(self._consumers.backlog) if self._consumers is not None else None

    async def extend(self, batches: Sequence[Batch]) -> None:
        if self._consumers is not None:
            await self._consumers.touch([m for b in batches for m in b.messages])

    # -- sending --------------------------------------------------------------------------

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        from nats import errors as nats_errors
        from nats.js import errors as js_errors

        problem = _subject_problem(address, wildcards=False)
        if problem:
            raise NatsSendError(f"nats: cannot send to {address!r}: not a subject: {problem}")
        client = self._client
        if client is None:
            raise NatsSendError("nats: the server is not connected")
        msg_id = (bindings.get("nats") or {}).get("msgId")
        if msg_id is not None:
            try:
                text_value("nats", "msgId", msg_id, pattern=_MSG_ID, rule=_MSG_ID_RULE)
            except ValueError as exc:
                raise NatsSendError(f"nats: cannot send to {address!r}: {exc}") from None
        header = encode(headers, msg_id)
        too_big = over_max_payload(client.max_payload, payload or b"", header)
        if too_big:
            raise NatsSendError(f"nats: cannot send to {address!r}: {too_big}")
        try:
            if self.config.mode == "core":
                await client.publish(address, payload or b"", headers=header or None)
                return
            sending = client.jetstream().publish(
                address, payload or b"", timeout=self.config.publish_timeout, headers=header or None
            )
            refusals = self._refusals
            await (sending if refusals is None else refusals.publishing(address, sending))
        except Refused as exc:
            raise NatsSendError(f"nats: the server refused sending to {address!r}: {exc}") from None
        except (nats_errors.NoRespondersError, js_errors.NoStreamResponseError):
            raise NatsSendError(f"nats: no JetStream stream captures subject {address!r}") from None
        except js_errors.APIError as exc:
            raise NatsSendError(
                f"nats: the stream refused the message for {address!r}: {exc.description or exc}"
            ) from None
        except (nats_errors.Error, OSError, TimeoutError) as exc:
            raise NatsSendError(
                f"nats: could not send to {address!r}: {exc or type(exc).__name__}"
            ) from None
