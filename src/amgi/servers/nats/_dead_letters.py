"""Dead letters of the NATS server: the JetStream stream capturing ``--dead-letter-subject``.

A dead letter is published to ``{subject}.dlq`` with a JetStream publish whose ack the
server awaits; only then is the original terminated. So dead letters live in whichever
stream captures that subject (the test setup's ``amgi-test.>`` stream holds both), and
when no stream does, no dead letter is ever stored or lost: each stays unacknowledged on
its own subject and comes back after an hour, with an error line per try. The same holds
for a stream whose retention would not keep it (:func:`dead_letter_stream`), and such a
stream found at the start stops it.

``list`` and replay read that stream through a short-lived ephemeral consumer filtered on
the dead-letter subject (no acks, or on a work queue explicit acks never sent: nothing
changes; it is deleted at the end and expires by itself if the process dies). A replay
publishes each message back to the subject it was consumed from (JetStream publish, ack
awaited), then deletes exactly the confirmed ones from the stream: a replay killed
between the two leaves those in both places (at least once). Messages stored after the
command started are left for the next run, so a replay always ends. Where several
subjects share one dead-letter subject, an address sees only its own dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

from amgi.errors import BrokerUnavailable, ConfigurationError, SendError
from amgi.servers.kit import ChunkedDeadLetters, DeadLetterChunk, stored_dead_letter
from amgi.servers.nats._client import Refusals, Refused
from amgi.servers.nats._headers import decode, encode
from amgi.transport import StoredDeadLetter

if TYPE_CHECKING:
    from amgi.servers.nats import NatsOptions

__all__ = [
    "KEEP_FIX",
    "DeadLetters",
    "Unkept",
    "dead_letter_stream",
    "keeping",
    "subject_matches",
]

logger = logging.getLogger("amgi.servers.nats")

_CHUNK = 100
"""Messages fetched (and replayed) at a time."""
_STALLS = 5
"""Fetches in a row that may bring nothing while the consumer still reports messages."""
_KEEPING = ("limits", "workqueue")
"""Retentions that keep a message no consumer wants: until a limit drops it, until acked."""
_ACK_WAIT = 3600.0
"""Seconds a work-queue listing consumer holds what it read (it never acks)."""

KEEP_FIX = "give the dead-letter subject a stream with limits or workqueue retention"


class Unkept(Exception):
    """The stream capturing a dead-letter subject would not keep a dead letter."""


async def dead_letter_stream(jsm: Any, subject: str) -> tuple[str, str] | None:
    """The stream capturing dead-letter ``subject`` and its retention (None: no stream
    does). :class:`Unkept` when that retention would not keep a dead letter: with
    interest retention JetStream acks the publish, then drops the message unless a
    consumer's filter covers it, and the original was terminated by then."""
    from nats.js import errors as js_errors

    try:
        stream = await jsm.find_stream_name_by_subject(subject)
    except js_errors.NotFoundError:
        return None
    return stream, keeping(stream, await jsm.stream_info(stream))


def keeping(stream: str, info: Any) -> str:
    """The retention of ``stream`` (its nats-py ``StreamInfo``), :class:`Unkept` when it
    would not keep a dead letter."""
    found = info.config.retention or "limits"
    retention = str(getattr(found, "value", found))  # nats-py leaves it a str
    if retention not in _KEEPING:
        raise Unkept(
            f"stream {stream!r} has {retention} retention: it keeps a message only while "
            "a consumer is interested in it"
        )
    return retention


class DeadLetters(ChunkedDeadLetters):
    """The transport's ``list_dead_letters`` and ``replay_dead_letters`` on JetStream."""

    config: NatsOptions
    addresses: list[str]
    _client: Any
    send_error: ClassVar[type[SendError]]

    def dead_letter_subject(self, subject: str) -> str:
        raise NotImplementedError  # pragma: no cover - the transport's

    async def check_dead_letter_streams(self, refusals: Refusals) -> None:
        """At the start: a :class:`ConfigurationError` when the stream capturing an
        address's dead-letter subject would not keep them. Anything else (no stream, no
        answer) is left to each dead letter, which is looked up again as it goes.

        The addresses are looked up together, and not at all once the server refuses
        this user JetStream's API: each request would wait out ``--publish-timeout``
        (core mode goes on without JetStream; JetStream mode stops at the refusal)."""
        subjects = {self.dead_letter_subject(a): a for a in self.addresses}
        jsm = self._jsm()
        looked_up = asyncio.gather(
            *(dead_letter_stream(jsm, s) for s in subjects), return_exceptions=True
        )
        try:
            found = await refusals.unless_refused(looked_up, api=True)
        except Refused:
            refusals.check()  # JetStream mode needs the API: this ends the start
            logger.warning(
                "the NATS server refuses this user JetStream's API: no dead letter can be "
                "stored (allow publishing to $JS.API.> for them)"
            )
            return
        for (subject, address), result in zip(subjects.items(), found, strict=True):
            if isinstance(result, Unkept):
                raise ConfigurationError(
                    f"nats: the dead letters of {address!r} would be lost in {subject!r}: "
                    f"{result}; {KEEP_FIX}"
                )

    async def replay_dead_letters(self, address: str, limit: int) -> int:
        """Publish each back (ack awaited), then delete the confirmed ones from the stream."""
        js = self._client.jetstream(timeout=self.config.publish_timeout)
        jsm = self._jsm()
        moved = 0
        async for chunk in self._dead_letter_chunks(address, limit, replay=True):
            sent = await asyncio.gather(
                *(
                    js.publish(
                        d.address,
                        d.payload or b"",
                        headers=encode(d.headers, republish=True) or None,
                    )
                    for _, d in chunk
                ),
                return_exceptions=True,
            )
            confirmed = [handle for (handle, _), r in zip(chunk, sent, strict=True) if _ok(r)]
            deleted = await asyncio.gather(
                *(jsm.delete_msg(stream, seq) for stream, seq in confirmed),
                return_exceptions=True,
            )
            moved += len(confirmed)
            failed = [r for r in (*sent, *deleted) if not _ok(r)]
            if failed:
                raise self.send_error(
                    f"nats: replay to {address!r} stopped after {moved} dead letter(s): "
                    f"{_text(failed[0])}; the rest stay in stream {chunk[0][0][0]!r}"
                )
        return moved

    async def _dead_letter_chunks(
        self, address: str, limit: int, *, replay: bool
    ) -> AsyncIterator[DeadLetterChunk]:
        """Handles are ``(stream, sequence)``."""
        from nats import errors as nats_errors
        from nats.js import api

        stream, retention, subject = await self._dead_letter_stream(address, replay=replay)
        jsm = self._jsm()
        name = f"amgi-dead-letters-{secrets.token_hex(6)}"
        # A work queue takes only explicit acks; never sent, they change nothing either.
        queue = retention == "workqueue"
        try:
            last = (await jsm.stream_info(stream)).state.last_seq
            await jsm.add_consumer(
                stream,
                api.ConsumerConfig(
                    name=name,
                    filter_subject=subject,
                    ack_policy=api.AckPolicy.EXPLICIT if queue else api.AckPolicy.NONE,
                    ack_wait=_ACK_WAIT if queue else None,
                    max_ack_pending=-1 if queue else None,
                    deliver_policy=api.DeliverPolicy.ALL,
                    inactive_threshold=30.0,
                    mem_storage=True,
                ),
            )
            js = self._client.jetstream(timeout=self.config.publish_timeout)
            sub = await js.pull_subscribe_bind(name=name, stream=stream)
        except (nats_errors.Error, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"nats: cannot read stream {stream!r}: {_text(exc)}") from None
        try:
            left, stalls, pending = limit, 0, 1
            while left > 0 and pending > 0:
                try:
                    msgs = await sub.fetch(min(_CHUNK, left), timeout=1.0)
                except TimeoutError:  # nats-py raises its own and, late in a fetch, asyncio's
                    stalls += 1
                    try:
                        pending = (await sub.consumer_info()).num_pending
                    except (nats_errors.Error, OSError, TimeoutError) as exc:
                        raise BrokerUnavailable(
                            f"nats: reading stream {stream!r} failed: {_text(exc)}"
                        ) from None
                    if stalls >= _STALLS and pending:
                        raise BrokerUnavailable(
                            f"nats: reading the dead letters of {address!r} stalled"
                        ) from None
                    continue
                stalls = 0
                chunk: DeadLetterChunk = []
                for m in msgs:
                    meta = m.metadata
                    pending = meta.num_pending
                    if meta.sequence.stream > last:
                        pending = 0  # stored after we started: left for the next run
                        break
                    d = _stored(m, self._consumed_from(m.subject, address))
                    if subject_matches(d.address, address):
                        chunk.append(((stream, meta.sequence.stream), d))
                chunk = chunk[:left]
                if chunk:
                    left -= len(chunk)
                    yield chunk
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await jsm.delete_consumer(stream, name)

    async def _dead_letter_stream(self, address: str, *, replay: bool) -> tuple[str, str, str]:
        """The stream holding the dead letters of ``address``, its retention, and their
        subject."""
        from nats import errors as nats_errors
        from nats.js import errors as js_errors

        if self._client is None:
            raise ConfigurationError("nats: not connected")
        if self.config.mode == "core" and replay:
            raise ConfigurationError(
                "nats: dead letters cannot be replayed in core mode (a core publish is not "
                "confirmed); replay in jetstream mode"
            )
        subject = self.dead_letter_subject(address)
        jsm = self._jsm()
        try:
            if self.config.mode == "jetstream":
                if self.config.stream:
                    await jsm.stream_info(self.config.stream)
                else:
                    await jsm.find_stream_name_by_subject(address)
        except js_errors.NotFoundError:
            raise ConfigurationError(
                f"nats: subject {address!r} does not exist: no JetStream stream captures it"
                + (f" (stream {self.config.stream!r} is missing)" if self.config.stream else "")
            ) from None
        except js_errors.ServiceUnavailableError:
            raise ConfigurationError("nats: JetStream is not enabled on the server") from None
        except (nats_errors.Error, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"nats: cannot look up {address!r}: {_text(exc)}") from None
        try:
            found = await dead_letter_stream(jsm, subject)
        except Unkept as exc:
            raise ConfigurationError(
                f"nats: {exc}, so the server stores no dead letter of {address!r} in "
                f"{subject!r} (they wait unacknowledged on their subject); {KEEP_FIX}"
            ) from None
        except (nats_errors.Error, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"nats: cannot look up {subject!r}: {_text(exc)}") from None
        if found is None:
            raise ConfigurationError(
                f"nats: no JetStream stream captures the dead-letter subject {subject!r}, so "
                f"no dead letter of {address!r} was stored (they wait unacknowledged on "
                "their subject); create a stream covering it"
            )
        return *found, subject

    def _consumed_from(self, stored: str, address: str) -> str:
        """The subject a dead letter stored on ``stored`` came from, for one without the
        amgi-original-address header (another producer's): ``stored`` less what
        ``--dead-letter-subject`` puts around ``{subject}``, if ``address`` matches it;
        otherwise ``address``."""
        before, found, after = self.config.dead_letter_subject.partition("{subject}")
        if found and stored.startswith(before) and stored.endswith(after):
            inner = stored[len(before) : len(stored) - len(after)]
            if inner and subject_matches(inner, address):
                return inner
        return address

    def _jsm(self) -> Any:
        """The JetStream API, its requests bounded by ``--publish-timeout``."""
        return self._client.jsm(timeout=self.config.publish_timeout)


def subject_matches(subject: str, pattern: str) -> bool:
    """Whether ``subject`` matches NATS subject ``pattern`` (``*`` one token, ``>`` the rest)."""
    tokens, wanted = subject.split("."), pattern.split(".")
    for i, want in enumerate(wanted):
        if want == ">":
            return len(tokens) > i
        if i >= len(tokens) or (want != "*" and want != tokens[i]):
            return False
    return len(tokens) == len(wanted)


def _ok(result: object) -> bool:
    return not isinstance(result, BaseException) and result is not False


def _text(result: object) -> str:
    if isinstance(result, BaseException):
        return str(getattr(result, "description", None) or result or type(result).__name__)
    return "the server did not delete it"


def _stored(msg: Any, address: str) -> StoredDeadLetter:
    headers, _ = decode(msg.headers)
    meta = msg.metadata
    dead_at = meta.timestamp.timestamp() if meta.timestamp else None
    return stored_dead_letter(
        str(meta.sequence.stream), headers, msg.data, address=address, dead_at=dead_at
    )
