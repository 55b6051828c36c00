"""``amgi dead-letters list|replay`` and the transport methods behind it, on the memory
and SQLite servers, including a replay killed with SIGKILL half-way."""

from __future__ import annotations

import asyncio
import contextlib
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
from amgi.servers.memory import MemoryBroker, MemoryOptions, MemoryTransport
from amgi.servers.sqlite import SqliteOptions, SqliteQueue, SqliteTransport
from tests.ops.helpers import amgi, one_line_error

pytestmark = pytest.mark.timeout(90)


async def test_memory_list_and_replay_after_real_dead_lettering() -> None:
    broker = MemoryBroker.reset("dead")
    for i in range(3):
        broker.put("q", [(b"n", b"%d" % i)], b"bad %d" % i)
    replayed = asyncio.Event()
    acked: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        more = True
        while more:
            m = await receive()
            if m["bindings"]["amgi"]["attempt"] == 1 and not replayed.is_set():
                await send({"type": "message.nack", "id": m["id"], "message": "refused"})
            else:
                acked.append(m["payload"])
                await send({"type": "message.ack", "id": m["id"]})
            more = m.get("more_messages", False)

    transport = MemoryTransport(["q"], MemoryOptions(broker="dead"))
    runtime = Runtime(app, transport, RuntimeConfig(lifespan="off", max_attempts=1))
    served = asyncio.create_task(runtime.serve())
    try:
        async with asyncio.timeout(10):
            while len(broker.dead.get("q", [])) < 3:
                await asyncio.sleep(0.01)
        listed = await transport.list_dead_letters("q", 2)
        assert [d.payload for d in listed] == [b"bad 0", b"bad 1"]
        assert listed[0].reason == "refused"
        assert listed[0].attempts == 1
        assert listed[0].headers == [(b"n", b"0")]
        replayed.set()
        assert await transport.replay_dead_letters("q", 2) == 2
        async with asyncio.timeout(10):
            while len(acked) < 2:
                await asyncio.sleep(0.01)
        assert sorted(acked) == [b"bad 0", b"bad 1"]
        assert [m.payload for m, _ in broker.dead["q"]] == [b"bad 2"]
    finally:
        runtime.request_stop()
        await served


def dead_letter(db: Path, address: str, n: int) -> None:
    """Put ``n`` messages on ``address`` and dead-letter them through the queue's own
    lease and settle calls (what the server does after the last attempt)."""
    queue = SqliteQueue(str(db))
    try:
        queue.put_many(address, (([(b"i", b"%d" % i)], b"payload %d" % i, {}) for i in range(n)))
        token, messages = queue.lease(address, n, 30.0)
        queue.settle(token, n, [], [], [(m.token, f"reason {m.payload!r}") for m in messages])
    finally:
        queue.close()


def payloads(db: Path, table: str) -> list[bytes]:
    with sqlite3.connect(db) as conn:
        return [p for (p,) in conn.execute(f"SELECT payload FROM {table} ORDER BY id")]


def test_sqlite_list_and_replay_from_the_command_line(tmp_path: Path) -> None:
    dead_letter(tmp_path / "amgi.db", "orders", 3)
    listed = amgi("dead-letters", "list", "orders", "--limit", "2", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "reason:  reason b'payload 0'" in listed.stdout
    assert "headers: i=1" in listed.stdout
    assert "payload: b'payload 1'" in listed.stdout
    assert "payload 2" not in listed.stdout
    assert "attempts=1" in listed.stdout
    assert "2 dead letter(s) of 'orders' shown (sqlite)" in listed.stdout
    replay = amgi("dead-letters", "replay", "orders", "--limit", "2", cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr
    assert "replayed 2 dead letter(s) to 'orders'" in replay.stdout
    assert payloads(tmp_path / "amgi.db", "amgi_messages") == [b"payload 0", b"payload 1"]
    assert payloads(tmp_path / "amgi.db", "amgi_dead_letters") == [b"payload 2"]
    queue = SqliteQueue(str(tmp_path / "amgi.db"))
    _, messages = queue.lease("orders", 10, 30.0)
    queue.close()
    assert [m.attempt for m in messages] == [1, 1], "a replayed message starts a new life"
    assert messages[0].headers == [(b"i", b"0")]


def replay_behind_a_writer(db: Path, n: int) -> tuple[sqlite3.Connection, subprocess.Popen[str]]:
    """``n`` dead letters of ``q`` in ``db``, a writer holding its lock (the connection
    returned: ``COMMIT`` lets the replay go on), and ``amgi dead-letters replay q``
    started in ``db``'s folder, waiting for that writer."""
    dead_letter(db, "q", n)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    replay = subprocess.Popen(
        [sys.executable, "-m", "amgi", "dead-letters", "replay", "q", "--busy-timeout", "30"],
        cwd=db.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as in a shell: a test worker may run with SIGINT ignored, which the
        # child would inherit (Python then installs no KeyboardInterrupt for it).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    return lock, replay


def wait_until_open(process: subprocess.Popen[str], path: Path, timeout: float = 30) -> None:
    """Wait until ``process`` has ``path`` open (it started and reached the database)."""
    deadline = time.monotonic() + timeout
    fds = Path(f"/proc/{process.pid}/fd")
    while True:
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) == str(path) for fd in fds.iterdir()):
                return
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never opened"
        time.sleep(0.05)


def test_sqlite_replay_killed_half_way_keeps_every_dead_letter_exactly_once(
    tmp_path: Path,
) -> None:
    db = tmp_path / "amgi.db"
    n = 20_000
    lock, replay = replay_behind_a_writer(db, n)
    try:
        reader = sqlite3.connect(db)
        time.sleep(0.5)  # let the replay start and queue up behind the lock
        lock.execute("COMMIT")
        deadline = time.monotonic() + 30
        while reader.execute("SELECT count(*) FROM amgi_messages").fetchone()[0] == 0:
            assert time.monotonic() < deadline, "the replay never moved anything"
            assert replay.poll() is None, replay.stderr
        lock.execute("BEGIN IMMEDIATE")  # hold it still, then kill it mid-way
        replay.send_signal(signal.SIGKILL)
        replay.wait(10)
        lock.execute("COMMIT")
        reader.close()
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait()
        lock.close()
    queued = payloads(db, "amgi_messages")
    dead = payloads(db, "amgi_dead_letters")
    assert 0 < len(queued) < n, "killed too late to test anything"
    assert sorted(queued + dead) == sorted(b"payload %d" % i for i in range(n))
    finish = amgi("dead-letters", "replay", "q", cwd=tmp_path)
    assert finish.returncode == 0, finish.stderr
    assert len(payloads(db, "amgi_messages")) == n
    assert payloads(db, "amgi_dead_letters") == []


def test_an_interrupted_replay_says_what_it_leaves(tmp_path: Path) -> None:
    """Ctrl-C in the middle of a replay exited 130 without a word, part of the dead
    letters moved back and the rest not: the operator is told now."""
    db = tmp_path / "amgi.db"
    n = 20_000
    lock, replay = replay_behind_a_writer(db, n)
    try:
        wait_until_open(replay, db)
        time.sleep(0.3)  # and waiting behind the lock
        replay.send_signal(signal.SIGINT)
        time.sleep(0.2)
        lock.execute("COMMIT")
        out, err = replay.communicate(timeout=30)
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait()
        lock.close()
    assert replay.returncode == 130, err
    assert "replayed" not in out
    assert err.strip().endswith(
        "amgi: replay interrupted: the dead letters it moved are back on 'q', the rest are "
        "still dead letters (replay again to move them)"
    ), err
    assert len(payloads(db, "amgi_messages")) + len(payloads(db, "amgi_dead_letters")) == n


async def test_sqlite_replay_leaves_dead_letters_made_after_it_started(tmp_path: Path) -> None:
    """A replay moves the dead letters there when it started, once each, and ends. It
    took those a running consumer dead-lettered meanwhile, its own copies failing again
    included, and replayed about 5 times as many (50,000 dead letters: 283,100)."""
    db = tmp_path / "amgi.db"
    n = 300
    dead_letter(db, "q", n)
    replayer = SqliteTransport([], SqliteOptions(database=str(db), busy_timeout=30))
    await replayer.connect()
    lock = sqlite3.connect(db, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # the replay's first move waits for this writer
        replay = asyncio.create_task(replayer.replay_dead_letters("q", 10**9))
        await asyncio.sleep(0.5)
        assert not replay.done()
        lock.execute(  # what a consumer dead-letters meanwhile
            "INSERT INTO amgi_dead_letters (message_id, address, headers, payload, bindings,"
            " attempts, reason, dead_at) SELECT message_id, address, headers, payload, bindings,"
            " attempts, reason, dead_at FROM amgi_dead_letters WHERE address = 'q' LIMIT 150"
        )
        lock.execute("COMMIT")
        assert await asyncio.wait_for(replay, 30) == n
    finally:
        lock.close()
        await replayer.close()
    assert len(payloads(db, "amgi_messages")) == n
    assert len(payloads(db, "amgi_dead_letters")) == 150  # for the next replay


def test_a_server_without_dead_letter_support_says_so(tmp_path: Path) -> None:
    result = amgi("dead-letters", "list", "q", "--server", "amp", cwd=tmp_path)
    assert "the amp server cannot list its dead letters" in one_line_error(result)
    limit = amgi("dead-letters", "replay", "q", "--limit", "-1", cwd=tmp_path)
    assert "--limit must not be negative" in one_line_error(limit)


def test_list_escapes_what_a_terminal_would_act_on(tmp_path: Path) -> None:
    """A producer's header or reason with a line break forged a whole fake entry in the
    listing, and escape sequences reached the operator's terminal."""
    queue = SqliteQueue(str(tmp_path / "amgi.db"))
    try:
        forged = b"x\n2  attempts=1  dead-lettered=unknown\n    reason:  forged entry"
        queue.put_many("q", [([(b"h\x1b[2J", forged)], b"payload", {})])
        token, messages = queue.lease("q", 1, 30.0)
        queue.settle(token, 1, [], [], [(messages[0].token, "bad\r\n\x1b]0;title\x07 \\ end")])
    finally:
        queue.close()
    listed = amgi("dead-letters", "list", "q", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 5, listed.stdout  # one entry of four lines, then the count
    assert "\x1b" not in listed.stdout
    assert "\r" not in listed.stdout
    assert lines[1] == "    reason:  bad\\r\\n\\x1b]0;title\\x07 \\\\ end"
    assert lines[2].startswith("    headers: h\\x1b[2J=x\\n2  attempts=1")


def test_dead_letters_of_a_database_file_that_does_not_exist_is_an_error(
    tmp_path: Path,
) -> None:
    """A mistyped --database listed '0 dead letter(s)' and exited 0."""
    for command in ("list", "replay"):
        result = amgi("dead-letters", command, "q", "--database", "typo.db", cwd=tmp_path)
        assert "there was no database file 'typo.db'" in one_line_error(result)
        assert list(tmp_path.iterdir()) == [], "the connect's new file is not left behind"
