"""The Redis server at the edges of a Redis that refuses writes (maxmemory) and of Pub/Sub."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.redis import RedisOptions, RedisTransport
from amgi.testing.conformance import Recorder
from amgi.transport import Batch, Retry, Settlement
from tests.net import free_port
from tests.servers.private_brokers import PrivateBroker, private_redis
from tests.servers.redis_helpers import URL, client, ensure_broker, fresh


@pytest.fixture(scope="module", autouse=True)
def _shared_broker() -> None:
    ensure_broker()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    with private_redis(tmp_path / "redis") as broker:
        yield broker


async def fill_up(c: Any) -> None:
    """Let Redis refuse every write that may grow it (maxmemory below what it uses, with
    the default noeviction): ``OOM command not allowed``."""
    used = int((await c.info("memory"))["used_memory"])
    await c.config_set("maxmemory-policy", "noeviction")
    await c.config_set("maxmemory", max(1, used - 100_000))


async def read_some(t: RedisTransport) -> list[Batch]:
    async with asyncio.timeout(10):
        while True:
            batches = [b for b in await t.fetch() if b.messages]
            if batches:
                return batches


async def test_a_full_redis_still_lets_a_consumer_of_an_existing_group_start(
    broker: PrivateBroker,
) -> None:
    """``XGROUP CREATE`` is refused by a full Redis even when the group exists (Redis
    checks memory before it runs a command): the server could not start, with a
    configuration error, when its consumers were most needed. Reads and acks need no
    memory: it starts and drains the stream."""
    url = f"redis://127.0.0.1:{broker.port}/0"
    c = await client(url)
    t = RedisTransport(["s"], RedisOptions(url=url, group="g", block=0.1))
    try:
        await c.execute_command("XGROUP", "CREATE", "s", "g", "0", "MKSTREAM")
        await c.execute_command("XADD", "s", "*", "payload", "kept")
        await fill_up(c)
        await t.connect()
        [batch] = await read_some(t)
        assert [m.payload for m in batch.messages] == [b"kept"]
        await t.settle(batch, Settlement(acked=list(batch.messages)))
        assert (await c.execute_command("XPENDING", "s", "g"))[0] == 0
    finally:
        await t.close()
        await c.aclose()


async def test_a_group_lost_while_redis_is_full_is_a_passing_failure_not_a_fatal_one(
    broker: PrivateBroker,
) -> None:
    """A group lost while Redis refuses writes cannot be created again yet: the fetch
    failed with a configuration error, which stops the whole server. It is now a broker
    refusal (the runtime fetches again, backing off), and once Redis has room the group
    is created again and its stream read."""
    url = f"redis://127.0.0.1:{broker.port}/0"
    c = await client(url)
    t = RedisTransport(["s"], RedisOptions(url=url, group="g", block=0.1))
    try:
        await t.connect()
        await c.execute_command("XADD", "s", "*", "payload", "first")
        await c.execute_command("XGROUP", "DESTROY", "s", "g")
        await fill_up(c)
        with pytest.raises(BrokerUnavailable, match="maxmemory") as raised:
            await t.fetch()
        assert not isinstance(raised.value, ConfigurationError)
        await c.config_set("maxmemory", 0)
        [batch] = await read_some(t)
        assert [m.payload for m in batch.messages] == [b"first"]
    finally:
        await t.close()
        await c.aclose()


async def test_a_replica_refusing_to_create_the_group_is_no_configuration_error(
    broker: PrivateBroker,
) -> None:
    """A replica (a failover under way) refuses ``XGROUP CREATE``: a passing refusal
    (the runtime fetches again), not a configuration error that stops the server."""
    url = f"redis://127.0.0.1:{broker.port}/0"
    c = await client(url)
    t = RedisTransport(["s"], RedisOptions(url=url, group="g", block=0.1))
    try:
        await c.execute_command("REPLICAOF", "127.0.0.1", free_port())  # no primary: read-only
        with pytest.raises(BrokerUnavailable, match="read only replica") as raised:
            await t.connect()
        assert not isinstance(raised.value, ConfigurationError)
    finally:
        await t.close()
        await c.aclose()


# -- Pub/Sub at the stop ------------------------------------------------------------------


async def test_pubsub_messages_redis_sent_before_the_stop_are_handed_over() -> None:
    """Messages Redis pushed to the subscription that no fetch read yet (the app busy)
    were dropped unseen at the stop: Redis never sends them again. The stop unsubscribes
    and hands over what came before Redis confirmed, for the runtime to process."""
    channel = fresh("ps-stop")
    t = RedisTransport([channel], RedisOptions(url=URL, mode="pubsub", batch_size=2))
    sender = RedisTransport([], RedisOptions(url=URL, mode="pubsub"))
    await t.connect()
    await sender.connect()
    try:
        for n in range(3):
            await sender.publish(channel, [], b"m%d" % n, {})
        batches = await t.hand_over()
        assert [m.payload for b in batches for m in b.messages] == [b"m0", b"m1", b"m2"]
        assert [len(b.messages) for b in batches] == [2, 1]  # in batches of --batch-size
    finally:
        await sender.close()
        await t.close()


async def test_a_pubsub_stop_processes_what_redis_sent_while_the_app_was_busy() -> None:
    channel = fresh("ps-busy")
    app = Recorder()
    app.delay = 0.2
    t = RedisTransport([channel], RedisOptions(url=URL, mode="pubsub", batch_size=1))
    runtime = Runtime(app, t, RuntimeConfig(lifespan="off", concurrency=1))
    serving = asyncio.create_task(runtime.serve())
    sender = RedisTransport([], RedisOptions(url=URL, mode="pubsub"))
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        await sender.connect()
        sent = [b"m%d" % n for n in range(5)]
        for payload in sent:
            await sender.publish(channel, [], payload, {})
        async with asyncio.timeout(10):
            while not app.received:  # the first is in the app's hands, the rest arrived
                await asyncio.sleep(0.01)
    finally:
        await sender.close()
        runtime.request_stop()
        assert await serving == 0
    assert sorted(m.payload for m in app.acked) == sent


async def test_pubsub_retries_lost_at_the_stop_are_said(caplog: pytest.LogCaptureFixture) -> None:
    """Retries wait in memory: a stop drops them, as at-most-once allows, but it did so
    without a word (the report had counted them as retried)."""
    channel = fresh("ps-retry")
    t = RedisTransport([channel], RedisOptions(url=URL, mode="pubsub"))
    sender = RedisTransport([], RedisOptions(url=URL, mode="pubsub"))
    await t.connect()
    await sender.connect()
    try:
        await sender.publish(channel, [], b"again", {})
        [batch] = await read_some(t)
        retry = Retry(batch.messages[0], "later", delay=60)
        await t.settle(batch, Settlement(retry=[retry]))
    finally:
        await sender.close()
        await t.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(s.startswith("1 message(s) waiting") and "at most once" in s for s in said), said


# -- a consumer name two processes share -------------------------------------------------


async def test_a_stop_never_deletes_entries_another_process_took_under_the_same_name() -> None:
    """The stop deleted its consumer when ``XPENDING`` showed nothing pending on it, in a
    second command: a process sharing the name (a restart that overlaps the old one) that
    read an entry in between lost it, as ``XGROUP DELCONSUMER`` drops the consumer's
    pending entries from the group (never delivered again). The check and the deletion
    are now one step at Redis."""
    stream, group = fresh("delconsumer"), fresh("g")
    options = RedisOptions(url=URL, group=group, consumer="shared", block=0.1)
    old, new = RedisTransport([stream], options), RedisTransport([stream], options)
    c = await client()
    await old.connect()
    await new.connect()
    try:
        real = old._client.execute_command
        answered = 0

        async def meanwhile(*args: Any, **kwargs: Any) -> Any:
            nonlocal answered
            result = await real(*args, **kwargs)
            answered += 1
            if answered == 1:  # the stop's first command answered: the other one reads
                await new.publish(stream, [], b"taken", {})
                [batch] = await read_some(new)  # the entry is pending on "shared" now
                assert batch.messages[0].payload == b"taken"
            return result

        old._client.execute_command = meanwhile
        await old.close()
        assert (await c.execute_command("XPENDING", stream, group))[0] == 1
    finally:
        await old.close()
        await new.close()
        await c.delete(stream)
        await c.aclose()


async def test_a_stop_deletes_its_consumer_only_when_nothing_is_pending_on_it() -> None:
    stream, group = fresh("delconsumer"), fresh("g")
    c = await client()
    c.set_response_callback("XINFO CONSUMERS", lambda response, **_: response)

    async def consumers() -> list[bytes]:
        rows = await c.execute_command("XINFO CONSUMERS", stream, group)
        return [dict(zip(r[::2], r[1::2], strict=True))[b"name"] for r in rows]

    idle = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.1))
    busy = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.1))
    try:
        await idle.connect()
        await idle.publish(stream, [], b"done", {})
        [batch] = await read_some(idle)  # a read names the consumer in the group
        await idle.settle(batch, Settlement(acked=list(batch.messages)))
        await busy.connect()
        await busy.publish(stream, [], b"held", {})
        await read_some(busy)
        await idle.close()
        await busy.close()  # its entry is still pending: it stays, to be claimed
        assert await consumers() == [busy.consumer.encode()]
    finally:
        await idle.close()
        await busy.close()
        await c.delete(stream)
        await c.aclose()


# -- entries deleted while pending (MAXLEN, XDEL) ----------------------------------------


async def test_entries_deleted_while_pending_are_said_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream trimmed (``MAXLEN``, ``XTRIM``, ``XDEL``) under entries still pending
    deletes messages no application finished: those of a consumer that died, whose claim
    finds them gone, and one waiting here for its retry. They vanished without a word."""
    stream, group = fresh("trimmed"), fresh("g")
    c = await client()
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=0.1, claim_idle=0.1))
    try:
        await t.connect()
        for n in range(2):
            await c.execute_command("XADD", stream, "*", "payload", b"dead%d" % n)
        await c.execute_command("XREADGROUP", "GROUP", group, "dead", "STREAMS", stream, ">")
        await c.execute_command("XADD", stream, "*", "payload", b"retried")
        await c.execute_command("XTRIM", stream, "MAXLEN", 1)  # the dead one's two go
        [batch] = await read_some(t)
        [retried] = batch.messages
        assert retried.payload == b"retried"
        await t.settle(batch, Settlement(retry=[Retry(retried, "later", delay=0.05)]))
        await c.execute_command("XDEL", stream, retried.id)
        await c.execute_command("XADD", stream, "*", "payload", b"next")
        await asyncio.sleep(0.2)  # the retry is due, the dead one's entries idle enough
        [batch] = await read_some(t)
        assert [m.payload for m in batch.messages] == [b"next"]
    finally:
        await t.close()
        await c.delete(stream)
        await c.aclose()
    said = " | ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"2 entries of {stream} deleted while pending" in said, said
    assert f"1 entry of {stream} gone while waiting for a retry" in said, said


async def test_a_pubsub_retry_falling_due_during_a_read_is_handed_out_on_time() -> None:
    """A retry settled while a read waited for messages was handed out only when that
    wait ended (up to 1 s later): nothing woke the read when the retry fell due."""
    channel = fresh("ps-due")
    t = RedisTransport([channel], RedisOptions(url=URL, mode="pubsub"))
    sender = RedisTransport([], RedisOptions(url=URL, mode="pubsub"))
    await t.connect()
    await sender.connect()
    try:
        await sender.publish(channel, [], b"again", {})
        [batch] = await read_some(t)
        reading = asyncio.ensure_future(t.fetch())
        await asyncio.sleep(0.05)  # the read waits for new messages
        retry = Retry(batch.messages[0], "later", delay=0.05)
        await t.settle(batch, Settlement(retry=[retry]))
        [again] = await asyncio.wait_for(reading, 0.7)
        assert [(m.payload, m.attempt) for m in again.messages] == [(b"again", 2)]
    finally:
        await sender.close()
        await t.close()


async def test_leases_are_renewed_where_an_acl_denies_scripts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The lease renewal is a script; a user denied ``EVAL`` renews with ``XCLAIM``."""
    rule = "worker on >pw ~* &* +@all -@scripting"
    with private_redis(tmp_path / "redis", users=[rule]) as broker:
        url = f"redis://worker:pw@127.0.0.1:{broker.port}/0"
        t = RedisTransport(["s"], RedisOptions(url=url, group="g", block=0.1, claim_idle=0.3))
        await t.connect()
        try:
            await t.publish("s", [], b"one", {})
            [batch] = await read_some(t)
            for _ in range(2):
                await t.extend([batch])
            await t.settle(batch, Settlement(acked=list(batch.messages)))
        finally:
            await t.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("refused the lease renewal script" in s for s in said) == 1, said


async def test_an_unsubscribe_cut_off_at_the_stop_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis silent at the stop (here: the unsubscribe never answered): a timeout has no
    message of its own, and the warning read 'failed ()'."""
    t = RedisTransport([fresh("ps-cut")], RedisOptions(url=URL, mode="pubsub"))
    await t.connect()
    try:
        assert t._pubsub is not None
        t._pubsub._pubsub.unsubscribe = asyncio.Event().wait
        assert await t._pubsub.hand_over(0.05) == []
    finally:
        await t.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(s.startswith("unsubscribing at the stop failed (TimeoutError)") for s in said), said


async def test_pubsub_messages_a_hand_over_cut_off_had_read_are_counted_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The runtime's shutdown timeout cancels a hand-over still waiting for Redis to
    confirm the unsubscribe: what it had read was dropped without a word, though the
    runtime leaves counting those to the server."""
    channel = fresh("ps-cut-read")
    t = RedisTransport([channel], RedisOptions(url=URL, mode="pubsub"))
    sender = RedisTransport([], RedisOptions(url=URL, mode="pubsub"))
    await t.connect()
    await sender.connect()
    try:
        assert t._pubsub is not None
        pubsub = t._pubsub._pubsub
        for n in range(3):
            await sender.publish(channel, [], b"m%d" % n, {})
        read = pubsub.get_message
        got: list[Any] = []

        async def then_silent(timeout: float) -> Any:
            if len(got) == 3:  # Redis goes silent before it confirms the unsubscribe
                await asyncio.Event().wait()
            message = await read(timeout=timeout)
            if message is not None:
                got.append(message)
            return message

        async def unconfirmed() -> None:  # (sent, never confirmed)
            pass

        pubsub.unsubscribe = unconfirmed
        pubsub.get_message = then_silent
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1):  # (the runtime's, before the server's own)
                await t.hand_over()
        assert [m["data"] for m in got] == [b"m0", b"m1", b"m2"]
    finally:
        await sender.close()
        await t.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(s.startswith("3 message(s)") and "at most once" in s for s in said), said


async def test_a_lease_renewal_is_one_xpending_and_one_xclaim_per_stream(
    broker: PrivateBroker,
) -> None:
    """The renewal script looked up each held entry with an ``XPENDING`` and renewed it
    with an ``XCLAIM`` of its own: 10 000 held entries kept Redis busy a quarter of a
    second, every --claim-idle / 3, for every client. One another consumer took stays
    there and is said lost, as before."""
    url = f"redis://127.0.0.1:{broker.port}/0"
    options = RedisOptions(url=url, group="g", block=0.1, claim_idle=0.2)
    t, other = RedisTransport(["s"], options), RedisTransport(["s"], options)
    await t.connect()
    await other.connect()
    c = await client(url)
    c.set_response_callback("XCLAIM", lambda response, **_: response)
    try:
        for n in range(30):
            await t.publish("s", [], b"m%d" % n, {})
        [batch] = await read_some(t)
        assert len(batch.messages) == 30
        taken = batch.messages[7].id
        await c.execute_command("XCLAIM", "s", "g", other.consumer, 0, taken, "JUSTID")
        await c.config_resetstat()
        assert t._streams is not None
        t._streams._retries.add(1e12, ("s", taken.encode(), 1))  # dropped: not ours now
        await t.extend([batch])
        stats = await c.info("commandstats")
        assert stats["cmdstat_xpending"]["calls"] == 1, stats
        assert stats["cmdstat_xclaim"]["calls"] == 1, stats
        assert len(t._streams._retries) == 0
        rows = await c.execute_command("XPENDING", "s", "g", "-", "+", 100)
        owners = {row[0].decode(): row[1].decode() for row in rows}
        assert owners.pop(taken) == other.consumer
        assert set(owners.values()) == {t.consumer}
        assert all(row[2] < 1000 for row in rows if row[1] == t.consumer.encode())
    finally:
        await c.aclose()
        await other.close()
        await t.close()


async def test_a_retry_settled_during_a_blocking_read_is_handed_out_when_due() -> None:
    """A retry settled while ``XREADGROUP`` blocked was handed out only when the read
    ended, up to --block late: the read now also waits on a private stream, into which
    the settlement adds an entry. The stream goes with the consumer."""
    stream, group = fresh("wake"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=5))
    await t.connect()
    c = await client()
    wake = f"{stream}.wake.{t.consumer}"
    try:
        await t.publish(stream, [], b"again", {})
        [batch] = await read_some(t)
        reading = asyncio.ensure_future(t.fetch())
        await asyncio.sleep(0.1)  # the read blocks, for 5 s
        retry = Retry(batch.messages[0], "later", delay=0.05)
        await t.settle(batch, Settlement(retry=[retry]))
        async with asyncio.timeout(2.5):
            again = [m for b in await reading for m in b.messages]
            while not again:
                again = [m for b in await t.fetch() for m in b.messages]
        assert [(m.payload, m.attempt) for m in again] == [(b"again", 2)]
        assert await c.exists(wake) == 1
    finally:
        await t.close()
    try:
        assert await c.exists(wake) == 0
    finally:
        await c.delete(stream)
        await c.aclose()


async def test_a_wake_up_stream_an_acl_denies_is_one_line_and_reads_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A user whose key patterns leave out the wake-up stream consumes as before."""
    caplog.set_level(logging.INFO, "amgi.servers.redis")
    rule = "worker on >pw ~orders ~orders.dlq &* +@all"
    with private_redis(tmp_path / "redis", users=[rule]) as broker:
        url = f"redis://worker:pw@127.0.0.1:{broker.port}/0"
        t = RedisTransport(["orders"], RedisOptions(url=url, group="g", block=0.1))
        await t.connect()
        try:
            await t.publish("orders", [], b"one", {})
            [batch] = await read_some(t)
            retry = Retry(batch.messages[0], "later", delay=0.05)
            await t.settle(batch, Settlement(retry=[retry]))
            [again] = await read_some(t)
            assert [(m.payload, m.attempt) for m in again.messages] == [(b"one", 2)]
        finally:
            await t.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert sum(s.startswith("no wake-up stream") for s in said) == 1, said
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_pubsub_messages_a_cancelled_fetch_had_read_come_with_the_next() -> None:
    """A fetch cancelled (the stop) while it gathered a batch dropped the messages it had
    read: Redis never sends them again."""
    channel = fresh("ps-cancel")
    t = RedisTransport([channel], RedisOptions(url=URL, mode="pubsub"))
    sender = RedisTransport([], RedisOptions(url=URL, mode="pubsub"))
    await t.connect()
    await sender.connect()
    try:
        assert t._pubsub is not None
        pubsub = t._pubsub._pubsub
        read = pubsub.get_message

        async def slow_after_first(timeout: float) -> Any:
            if timeout == 0.0:  # gathering more: the socket is slow
                await asyncio.Event().wait()
            return await read(timeout=timeout)

        pubsub.get_message = slow_after_first
        await sender.publish(channel, [], b"first", {})
        fetching = asyncio.ensure_future(t.fetch())
        await asyncio.sleep(0.3)  # the first is read, the read waits for more
        fetching.cancel()
        await asyncio.gather(fetching, return_exceptions=True)
        pubsub.get_message = read
        batches = await t.hand_over()
        assert [m.payload for b in batches for m in b.messages] == [b"first"]
    finally:
        await sender.close()
        await t.close()


async def test_a_stop_wakes_the_blocked_read_instead_of_waiting_out_the_block() -> None:
    """The stop waited for the read in flight to end by itself, up to --block: past the
    shutdown timeout, the read was cut off and what it brought came back later with an
    attempt used up. The wake-up stream ends it at once."""
    stream, group = fresh("stop-wake"), fresh("g")
    t = RedisTransport([stream], RedisOptions(url=URL, group=group, block=20, claim_idle=120))
    runtime = Runtime(Recorder(), t, RuntimeConfig(lifespan="off"))
    serving = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(runtime.started.wait(), 10)
    await asyncio.sleep(0.3)  # a read blocks, for 20 s
    started = asyncio.get_running_loop().time()
    runtime.request_stop()
    assert await asyncio.wait_for(serving, 30) == 0
    assert asyncio.get_running_loop().time() - started < 8  # not 20 s
