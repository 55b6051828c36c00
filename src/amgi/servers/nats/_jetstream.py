"""JetStream machinery of the NATS server: durable pull consumers, fetch, settle."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.servers.kit import Uncounted
from amgi.servers.nats._client import Refusals, Refused, flush
from amgi.servers.nats._dead_letter_streams import DeadLetterStreams
from amgi.servers.nats._dead_letters import KEEP_FIX, Unkept
from amgi.servers.nats._headers import decode, over_max_payload
from amgi.servers.nats._pull import Puller
from amgi.transport import Batch, Message

if TYPE_CHECKING:
    from amgi.servers.nats import NatsOptions

__all__ = ["Consumers"]

logger = logging.getLogger("amgi.servers.nats")

_NAME_UNSAFE = re.compile(r"[.*>\s/\\]")

_REFUSED_DELAY = 3600.0
"""Seconds before a message whose dead letter the broker refused for good comes back (at
least the consumer's ack_wait): each try would fail the same way until someone raises
the limit."""


_RECHECK = 5.0
"""Seconds between two looks at the consumers' configs while running (and at once after a
reconnect): an operator may give a consumer in use a delivery limit or a backoff (``nats
consumer edit``), and JetStream announces no edit."""

_STREAM_NOT_FOUND = 10059
"""JetStream's error code of a request naming a stream that does not exist."""

_MAX_DELIVERIES = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}"
"""What JetStream publishes when it stops delivering a message at the consumer's limit."""


class _Refused(Exception):
    """A dead letter the broker will never store as it is (over a size limit, or another
    request it refuses as bad: 400; or no stream captures its subject, or one that would
    not keep it)."""

    def __init__(self, text: str, fix: str = "raise the limit, or take it out of the stream"):
        super().__init__(text)
        self.fix = fix


class Consumers:
    """One durable pull consumer per subject, read one fetch at a time."""

    def __init__(
        self,
        client: Any,
        subjects: Sequence[str],
        options: NatsOptions,
        dead_letter_streams: DeadLetterStreams,
        refusals: Refusals,
    ) -> None:
        self.client = client
        self.dead_letter_streams = dead_letter_streams
        self.refusals = refusals
        self._uncounted = Uncounted()
        """Deliveries JetStream counted that were no attempt (:class:`Uncounted`)."""
        self.js = client.jetstream(timeout=options.publish_timeout)
        self.jsm = client.jsm(timeout=options.publish_timeout)
        """JetStream's API, each request bounded by ``--publish-timeout`` (not nats-py's 5 s)."""
        self.subjects = list(subjects)
        self.options = options
        self._subjects_by_index: list[str] = []
        self._puller = Puller(
            client, options.batch_size, options.fetch_expiry, self._unanswered, self._recheck
        )
        refusals.wake = self._puller.wake
        self._configs: list[tuple[str, Any]] = []
        self.ack_waits: list[float] = []
        """Per consumer, its ack_wait as last read (an existing one keeps its own)."""
        self.lease_interval = options.ack_wait / 3
        """Seconds between two leases (``+WPI``), set at the start: a third of the shortest
        ack_wait of the consumers and ``--ack-wait``. The runtime's lease keeps it."""
        self._advisories: list[Any] = []
        self._stranded: list[str] = []
        """Messages JetStream stopped delivering at a delivery limit (from its advisories)."""
        self._next_check = 0.0
        self._reconnects = 0
        self.backlog: dict[str, int] = {}
        """Per subject, the consumer's pending count carried by the last message fetched."""
        self._held: dict[int, Any] = {}
        """The messages handed to the runtime and not settled yet, by ``id()``: those the
        runtime never started (the shutdown timeout, a run that ends) go back at the
        stop, not after the ack wait."""
        self._stale_flushes: set[asyncio.Task[None]] = set()
        """Flushes a reconnect (or a cancel) cut off (see :meth:`_flush`), left to end by
        their timeout."""

    @property
    def streams(self) -> list[tuple[str, str]]:
        """``(subject, stream)`` of each consumer started."""
        pairs = zip(self._subjects_by_index, self._configs, strict=True)
        return [(subject, stream) for subject, (stream, _) in pairs]

    async def durable_name(self, jsm: Any, stream: str, subject: str) -> str:
        """``--durable`` itself, unless it filters another subject: then ``{durable}_{subject}``
        (``.``, ``*``, ``>`` and whitespace as ``_``), and when that one filters another
        subject too (``a.b`` and ``a_b`` meet there), ``{durable}_{subject}_{hash}``."""
        from nats.js import errors as js_errors

        durable = self.options.durable
        named = f"{durable}_{_NAME_UNSAFE.sub('_', subject)}"
        digest = hashlib.sha256(subject.encode()).hexdigest()[:8]
        names = [durable] if len(self.subjects) == 1 else []
        for name in [*names, named]:
            try:
                info = await jsm.consumer_info(stream, name)
            except js_errors.NotFoundError:
                return name
            if info.config.filter_subject in (None, "", subject):
                return name
        return f"{named}_{digest}"

    async def start(self) -> None:
        for subject in self.subjects:
            try:
                await self._start_one(subject)
            except TimeoutError:  # (nats-py's own is one too)
                raise BrokerUnavailable(
                    f"nats: JetStream did not answer within --publish-timeout "
                    f"{self.options.publish_timeout:g}s while setting up the consumer of "
                    f"{subject!r}; is JetStream up (its meta leader elected)?"
                ) from None
        o = self.options
        self.lease_interval = min(o.ack_wait, *self.ack_waits) / 3
        for (stream, config), ack_wait in zip(self._configs, self.ack_waits, strict=True):
            if ack_wait != o.ack_wait:
                self._own_ack_wait(stream, config.durable_name, ack_wait)
        await self._puller.start()
        self._reconnects = self.client.stats["reconnects"]
        self._next_check = asyncio.get_running_loop().time() + _RECHECK

    async def _start_one(self, subject: str) -> None:
        """Find the stream of ``subject``, make or check its consumer, and listen for its
        delivery-limit advisories."""
        from nats.js import api
        from nats.js import errors as js_errors

        o = self.options
        jsm = self.jsm
        try:
            if o.stream:
                await jsm.stream_info(o.stream)
                stream = o.stream
            else:
                stream = await jsm.find_stream_name_by_subject(subject)
        except js_errors.NotFoundError:
            if o.stream:
                raise ConfigurationError(f"nats: stream {o.stream!r} does not exist") from None
            raise ConfigurationError(
                f"nats: no JetStream stream captures subject {subject!r} "
                "(create one or pass --stream)"
            ) from None
        except js_errors.ServiceUnavailableError:
            raise ConfigurationError("nats: JetStream is not enabled on the server") from None
        name = await self.durable_name(jsm, stream, subject)
        config = api.ConsumerConfig(
            durable_name=name,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=o.ack_wait,
            max_deliver=-1,
            max_ack_pending=o.max_ack_pending,
            filter_subject=subject,
        )
        try:
            _, ack_wait = await self._ensure_consumer(stream, config)
        except js_errors.APIError as exc:
            raise ConfigurationError(
                f"nats: cannot create consumer {name!r} on {stream!r}: {exc.description or exc}"
            ) from None
        self._puller.add(stream, name)
        self._subjects_by_index.append(subject)
        self._configs.append((stream, config))
        self.ack_waits.append(ack_wait)
        advisory = _MAX_DELIVERIES.format(stream, name)
        self._advisories.append(await self.client.subscribe(advisory, cb=self._on_stranded))

    def _own_ack_wait(self, stream: str, name: str, ack_wait: float) -> None:
        logger.info(
            "consumer %r of stream %r has ack_wait %gs, not --ack-wait %gs (which only a "
            "consumer the server creates takes): JetStream redelivers its unacked messages "
            "after %gs, a dead letter that could not be stored comes back then, and the "
            "lease (+WPI) comes every %.3gs",
            name,
            stream,
            ack_wait,
            self.options.ack_wait,
            ack_wait,
            self.lease_interval,
        )

    async def _ensure_consumer(self, stream: str, config: Any) -> tuple[bool, float]:
        """Create the consumer if it is missing (an existing one is used as it is, if it
        is a pull consumer: a push consumer answers no pull request; if it takes explicit
        acks: ``none`` acks on delivery, ``all`` acks past a nack; if it has no backoff:
        it would redeliver a message still being processed; and if it has no delivery
        limit: JetStream drops a message from delivery at ``max_deliver``). Whether it
        was created, and its ack_wait in seconds."""
        from nats.js import api
        from nats.js import errors as js_errors

        jsm = self.jsm
        try:
            info = await jsm.consumer_info(stream, config.durable_name)
        except js_errors.NotFoundError:
            await jsm.add_consumer(stream, config)
            return True, config.ack_wait
        if info.config.deliver_subject:
            # It answers each pull request with 409 and pushes the messages to that
            # subject, to whoever listens there: the run would consume nothing, for ever.
            raise ConfigurationError(
                f"nats: consumer {config.durable_name!r} of stream {stream!r} is a push "
                f"consumer (it delivers to {info.config.deliver_subject!r}) and the server "
                "pulls; delete it or pick another --durable"
            )
        policy = info.config.ack_policy
        if policy is not None and policy != api.AckPolicy.EXPLICIT:
            raise ConfigurationError(
                f"nats: consumer {config.durable_name!r} of stream {stream!r} acks "
                f"{api.AckPolicy(policy).value!r}, not 'explicit' (a message would count as "
                "acked before the app acked it); delete it or pick another --durable"
            )
        backoff = info.config.backoff
        if backoff:
            # JetStream redelivers an unacked message after backoff[delivery - 1] instead
            # of its ack_wait (the lease, +WPI, comes every --ack-wait / 3), and a backoff
            # needs a delivery limit; our -NAK delays time the retries already.
            shown = ", ".join(f"{b:g}s" for b in backoff)
            raise ConfigurationError(
                f"nats: consumer {config.durable_name!r} of stream {stream!r} has backoff "
                f"[{shown}]: JetStream would redeliver a message still being processed after "
                "those delays (raising its attempt) and stop at its delivery limit "
                "(max_deliver); the server times retries itself: remove the backoff and set "
                "max_deliver to -1, or pick another --durable"
            )
        limit = info.config.max_deliver
        if limit is not None and limit > 0:
            # JetStream stops delivering a message after max_deliver deliveries without a
            # word to the client: one the runtime had not dead-lettered by then (a lower
            # --max-attempts, a dead letter that could not be stored and came back, a stop
            # or crash that raised its count) stays in the stream, never processed again.
            raise ConfigurationError(
                f"nats: consumer {config.durable_name!r} of stream {stream!r} has "
                f"max_deliver {limit}: JetStream stops delivering a message after {limit} "
                "deliveries, and one not dead-lettered by then (--max-attempts, or a dead "
                "letter that could not be stored) would stay stuck; set its max_deliver to "
                "-1 (unlimited) or pick another --durable"
            )
        ack_wait = info.config.ack_wait
        return False, config.ack_wait if ack_wait is None else float(ack_wait)

    async def _unanswered(self, index: int) -> None:
        """A pull request got no answer at all: a deleted consumer is created again, a
        deleted stream ends the run. Its ack_wait is taken as it is now, unless the lease
        set at the start comes too rarely for it (less than twice per ack wait): that
        ends the run too."""
        from nats.js import errors as js_errors

        stream, config = self._configs[index]
        try:
            created, ack_wait = await self._ensure_consumer(stream, config)
        except js_errors.NotFoundError as exc:
            if exc.err_code != _STREAM_NOT_FOUND:
                raise
            # Retried, every fetch would fail the same way until someone creates it again
            # (and with no --stream, another stream may capture the subject by then).
            raise ConfigurationError(
                f"nats: stream {stream!r}, which held subject "
                f"{self._subjects_by_index[index]!r}, was deleted while the server ran (the "
                "messages it held are gone); create a stream capturing the subject and start "
                "the server again"
            ) from None
        if created:
            logger.warning(
                "consumer %r of stream %r was gone; created it again", config.durable_name, stream
            )
        if ack_wait == self.ack_waits[index]:
            return
        if ack_wait < 2 * self.lease_interval:
            raise ConfigurationError(
                f"nats: consumer {config.durable_name!r} of stream {stream!r} was given "
                f"ack_wait {ack_wait:g}s while the server ran: the lease (+WPI) set at the "
                f"start comes every {self.lease_interval:.3g}s, too rarely for it (JetStream "
                "would deliver a message again while the app holds it, its attempt raised); "
                "start the server again (it reads ack_wait at the start) or set its ack_wait "
                f"to {2 * self.lease_interval:.3g}s or more"
            )
        self.ack_waits[index] = ack_wait
        if ack_wait != self.options.ack_wait:
            self._own_ack_wait(stream, config.durable_name, ack_wait)

    async def _on_stranded(self, msg: Any) -> None:
        """JetStream's advisory: it stopped delivering a message at the delivery limit."""
        try:
            event = json.loads(msg.data)
        except ValueError:
            event = {}
        *_, stream, consumer = msg.subject.split(".")
        self._stranded.append(
            f"message {event.get('stream_seq', '?')} of stream {stream!r} after "
            f"{event.get('deliveries', '?')} deliveries to consumer {consumer!r}"
        )
        self._puller.wake()

    async def _recheck(self) -> None:
        """Stop at a permission refused (:class:`Refusals`) and at a message JetStream
        stranded; every ``_RECHECK`` seconds (and after a
        reconnect) look at the consumers again, as at the start."""
        self.refusals.check()
        if self._stranded:
            raise ConfigurationError(
                f"nats: JetStream stopped delivering {self._stranded[0]}"
                + (f" (and {len(self._stranded) - 1} more)" if len(self._stranded) > 1 else "")
                + ": the consumer was given a delivery limit (max_deliver) while the server "
                "ran; the message is still in the stream but the consumer never delivers it "
                "again: set its max_deliver to -1 and publish the message again (nats stream "
                "get), or delete the consumer to start it over"
            )
        now = asyncio.get_running_loop().time()
        reconnects = self.client.stats["reconnects"]
        if now < self._next_check and reconnects == self._reconnects:
            return
        self._next_check, self._reconnects = now + _RECHECK, reconnects
        results = await asyncio.gather(
            *(self._unanswered(index) for index in range(len(self._configs))),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, ConfigurationError):
                raise result
            # Any other failure (no answer, connection lost): looked at again next time.

    async def stop(self) -> None:
        stale, self._stale_flushes = self._stale_flushes, set()
        for task in stale:
            task.cancel()
        await asyncio.gather(*stale, return_exceptions=True)
        advisories, self._advisories = self._advisories, []
        for sub in advisories:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self._puller.stop()
        held, self._held = self._held, {}
        for msg in held.values():  # never started: handed back now, not after the ack wait
            with contextlib.suppress(Exception):
                await msg.nak()

    async def read(self) -> list[Batch]:
        return [self._batch(*await self._puller.take())]

    async def hand_over(self) -> list[Batch]:
        """At the stop: no more pull requests; what arrived, for the runtime to process."""
        return [self._batch(index, msgs) for index, msgs in await self._puller.hand_over()]

    def _batch(self, index: int, msgs: list[Any]) -> Batch:
        subject = self._subjects_by_index[index]
        if msgs:
            self.backlog[subject] = int(_ack_fields(msgs[-1].reply)[6])
        self._held.update((id(msg), msg) for msg in msgs)
        messages = [_message(m) for m in msgs]
        for m in messages:
            self._uncounted.correct(m)
        return Batch(subject, messages, key=subject)

    async def settle(
        self, settlement: Any, dead: list[tuple[Message, str, dict[str, str]]], subject: str
    ) -> None:
        held = self._held
        reconnects = self.client.stats["reconnects"]
        uncounted = self._uncounted
        uncounted.release(r.message.id for r in settlement.retry if r.uncounted)
        uncounted.forget(m.id for m in settlement.acked)
        for m in settlement.acked:
            held.pop(id(m.token), None)
            await m.token.ack()
        for r in settlement.retry:
            held.pop(id(r.message.token), None)
            await r.message.token.nak(delay=r.delay)
        for d in settlement.dead:
            held.pop(id(d.message.token), None)
        if dead:
            ack_wait = self.ack_waits[self._subjects_by_index.index(subject)]
            streams = self.dead_letter_streams
            unfit = await streams.check(s for _, s, _ in dead)
            results = await asyncio.gather(
                *(
                    self._dead_letter(subject, m.payload or b"", h, unfit[subject])
                    for m, subject, h in dead
                ),
                return_exceptions=True,
            )
            results = await self._no_stream(dead, results)
            for d, (m, subject, _), result in zip(settlement.dead, dead, results, strict=True):
                if isinstance(result, BaseException):
                    streams.forget(subject)
                    d.not_stored(result)
                if isinstance(result, _Refused):
                    delay = max(_REFUSED_DELAY, ack_wait)
                    where = m.bindings["nats"]
                    logger.error(
                        "message %s cannot be dead-lettered to %r: %s; it stays unacknowledged "
                        "in stream %r (sequence %s) and is tried again in %gs (%s)",
                        m.id,
                        subject,
                        result,
                        where["stream"],
                        where["sequence"],
                        delay,
                        result.fix,
                    )
                    await m.token.nak(delay=delay)
                elif isinstance(result, BaseException):
                    logger.error(
                        "could not dead-letter message %s to %r (%s); it comes back later",
                        m.id,
                        subject,
                        result,
                    )
                    await m.token.nak(delay=ack_wait)
                else:
                    uncounted.forget([m.id])
                    await m.token.term()
        # Cut off by a reconnect, the acks went with the old connection or not; either
        # way JetStream redelivers what it did not get, and the next batches go on.
        await self._flush(reconnects)

    async def _no_stream(
        self, dead: list[tuple[Message, str, dict[str, str]]], results: list[Any]
    ) -> list[Any]:
        """``results`` with each publish that found no stream made :class:`_Refused` when
        no stream captures its subject (one look-up per subject): until someone creates
        one, every try fails the same way. A stream found after all (its leader away, say)
        leaves the failure as it is: it passes."""
        from nats import errors as nats_errors
        from nats.js import errors as js_errors

        unanswered = (nats_errors.NoRespondersError, js_errors.NoStreamResponseError)
        subjects = {
            s for (_, s, _), r in zip(dead, results, strict=True) if isinstance(r, unanswered)
        }
        missing = set()
        jsm = self.client.jsm(timeout=self.options.publish_timeout)
        for subject in subjects:
            try:
                await jsm.find_stream_name_by_subject(subject)
            except js_errors.NotFoundError:
                missing.add(subject)
            except (nats_errors.Error, OSError, TimeoutError):
                pass  # not known: it may pass
        return [
            _Refused(
                "no JetStream stream captures it",
                fix="create a stream capturing the subject, or widen a stream's subjects",
            )
            if s in missing and isinstance(r, unanswered)
            else r
            for (_, s, _), r in zip(dead, results, strict=True)
        ]

    async def _dead_letter(
        self, subject: str, payload: bytes, headers: dict[str, str], unfit: BaseException | None
    ) -> None:
        """Publish it, unless ``unfit`` (its stream would not keep it, or that look-up
        failed: never published blind, as the original is terminated after)."""
        from nats.js import errors as js_errors

        if isinstance(unfit, Unkept):
            raise _Refused(str(unfit), fix=KEEP_FIX)
        if unfit is not None:
            raise unfit
        too_big = over_max_payload(self.client.max_payload, payload, headers)
        if too_big:  # published, the server would close the connection
            raise _Refused(too_big)
        try:
            publishing = self.js.publish(subject, payload, headers=headers)
            await self.refusals.publishing(subject, publishing)
        except Refused as exc:  # the same every time, until someone changes the permissions
            raise _Refused(
                f"the server refused it ({exc})",
                fix="allow the user to publish to the dead-letter subject",
            ) from None
        except js_errors.APIError as exc:
            # 400: refused for what it is (e.g. over the stream's max_msg_size), not for
            # the stream's state (full: 503) or a missing stream; the same every time.
            if exc.code == 400:
                raise _Refused(f"the stream refused it: {exc.description or exc}") from None
            raise

    async def touch(self, messages: list[Message]) -> None:
        """``+WPI`` for each of ``messages`` and each message pulled that no batch took
        yet: JetStream's ack wait runs from the delivery, and while every slot is busy
        those wait in the inbox (they were delivered again, their attempt raised, before
        the app ever had them; so do they while the fetch backs off after a failure).
        One flush for all, none when there is nothing to lease. A message already settled
        (its batch still settling, or settled since the runtime listed it) is left out:
        a ``+WPI`` after a ``-NAK`` with a delay makes JetStream redeliver it after the
        ack wait instead of that delay."""
        held = [*(m.token for m in messages), *self._puller.waiting()]
        for _ in range(2):  # sent again once should a reconnect cut the first off
            reconnects = self.client.stats["reconnects"]
            touched = False
            for msg in held:
                if not msg.is_acked:  # (checked as each goes: a settle may run between)
                    await msg.in_progress()
                    touched = True
            if not touched or await self._flush(reconnects):
                return

    async def _flush(self, reconnects: int) -> bool:
        """Wait until what was sent since the client's reconnect count was ``reconnects``
        reached the server (``flush``, at most the ack wait): True; False as soon as a
        reconnect is seen instead, as what was sent may have gone with the old connection.

        nats-py forgets a flush's ``PONG`` across a reconnect, and such a flush would wait
        out its whole timeout: a lease's held the next lease back for the ack wait, by
        which time JetStream had redelivered the messages it was to keep (measured through
        a relay that drops the connection). That flush is left to end by its timeout: cut
        off, its ``PING`` answered on the new connection would find its future cancelled,
        which breaks nats-py's reading loop."""
        client = self.client
        flushing = asyncio.ensure_future(flush(client, self.options.ack_wait))
        try:
            while True:
                done, _ = await asyncio.wait({flushing}, timeout=_RECONNECT_LOOK)
                if done:
                    flushing.result()
                    return bool(client.stats["reconnects"] == reconnects)
                if client.stats["reconnects"] != reconnects:
                    self._leave(flushing)
                    return False
        except asyncio.CancelledError:
            if not flushing.done():  # (this wait was cancelled: the flush is left, owned)
                self._leave(flushing)
            raise

    def _leave(self, flushing: asyncio.Task[None]) -> None:
        """Leave ``flushing`` to end by its own timeout (owned: cancelled at the stop)."""
        self._stale_flushes.add(flushing)
        flushing.add_done_callback(self._stale_done)

    def _stale_done(self, task: asyncio.Task[None]) -> None:
        self._stale_flushes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("a flush cut off by a reconnect ended: %r", task.exception())


_RECONNECT_LOOK = 0.1
"""Seconds between two looks, while a flush waits, at whether the client reconnected."""


def _ack_fields(reply: str) -> list[str]:
    """``[stream, consumer, delivered, stream seq, consumer seq, time, pending]`` of a
    JetStream ack subject."""
    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>,
    # or with <domain>.<account hash> after ACK and a token at the end (nats-server 2.9+).
    tokens = reply.split(".")
    at = 2 if len(tokens) == 9 else 4
    return tokens[at : at + 7]


def _message(msg: Any) -> Message:
    stream, _, delivered_text, seq_text, *_ = _ack_fields(msg.reply)
    delivered = int(delivered_text)
    seq = int(seq_text)
    headers, msg_id = decode(msg.headers)
    binding: dict[str, Any] = {"subject": msg.subject, "stream": stream, "sequence": seq}
    if msg_id is not None:
        binding["msgId"] = msg_id
    return Message(str(seq), headers, msg.data, {"nats": binding}, delivered, msg)
