"""The runtime's lines about nacked messages: what the transport did with each one.

A transport says when a dead letter was not stored or a retry not scheduled
(:meth:`amgi.transport.DeadLetter.not_stored`, :meth:`amgi.transport.Retry.not_scheduled`);
one that says nothing is reported as having done what it was asked.
"""

from __future__ import annotations

import logging

from amgi.transport import DeadLetter, Fate, Settlement

__all__ = ["failure_fields", "report_nacks"]

logger = logging.getLogger("amgi.runtime")

NOTHING = (0, 0, 0, 0)


def failure_fields(
    address: str, mid: str, attempt: int, reason: str, error: str = ""
) -> dict[str, object]:
    """Structured fields of a message-failure log record (shown by ``--log-format json``)."""
    fields: dict[str, object] = {
        "address": address,
        "id": mid,
        "attempt": attempt,
        "reason": reason,
    }
    if error:
        fields["error"] = error
    return {"amgi": fields}


def report_nacks(
    address: str, settlement: Settlement, max_attempts: int
) -> tuple[int, int, int, int]:
    """Log one line per nacked message of a settled batch; return how many were retried,
    dead-lettered, kept unacknowledged (not moved) and lost."""
    if not settlement.retry and not settlement.dead:
        return NOTHING
    retried = 0
    dead = list(settlement.dead)
    kept = 0
    for r in settlement.retry:
        m = r.message
        if r.dead is not None:
            dead.append(r.dead)
        elif r.error:
            kept += 1
            logger.error(
                "message %s from %r nacked (attempt %d of %d): %s; its retry could not be "
                "scheduled: %s; the message stays unacknowledged and is tried again later",
                m.id,
                address,
                m.attempt,
                max_attempts,
                r.reason,
                r.error,
                extra=failure_fields(address, m.id, m.attempt, r.reason, r.error),
            )
        else:
            retried += 1
            logger.warning(
                "message %s from %r nacked (attempt %d of %d): %s; retrying in %.3gs",
                m.id,
                address,
                m.attempt,
                max_attempts,
                r.reason,
                r.delay,
                extra=failure_fields(address, m.id, m.attempt, r.reason),
            )
    stored = lost = 0
    for d in dead:
        if d.fate is Fate.KEPT:
            kept += 1
        elif d.fate is Fate.LOST:
            lost += 1
        else:
            stored += 1
        _report_dead(address, d)
    return retried, stored, kept, lost


def _report_dead(address: str, d: DeadLetter) -> None:
    m = d.message
    if d.fate is Fate.KEPT or d.fate is Fate.LOST:
        then = (
            "the message is lost (the broker cannot deliver it again)"
            if d.fate is Fate.LOST
            else "the message stays unacknowledged and is tried again later"
        )
        logger.error(
            "message %s from %r: its dead letter (after attempt %d: %s) could not be stored: "
            "%s; %s",
            m.id,
            address,
            m.attempt,
            d.reason,
            d.error,
            then,
            extra=failure_fields(address, m.id, m.attempt, d.reason, d.error),
        )
        return
    logger.error(
        "message %s from %r dead-lettered after attempt %d: %s",
        m.id,
        address,
        m.attempt,
        d.reason,
        extra=failure_fields(address, m.id, m.attempt, d.reason),
    )
