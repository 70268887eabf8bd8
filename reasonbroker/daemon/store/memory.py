"""The in-memory store (`--journal none`): nothing is written, nothing survives.

Every operation is a no-op so that running without a journal costs nothing on
the hot path; `mark()` is always 0, which is also the committed number, so the
broker holds back no packet waiting for a commit.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Accepted, Ended, OnCommit, OnTrouble, Recovered, Store


class MemoryStore(Store):
    """A store that keeps nothing: the broker's memory is the only copy of a job."""

    durable = False
    location = None

    def open(self, now: float, on_commit: OnCommit, on_trouble: OnTrouble) -> Recovered:
        return Recovered(pending=[], ended=[], next_seq=1)

    def accept(self, job: Accepted) -> None:
        pass

    def dispatch(self, cookie: bytes, attempts: int) -> None:
        pass

    def requeue(self, cookie: bytes, attempts: int) -> None:
        pass

    def end(self, ended: Ended) -> None:
        pass

    def forget(self, cookies: Sequence[bytes]) -> None:
        pass

    def mark(self) -> int:
        # Nothing is ever uncommitted: 0 is both the mark and the committed number.
        return 0

    def flush(self) -> None:
        pass

    def backlog(self) -> int:
        return 0

    async def close(self) -> None:
        pass
