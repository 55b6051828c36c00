"""SQLite server specifics: leases, visibility, byte-exactness, several processes."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from amgi.servers.sqlite import (
    SqliteOptions,
    SqliteQueue,
    SqliteTransport,
    decode_bindings,
    decode_headers,
    encode_bindings,
    encode_headers,
)
from amgi.transport import Retry, Settlement


def test_headers_and_bindings_round_trip_byte_exact() -> None:
    headers = [(b"", b""), (b"a", b"\x00\xff" * 100), (b"a", b"dup")]
    assert decode_headers(encode_headers(headers)) == headers
    bindings = {"kafka": {"key": b"\x00k", "partition": 2}, "amqp": {"headers": {"x": [1, "y"]}}}
    assert decode_bindings(encode_bindings(bindings)) == bindings
    assert encode_bindings({}) is None
    assert decode_bindings(None) == {}


async def test_expired_lease_comes_back_and_stale_ack_is_ignored(tmp_path: Path) -> None:
    db = str(tmp_path / "q.db")
    options = SqliteOptions(database=db, visibility_timeout=0.2, poll_interval=0.01)
    first = SqliteTransport(["q"], options)
    second = SqliteTransport(["q"], options)
    await first.connect()
    await second.connect()
    try:
        await first.publish("q", [], b"m", {})
        (b1,) = await first.fetch()
        await asyncio.sleep(0.3)  # the lease runs out: another consumer gets it
        (b2,) = await asyncio.wait_for(second.fetch(), 5)
        assert b2.messages[0].attempt == 2
        await first.settle(b1, Settlement(acked=b1.messages))  # stale: must not delete
        queue = SqliteQueue(db)
        assert queue.count("q") == 1
        await second.settle(b2, Settlement(acked=b2.messages))
        assert queue.count("q") == 0
        queue.close()
    finally:
        await first.close()
        await second.close()


async def test_extend_keeps_a_long_batch_hidden(tmp_path: Path) -> None:
    db = str(tmp_path / "q.db")
    options = SqliteOptions(database=db, visibility_timeout=0.3, poll_interval=0.01)
    holder = SqliteTransport(["q"], options)
    other = SqliteTransport(["q"], options)
    await holder.connect()
    await other.connect()
    try:
        await holder.publish("q", [], b"long", {})
        (batch,) = await holder.fetch()
        for _ in range(4):
            await asyncio.sleep(0.15)
            await holder.extend([batch])
        fetch = asyncio.create_task(other.fetch())
        await asyncio.sleep(0.1)
        assert not fetch.done(), "an extended lease was redelivered"
        fetch.cancel()
        await holder.settle(batch, Settlement(acked=batch.messages))
    finally:
        await holder.close()
        await other.close()


async def test_retry_delay_hides_the_message_until_due(tmp_path: Path) -> None:
    options = SqliteOptions(database=str(tmp_path / "q.db"), poll_interval=0.01)
    t = SqliteTransport(["q"], options)
    await t.connect()
    try:
        await t.publish("q", [(b"h", b"v")], None, {"kafka": {"key": b"k"}})
        (b,) = await t.fetch()
        started = time.monotonic()
        await t.settle(b, Settlement(retry=[Retry(b.messages[0], "later", 0.3)]))
        (again,) = await asyncio.wait_for(t.fetch(), 5)
        assert time.monotonic() - started >= 0.25
        m = again.messages[0]
        assert (m.attempt, m.headers, m.payload, m.bindings) == (
            2,
            [(b"h", b"v")],
            None,
            {"kafka": {"key": b"k"}},
        )
    finally:
        await t.close()


async def test_another_process_sends_while_this_one_consumes(tmp_path: Path) -> None:
    db = str(tmp_path / "shared.db")
    t = SqliteTransport(["jobs"], SqliteOptions(database=db, poll_interval=0.01, batch_size=500))
    await t.connect()
    try:
        sender = subprocess.Popen(  # noqa: ASYNC220 - a peer process, waited for below
            [
                sys.executable,
                "-c",
                "import sys\nfrom amgi.servers.sqlite import SqliteQueue\n"
                "q = SqliteQueue(sys.argv[1])\n"
                "for i in range(200): q.put('jobs', [], str(i).encode(), {})\n",
                db,
            ],
        )
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(got) < 200 and time.monotonic() < deadline:
            for b in await asyncio.wait_for(t.fetch(), 20):
                got += [m.payload or b"" for m in b.messages]
                await t.settle(b, Settlement(acked=b.messages))
        assert sender.wait(20) == 0
        assert got == [str(i).encode() for i in range(200)]
    finally:
        await t.close()


async def test_a_binding_that_looks_like_a_tag_round_trips_and_blocks_nothing(
    tmp_path: Path,
) -> None:
    """A dict whose one key is ``$bytes`` read back as bytes (or failed to: every fetch
    then raised, the queue was stuck for good and nothing was ever dead-lettered)."""
    odd: dict[str, dict[str, object]] = {
        "sqs": {"attribute_types": {"$bytes": "Binary"}},
        "x": {"y": {"$dict": [1]}, "z": {"$bytes": "YQ=="}},
    }
    assert decode_bindings(encode_bindings(odd)) == odd
    t = SqliteTransport(["q"], SqliteOptions(database=str(tmp_path / "q.db")))
    await t.connect()
    try:
        await t.publish("q", [], b"before", {})
        await t.publish("q", [], b"odd", odd)
        await t.publish("q", [], b"after", {})
        (batch,) = await asyncio.wait_for(t.fetch(), 5)
        assert [m.payload for m in batch.messages] == [b"before", b"odd", b"after"]
        assert batch.messages[1].bindings == odd
    finally:
        await t.close()


async def test_a_stored_message_that_cannot_be_read_is_dead_lettered_alone(
    tmp_path: Path,
) -> None:
    """Given to no app and retried for ever, it would never leave; the others go on."""
    db = str(tmp_path / "q.db")
    queue = SqliteQueue(db)
    queue.put("q", [], b"good 1", {})
    bad_bindings = queue.put("q", [], b"bad bindings", {})
    bad_headers = queue.put("q", [(b"h", b"v")], b"bad headers", {})
    queue.put("q", [], b"good 2", {})
    queue.db.execute("UPDATE amgi_messages SET bindings = ? WHERE id = ?", (b"{", bad_bindings))
    queue.db.execute("UPDATE amgi_messages SET headers = ? WHERE id = ?", (b"\0\0", bad_headers))
    t = SqliteTransport(["q"], SqliteOptions(database=db))
    await t.connect()
    try:
        (batch,) = await asyncio.wait_for(t.fetch(), 5)
        assert [m.payload for m in batch.messages] == [b"good 1", b"good 2"]
    finally:
        await t.close()
    dead = queue.stored_dead_letters("q", 10)
    queue.close()
    assert [(d.payload, d.attempts) for d in dead] == [(b"bad bindings", 1), (b"bad headers", 1)]
    assert dead[0].reason.startswith("sqlite: the stored message cannot be read: its bindings")
    assert dead[1].reason.startswith("sqlite: the stored message cannot be read: its headers")


async def test_messages_the_app_never_had_keep_their_attempts_at_a_stop(tmp_path: Path) -> None:
    """Spec guarantee: a stop uses up no attempt of what the app never received. The
    lease counted one and nothing gave it back: three stops dead-lettered such messages
    before any app saw them."""
    from amgi.runtime import Runtime, RuntimeConfig

    db = str(tmp_path / "q.db")
    queue = SqliteQueue(db)
    queue.put_many("q", (([], b"%d" % i, {}) for i in range(6)))
    received: list[bytes] = []
    got_one = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        m = await receive()
        received.append(m["payload"])
        got_one.set()
        await asyncio.sleep(30)  # cancelled at the stop, with two of its batch not received

    options = SqliteOptions(database=db, batch_size=3, poll_interval=0.01)
    config = RuntimeConfig(lifespan="off", concurrency=2, shutdown_timeout=0.3, crash_ledger="")
    runtime = Runtime(slow, SqliteTransport(["q"], options), config)
    served = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(got_one.wait(), 10)
    await asyncio.sleep(0.2)  # the second batch is fetched, waiting behind the first (same key)
    runtime.request_stop()
    assert await asyncio.wait_for(served, 20) == 0
    attempts = dict(queue.db.execute("SELECT payload, attempts FROM amgi_messages").fetchall())
    queue.close()
    assert received == [b"0"]
    assert attempts == {b"0": 1, b"1": 0, b"2": 0, b"3": 0, b"4": 0, b"5": 0}


async def test_idle_addresses_cost_a_read_not_a_write_per_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every poll tried a lease (a write) on every address: 500 idle queues took about
    half a core. Now one read finds the addresses with a message ready."""
    leases: list[str] = []
    real = SqliteQueue.lease

    def counted(self: SqliteQueue, address: str, *args: Any) -> Any:
        leases.append(address)
        return real(self, address, *args)

    monkeypatch.setattr(SqliteQueue, "lease", counted)
    addresses = [f"q{i}" for i in range(600)]  # more than one read's parameters
    t = SqliteTransport(
        addresses, SqliteOptions(database=str(tmp_path / "q.db"), poll_interval=0.01)
    )
    await t.connect()
    try:
        fetching = asyncio.create_task(t.fetch())
        await asyncio.sleep(0.3)  # about 30 polls of 600 idle addresses
        assert leases == []
        await t.publish("q555", [], b"m", {})
        (batch,) = await asyncio.wait_for(fetching, 5)
        assert batch.address == "q555"
        assert leases == ["q555"]
    finally:
        await t.close()


def test_a_full_database_is_named_as_the_cause_of_a_failed_write(tmp_path: Path) -> None:
    """A transaction's insert finds the database full and SQLite rolls the transaction
    back itself: the ROLLBACK that followed raised "cannot rollback - no transaction is
    active" in place of the cause. Now the error says the database is full, and the
    connection goes on."""
    queue = SqliteQueue(str(tmp_path / "q.db"))
    try:
        (pages,) = queue.db.execute("PRAGMA page_count").fetchone()
        queue.db.execute(f"PRAGMA max_page_count={pages + 2}")
        with pytest.raises(sqlite3.OperationalError, match="full"):
            queue.put_many("q", [([], b"x" * 5000, {})] * 10)
        assert queue.count("q") == 0, "part of the transaction was kept"
        queue.db.execute(f"PRAGMA max_page_count={2**30}")
        queue.put_many("q", [([], b"x", {})] * 2)
        assert queue.count("q") == 2
    finally:
        queue.close()
