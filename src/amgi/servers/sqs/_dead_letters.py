"""Dead letters of the SQS server: the queue's redrive target or ``<queue><suffix>`` (private).

``list`` receives them (hidden for ``visibility_timeout``) and makes them visible again at
once; a replay sends each back to the queue (body and attributes as they were, less
AMGI's attempt, reason and origin), then deletes it from the dead-letter queue. What a
killed replay held reappears after ``visibility_timeout``: at least once.

Several queues may share one redrive target: list and replay of a queue take only the
dead letters that came from it (SQS's ``DeadLetterQueueSourceArn``, else AMGI's original
address; one with neither counts as the queue's). The others' are held while the pass
goes on, so no receive takes them again, and made visible again when it ends. A pass
receives at most as many messages as SQS counted ready at its start.

A FIFO dead-letter queue hands out no more of a message group while some of it is held:
a listing sees only what the first receive of each group returned (at most 10), and says
so; a replay deletes what it moved, and so goes on through the group.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from amgi.errors import BrokerUnavailable
from amgi.servers.sqs._client import _MAX_BATCH, SqsClient, SqsSendError, _Queue, send_each
from amgi.servers.sqs.records import replay_attributes, stored_dead_letter
from amgi.transport import StoredDeadLetter

logger = logging.getLogger("amgi.servers.sqs")

_PARTIAL_LIST = (
    "the listing is partial: about %d message(s) in the FIFO queue %r were not reached. SQS "
    "hands out no more of a message group while some of it is held, and a listing deletes "
    "nothing, so it sees only the first dead letters of each group (up to 10, those one "
    "receive returns); a replay moves them all"
)
_PARTIAL_REPLAY = (
    "about %d message(s) in the FIFO queue %r were not reached: SQS hands out no more of "
    "a message group while some of it is held, and they wait behind dead letters of other "
    "queues or another reader's; replay those first, or run this again later"
)


@dataclass(slots=True, eq=False)
class _Pass:
    """One list or replay over a dead-letter queue, for the dead letters of ``address``."""

    dlq: _Queue
    address: str
    left: int
    """Messages it may still receive: SQS's count at the start, less those received."""
    wanted: int
    """Dead letters of ``address`` it may still take (the limit)."""
    held: dict[str, str] = field(default_factory=dict)
    """Message id -> latest receipt handle of each message it holds (hidden), whoever's:
    a message received again is not taken twice."""
    skipped: int = 0
    """Messages of other queues received."""
    drained: bool = False
    """A receive came back empty."""

    @property
    def going(self) -> bool:
        return self.left > 0 and self.wanted > 0 and not self.drained


class DeadLetters(SqsClient):
    """The transport's ``list_dead_letters`` and ``replay_dead_letters`` on SQS."""

    async def _queues_of(self, address: str) -> tuple[_Queue, _Queue]:
        """``address``'s queue and its dead-letter queue; both must exist."""
        queue = await self._queue(address, create=False)
        return queue, await self._dead_letter_queue(queue, create=False)

    async def _start(self, dlq: _Queue, address: str, limit: int) -> _Pass:
        try:
            ready = await self._queue_count(dlq, "ApproximateNumberOfMessages")
        except Exception as exc:
            raise BrokerUnavailable(f"sqs: could not read the size of {dlq.name!r}: {exc}") from exc
        return _Pass(dlq, address, left=ready, wanted=limit)

    async def _take(self, p: _Pass) -> list[tuple[dict[str, Any], StoredDeadLetter]]:
        """One receive: the dead letters of ``p.address`` it brought that ``p`` does not
        hold yet (hidden for ``visibility_timeout``: what a pass that dies holds comes
        back after that)."""
        response = await self.client.receive_message(
            QueueUrl=p.dlq.url,
            MaxNumberOfMessages=min(_MAX_BATCH, p.left, p.wanted),
            WaitTimeSeconds=1,
            VisibilityTimeout=self.config.visibility_timeout,
            MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        got: list[dict[str, Any]] = response.get("Messages", [])
        p.drained = not got
        p.left -= len(got)
        fresh = []
        for raw in got:
            known = raw["MessageId"] in p.held
            p.held[raw["MessageId"]] = raw["ReceiptHandle"]  # only the latest one works
            if known:
                continue
            d = stored_dead_letter(raw, p.address)
            if d.address == p.address:
                p.wanted -= 1
                fresh.append((raw, d))
            else:
                p.skipped += 1
        return fresh

    async def _end(self, p: _Pass, partial: str) -> None:
        """Make what ``p`` holds visible again at once; say how many messages of other
        queues it skipped and, on FIFO, how many it could not reach (``partial``: the
        warning, with a count and a queue name)."""
        try:
            await self._change_visibility(p.dlq, [(h, 0) for h in p.held.values()])
        except Exception as exc:
            logger.warning(
                "could not make %d message(s) of %r visible again (%s): they are after "
                "the visibility timeout",
                len(p.held),
                p.dlq.name,
                exc,
            )
        if p.skipped:
            logger.warning(
                "skipped %d message(s) in %r that came from other queues (it is their "
                "dead-letter queue too); they stay there",
                p.skipped,
                p.dlq.name,
            )
        if p.dlq.fifo and p.drained and p.left > 0 and p.wanted > 0:
            logger.warning(partial, p.left, p.dlq.name)

    async def list_dead_letters(self, address: str, limit: int) -> list[StoredDeadLetter]:
        """Received (hidden for a moment), then made visible again at once."""
        _, dlq = await self._queues_of(address)
        p = await self._start(dlq, address, limit)
        shown: list[StoredDeadLetter] = []
        try:
            while p.going:
                shown += [d for _, d in await self._take(p)]
        finally:
            await self._end(p, _PARTIAL_LIST)
        return shown

    async def replay_dead_letters(self, address: str, limit: int) -> int:
        """Send each back to the queue, then delete it from the dead-letter queue; at most
        as many as the dead-letter queue held when the replay started (a replayed message
        that a consumer dead-letters again meanwhile waits for the next replay)."""
        queue, dlq = await self._queues_of(address)
        p = await self._start(dlq, address, limit)
        moved = 0
        try:
            while p.going:
                chunk = [raw for raw, _ in await self._take(p)]
                sent = await send_each(queue.fifo, functools.partial(self._send_back, queue), chunk)
                done = [
                    raw["MessageId"]
                    for raw, outcome in zip(chunk, sent, strict=False)  # FIFO: may stop short
                    if isinstance(outcome, str)
                ]
                if done:  # sent back: not to be sent again
                    await self._delete(dlq, [p.held.pop(i) for i in done])
                moved += len(done)
                for failure in sent:
                    if isinstance(failure, BaseException):
                        raise failure
        finally:
            await self._end(p, _PARTIAL_REPLAY)
        if moved < limit:
            await self._report_held(dlq)
        return moved

    async def _report_held(self, dlq: _Queue) -> None:
        """Warn about dead letters another reader holds (in flight): a replay cannot see
        them until their visibility timeout ends."""
        try:
            held = await self._queue_count(dlq, "ApproximateNumberOfMessagesNotVisible")
        except Exception as exc:
            logger.debug("reading the in-flight count of %r failed: %s", dlq.name, exc)
            return
        if held:
            logger.warning(
                "about %d dead letter(s) in %r are held by another reader and were not "
                "replayed; they become visible again after their visibility timeout",
                held,
                dlq.name,
            )

    async def _send_back(self, queue: _Queue, raw: dict[str, Any]) -> str:
        """Send ``raw`` back to ``queue``; its receipt handle in the dead-letter queue."""
        params: dict[str, Any] = {"QueueUrl": queue.url, "MessageBody": raw["Body"]}
        attributes = replay_attributes(raw)
        if attributes:
            params["MessageAttributes"] = attributes
        if queue.fifo:
            system = raw.get("Attributes") or {}
            params["MessageGroupId"] = system.get("MessageGroupId") or "dead-letters"
            params["MessageDeduplicationId"] = raw["MessageId"]
        try:
            await self.client.send_message(**params)
        except Exception as exc:
            raise SqsSendError(f"sqs: could not send back to {queue.name!r}: {exc}") from exc
        handle: str = raw["ReceiptHandle"]
        return handle
