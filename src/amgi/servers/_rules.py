"""Rules the Redis and NATS servers share."""

from __future__ import annotations

from amgi.transport import (
    DEAD_LETTER_REASON_HEADER,
    ORIGINAL_ADDRESS_HEADER,
    HeaderList,
    Message,
    headers_with_attempt,
)

__all__ = ["dead_letter_headers"]


def dead_letter_headers(message: Message, address: str, reason: str) -> HeaderList:
    """The headers of ``message`` dead-lettered from ``address``: attempt, reason, address."""
    headers = headers_with_attempt(message.headers, message.attempt)
    headers.append((DEAD_LETTER_REASON_HEADER, reason.encode()))
    headers.append((ORIGINAL_ADDRESS_HEADER, address.encode()))
    return headers
