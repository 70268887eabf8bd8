"""The switchboard's deadlines: one heap of timed entries, and its compaction.

Owns the heap of (at, seq, kind, target) entries (a job's TIMEOUT and
CANCEL_GRACE, a legacy worker's resting slot), the Wake the broker is asked
for when an earlier one is added, and the rule that keeps the heap small: a
job that ends marks its entries dead, and once dead entries outnumber live
ones the heap is rebuilt without them. What a fired deadline does is the
board's (`Switchboard.tick`).
"""

from __future__ import annotations

import heapq

from .actions import Action, Wake
from .state import _Conn, _Deadline, _Job, _State


class Deadlines:
    __slots__ = ("dead", "heap", "payload_bytes", "seq", "wake_at")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, _Deadline, _Job | _Conn]] = []
        self.dead = 0  # entries whose job has ended
        # The last sequence number handed out (orders entries due at the same
        # time); an int, since next() on an itertools.count is a generic call.
        self.seq = 0
        self.wake_at: float | None = None
        # The payload bytes of every live job (Limits.max_payload_bytes_total).
        # Kept here because set_done is where every job ends, whatever ends it.
        self.payload_bytes = 0

    def __len__(self) -> int:
        return len(self.heap)

    def add(self, at: float, kind: _Deadline, target: _Job | _Conn, out: list[Action]) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, kind, target))
        if isinstance(target, _Job):
            target.deadlines += 1
        if self.wake_at is None or at < self.wake_at:
            self.wake_at = at
            out.append(Wake(at))

    def set_done(self, job: _Job) -> None:
        """A job has ended: its deadline entries are dead (see compact), its
        payload bytes are no longer charged (once, however often it is called)."""
        job.state = _State.DONE
        size = job.payload_bytes
        if size:
            job.payload_bytes = 0
            self.payload_bytes -= size
            if job.payer is not None:
                job.payer.payload_bytes -= size
        if job.deadlines:
            self.dead += job.deadlines
            job.deadlines = 0
            if 2 * self.dead > len(self.heap):
                # More dead entries than live ones: rebuilding costs O(heap)
                # once per heap/2 endings, so O(1) amortised per job.
                self.compact()

    def rearm(self, out: list[Action]) -> None:
        """After a tick: compact if need be, and Wake for the next entry."""
        dl = self.heap
        if dl and 2 * self.dead > len(dl):
            self.compact()
        self.wake_at = dl[0][0] if dl else None
        if self.wake_at is not None:
            out.append(Wake(self.wake_at))

    def compact(self) -> None:
        """Drop the entries of ended jobs: a job that finishes well before its
        timeout must not stay in memory (with its variables) until then.

        In place, so a caller iterating the heap (tick) keeps a valid list.
        """
        dl = self.heap
        if self.dead == len(dl):
            dl.clear()
        else:
            dl[:] = [e for e in dl if not (isinstance(e[3], _Job) and e[3].state is _State.DONE)]
            heapq.heapify(dl)
        self.dead = 0
