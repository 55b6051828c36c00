"""The Redis server against real Redis: field layout, recovery, processes, restarts, bad input."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.options import check
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.redis import RedisOptions, RedisSendError, RedisTransport
from amgi.servers.redis._client import execute_packed, open_client, pack
from amgi.servers.redis._fields import decode, encode
from amgi.testing.conformance import Received, Recorder
from amgi.transport import Batch, DeadLetter, Message, Retry, Settlement
from tests.apps import attempts_app, send_all, serve_in_stops
from tests.cli import amgi
from tests.core.test_cli import one_line_error
from tests.net import free_port
from tests.races import STEPS, cancel_after_completion
from tests.servers.amgi_process import (
    STARTUP_APP,
    AmgiProcess,
    processes,
    share_without_duplicates,
    until,
)
from tests.servers.crash_loop import CrashLoop
from tests.servers.private_brokers import private_redis
from tests.servers.redis_helpers import (
    URL,
    Cutter,
    client,
    delivery_count,
    ensure_broker,
    entries,
    fresh,
    pending,
)

__all__ = ["processes"]


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


# -- the field layout (pure) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "payload", "fields"),
    [
        ([(b"a", b"1"), (b"a", b"2")], b"p", [b"a", b"1", b"a", b"2", b"payload", b"p"]),
        ([], None, [b"amgi.none", b""]),
        ([(b"k", b"v")], None, [b"k", b"v"]),
        ([], b"", [b"payload", b""]),
        ([(b"payload", b"h")], b"p", [b"amgi.header.payload", b"h", b"payload", b"p"]),
        ([(b"amgi.x", b"\x00")], b"", [b"amgi.header.amgi.x", b"\x00", b"payload", b""]),
    ],
)
def test_entry_fields_are_byte_exact_and_round_trip(
    headers: list[tuple[bytes, bytes]], payload: bytes | None, fields: list[bytes]
) -> None:
    assert encode(headers, payload) == fields
    assert decode(fields) == (headers, payload)


def test_entries_written_by_others_read_as_headers_and_payload() -> None:
    # redis-cli XADD orders * source cli payload '{"id": 1}' amgi.unknown x
    fields = [b"source", b"cli", b"payload", b'{"id": 1}', b"amgi.unknown", b"x"]
    assert decode(fields) == ([(b"source", b"cli"), (b"amgi.unknown", b"x")], b'{"id": 1}')


@pytest.mark.parametrize(
    "args",
    [
        [b"XACK", b"orders", b"billing", b"1700000000000-0", b"1700000000000-1"],
        [b"PING"],
        [b"SET", b"k", b""],
        [b"SET", b"\r\n\x00", b"\xff" * 7000],
    ],
)
def test_a_packed_command_is_what_redis_py_sends(args: list[bytes]) -> None:
    from redis.asyncio.connection import Connection

    assert pack(args) == b"".join(Connection().pack_command(*args))


async def test_a_packed_xack_acks_and_reconnects_over_a_killed_connection() -> None:
    from redis.exceptions import ResponseError

    stream, group = fresh("packed"), fresh("g")
    c = await open_client(URL, 5, 5)
    other = await client()
    try:
        await c.execute_command("XGROUP CREATE", stream, group, "0", "MKSTREAM")
        ids = [await c.execute_command("XADD", stream, "*", "payload", b"x") for _ in range(3)]
        await c.execute_command("XREADGROUP", "GROUP", group, "me", "STREAMS", stream, ">")
        assert (
            await execute_packed(c, pack([b"XACK", stream.encode(), group.encode(), ids[0]])) == 1
        )
        # The pooled connection dies (a broker restart, a proxy timeout): one retry on a
        # new connection, as redis-py's own commands do.
        own = await c.execute_command("CLIENT ID")
        assert await other.execute_command("CLIENT KILL", "ID", own) == 1
        assert await execute_packed(c, pack([b"XACK", stream.encode(), group.encode(), *ids])) == 2
        assert await pending(stream, group) == 0
        await c.execute_command("SET", f"{stream}-plain", "v")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await execute_packed(c, pack([b"XACK", f"{stream}-plain".encode(), b"g", ids[0]]))
    finally:
        await c.delete(stream, f"{stream}-plain")
        await c.aclose()
        await other.aclose()


# -- the transport: ids, attempts, recovery -----------------------------------------------


async def fetch_all(t: RedisTransport, n: int) -> list[Message]:
    got: list[Message] = []
    async with asyncio.timeout(15):
        while len(got) < n:
            for batch in await t.fetch():
                got.extend(batch.messages)
    return got


async def test_a_retry_keeps_the_entry_id_and_counts_the_delivery() -> None:
    stream, group = fresh("retry"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.1))
    await t.connect()
    try:
        await t.publish(stream, [(b"h", b"1")], b"again", {})
        (first,) = await fetch_all(t, 1)
        assert first.attempt == 1
        await t.settle(Batch(stream, [first]), Settlement(retry=[Retry(first, "not yet", 0.1)]))
        assert await pending(stream, group) == 1, "a retry must stay pending, not be acked"
        (again,) = await fetch_all(t, 1)
        assert again.id == first.id
        assert again.attempt == 2
        assert again.bindings["redis"] == {"stream": stream, "id": first.id}
    finally:
        await t.close()


@pytest.mark.parametrize("steps", range(STEPS))
async def test_a_stop_that_meets_a_settlement_wake_is_not_lost(steps: int) -> None:
    """With its read-ahead full, the fetch waits for a settlement; a cancel landing as it
    is woken ends it. (White-box: the test fires the streams' release event. The read
    loop's own cancellation check covered this before the wait used asyncio.timeout.)"""
    stream, group = fresh("race"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, batch_size=1, block=5))
    await t.connect()
    try:
        for payload in (b"a1", b"a2"):
            await t.publish(stream, [], payload, {})
        held = [b for _ in range(2) for b in await t.fetch()]
        assert [b.messages[0].payload for b in held] == [b"a1", b"a2"]
        streams = t._streams
        assert streams is not None
        fetch = await cancel_after_completion(t.fetch(), streams._released.set, steps)
        assert fetch.cancelled(), "nothing to return, it waits on: the cancel lands"
        for batch in held:
            await t.settle(batch, Settlement(acked=list(batch.messages)))
        assert await pending(stream, group) == 0
    finally:
        await t.close()


async def a_read_waiting(
    t: RedisTransport,
) -> tuple[asyncio.Future[Sequence[Batch]], asyncio.Future[Any]]:
    """A fetch of ``t`` started, and its read, once that waits in ``XREADGROUP``."""
    fetching = asyncio.ensure_future(t.fetch())
    await asyncio.sleep(0.2)
    reading = t._reading
    assert reading is not None
    return fetching, reading


async def test_a_fetch_cancelled_as_its_read_ends_leaves_the_batch_for_the_hand_over() -> None:
    """The stop cancels the fetch in the loop turn its read ends: the read's batch was
    dropped with the cancelled fetch (never handed out, pending on this consumer until
    another claimed it with an attempt more). Now the hand-over returns it."""
    stream, group = fresh("cancelled"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=2))
    await t.connect()
    try:
        fetching, reading = await a_read_waiting(t)
        reading.add_done_callback(lambda _: fetching.cancel())  # the stop, in that turn
        await t.publish(stream, [], b"x", {})
        with pytest.raises(asyncio.CancelledError):
            await fetching
        handed = await t.hand_over()
        assert [m.payload for b in handed for m in b.messages] == [b"x"]
        for batch in handed:
            await t.settle(batch, Settlement(acked=list(batch.messages)))
        assert await pending(stream, group) == 0
    finally:
        await t.close()


async def test_a_read_that_was_itself_cancelled_is_read_again_by_the_next_fetch() -> None:
    """The read in flight is cancelled itself (as the hand-over cuts off a read Redis did
    not answer): a later fetch reads anew instead of raising the old cancellation."""
    stream, group = fresh("recancel"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=2))
    await t.connect()
    try:
        fetching, reading = await a_read_waiting(t)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetching
        await t.publish(stream, [], b"x", {})
        async with asyncio.timeout(10):
            (batch,) = await t.fetch()
        assert [m.payload for m in batch.messages] == [b"x"]
        await t.settle(batch, Settlement(acked=list(batch.messages)))
    finally:
        await t.close()


async def test_a_block_of_5_s_or_more_is_waited_out_not_cut_short() -> None:
    """redis-py 8 waits 5 s for a reply by default: an idle ``XREADGROUP BLOCK 5500``
    failed after 5 s (``Timeout reading from ...``, a fetch error and a reconnect every
    time). The client now waits ``--block`` and some for a reply."""
    stream, group = fresh("block"), fresh("g")
    options = RedisOptions(url=URL, group=group, block=5.5, claim_idle=60)
    t = RedisTransport([stream], options)
    await t.connect()
    try:
        fetching = asyncio.ensure_future(t.fetch())
        await asyncio.sleep(5.2)  # the read waits in XREADGROUP, past redis-py's 5 s
        assert not fetching.done(), fetching.exception()
        await t.publish(stream, [], b"x", {})
        async with asyncio.timeout(10):
            (batch,) = await fetching
        assert [m.payload for m in batch.messages] == [b"x"]
        await t.settle(batch, Settlement(acked=list(batch.messages)))
    finally:
        await t.close()


async def test_a_stream_is_read_ahead_by_one_batch_and_others_keep_flowing() -> None:
    one, two, group = fresh("ahead1"), fresh("ahead2"), fresh("g")
    t = RedisTransport([one, two], RedisOptions(url=URL, group=group, batch_size=1, block=0.1))
    await t.connect()
    try:
        for payload in (b"a1", b"a2", b"a3"):
            await t.publish(one, [], payload, {})
        held = [b for _ in range(2) for b in await t.fetch() if b.address == one]
        assert [b.messages[0].payload for b in held] == [b"a1", b"a2"]
        # Two batches of ``one`` are in the runtime's hands: only ``two`` is read.
        await t.publish(two, [], b"b1", {})
        async with asyncio.timeout(15):
            got = [b for b in await t.fetch() if b.messages]
        assert [(b.address, b.messages[0].payload) for b in got] == [(two, b"b1")]
        await t.publish(two, [], b"b2", {})
        (b2,) = await t.fetch()
        assert b2.messages[0].payload == b"b2"
        with pytest.raises(TimeoutError):  # both streams wait for a settlement
            await asyncio.wait_for(t.fetch(), 0.5)
        await t.settle(held[0], Settlement(acked=list(held[0].messages)))
        async with asyncio.timeout(15):
            (a3,) = await t.fetch()
        assert (a3.address, a3.messages[0].payload) == (one, b"a3")
        assert await pending(one, group) == 2
    finally:
        await t.close()


async def test_a_stop_runs_the_batches_read_and_still_waiting_for_a_slot() -> None:
    """One read brings a batch of each of three streams, one slot runs them: at the
    stop, the two still waiting are processed. Left pending on the stopped consumer,
    they would be claimed by the next one with their delivery counter raised."""
    streams, group = [fresh("wait1"), fresh("wait2"), fresh("wait3")], fresh("g")
    options = RedisOptions(url=URL, group=group, batch_size=5, block=0.1, claim_idle=0.5)
    sender = RedisTransport([], RedisOptions(url=URL))
    await send_all(sender, ((st, f"{st}-{i}".encode()) for st in streams for i in range(5)))
    config = RuntimeConfig(lifespan="off", concurrency=1, shutdown_timeout=10)
    seen, runs = await serve_in_stops(lambda: RedisTransport(streams, options), 15, config)
    assert sorted(p for p, _ in seen) == sorted(
        f"{s}-{i}".encode() for s in streams for i in range(5)
    )
    assert {attempt for _, attempt in seen} == {1}
    assert runs == 1, "one read brought every stream's batch and the stop ran them"
    for stream in streams:
        assert await pending(stream, group) == 0


@pytest.mark.parametrize("stop", [False, True])
async def test_a_batch_waiting_for_a_slot_is_kept_from_other_consumers(stop: bool) -> None:
    """One read brings a batch of each of two streams; one slot runs the first (slowly)
    while the second waits, also when the stop comes meanwhile. The waiting batch's
    entries went untouched, and after --claim-idle another consumer claimed them (attempt
    2, a duplicate; dead-lettered there with --max-attempts 1) though this one was about
    to process them."""
    slow, waiting, group = fresh("slow"), fresh("waiting"), fresh("g")
    await send_all(RedisTransport([], RedisOptions(url=URL)), [(slow, b"s"), (waiting, b"w")])
    seen: list[tuple[bytes, int]] = []
    called = asyncio.Event()
    options = RedisOptions(url=URL, group=group, block=0.1, claim_idle=0.6)
    transport = RedisTransport([slow, waiting], options)
    runtime = Runtime(
        attempts_app(seen, called=called, linger=1.5),
        transport,
        RuntimeConfig(lifespan="off", concurrency=1),
    )
    serving = asyncio.create_task(runtime.serve())
    c = await client()
    try:
        await asyncio.wait_for(called.wait(), 10)
        assert seen == [(b"s", 1)], "the slow stream's batch runs first, the other waits"
        if stop:
            runtime.request_stop()
        await asyncio.sleep(1.0)  # the first call lingers on, past --claim-idle
        _, stolen, *_ = await c.execute_command("XAUTOCLAIM", waiting, group, "thief", 600, "0-0")
        assert stolen == [], "another consumer took entries this one holds"
    finally:
        await c.aclose()
        runtime.request_stop()
        assert await asyncio.wait_for(serving, 20) == 0
    assert sorted(seen) == [(b"s", 1), (b"w", 1)]


async def serving_commands(
    transport: RedisTransport, app: Any
) -> tuple[Runtime, asyncio.Task[int], Callable[..., Awaitable[Any]]]:
    """Serve ``app`` on ``transport`` until started; the runtime, its task, and the
    streams' own read of new entries (``XREADGROUP ... >``, for a test to wrap)."""
    runtime = Runtime(app, transport, RuntimeConfig(lifespan="off"))
    serving = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(runtime.started.wait(), 10)
    assert transport._streams is not None
    return runtime, serving, transport._streams._read_new


async def test_a_stop_as_a_read_answers_processes_what_it_read() -> None:
    """The stop comes while a read's answer is on its way (here: held back 0.5 s once it
    came). Cut off, the read left its entries pending on the stopped consumer, and the
    next one claimed them with their delivery counter raised. The read now runs on,
    and the stop processes what it brought."""
    stream, group = fresh("answer"), fresh("g")
    options = RedisOptions(url=URL, group=group, block=0.5, claim_idle=0.5)
    seen: list[tuple[bytes, int]] = []
    called = asyncio.Event()
    answered = asyncio.Event()
    transport = RedisTransport([stream], options)
    runtime, serving, real = await serving_commands(transport, attempts_app(seen, called=called))
    try:

        async def slow_answer(*args: Any, **kwargs: Any) -> Any:
            reply = await real(*args, **kwargs)
            if reply:
                answered.set()
                await asyncio.sleep(0.5)
            return reply

        assert transport._streams is not None
        transport._streams._read_new = slow_answer  # type: ignore[method-assign]
        await transport.publish(stream, [], b"one", {})
        await asyncio.wait_for(answered.wait(), 10)
        runtime.request_stop()
        assert await asyncio.wait_for(serving, 20) == 0
    finally:
        runtime.request_stop()
    assert seen == [(b"one", 1)]
    assert await pending(stream, group) == 0


async def test_a_stop_waits_no_longer_than_the_block_for_a_read_that_never_answers() -> None:
    """Redis answers a read within ``--block``: one still open after that (Redis gone, a
    reconnect) is cancelled, and the stop does not wait out the shutdown timeout."""
    stream, group = fresh("silent"), fresh("g")
    transport = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.5))
    runtime, serving, real = await serving_commands(transport, attempts_app([]))
    try:

        async def silent(*args: Any, **kwargs: Any) -> Any:
            await asyncio.Event().wait()
            return await real(*args, **kwargs)

        assert transport._streams is not None
        transport._streams._read_new = silent  # type: ignore[method-assign]
        await asyncio.sleep(1.0)  # the read in flight before has ended: only a silent one
    finally:
        started = asyncio.get_running_loop().time()
        runtime.request_stop()
    assert await asyncio.wait_for(serving, 30) == 0
    assert asyncio.get_running_loop().time() - started < 6  # 0.5 s and a little, not 30 s


async def test_entries_of_a_silent_consumer_are_claimed_with_their_delivery_count() -> None:
    stream, group = fresh("claim"), fresh("g")
    options = RedisOptions(url=URL, group=group, block=0.1, claim_idle=0.3)
    crashed = RedisTransport([stream], options)
    await crashed.connect()
    await crashed.publish(stream, [], b"one", {})
    await crashed.publish(stream, [], b"two", {})
    taken = await fetch_all(crashed, 2)
    await crashed.close()  # never settled: the entries stay pending on that consumer
    other = RedisTransport([stream], options)
    await other.connect()
    try:
        again = await fetch_all(other, 2)
        assert [m.id for m in again] == [m.id for m in taken]
        assert [m.attempt for m in again] == [2, 2]
    finally:
        await other.close()


async def test_the_sweep_never_claims_an_entry_this_process_holds() -> None:
    """The lease of an entry in the application's hands lapsed past --claim-idle (the
    event loop held up): this process's own sweep took it back and handed it out again
    while the first delivery was still running, attempt 2 alongside attempt 1."""
    stream, group = fresh("ownsweep"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.1, claim_idle=0.2))
    await t.connect()
    try:
        await t.publish(stream, [], b"one", {})
        (held,) = await fetch_all(t, 1)
        await asyncio.sleep(0.4)  # no lease renewed: the entry is idle past --claim-idle
        again = asyncio.ensure_future(fetch_all(t, 1))
        await asyncio.wait([again], timeout=0.6)  # the sweeps run meanwhile
        assert not again.done(), "handed out again while in the application's hands"
        again.cancel()
        await asyncio.gather(again, return_exceptions=True)
        assert await delivery_count(stream, group, held.token) == 1
        await t.extend([Batch(stream, [held])])  # the lapsed lease is renewed
        await t.settle(Batch(stream, [held]), Settlement(acked=[held]))
        assert await pending(stream, group) == 0
    finally:
        await t.close()


async def test_a_lapsed_lease_is_not_taken_back_from_the_consumer_that_claimed_it() -> None:
    """Past --claim-idle without a renewal, another process rightly claimed the entry
    (this one looked gone). The late renewal (``XCLAIM`` of idle time 0) took it back
    from that consumer while it ran there; only what is still this consumer's is renewed."""
    stream, group = fresh("lapsed"), fresh("g")
    options = RedisOptions(url=URL, group=group, block=0.1, claim_idle=0.2)
    late, other = RedisTransport([stream], options), RedisTransport([stream], options)
    await late.connect()
    await other.connect()
    try:
        await late.publish(stream, [], b"one", {})
        (held,) = await fetch_all(late, 1)
        await asyncio.sleep(0.3)  # the lease lapsed: the other consumer takes the entry
        (taken,) = await fetch_all(other, 1)
        assert (taken.id, taken.attempt) == (held.id, 2)
        await late.extend([Batch(stream, [held])])
        c = await client()
        try:
            rows = await c.execute_command("XPENDING", stream, group, held.id, held.id, 1)
        finally:
            await c.aclose()
        assert rows[0][1] == other.consumer.encode(), "the late renewal took the entry back"
    finally:
        await late.close()
        await other.close()


async def fetch_through(t: RedisTransport, n: int) -> list[Message]:
    """``fetch_all``, a fetch that fails (a lost connection) tried again."""
    from redis.exceptions import RedisError

    got: list[Message] = []
    async with asyncio.timeout(5):
        while len(got) < n:
            try:
                batches = await t.fetch()
            except RedisError:
                await asyncio.sleep(0.05)
                continue
            for batch in batches:
                got.extend(batch.messages)
    return got


@pytest.mark.parametrize(
    ("rule", "word", "times"),
    [
        ("lose", b"XAUTOCLAIM", 1),
        ("cut", b"XPENDING", 4),
        ("lose", b"XPENDING", 4),
        ("lose", b"RETRYCOUNT", 4),
    ],
)
async def test_a_claim_cut_off_by_a_lost_connection_counts_one_delivery(
    rule: str, word: bytes, times: int
) -> None:
    """The sweep claimed a silent consumer's entry (its counter went up), then the
    connection went before the attempt was known (XPENDING), or the claim's reply was lost
    (redis-py sent the claim again, which found nothing idle): the entry stayed pending on
    this consumer unseen, and was claimed again after --claim-idle, attempt 3 for 2."""
    stream, group = fresh("cutclaim"), fresh("g")
    options = RedisOptions(url=URL, group=group, block=0.1, claim_idle=0.3)
    first = await left_pending(stream, options)
    async with Cutter() as cutter:
        other = RedisTransport([stream], RedisOptions(**{**vars_of(options), "url": cutter.url}))
        await other.connect()
        getattr(cutter, rule)[word] = times
        try:
            (again,) = await fetch_through(other, 1)
            assert (again.id, again.attempt) == (first.id, 2)
            await other.settle(Batch(stream, [again]), Settlement(acked=[again]))
            assert await pending(stream, group) == 0
        finally:
            await other.close()


@pytest.mark.parametrize(
    ("rule", "word", "times"),
    [("lose", b"XREADGROUP", 1), ("cut", b"XPENDING", 4), ("lose", b"RETRYCOUNT", 4)],
)
async def test_a_history_read_cut_off_by_a_lost_connection_counts_one_delivery(
    rule: str, word: bytes, times: int
) -> None:
    """A named consumer restarted reads what it left pending; that read counts a delivery,
    and one whose reply was lost counted it twice (attempt 3 for 2)."""
    stream, group = fresh("cuthistory"), fresh("g")
    options = RedisOptions(url=URL, group=group, consumer="n1", block=0.1)
    first = await left_by_a_run(stream, options)
    async with Cutter() as cutter:
        getattr(cutter, rule)[word] = times
        again = RedisTransport([stream], RedisOptions(**{**vars_of(options), "url": cutter.url}))
        await again.connect()
        try:
            (taken,) = await fetch_through(again, 1)
            assert (taken.id, taken.attempt) == (first.id, 2)
        finally:
            await again.close()


@pytest.mark.parametrize("consumer", ["", "n1"])
async def test_entries_of_a_read_whose_reply_was_lost_come_as_first_attempts(
    consumer: str,
) -> None:
    """Redis ran an XREADGROUP ... > whose reply was lost (redis-py sent it again, which
    found nothing new): its entries stayed pending on this consumer unseen, and the sweep
    claimed them after --claim-idle as attempt 2 (dead letters at --max-attempts 1)."""
    stream, group = fresh("lostread"), fresh("g")
    async with Cutter() as cutter:
        options = RedisOptions(
            url=cutter.url, group=group, consumer=consumer, block=0.1, claim_idle=0.3
        )
        t = RedisTransport([stream], options)
        await t.connect()
        try:
            cutter.lose[b"XREADGROUP"] = 1
            await t.publish(stream, [], b"lost", {})
            (got,) = await fetch_through(t, 1)
            assert (got.payload, got.attempt) == (b"lost", 1)
            assert await delivery_count(stream, group, got.token) == 1
            await t.settle(Batch(stream, [got]), Settlement(acked=[got]))
            assert await pending(stream, group) == 0
        finally:
            await t.close()


async def test_a_lost_read_brings_back_only_the_entries_it_read() -> None:
    """After a read whose reply was lost, this consumer's own pending entries of delivery
    count 1 are the candidates: one in the application's hands and one waiting for its
    retry are not among them; the lost read's two entries come at once, first attempts."""
    stream, group = fresh("lostonly"), fresh("g")
    async with Cutter() as cutter:
        t = RedisTransport([stream], RedisOptions(url=cutter.url, group=group, block=0.1))
        await t.connect()
        try:
            for payload in (b"held", b"waits"):
                await t.publish(stream, [], payload, {})
            held, waits = await fetch_through(t, 2)
            await t.settle(Batch(stream, [waits]), Settlement(retry=[Retry(waits, "later", 60)]))
            cutter.lose[b"XREADGROUP"] = 1
            for payload in (b"lost1", b"lost2"):
                await t.publish(stream, [], payload, {})
            got = await fetch_through(t, 2)
            assert [(m.payload, m.attempt) for m in got] == [(b"lost1", 1), (b"lost2", 1)]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    assert await fetch_through(t, 1) == []
            assert [await delivery_count(stream, group, m.token) for m in (held, waits)] == [1, 1]
        finally:
            await t.close()


async def test_a_lost_read_leaves_a_claimed_entry_in_flight_alone() -> None:
    """A named consumer's history read took back an entry handed back uncounted (its
    counter 0, now 1): pending here with delivery count 1 and an id past every read of new
    entries, it is in the application's hands, not one a lost read left."""
    stream, group = fresh("lostclaimed"), fresh("g")
    options = RedisOptions(url=URL, group=group, consumer="n1", block=0.1)
    first = await left_by_a_run(stream, options, handed_back=True)
    async with Cutter() as cutter:
        t = RedisTransport([stream], RedisOptions(**{**vars_of(options), "url": cutter.url}))
        await t.connect()
        try:
            (held,) = await fetch_through(t, 1)
            assert (held.id, held.attempt) == (first.id, 1)
            cutter.lose[b"XREADGROUP"] = 1
            await t.publish(stream, [], b"lost", {})
            (got,) = await fetch_through(t, 1)
            assert (got.payload, got.attempt) == (b"lost", 1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    assert await fetch_through(t, 1) == []
        finally:
            await t.close()


async def test_a_retry_whose_claim_lost_its_reply_counts_one_delivery() -> None:
    """The retry's XCLAIM counted a delivery, its reply was lost, and redis-py sent it
    again, which counted another: the application was told attempt 2, Redis kept 3."""
    stream, group = fresh("lostretry"), fresh("g")
    async with Cutter() as cutter:
        t = RedisTransport([stream], RedisOptions(url=cutter.url, group=group, block=0.1))
        await t.connect()
        try:
            await t.publish(stream, [], b"again", {})
            (first,) = await fetch_through(t, 1)
            await t.settle(Batch(stream, [first]), Settlement(retry=[Retry(first, "x", 0.05)]))
            cutter.lose[b"XCLAIM"] = 1
            (again,) = await fetch_through(t, 1)
            assert (again.id, again.attempt) == (first.id, 2)
            assert await delivery_count(stream, group, again.token) == 2
        finally:
            await t.close()


async def left_by_a_run(stream: str, options: RedisOptions, handed_back: bool = False) -> Message:
    """An entry a run of the named consumer of ``options`` left pending on its name,
    ``handed_back`` uncounted (its delivery counter set back to 0) or never settled."""
    before = RedisTransport([stream], options)
    await before.connect()
    await before.publish(stream, [], b"left", {})
    (first,) = await fetch_all(before, 1)
    if handed_back:
        retry = Retry(first, "not had", 60, uncounted=True)
        await before.settle(Batch(stream, [first]), Settlement(retry=[retry]))
    await before.close()
    return first


async def left_pending(stream: str, options: RedisOptions) -> Message:
    """An entry ``left`` delivered to a consumer that dies, idle for ``--claim-idle``."""
    crashed = RedisTransport([stream], options)
    await crashed.connect()
    await crashed.publish(stream, [], b"left", {})
    (first,) = await fetch_all(crashed, 1)
    await crashed.close()  # never settled: pending on that consumer
    await asyncio.sleep(options.claim_idle + 0.05)
    return first


def vars_of(options: RedisOptions) -> dict[str, Any]:
    return {f: getattr(options, f) for f in options.__dataclass_fields__}


async def test_a_named_consumer_restarted_late_gets_each_pending_entry_once() -> None:
    """Restarted after --claim-idle, a named consumer reads its earlier pending entries
    batch by batch while the sweep claims idle ones (to itself): the history read then
    handed out again what the sweep had handed out already (a duplicate, attempt 3)."""
    stream, group = fresh("late"), fresh("g")
    first = RedisTransport(
        [stream], RedisOptions(url=URL, group=group, consumer="n1", block=0.1, batch_size=10)
    )
    await first.connect()
    for i in range(6):
        await first.publish(stream, [], b"%d" % i, {})
    taken = await fetch_all(first, 6)
    await first.close()  # never settled: pending on n1
    await asyncio.sleep(0.4)
    again = RedisTransport(
        [stream],
        RedisOptions(url=URL, group=group, consumer="n1", block=0.1, batch_size=2, claim_idle=0.3),
    )
    await again.connect()
    got: list[tuple[str, int]] = []
    try:
        # Nothing settled yet: the batches are in the application's hands meanwhile.
        async with asyncio.timeout(10):
            while len({i for i, _ in got}) < 6:
                for batch in await again.fetch():
                    got += [(m.id, m.attempt) for m in batch.messages]
    finally:
        await again.close()
    assert sorted(got) == sorted((m.id, 2) for m in taken)


async def test_an_entry_handed_back_uncounted_keeps_its_count_across_a_crash() -> None:
    """The app never had it, so that delivery does not count: not when this consumer takes
    it back, and not when another consumer claims it after this one dies."""
    stream, group = fresh("uncounted"), fresh("g")
    options = RedisOptions(url=URL, group=group, block=0.1, claim_idle=0.3)
    crashed = RedisTransport([stream], options)
    await crashed.connect()
    await crashed.publish(stream, [], b"one", {})
    (first,) = await fetch_all(crashed, 1)
    await crashed.settle(
        Batch(stream, [first]), Settlement(retry=[Retry(first, "not had", 0.0, uncounted=True)])
    )
    (again,) = await fetch_all(crashed, 1)
    assert (again.id, again.attempt) == (first.id, 1)
    await crashed.close()  # never settled: left pending on that consumer
    other = RedisTransport([stream], options)
    await other.connect()
    try:
        (claimed,) = await fetch_all(other, 1)
        assert (claimed.id, claimed.attempt) == (first.id, 2)
    finally:
        await other.close()


async def test_a_refused_counter_reset_is_one_warning_and_the_retry_stands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream, group = fresh("uncounted"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.1))
    await t.connect()
    try:
        await t.publish(stream, [], b"one", {})
        (first,) = await fetch_all(t, 1)
        c = await client()
        try:
            await c.execute_command("XGROUP", "DESTROY", stream, group)
        finally:
            await c.aclose()
        await t.settle(
            Batch(stream, [first]),
            Settlement(retry=[Retry(first, "not had", 60.0, uncounted=True)]),
        )
        (warning,) = [r for r in caplog.records if "delivery counter" in r.getMessage()]
        assert warning.levelname == "WARNING"
        assert "NOGROUP" in warning.getMessage()
        assert t._streams is not None
        assert len(t._streams._retries) == 1
    finally:
        await t.close()


async def test_a_deleted_stream_and_group_are_created_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream, group = fresh("deleted"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.1))
    await t.connect()
    try:
        c = await client()
        await c.delete(stream)
        await c.aclose()
        reading = asyncio.create_task(fetch_all(t, 1))
        await asyncio.sleep(0.3)  # the read meets NOGROUP and creates both again
        await t.publish(stream, [], b"after", {})
        (got,) = await reading
        assert got.payload == b"after"
    finally:
        await t.close()
    assert "creating it again" in caplog.text


async def test_a_stream_deleted_under_a_blocked_read_is_created_again() -> None:
    """Redis ends a blocked XREADGROUP on a deleted stream with an UNBLOCKED error: the
    fetch failed with it (an error line, the broker marked unreachable) instead of
    creating the stream and its group again like NOGROUP does."""
    stream, group = fresh("unblocked"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=2))
    await t.connect()
    c = await client()
    try:
        reading = asyncio.ensure_future(t.fetch())
        await asyncio.sleep(0.2)  # the read is blocked in Redis
        await c.delete(stream)
        await c.execute_command("XADD", stream, "*", "payload", b"after")
        async with asyncio.timeout(5):
            batches = await reading
            while not batches:
                batches = await t.fetch()
        assert [m.payload for b in batches for m in b.messages] == [b"after"]
    finally:
        await t.close()
        await c.delete(stream)
        await c.aclose()


async def test_a_group_created_again_reads_the_stream_from_its_start() -> None:
    """--start places a new group; one created again after its stream was deleted was
    placed there too, and with $ the entries written since the deletion were lost."""
    stream, group = fresh("again"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.1, start="$"))
    await t.connect()
    c = await client()
    try:
        await c.delete(stream)
        await c.execute_command("XADD", stream, "*", "payload", b"after")
        (got,) = await fetch_all(t, 1)
        assert got.payload == b"after"
    finally:
        await t.close()
        await c.delete(stream)
        await c.aclose()


async def destroy_group(stream: str, group: str) -> None:
    c = await client()
    try:
        await c.execute_command("XGROUP", "DESTROY", stream, group)
    finally:
        await c.aclose()


async def fetch_payload(t: RedisTransport, payload: bytes, timeout: float) -> Message:
    """Fetch (and drop whatever else comes) until the message with ``payload`` arrives."""
    async with asyncio.timeout(timeout):
        while True:
            for batch in await t.fetch():
                for m in batch.messages:
                    if m.payload == payload:
                        return m


@pytest.mark.parametrize("gone_first", [False, True])
async def test_retries_of_other_streams_survive_a_retry_claim_that_meets_a_lost_group(
    gone_first: bool,
) -> None:
    """Two streams' retries fall due together and one's group was destroyed meanwhile.
    The other's entry, claimed before the failure, was dropped (claimed again after
    --claim-idle, its attempt one too high), or, due after it, its retry was forgotten
    (back only after --claim-idle); it now comes back at once with its next attempt."""
    gone, kept, group = fresh("gone"), fresh("kept"), fresh("g")
    t = RedisTransport([gone, kept], RedisOptions(url=URL, group=group, block=0.1))
    await t.connect()
    try:
        await t.publish(gone, [], b"a", {})
        await t.publish(kept, [], b"b", {})
        got = {m.payload: m for m in await fetch_all(t, 2)}
        order = [(gone, got[b"a"]), (kept, got[b"b"])]
        for stream, m in order if gone_first else order[::-1]:
            await t.settle(Batch(stream, [m]), Settlement(retry=[Retry(m, "later", 0.1)]))
        await asyncio.sleep(0.2)
        await destroy_group(gone, group)
        again = await fetch_payload(t, b"b", 5)
        assert (again.id, again.attempt) == (got[b"b"].id, 2)
    finally:
        await t.close()


async def test_retries_of_a_vanished_group_are_dropped_with_it() -> None:
    """A retry waiting when its group vanished: the group created again delivers the
    entry anew, and the retry then claimed that new delivery too (a second copy in
    flight, attempt 2)."""
    stream, group = fresh("vanished"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.1))
    await t.connect()
    try:
        await t.publish(stream, [], b"e", {})
        (first,) = await fetch_all(t, 1)
        await t.settle(Batch(stream, [first]), Settlement(retry=[Retry(first, "later", 0.5)]))
        await destroy_group(stream, group)
        (anew,) = await fetch_all(t, 1)  # in flight from here on
        assert (anew.id, anew.attempt) == (first.id, 1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fetch_all(t, 1), 1.0)
    finally:
        await t.close()


@pytest.mark.parametrize("lost", ["destroyed", "deleted"])
async def test_a_retry_waiting_when_its_group_is_lost_does_not_stop_the_reads(lost: str) -> None:
    """The waiting retry's touch (every --claim-idle/3) met NOGROUP first, which redis-py's
    pipeline reworded (``Command # 1 (XCLAIM ...) of pipeline caused error``): the group
    was never created again, and every fetch failed on that touch for good."""
    stream, group = fresh("lostwait"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.1, claim_idle=0.3))
    await t.connect()
    c = await client()
    try:
        await t.publish(stream, [], b"first", {})
        (first,) = await fetch_all(t, 1)
        await t.settle(Batch(stream, [first]), Settlement(retry=[Retry(first, "later", 60)]))
        if lost == "destroyed":
            await destroy_group(stream, group)
        else:
            await c.delete(stream)
        await asyncio.sleep(0.2)  # the touch is due
        await c.execute_command("XADD", stream, "*", "payload", b"after")
        expected = [(b"first", 1), (b"after", 1)] if lost == "destroyed" else [(b"after", 1)]
        got = await fetch_all(t, len(expected))
        assert [(m.payload, m.attempt) for m in got] == expected
        assert t._streams is not None
        assert not t._streams._retries, "the retry went with the old group"
    finally:
        await t.close()
        await c.delete(stream)
        await c.aclose()


async def test_entries_a_sweep_claimed_survive_another_streams_lost_group() -> None:
    """The sweep claimed a silent consumer's entry of one stream, then met a destroyed
    group on the next: the claimed entry was dropped and claimed again later, its attempt
    one too high (3, after one delivery to a consumer that died)."""
    gone, kept, group = fresh("gone"), fresh("kept"), fresh("g")
    options = RedisOptions(url=URL, group=group, block=0.1, claim_idle=0.3)
    first = await left_pending(kept, options)
    other = RedisTransport([kept, gone], options)
    await other.connect()
    try:
        await destroy_group(gone, group)
        again = await fetch_payload(other, b"left", 5)
        assert (again.id, again.attempt) == (first.id, 2)
    finally:
        await other.close()


async def test_dead_letters_carry_reason_attempt_and_stream_and_are_acked() -> None:
    stream, group = fresh("dead"), fresh("g")

    def decide(r: Received) -> str:
        return "nack:bad input: no id"

    app = Recorder(decide)
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.1))
    producer = RedisTransport([], RedisOptions(url=URL))
    await producer.connect()
    await producer.publish(stream, [(b"k", b"v")], b"poison", {})
    await producer.close()
    runtime = Runtime(app, t, RuntimeConfig(max_attempts=2, retry_delay=0.05))
    task = asyncio.create_task(runtime.serve())
    try:
        async with asyncio.timeout(15):
            while not await entries(f"{stream}.dlq"):
                await asyncio.sleep(0.05)
    finally:
        runtime.request_stop()
        assert await task == 0
    ((_, headers, payload),) = await entries(f"{stream}.dlq")
    assert payload == b"poison"
    assert headers == [
        (b"k", b"v"),
        (b"amgi-attempt", b"2"),
        (b"amgi-original-address", stream.encode()),
        (b"amgi-dead-letter-reason", b"bad input: no id"),
    ]
    assert [r.attempt for r in app.received] == [1, 2]
    assert len({r.id for r in app.received}) == 1, "the entry id changed between deliveries"
    assert await pending(stream, group) == 0


async def test_a_dead_letter_redis_refuses_leaves_its_entry_pending_not_acked() -> None:
    """The dead-letter stream's key is not a stream: its XADD fails. In one MULTI the
    XACK ran all the same (Redis aborts nothing on a command's runtime error), and the
    entry was acknowledged and lost. It now stays pending (claimed again later); the
    others of the batch are settled."""
    stream, group = fresh("deadfail"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.1))
    c = await client()
    await c.set(f"{stream}.dlq", b"not a stream")
    await t.connect()
    try:
        await t.publish(stream, [], b"poison", {})
        await t.publish(stream, [], b"fine", {})
        poison, fine = await fetch_all(t, 2)
        with pytest.raises(Exception, match="WRONGTYPE"):
            await t.settle(
                Batch(stream, [poison, fine]),
                Settlement(acked=[fine], dead=[DeadLetter(poison, "bad")]),
            )
        rows = await c.execute_command("XPENDING", stream, group, "-", "+", 10)
        assert [row[0].decode() for row in rows] == [poison.id]
    finally:
        await t.close()
        await c.delete(stream, f"{stream}.dlq")
        await c.aclose()


async def test_a_refused_dead_letter_is_logged_as_not_stored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The runtime said "dead-lettered after attempt 1" of a dead letter Redis refused
    (the entry stays pending): now its line says it was not stored and stays."""
    stream, group = fresh("deadlog"), fresh("g")
    c = await client()
    await c.set(f"{stream}.dlq", b"not a stream")
    app = Recorder(lambda r: "nack:bad")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.1))
    runtime = Runtime(app, t, RuntimeConfig(max_attempts=1))
    task = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        await t.publish(stream, [], b"poison", {})
        async with asyncio.timeout(10):
            while not (lines := [r.getMessage() for r in caplog.records if "dead" in r.message]):
                await asyncio.sleep(0.05)
        assert await pending(stream, group) == 1
    finally:
        runtime.request_stop()
        assert await task == 0
        await c.delete(stream, f"{stream}.dlq")
        await c.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == "amgi.runtime"]
    assert not [line for line in lines if "dead-lettered after" in line]
    (mid,) = {r.id for r in app.received}
    assert (
        f"message {mid} from {stream!r}: its dead letter (after attempt 1: bad) could not be "
        "stored: WRONGTYPE Operation against a key holding the wrong kind of value; the "
        "message stays unacknowledged and is tried again later"
    ) in lines


async def test_pubsub_mode_delivers_retries_in_memory_then_dead_letters() -> None:
    channel = fresh("channel")
    attempts: list[int] = []

    def decide(r: Received) -> str:
        attempts.append(r.attempt)
        return "ack" if r.payload == b"fine" else "nack:no"

    app = Recorder(decide)
    t = RedisTransport([channel], RedisOptions(url=URL, mode="pubsub"))
    runtime = Runtime(app, t, RuntimeConfig(max_attempts=2, retry_delay=0.05))
    task = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        sender = RedisTransport([], RedisOptions(url=URL, mode="pubsub"))
        await sender.connect()
        with pytest.raises(RedisSendError, match="carry the payload only"):
            await sender.publish(channel, [(b"h", b"v")], b"x", {})
        await sender.publish(channel, [], b"fine", {})
        await sender.publish(channel, [], b"bad", {})
        await sender.close()
        async with asyncio.timeout(15):
            while not await entries(f"{channel}.dlq"):
                await asyncio.sleep(0.05)
    finally:
        runtime.request_stop()
        assert await task == 0
    assert [r.payload for r in app.acked] == [b"fine"]
    assert sorted(attempts) == [1, 1, 2]
    ((_, headers, payload),) = await entries(f"{channel}.dlq")
    assert payload == b"bad"
    assert (b"amgi-dead-letter-reason", b"no") in headers
    assert app.received[0].bindings["redis"] == {"channel": channel}


async def test_pubsub_mode_subscribes_again_after_a_broker_restart(tmp_path: Path) -> None:
    with private_redis(tmp_path / "redis") as broker:
        url = f"redis://127.0.0.1:{broker.port}/0"
        app = Recorder()
        t = RedisTransport(["ch"], RedisOptions(url=url, mode="pubsub"))
        runtime = Runtime(app, t, RuntimeConfig(lifespan="off"))
        task = asyncio.create_task(runtime.serve())
        sender = RedisTransport([], RedisOptions(url=url, mode="pubsub"))
        try:
            await asyncio.wait_for(runtime.started.wait(), 10)
            await asyncio.to_thread(broker.restart)
            async with asyncio.timeout(20):
                while sender._client is None:  # (refused while Redis loads its data)
                    with contextlib.suppress(BrokerUnavailable):
                        await sender.connect()
                    await asyncio.sleep(0.05)
                # Pub/Sub keeps nothing: publish until the server is subscribed again.
                while not app.acked:
                    await sender.publish("ch", [], b"after", {})
                    await asyncio.sleep(0.2)
        finally:
            await sender.close()
            runtime.request_stop()
            assert await task == 0
        assert app.acked[0].payload == b"after"


# -- processes ----------------------------------------------------------------------------


def flags(url: str, group: str, *extra: str) -> list[str]:
    return ["--server", "redis", "--url", url, "--group", group, "--block", "0.2", *extra]


async def produce(url: str, stream: str, payloads: list[str]) -> None:
    t = RedisTransport([], RedisOptions(url=url))
    await t.connect()
    try:
        for p in payloads:
            await t.publish(stream, [], p.encode(), {})
    finally:
        await t.close()


async def test_two_processes_share_a_group_without_duplicates(
    tmp_path: Path, processes: list[AmgiProcess]
) -> None:
    stream, group = fresh("shared"), fresh("g")
    args = flags(URL, group, "--batch-size", "10", "--claim-idle", "30")
    await share_without_duplicates(
        stream, args, tmp_path, processes, lambda ps: produce(URL, stream, ps)
    )
    assert await pending(stream, group) == 0


async def test_a_named_consumer_takes_back_its_own_pending_entries_at_restart(
    tmp_path: Path, processes: list[AmgiProcess]
) -> None:
    stream, group = fresh("named"), fresh("g")
    expected = [f"n{i}" for i in range(60)]
    await produce(URL, stream, expected)
    # claim-idle far beyond the test: only the restart's own-pending read can recover.
    args = flags(URL, group, "--consumer", "worker-1", "--batch-size", "10", "--claim-idle", "600")
    first = AmgiProcess(stream, args, tmp_path, delay=0.05)
    processes.append(first)
    await asyncio.to_thread(until, lambda: len(first.acked()) >= 10, 30, "a start", first)
    first.proc.kill()
    first.proc.wait()
    assert await pending(stream, group) > 0, "killed too late to leave anything pending"
    second = AmgiProcess(stream, args, tmp_path)
    processes.append(second)
    await asyncio.to_thread(
        until,
        lambda: set(first.acked()) | set(second.acked()) >= set(expected),
        30,
        "every message after the restart",
        second,
    )
    assert second.stop() == 0
    attempts = [r["attempt"] for r in second.records() if r["event"] == "receive"]
    assert max(attempts) == 2, "entries taken back must count their earlier delivery"
    assert await pending(stream, group) == 0


def all_settled(stream: str, group: str) -> Callable[[], bool]:
    """Whether ``group`` has read every entry of ``stream`` and holds none pending."""
    import redis

    def check() -> bool:
        with redis.Redis.from_url(URL, protocol=2) as c:
            groups = c.xinfo_groups(stream)
        return any(g["name"] == group.encode() and g["lag"] == g["pending"] == 0 for g in groups)

    return check


def test_streams_keep_a_crash_ledger_named_without_the_password_and_pubsub_none() -> None:
    """Pub/Sub ids are a count of each process: a ledger would take them for suspects."""
    options = RedisOptions(url="redis://amgi:s3cret@10.0.0.7:6380/3", group="billing")
    t = RedisTransport(["s"], options)
    assert t.stable_ids
    assert t.ledger_namespace() == "redis redis://amgi:*****@10.0.0.7:6380/3 billing"
    assert not RedisTransport(["s"], replace(options, mode="pubsub")).stable_ids


def test_a_message_that_kills_the_process_is_the_only_dead_letter(tmp_path: Path) -> None:
    """Without the crash ledger each crash counted a delivery of everything pending on the
    dead consumer: entries the app acked (their XACK never sent) and entries read ahead
    that it never had reached the dead letters beside the killer."""
    stream, group = fresh("killer"), fresh("g")
    payloads = ["kill" if i == 4 else f"m{i:02d}" for i in range(20)]
    asyncio.run(produce(URL, stream, payloads))
    loop = CrashLoop(tmp_path, stream, *flags(URL, group, "--batch-size", "5", "--claim-idle", "1"))
    kills = loop.run(all_settled(stream, group), timeout=90)
    assert kills == loop.max_attempts, loop
    assert set(loop.acked()) == set(payloads) - {"kill"}, loop
    assert [p for _, _, p in asyncio.run(entries(f"{stream}.dlq"))] == [b"kill"], loop


async def test_broker_restart_mid_stream_loses_nothing(
    tmp_path: Path, processes: list[AmgiProcess]
) -> None:
    with private_redis(tmp_path / "redis") as broker:
        url = f"redis://127.0.0.1:{broker.port}/0"
        stream, group = fresh("restart"), fresh("g")
        expected = [f"r{i}" for i in range(120)]
        await produce(url, stream, expected)
        server = AmgiProcess(
            stream, flags(url, group, "--batch-size", "5", "--claim-idle", "1"), tmp_path, 0.02
        )
        processes.append(server)
        await asyncio.to_thread(until, lambda: len(server.acked()) >= 20, 30, "a start", server)
        await asyncio.to_thread(broker.restart)
        assert len(set(server.acked())) < len(expected), "the restart came too late to test"
        await asyncio.to_thread(
            until, lambda: set(server.acked()) >= set(expected), 60, "every message", server
        )
        assert server.stop() == 0, server.output()
        assert await pending(stream, group, url) == 0


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--batch-size", "0"], "--batch-size must be 1 to 100000 (got batch_size=0)"),
        (["--claim-idle", "nan"], "--claim-idle must be a finite number"),
        (["--start", "yesterday"], "--start must be 0, $ or an entry id"),
        (["--block", "0"], "--block must be 0.001 to 3600"),
    ],
)
def test_bad_options_fail_before_the_apps_startup(
    tmp_path: Path, extra: list[str], expected: str
) -> None:
    (tmp_path / "startup.py").write_text(STARTUP_APP)
    started = tmp_path / "started"
    result = amgi(
        "run", "startup:app", fresh("s"), "--server", "redis", "--url", URL, *extra,
        cwd=tmp_path, env={"STARTED": str(started)},
    )  # fmt: skip
    assert expected in one_line_error(result)
    assert not started.exists()


def test_a_claim_idle_redis_would_refuse_names_the_flag() -> None:
    """Taken as it was, every sweep failed ('Invalid min-idle-time argument for
    XAUTOCLAIM'): no message was ever read, the fetch retried for good."""
    with pytest.raises(ConfigurationError, match=r"--claim-idle must be 0\.1 to 31536000"):
        check(RedisOptions(url=URL, claim_idle=1e20))


@pytest.mark.parametrize("start", ["1700-", "\u0661\u0662\u0663", "18446744073709551616", "1-x"])
def test_a_start_redis_would_refuse_names_the_flag(start: str) -> None:
    """Taken as entry ids, these failed only at the group's creation, in a line that
    did not name --start (and not at all when the group existed)."""
    with pytest.raises(ConfigurationError, match="start must be 0, \\$ or an entry id"):
        RedisTransport(["s"], RedisOptions(start=start)).check()
    RedisTransport(["s"], RedisOptions(start="18446744073709551615-18446744073709551615")).check()


def test_unreachable_server_and_wrong_password_are_one_line_each(tmp_path: Path) -> None:
    (tmp_path / "startup.py").write_text(STARTUP_APP)
    result = amgi(
        "run", "startup:app", "s", "--server", "redis",
        "--url", f"redis://127.0.0.1:{free_port()}/0", "--connect-timeout", "2",
        cwd=tmp_path, env={"STARTED": str(tmp_path / "started")},
    )  # fmt: skip
    assert "redis: cannot connect to redis://127.0.0.1:" in one_line_error(result)
    assert not (tmp_path / "started").exists()  # before the application's lifespan startup
    with private_redis(tmp_path / "redis", password="right") as broker:
        result = amgi(
            "run", "startup:app", "s", "--server", "redis",
            "--url", f"redis://:wrong@127.0.0.1:{broker.port}/0",
            cwd=tmp_path, env={"STARTED": str(tmp_path / "started")},
        )  # fmt: skip
        line = one_line_error(result)
        assert "refused the credentials" in line
        assert "wrong" not in line, "the password was shown"
        assert not (tmp_path / "started").exists()


async def test_the_maxlen_binding_trims_and_a_bad_one_fails_that_send_alone() -> None:
    """``True`` was once taken as 1 (trimming the stream to about one entry), 1.5 rounded
    and ``"5"`` parsed; each is now refused before anything is written."""
    stream = fresh("maxlen")
    t = RedisTransport([], RedisOptions(url=URL))
    await t.connect()
    try:
        for i in range(250):
            await t.publish(stream, [], b"%d" % i, {"redis": {"maxlen": 10}})
        kept = await entries(stream)
        assert 10 <= len(kept) <= 150, "MAXLEN ~ trims whole nodes, keeping at least 10"
        assert kept[-1][2] == b"249"
        for bad in (True, 1.5, "5", -1, 2**63):
            with pytest.raises(RedisSendError, match=r"redis\.maxlen must be a whole number"):
                await t.publish(stream, [], b"bad", {"redis": {"maxlen": bad}})
        assert await entries(stream) == kept
        await t.publish(stream, [], b"after", {"redis": {"maxlen": None}})
        assert len(await entries(stream)) == len(kept) + 1
    finally:
        await t.close()


async def test_a_key_that_is_not_a_stream_is_a_configuration_error() -> None:
    key = fresh("string")
    c = await client()
    await c.set(key, b"x")
    await c.aclose()
    t = RedisTransport([key], RedisOptions(url=URL))
    with pytest.raises(Exception, match="exists and is not a stream"):
        await t.connect()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # redis-py took a database that is no number as 0: the wrong database, silently.
        ("redis://127.0.0.1:6379/abc", "the database (the URL's path) must be a number"),
        ("redis://:secret@127.0.0.1:6379/1x", "the database (the URL's path) must be a number"),
        # urlsplit's ValueError escaped as an unexpected error.
        ("redis://:secret@[::1/0", "bad url redis://:*****@[::1/0: Invalid IPv6 URL"),
    ],
)
async def test_a_bad_url_is_a_configuration_error(url: str, expected: str) -> None:
    t = RedisTransport(["s"], RedisOptions(url=url, connect_timeout=2))
    with pytest.raises(ConfigurationError) as raised:
        await t.connect()
    assert expected in str(raised.value)
    assert "secret" not in str(raised.value)


async def test_connect_to_nothing_raises_broker_unavailable() -> None:
    t = RedisTransport(["s"], RedisOptions(url=f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(BrokerUnavailable, match="cannot connect"):
        await t.connect()
