"""The crash ledger's file: take-over of dead processes' files, counts, size, bad folders."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from amgi.runtime import Runtime, RuntimeConfig
from amgi.runtime import ledger as ledger_module
from amgi.runtime.ledger import CallGuard, CrashLedger
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


@pytest.mark.parametrize("whose", ["writable by all", "another user's"])
def test_a_folder_others_can_write_to_is_refused(tmp_path: Path, whose: str) -> None:
    """The default folder is in the shared temporary directory: another user could
    create it first and plant a file there that convicts an innocent message of
    crashes (dead-lettered before delivery). Such a folder is refused, not read."""
    folder = tmp_path / "ledger"
    folder.mkdir()
    planter = CrashLedger(str(folder), "src")
    (folder / f"{planter._prefix}-1-planted.ledger").write_text(
        f'["N", "src"]\n["S", "q", "1", 99, 99, {time.time()}]\n'
    )
    if whose == "another user's":
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chown(folder, 65534, 65534)
        folder.chmod(0o755)
    else:
        folder.chmod(0o777)
    ledger = CrashLedger(str(folder), "src")
    with pytest.raises(PermissionError, match=r"another user|others can write"):
        ledger.open()
    assert ledger.known("q", "1") is None, "a planted file was believed"
    assert ledger._fd is None


class Killed(BaseException):
    """The process dies here (a SIGKILL, a second signal's ``os._exit``)."""


def fail_writes(
    monkeypatch: pytest.MonkeyPatch, folder: Path, after: int, error: BaseException
) -> None:
    """Writes to files in ``folder`` succeed ``after`` times, then raise ``error``."""
    real = os.write
    left = [after]

    def write(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
            if left[0] <= 0:
                raise error
            left[0] -= 1
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_a_crash_during_compaction_keeps_the_crash_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = CrashLedger(str(tmp_path), "src")
    first.open()
    first.begin("q", msgs("poison"), exclusive=True)
    die(first)
    second = CrashLedger(str(tmp_path), "src")
    second.open()
    assert second.known("q", "poison") == (1, 1)
    monkeypatch.setattr(ledger_module, "_COMPACT_AT", 0)
    call = second.begin("q", msgs("other"), exclusive=False)
    with monkeypatch.context() as patch:
        fail_writes(patch, tmp_path, 0, Killed())
        with pytest.raises(Killed):
            second.end(call)  # compaction: the process dies in the middle of it
    die(second)
    # What a process killed while writing aside leaves (the old file stays whole).
    (tmp_path / "0123456789abcdef-1-dead.ledger.new").write_bytes(b'["N", "sr')
    heir = CrashLedger(str(tmp_path), "src")
    heir.open()
    assert heir.known("q", "poison") == (1, 1), "a crash mid-compaction lost the counts"
    heir.forget("q", ["poison", "other"])
    heir.close()
    assert os.listdir(tmp_path) == [], "the half-written file of the crash was left"


@pytest.mark.parametrize("during", [False, True], ids=["between calls", "mid-compaction"])
def test_a_stop_signal_counts_no_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, during: bool
) -> None:
    """A second signal ends the calls in progress (``stopped``, then ``os._exit``): the
    next process must not count them, even when it came as a compaction renamed its new
    file over the old one and had not yet swapped descriptors."""
    ledger = CrashLedger(str(tmp_path), "src")
    ledger.open()
    ledger.begin("q", msgs("a", "b"), exclusive=False)
    call = ledger.begin("q", msgs("c"), exclusive=False)
    if during:
        monkeypatch.setattr(ledger_module, "_COMPACT_BUSY_AT", 0)
        real = os.rename

        def rename(src: str, dst: str) -> None:
            real(src, dst)
            ledger.stopped()
            raise Killed

        with monkeypatch.context() as patch:
            patch.setattr(os, "rename", rename)
            with pytest.raises(Killed):
                ledger.end(call)
    else:
        ledger.stopped()
    die(ledger)
    heir = CrashLedger(str(tmp_path), "src")
    heir.open()
    assert heir.suspects == {}, "a stop was counted as a crash"
    heir.begin("q", msgs("d"), exclusive=False)
    die(heir)
    last = CrashLedger(str(tmp_path), "src")
    last.open()
    assert set(last.suspects) == {("q", "d")}, "a call begun after the stop must count"
    last.forget("q", ["d"])
    last.close()


def test_a_full_disk_neither_fails_a_call_nor_convicts_a_live_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "_COMPACT_AT", 0)
    live = CrashLedger(str(tmp_path), "src")
    live.open()
    guard = CallGuard(live)

    async def calls() -> None:
        token = await guard.enter("q", msgs("a"), exclusive=False)
        waiter = asyncio.create_task(guard.enter("q", msgs("b"), exclusive=True))
        await asyncio.sleep(0)
        with monkeypatch.context() as patch:
            fail_writes(patch, tmp_path, 0, OSError(errno.ENOSPC, "No space left on device"))
            guard.leave(token)  # the compaction at the call's end finds the disk full
            guard.leave(await asyncio.wait_for(waiter, 5))
            guard.leave(await guard.enter("q", msgs("c"), exclusive=False))

    asyncio.run(calls())
    other = CrashLedger(str(tmp_path), "src")
    other.open()
    assert other.suspects == {}, "the calls of a live process were taken for a crash"
    other.close()
    live.close()
    assert os.listdir(tmp_path) == []


async def test_a_full_disk_at_a_compaction_still_settles_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    db = str(tmp_path / "q.db")
    folder = tmp_path / "ledger"
    queue = SqliteQueue(db)
    queue.put_many("q", [([], b"x", {})] * 3)
    monkeypatch.setattr(ledger_module, "_COMPACT_AT", 0)
    # Room for the file's first line and one call's: the compaction at its end fails.
    fail_writes(monkeypatch, folder, 2, OSError(errno.ENOSPC, "No space left on device"))

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "message":
            while True:
                m = await receive()
                await send({"type": "message.ack", "id": m["id"]})
                if not m["more_messages"]:
                    break

    options = SqliteOptions(database=db, poll_interval=0.01, batch_size=1)
    runtime = Runtime(
        app,
        SqliteTransport(["q"], options),
        RuntimeConfig(lifespan="off", crash_ledger=str(folder)),
    )
    task = asyncio.create_task(runtime.serve())
    try:
        for _ in range(500):
            if not queue.count("q"):
                break
            await asyncio.sleep(0.01)
        assert queue.count("q") == 0, "a batch was left unsettled"
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
        queue.close()
    assert not any(r.getMessage() == "batch task failed" for r in caplog.records)
    assert any("ledger turned off" in r.getMessage() for r in caplog.records)


async def test_a_stop_keeps_the_counts_of_suspects_it_cut_off(tmp_path: Path) -> None:
    """Two suspects of a crash, delivered alone one after the other; a stop cancels the
    first's call and hands the second back unseen. Both were forgotten, as if settled:
    the next start delivered them as ordinary messages, beside others, with no count."""
    db = str(tmp_path / "q.db")
    folder = str(tmp_path / "ledger")
    queue = SqliteQueue(db)
    queue.put_many("q", [([], b"x", {})] * 2)
    queue.close()
    namespace = f"sqlite:{db}"
    dead = CrashLedger(folder, namespace)
    dead.open()
    dead.begin("q", msgs("1", "2"), exclusive=False)
    die(dead)
    holding = asyncio.Event()

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "message":
            await receive()
            holding.set()
            await asyncio.sleep(60)

    options = SqliteOptions(database=db, poll_interval=0.01)
    config = RuntimeConfig(lifespan="off", crash_ledger=folder, shutdown_timeout=0.1)
    runtime = Runtime(app, SqliteTransport(["q"], options), config)
    task = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(holding.wait(), 10)
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
    heir = CrashLedger(folder, namespace)
    heir.open()
    assert heir.known("q", "1") == (1, 0), "the suspect whose call the stop cut lost its count"
    assert heir.known("q", "2") == (1, 0), "the suspect never delivered lost its count"
    heir.close()
