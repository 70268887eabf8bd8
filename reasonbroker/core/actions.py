"""The switchboard's actions: what the broker is to do after an event.

An action lives from the switchboard's return to the broker's apply, and
nothing changes it on the way:

- `Send(conn, packet)`: write the packet to that connection;
- `Close(conn, why)`: flush and close that connection;
- `Wake(at)`: call `tick(now)` no later than `at`;
- `Log(event, conn, fields)`: a structured log line worth writing.

Send is made twice for every job, so it is written by hand like RUN and
RESULT (see packets.Record): a native class under mypyc, about four times
cheaper to build than a dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from .packets import Packet, Record


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


Action = Send | Close | Wake | Log
