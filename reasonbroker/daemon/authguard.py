"""Failed authentication, throttled per source address: delay, then refuse.

Tokens resist guessing only if guessing is slow. Per source address (the
host part of the peer address; every Unix-socket peer is one address,
"unix"), failures are counted over `Limits.auth_block_s`: from the
`auth_failures_before_delay`-th on, the refusal is held for
`auth_failure_delay_ms` before it is sent and the connection closed; at the
`auth_failures_before_block`-th the address is blocked, and its new
connections to a listener with a token are closed at once, for
`auth_block_s`. Pure bookkeeping with time passed in; the broker acts on it.
"""

from __future__ import annotations

import enum
from typing import Final

from ..core.limits import Limits

# Addresses remembered at most; past it the oldest record is dropped, so a
# flood from many addresses cannot grow the table without bound.
MAX_ADDRESSES: Final = 10_000


class Verdict(enum.Enum):
    CLOSE = 1  # refuse and close at once
    DELAY = 2  # hold the refusal for the delay, then close
    BLOCK = 3  # this failure blocks the address (the refusal is held too)


def source_of(peer: str) -> str:
    """The address failures are counted by: the host of "host:port" ("[::1]"
    for IPv6), "unix" for any Unix-socket peer."""
    if peer.startswith("unix:"):
        return "unix"
    host, sep, _ = peer.rpartition(":")
    return host if sep else peer


class AuthThrottle:
    __slots__ = ("_block_after", "_block_s", "_delay_after", "_records", "delay_s")

    def __init__(self, limits: Limits) -> None:
        self._delay_after = limits.auth_failures_before_delay
        self._block_after = limits.auth_failures_before_block
        self._block_s = limits.auth_block_s
        self.delay_s = limits.auth_failure_delay_ms / 1000.0
        # address -> [first failure of the window, failures, blocked until (0: not)]
        self._records: dict[str, list[float]] = {}

    def failed(self, source: str, now: float) -> Verdict:
        """Count one failed authentication from `source`; what to do about it."""
        record = self._records.get(source)
        if record is None or (now - record[0] >= self._block_s and record[2] <= now):
            if record is None and len(self._records) >= MAX_ADDRESSES:
                del self._records[next(iter(self._records))]  # the oldest
            record = [now, 0.0, 0.0]
            self._records[source] = record
        record[1] += 1
        failures = record[1]
        if failures == self._block_after:
            record[2] = now + self._block_s
            return Verdict.BLOCK
        if failures >= self._delay_after:
            return Verdict.DELAY
        return Verdict.CLOSE

    def blocked(self, source: str, now: float) -> bool:
        record = self._records.get(source)
        return record is not None and record[2] > now

    def failures(self, source: str) -> int:
        record = self._records.get(source)
        return 0 if record is None else int(record[1])

    def prune(self, now: float) -> None:
        """Forget addresses whose window and block are over (from a periodic sweep)."""
        for source, record in list(self._records.items()):
            if now - record[0] >= self._block_s and record[2] <= now:
                del self._records[source]

    def __len__(self) -> int:
        return len(self._records)
