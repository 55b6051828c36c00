"""The streams that keep the dead letters, looked up with one request while they stay.

Before the dead letters of a settle are published, the stream capturing each subject is
looked up (:func:`dead_letter_stream`: two JetStream API requests), to refuse one whose
retention would not keep them (interest retention acks a publish and keeps nothing, and
the original is terminated after that ack). The stream found is remembered per subject,
and the next time only that stream is asked for (one request): whether it still exists,
still captures the subject and keeps what it gets; if it no longer captures it, the
subject is looked up again, and a publish that failed forgets it.

Nothing is taken on trust: a stream deleted, made again with interest retention or
changed in place (newer servers change retention between limits and interest) is seen
by that one request. JetStream's stream announcements (advisories) could spare it too,
but a server denies a wildcard subscription's messages without a word (a ``deny`` in
the user's permissions), so an announcement missed could not be told from none sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from amgi.servers.nats._dead_letters import dead_letter_stream, keeping, subject_matches

__all__ = ["DeadLetterStreams"]

_REMEMBERED = 1000
"""Subjects whose stream is remembered at most (a wildcard address makes one per subject
its messages come from): past it, the oldest is forgotten."""


class DeadLetterStreams:
    """Per dead-letter subject, the stream found capturing it."""

    def __init__(self, client: Any, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self._streams: dict[str, str] = {}

    async def check(self, subjects: Iterable[str]) -> dict[str, BaseException | None]:
        """Per subject, what stops a dead letter from being published there:
        :class:`Unkept`, or the look-up's failure; None if nothing (no stream included:
        the publish says so). One request per subject whose stream is remembered, two
        for the others."""
        jsm = self.client.jsm(timeout=self.timeout)
        wanted = list(set(subjects))
        found = await asyncio.gather(
            *(self._look_up(jsm, s) for s in wanted), return_exceptions=True
        )
        return {
            s: r if isinstance(r, BaseException) else None
            for s, r in zip(wanted, found, strict=True)
        }

    def forget(self, subject: str) -> None:
        """A publish to ``subject`` failed: look it up whole next time."""
        self._streams.pop(subject, None)

    async def _look_up(self, jsm: Any, subject: str) -> None:
        from nats.js import errors as js_errors

        stream = self._streams.pop(subject, None)
        if stream is not None:
            try:
                info = await jsm.stream_info(stream)
            except js_errors.NotFoundError:
                info = None  # deleted: another stream may capture the subject now
            # Subjects of two streams never overlap: the one that matches captures it.
            if info is not None and any(
                subject_matches(subject, p) for p in info.config.subjects or ()
            ):
                keeping(stream, info)
                self._remember(subject, stream)
                return
        found = await dead_letter_stream(jsm, subject)
        if found is not None:
            self._remember(subject, found[0])

    def _remember(self, subject: str, stream: str) -> None:
        streams = self._streams
        streams[subject] = stream
        if len(streams) > _REMEMBERED:
            del streams[next(iter(streams))]
