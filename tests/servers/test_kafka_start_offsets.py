"""Where an assigned partition starts: the group's committed offset, else the reset end.

The transport looks the committed offsets up itself when the assignment arrives, and the log
start (or end) of the partitions without one, so the first fetch goes out at once for every
partition (librdkafka's own lookup waits ~0.1 s, then resolves partitions one by one).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as TP

import amgi.servers.kafka._consumer
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.kafka import KafkaOptions, KafkaTransport
from amgi.servers.kafka._consumer import Consuming
from tests.servers.kafka_helpers import (
    BOOTSTRAP,
    create_topic,
    ensure_broker,
    fresh,
    options,
    produce,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


def commit(group: str, topic: str, offsets: dict[int, int]) -> None:
    """Commit ``offsets`` for ``group`` as another member would have."""
    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": group})
    try:
        consumer.commit(offsets=[TP(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    finally:
        consumer.close()


def records(partition: int, first: int, count: int) -> list[tuple[bytes, bytes, list[Any]]]:
    return [(b"k", b"%d-%d" % (partition, i), []) for i in range(first, first + count)]


async def serve_until(kafka: KafkaTransport, seen: list[tuple[int, int]], done: Any) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        more = True
        while more:
            event = await receive()
            more = event["more_messages"]
            k = event["bindings"]["kafka"]
            seen.append((k["partition"], k["offset"]))
            await send({"type": "message.ack", "id": event["id"]})

    runtime = Runtime(app, kafka, RuntimeConfig(lifespan="off", crash_ledger=""))
    server = asyncio.create_task(runtime.serve())
    try:
        deadline = time.monotonic() + 30
        while not await done():
            assert not server.done(), server.result()
            assert time.monotonic() < deadline, f"timed out; seen {sorted(seen)}"
            await asyncio.sleep(0.02)
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(server, 30) == 0


@pytest.mark.parametrize("reset", ["earliest", "latest"])
async def test_committed_partition_resumes_there_the_other_starts_at_the_reset_end(
    reset: str,
) -> None:
    topic = create_topic(fresh("start"), partitions=2)
    produce(topic, records(0, 0, 10), partition=0)
    for record in records(1, 0, 10):
        # One request each: the test broker puts a partition's end just after the start
        # of its last record batch.
        produce(topic, [record], partition=1)
    group = fresh("group")
    commit(group, topic, {0: 4})
    kafka = KafkaTransport(
        [topic], KafkaOptions(**options(group_id=group, auto_offset_reset=reset))
    )
    seen: list[tuple[int, int]] = []
    next_new = 10
    last_sent = 0.0

    async def done() -> bool:
        nonlocal next_new, last_sent
        if reset == "earliest":
            return len(seen) >= 16
        if any(p == 1 for p, _ in seen):
            return True
        if len(seen) >= 6 and time.monotonic() - last_sent > 0.2:
            # New records on partition 1, until one arrives (its start is the end as it
            # was when the assignment came, which is not observable from outside).
            produce(topic, records(1, next_new, 1), partition=1)
            next_new += 1
            last_sent = time.monotonic()
        return False

    await serve_until(kafka, seen, done)
    assert sorted(o for p, o in seen if p == 0) == list(range(4, 10))  # from the commit
    of_1 = sorted(o for p, o in seen if p == 1)
    if reset == "earliest":
        assert of_1 == list(range(10))
    else:  # nothing produced before the assignment, then contiguous
        assert of_1
        assert of_1[0] >= 10
        assert of_1 == list(range(of_1[0], of_1[0] + len(of_1)))


class _Offset:
    """An offset as the client reports it, with a per-partition error."""

    def __init__(self, partition: int, offset: int, error: Any = None) -> None:
        self.topic = "t"
        self.partition = partition
        self.offset = offset
        self.error = error


class _Consumer:
    """Stands in for librdkafka's consumer: each lookup fails or answers as told."""

    def __init__(self, committed: Any, ends: Any = ()) -> None:
        self.answers = {"committed": committed, "ends": ends}
        self.asked_ends: list[tuple[int, int]] = []
        self.commits: list[tuple[int, int]] = []

    def _answer(self, which: str) -> list[Any]:
        answer = self.answers[which]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)

    def committed(self, partitions: list[Any], timeout: float) -> list[Any]:
        return self._answer("committed")

    def offsets_for_times(self, partitions: list[Any], timeout: float) -> list[Any]:
        self.asked_ends += [(tp.partition, tp.offset) for tp in partitions]
        return self._answer("ends")

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        self.commits += [(tp.partition, tp.offset) for tp in offsets]


_TIMED_OUT = KafkaException(KafkaError(KafkaError._TIMED_OUT))


@pytest.mark.parametrize(
    ("reset", "logical"), [("earliest", OFFSET_BEGINNING), ("latest", OFFSET_END)]
)
def test_start_offsets_ask_the_log_for_partitions_without_a_commit(
    reset: str, logical: int
) -> None:
    kafka = KafkaTransport(["t"], KafkaOptions(**options(auto_offset_reset=reset)))
    asked = [TP("t", 0), TP("t", 1), TP("t", 2)]
    consumer = _Consumer(
        committed=[TP("t", 0, 7), TP("t", 1, -1001), TP("t", 2, -1001)],
        ends=[_Offset(1, 40), _Offset(2, -1, KafkaError(KafkaError._TIMED_OUT))],
    )
    got = kafka._start_offsets(consumer, asked, 5.0)
    assert got is not None
    # Partition 1 from the log; partition 2's answer failed, so librdkafka resolves it.
    assert [(tp.partition, tp.offset) for tp in got] == [(0, 7), (1, 40), (2, logical)]
    assert consumer.asked_ends == [(1, logical), (2, logical)]  # -2: log start, -1: end
    # With latest a later owner would start at the end as it is then: the start is kept.
    assert consumer.commits == ([(1, 40)] if reset == "latest" else [])


def test_start_offsets_fall_back_to_the_logical_end_when_the_log_lookup_fails() -> None:
    kafka = KafkaTransport(["t"], KafkaOptions(**options()))
    consumer = _Consumer(committed=[TP("t", 0, 7), TP("t", 1, -1001)], ends=_TIMED_OUT)
    got = kafka._start_offsets(consumer, [TP("t", 0), TP("t", 1)], 5.0)
    assert got is not None
    assert [(tp.partition, tp.offset) for tp in got] == [(0, 7), (1, OFFSET_BEGINNING)]


@pytest.mark.parametrize(
    "answer",
    [
        _TIMED_OUT,
        [_Offset(0, 7), _Offset(1, -1001, KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE))],
    ],
    ids=["lookup-failed", "partition-error"],
)
def test_start_offsets_say_so_when_committed_fails(answer: Any) -> None:
    kafka = KafkaTransport(["t"], KafkaOptions(**options()))
    assert kafka._start_offsets(_Consumer(answer), [TP("t", 0), TP("t", 1)], 5.0) is None


class _Assigning(_Consumer):
    """A :class:`_Consumer` that also records what the assign callback does with it."""

    def __init__(self, committed: Any) -> None:
        super().__init__(committed)
        self.looked_up: list[float] = []  # the timeout of each committed-offset lookup
        self.assigned: list[tuple[str, int, int]] = []
        self.paused: list[tuple[str, int]] = []
        self.resumed: list[tuple[str, int]] = []

    def committed(self, partitions: list[Any], timeout: float) -> list[Any]:
        self.looked_up.append(timeout)
        return super().committed(partitions, timeout)

    def assign(self, partitions: list[Any]) -> None:
        self.assigned = [(tp.topic, tp.partition, tp.offset) for tp in partitions]

    def pause(self, partitions: list[Any]) -> None:
        self.paused += [(tp.topic, tp.partition) for tp in partitions]

    def resume(self, partitions: list[Any]) -> None:
        self.resumed += [(tp.topic, tp.partition) for tp in partitions]


@pytest.mark.parametrize("driver", ["consumer-thread", "event-loop"])
def test_an_assignment_without_its_lookup_holds_the_retry_partitions(driver: str) -> None:
    """The committed offsets could not be looked up within the timeout (5 s on the
    consumer thread, 0.5 s on the event loop, which must not wait long on a broker that
    does not answer): the topic's partitions start where librdkafka says, the retry
    partitions are held at their log start, paused, for a later lookup."""
    kafka = KafkaTransport(["t"], KafkaOptions(**options(auto_offset_reset="latest")))
    kafka._retry_topics = {"t.retry": "t"}
    consumer = _Assigning(committed=_TIMED_OUT)
    kafka._driver_is_loop = driver == "event-loop"
    kafka._on_assign(consumer, [TP("t", 0), TP("t.retry", 0)])
    assert consumer.looked_up == ([0.5] if driver == "event-loop" else [5.0])
    assert consumer.assigned == [("t", 0, -1001), ("t.retry", 0, OFFSET_BEGINNING)]
    assert (consumer.resumed, consumer.paused) == ([("t", 0)], [("t.retry", 0)])
    assert [k for k, s in kafka._partitions.items() if s.start_unknown] == [("t.retry", 0)]
    assert kafka._starts_unknown


def test_retry_partitions_held_for_long_are_warned_about_with_the_lookups_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Held retry partitions were named once, at the assignment, and then only at DEBUG
    while the lookups kept failing (an offset fetch the broker refuses, say): a stall
    without a word. Now each warning says why, and one comes again every minute."""
    kafka = KafkaTransport(["t"], KafkaOptions(**options()))
    kafka._retry_topics = {"t.retry": "t"}
    refused = [_Offset(0, -1001, KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))]
    consumer = _Assigning(committed=refused)
    with caplog.at_level(logging.WARNING, "amgi.servers.kafka"):
        kafka._on_assign(consumer, [TP("t", 0), TP("t.retry", 0)])
        [assigned] = [r.getMessage() for r in caplog.records]
        assert "t[0]: Broker: Group authorization failed" in assigned
        assert "t.retry[0] are held" in assigned
        caplog.clear()
        consumer.answers["committed"] = _TIMED_OUT
        kafka._resolve_starts(consumer, [("t.retry", 0)])
        assert caplog.records == []  # within a minute of the last warning
        monkeypatch.setattr(amgi.servers.kafka._consumer, "_HELD_WARN_INTERVAL", 0.0)
        kafka._resolve_starts(consumer, [("t.retry", 0)])
        [again] = [r.getMessage() for r in caplog.records]
    assert "t.retry[0] are still held" in again
    assert "(Local: Timed out)" in again
    assert kafka._partitions[("t.retry", 0)].start_unknown


class _SlowCommitted(_Consumer):
    """A :class:`_Consumer` whose committed-offset lookup takes ``slow`` seconds to answer;
    records the timeout each lookup was given."""

    def __init__(self, slow: float, **answers: Any) -> None:
        super().__init__(**answers)
        self.slow = slow
        self.timeouts: dict[str, float] = {}

    def committed(self, partitions: list[Any], timeout: float) -> list[Any]:
        self.timeouts["committed"] = timeout
        time.sleep(self.slow)
        return super().committed(partitions, timeout)

    def offsets_for_times(self, partitions: list[Any], timeout: float) -> list[Any]:
        self.timeouts["ends"] = timeout
        return super().offsets_for_times(partitions, timeout)


@pytest.mark.parametrize("slow", [0.3, 0.45])
def test_the_two_lookups_at_assignment_share_one_timeout(slow: float) -> None:
    """On the event loop the lookups at assignment may take 0.5 s together (each had 0.5 s,
    so the loop could wait a second): the log-end lookup gets what the committed one left,
    but at least 0.1 s (without it the partition would start where librdkafka resolves
    ``latest`` later, past what was produced meanwhile)."""
    kafka = KafkaTransport(["t"], KafkaOptions(**options(auto_offset_reset="latest")))
    consumer = _SlowCommitted(slow, committed=[TP("t", 0, -1001)], ends=[_Offset(0, 40)])
    got = kafka._start_offsets(consumer, [TP("t", 0)], 0.5)
    assert got is not None
    assert consumer.timeouts["committed"] == 0.5
    if slow < 0.4:
        assert 0.1 <= consumer.timeouts["ends"] <= 0.5 - slow
    else:
        assert consumer.timeouts["ends"] == 0.1
    assert [(tp.partition, tp.offset) for tp in got] == [(0, 40)]


def fail_lookups(monkeypatch: pytest.MonkeyPatch, failing: set[str]) -> None:
    """Make the lookups of committed offsets made by the transport's methods named in
    ``failing`` fail (``_on_assign``: at assignment, whichever thread runs it;
    ``_resolve_starts``: the consumer thread's later ones); the set may change as the
    test goes. Others are real.

    They are asked with no time at all, and should librdkafka still answer (it does, now
    and then: full runs saw a lookup asked with 0 s succeed, at assignment and later),
    they are reported failed all the same: these tests are about what follows a failed
    lookup."""
    real = Consuming._start_offsets

    def failing_lookup(
        self: Consuming, consumer: Any, partitions: list[Any], timeout: float
    ) -> list[Any] | None:
        if sys._getframe(1).f_code.co_name not in failing:
            return real(self, consumer, partitions, timeout)
        starts = real(self, consumer, partitions, 0.0)
        if starts is not None:
            logging.getLogger(__name__).warning("a lookup asked with 0 s answered")
            self._start_lookup_error = "Local: Timed out"
        return None

    monkeypatch.setattr(Consuming, "_start_offsets", failing_lookup)


@pytest.mark.parametrize("lookup", ["answered", "failed", "failed-twice", "failed-for-a-while"])
async def test_retry_copies_waiting_at_a_restart_are_delivered_with_latest(
    lookup: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A retry topic holds only records the group owes: a partition of it without a
    committed offset starts at its log start whatever ``--auto-offset-reset`` says. With
    ``latest`` it started at its end, so a retry copy made before a restart (the
    original already committed, the copy not yet due, nothing of the retry topic
    committed) was skipped: the message was lost.

    ``failed``: the restarted server's lookup at assignment fails (a broker slow to
    answer), so librdkafka resolves the start itself, from the committed offset, else
    from ``latest``: the retry partition's start is committed when it is first assigned,
    so that it finds one.

    ``failed-twice``: the lookups at assignment fail in both runs, so nothing of the
    retry topic was ever committed and librdkafka would resolve its start from ``latest``
    (the copy was skipped): a retry partition whose start the assignment could not tell
    is held paused at its log start until a later lookup (on the consumer thread) does.
    ``failed-for-a-while``: those later lookups fail too for a second and a half: the
    copy waits, paused, and comes once one answers."""
    caplog.set_level(logging.DEBUG, "amgi.servers.kafka")  # the assignments, should it fail
    topic = create_topic(fresh("late"), partitions=1)
    group = options(auto_offset_reset="latest")
    attempts: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        event = await receive()
        attempts.append(event["bindings"]["amgi"]["attempt"])
        if len(attempts) == 1:
            await send({"type": "message.nack", "id": event["id"], "message": "later"})
        else:
            await send({"type": "message.ack", "id": event["id"]})

    def runtime() -> Runtime:
        kafka = KafkaTransport([topic], KafkaOptions(**group))
        config = RuntimeConfig(lifespan="off", crash_ledger="", retry_delay=2.0)
        return Runtime(app, kafka, config)

    failing: set[str] = set()
    fail_lookups(monkeypatch, failing)
    if lookup in ("failed-twice", "failed-for-a-while"):  # from the first assignment on
        failing.add("_on_assign")
    first = runtime()
    server = asyncio.create_task(first.serve())
    deadline = time.monotonic() + 20
    while not first.transport._partitions:  # assigned: a record now is seen
        assert not server.done(), server.result()
        assert time.monotonic() < deadline, "never assigned"
        await asyncio.sleep(0.02)
    if lookup in ("failed-twice", "failed-for-a-while"):
        # librdkafka resolves the topic's start itself (latest): a record produced before
        # it has would be skipped, as latest asks. It takes about 0.1 s.
        await asyncio.sleep(1.0)
    produce(topic, [(b"k", b"once", [])])
    while not attempts:
        assert time.monotonic() < deadline, "never delivered"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # the copy is on the broker, the original committed
    first.request_stop()
    assert await asyncio.wait_for(server, 30) == 0
    assert attempts == [1]  # stopped before the retry was due

    if lookup == "failed":  # every lookup at assignment fails
        failing.add("_on_assign")
    if lookup == "failed-for-a-while":  # the later ones too, for a while
        failing.add("_resolve_starts")
    second = runtime()
    server = asyncio.create_task(second.serve())
    try:
        if lookup == "failed-for-a-while":
            while not second.transport._partitions:  # the join, slower on a busy machine
                assert not server.done(), server.result()
                assert time.monotonic() < deadline + 20, "never assigned again"
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.5)  # the copy is due by now: held by the lookups only
            assert attempts == [1]
            assert [k for k, s in second.transport._partitions.items() if s.start_unknown]
            held = [r.getMessage() for r in caplog.records if "held until" in r.getMessage()]
            assert held
            assert f"{topic}.retry[0]" in held[-1], held
            failing.discard("_resolve_starts")
        while len(attempts) < 2:
            assert not server.done(), server.result()
            assert time.monotonic() < deadline, f"the retry never came back: {attempts}"
            await asyncio.sleep(0.02)
    finally:
        second.request_stop()
        assert await asyncio.wait_for(server, 30) == 0
    assert attempts == [1, 2]
    held = [r for r in caplog.records if "held until a lookup answers" in r.getMessage()]
    failed_runs = {"answered": 0, "failed": 1, "failed-twice": 2, "failed-for-a-while": 2}
    assert len(held) == failed_runs[lookup], [r.getMessage() for r in caplog.records]


async def fetch_while_producing(kafka: KafkaTransport, topic: str, sent: list[int]) -> list[int]:
    """The offsets of ``kafka``'s first fetch, made while a record is produced every 0.2 s
    until it returns (a partition without a commit starts at the end with ``latest``,
    which is not observable from outside); ``sent`` gets the payload number of each."""
    fetch = asyncio.ensure_future(kafka.fetch())
    deadline = time.monotonic() + 30
    try:
        while not fetch.done():
            assert time.monotonic() < deadline, "nothing fetched"
            produce(topic, records(0, len(sent), 1))
            sent.append(len(sent))
            await asyncio.wait([fetch], timeout=0.2)
    finally:
        fetch.cancel()  # done unless the wait failed
    return sorted(m.bindings["kafka"]["offset"] for b in fetch.result() for m in b.messages)


async def test_a_member_gone_before_its_first_commit_leaves_the_next_its_start() -> None:
    """With ``latest`` a partition the group has no offset for starts at its log end. A
    member gone before its first commit (killed, dropped from the group, closed with
    nothing settled) left no offset, so the next owner started at the end as it was then:
    every record produced since the group first got the partition was never processed.
    The start is committed at assignment now, and the next owner starts there."""
    topic = create_topic(fresh("gone"), partitions=1)
    produce(topic, records(0, 0, 1))  # before the group: skipped, as latest asks
    group = KafkaOptions(**options(auto_offset_reset="latest"))
    sent = [0]
    first = KafkaTransport([topic], group)
    await first.connect()
    try:
        handed_out = await fetch_while_producing(first, topic, sent)
    finally:
        await first.close()  # nothing settled: it commits nothing
    produce(topic, records(0, len(sent), 2))  # while the group has no member
    sent += [len(sent), len(sent) + 1]
    second = KafkaTransport([topic], group)
    await second.connect()
    try:
        got = await fetch_while_producing(second, topic, sent)
        deadline = time.monotonic() + 20
        while got[-1] < len(sent) - 1:  # a fresh topic: record i is at offset i
            assert time.monotonic() < deadline, f"got {got} of {len(sent)}"
            batches = await asyncio.wait_for(second.fetch(), 20)
            got += [m.bindings["kafka"]["offset"] for b in batches for m in b.messages]
    finally:
        await second.close()
    assert got[0] <= handed_out[0], (handed_out, got)  # where the group first started
    assert got == list(range(got[0], len(sent)))
