"""The switchboard's actions: what the broker is to do after an event.

An action lives from the switchboard's return to the broker's apply, and
nothing changes it on the way:

- `Send(conn, packet)`: write the packet to that connection;
- `Close(conn, why)`: flush and close that connection;
- `Wake(at)`: call `tick(now)` no later than `at`;
- `Log(event, conn, fields)`: a structured log line worth writing;
- `Journal(op, cookie, ...)`: a job's change of state for the journal (a
  switchboard made with `durable=True` only): accepted, dispatched,
  re-queued, ended, forgotten. The broker hands it to its store.

Send is made twice for every job, so it is written by hand like RUN and
RESULT (see packets.Record): a native class under mypyc, about four times
cheaper to build than a dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from .packets import Packet, Record, Result, Run


class Send(Record):
    __slots__ = ("conn", "packet")
    __match_args__ = ("conn", "packet")

    def __init__(self, conn: int, packet: Packet) -> None:
        self.conn: Final = conn
        self.packet: Final = packet


@dataclass(slots=True)
class Close:
    conn: int
    why: str


@dataclass(slots=True)
class Wake:
    at: float


@dataclass(slots=True)
class Log:
    event: str
    conn: int | None
    fields: dict[str, Any] = field(default_factory=dict)


# Journal ops.
J_ACCEPT: Final = 1  # run, seq, max_attempts, deadline (board time or None), at = accepted
J_DISPATCH: Final = 2  # attempts (this one counted)
J_REQUEUE: Final = 3  # attempts
J_END: Final = 4  # run, attempts, at = ended, accepted_at, result (the terminal RESULT)
J_FORGET: Final = 5  # a retained result evicted


class Journal(Record):
    """One journal operation; fields an op does not use are None / 0."""

    __slots__ = (
        "accepted_at",
        "at",
        "attempts",
        "cookie",
        "deadline",
        "max_attempts",
        "op",
        "result",
        "run",
        "seq",
    )
    __match_args__ = (
        "op",
        "cookie",
        "run",
        "seq",
        "attempts",
        "max_attempts",
        "deadline",
        "at",
        "accepted_at",
        "result",
    )

    def __init__(
        self,
        op: int,
        cookie: bytes,
        run: Run | None = None,
        seq: int = 0,
        attempts: int = 0,
        max_attempts: int = 0,
        deadline: float | None = None,
        at: float = 0.0,
        accepted_at: float = 0.0,
        result: Result | None = None,
    ) -> None:
        self.op: Final = op
        self.cookie: Final = cookie
        self.run: Final = run
        self.seq: Final = seq
        self.attempts: Final = attempts
        self.max_attempts: Final = max_attempts
        self.deadline: Final = deadline
        self.at: Final = at
        self.accepted_at: Final = accepted_at
        self.result: Final = result


Action = Send | Close | Wake | Log | Journal
