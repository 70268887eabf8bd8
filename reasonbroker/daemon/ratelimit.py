"""Log rate limiting: peer-caused events, a few lines a second each, the rest counted.

A flood of bad connections must not become a disk-filling log. Each event
named in `PEER_EVENTS` may log `per_s` lines in each one-second window; the
lines past that are counted, and once the window is over one summary says how
many were suppressed (`log_suppressed`: `of` the event, `suppressed` the count). Pure
bookkeeping with time passed in: the broker logs what it is told to.
"""

from __future__ import annotations

from typing import Final

# Events a peer can cause at will, from the broker or the switchboard.
PEER_EVENTS: Final = frozenset(
    {
        "auth_failed",
        "auth_refused",
        "auth_timeout",
        "bad_packet",
        "connection_refused",
        "frame_timeout",
        "idle_timeout",
        "input_cap_reached",
        "packet_refused",
        "packet_unsupported",
        "peer_silent",
        "protocol_error",
        "role_refused",
    }
)

WINDOW_S: Final = 1.0


class LogRateLimiter:
    """Per event: at most `per_s` lines per one-second window (0: no limit)."""

    __slots__ = ("_windows", "per_s")

    def __init__(self, per_s: int) -> None:
        self.per_s = per_s
        # event -> [window start, lines logged in it, lines suppressed in it]
        self._windows: dict[str, list[float]] = {}

    def allow(self, event: str, now: float) -> tuple[bool, int]:
        """Whether to log this line of `event`, and how many lines of it the
        window that just ended suppressed (> 0: log a summary first)."""
        if not self.per_s or event not in PEER_EVENTS:
            return True, 0
        window = self._windows.get(event)
        ended = 0
        if window is None or now - window[0] >= WINDOW_S:
            if window is not None:
                ended = int(window[2])
            window = [now, 0.0, 0.0]
            self._windows[event] = window
        if window[1] < self.per_s:
            window[1] += 1
            return True, ended
        window[2] += 1
        return False, ended

    def flush(self, now: float) -> list[tuple[str, int]]:
        """(event, suppressed) for every window over by `now` that suppressed
        lines; those windows are forgotten (called from a periodic sweep)."""
        done: list[tuple[str, int]] = []
        for event, window in list(self._windows.items()):
            if now - window[0] >= WINDOW_S:
                del self._windows[event]
                if window[2]:
                    done.append((event, int(window[2])))
        return done
