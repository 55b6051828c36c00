"""Embedded server: a durable queue in one SQLite file, shared by any number of processes.

How AMGI maps onto it:

=================  ==============================================================
address            a queue name (rows of ``amgi_messages`` with that address)
batch              up to ``batch_size`` visible rows of one queue, oldest first;
                   fetching leases them: invisible for ``visibility_timeout``
ordering key       the queue: batches of one queue run one after another
attempt            the row's delivery counter, raised by each fetch
ack                the row is deleted (one statement per batch)
nack (retry)       the row becomes visible again after the runtime's delay
nack (dead)        the row moves to ``amgi_dead_letters`` with the reason
crash              a leased row becomes visible again when its lease runs out
long batch         the runtime renews the lease while the batch runs
send               one insert; any process may send to the file
=================  ==============================================================

Headers, payload and bindings are stored byte-exact. The database runs in WAL mode; each
write is its own short transaction, so producers and consumers in other processes wait
at most ``busy_timeout`` for each other.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import sqlite3
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from amgi.errors import BrokerUnavailable, ConfigurationError, SendError
from amgi.options import option
from amgi.servers.kit.backoff import Backoff
from amgi.transport import (
    Batch,
    Bindings,
    HeaderList,
    Message,
    Settlement,
    StoredDeadLetter,
    Transport,
)

__all__ = ["DeadLetterRow", "SqliteOptions", "SqliteQueue", "SqliteSendError", "SqliteTransport"]

logger = logging.getLogger("amgi.servers.sqlite")

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS amgi_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    address TEXT NOT NULL,
    headers BLOB NOT NULL,
    payload BLOB,
    bindings BLOB,
    attempts INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL,
    lease TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS amgi_messages_ready ON amgi_messages (address, visible_at, id);
CREATE INDEX IF NOT EXISTS amgi_messages_lease ON amgi_messages (lease);
CREATE TABLE IF NOT EXISTS amgi_dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id INTEGER NOT NULL,
    address TEXT NOT NULL,
    headers BLOB NOT NULL,
    payload BLOB,
    bindings BLOB,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dead_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS amgi_dead_letters_address ON amgi_dead_letters (address, id);
"""

_U32 = struct.Struct(">I")
_REPLAY_CHUNK = 100
_SETTLE_RETRY_FIRST = 0.05
_SETTLE_RETRY_MAX = 1.0


def encode_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Headers as length-prefixed byte strings: name, value, name, value ..."""
    parts: list[bytes] = []
    for name, value in headers:
        parts += (_U32.pack(len(name)), name, _U32.pack(len(value)), value)
    return b"".join(parts)


def decode_headers(data: bytes) -> HeaderList:
    """Inverse of :func:`encode_headers`."""
    out: HeaderList = []
    pos, end = 0, len(data)
    unpack = _U32.unpack_from
    while pos < end:
        (n,) = unpack(data, pos)
        name = data[pos + 4 : pos + 4 + n]
        pos += 4 + n
        (n,) = unpack(data, pos)
        value = data[pos + 4 : pos + 4 + n]
        pos += 4 + n
        out.append((name, value))
    return out


_TAGS = frozenset({"$bytes", "$dict"})


def _tagged(value: Any) -> Any:
    """``value`` as JSON can hold it: bytes as ``{"$bytes": base64}``, and a dict whose one
    key is a tag as ``{"$dict": [[key, value]]}``, so that no dict reads back as a tag."""
    if isinstance(value, dict):
        items = {k: _tagged(v) for k, v in value.items()}
        if len(items) == 1 and next(iter(items)) in _TAGS:
            return {"$dict": [[k, v] for k, v in items.items()]}
        return items
    if isinstance(value, list | tuple):
        return [_tagged(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    return value


def _json_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        if "$bytes" in obj:
            return base64.b64decode(obj["$bytes"], validate=True)
        if "$dict" in obj:
            return dict(obj["$dict"])
    return obj


def encode_bindings(bindings: Bindings) -> bytes | None:
    """Bindings as JSON, bytes values tagged so they come back as bytes (and dicts that
    look like a tag escaped); ``TypeError`` for a value JSON cannot hold."""
    if not bindings:
        return None
    return json.dumps(_tagged(bindings), separators=(",", ":")).encode()


def decode_bindings(data: bytes | None) -> Bindings:
    """Inverse of :func:`encode_bindings`; ``ValueError`` when ``data`` is not that."""
    if not data:
        return {}
    decoded: Bindings = json.loads(data, object_hook=_json_hook)
    return decoded


@dataclass(slots=True, frozen=True)
class DeadLetterRow:
    """A message that used up its attempts."""

    message_id: int
    address: str
    headers: HeaderList
    payload: bytes | None
    bindings: Bindings
    attempts: int
    reason: str


class SqliteQueue:
    """Blocking access to the queue file; the transport calls it from one worker thread."""

    def __init__(self, path: str, busy_timeout: float = 5.0) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise BrokerUnavailable(f"sqlite: cannot open database {path!r}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    def put(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> int:
        """Append one message; returns its row id."""
        now = time.time()
        cursor = self.db.execute(
            "INSERT INTO amgi_messages (address, headers, payload, bindings, visible_at,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (address, encode_headers(headers), payload, encode_bindings(bindings), now, now),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def put_many(
        self, address: str, messages: Iterable[tuple[HeaderList, bytes | None, Bindings]]
    ) -> None:
        """Append many messages in one transaction."""
        now = time.time()
        rows = (
            (address, encode_headers(h), p, encode_bindings(b), now, now) for h, p, b in messages
        )
        with self._transaction():
            self.db.executemany(
                "INSERT INTO amgi_messages (address, headers, payload, bindings, visible_at,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    def lease(
        self, address: str, limit: int, visibility: float, token: str | None = None
    ) -> tuple[str, list[Message]]:
        """Take up to ``limit`` visible messages of ``address`` for ``visibility`` seconds."""
        now = time.time()
        token = token or uuid.uuid4().hex
        rows = self.db.execute(
            "UPDATE amgi_messages SET lease = ?, visible_at = ?, attempts = attempts + 1"
            " WHERE id IN (SELECT id FROM amgi_messages WHERE address = ? AND visible_at <= ?"
            " ORDER BY id LIMIT ?)"
            " RETURNING id, headers, payload, bindings, attempts",
            (token, now + visibility, address, now, limit),
        ).fetchall()
        rows.sort()
        messages: list[Message] = []
        unreadable: list[tuple[str, bytes, bytes | None, int]] = []
        for rid, h, p, b, attempts in rows:
            try:
                headers = decode_headers(h)
            except (ValueError, struct.error) as exc:
                unreadable.append((f"its headers ({exc})", b"", b, rid))
                continue
            try:
                bindings = decode_bindings(b)
            except (ValueError, TypeError) as exc:
                unreadable.append((f"its bindings ({exc})", h, None, rid))
                continue
            messages.append(Message(str(rid), headers, p, bindings, attempts, rid))
        if unreadable:
            self._dead_letter_unreadable(token, unreadable)
        return token, messages

    def _dead_letter_unreadable(
        self, token: str, rows: Sequence[tuple[str, bytes, bytes | None, int]]
    ) -> None:
        """Dead-letter leased rows that cannot be read (``(what, headers, bindings, id)``,
        with what can be kept of them) at once: given to no app, retried for ever, they
        would block nothing else but never leave."""
        now = time.time()
        with self._transaction():
            self.db.executemany(
                "INSERT INTO amgi_dead_letters (message_id, address, headers, payload,"
                " bindings, attempts, reason, dead_at) SELECT id, address, ?, payload,"
                " ?, attempts, ?, ? FROM amgi_messages WHERE id = ? AND lease = ?",
                [
                    (h, b, f"sqlite: the stored message cannot be read: {what}", now, rid, token)
                    for what, h, b, rid in rows
                ],
            )
            self.db.executemany(
                "DELETE FROM amgi_messages WHERE id = ? AND lease = ?",
                [(rid, token) for _, _, _, rid in rows],
            )

    def settle(
        self,
        token: str,
        total: int,
        acked: Sequence[int],
        retry: Sequence[tuple[int, float, bool]],
        dead: Sequence[tuple[int, str]],
    ) -> None:
        """Apply a batch's settlement in one transaction (only rows still under ``token``);
        ``retry`` holds ``(id, delay, uncounted)``: an uncounted one gets its attempt back."""
        now = time.time()
        db = self.db
        with self._transaction():
            if len(acked) == total:
                db.execute("DELETE FROM amgi_messages WHERE lease = ?", (token,))
            elif acked:
                db.executemany(
                    "DELETE FROM amgi_messages WHERE id = ? AND lease = ?",
                    [(rid, token) for rid in acked],
                )
            if retry:
                db.executemany(
                    "UPDATE amgi_messages SET visible_at = ?, lease = NULL,"
                    " attempts = max(attempts - ?, 0) WHERE id = ? AND lease = ?",
                    [(now + delay, int(uncounted), rid, token) for rid, delay, uncounted in retry],
                )
            if dead:
                db.executemany(
                    "INSERT INTO amgi_dead_letters (message_id, address, headers, payload,"
                    " bindings, attempts, reason, dead_at) SELECT id, address, headers, payload,"
                    " bindings, attempts, ?, ? FROM amgi_messages WHERE id = ? AND lease = ?",
                    [(reason, now, rid, token) for rid, reason in dead],
                )
                db.executemany(
                    "DELETE FROM amgi_messages WHERE id = ? AND lease = ?",
                    [(rid, token) for rid, _ in dead],
                )

    def extend(self, tokens: Sequence[str], visibility: float) -> None:
        """Push back the visibility of every row still leased under ``tokens``."""
        until = time.time() + visibility
        with self._transaction():
            self.db.executemany(
                "UPDATE amgi_messages SET visible_at = ? WHERE lease = ?",
                [(until, t) for t in tokens],
            )

    def release(self, tokens: Sequence[str]) -> None:
        """Make rows leased under ``tokens`` visible again now, with their attempt given
        back (clean shutdown: the application never had them)."""
        now = time.time()
        with self._transaction():
            self.db.executemany(
                "UPDATE amgi_messages SET visible_at = ?, lease = NULL,"
                " attempts = max(attempts - 1, 0) WHERE lease = ?",
                [(now, t) for t in tokens],
            )

    def ready(self, addresses: Sequence[str]) -> set[str]:
        """Which of ``addresses`` have a message visible now (a read: no write lock)."""
        now = time.time()
        found: set[str] = set()
        for start in range(0, len(addresses), 500):  # below SQLite's bound on parameters
            part = addresses[start : start + 500]
            rows = ",".join(["(?)"] * len(part))
            found.update(
                a
                for (a,) in self.db.execute(
                    f"WITH wanted(address) AS (VALUES {rows}) SELECT address FROM wanted"
                    " WHERE EXISTS (SELECT 1 FROM amgi_messages m"
                    " WHERE m.address = wanted.address AND m.visible_at <= ?)",
                    (*part, now),
                )
            )
        return found

    def count(self, address: str) -> int:
        """Messages of ``address`` not yet acked or dead-lettered (leased ones included)."""
        (n,) = self.db.execute(
            "SELECT count(*) FROM amgi_messages WHERE address = ?", (address,)
        ).fetchone()
        return int(n)

    def dead_letters(self, address: str) -> list[DeadLetterRow]:
        """The dead letters of ``address``, oldest first."""
        rows = self.db.execute(
            "SELECT message_id, address, headers, payload, bindings, attempts, reason"
            " FROM amgi_dead_letters WHERE address = ? ORDER BY id",
            (address,),
        ).fetchall()
        return [
            DeadLetterRow(mid, a, decode_headers(h), p, decode_bindings(b), n, r)
            for mid, a, h, p, b, n, r in rows
        ]

    def stored_dead_letters(self, address: str, limit: int) -> list[StoredDeadLetter]:
        """Up to ``limit`` dead letters of ``address``, oldest first, with their row ids."""
        rows = self.db.execute(
            "SELECT id, address, headers, payload, bindings, attempts, reason, dead_at"
            " FROM amgi_dead_letters WHERE address = ? ORDER BY id LIMIT ?",
            (address, limit),
        ).fetchall()
        return [
            StoredDeadLetter(str(i), a, decode_headers(h), p, decode_bindings(b), n, r, t)
            for i, a, h, p, b, n, r, t in rows
        ]

    def newest_dead_letter(self, address: str) -> int:
        """The row id of the newest dead letter of ``address`` (0 when there is none)."""
        (newest,) = self.db.execute(
            "SELECT coalesce(max(id), 0) FROM amgi_dead_letters WHERE address = ?", (address,)
        ).fetchone()
        return int(newest)

    def replay_dead_letters(self, address: str, limit: int, up_to: int) -> int:
        """Move up to ``limit`` dead letters of ``address`` with row ids up to ``up_to``
        back into its queue.

        Each move is one transaction (insert and delete together), so a crash leaves every
        dead letter exactly once: still dead, or back in the queue as a first attempt.
        """
        now = time.time()
        with self._transaction():
            ids = [
                i
                for (i,) in self.db.execute(
                    "SELECT id FROM amgi_dead_letters WHERE address = ? AND id <= ?"
                    " ORDER BY id LIMIT ?",
                    (address, up_to, limit),
                )
            ]
            self.db.executemany(
                "INSERT INTO amgi_messages (address, headers, payload, bindings, visible_at,"
                " created_at) SELECT address, headers, payload, bindings, ?, ?"
                " FROM amgi_dead_letters WHERE id = ?",
                [(now, now, i) for i in ids],
            )
            self.db.executemany("DELETE FROM amgi_dead_letters WHERE id = ?", [(i,) for i in ids])
        return len(ids)

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        db = self.db
        try:
            if kind is None:
                db.execute("COMMIT")
                return
        except BaseException:
            # A COMMIT refused (busy) leaves the transaction open: every later BEGIN
            # would fail. Rolled back, the next try starts clean.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        # An error may have rolled back already (a full disk): a ROLLBACK then would
        # hide it behind "no transaction is active".
        if db.in_transaction:
            db.execute("ROLLBACK")


class SqliteSendError(SendError):
    """A send to the SQLite queue failed."""


@dataclass(slots=True)
class SqliteOptions:
    """Options of the embedded SQLite server."""

    database: str = option("amgi.db", "path of the SQLite queue file")
    batch_size: int = option(100, "most messages per batch", ge=1)
    visibility_timeout: float = option(
        30.0, "seconds a fetched message stays hidden before it is redelivered", gt=0
    )
    poll_interval: float = option(0.05, "seconds between polls of an empty queue", gt=0)
    busy_timeout: float = option(5.0, "seconds to wait for another process's write lock", ge=0)


def _log_late_failure(finished: asyncio.Future[None]) -> None:
    """A close's last work failed after the close itself was given up on (it raised to
    nobody): say so."""
    if not finished.cancelled() and (exc := finished.exception()) is not None:
        logger.warning("closing the sqlite queue failed: %s", exc)


class SqliteTransport(Transport):
    """The AMGI transport of :class:`SqliteQueue`."""

    name = "sqlite"
    options = SqliteOptions
    send_error = SqliteSendError
    stable_ids = True
    counts_deliveries = True

    def __init__(self, addresses: Sequence[str], options: SqliteOptions | None = None) -> None:
        super().__init__(addresses, options or SqliteOptions())
        self.config: SqliteOptions
        self._executor: ThreadPoolExecutor | None = None
        self._queue: SqliteQueue | None = None
        self._new_file = False
        self._discard = False
        self._leases: dict[str, float] = {}
        """Lease tokens held, each with the (monotonic) time its rows are ours until."""
        self._next = 0
        self.lease_interval = max(0.05, self.config.visibility_timeout / 3)

    def ledger_namespace(self) -> str:
        return f"sqlite:{os.path.abspath(self.config.database)}"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None, "the sqlite transport is not connected"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def connect(self) -> None:
        self.check()
        c = self.config
        folder = os.path.dirname(os.path.abspath(c.database))  # noqa: ASYNC240
        if not os.path.isdir(folder):  # noqa: ASYNC240 - one stat at startup
            raise BrokerUnavailable(f"sqlite: folder of --database {c.database!r} does not exist")
        self._new_file = not os.path.exists(c.database)  # noqa: ASYNC240 - one stat
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="amgi-sqlite")
        try:
            self._queue = await self._run(SqliteQueue, c.database, c.busy_timeout)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def fetch(self) -> Sequence[Batch]:
        queue = self._queue
        assert queue is not None
        c = self.config
        addresses = self.addresses
        while True:
            # Only the addresses with a message ready get a lease (a write) tried: one read
            # instead of a write per address per poll (500 idle queues took half a core).
            ready = await self._run(queue.ready, addresses) if len(addresses) > 1 else addresses
            # Round-robin over the addresses so that one busy queue cannot starve others.
            for _ in range(len(addresses) if ready else 0):
                address = addresses[self._next % len(addresses)]
                self._next += 1
                if address not in ready:
                    continue
                # The token is recorded before the lease runs: if this fetch is cancelled
                # while the worker thread still waits for the write lock, the lease may
                # commit afterwards, and close() must release it.
                token = uuid.uuid4().hex
                self._leases[token] = time.monotonic() + c.visibility_timeout
                try:
                    _, messages = await self._run(
                        queue.lease, address, c.batch_size, c.visibility_timeout, token
                    )
                except asyncio.CancelledError:
                    self._release_soon(token)
                    raise
                except Exception:
                    self._leases.pop(token, None)  # the lease failed: nothing was taken
                    raise
                if messages:
                    return [Batch(address, messages, key=address, context=token)]
                self._leases.pop(token, None)
            await asyncio.sleep(c.poll_interval)

    def _release_soon(self, token: str) -> None:
        """A fetch cancelled while its lease runs in the worker thread: the lease may still
        commit there. Release it right behind it (same thread, in order, awaited by
        :meth:`close`), so its rows neither wait hidden for the visibility timeout nor
        come to another process meanwhile with an attempt no application had."""
        assert self._executor is not None
        assert self._queue is not None
        released = self._executor.submit(self._queue.release, [token])

        def done(future: Future[None]) -> None:
            if not future.cancelled() and future.exception() is not None:
                logger.warning(
                    "releasing the lease of a cancelled fetch failed (%s): it is released "
                    "at close, or runs out after --visibility-timeout",
                    future.exception(),
                )

        released.add_done_callback(done)

    async def settle(self, batch: Batch, settlement: Settlement) -> None:
        """Apply the settlement in one transaction, tried again while the lease lasts.

        Another process may hold the write lock longer than ``--busy-timeout``. Given up
        at once, the settlement was lost: the rows came back after the visibility timeout
        with one more attempt counted, and an ack of the app could end in the dead
        letters. Each try only touches rows still under this lease, so trying again is
        safe; past the lease the rows come back anyway."""
        assert self._queue is not None
        token: str = batch.context
        args = (
            token,
            len(batch.messages),
            [m.token for m in settlement.acked],
            [(r.message.token, r.delay, r.uncounted) for r in settlement.retry],
            [(d.message.token, d.reason) for d in settlement.dead],
        )
        backoff = Backoff(_SETTLE_RETRY_FIRST, _SETTLE_RETRY_MAX)
        while True:
            try:
                await self._run(self._queue.settle, *args)
                break
            except sqlite3.OperationalError as exc:  # locked, busy, an I/O error
                until = self._leases.get(token, 0.0)
                if time.monotonic() + backoff.delay < until:
                    if backoff.delay == backoff.first:  # said once, not at every try
                        logger.warning(
                            "settling a batch of %r failed: %s (trying again while its "
                            "lease lasts)",
                            batch.address,
                            exc,
                        )
                    await backoff.sleep()
                    continue
                self._not_stored(settlement, exc)
                raise
            except Exception as exc:  # one transaction: none of it was stored
                self._not_stored(settlement, exc)
                raise
        self._leases.pop(token, None)

    @staticmethod
    def _not_stored(settlement: Settlement, exc: Exception) -> None:
        for d in settlement.dead:
            d.not_stored(exc)

    async def extend(self, batches: Sequence[Batch]) -> None:
        assert self._queue is not None
        tokens = [b.context for b in batches]
        if not tokens:  # (a cancelled fetch's lease is released at once, not kept)
            return
        started = time.monotonic()
        await self._run(self._queue.extend, tokens, self.config.visibility_timeout)
        leases = self._leases
        for token in tokens:
            if token in leases:
                leases[token] = started + self.config.visibility_timeout

    async def publish(
        self, address: str, headers: HeaderList, payload: bytes | None, bindings: Bindings
    ) -> None:
        if self._queue is None:
            raise SqliteSendError("sqlite: cannot send: the server is not connected")
        try:
            await self._run(self._queue.put, address, headers, payload, bindings)
        except (sqlite3.Error, TypeError) as exc:
            raise SqliteSendError(f"sqlite: could not send to {address!r}: {exc}") from exc

    async def list_dead_letters(self, address: str, limit: int) -> list[StoredDeadLetter]:
        """Rows of ``amgi_dead_letters`` of ``address``."""
        assert self._queue is not None
        self._check_file()
        return await self._run(self._queue.stored_dead_letters, address, limit)

    def _check_file(self) -> None:
        """Dead letters come from a database file that existed: a mistyped ``--database``
        is an error, not "0 dead letters"."""
        if self._new_file:
            self._discard = True
            raise ConfigurationError(
                f"sqlite: there was no database file {self.config.database!r} "
                "(--database): no dead letters can be there"
            )

    async def replay_dead_letters(self, address: str, limit: int) -> int:
        """Move rows back into ``amgi_messages``, a chunk per transaction; only the rows
        there when the replay started (a replayed message that a consumer dead-letters
        again meanwhile waits for the next replay)."""
        assert self._queue is not None
        self._check_file()
        up_to = await self._run(self._queue.newest_dead_letter, address)
        moved = 0
        while moved < limit:
            n = await self._run(
                self._queue.replay_dead_letters, address, min(_REPLAY_CHUNK, limit - moved), up_to
            )
            if n == 0:
                break
            moved += n
        return moved

    async def close(self) -> None:
        """Release leases still held (the runtime settled all it could) and close the file.

        Both run on the worker thread behind what is queued there (a lease may wait for
        another process's write lock, up to ``--busy-timeout``), and run even when this
        close is cancelled (given up on): the event loop never waits for that thread."""
        executor, queue = self._executor, self._queue
        if executor is None:
            return
        self._executor = self._queue = None
        tokens = sorted(self._leases)
        self._leases.clear()

        def finish() -> None:
            if queue is None:
                return
            try:
                if tokens:
                    queue.release(tokens)
            finally:
                queue.close()

        finished = asyncio.wrap_future(executor.submit(finish))
        executor.shutdown(wait=False)  # the thread ends once its queue is done
        try:
            await asyncio.shield(finished)
        except asyncio.CancelledError:
            finished.add_done_callback(_log_late_failure)
            raise
        if self._discard:  # the file this connect created for a mistyped --database
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.config.database + suffix)
