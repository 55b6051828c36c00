"""Dead letters of the Kafka server: reading ``{topic}.dlq`` and replaying it.

A dead letter of topic T is a record of T's dead-letter topic (``--dead-letter-topic``,
``{topic}.dlq`` by default) carrying the reason and attempt headers. Replaying it produces
it again to T (its original address), as a first attempt, and then commits its offset
for the consumer group ``amgi-dead-letters`` on the dead-letter topic: that committed
offset is what "removed from the dead letters" means on Kafka (records are never
deleted), and listing starts from it. A replay killed between a confirmed send and its
commit sends those records again on the next replay: at least once.

:class:`DeadLetterReader` makes blocking client calls; :class:`DeadLetters` (mixed into
the transport) runs them in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.servers.kafka._producer import Producing
from amgi.servers.kafka.records import split_dead_letter
from amgi.transport import StoredDeadLetter

__all__ = ["REPLAY_GROUP", "DeadLetterReader", "DeadLetters", "ReadDeadLetter"]

REPLAY_GROUP = "amgi-dead-letters"
_POLL = 0.5
_REPLAY_CHUNK = 500


@dataclass(slots=True)
class ReadDeadLetter:
    """One record of a dead-letter topic, with what a replay needs."""

    stored: StoredDeadLetter
    partition: int
    offset: int
    key: bytes | None


class DeadLetterReader:
    """A consumer assigned every partition of one dead-letter topic, from the replay
    group's committed offsets on."""

    def __init__(self, conf: dict[str, Any], topic: str, timeout: float) -> None:
        from confluent_kafka import Consumer

        self.topic = topic
        self._timeout = timeout
        self._opened = time.time()
        self._next: dict[int, int] = {}
        self._end: dict[int, int] = {}
        self._done: set[int] = set()
        self._consumer = Consumer(
            {
                **conf,
                "group.id": REPLAY_GROUP,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            with _unavailable(f"cannot read the dead-letter topic {topic!r}"):
                self._open(topic, timeout)
        except BaseException:
            self._consumer.close()
            raise

    def _open(self, topic: str, timeout: float) -> None:
        """Assign every partition of ``topic`` from the replay group's offsets on."""
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        metadata = self._consumer.list_topics(topic, timeout=timeout)
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise ConfigurationError(f"there is no dead-letter topic {topic!r}")
        parts = [TopicPartition(topic, p) for p in sorted(found.partitions)]
        committed = self._consumer.committed(parts, timeout=timeout)
        starts = []
        for tp in committed:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(topic, tp.partition), timeout=timeout
            )
            start = tp.offset if tp.offset >= 0 else low
            self._next[tp.partition] = start
            self._end[tp.partition] = high
            starts.append(
                TopicPartition(topic, tp.partition, start if start >= 0 else OFFSET_BEGINNING)
            )
        self._consumer.assign(starts)

    def read(self, limit: int) -> list[ReadDeadLetter]:
        """Up to ``limit`` more dead letters, in partition order; none when all are read.

        Reads until every partition reached the end it had when the reader was opened and
        then one poll brings nothing more (some brokers report the end of a partition as
        the start of its last record batch, so the end alone is not trusted). A record past
        that end and written after the reader was opened ends its partition: what a
        consumer dead-letters meanwhile (a replayed message failing again, say) is left
        for the next reader, so a replay always ends.
        """
        from confluent_kafka import TopicPartition

        out: list[ReadDeadLetter] = []
        idle = 0.0
        while len(out) < limit:
            with _unavailable(f"reading the dead-letter topic {self.topic!r} failed"):
                records = self._consumer.consume(min(500, limit - len(out)), timeout=_POLL)
            if not records:
                if all(self._next[p] >= end for p, end in self._end.items()):
                    break
                idle += _POLL
                if idle >= self._timeout:
                    raise ConfigurationError(
                        f"reading the dead-letter topic {self.topic!r} stalled for {idle:g} s"
                    )
                continue
            idle = 0.0
            for r in records:
                error = r.error()
                if error is not None:
                    raise ConfigurationError(f"reading {self.topic!r} failed: {error.str()}")
                p, offset = int(r.partition() or 0), int(r.offset() or 0)
                if p in self._done:
                    continue
                if offset >= self._end.get(p, 0) and _written_after(r, self._opened):
                    self._done.add(p)
                    self._next[p] = max(self._next.get(p, 0), self._end.get(p, 0))
                    self._consumer.pause([TopicPartition(self.topic, p)])
                    continue
                self._next[p] = max(self._next.get(p, 0), offset + 1)
                out.append(_dead_letter(r, p, offset))
        return out

    def commit(self, offsets: dict[int, int]) -> None:
        """Mark every record below ``offsets[partition]`` as replayed (synchronously)."""
        from confluent_kafka import TopicPartition

        if offsets:
            with _unavailable(f"cannot mark dead letters of {self.topic!r} replayed"):
                self._consumer.commit(
                    offsets=[TopicPartition(self.topic, p, o) for p, o in offsets.items()],
                    asynchronous=False,
                )

    def close(self) -> None:
        self._consumer.close()


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    """Raise a client error within as one readable :class:`BrokerUnavailable` (the CLI
    showed ``unexpected KafkaException: KafkaError{code=_TIMED_OUT,val=-185,...}``)."""
    from confluent_kafka import KafkaError, KafkaException

    try:
        yield
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        why = error.str() if isinstance(error, KafkaError) else str(exc)
        raise BrokerUnavailable(f"{what}: {why}") from None


def _written_after(record: Any, moment: float) -> bool:
    """Whether ``record``'s timestamp is later than ``moment`` (seconds)."""
    kind, ts = record.timestamp()
    return bool(kind) and ts / 1000 > moment


def _dead_letter(record: Any, partition: int, offset: int) -> ReadDeadLetter:
    split, reason = split_dead_letter(record.headers())
    kind, ts = record.timestamp()
    stored = StoredDeadLetter(
        id=f"{partition}:{offset}",
        address=split.original_address or "",
        headers=split.headers,
        payload=record.value(),
        bindings={"kafka": {"key": record.key()}} if record.key() is not None else {},
        attempts=split.attempt,
        reason=reason,
        dead_at=ts / 1000 if kind else None,
    )
    return ReadDeadLetter(stored, partition, offset, record.key())


class DeadLetters(Producing):
    """The transport's ``list_dead_letters`` and ``replay_dead_letters`` on Kafka."""

    async def list_dead_letters(self, address: str, limit: int) -> list[StoredDeadLetter]:
        """Records of the dead-letter topic not yet replayed."""
        reader = await self._dead_letter_reader(address)
        try:
            found = await asyncio.to_thread(reader.read, limit)
        finally:
            await asyncio.to_thread(reader.close)
        return [d.stored for d in found]

    async def replay_dead_letters(self, address: str, limit: int) -> int:
        """Produce each record again to its topic, then commit it as replayed."""
        reader = await self._dead_letter_reader(address)
        moved = 0
        try:
            while moved < limit:
                chunk = await asyncio.to_thread(reader.read, min(_REPLAY_CHUNK, limit - moved))
                if not chunk:
                    break
                sends = []
                for d in chunk:
                    target = d.stored.address or address
                    sends.append(
                        self._produce(
                            target, d.stored.headers, d.stored.payload, d.key, None, move=True
                        )
                    )
                await asyncio.gather(*sends)
                ends: dict[int, int] = {}
                for d in chunk:
                    ends[d.partition] = max(ends.get(d.partition, 0), d.offset + 1)
                try:
                    await asyncio.to_thread(reader.commit, ends)
                except BrokerUnavailable as exc:
                    raise BrokerUnavailable(
                        f"{exc}; {moved + len(chunk)} dead letter(s) were sent back to "
                        f"{address!r}, the last {len(chunk)} of them still listed: a next "
                        "replay sends those again"
                    ) from None
                moved += len(chunk)
        finally:
            await asyncio.to_thread(reader.close)
        return moved

    async def _dead_letter_reader(self, address: str) -> DeadLetterReader:
        assert self._producer is not None, "connect() first"
        metadata = await self._metadata(self._producer)
        if address not in metadata.topics:
            raise ConfigurationError(
                f"Kafka topic {address!r} does not exist on {self.config.bootstrap_servers}"
            )
        topic = self._dead_name(address)
        return await asyncio.to_thread(
            DeadLetterReader, self._common_config(), topic, self.config.connect_timeout
        )
