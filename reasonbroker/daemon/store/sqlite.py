"""The SQLite journal: one file, WAL, group commit from one writer thread.

This module owns the journal file and everything about it: its schema and
version, the lock that keeps a second broker out, the writer thread that is the
only user of the connection, the batches (one transaction per event-loop turn's
worth of operations, more when the disk is slower than the loop), the retry of
a batch that failed, retention at open and the WAL's size.

Durability (`sync`):

- ``"full"`` (PRAGMA synchronous=FULL): the WAL is fsynced at every commit, so
  a job reported committed (and so ACCEPTED) survives a power loss or a kernel
  crash.
- ``"normal"`` (PRAGMA synchronous=NORMAL): the WAL is fsynced only at
  checkpoints. A committed job survives the broker process being killed (the
  data is in the OS page cache), but a power loss may lose the last commits
  before the next checkpoint; the file itself is never corrupted.

Locking: an exclusive ``fcntl.flock`` on ``PATH.lock`` (holding the broker's
pid), taken before the database is opened and held until `close`. Chosen over
SQLite's ``locking_mode=EXCLUSIVE`` because (1) a second broker gets a precise
error at once ("locked by another running broker (pid N)") instead of a
generic SQLITE_BUSY after a timeout, (2) other processes may still read the
journal while the broker runs (``sqlite3 PATH .backup``, inspection), which
exclusive mode forbids, and (3) the kernel releases a flock when its process
dies, even by SIGKILL, so there is never a stale lock to clean up. flock (not
POSIX ``lockf``) because it is per open file, so two stores in one process
exclude each other too. The lock file is never deleted: unlinking it would let
a broker that opened the old inode and one that creates a new one both "hold"
the lock.

Schema (version 1, ``PRAGMA user_version``; ``PRAGMA application_id`` =
`APPLICATION_ID` marks the file as a reasonbroker journal):

- ``jobs``: one row per job, live or ended; ``state`` 0 queued, 1 running,
  2 ended. An ended row keeps the RESULT fields and drops ``variables``.
  Implicit rowid (rows are appended in arrival order) plus a unique index on
  ``cookie`` (random uuid4 bytes: as the table's key they would scatter inserts
  over the whole b-tree).
- ``meta``: ``next_seq``, the high-water mark of job sequence numbers, so seq
  keeps increasing over the journal's life even when every row was deleted.

Migration path: `open` reads ``user_version``. Newer than `SCHEMA_VERSION`:
refused (an old broker must not write a format it does not know). Older: the
migration steps ``_MIGRATIONS[v]`` (v -> v+1) run in order inside the same
``BEGIN IMMEDIATE`` transaction as the rest of `open`, each followed by
``PRAGMA user_version = v+1``, so a crash mid-migration leaves version v
intact. Version 2, say adding a ``tags`` column, would be
``ALTER TABLE jobs ADD COLUMN tags BLOB`` (in place, O(1) in SQLite); a change
ALTER cannot express creates ``jobs_new``, copies with ``INSERT ... SELECT``,
drops ``jobs`` and renames ``jobs_new``, all in that one transaction.

Bounded size: rows are deleted on `forget` (run time) and on expiry (open);
SQLite reuses the freed pages. The WAL is checkpointed automatically every
`WAL_AUTOCHECKPOINT_PAGES` pages (only the writer uses the file, so a
checkpoint always completes and the WAL restarts from its beginning), and
``journal_size_limit`` truncates it back to `JOURNAL_SIZE_LIMIT_BYTES` after a
large batch grew it; `close` checkpoints with TRUNCATE, leaving an empty WAL.

Failures at run time (disk full, I/O error, a foreign process holding the
write lock): the batch's transaction is rolled back, ``on_trouble(reason)`` is
called once, and the same batch is retried with backoff (50 ms doubling to
2 s) while new operations accumulate in the next batch. On the first success
``on_trouble(None)`` then ``on_commit(n)``. A batch is reported committed only
after its COMMIT returned.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgpack

from .base import (
    Accepted,
    Ended,
    JournalError,
    OnCommit,
    OnTrouble,
    Pending,
    Recovered,
    Store,
)

#: ``PRAGMA application_id`` of a reasonbroker journal: "RBJ1" in ASCII.
APPLICATION_ID: Final = 0x52424A31
SCHEMA_VERSION: Final = 1

#: SQLite's default; 1000 pages of 4 KiB: a checkpoint copies at most ~4 MiB,
#: which takes a few ms, so the commit that runs it is not held up for long.
WAL_AUTOCHECKPOINT_PAGES: Final = 1000
#: After a checkpoint the WAL is truncated back to this size, so a burst that
#: grew it (one large batch) does not leave a large file behind.
JOURNAL_SIZE_LIMIT_BYTES: Final = 8 * 1024 * 1024
#: Retry of a failing batch: short first (a transient error clears at once),
#: capped so a broker in trouble notices recovery within 2 s.
RETRY_FIRST_S: Final = 0.05
RETRY_MAX_S: Final = 2.0
#: How long `close` waits for the batches in flight before giving up on them.
CLOSE_TIMEOUT_S: Final = 10.0

_QUEUED: Final = 0
_RUNNING: Final = 1
_ENDED: Final = 2

# Operation codes as recorded on the event loop (tuples appended to a list).
_OP_ACCEPT: Final = 0
_OP_DISPATCH: Final = 1
_OP_REQUEUE: Final = 2
_OP_END: Final = 3
_OP_FORGET: Final = 4

_COLUMNS: Final = (
    "cookie, seq, pipeline, variables, priority, timeout_ms, deadline, max_attempts,"
    " detach, accepted_at, state, attempts, crashes, rc, error, stacktrace, result, ended_at"
)
# Indices into a full row, in `_COLUMNS` order.
_C_PIPELINE, _C_VARIABLES, _C_ACCEPTED_AT = 2, 3, 9
_C_STATE, _C_ATTEMPTS = 10, 11
_C_RC, _C_ERROR, _C_STACKTRACE, _C_RESULT, _C_ENDED_AT = 13, 14, 15, 16, 17

_SCHEMA_V1: Final = (
    """CREATE TABLE jobs (
        cookie BLOB NOT NULL UNIQUE,
        seq INTEGER NOT NULL,
        pipeline TEXT NOT NULL,
        variables BLOB,
        priority INTEGER NOT NULL,
        timeout_ms INTEGER,
        deadline REAL,
        max_attempts INTEGER NOT NULL,
        detach INTEGER NOT NULL,
        accepted_at REAL NOT NULL,
        state INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        crashes INTEGER NOT NULL,
        rc TEXT,
        error TEXT,
        stacktrace BLOB,
        result BLOB,
        ended_at REAL
    )""",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT INTO meta (key, value) VALUES ('next_seq', 1)",
)

#: Schema migrations: ``_MIGRATIONS[v]`` turns version v into v+1 (none yet).
_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {}

_SQL_DELETE: Final = "DELETE FROM jobs WHERE cookie = ?"
# REPLACE: an accept makes the row this new job even if the cookie's old row
# (forgotten earlier in the same batch) is still there when it runs.
_SQL_INSERT: Final = f"INSERT OR REPLACE INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 18)})"
_SQL_STATE: Final = "UPDATE jobs SET state = ?, attempts = ? WHERE cookie = ?"
# An upsert so that a RESULT is retained even for a row this journal never saw
# (it cannot fail on a constraint and stall every later batch); the
# placeholders (seq 0, priority 0, ...) matter only if the row were dispatched again.
_SQL_END: Final = (
    f"INSERT INTO jobs ({_COLUMNS}) VALUES (?, 0, ?, NULL, 0, NULL, NULL, 0, 1, ?, ?, ?, 0,"
    " ?, ?, ?, ?, ?) ON CONFLICT (cookie) DO UPDATE SET pipeline = excluded.pipeline,"
    " variables = NULL, accepted_at = excluded.accepted_at, state = excluded.state,"
    " attempts = excluded.attempts, rc = excluded.rc, error = excluded.error,"
    " stacktrace = excluded.stacktrace, result = excluded.result, ended_at = excluded.ended_at"
)
_SQL_NEXT_SEQ: Final = "UPDATE meta SET value = ?1 WHERE key = 'next_seq' AND value < ?1"


def _pack_stacktrace(stacktrace: tuple[str, ...] | None) -> bytes | None:
    return None if stacktrace is None else msgpack.packb(list(stacktrace))


def _unpack_stacktrace(data: bytes | None) -> tuple[str, ...] | None:
    return None if data is None else tuple(msgpack.unpackb(data))


def placeholder_row(ended: Ended) -> list[Any]:
    """The row an `end` creates for a cookie the journal has no row for (see `_SQL_END`)."""
    row: list[Any] = [ended.cookie, 0, ended.pipeline, None, 0, None, None, 0, 1]
    row += [ended.accepted_at, _ENDED, ended.attempts, 0]
    row += [ended.rc, ended.error, _pack_stacktrace(ended.stacktrace), ended.result]
    row.append(ended.ended_at)
    return row


def _end_row(row: list[Any], ended: Ended) -> None:
    """Apply an `end` to a row this batch inserts (mirrors `_SQL_END`'s update)."""
    row[_C_PIPELINE] = ended.pipeline
    row[_C_VARIABLES] = None
    row[_C_ACCEPTED_AT] = ended.accepted_at
    row[_C_STATE] = _ENDED
    row[_C_ATTEMPTS] = ended.attempts
    row[_C_RC] = ended.rc
    row[_C_ERROR] = ended.error
    row[_C_STACKTRACE] = _pack_stacktrace(ended.stacktrace)
    row[_C_RESULT] = ended.result
    row[_C_ENDED_AT] = ended.ended_at


# A batch's net effect on one cookie, computed on the writer thread. Kinds:
_N_DELETE: Final = 0  # [kind]
_N_INSERT: Final = 1  # [kind, row]          the batch (re)creates the row
_N_STATE: Final = 2  # [kind, state, attempts]
_N_END: Final = 3  # [kind, ended, state, attempts]

Statement = tuple[str, list[tuple[Any, ...]]]


def _mutable(entry: list[Any]) -> list[Any]:
    """The row of an _N_INSERT entry as a list (it starts as a tuple)."""
    row = entry[1]
    if type(row) is tuple:
        row = entry[1] = list(row)
    return row  # type: ignore[no-any-return]


def plan(ops: Sequence[tuple[Any, ...]]) -> tuple[list[Statement], int]:
    """Coalesce a batch's operations per cookie into statements, one kind each.

    Every cookie ends up with exactly one net statement, so rows are
    independent and the statement kinds can run in any order (each with one
    `executemany`). Each statement sets absolute values, so a batch can be
    re-run after a partial failure. Returns the statements and the row count.
    """
    net: dict[bytes, list[Any]] = {}
    max_seq = 0
    for op in ops:
        kind = op[0]
        if kind == _OP_ACCEPT:
            job: Accepted = op[1]
            if job.seq > max_seq:
                max_seq = job.seq
            # A tuple: most accepted rows are inserted as they are (made a
            # list only if a later operation in the batch changes them).
            net[job.cookie] = [
                _N_INSERT,
                (
                    job.cookie,
                    job.seq,
                    job.pipeline,
                    job.variables,
                    job.priority,
                    job.timeout_ms,
                    job.deadline,
                    job.max_attempts,
                    int(job.detach),
                    job.accepted_at,
                    _QUEUED,
                    0,
                    0,
                    None,
                    None,
                    None,
                    None,
                    None,
                ),
            ]
        elif kind == _OP_DISPATCH or kind == _OP_REQUEUE:
            cookie: bytes = op[1]
            state = _RUNNING if kind == _OP_DISPATCH else _QUEUED
            entry = net.get(cookie)
            if entry is None or entry[0] == _N_STATE:
                net[cookie] = [_N_STATE, state, op[2]]
            elif entry[0] == _N_INSERT:
                row = _mutable(entry)
                row[_C_STATE] = state
                row[_C_ATTEMPTS] = op[2]
            elif entry[0] == _N_END:
                entry[2] = state
                entry[3] = op[2]
            # _N_DELETE: updating a deleted row changes nothing.
        elif kind == _OP_END:
            ended: Ended = op[1]
            entry = net.get(ended.cookie)
            if entry is None or entry[0] == _N_STATE or entry[0] == _N_END:
                net[ended.cookie] = [_N_END, ended, _ENDED, ended.attempts]
            elif entry[0] == _N_INSERT:
                _end_row(_mutable(entry), ended)
            else:  # deleted earlier in this batch: the upsert must not update the old row
                net[ended.cookie] = [_N_INSERT, placeholder_row(ended)]
        else:
            for c in op[1]:
                net[c] = [_N_DELETE]
    deletes: list[tuple[Any, ...]] = []
    inserts: list[tuple[Any, ...]] = []
    states: list[tuple[Any, ...]] = []
    ends: list[tuple[Any, ...]] = []
    for cookie, entry in net.items():
        k = entry[0]
        if k == _N_DELETE:
            deletes.append((cookie,))
        elif k == _N_INSERT:
            inserts.append(tuple(entry[1]))
        elif k == _N_STATE:
            states.append((entry[1], entry[2], cookie))
        else:
            e: Ended = entry[1]
            ends.append(
                (
                    cookie,
                    e.pipeline,
                    e.accepted_at,
                    entry[2],
                    entry[3],
                    e.rc,
                    e.error,
                    _pack_stacktrace(e.stacktrace),
                    e.result,
                    e.ended_at,
                )
            )
    statements: list[Statement] = []
    if max_seq:
        statements.append((_SQL_NEXT_SEQ, [(max_seq + 1,)]))
    for sql, rows in (
        (_SQL_DELETE, deletes),
        (_SQL_INSERT, inserts),
        (_SQL_STATE, states),
        (_SQL_END, ends),
    ):
        if rows:
            statements.append((sql, rows))
    return statements, len(net)


def split(statements: list[Statement], max_rows: int) -> list[list[Statement]]:
    """Cut a batch's statements into transactions of at most `max_rows` rows each."""
    transactions: list[list[Statement]] = []
    current: list[Statement] = []
    room = max_rows
    for sql, rows in statements:
        i = 0
        while i < len(rows):
            part = rows[i : i + room]
            current.append((sql, part))
            i += len(part)
            room -= len(part)
            if room == 0:
                transactions.append(current)
                current, room = [], max_rows
    if current:
        transactions.append(current)
    return transactions


@dataclass(slots=True)
class _Batch:
    number: int
    ops: list[tuple[Any, ...]]
    transactions: list[list[Statement]] | None = None  # planned once, kept for retries


@dataclass(slots=True)
class _Call:
    """A function to run on the writer thread with the connection (tests, stop)."""

    fn: Callable[[sqlite3.Connection], Any]
    done: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


@dataclass(slots=True)
class _Stop:
    tail: _Batch | None  # what the loop recorded but had not handed over
    done: concurrent.futures.Future[int] = field(default_factory=concurrent.futures.Future)


def _describe(exc: sqlite3.Error) -> str:
    """One line for an SQLite error at open, in the words a user can act on."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name == "SQLITE_NOTADB":
        return "not an SQLite database (file is not a database)"
    if name.startswith("SQLITE_READONLY"):
        return f"not writable ({exc})"
    if name.startswith("SQLITE_CORRUPT"):
        return f"corrupt ({exc})"
    if name.startswith("SQLITE_CANTOPEN"):
        return f"cannot open ({exc}; check the file's and its directory's permissions)"
    if name.startswith("SQLITE_BUSY"):
        return f"locked by another process ({exc})"
    return str(exc)


class SqliteStore(Store):
    """The embedded journal: one SQLite file in WAL mode, written by one thread.

    The event-loop side only appends to the open batch; `flush` hands it to the
    writer thread unless a commit is in flight, and the writer reports the
    commit back with ``loop.call_soon_threadsafe``, which starts the next batch
    if one accumulated (so batches grow with load: the loop never waits).
    """

    durable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sync: Literal["full", "normal"] = "full",
        result_ttl_s: float = 3600.0,
        result_max: int = 100_000,
        max_batch_rows: int = 50_000,
    ) -> None:
        if sync not in ("full", "normal"):
            raise ValueError(f"sync must be 'full' or 'normal', not {sync!r}")
        if result_ttl_s < 0 or result_max < 0 or max_batch_rows < 1:
            raise ValueError("result_ttl_s and result_max must be >= 0, max_batch_rows >= 1")
        self.path = os.path.abspath(os.fspath(path))
        self.location = self.path
        self.sync = sync
        self.result_ttl_s = result_ttl_s
        self.result_max = result_max
        # Bounds one transaction's WAL growth; a batch larger than this is
        # committed as several transactions but reported as one (its mark).
        # A crash between them leaves each cookie either before or after the
        # batch (a cookie's net statement is in one transaction), never between.
        self.max_batch_rows = max_batch_rows
        #: Transactions committed so far (writer thread; for tests and benchmarks).
        self.transactions = 0
        #: Job rows written so far (one per cookie per batch), as `transactions`.
        self.rows_committed = 0
        #: Failed attempts to commit a batch (first tries and retries).
        self.failures = 0

        self._on_commit: OnCommit = _ignore_commit
        self._on_trouble: OnTrouble = _ignore_trouble
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[_Batch | _Call | _Stop] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock_fd = -1
        self._max_pages_default = 0

        # Event-loop side state.
        self._ops: list[tuple[Any, ...]] = []
        self._n_open = 0  # operations in _ops (a forget counts its cookies)
        self._n_flight = 0  # operations in the batch being committed
        self._handed = 0  # number of the last batch handed to the writer
        self._committed = 0  # number of the last batch reported committed
        self._busy = False  # a batch is with the writer
        self._trouble: str | None = None
        self._changed: asyncio.Event | None = None  # close() waits on it
        self._closing = False

    # ------------------------------------------------------------------ open

    def open(self, now: float, on_commit: OnCommit, on_trouble: OnTrouble) -> Recovered:
        if self._thread is not None:
            raise RuntimeError("SqliteStore.open called twice")
        self._on_commit = on_commit
        self._on_trouble = on_trouble
        ready: concurrent.futures.Future[Recovered] = concurrent.futures.Future()
        # The connection is opened, used and closed on this thread only. A
        # daemon thread: a broker dying without close() must not hang on it,
        # and the journal needs no goodbye (WAL replays at the next open).
        self._thread = threading.Thread(
            target=self._writer, args=(now, ready), name="reasonbroker-journal", daemon=True
        )
        self._thread.start()
        try:
            return ready.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise

    def _lock(self) -> None:
        lock_path = self.path + ".lock"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as exc:
            raise JournalError(f"{self.path}: cannot create its directory: {exc.strerror}") from exc
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise JournalError(
                f"{self.path}: not writable (cannot open {lock_path}: {exc.strerror})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise JournalError(
                f"{self.path}: locked by another running broker (pid {holder}, lock {lock_path})"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise JournalError(f"{self.path}: cannot lock {lock_path}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            # Closing the descriptor releases the flock; the file stays (see module doc).
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _connect(self, now: float) -> tuple[sqlite3.Connection, Recovered]:
        if os.path.exists(self.path) and not os.path.isfile(self.path):
            raise JournalError(f"{self.path}: not a regular file")
        try:
            # isolation_level=None: no implicit transactions; the writer says BEGIN/COMMIT.
            conn = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise JournalError(f"{self.path}: {_describe(exc)}") from exc
        try:
            return conn, self._prepare(conn, now)
        except sqlite3.Error as exc:
            conn.close()
            raise JournalError(f"{self.path}: {_describe(exc)}") from exc
        except BaseException:
            conn.close()
            raise

    def _prepare(self, conn: sqlite3.Connection, now: float) -> Recovered:
        # A foreign process (a backup) may hold the write lock for a moment.
        conn.execute("PRAGMA busy_timeout = 2000")
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = sorted(
            name for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")
        )
        new = app_id == 0 and version == 0 and not tables
        if not new:
            if app_id != APPLICATION_ID:
                raise JournalError(
                    f"{self.path}: not a reasonbroker journal (SQLite database with"
                    f" application_id {app_id:#x}, tables: {', '.join(tables) or 'none'})"
                )
            if version > SCHEMA_VERSION:
                raise JournalError(
                    f"{self.path}: journal schema version {version} is newer than this"
                    f" broker's ({SCHEMA_VERSION}); run a newer reasonbroker"
                )
            if version < 1 or not {"jobs", "meta"} <= set(tables):
                raise JournalError(
                    f"{self.path}: corrupt (schema version {version}, tables: {', '.join(tables)})"
                )
            # quick_check reads every page (not the index cross-checks of
            # integrity_check): at start-up only, a few ms per 10k jobs.
            check = conn.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise JournalError(f"{self.path}: corrupt (quick_check: {check[0][0]})")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(f"{self.path}: cannot use write-ahead logging (journal_mode {mode})")
        conn.execute(f"PRAGMA synchronous = {'FULL' if self.sync == 'full' else 'NORMAL'}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
        self._max_pages_default = conn.execute("PRAGMA max_page_count").fetchone()[0]

        # IMMEDIATE: take the write lock now, so a read-only file fails here.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if new:
                for sql in _SCHEMA_V1:
                    conn.execute(sql)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            else:
                for v in range(version, SCHEMA_VERSION):
                    for sql in _MIGRATIONS[v]:
                        conn.execute(sql)
                    conn.execute(f"PRAGMA user_version = {v + 1}")
            recovered = self._recover(conn, now)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return recovered

    def _recover(self, conn: sqlite3.Connection, now: float) -> Recovered:
        conn.execute(
            "DELETE FROM jobs WHERE state = ? AND ended_at < ?", (_ENDED, now - self.result_ttl_s)
        )
        conn.execute(
            "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs WHERE state = ?"
            " ORDER BY ended_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
            (_ENDED, self.result_max),
        )
        pending = [
            Pending(
                cookie=r[0],
                seq=r[1],
                pipeline=r[2],
                variables=r[3],
                priority=r[4],
                timeout_ms=r[5],
                deadline=r[6],
                max_attempts=r[7],
                detach=bool(r[8]),
                accepted_at=r[9],
                # A run the stop interrupted is given back: it runs again for free.
                attempts=max(r[11] - 1, 0) if r[10] == _RUNNING else r[11],
                crashes=r[12] + 1 if r[10] == _RUNNING else r[12],
                was_running=r[10] == _RUNNING,
            )
            for r in conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state != ? ORDER BY priority DESC, seq, rowid",
                (_ENDED,),
            )
        ]
        ended = [
            Ended(
                cookie=r[0],
                pipeline=r[1],
                rc=r[2],
                error=r[3],
                stacktrace=_unpack_stacktrace(r[4]),
                result=r[5],
                attempts=r[6],
                accepted_at=r[7],
                ended_at=r[8],
            )
            for r in conn.execute(
                "SELECT cookie, pipeline, rc, error, stacktrace, result, attempts, accepted_at,"
                " ended_at FROM jobs WHERE state = ? ORDER BY ended_at, rowid",
                (_ENDED,),
            )
        ]
        # Back to queued, durably: were they left "running", a second stop
        # before their next dispatch would count a crash and refund an attempt again.
        conn.execute(
            "UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0), crashes = crashes + 1"
            " WHERE state = ?",
            (_QUEUED, _RUNNING),
        )
        (stored_next,) = conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        (max_seq,) = conn.execute("SELECT MAX(seq) FROM jobs").fetchone()
        next_seq = max(stored_next, (max_seq or 0) + 1)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (next_seq,))
        return Recovered(pending=pending, ended=ended, next_seq=next_seq)

    # ---------------------------------------------------------- writer thread

    def _writer(self, now: float, ready: concurrent.futures.Future[Recovered]) -> None:
        try:
            self._lock()
            conn, recovered = self._connect(now)
        except BaseException as exc:
            self._unlock()
            if not isinstance(exc, JournalError):
                exc = JournalError(f"{self.path}: cannot open: {exc!r}")
            ready.set_exception(exc)
            return
        ready.set_result(recovered)
        try:
            self._serve(conn)
        finally:
            conn.close()
            self._unlock()

    def _serve(self, conn: sqlite3.Connection) -> None:
        batch: _Batch | None = None  # the batch in flight (first try or retry)
        delay = RETRY_FIRST_S
        troubled = False
        while True:
            try:
                item: _Batch | _Call | _Stop | None = self._queue.get(
                    timeout=delay if batch is not None else None
                )
            except queue.Empty:
                item = None  # backoff over: retry
            if isinstance(item, _Stop):
                # One last try each, in order, stopping at the first failure:
                # the journal always holds a prefix of the batches.
                last = 0
                for b in (batch, item.tail):
                    if b is not None:
                        if self._commit(conn, b) is not None:
                            break
                        last = b.number
                try:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    pass  # best effort: the next open replays the WAL anyway
                item.done.set_result(last)
                return
            if isinstance(item, _Batch):
                batch = item
            elif isinstance(item, _Call):
                # Run it, then retry a failing batch at once: the call may have
                # removed the fault (tests lift max_page_count this way).
                try:
                    item.done.set_result(item.fn(conn))
                except Exception as exc:
                    item.done.set_exception(exc)
            if batch is None:
                continue
            reason = self._commit(conn, batch)
            if reason is None:
                if troubled:
                    troubled = False
                    self._report(self._set_trouble, None)
                self._report(self._set_committed, batch.number)
                batch, delay = None, RETRY_FIRST_S
            elif not troubled:
                troubled = True
                delay = RETRY_FIRST_S
                self._report(self._set_trouble, reason)
            else:
                delay = min(delay * 2, RETRY_MAX_S)

    def _commit(self, conn: sqlite3.Connection, batch: _Batch) -> str | None:
        """Commit one batch; None on success, else the reason (rolled back)."""
        try:
            if batch.transactions is None:
                statements, _ = plan(batch.ops)
                batch.transactions = split(statements, self.max_batch_rows)
            for transaction in batch.transactions:
                conn.execute("BEGIN")
                rows = 0
                for sql, params in transaction:
                    conn.executemany(sql, params)
                    if sql is not _SQL_NEXT_SEQ:  # bookkeeping, not a job's row
                        rows += len(params)
                conn.execute("COMMIT")
                self.transactions += 1
                self.rows_committed += rows
            return None
        except Exception as exc:  # sqlite3.Error mostly; anything else is our bug, same answer
            self.failures += 1
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the connection is unusable; the retry will say so
            what = str(exc) if isinstance(exc, sqlite3.Error) else repr(exc)
            return f"journal {self.path}: {what}"

    def _report(self, fn: Callable[[Any], None], arg: Any) -> None:
        loop = self._loop
        if loop is None:  # unreachable: a batch is handed over only from flush
            return
        try:
            loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to tell

    def _call(self, fn: Callable[[sqlite3.Connection], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn(connection)` on the writer thread (after what is queued before it)."""
        call = _Call(fn)
        self._queue.put(call)
        return call.done

    async def set_max_page_count(self, pages: int | None) -> int:
        """Fault injection for tests: cap the database file at `pages` pages.

        Runs ``PRAGMA max_page_count`` on the writer thread; None lifts the cap.
        SQLite never sets the cap below the file's present size, so ``1`` caps
        it at exactly that (``0`` would leave it unchanged): the next write
        needing a new page fails with SQLITE_FULL, as on a full disk. Returns
        the cap in effect. A batch that was failing is retried as soon as this
        has run.
        """
        n = self._max_pages_default if pages is None else pages
        fut = self._call(lambda c: c.execute(f"PRAGMA max_page_count = {int(n)}").fetchone()[0])
        return int(await asyncio.wrap_future(fut))

    # ------------------------------------------------------ event-loop side

    def _set_committed(self, number: int) -> None:
        self._busy = False
        self._n_flight = 0
        if self._ops and not self._closing:
            # Accumulated during the commit: start it at once, before the
            # callback (which may raise, and whose work then overlaps the commit).
            self._hand_off()
        if self._changed is not None:
            self._changed.set()
        if number > self._committed:  # close() may have reported a later one already
            self._committed = number
            self._on_commit(number)

    def _set_trouble(self, reason: str | None) -> None:
        self._trouble = reason
        self._on_trouble(reason)
        if self._changed is not None:
            self._changed.set()

    def _hand_off(self) -> None:
        self._handed += 1
        self._busy = True
        self._n_flight = self._n_open
        batch = _Batch(self._handed, self._ops)
        self._ops = []
        self._n_open = 0
        self._queue.put(batch)

    def accept(self, job: Accepted) -> None:
        self._ops.append((_OP_ACCEPT, job))
        self._n_open += 1

    def dispatch(self, cookie: bytes, attempts: int) -> None:
        self._ops.append((_OP_DISPATCH, cookie, attempts))
        self._n_open += 1

    def requeue(self, cookie: bytes, attempts: int) -> None:
        self._ops.append((_OP_REQUEUE, cookie, attempts))
        self._n_open += 1

    def end(self, ended: Ended) -> None:
        self._ops.append((_OP_END, ended))
        self._n_open += 1

    def forget(self, cookies: Sequence[bytes]) -> None:
        if cookies:
            self._ops.append((_OP_FORGET, tuple(cookies)))
            self._n_open += len(cookies)

    def mark(self) -> int:
        # The open batch will be number handed+1; an empty one holds nothing,
        # so the mark is the last batch handed over (== committed when idle).
        return self._handed + 1 if self._ops else self._handed

    def flush(self) -> None:
        if self._busy or not self._ops or self._closing:
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._hand_off()

    def backlog(self) -> int:
        return self._n_open + self._n_flight

    @property
    def committed(self) -> int:
        """The last batch number reported committed."""
        return self._committed

    @property
    def trouble(self) -> str | None:
        """Why writes are failing, or None."""
        return self._trouble

    async def close(self) -> None:
        thread = self._thread
        if thread is None or self._closing:
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self.flush()
        # Let the batches drain the normal way, unless writes are failing
        # (then one last try below is all we can give them).
        deadline = self._loop.time() + CLOSE_TIMEOUT_S
        while (self._busy or self._ops) and self._trouble is None:
            self._changed.clear()
            self.flush()
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        self._closing = True
        tail = None
        if self._ops:
            self._handed += 1
            tail = _Batch(self._handed, self._ops)
            self._ops, self._n_open = [], 0
        stop = _Stop(tail)
        self._queue.put(stop)
        last = await asyncio.wrap_future(stop.done)
        await asyncio.to_thread(thread.join)
        self._thread = None
        self._busy = False
        self._n_flight = 0
        if last > self._committed:
            self._committed = last
            self._on_commit(last)


def _ignore_commit(n: int) -> None:
    pass


def _ignore_trouble(reason: str | None) -> None:
    pass
