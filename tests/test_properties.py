"""Property tests of the switchboard's invariants (hypothesis, stateful).

A random sequence of connects, REGISTERs, RUNs, CANCELs, worker answers (good,
stale, foreign, duplicate, malformed), STARTED/PROGRESS, disconnects, ticks and a
drain drives one `Switchboard`. The machine models every peer only from the
actions it is sent, and checks after every step:

- every worker's slots: 0 <= busy <= capacity, and busy is exactly the number of
  RUNs that worker was sent and has not answered (a slot is held until then);
- every accepted, non-detached RUN gets at most one terminal RESULT, a detached
  one none, and STARTED/PROGRESS only while it is live and only if asked for;
- nothing is sent to a closed or disconnected connection (the model, like the
  broker, reports the disconnect right after applying a Close; the gap between
  the two is tests/test_switchboard.py's business), a legacy worker is never
  sent a RESULT, a legacy client only the ten ReasonChip result codes;
- a RUN goes only to a worker serving its pipeline, never beyond its capacity;
- Wake actions keep the broker's timer no later than any live deadline, and a
  tick leaves no live job past its deadline.

At teardown every accepted non-detached RUN from a still-connected client has
got exactly one terminal RESULT and the broker tracks no job any more, whether
the run ends with finish() or with every worker answering everything.

"Accepted" is a RUN that got no immediate rejection (COOKIE_COLLISION,
NO_CAPACITY, BAD_PACKET, BROKER_WENT_AWAY) in the same receive() call.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from reasonbroker.core.actions import Action, Close, Log, Send, Wake
from reasonbroker.core.board import Switchboard
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.protocol import (
    LEGACY_RESULT_CODES,
    BadPacket,
    Cancel,
    Codec,
    Hello,
    Packet,
    Ping,
    Pong,
    Progress,
    Register,
    Result,
    ResultCode,
    Role,
    Run,
    Started,
    Unsupported,
    can_carry,
)

PIPELINES = ("a", "b")
GRACE_S = 1.0
REST_S = 0.05
LIMITS = Limits(
    legacy_slot_reuse_ms=int(REST_S * 1000),
    queue_limit=4,
    cancel_grace_ms=int(GRACE_S * 1000),
    default_max_attempts=1,
    max_attempts_limit=3,
    max_worker_capacity=4,
    max_inflight_per_client=6,
    # Large, so that batch affinity often overrides least-loaded (capacities are <= 4).
    dispatch_batch_slack=0.5,
)
REJECTIONS = frozenset(
    {
        ResultCode.COOKIE_COLLISION,
        ResultCode.NO_CAPACITY,
        ResultCode.BAD_PACKET,
        ResultCode.BROKER_WENT_AWAY,
    }
)
# Never a broker-made worker cookie (those are 8 zero bytes + a counter).
UNKNOWN_WCOOKIE = b"\xee" * 16


@dataclass
class Pending:
    """An accepted, non-detached RUN still owed its terminal RESULT."""

    deadline: float | None  # the earliest of its timeout and its cancel grace
    cancelled: bool = False


@dataclass
class ClientModel:
    conn: int
    hello: bool
    features: frozenset[str]
    codec: Codec
    pending: dict[bytes, Pending] = field(default_factory=dict)
    detached: set[bytes] = field(default_factory=set)
    finished: list[bytes] = field(default_factory=list)  # got their terminal RESULT


@dataclass
class WorkerModel:
    conn: int
    hello: bool
    codec: Codec
    capacity: int = 0
    pipelines: set[str] | None = None
    outstanding: dict[bytes, str] = field(default_factory=dict)  # wcookie -> pipeline
    answered: list[bytes] = field(default_factory=list)
    # A ReasonChip-like worker's slot (JSON, no HELLO) rests after each answer
    # until this time (the broker may keep it resting longer, until its next
    # tick, never shorter). msgpack workers' slots never rest.
    rests: list[float] = field(default_factory=list)

    def answer(self, wcookie: bytes, now: float) -> None:
        del self.outstanding[wcookie]
        self.answered.append(wcookie)
        if not self.hello and self.codec is Codec.JSON:
            self.rests.append(now + REST_S)


@dataclass
class Context:
    """What the step's own packet was, to classify the RESULTs it provoked."""

    run: tuple[int, bytes] | None = None
    cancel: tuple[int, bytes] | None = None
    bad: tuple[int, bytes] | None = None  # a malformed/unsupported packet naming a cookie
    rejected: bool = False
    answered_cancel: bool = False
    answered_bad: bool = False
    hello_answered: bool = False
    pong: bool = False
    cancels_sent: int = 0


@dataclass(frozen=True)
class ClientSpec:
    hello: bool
    features: frozenset[str]
    codec: Codec


@dataclass(frozen=True)
class WorkerSpec:
    hello: bool
    codec: Codec
    capacity: int
    pipelines: frozenset[str] | None


@dataclass(frozen=True)
class RunSpec:
    pipeline: str
    detach: bool
    timeout_ms: int | None
    max_attempts: int | None
    priority: int
    variables: Any
    reuse: str
    pick: int


CODECS = st.sampled_from([Codec.MSGPACK, Codec.MSGPACK, Codec.JSON])
CLIENT_SPECS = st.builds(
    ClientSpec,
    hello=st.booleans(),
    features=st.frozensets(st.sampled_from(["started", "progress", "other"])),
    codec=CODECS,
)
# A worker serving all is the easy case; named pipelines make the interesting ones
# (the last worker for a pipeline leaving, jobs nobody else can take).
NAMED = [frozenset({"a"}), frozenset({"b"}), frozenset({"a", "b"})]
WORKER_PIPELINES = st.sampled_from([*NAMED, None])
WORKER_SPECS = st.builds(
    WorkerSpec,
    hello=st.booleans(),
    codec=CODECS,
    capacity=st.integers(1, 2),
    pipelines=WORKER_PIPELINES,
)
RUN_SPECS = st.builds(
    RunSpec,
    pipeline=st.sampled_from(PIPELINES),
    detach=st.integers(0, 4).map(lambda n: n == 4),
    # Mostly no timeout, so that a job nobody serves any more shows up as one that
    # is never answered rather than as a TIMEOUT.
    timeout_ms=st.sampled_from([None, None, None, 100, 1500, 8000]),
    max_attempts=st.none() | st.integers(1, 3),
    priority=st.integers(-1, 2),
    variables=st.sampled_from(["text", "text", b"bytes", 7, None]),
    reuse=st.sampled_from(["fresh", "fresh", "fresh", "pending", "finished"]),
    pick=st.integers(0, 100),
)


class SwitchboardMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.board = Switchboard(LIMITS)
        self.now = 0.0
        self.ids = itertools.count(1)
        self.cookies = itertools.count(1)
        self.clients: dict[int, ClientModel] = {}
        self.workers: dict[int, WorkerModel] = {}
        self.closed: set[int] = set()  # got a Close, or disconnected
        self.armed: float | None = None  # the broker's timer, per the Wakes
        self.draining = False
        self.finish_at_teardown = False

    # -- applying actions ------------------------------------------------------

    def apply(self, out: Sequence[Action], ctx: Context | None = None) -> Context:
        ctx = ctx or Context()
        closes: list[int] = []
        for action in out:
            match action:
                case Log():
                    pass
                case Wake(at):
                    self.armed = at if self.armed is None else min(self.armed, at)
                case Close(conn, _):
                    assert conn not in self.closed, f"Close to closed conn {conn}"
                    closes.append(conn)
                    self.closed.add(conn)
                case Send(conn, packet):
                    assert conn not in self.closed, f"{packet} sent to closed conn {conn}"
                    if conn in self.workers:
                        self.to_worker(self.workers[conn], packet, ctx)
                    else:
                        assert conn in self.clients, f"{packet} sent to unknown conn {conn}"
                        self.to_client(self.clients[conn], packet, ctx)
        for conn in closes:  # the broker disconnects what it closed
            self.drop(conn)
        return ctx

    def to_worker(self, w: WorkerModel, packet: Packet, ctx: Context) -> None:
        match packet:
            case Run(wcookie, pipeline, variables):
                assert wcookie not in w.outstanding
                assert w.pipelines is None or pipeline in w.pipelines
                assert can_carry(variables, w.codec)
                w.outstanding[wcookie] = pipeline
                w.rests = [t for t in w.rests if t > self.now]
                assert len(w.outstanding) + len(w.rests) <= w.capacity, (
                    "more RUNs than capacity, or a legacy slot reused before its rest"
                )
            case Cancel(wcookie):
                assert wcookie in w.outstanding, "CANCEL for a job the worker does not have"
                ctx.cancels_sent += 1
            case Result():
                assert w.hello, "a legacy worker was sent a RESULT"
            case Hello():
                assert w.hello
                ctx.hello_answered = True
            case Pong():
                assert w.hello
                ctx.pong = True
            case _:
                raise AssertionError(f"unexpected {packet} to a worker")

    def to_client(self, c: ClientModel, packet: Packet, ctx: Context) -> None:
        match packet:
            case Result(cookie, rc, _, _, result):
                if not c.hello:
                    assert rc in LEGACY_RESULT_CODES, f"{rc} to a legacy client"
                assert can_carry(result, c.codec)
                if cookie is None:
                    return
                self.client_result(c, cookie, rc, ctx)
            case Started(cookie) | Progress(cookie):
                assert c.hello, "STARTED/PROGRESS to a legacy client"
                feature = "started" if isinstance(packet, Started) else "progress"
                assert feature in c.features
                assert cookie in c.pending, "STARTED/PROGRESS for a job not live"
            case Hello():
                assert c.hello
                ctx.hello_answered = True
            case Pong():
                assert c.hello
                ctx.pong = True
            case _:
                raise AssertionError(f"unexpected {packet} to a client")

    def client_result(self, c: ClientModel, cookie: bytes, rc: ResultCode, ctx: Context) -> None:
        if ctx.run == (c.conn, cookie) and not ctx.rejected:
            # The step's own RUN: the first RESULT naming it is its immediate rejection.
            assert rc in REJECTIONS, f"{rc} in answer to the RUN itself"
            if cookie in c.pending:
                expected = (
                    ResultCode.BROKER_WENT_AWAY if self.draining else ResultCode.COOKIE_COLLISION
                )
                assert rc is expected
            ctx.rejected = True
            return
        if ctx.bad == (c.conn, cookie) and not ctx.answered_bad:
            ctx.answered_bad = True
            assert rc in (ResultCode.BAD_PACKET, ResultCode.UNSUPPORTED_PACKET_TYPE)
            return
        if ctx.cancel == (c.conn, cookie) and not ctx.answered_cancel:
            ctx.answered_cancel = True
            if cookie not in c.pending:
                assert rc is ResultCode.COOKIE_NOT_FOUND, f"{rc} for CANCEL of a dead cookie"
                return
            # A queued job is cancelled at once.
            assert rc in (ResultCode.CANCELLED, ResultCode.EXCEPTION)
        assert cookie in c.pending, (
            f"{rc} for cookie {cookie.hex()} that is not owed a RESULT "
            f"(detached: {cookie in c.detached})"
        )
        del c.pending[cookie]
        c.finished.append(cookie)

    def drop(self, conn: int) -> None:
        """The connection is gone: tell the board, forget the model."""
        self.closed.add(conn)
        self.clients.pop(conn, None)
        self.workers.pop(conn, None)
        self.apply(self.board.disconnect(conn, self.now))

    def receive(self, conn: int, packet: Packet, ctx: Context | None = None) -> Context:
        return self.apply(self.board.receive(conn, packet, self.now), ctx)

    # -- rules: connections ----------------------------------------------------------

    @initialize(
        finish=st.integers(0, 3).map(lambda n: n == 3),
        clients=st.lists(CLIENT_SPECS, min_size=1, max_size=3),
        workers=st.lists(WORKER_SPECS, min_size=1, max_size=3),
    )
    def start(self, finish: bool, clients: list[ClientSpec], workers: list[WorkerSpec]) -> None:
        self.finish_at_teardown = finish
        for cspec in clients:
            self.connect_client(cspec)
        for wspec in workers:
            self.connect_worker(wspec)

    @rule(spec=CLIENT_SPECS)
    def connect_client(self, spec: ClientSpec) -> None:
        conn = next(self.ids)
        self.board.connect(conn, ListenerRole.BOTH)
        self.board.set_codec(conn, spec.codec)
        features = frozenset(spec.features) if spec.hello else frozenset()
        self.clients[conn] = ClientModel(conn, spec.hello, features, spec.codec)
        if spec.hello:
            ctx = self.receive(conn, Hello(Role.CLIENT, features=tuple(sorted(features))))
            assert ctx.hello_answered

    @rule(spec=WORKER_SPECS)
    def connect_worker(self, spec: WorkerSpec) -> None:
        conn = next(self.ids)
        self.board.connect(conn, ListenerRole.BOTH)
        self.board.set_codec(conn, spec.codec)
        self.workers[conn] = WorkerModel(conn, spec.hello, spec.codec)
        if spec.hello:
            assert self.receive(conn, Hello(Role.WORKER)).hello_answered
        self.register(conn, spec.capacity, spec.pipelines)

    def register(self, conn: int, capacity: int, pipelines: frozenset[str] | None) -> None:
        w = self.workers[conn]
        w.capacity = min(w.capacity + capacity, LIMITS.max_worker_capacity)
        if pipelines is not None:
            w.pipelines = (w.pipelines or set()) | pipelines
        named = None if pipelines is None else tuple(sorted(pipelines))
        self.receive(conn, Register(capacity, named))
        assert self.board.slots(conn)[0] == w.capacity

    @precondition(lambda self: self.workers)
    @rule(
        i=st.integers(0, 100),
        capacity=st.integers(1, 2),
        pipelines=WORKER_PIPELINES,
    )
    def register_more(self, i: int, capacity: int, pipelines: frozenset[str] | None) -> None:
        # Naming pipelines narrows a worker that served all (docs/protocol.md).
        w = self.workers[sorted(self.workers)[i % len(self.workers)]]
        self.register(w.conn, capacity, pipelines)

    @precondition(lambda self: self.clients)
    @rule(i=st.integers(0, 100), roll=st.integers(0, 2))
    def disconnect_client(self, i: int, roll: int) -> None:
        # A third of the time (not on hypothesis's favourite value, 0): keep enough
        # peers around to do work.
        if roll == 2:
            self.drop(sorted(self.clients)[i % len(self.clients)])

    @precondition(lambda self: self.workers)
    @rule(i=st.integers(0, 100), roll=st.integers(0, 2))
    def disconnect_worker(self, i: int, roll: int) -> None:
        if roll == 2:
            self.drop(sorted(self.workers)[i % len(self.workers)])

    # -- rules: clients ------------------------------------------------------------------

    @precondition(lambda self: self.clients)
    @rule(i=st.integers(0, 100), specs=st.lists(RUN_SPECS, min_size=1, max_size=4))
    def run(self, i: int, specs: list[RunSpec]) -> None:
        for n, spec in enumerate(specs):
            if not self.clients:
                return
            self.run_one(self.clients[sorted(self.clients)[(i + n) % len(self.clients)]], spec)

    def run_one(self, c: ClientModel, spec: RunSpec) -> None:
        variables = spec.variables
        if c.codec is Codec.JSON and not can_carry(variables, Codec.JSON):
            variables = "json text"  # a JSON peer cannot send anything else
        cookie = self.fresh_cookie()
        if spec.reuse == "pending" and c.pending:
            cookie = sorted(c.pending)[spec.pick % len(c.pending)]
        elif spec.reuse == "finished" and c.finished:
            cookie = c.finished[spec.pick % len(c.finished)]
        colliding = cookie in c.pending
        packet = Run(
            cookie,
            spec.pipeline,
            variables,
            spec.detach,
            spec.priority,
            spec.timeout_ms,
            spec.max_attempts,
        )
        ctx = self.receive(c.conn, packet, Context(run=(c.conn, cookie)))
        if colliding or self.draining:
            assert ctx.rejected, "a colliding RUN or a RUN while draining was accepted"
        if ctx.rejected or c.conn not in self.clients:
            return
        if spec.detach:
            c.detached.add(cookie)
        else:
            deadline = None if spec.timeout_ms is None else self.now + spec.timeout_ms / 1000.0
            c.pending[cookie] = Pending(deadline)
        if cookie in c.finished:
            c.finished.remove(cookie)

    def fresh_cookie(self) -> bytes:
        return b"\xcc" * 8 + next(self.cookies).to_bytes(8, "big")

    @precondition(lambda self: self.clients)
    @rule(
        i=st.integers(0, 100),
        whose=st.sampled_from(["own", "own", "detached", "foreign", "random"]),
    )
    def cancel(self, i: int, whose: str) -> None:
        c = self.clients[sorted(self.clients)[i % len(self.clients)]]
        cookie = self.fresh_cookie()
        if whose == "own" and c.pending:
            cookie = sorted(c.pending)[i % len(c.pending)]
        elif whose == "detached" and c.detached:
            cookie = sorted(c.detached)[i % len(c.detached)]
        elif whose == "foreign":
            others = sorted(k for o in self.clients.values() if o is not c for k in o.pending)
            if others:
                cookie = others[i % len(others)]
        pending = c.pending.get(cookie)
        was_cancelled = pending is not None and pending.cancelled
        ctx = self.receive(c.conn, Cancel(cookie), Context(cancel=(c.conn, cookie)))
        if cookie not in c.detached and pending is None:
            assert ctx.answered_cancel, "CANCEL of a dead cookie was not answered"
            assert ctx.cancels_sent == 0, "a CANCEL reached a worker for a cookie not owned"
        if pending is not None and cookie in c.pending:
            # Not answered at once: it was running; the broker answers by the grace.
            assert ctx.cancels_sent == (0 if was_cancelled else 1)
            if not was_cancelled:
                pending.cancelled = True
                grace = self.now + GRACE_S
                pending.deadline = (
                    grace if pending.deadline is None else min(pending.deadline, grace)
                )

    @precondition(lambda self: self.clients)
    @rule(
        i=st.integers(0, 100),
        kind=st.sampled_from(["bad", "bad-no-cookie", "unsupported", "register", "started"]),
    )
    def client_misbehaves(self, i: int, kind: str) -> None:
        """Malformed, unsupported and wrong-role packets: answered or closed, never fatal."""
        c = self.clients[sorted(self.clients)[i % len(self.clients)]]
        cookie = sorted(c.pending)[i % len(c.pending)] if c.pending else self.fresh_cookie()
        if kind == "register" and self.board.role_of(c.conn) is None:
            kind = "started"  # a first REGISTER would make this connection a worker
        packet: Packet
        match kind:
            case "bad":
                packet = BadPacket("RUN", cookie, "pipeline is missing or empty")
            case "bad-no-cookie":
                packet = BadPacket("", None, "packet_type is missing or not a string")
            case "unsupported":
                packet = Unsupported("FROB", cookie)
            case "register":
                packet = Register(1)
            case _:
                packet = Started(cookie)
        before = dict(c.pending)
        ctx = self.receive(c.conn, packet, Context(bad=(c.conn, cookie)))
        if c.conn in self.clients:
            assert c.pending.keys() == before.keys(), "a bad packet ended a job"
            if kind in ("bad", "unsupported"):
                assert ctx.answered_bad
        else:
            # A legacy client owed an answer with no cookie (a malformed
            # packet, or a worker's packet type) is closed, never sent one.
            assert not c.hello and kind in ("bad-no-cookie", "register", "started")

    @precondition(lambda self: self.workers)
    @rule(i=st.integers(0, 100))
    def worker_sends_run(self, i: int) -> None:
        """A RUN from a worker: BAD_PACKET to a HELLO'd one, a legacy one is closed."""
        w = self.workers[sorted(self.workers)[i % len(self.workers)]]
        self.receive(w.conn, Run(self.fresh_cookie(), "a"))
        assert (w.conn in self.workers) == w.hello

    # -- rules: workers ------------------------------------------------------------------

    @precondition(lambda self: any(w.outstanding for w in self.workers.values()))
    @rule(
        i=st.integers(0, 100),
        j=st.integers(0, 100),
        rc=st.sampled_from([ResultCode.OK, ResultCode.PROCESSOR_EXCEPTION, ResultCode.CANCELLED]),
        result=st.sampled_from(["text", b"bytes", None, 3]),
        malformed=st.integers(0, 9),
    )
    def worker_answers(self, i: int, j: int, rc: ResultCode, result: Any, malformed: int) -> None:
        busy = [w for _, w in sorted(self.workers.items()) if w.outstanding]
        w = busy[i % len(busy)]
        if w.codec is Codec.JSON and not can_carry(result, Codec.JSON):
            result = "json text"
        wcookie = sorted(w.outstanding)[j % len(w.outstanding)]
        packet: Packet = Result(wcookie, rc, None, None, result)
        if malformed == 0:
            packet = BadPacket("RESULT", wcookie, "rc 'NOPE' is not a result code")
        # The answer ends the job (a malformed RESULT too): forget it before the
        # broker hands this worker its next job.
        w.answer(wcookie, self.now)
        self.receive(w.conn, packet)

    @precondition(lambda self: self.workers)
    @rule(i=st.integers(0, 100), kind=st.sampled_from(["stale", "unknown", "foreign", "none"]))
    def worker_sends_a_dead_result(self, i: int, kind: str) -> None:
        w = self.workers[sorted(self.workers)[i % len(self.workers)]]
        wcookie: bytes | None = UNKNOWN_WCOOKIE
        if kind == "stale" and w.answered:
            wcookie = w.answered[i % len(w.answered)]
        elif kind == "foreign":
            others = sorted(k for o in self.workers.values() if o is not w for k in o.outstanding)
            if others:
                wcookie = others[i % len(others)]
        elif kind == "none":
            wcookie = None
        before = self.board.stats.results_dropped
        out = self.board.receive(w.conn, Result(wcookie, ResultCode.OK), self.now)
        assert [a for a in out if not isinstance(a, Log)] == []
        assert self.board.stats.results_dropped == before + 1

    @precondition(lambda self: any(w.outstanding for w in self.workers.values()))
    @rule(i=st.integers(0, 100), j=st.integers(0, 100), started=st.booleans())
    def worker_progress(self, i: int, j: int, started: bool) -> None:
        busy = [w for _, w in sorted(self.workers.items()) if w.outstanding]
        w = busy[i % len(busy)]
        wcookie = sorted(w.outstanding)[j % len(w.outstanding)]
        self.receive(w.conn, Started(wcookie) if started else Progress(wcookie, "half"))

    @precondition(lambda self: self.clients or self.workers)
    @rule(i=st.integers(0, 100))
    def ping(self, i: int) -> None:
        conns = sorted([*self.clients, *self.workers])
        conn = conns[i % len(conns)]
        peer: ClientModel | WorkerModel = self.clients.get(conn) or self.workers[conn]
        ctx = self.receive(conn, Ping())
        assert ctx.pong == peer.hello

    # -- rules: time and shutdown ------------------------------------------------------

    @rule(dt=st.floats(0.0, 3.0))
    def tick(self, dt: float) -> None:
        self.tick_at(self.now + dt)

    @rule()
    def end_batch(self) -> None:
        # The broker ends a batch once per event-loop turn, when it flushes.
        self.board.end_batch()

    @rule()
    def tick_at_the_wake(self) -> None:
        if self.armed is not None:
            self.tick_at(max(self.now, self.armed))

    def tick_at(self, now: float) -> None:
        self.now = now
        self.armed = None  # the broker re-arms from what tick returns
        self.apply(self.board.tick(now))
        if self.armed is not None:
            assert self.armed > now
        for c in self.clients.values():
            for cookie, p in c.pending.items():
                assert p.deadline is None or p.deadline > now, (
                    f"job {cookie.hex()} is past its deadline {p.deadline} at {now}"
                )

    @precondition(lambda self: not self.draining)
    @rule(roll=st.integers(0, 19))
    def begin_drain(self, roll: int) -> None:
        if roll != 19:
            return  # drain in few runs: nothing is accepted after it
        self.draining = True
        self.apply(self.board.begin_drain())
        assert self.board.queue_depth == 0

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def slots_match_what_workers_hold(self) -> None:
        total = 0
        for w in self.workers.values():
            capacity, busy = self.board.slots(w.conn)
            assert 0 <= busy <= capacity
            assert capacity == w.capacity
            assert busy == len(w.outstanding)
            total += busy
        assert self.board.running == total
        assert self.board.queue_depth >= 0
        assert self.board.live_jobs == self.board.running + self.board.queue_depth

    @invariant()
    def timer_is_armed_for_every_live_deadline(self) -> None:
        for c in self.clients.values():
            for p in c.pending.values():
                if p.deadline is not None:
                    assert self.armed is not None and self.armed <= p.deadline

    @invariant()
    def draining_means_an_empty_queue(self) -> None:
        if self.draining:
            assert self.board.queue_depth == 0

    # -- teardown -------------------------------------------------------------------------

    def teardown(self) -> None:
        if self.finish_at_teardown:
            self.finish()
        else:
            self.settle()

    def finish(self) -> None:
        conns = set(self.clients) | set(self.workers)
        out = self.board.finish()
        closes = {a.conn for a in out if isinstance(a, Close)}
        sends = [a for a in out if not isinstance(a, Close)]
        self.draining = True
        self.apply(sends)
        for c in self.clients.values():
            assert not c.pending, f"finish() left {len(c.pending)} jobs unanswered"
        assert self.board.live_jobs == 0
        assert closes >= conns
        for w in self.workers.values():
            assert self.board.slots(w.conn)[1] == 0

    def settle(self) -> None:
        """Every worker answers everything it holds, time passes (resting legacy slots
        come back), until nothing runs or waits; then time passes every deadline."""
        for _ in range(1000):
            busy = [w for w in self.workers.values() if w.outstanding]
            if not busy:
                if self.board.queue_depth == 0:
                    break
                self.tick_at(self.now + 1.0)
                continue
            for w in busy:
                for wcookie in sorted(w.outstanding):
                    result = "done" if w.codec is Codec.JSON else b"done"
                    w.answer(wcookie, self.now)
                    self.receive(w.conn, Result(wcookie, ResultCode.OK, None, None, result))
        else:
            raise AssertionError("the jobs never ran out")
        self.tick_at(self.now + 1e6)
        for c in self.clients.values():
            assert not c.pending, f"{len(c.pending)} accepted RUNs never got a RESULT"
        assert self.board.queue_depth == 0
        assert self.board.live_jobs == 0


def test_switchboard_invariants() -> None:
    run_state_machine_as_test(
        SwitchboardMachine,
        settings=settings(
            max_examples=200,
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
