"""The crash ledger's file: take-over of dead processes' files, counts, size, bad folders."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from amgi.runtime import Runtime, RuntimeConfig
from amgi.runtime.ledger import CrashLedger
from amgi.servers.sqlite import SqliteOptions, SqliteQueue, SqliteTransport
from amgi.transport import Message


def msgs(*ids: str) -> list[Message]:
    return [Message(i, [], b"") for i in ids]


def die(ledger: CrashLedger) -> None:
    """What SIGKILL does to a ledger: the lock goes, the file stays as it was."""
    assert ledger._fd is not None
    os.close(ledger._fd)
    ledger._fd = None


def test_a_dead_process_file_is_taken_over_and_a_live_one_is_not(tmp_path: Path) -> None:
    first = CrashLedger(str(tmp_path), "src")
    first.open()
    done = first.begin("q", msgs("a", "b"), exclusive=False)
    first.end(done)
    first.begin("q", msgs("c", "d"), exclusive=False)
    alive = CrashLedger(str(tmp_path), "src")
    alive.open()
    assert alive.suspects == {}, "the file of a live process was read"
    other = CrashLedger(str(tmp_path), "another source")
    die(first)
    other.open()
    assert other.suspects == {}, "another source's ids were taken"
    heir = CrashLedger(str(tmp_path), "src")
    heir.open()
    assert heir.known("q", "c") == (1, 0)
    assert heir.known("q", "d") == (1, 0)
    assert heir.known("q", "a") is None, "a call that ended was counted"
    assert not os.path.exists(first._path)
    # The heir dies holding "c" alone: its heir inherits both crashes.
    heir.begin("q", msgs("c"), exclusive=True)
    die(heir)
    last = CrashLedger(str(tmp_path), "src")
    last.open()
    assert last.known("q", "c") == (2, 1)
    assert last.known("q", "d") == (1, 0), "suspects carry over until settled"
    last.forget("q", ["c", "d"])
    last.close()
    for ledger in (alive, other):
        ledger.close()
    assert os.listdir(tmp_path) == [], "a clean close with no suspects leaves no file"


def test_a_line_cut_short_by_the_crash_is_ignored(tmp_path: Path) -> None:
    ledger = CrashLedger(str(tmp_path), "src")
    ledger.open()
    ledger.begin("q", msgs("x"), exclusive=False)
    assert ledger._fd is not None
    os.write(ledger._fd, b'["B", 99, 0, "q", ["y", "z"')
    die(ledger)
    heir = CrashLedger(str(tmp_path), "src")
    heir.open()
    assert set(heir.suspects) == {("q", "x")}
    heir.close()


def test_the_file_stays_small_however_many_calls(tmp_path: Path) -> None:
    ledger = CrashLedger(str(tmp_path), "src")
    ledger.open()
    ids = [f"id-{i:06d}" for i in range(100)]
    for _ in range(3000):
        ledger.end(ledger.begin("q", msgs(*ids), exclusive=False))
    assert os.path.getsize(ledger._path) < 300 * 1024
    ledger.close()


async def test_an_unusable_ledger_folder_is_one_warning_and_no_ledger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    db = str(tmp_path / "q.db")
    queue = SqliteQueue(db)
    queue.put("q", [], b"x", {})

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "message":
            m = await receive()
            await send({"type": "message.ack", "id": m["id"]})

    transport = SqliteTransport(["q"], SqliteOptions(database=db, poll_interval=0.01))
    runtime = Runtime(app, transport, RuntimeConfig(lifespan="off", crash_ledger=str(not_a_folder)))
    with caplog.at_level(logging.WARNING):
        task = asyncio.create_task(runtime.serve())
        for _ in range(500):
            if not queue.count("q"):
                break
            await asyncio.sleep(0.01)
        runtime.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
    assert queue.count("q") == 0
    queue.close()
    assert any(
        "crash ledger" in r.getMessage() and "unusable" in r.getMessage() for r in caplog.records
    )
