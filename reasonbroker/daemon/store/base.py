"""The journal's interface: what the broker hands a store, and what a store gives back at start.

The switchboard decides, sans-IO, and emits journal actions (a job accepted,
dispatched, re-queued, ended, forgotten) like its other actions; the broker
turns each into one call on a `Store`, then calls `flush()` once per event-loop
turn. A durable store makes the calls durable in batches (group commit) on a
writer thread of its own and reports each commit back on the event loop; the
broker holds back what must not reach a client before the commit (ACCEPTED,
and every other packet to a client while its batch is uncommitted).

Times here are wall-clock seconds since the epoch (`time.time()`): they must
mean the same after a restart. The switchboard's own clock is monotonic; the
broker converts.

Payloads (`variables`, `result`) are the msgpack bytes of the value, or None.

Every method but `open` and `close` is called on the event loop and must not
block: it only records the operation in the open batch.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass


class JournalError(Exception):
    """The journal cannot be opened or used; the message names the file and says why."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """A job the broker accepted (the row ACCEPTED waits for)."""

    cookie: bytes  # 16 bytes; unique in the journal
    seq: int  # arrival order, increasing over the journal's life
    pipeline: str
    variables: bytes | None
    priority: int
    timeout_ms: int | None
    deadline: float | None  # absolute, wall clock; None: no deadline
    max_attempts: int
    detach: bool
    accepted_at: float


@dataclass(frozen=True, slots=True)
class Ended:
    """A job's terminal RESULT, kept for the retention time so ATTACH can collect it."""

    cookie: bytes
    pipeline: str
    rc: str  # a ResultCode value ("OK", "TIMEOUT", ...)
    error: str | None
    stacktrace: tuple[str, ...] | None
    result: bytes | None
    attempts: int
    accepted_at: float
    ended_at: float


@dataclass(frozen=True, slots=True)
class Pending:
    """A job that had not ended when the broker stopped, as `open` gives it back."""

    cookie: bytes
    seq: int
    pipeline: str
    variables: bytes | None
    priority: int
    timeout_ms: int | None
    deadline: float | None
    max_attempts: int
    detach: bool
    accepted_at: float
    attempts: int  # attempts spent, not counting a run the stop interrupted
    crashes: int  # broker stops that caught this job running, this one included
    was_running: bool  # it was on a worker when the broker stopped


@dataclass(frozen=True, slots=True)
class Recovered:
    pending: list[Pending]  # in dispatch order: priority (higher first), then seq
    ended: list[Ended]  # retained results, oldest ended first
    next_seq: int  # greater than every seq in the journal


# Called on the event loop: `on_commit(n)` says batches 1..n are durable;
# `on_trouble(reason)` says writes are failing (reason) or work again (None).
OnCommit = Callable[[int], None]
OnTrouble = Callable[[str | None], None]


class Store(abc.ABC):
    """One journal backend (memory, SQLite; later the cluster's)."""

    #: Whether anything survives the process; False: the broker holds nothing back.
    durable: bool = False
    #: Where the journal lives, for the start-up log line (None: in memory).
    location: str | None = None

    @abc.abstractmethod
    def open(self, now: float, on_commit: OnCommit, on_trouble: OnTrouble) -> Recovered:
        """Open (creating if need be) and read back what survived; blocking, at start-up.

        Raises JournalError for a journal that is corrupt, not a journal, of a
        newer schema, locked by another broker, or not writable. Expired
        results (older than the retention) are deleted, not returned. Jobs that
        were running have their `crashes` counted up here, durably.
        """

    @abc.abstractmethod
    def accept(self, job: Accepted) -> None: ...

    @abc.abstractmethod
    def dispatch(self, cookie: bytes, attempts: int) -> None:
        """The job went to a worker; `attempts` now counts this attempt."""

    @abc.abstractmethod
    def requeue(self, cookie: bytes, attempts: int) -> None:
        """The job is back in the queue (its worker went away, or refused it)."""

    @abc.abstractmethod
    def end(self, ended: Ended) -> None: ...

    @abc.abstractmethod
    def forget(self, cookies: Sequence[bytes]) -> None:
        """Retained results evicted (retention time or count): delete them."""

    @abc.abstractmethod
    def mark(self) -> int:
        """The batch number holding every operation recorded so far.

        A packet that must wait for those operations is held until
        `on_commit(n)` with n >= mark. When nothing is uncommitted this is the
        last committed number, so nothing waits.
        """

    @abc.abstractmethod
    def flush(self) -> None:
        """End of an event-loop turn: start committing the open batch, unless a
        commit is already running (then the batch keeps growing until it ends)."""

    @abc.abstractmethod
    def backlog(self) -> int:
        """Operations recorded but not yet committed (the broker pauses reading
        from clients above a limit, so memory does not grow while the disk lags)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Commit what is pending (best effort) and release the journal."""
