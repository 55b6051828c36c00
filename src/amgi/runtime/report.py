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
    """Log one line per nacked message of a settled batch, and one per reason for those
    handed back unspent (the application never had them: a stop, a fatal error, a call
    that ended first); return how many were retried (those not included),
    dead-lettered, kept unacknowledged (not moved) and lost."""
    if not settlement.retry and not settlement.dead:
        return NOTHING
    retried = 0
    dead = list(settlement.dead)
    kept = 0
    handed_back: dict[str, list[str]] = {}
    for r in settlement.retry:
        m = r.message
        if r.uncounted and r.dead is None and not r.error:
            handed_back.setdefault(r.reason, []).append(m.id)
        elif r.dead is not None:
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
    for reason, ids in handed_back.items():
        logger.info(
            "%d message(s) from %r handed back unspent, no attempt counted: %s (%s)",
            len(ids),
            address,
            reason,
            _first_ids(ids),
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


def _first_ids(ids: list[str], shown: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 7 more``."""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


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
