"""The broker's side of the journal: store records from board actions, and the commit barrier.

The switchboard emits `Journal` actions; `JournalGlue` turns each into a call
on the store (`daemon/store`), converting the board's monotonic times to wall
clock (they must mean the same after a restart) and payloads to msgpack bytes.
It also keeps the rule that nothing about a job reaches a client before the
journal has it (docs/durability.md):

- a Send whose packet names a cookie with uncommitted journal operations is
  held, tagged with the store's `mark()`, until `on_commit(n)` with n >= tag;
- after one Send to a connection is held, every later Send and Close to that
  connection is held behind it, so a connection sees its packets in order;
- everything else (refusals, RUNs to workers) goes out at once, so a
  failing journal still lets the broker answer `NO_CAPACITY`;
- PING and PONG are never held, not even behind a held Send: they say the
  connection is alive, nothing about the packets before them (docs/protocol.md).
  Otherwise a commit that takes seconds (a JetStream stream electing a leader)
  would leave a client hearing nothing, and judging the broker gone.

At start it reads back what the journal kept and hands it to the board
(`restore_into`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack

from ..core.actions import J_ACCEPT, J_DISPATCH, J_END, J_FORGET, J_REQUEUE, Action, Journal
from ..core.board import Restored, Switchboard, restored_run
from ..core.packets import Ping, Pong, Raw, RawJson, Result, ResultCode
from ..core.retention import Ended as RetainedEnded
from .store.base import Accepted, Ended, Recovered, Store

# Sent at once whatever is held (see the module's docstring).
_LIVENESS = (Ping, Pong)


def _payload_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if type(value) is Raw:
        data = value.data
        return data if type(data) is bytes else bytes(data)
    if type(value) is RawJson:
        value = value.value()  # a JSON peer's text, kept as msgpack as any other
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


class JournalGlue:
    """Board journal actions -> store calls; client-bound packets held until committed."""

    def __init__(self, store: Store, epoch: float) -> None:
        self.store = store
        # wall clock = board time + epoch (the board's clock is the loop's).
        self.epoch = epoch
        # Cookies with operations in batches not yet committed, by the batch
        # (mark) of their latest one; `_marks` in recording order, to clear them.
        self._uncommitted: dict[bytes, int] = {}
        self._marks: deque[tuple[int, bytes]] = deque()
        self._held: deque[tuple[int, Action]] = deque()
        self._held_conns: dict[int, int] = {}
        self.committed = 0

    # -- recording ---------------------------------------------------------------

    def record(self, action: Journal) -> None:
        store = self.store
        op = action.op
        cookie = action.cookie
        if op == J_ACCEPT:
            run = action.run
            assert run is not None
            store.accept(
                Accepted(
                    cookie=cookie,
                    seq=action.seq,
                    pipeline=run.pipeline,
                    variables=_payload_bytes(run.variables),
                    priority=run.priority,
                    timeout_ms=run.timeout_ms,
                    deadline=None if action.deadline is None else action.deadline + self.epoch,
                    max_attempts=action.max_attempts,
                    detach=run.detach,
                    accepted_at=action.at + self.epoch,
                )
            )
        elif op == J_DISPATCH:
            store.dispatch(cookie, action.attempts)
        elif op == J_REQUEUE:
            store.requeue(cookie, action.attempts)
        elif op == J_END:
            run = action.run
            result = action.result
            assert run is not None and result is not None
            store.end(
                Ended(
                    cookie=cookie,
                    pipeline=run.pipeline,
                    rc=result.rc.value,
                    error=result.error,
                    stacktrace=None if result.stacktrace is None else tuple(result.stacktrace),
                    result=_payload_bytes(result.result),
                    attempts=action.attempts,
                    accepted_at=action.accepted_at + self.epoch,
                    ended_at=action.at + self.epoch,
                )
            )
        elif op == J_FORGET:
            store.forget((cookie,))
            return  # nothing is ever sent about a forgotten job: no need to hold
        mark = store.mark()
        if mark <= self.committed:
            return  # the store had nothing to write for it (Store.mark): nothing waits
        self._uncommitted[cookie] = mark
        self._marks.append((mark, cookie))

    # -- the commit barrier --------------------------------------------------------

    def holds(self, conn: int, packet: Any) -> bool:
        """Whether a Send must wait for a commit; if so it is kept here."""
        if not self._held_conns and not self._uncommitted:
            return False
        if conn not in self._held_conns:
            cookie = getattr(packet, "cookie", None)
            if cookie is None or cookie not in self._uncommitted:
                return False
        return type(packet) not in _LIVENESS

    def hold(self, conn: int, action: Action) -> None:
        self._held.append((self.store.mark(), action))
        self._held_conns[conn] = self._held_conns.get(conn, 0) + 1

    def holds_close(self, conn: int) -> bool:
        return conn in self._held_conns

    @property
    def held(self) -> int:
        return len(self._held)

    def on_commit(self, number: int) -> list[Action]:
        """Batches up to `number` are durable: the actions that may go now, in order."""
        self.committed = max(self.committed, number)
        marks = self._marks
        uncommitted = self._uncommitted
        while marks and marks[0][0] <= number:
            mark, cookie = marks.popleft()
            if uncommitted.get(cookie) == mark:
                del uncommitted[cookie]
        ready: list[Action] = []
        held = self._held
        counts = self._held_conns
        while held and held[0][0] <= number:
            _, action = held.popleft()
            conn: int = getattr(action, "conn")  # noqa: B009 - Send and Close both have it
            left = counts[conn] - 1
            if left:
                counts[conn] = left
            else:
                del counts[conn]
            ready.append(action)
        return ready

    def forget_conn(self, conn: int) -> None:
        """A connection is gone: what is held for it is dropped (nobody to read it)."""
        if conn not in self._held_conns:
            return
        del self._held_conns[conn]
        self._held = deque((tag, a) for tag, a in self._held if getattr(a, "conn", None) != conn)

    # -- recovery ------------------------------------------------------------------

    def restore_into(self, board: Switchboard, recovered: Recovered, now: float) -> list[Action]:
        """Hand what the journal kept to the board (times converted to the board's clock)."""
        epoch = self.epoch
        jobs = [
            Restored(
                restored_run(p.cookie, p.pipeline, p.variables, p.detach, p.priority, p.timeout_ms),
                p.seq,
                p.max_attempts,
                p.attempts,
                p.crashes,
                p.was_running,
                None if p.deadline is None else p.deadline - epoch,
            )
            for p in recovered.pending
        ]
        ended = []
        for e in recovered.ended:
            try:
                rc = ResultCode(e.rc)
            except ValueError:
                rc = ResultCode.EXCEPTION  # a code this version does not know
            result = Result(
                e.cookie,
                rc,
                e.error,
                None if e.stacktrace is None else tuple(e.stacktrace),
                None if e.result is None else Raw(e.result),
            )
            ended.append(
                RetainedEnded(
                    result, e.pipeline, e.attempts, e.accepted_at - epoch, e.ended_at - epoch
                )
            )
        return board.restore(jobs, ended, now)


OnReady = Callable[[list[Action]], None]
