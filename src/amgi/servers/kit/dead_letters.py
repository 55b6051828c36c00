"""What ``amgi dead-letters`` shares on servers that read their dead letters a chunk at a time.

A server whose dead letters carry the kit's dead-letter headers (Redis, NATS) reads them
back with :func:`stored_dead_letter`, and gets ``list_dead_letters`` from
:class:`ChunkedDeadLetters` by yielding chunks from ``_dead_letter_chunks``; its replay walks
the same chunks (send each chunk, then remove what the broker confirmed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from amgi.servers.kit.headers import attempt_from_headers, split_dead_letter_headers
from amgi.transport import HeaderList, StoredDeadLetter

__all__ = ["ChunkedDeadLetters", "DeadLetterChunk", "stored_dead_letter"]

DeadLetterChunk = list[tuple[Any, StoredDeadLetter]]
"""Dead letters read at once, each with the server's handle to remove it (entry id, sequence)."""


def stored_dead_letter(
    id: str,
    headers: HeaderList,
    payload: bytes | None,
    *,
    address: str,
    dead_at: float | None,
) -> StoredDeadLetter:
    """A dead letter stored with the kit's headers, as ``list`` shows and replay sends it:
    the message's own headers, its last attempt, the reason, and its original address
    (``address`` when the header is missing)."""
    attempt, rest = attempt_from_headers(headers)
    own, reason, origin = split_dead_letter_headers(rest)
    return StoredDeadLetter(id, origin or address, own, payload, {}, attempt, reason, dead_at)


class ChunkedDeadLetters:
    """``list_dead_letters`` over the server's ``_dead_letter_chunks``."""

    def _dead_letter_chunks(
        self, address: str, limit: int, *, replay: bool
    ) -> AsyncIterator[DeadLetterChunk]:
        """Up to ``limit`` dead letters of ``address``, oldest first, a chunk at a time;
        ``replay`` says a replay will follow (checks that only a replay needs)."""
        raise NotImplementedError

    async def list_dead_letters(self, address: str, limit: int) -> list[StoredDeadLetter]:
        """Every dead letter of the chunks, left in place."""
        found: list[StoredDeadLetter] = []
        async for chunk in self._dead_letter_chunks(address, limit, replay=False):
            found += [d for _, d in chunk]
        return found
