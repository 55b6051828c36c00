"""Attempt numbers of MQTT 3.1.1 retry copies, which carry no header (private).

A retry copy goes back to the topic it came from with nothing to tell it from a new
message, so the server notes its attempt under its topic and payload, and the next
message with both takes it. A copy to a topic only a ``$share/`` filter consumes may
land on another server of the group and never come back here: its note would wait for
ever and hand its count to a later, different message with the same topic and payload.
Such a note lapses :data:`SHARED_COPY_WAIT` seconds after the broker took the copy; the
others wait (the persistent session brings the copy back), up to :data:`MOST` notes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

__all__ = ["MOST", "SHARED_COPY_WAIT", "RetryAttempts"]

SHARED_COPY_WAIT = 30.0
"""Seconds a copy to a shared-only topic may take to come back after the broker took it."""
MOST = 10_000
"""Notes kept at most (the oldest go first): copies in flight at once, in practice."""


class _Note:
    __slots__ = ("attempt", "lapses")

    def __init__(self, attempt: int, lapses: float | None) -> None:
        self.attempt = attempt
        self.lapses = lapses
        """``time.monotonic()`` after which the note is void; ``None``: it never is."""

    def void(self, now: float) -> bool:
        return self.lapses is not None and now > self.lapses


class RetryAttempts:
    """Notes of retry copies in flight, by topic and payload, oldest first."""

    def __init__(self, filters: Sequence[str]) -> None:
        self._own = [f for f in filters if not f.startswith("$share/")]
        self._notes: dict[tuple[str, bytes], deque[_Note]] = {}
        self._count = 0

    def __bool__(self) -> bool:
        return self._count > 0

    def expect(self, topic: str, payload: bytes, attempt: int) -> _Note:
        """Note a copy about to be published; :meth:`sent` or :meth:`unsent` it after."""
        if self._count >= MOST:
            self._drop_oldest()
        note = _Note(attempt, None)
        self._notes.setdefault((topic, payload), deque()).append(note)
        self._count += 1
        return note

    def sent(self, topic: str, note: _Note) -> None:
        """The broker took the copy: a copy another server may get lapses from now on."""
        if not self._comes_back(topic):
            note.lapses = time.monotonic() + SHARED_COPY_WAIT

    def unsent(self, topic: str, payload: bytes, note: _Note) -> None:
        """The copy was not published: forget its note."""
        notes = self._notes.get((topic, payload))
        if notes is not None and note in notes:
            notes.remove(note)
            self._count -= 1
            if not notes:
                del self._notes[(topic, payload)]

    def take(self, topic: str, payload: bytes) -> int:
        """The attempt of a message that arrived: the oldest live note's, else 1."""
        key = (topic, payload)
        notes = self._notes.get(key)
        attempt = 1
        now = time.monotonic()
        while notes:
            note = notes.popleft()
            self._count -= 1
            if not note.void(now):
                attempt = note.attempt
                break
        if notes is not None and not notes:
            del self._notes[key]
        return attempt

    def clear(self) -> None:
        self._notes.clear()
        self._count = 0

    def _comes_back(self, topic: str) -> bool:
        """Whether a filter of this server's own (not shared) takes ``topic``."""
        from paho.mqtt.client import topic_matches_sub

        return any(topic_matches_sub(f, topic) for f in self._own)

    def _drop_oldest(self) -> None:
        """Make room: void notes first, else the first note of the first topic."""
        now = time.monotonic()
        for key in list(self._notes):
            notes = self._notes[key]
            live = deque(n for n in notes if not n.void(now))
            self._count -= len(notes) - len(live)
            if live:
                self._notes[key] = live
            else:
                del self._notes[key]
        if self._count >= MOST:
            key = next(iter(self._notes))
            self._notes[key].popleft()
            self._count -= 1
            if not self._notes[key]:
                del self._notes[key]
