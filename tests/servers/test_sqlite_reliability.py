"""Poison isolation, crash loops and shutdown on the embedded SQLite server, for real."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.sqlite import SqliteOptions, SqliteQueue, SqliteTransport
from amgi.transport import Settlement
from tests.core.test_isolation import PoisonApp, payloads_with_poison
from tests.servers.crash_loop import KILLER_APP

CONFIG = dict(lifespan="off", max_attempts=5, retry_delay=0.01, retry_delay_max=0.02)


async def serve_until_settled(app: Any, db: str, batch_size: int, **config: Any) -> SqliteQueue:
    transport = SqliteTransport(
        ["q"], SqliteOptions(database=db, batch_size=batch_size, poll_interval=0.01)
    )
    runtime = Runtime(app, transport, RuntimeConfig(**{**CONFIG, **config}))
    task = asyncio.create_task(runtime.serve())
    queue = SqliteQueue(db)
    deadline = time.monotonic() + 60
    while queue.count("q"):
        assert time.monotonic() < deadline, "the queue was not settled"
        assert not task.done(), task
        await asyncio.sleep(0.02)
    runtime.request_stop()
    assert await asyncio.wait_for(task, 10) == 0
    return queue


async def test_one_poison_in_300_leaves_exactly_one_dead_letter(tmp_path: Path) -> None:
    db = str(tmp_path / "q.db")
    payloads = payloads_with_poison(300, 150)
    queue = SqliteQueue(db)
    queue.put_many("q", [([], p, {}) for p in payloads])
    app = PoisonApp()
    queue = await serve_until_settled(app, db, 100, crash_ledger=str(tmp_path / "ledger"))
    dead = queue.dead_letters("q")
    queue.close()
    assert [(d.payload, d.attempts) for d in dead] == [(b"bad", 5)]
    assert "ValueError: cannot parse" in dead[0].reason
    assert sorted(app.acked) == sorted(p for p in payloads if p != b"bad")
    assert {a for p, a in app.seen if p != b"bad"} == {1}


async def test_nack_without_retry_is_dead_at_once(tmp_path: Path) -> None:
    db = str(tmp_path / "q.db")
    queue = SqliteQueue(db)
    queue.put_many("q", [([], b"ok", {}), ([], b"final", {})])
    extensions: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        extensions.append(scope["extensions"])
        more = True
        while more:
            m = await receive()
            more = m["more_messages"]
            if m["payload"] == b"final":
                await send({"type": "message.nack", "id": m["id"], "message": "no", "retry": False})
            else:
                await send({"type": "message.ack", "id": m["id"]})

    queue = await serve_until_settled(app, db, 10, crash_ledger="")
    dead = queue.dead_letters("q")
    queue.close()
    assert [(d.payload, d.attempts, d.reason) for d in dead] == [(b"final", 1, "no")]
    assert extensions == [{"message.nack.retry": {}}]


LOGGING_APP = """
async def app(scope, receive, send):
    if scope["type"] != "message":
        return
    more = True
    while more:
        m = await receive()
        more = m["more_messages"]
        await send({"type": "message.ack", "id": m["id"]})
"""


def test_sigterm_while_the_lease_waits_for_the_write_lock_releases_it(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(LOGGING_APP)
    db = str(tmp_path / "amgi.db")
    SqliteQueue(db).close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", "app:app", "q", "--busy-timeout", "20"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    holder = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "serving q on sqlite" in line:
                break
        else:
            raise AssertionError("the server did not start")
        # Another process takes the write lock and adds a message: the server's next
        # lease UPDATE now waits for the lock (busy timeout 20 s).
        holder.execute("BEGIN IMMEDIATE")
        holder.execute(
            "INSERT INTO amgi_messages (address, headers, payload, visible_at, created_at)"
            " VALUES ('q', x'', x'01', 0, 0)"
        )
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        holder.execute("COMMIT")  # the waiting lease now takes the row
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        holder.close()
    queue = SqliteQueue(db)
    try:
        rows = queue.db.execute("SELECT lease, visible_at FROM amgi_messages").fetchall()
    finally:
        queue.close()
    assert len(rows) == 1
    lease, visible_at = rows[0]
    assert lease is None, "the lease taken after the stop was not released"
    assert visible_at <= time.time()


async def cancel_a_fetch_behind_a_lock(
    db: str, payloads: list[bytes], options: SqliteOptions
) -> tuple[SqliteTransport, sqlite3.Connection]:
    """A queue of ``payloads``, a connected transport, and a fetch of it cancelled while
    its lease waits for the write lock of the returned connection (another process)."""
    queue = SqliteQueue(db)
    queue.put_many("q", (([], p, {}) for p in payloads))
    queue.close()
    transport = SqliteTransport(["q"], options)
    await transport.connect()
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    fetch = asyncio.ensure_future(transport.fetch())
    await asyncio.sleep(0.2)  # its lease waits for the lock
    fetch.cancel()
    await asyncio.gather(fetch, return_exceptions=True)
    return transport, holder


async def test_a_lease_taken_after_its_fetch_was_cancelled_goes_back_at_once(
    tmp_path: Path,
) -> None:
    """A fetch cancelled (a stop) while its lease waits for the write lock another
    process holds: the lease commits after, and its rows stayed hidden until the close
    released them, or until the visibility timeout let another process take them with an
    attempt counted that no application had. Now it is released right behind it."""
    db = str(tmp_path / "q.db")
    options = SqliteOptions(database=db, visibility_timeout=30, poll_interval=0.01, busy_timeout=5)
    payloads = [b"0", b"1", b"2"]
    stopping, holder = await cancel_a_fetch_behind_a_lock(db, payloads, options)
    other = SqliteTransport(["q"], options)
    await other.connect()
    try:
        holder.execute("COMMIT")  # the lease goes on and takes the rows
        await stopping._run(lambda: None)  # (its worker thread did what was queued)
        async with asyncio.timeout(5):  # not after the 30 s visibility timeout
            (batch,) = await other.fetch()
        await other.settle(batch, Settlement(acked=list(batch.messages)))
    finally:
        holder.close()
        await stopping.close()
        await other.close()
    assert sorted((m.payload, m.attempt) for m in batch.messages) == [
        (b"0", 1),
        (b"1", 1),
        (b"2", 1),
    ]


async def test_a_close_given_up_on_does_not_freeze_the_event_loop_and_still_releases(
    tmp_path: Path,
) -> None:
    """The close queues its release behind a lease that waits for another process's write
    lock; the runtime gives up on a close after a while and cancels it. Its cleanup then
    waited for the worker thread on the event loop (frozen up to --busy-timeout), and the
    release never ran: the rows stayed leased with an attempt counted. Now the loop goes
    on, and the release runs once the lock is free."""
    db = str(tmp_path / "q.db")
    options = SqliteOptions(database=db, poll_interval=0.01, busy_timeout=10)
    transport, holder = await cancel_a_fetch_behind_a_lock(db, [b"x"], options)
    try:
        closing = asyncio.ensure_future(transport.close())
        await asyncio.sleep(0.3)
        started = time.monotonic()
        closing.cancel()  # given up on
        await asyncio.gather(closing, return_exceptions=True)
        await asyncio.sleep(0.05)
        assert time.monotonic() - started < 1, "the event loop waited for the worker thread"
        holder.execute("COMMIT")
        state = "SELECT attempts, lease FROM amgi_messages"
        async with asyncio.timeout(5):
            while holder.execute(state).fetchall() != [(0, None)]:
                await asyncio.sleep(0.02)
    finally:
        holder.close()


NO_COUNTER_SERVER = """
import sys
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.sqlite import SqliteOptions, SqliteTransport
from killer import app


class NoDeliveryCounter(SqliteTransport):
    \"\"\"SQLite as a broker that does not count deliveries (Kafka, MQTT ...) would look.\"\"\"

    counts_deliveries = False

    async def fetch(self):
        batches = await super().fetch()
        for batch in batches:
            for m in batch.messages:
                m.attempt = 1
        return batches


options = SqliteOptions(batch_size=50, visibility_timeout=1, poll_interval=0.02)
config = RuntimeConfig(max_attempts=5, retry_delay=0.05, crash_ledger=sys.argv[1])
sys.exit(Runtime(app, NoDeliveryCounter(["q"], options), config, handle_signals=True).run())
"""


@pytest.mark.parametrize("broker", ["sqlite", "without a delivery counter"])
def test_a_message_that_kills_the_process_is_the_only_dead_letter(
    tmp_path: Path, broker: str
) -> None:
    (tmp_path / "killer.py").write_text(KILLER_APP)
    (tmp_path / "no_counter.py").write_text(NO_COUNTER_SERVER)
    db = str(tmp_path / "amgi.db")
    acks = tmp_path / "acks"
    payloads = [b"kill" if i == 10 else f"m{i:02d}".encode() for i in range(60)]
    queue = SqliteQueue(db)
    queue.put_many("q", [([], p, {}) for p in payloads])
    ledger = str(tmp_path / "ledger")
    if broker == "sqlite":
        argv = [
            sys.executable, "-m", "amgi", "run", "killer:app", "q",
            "--batch-size", "50", "--max-attempts", "5", "--visibility-timeout", "1",
            "--poll-interval", "0.02", "--retry-delay", "0.05", "--crash-ledger", ledger,
        ]  # fmt: skip
    else:
        argv = [sys.executable, "no_counter.py", ledger]
    env = {**os.environ, "ACKS": str(acks)}
    kills = 0
    deadline = time.monotonic() + 120
    try:
        while True:
            proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
            try:
                while proc.poll() is None and queue.count("q"):
                    assert time.monotonic() < deadline, "the crash loop did not end"
                    time.sleep(0.05)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    assert proc.wait(30) == 0
                    break
            finally:
                proc.kill()
                proc.wait()
            assert proc.returncode == -signal.SIGKILL
            kills += 1
            assert kills <= 10, "the killer was not dead-lettered"
        dead = queue.dead_letters("q")
    finally:
        queue.close()
    assert [d.payload for d in dead] == [b"kill"], [d.payload for d in dead]
    assert "died 5 times" in dead[0].reason
    assert kills == 5
    acked = set(acks.read_text().split())
    assert acked == {p.decode() for p in payloads if p != b"kill"}


async def test_an_ack_whose_settle_meets_a_locked_database_is_not_dead_lettered(
    tmp_path: Path,
) -> None:
    """Another process holds the write lock longer than --busy-timeout while a batch
    settles: the settle failed, the acked rows came back after the visibility timeout
    with an attempt counted, and at the last attempt were dead-lettered although the
    application acked them. Now the settle is tried again while the lease lasts."""
    db = str(tmp_path / "q.db")
    queue = SqliteQueue(db)
    queue.put("q", [], b"x", {})
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    seen: list[int] = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "message":
            m = await receive()
            seen.append(m["bindings"]["amgi"]["attempt"])
            holder.execute("BEGIN IMMEDIATE")  # another process takes the write lock
            asyncio.get_running_loop().call_later(0.6, holder.execute, "COMMIT")
            await send({"type": "message.ack", "id": m["id"]})

    options = SqliteOptions(database=db, poll_interval=0.01, busy_timeout=0.1, visibility_timeout=3)
    config = RuntimeConfig(**{**CONFIG, "max_attempts": 1}, crash_ledger="")
    runtime = Runtime(app, SqliteTransport(["q"], options), config)
    task = asyncio.create_task(runtime.serve())
    try:
        deadline = time.monotonic() + 10
        while queue.count("q") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
        holder.close()
    dead = queue.dead_letters("q")
    queue.close()
    assert dead == [], f"an acked message was dead-lettered: {dead[0].reason}"
    assert seen == [1]
