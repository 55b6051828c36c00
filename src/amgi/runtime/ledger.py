"""The crash ledger: which messages were in the application's hands when a process died.

Each runtime process that uses a ledger owns one small file in the ledger directory and
holds an exclusive ``flock`` on it for its whole life. Before each application call it
appends one line naming the call's messages, and one line when the call is over. A file
whose lock can be taken belongs to a process that is gone: a new process reads it at
startup, and every message of a call that had not ended is a *suspect*. Suspects are
carried into the new process's own file until they are settled, so crash counts survive
any number of restarts. A process told to exit at once (a second stop signal) appends
one line that ends its calls in progress: the user stopped them, their messages did not.

The runtime delivers a suspect alone, with no other call in the application's hands
(:class:`CallGuard`), so a process that dies during that call convicts the one message
it held. A message is dead-lettered before delivery once it has been in the hands of
``max_attempts`` processes that died, at least once alone: only the message that kills
the process gets there, not the messages fetched or delivered beside it.

The ledger works for every broker whose message ids survive a redelivery
(:attr:`amgi.transport.Transport.stable_ids`), whether or not the broker counts
deliveries. It costs two short appends per call and nothing else on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from amgi.transport import Message

__all__ = ["CallGuard", "CrashLedger"]

logger = logging.getLogger("amgi.runtime")

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system
    fcntl = None  # type: ignore[assignment]

_SUFFIX = ".ledger"
_TMP = ".new"
"""Suffix of the file a compaction writes aside before renaming it over the ledger."""
_MAX_AGE = 24 * 3600.0
"""Suspects not seen again for this long are forgotten (settled by another process)."""
_COMPACT_AT = 256 * 1024
_COMPACT_BUSY_AT = 4 * 1024 * 1024

Key = tuple[str, str]


class CrashLedger:
    """One process's ledger file in ``directory``, for the broker named by ``namespace``.

    ``namespace`` identifies the message source (server and, e.g., database file), so
    processes of unrelated queues sharing a directory never see each other's ids.
    """

    def __init__(self, directory: str, namespace: str) -> None:
        self.directory = directory
        self.namespace = namespace
        self.suspects: dict[Key, list[float]] = {}
        """(address, id) -> [crashes, crashes alone, time of the last crash]."""
        self._prefix = hashlib.sha256(namespace.encode()).hexdigest()[:16]
        self._fd: int | None = None
        self._path = ""
        self._calls: dict[int, bytes] = {}
        self._next_call = 0
        self._size = 0
        self._off = False
        """True once a write failed: the file stays empty (and locked) until close."""
        self._aside: int | None = None
        """The file a compaction wrote aside, from when it is whole until it replaces
        this one's descriptor: a stop (:meth:`stopped`) is recorded in both meanwhile."""

    @staticmethod
    def available() -> bool:
        """Whether this platform has the file locks the ledger relies on."""
        return fcntl is not None

    # -- life ------------------------------------------------------------------------

    def open(self) -> None:
        """Take over the files of dead processes, then create and lock this one's.

        This one's file is whole on disk before the files taken over are removed: a
        crash at any point leaves their counts in one file or the other."""
        assert fcntl is not None
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        _check_private(self.directory)
        now = time.time()
        taken: list[tuple[str, int]] = []
        try:
            asides = []
            for name in sorted(os.listdir(self.directory)):
                path = os.path.join(self.directory, name)
                if name.endswith(_SUFFIX + _TMP):
                    asides.append(path)
                elif not name.endswith(_SUFFIX):
                    continue
                elif name.startswith(self._prefix + "-"):
                    if (fd := self._inherit(path, now)) is not None:
                        taken.append((path, fd))
                else:
                    _remove_if_stale(path, now)
            dead = {path for path, _ in taken}
            for path in asides:
                _remove_orphan(path, dead)
            name = f"{self._prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}{_SUFFIX}"
            self._path = os.path.join(self.directory, name)
            self._fd = _locked(self._path)
            try:
                self._rewrite()
            except OSError:
                self._drop()
                raise
            for path, _ in taken:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        finally:
            for _, fd in taken:
                os.close(fd)
        if self.suspects:
            logger.warning(
                "crash ledger: %d message(s) were in the hands of a process that died; "
                "each is delivered alone",
                len(self.suspects),
            )

    def close(self) -> None:
        """Release the file: removed when nothing is suspect, else left for the next process."""
        if self._fd is None:
            return
        self._calls.clear()
        if self.suspects:
            try:
                self._rewrite()
            except OSError as exc:
                logger.error(
                    "crash ledger %s: saving %d suspect(s) failed (%s): their counts are lost",
                    self._path,
                    len(self.suspects),
                    exc,
                )
            else:
                self._release()
                return
        self._drop()

    def _release(self) -> None:
        """Close the file, keeping it (and so dropping the lock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _drop(self) -> None:
        """Remove the file and close it: no call of this process is counted as a crash."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
        self._release()

    def _inherit(self, path: str, now: float) -> int | None:
        """Merge the file of a dead process; return its locked descriptor (the caller
        removes the file once its counts are safe), or None when it is not to be taken."""
        assert fcntl is not None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return None  # its process is alive
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    os.close(fd)
                    return None  # taken over and removed by another process meanwhile
            except FileNotFoundError:
                os.close(fd)
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        self._merge(data, now)
        return fd

    def _merge(self, data: bytes, now: float) -> None:
        suspects: dict[Key, list[float]] = {}
        calls: dict[int, tuple[bool, str, list[str]]] = {}
        for line in data.splitlines():
            try:
                record = json.loads(line)
                kind = record[0]
                if kind == "S":
                    _, address, mid, crashes, alone, since = record
                    suspects[(address, mid)] = [crashes, alone, since]
                elif kind == "B":
                    _, call, exclusive, address, ids = record
                    calls[call] = (bool(exclusive), address, ids)
                elif kind == "E":
                    calls.pop(record[1], None)
                elif kind == "X":
                    calls.clear()  # ended by a stop signal, not by a crash
                elif kind == "F":
                    for mid in record[2]:
                        suspects.pop((record[1], mid), None)
            except (ValueError, TypeError, IndexError, KeyError):
                continue  # a line cut short by the crash
        for exclusive, address, ids in calls.values():
            alone = 1 if exclusive and len(ids) == 1 else 0
            for mid in ids:
                entry = suspects.setdefault((address, mid), [0, 0, now])
                entry[0] += 1
                entry[1] += alone
                entry[2] = now
        mine = self.suspects
        for key, (crashes, alone, since) in suspects.items():
            if now - since > _MAX_AGE:
                continue
            entry = mine.setdefault(key, [0, 0, since])
            entry[0] += crashes
            entry[1] += alone
            entry[2] = max(entry[2], since)

    # -- the hot path ----------------------------------------------------------------

    def known(self, address: str, mid: str) -> tuple[int, int] | None:
        """``(crashes, crashes alone)`` of a suspect, or None for an ordinary message."""
        entry = self.suspects.get((address, mid))
        return None if entry is None else (int(entry[0]), int(entry[1]))

    def begin(self, address: str, messages: Sequence[Message], exclusive: bool) -> int:
        """Record that ``messages`` are about to be in the application's hands."""
        call = self._next_call = self._next_call + 1
        line = (
            json.dumps(["B", call, int(exclusive), address, [m.id for m in messages]]) + "\n"
        ).encode()
        self._calls[call] = line
        self._write(line)
        return call

    def end(self, call: int) -> None:
        """Record that call ``call`` is over (its messages are settled or handed back)."""
        del self._calls[call]
        if self._size > (_COMPACT_BUSY_AT if self._calls else _COMPACT_AT):
            self._compact()
        else:
            self._write(b'["E",%d]\n' % call)

    def forget(self, address: str, ids: Sequence[str]) -> None:
        """Suspects that were delivered and settled are ordinary messages again."""
        suspects = self.suspects
        for mid in ids:
            suspects.pop((address, mid), None)
        self._write((json.dumps(["F", address, list(ids)]) + "\n").encode())

    def stopped(self) -> None:
        """Record that the calls in progress end because the process is told to exit now
        (a second stop signal), not because it crashed: the next process counts none of
        them. Safe in a signal handler: two small appends, no lock, no logging, no raise."""
        if self._off:
            return
        for fd in {self._fd, self._aside}:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.write(fd, b'["X"]\n')

    def _write(self, data: bytes) -> None:
        if self._fd is None or self._off:
            return
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self._turn_off(exc)
        else:
            self._size += len(data)

    def _rewrite(self) -> None:
        """Replace the file with one holding the suspects and the calls in progress.

        The new file is written aside (locked) and renamed over the old one: a crash at
        any point leaves one whole file, never an emptied one."""
        if self._fd is None:
            return
        parts = [(json.dumps(["N", self.namespace]) + "\n").encode()]
        parts += [
            (json.dumps(["S", a, mid, *entry]) + "\n").encode()
            for (a, mid), entry in self.suspects.items()
        ]
        parts += self._calls.values()
        data = b"".join(parts)
        aside = self._path + _TMP
        fd = _locked(aside)
        try:
            _write_all(fd, data)
            self._aside = fd
            os.rename(aside, self._path)
        except BaseException:
            self._aside = None
            with contextlib.suppress(OSError):
                os.unlink(aside)
            os.close(fd)
            raise
        old, self._fd = self._fd, fd
        self._aside = None
        os.close(old)
        self._size = len(data)

    def _compact(self) -> None:
        if self._off:
            return
        try:
            self._rewrite()
        except OSError as exc:
            self._turn_off(exc)

    def _turn_off(self, exc: OSError) -> None:
        """A write failed (a full disk): stop keeping the ledger.

        The file is emptied but kept locked until :meth:`close`: with calls of this
        live process in it, it would convict their messages of a crash (the next
        process's, or another process's on the same folder). The suspects known so far
        are still delivered alone."""
        logger.error("crash ledger %s: write failed (%s); ledger turned off", self._path, exc)
        fd = self._fd
        assert fd is not None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            self._drop()
            return
        self._off = True


def _check_private(directory: str) -> None:
    """Refuse a folder another user owns or can write to: a file planted there would
    convict messages of crashes that never happened (the default folder is in the shared
    temporary directory, where anyone can create it first)."""
    info = os.stat(directory)
    if info.st_uid != os.geteuid():
        raise PermissionError(f"{directory!r} belongs to another user (uid {info.st_uid})")
    if info.st_mode & 0o002:
        raise PermissionError(
            f"others can write to {directory!r} (mode {info.st_mode & 0o7777:o}); "
            "make it private (chmod o-w) or name another folder"
        )


def _locked(path: str) -> int:
    """Create (or empty) ``path`` and return it opened for appends, under this process's lock."""
    assert fcntl is not None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (a full disk ends a short write with an ``OSError``)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _remove_orphan(path: str, dead: set[str]) -> None:
    """Remove a file written aside by a process that died before renaming it (its own
    file stayed whole); ``dead``: the files of dead processes taken over just now."""
    assert fcntl is not None
    own = path.removesuffix(_TMP)
    if own not in dead:
        try:
            fd = os.open(own, os.O_RDONLY)
        except FileNotFoundError:
            pass  # its process's file was taken over and removed: the process is dead
        except OSError:
            return
        else:
            try:
                # Its process holds this lock while it writes aside: alive, leave it.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return
            finally:
                os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)


def _remove_if_stale(path: str, now: float) -> None:
    """Remove another source's file left by a dead process and untouched for a day."""
    assert fcntl is not None
    try:
        if now - os.stat(path).st_mtime < _MAX_AGE:
            return
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass  # alive, or already gone
    finally:
        os.close(fd)


class CallGuard:
    """Runs around every application call when a ledger is kept (see the module doc).

    An *exclusive* call (a suspect delivered alone) waits until no other call is in the
    application's hands, and no other call starts until it ends.
    """

    def __init__(self, ledger: CrashLedger) -> None:
        self.ledger = ledger
        self._active = 0
        self._exclusive = False
        self._waiting = 0
        self._waiters: list[asyncio.Future[None]] = []

    async def enter(self, address: str, messages: Sequence[Message], exclusive: bool) -> Any:
        if exclusive:
            self._waiting += 1
            try:
                while self._active or self._exclusive:
                    await self._changed()
            except BaseException:
                self._waiting -= 1
                self._wake()
                raise
            self._waiting -= 1
            self._exclusive = True
        else:
            while self._exclusive or self._waiting:
                await self._changed()
        self._active += 1
        return (exclusive, self.ledger.begin(address, messages, exclusive))

    def leave(self, token: Any) -> None:
        exclusive, call = token
        self._active -= 1
        if exclusive:
            self._exclusive = False
        try:
            self.ledger.end(call)
        finally:
            self._wake()  # whatever happens to the file, waiting calls must go on

    def _wake(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def _changed(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter
