"""The contract between the AMGI runtime and a protocol server ("transport").

A transport maps one broker onto five calls: ``connect``, ``fetch`` a batch, ``settle``
acks and nacks in bulk, ``publish``, and ``close``. Everything an application can observe
beyond the broker's own semantics (lifespan, the batch call, validation, retries and dead
letters policy, ordering, concurrency, shutdown, logging, metrics) belongs to the runtime
in :mod:`amgi.runtime` and is written once.

Rules every transport keeps:

* ``fetch`` waits until at least one message is on hand and returns batches; every
  batch has one address (the scope address) and, optionally, an ordering ``key``: the
  runtime never runs two batches with the same non-``None`` key at once and runs them in
  fetch order. ``fetch`` may be cancelled (at shutdown); messages it had taken must then
  stay unacknowledged on the broker (they come back by redelivery).
* ``settle`` is called once per batch, after the application's call ended, with every
  message of the batch in exactly one of ``acked``, ``retry`` or ``dead``. It acknowledges
  ``acked`` in as few broker round trips as the broker allows, schedules ``retry`` for
  redelivery after its delay (natively where possible, otherwise by republishing with the
  attempt header), and moves ``dead`` to the dead-letter destination with the reason.
  It must never acknowledge past a message that is neither acked nor safely retried or
  dead-lettered (e.g. Kafka commits only the highest contiguous settled offset). A
  transport that could not store a dead letter says so with :meth:`DeadLetter.not_stored`
  (and one that could not schedule a retry, with :meth:`Retry.not_scheduled`): the
  runtime's log line and metrics then tell what happened, not what was asked.
* ``publish`` raises the transport's :attr:`Transport.send_error` (a subclass of
  :class:`amgi.errors.SendError`, itself an ``OSError``) when the broker did not take it.
* ``connect`` raises :class:`amgi.errors.BrokerUnavailable` or
  :class:`amgi.errors.ConfigurationError` with a one-line message a user can act on.
* A transport module must be importable without its client library: import the client
  inside methods (and under ``TYPE_CHECKING`` for annotations) and list the modules it
  needs in :attr:`Transport.requires`.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from amgi.errors import ConfigurationError, SendError
from amgi.options import check as check_options

__all__ = [
    "Batch",
    "Bindings",
    "DeadLetter",
    "DeadLettersUnsupported",
    "Fate",
    "HeaderList",
    "Message",
    "Retry",
    "Settlement",
    "StoredDeadLetter",
    "Transport",
]

Bindings = dict[str, dict[str, Any]]
HeaderList = list[tuple[bytes, bytes]]


@dataclass(slots=True, eq=False)
class Message:
    """One message a transport fetched.

    ``id`` is unique within its batch and is what the application acks or nacks.
    ``attempt`` counts deliveries, starting at 1; the runtime shows it to the application
    as ``bindings["amgi"]["attempt"]``. ``token`` is the transport's own handle (offset,
    delivery tag, receipt handle, row id ...), opaque to the runtime.
    """

    id: str
    headers: HeaderList
    payload: bytes | None
    bindings: Bindings = field(default_factory=dict)
    attempt: int = 1
    token: Any = None


@dataclass(slots=True, eq=False)
class Batch:
    """Messages of one address that form one application call.

    ``key`` is the ordering key (Kafka partition, FIFO group ...): batches with the same
    non-``None`` key run one after another, in fetch order. ``context`` is the transport's
    own per-batch data (lease token, channel generation ...).
    """

    address: str
    messages: list[Message]
    key: Hashable | None = None
    context: Any = None


class Fate(enum.Enum):
    """What a transport did with a dead letter it was asked to store."""

    STORED = "stored"
    """The dead-letter destination took it."""
    KEPT = "kept"
    """Not stored: the message stays unacknowledged on the broker and comes back (by
    redelivery, or its dead letter is tried again in the background)."""
    LOST = "lost"
    """Not stored, and the broker cannot deliver the message again (core NATS, Redis
    pub/sub: at most once)."""


@dataclass(slots=True)
class DeadLetter:
    """A nacked message that used up its attempts, with the last nack reason.

    ``fate`` is set by the transport in ``settle``; ``None`` (a transport that does not
    tell) is reported as stored. ``error`` says why it was not stored.
    """

    message: Message
    reason: str
    fate: Fate | None = None
    error: str = ""

    def not_stored(self, error: object, *, lost: bool = False) -> None:
        """The dead letter was not stored: the message stays unacknowledged (or, with
        ``lost``, is gone)."""
        self.fate = Fate.LOST if lost else Fate.KEPT
        self.error = str(error)


@dataclass(slots=True)
class Retry:
    """A nacked message to deliver again after ``delay`` seconds.

    ``uncounted``: the application never had the message (its call ended first, or the
    stop came before it): a server that keeps the attempt count itself does not count
    this delivery.

    Set by the transport in ``settle`` when the retry could not be scheduled
    (:meth:`not_scheduled`): ``error`` says why, and ``dead`` is the dead letter it made
    of the message instead, if any (its ``fate`` tells whether it was stored); without
    one, the message stays unacknowledged and comes back.
    """

    message: Message
    reason: str
    delay: float
    uncounted: bool = False
    error: str = ""
    dead: DeadLetter | None = None

    def not_scheduled(self, error: object, dead: DeadLetter | None = None) -> None:
        """The retry could not be scheduled; ``dead``: dead-lettered instead."""
        self.error = str(error)
        self.dead = dead


@dataclass(slots=True)
class Settlement:
    """The outcome of one batch: every message is in exactly one of the three lists."""

    acked: list[Message] = field(default_factory=list)
    retry: list[Retry] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


@dataclass(slots=True)
class StoredDeadLetter:
    """A dead letter as the broker keeps it: what ``amgi dead-letters list`` shows.

    ``id`` is the transport's handle of the stored dead letter (row id, offset ...);
    ``address`` is the address it was consumed from, where a replay sends it back.
    """

    id: str
    address: str
    headers: HeaderList
    payload: bytes | None
    bindings: Bindings
    attempts: int
    reason: str
    dead_at: float | None = None
    """Seconds since the epoch when it was dead-lettered, if the broker records it."""


class DeadLettersUnsupported(ConfigurationError):
    """This server cannot list or replay its dead letters."""


class Transport(abc.ABC):
    """Base class of protocol servers; see the module docstring for the rules.

    Subclasses set :attr:`name` (the ``--server`` value), :attr:`options` (a dataclass
    whose fields become ``--kebab-case`` command-line flags; put a ``help`` string in each
    field's metadata and ``secret=True`` for values that must never be logged) and
    :attr:`send_error`, and are constructed as ``Transport(addresses, options)``.
    """

    name: ClassVar[str]
    options: ClassVar[type[Any]]
    send_error: ClassVar[type[SendError]] = SendError
    requires: ClassVar[tuple[str, ...]] = ()
    """Modules that must import for this server to be usable (its client library)."""
    extra: ClassVar[str] = ""
    """The pip extra that installs the client library, e.g. ``kafka``."""
    extensions: ClassVar[dict[str, dict[str, Any]]] = {}
    """Extensions advertised in every message scope."""
    lease_interval: float | None = None
    """When set, the runtime calls :meth:`extend` this often (with the batches in flight,
    or none)."""
    stable_ids: bool = False
    """A message redelivered after a crash keeps its :attr:`Message.id` (row id, offset,
    broker message id ...): the runtime's crash ledger can then recognise it. A server
    where it depends on the options (NATS, Redis: the mode) sets it per instance."""
    counts_deliveries: bool = False
    """The broker counts every delivery, crashes included, so :attr:`Message.attempt`
    rises when a consumer dies holding the message (sqlite, SQS, AMQP quorum queues,
    NATS JetStream, Redis Streams).
    A server where it depends on the options (AMQP: the queue type) sets it per instance."""
    at_most_once: bool = False
    """The broker delivers each message at most once (core NATS, Redis Pub/Sub): what a
    stop leaves unprocessed is lost, not sent again, and the runtime's log says so. A
    server where it depends on the options (NATS, Redis: the mode) sets it per instance."""
    close_needs: float = 0.0
    """Seconds :meth:`close` may take by the server's own settings (an HTTP listener's
    ``--close-timeout``): the runtime gives a close at least this, plus a second for what
    follows it, besides its own bound."""
    outlives_process: ClassVar[bool] = True
    """Messages survive the consuming process (false only for the in-memory broker)."""
    single_process_reason: ClassVar[str | None] = None
    """Why only one process can consume here (``amgi run --workers`` is refused), or
    ``None`` when several can consume together."""

    def ledger_namespace(self) -> str:
        """What names this message source in the crash ledger (ids are unique within it)."""
        return self.name

    def workers_refusal(self) -> str | None:
        """Why several processes cannot consume with these options (``amgi run --workers``
        is refused), or ``None``; the class's :attr:`single_process_reason` by default."""
        return self.single_process_reason

    def __init__(self, addresses: Sequence[str], options: Any) -> None:
        self.addresses = list(addresses)
        self.config = options

    def check(self) -> None:
        """Raise :class:`amgi.errors.ConfigurationError` if the options are bad.

        Called before lifespan startup (by the runtime and ``amgi run``) and at the start
        of :meth:`connect`. The default checks the options dataclass (types, choices,
        bounds, finite floats, its ``check_together``); a server may extend it with
        checks of :attr:`addresses`.
        """
        check_options(self.config)

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect and prepare to consume :attr:`addresses` (none when only sending)."""

    @abc.abstractmethod
    async def fetch(self) -> Sequence[Batch]:
        """Wait for messages and return them as one or more batches."""

    @abc.abstractmethod
    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        """Acknowledge, retry and dead-letter the messages of a finished batch."""

    @abc.abstractmethod
    async def publish(
        self,
        address: str,
        headers: HeaderList,
        payload: bytes | None,
        bindings: Bindings,
    ) -> None:
        """Publish one message; raise :attr:`send_error` if the broker did not take it."""

    def stop_fetching(self) -> None:  # noqa: B027
        """Called once when the runtime stops fetching (shutdown begins).

        Batches in flight still finish and settle after it. A push-style server (the
        sender waits for the answer) refuses new and queued deliveries from here on, so
        their senders learn at once to send again later.
        """

    async def hand_over(self) -> Sequence[Batch]:
        """Called once after :meth:`stop_fetching`: stop the broker's deliveries and return
        what it delivered to this process that :meth:`fetch` has not returned yet.

        The runtime runs these batches before it stops (within its shutdown timeout).
        Only a broker that counts a delivery handed back unprocessed as an attempt needs
        it (a quorum queue's ``x-delivery-count``): each stop would use up one attempt of
        every message prefetched, and enough stops would dead-letter innocent messages.
        Default: nothing (prefetched messages go back to the broker at :meth:`close`).
        """
        return ()

    async def extend(self, batches: Sequence[Batch]) -> None:  # noqa: B027
        """Keep the given in-flight batches from being redelivered (visibility, lease).

        Called every :attr:`lease_interval`, with no batch too: messages the transport
        took from the broker and has not handed out yet need the same lease."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop consuming and release the connection; unsettled messages stay unacked."""

    def backlog(self) -> dict[str, int] | None:
        """Messages waiting to be processed, per address, when the broker tells it cheaply.

        Called from the event loop when metrics are scraped: it must not block or do I/O
        (read it from what fetching brings, or keep it fresh in a task the server owns,
        e.g. :class:`amgi.servers.kit.Refreshed`). ``None`` (the default) means this
        server cannot tell.
        """
        return None

    # -- dead letters (optional): both methods are called after connect() ----------------

    async def list_dead_letters(self, address: str, limit: int) -> list[StoredDeadLetter]:
        """Up to ``limit`` dead letters of ``address``, oldest first, left in place."""
        raise DeadLettersUnsupported(f"the {self.name} server cannot list its dead letters")

    async def replay_dead_letters(self, address: str, limit: int) -> int:
        """Send up to ``limit`` dead letters of ``address`` back to it, oldest first.

        Each dead letter is removed only once the broker confirmed its send (a crash
        half-way leaves it in the dead letters, possibly also back in the queue: at least
        once). It comes back as a first attempt. Returns how many were replayed.
        """
        raise DeadLettersUnsupported(f"the {self.name} server cannot replay its dead letters")
