"""Dead letters of the SQS server: the queue's redrive target or ``<queue><suffix>`` (private).

``list`` receives them (hidden for ``visibility_timeout``) and makes them visible again at
once; a replay sends each back to the queue (body and attributes as they were, less
AMGI's attempt, reason and origin), then deletes it from the dead-letter queue. What a
killed replay held reappears after ``visibility_timeout``: at least once.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from amgi.servers.sqs._client import _MAX_BATCH, SqsClient, SqsSendError, _Queue, send_each
from amgi.servers.sqs.records import replay_attributes, stored_dead_letter
from amgi.transport import StoredDeadLetter

logger = logging.getLogger("amgi.servers.sqs")


class DeadLetters(SqsClient):
    """The transport's ``list_dead_letters`` and ``replay_dead_letters`` on SQS."""

    async def _queues_of(self, address: str) -> tuple[_Queue, _Queue]:
        """``address``'s queue and its dead-letter queue; both must exist."""
        queue = await self._queue(address, create=False)
        return queue, await self._dead_letter_queue(queue, create=False)

    async def _take_dead(self, dlq: _Queue, limit: int) -> list[dict[str, Any]]:
        """Receive up to ``limit`` dead letters, hidden for ``visibility_timeout`` (what a
        listing or replay that dies holds comes back after that)."""
        taken: list[dict[str, Any]] = []
        while len(taken) < limit:
            response = await self.client.receive_message(
                QueueUrl=dlq.url,
                MaxNumberOfMessages=min(_MAX_BATCH, limit - len(taken)),
                WaitTimeSeconds=1,
                VisibilityTimeout=self.config.visibility_timeout,
                MessageSystemAttributeNames=["All"],
                MessageAttributeNames=["All"],
            )
            got = response.get("Messages", [])
            if not got:
                break
            taken += got
        return taken

    async def list_dead_letters(self, address: str, limit: int) -> list[StoredDeadLetter]:
        """Received (hidden for a moment), then made visible again at once."""
        _, dlq = await self._queues_of(address)
        taken = await self._take_dead(dlq, limit)
        if taken:
            await self._change_visibility(dlq, [(m["ReceiptHandle"], 0) for m in taken])
        return [stored_dead_letter(raw, address) for raw in taken]

    async def replay_dead_letters(self, address: str, limit: int) -> int:
        """Send each back to the queue, then delete it from the dead-letter queue; at most
        as many as the dead-letter queue held when the replay started (a replayed message
        that a consumer dead-letters again meanwhile waits for the next replay)."""
        queue, dlq = await self._queues_of(address)
        try:
            ready = min(limit, await self._queue_count(dlq, "ApproximateNumberOfMessages"))
        except Exception as exc:
            raise SqsSendError(f"sqs: could not read the size of {dlq.name!r}: {exc}") from exc
        moved = 0
        while moved < ready:
            chunk = await self._take_dead(dlq, min(_MAX_BATCH, ready - moved))
            if not chunk:
                break
            sent = await send_each(queue.fifo, functools.partial(self._send_back, queue), chunk)
            handles = [h for h in sent if isinstance(h, str)]
            if handles:  # sent back: not to be sent again
                await self._delete(dlq, handles)
            moved += len(handles)
            for failure in sent:
                if isinstance(failure, BaseException):
                    raise failure
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
