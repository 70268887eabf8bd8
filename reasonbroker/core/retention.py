"""Retained results: ended jobs' terminal RESULTs, kept so that ATTACH can collect them.

Owns the table of ended cookies (PROTOCOL.md section 7) and its bounds: a
result is kept `Limits.result_ttl_s` after its job ended, and at most
`result_max` of them holding at most `result_max_bytes` of payload; past a
bound the oldest go first. Results end in time order and leave only from the
oldest end, so the table is a dict for lookup plus a deque in ending order:
O(1) per job. With a journal every job's result is retained and each one
evicted is forgotten in the journal too (a `Journal(J_FORGET)` action);
without one the board retains detached jobs' results only.

A retained cookie stays taken: a RUN reusing it is COOKIE_COLLISION.
"""

from __future__ import annotations

from collections import deque

from .actions import J_FORGET, Action, Journal
from .packets import Result


class Ended:
    """One retained RESULT and what a JOB answer says of its job."""

    __slots__ = ("accepted_at", "attempts", "ended_at", "pipeline", "result", "size")

    def __init__(
        self, result: Result, pipeline: str, attempts: int, accepted_at: float, ended_at: float
    ) -> None:
        self.result = result
        self.pipeline = pipeline
        self.attempts = attempts
        self.accepted_at = accepted_at
        self.ended_at = ended_at
        self.size = _size_of(result)


def _size_of(result: Result) -> int:
    """Roughly the bytes a retained result holds (payload, error, stack trace)."""
    size = 128
    payload = result.result
    if payload is not None:
        data = getattr(payload, "data", payload)  # a Raw's bytes, or the value
        size += len(data) if isinstance(data, (bytes, str)) else 256
    if result.error is not None:
        size += len(result.error)
    if result.stacktrace is not None:
        size += sum(len(line) for line in result.stacktrace)
    return size


class Retained:
    __slots__ = ("_journal", "_order", "bytes", "entries", "max_bytes", "max_count", "ttl_s")

    def __init__(self, ttl_s: float, max_count: int, max_bytes: int, journal: bool) -> None:
        self.ttl_s = ttl_s
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._journal = journal
        self.entries: dict[bytes, Ended] = {}
        self._order: deque[bytes] = deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, cookie: bytes) -> bool:
        return cookie in self.entries

    def put(self, cookie: bytes, ended: Ended, out: list[Action]) -> None:
        """Keep a result; evict the oldest past the bounds (and the expired)."""
        if cookie in self.entries:
            return  # never: a cookie ends once (kept so a bug cannot double-count bytes)
        self.entries[cookie] = ended
        self._order.append(cookie)
        self.bytes += ended.size
        self.expire(ended.ended_at, out)

    def get(self, cookie: bytes, now: float) -> Ended | None:
        ended = self.entries.get(cookie)
        if ended is None or now - ended.ended_at > self.ttl_s:
            return None
        return ended

    def expire(self, now: float, out: list[Action]) -> None:
        order = self._order
        entries = self.entries
        while order and (
            len(order) > self.max_count
            or self.bytes > self.max_bytes
            or now - entries[order[0]].ended_at > self.ttl_s
        ):
            cookie = order.popleft()
            self.bytes -= entries.pop(cookie).size
            if self._journal:
                out.append(Journal(J_FORGET, cookie))
