"""Pure tests of the switchboard: events in, actions out (PROTOCOL.md sections 5 and 6).

Each test drives a `Switchboard` with packets and times it passes in, and compares
the actions it returns. `H` keeps the bookkeeping short: jobs are tagged by their
`variables` ("job1" for client cookie 1), so a test can say which job a worker
answers without fishing the broker-made worker cookie out by hand.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from reasonbroker._version import __version__
from reasonbroker.core.actions import Action, Close, Log, Send, Wake
from reasonbroker.core.board import Switchboard
from reasonbroker.core.dispatch import _WCOOKIE_BATCH
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.protocol import (
    BadPacket,
    Cancel,
    Codec,
    Hello,
    Packet,
    PacketDecoder,
    Ping,
    Pong,
    Progress,
    Register,
    Result,
    ResultCode,
    Role,
    Run,
    Shutdown,
    Started,
    Unsupported,
    cookie_str,
)
from reasonbroker.core.roles import FEATURES

OK = ResultCode.OK
BOTH = ListenerRole.BOTH
JSON = Codec.JSON
CLIENTS = ListenerRole.CLIENTS
WORKERS = ListenerRole.WORKERS

Row = tuple[Any, ...]


_CLIENT_PREFIX = b"\xcc" * 8  # never a broker-made worker cookie (those start with 8 zeros)


def ck(n: int) -> bytes:
    """Client cookie number n."""
    return _CLIENT_PREFIX + n.to_bytes(8, "big")


def num(cookie: bytes | None) -> int | bytes | None:
    """n for client cookie n; other cookies as they are."""
    if cookie is not None and cookie.startswith(_CLIENT_PREFIX):
        return int.from_bytes(cookie[8:], "big")
    return cookie


def rows(out: list[Action]) -> list[Row]:
    """A readable summary of actions (Log lines left out)."""
    summary: list[Row] = []
    for action in out:
        match action:
            case Send(conn, Result(cookie, rc, _, _, _)):
                summary.append(("RESULT", conn, num(cookie), rc))
            case Send(conn, Run(_, _, variables)):
                summary.append(("RUN", conn, variables))
            case Send(conn, Cancel(cookie)):
                summary.append(("CANCEL", conn, cookie))
            case Send(conn, Started(cookie)):
                summary.append(("STARTED", conn, num(cookie)))
            case Send(conn, Progress(cookie, result)):
                summary.append(("PROGRESS", conn, num(cookie), result))
            case Send(conn, packet):
                summary.append((type(packet).__name__.upper(), conn))
            case Close(conn, _):
                summary.append(("CLOSE", conn))
            case Wake(at):
                summary.append(("WAKE", at))
            case Log():
                pass
    return summary


def results(out: list[Action]) -> list[Result]:
    return [a.packet for a in out if isinstance(a, Send) and isinstance(a.packet, Result)]


class H:
    """A switchboard, a clock and a map from job tag to (worker, worker cookie)."""

    def __init__(self, durable: bool = False, **limits: Any) -> None:
        # Legacy workers' slots rest before reuse (Limits.legacy_slot_reuse_ms); the
        # tests of that rule set it, the others turn it off to keep time out of them.
        limits.setdefault("legacy_slot_reuse_ms", 0)
        self.b = Switchboard(Limits(**limits), durable=durable)
        self.now = 0.0
        self.jobs: dict[str, tuple[int, bytes]] = {}
        self.old: dict[str, list[tuple[int, bytes]]] = {}
        self.last: list[Action] = []
        self._ids = itertools.count(1)
        self.batching = False  # True: packets arrive together, one batch until end_batch

    def _track(self, out: list[Action]) -> list[Row]:
        self.last = out
        for action in out:
            if isinstance(action, Send) and isinstance(action.packet, Run):
                tag = action.packet.variables
                if isinstance(tag, str):
                    if tag in self.jobs:
                        self.old.setdefault(tag, []).append(self.jobs[tag])
                    self.jobs[tag] = (action.conn, action.packet.cookie)
        return rows(out)

    def connect(self, listener: ListenerRole = BOTH, codec: Codec = Codec.MSGPACK) -> int:
        conn = next(self._ids)
        self.b.connect(conn, listener)
        if codec is not Codec.MSGPACK:
            self.b.set_codec(conn, codec)
        return conn

    def feed(self, conn: int, packet: Packet) -> list[Row]:
        rows = self._track(self.b.receive(conn, packet, self.now))
        if not self.batching:
            self.b.end_batch()  # each packet its own read, as a quiet broker sees them
        return rows

    def client(
        self,
        hello: bool = False,
        features: tuple[str, ...] = (),
        codec: Codec = Codec.MSGPACK,
    ) -> int:
        conn = self.connect(BOTH, codec)
        if hello:
            assert self.feed(conn, Hello(Role.CLIENT, features=features)) == [("HELLO", conn)]
        return conn

    def worker(
        self,
        capacity: int = 1,
        pipelines: tuple[str, ...] | None = None,
        hello: bool = False,
        codec: Codec = Codec.MSGPACK,
    ) -> int:
        conn = self.connect(BOTH, codec)
        if hello:
            assert self.feed(conn, Hello(Role.WORKER)) == [("HELLO", conn)]
        self.feed(conn, Register(capacity, pipelines))
        return conn

    def run(
        self,
        conn: int,
        n: int,
        pipeline: str = "p",
        variables: Any = None,
        **kw: Any,
    ) -> list[Row]:
        if variables is None:
            variables = f"job{n}"
        return self.feed(conn, Run(ck(n), pipeline, variables, **kw))

    def cancel(self, conn: int, n: int) -> list[Row]:
        return self.feed(conn, Cancel(ck(n)))

    def wc(self, tag: str) -> bytes:
        return self.jobs[tag][1]

    def answer(
        self, tag: str, rc: ResultCode = OK, result: Any = None, error: str | None = None
    ) -> list[Row]:
        worker, wcookie = self.jobs[tag]
        return self.feed(worker, Result(wcookie, rc, error, None, result))

    def gone(self, conn: int) -> list[Row]:
        return self._track(self.b.disconnect(conn, self.now))

    def tick(self, now: float) -> list[Row]:
        self.now = now
        return self._track(self.b.tick(now))


def sends_to(out: list[Action], conn: int) -> list[Packet]:
    return [a.packet for a in out if isinstance(a, Send) and a.conn == conn]


# ---------------------------------------------------------------------------
# roles


def test_first_register_makes_a_worker() -> None:
    h = H()
    w = h.connect()
    assert h.feed(w, Register(3)) == []
    assert h.b.role_of(w) is Role.WORKER
    assert h.b.workers() == [w]
    assert h.b.slots(w) == (3, 0)


def test_first_run_makes_a_client() -> None:
    h = H()
    w = h.worker()
    c = h.connect()
    assert h.run(c, 1) == [("RUN", w, "job1")]
    assert h.b.role_of(c) is Role.CLIENT
    assert h.b.workers() == [w]


def test_first_cancel_makes_a_client() -> None:
    h = H()
    c = h.connect()
    assert h.cancel(c, 1) == [("RESULT", c, 1, ResultCode.COOKIE_NOT_FOUND)]
    assert h.b.role_of(c) is Role.CLIENT


def test_unknown_conn_role_is_none() -> None:
    assert H().b.role_of(99) is None


def test_hello_worker_is_answered_with_the_brokers_hello() -> None:
    h = H(heartbeat_ms=1234)
    w = h.connect()
    out = h.b.receive(w, Hello(Role.WORKER, features=("started",), name="w1"), 0.0)
    assert [a for a in out if not isinstance(a, Log)] == [
        Send(
            w,
            Hello(role=Role.WORKER, features=FEATURES, version=__version__, heartbeat_ms=1234),
        )
    ]
    assert h.b.role_of(w) is Role.WORKER
    assert h.b.workers() == []  # not a registered worker until REGISTER
    assert h.feed(w, Register(2)) == []
    assert h.b.workers() == [w]


def test_hello_without_role_makes_a_client() -> None:
    h = H()
    c = h.connect()
    out = h.b.receive(c, Hello(), 0.0)
    hello = sends_to(out, c)
    assert len(hello) == 1
    assert isinstance(hello[0], Hello)
    assert hello[0].role is Role.CLIENT
    assert h.b.role_of(c) is Role.CLIENT


def test_features_offered() -> None:
    assert set(FEATURES) >= {"started", "progress"}


@pytest.mark.parametrize(
    ("listener", "packet", "role", "rc", "cookie"),
    [
        (CLIENTS, Register(1), Role.WORKER, ResultCode.EXCEPTION, None),
        (CLIENTS, Hello(Role.WORKER), Role.WORKER, ResultCode.UNAUTHORIZED, None),
        (WORKERS, Run(ck(7), "p"), Role.CLIENT, ResultCode.EXCEPTION, ck(7)),
        (WORKERS, Hello(Role.CLIENT), Role.CLIENT, ResultCode.UNAUTHORIZED, None),
        (WORKERS, Hello(), Role.CLIENT, ResultCode.UNAUTHORIZED, None),
        (WORKERS, Cancel(ck(8)), Role.CLIENT, ResultCode.EXCEPTION, ck(8)),
    ],
    ids=[
        "legacy worker on clients",
        "hello worker on clients",
        "legacy client on workers",
        "hello client on workers",
        "hello no role on workers",
        "legacy cancel on workers",
    ],
)
def test_role_refused_by_the_listener(
    listener: ListenerRole, packet: Packet, role: Role, rc: ResultCode, cookie: bytes | None
) -> None:
    h = H()
    w = h.worker()  # a worker that must not be touched
    conn = h.connect(listener)
    out = h.b.receive(conn, packet, 0.0)
    visible = [a for a in out if not isinstance(a, Log)]
    assert len(visible) == 2
    send, close = visible
    assert isinstance(send, Send)
    assert send.conn == conn
    assert isinstance(send.packet, Result)
    assert send.packet.rc is rc
    assert send.packet.cookie == cookie
    assert send.packet.error is not None
    if rc is ResultCode.EXCEPTION:  # a legacy peer learns the real code from `error`
        assert send.packet.error.startswith("UNAUTHORIZED: ")
    assert isinstance(close, Close)
    assert close.conn == conn
    assert any(isinstance(a, Log) and a.event == "role_refused" for a in out)
    assert h.b.workers() == [w]
    assert h.b.slots(w) == (1, 0)
    assert h.b.live_jobs == 0


@pytest.mark.parametrize(
    ("listener", "packet"),
    [
        (CLIENTS, Run(ck(1), "p")),
        (CLIENTS, Hello(Role.CLIENT)),
        (WORKERS, Register(1)),
        (WORKERS, Hello(Role.WORKER)),
        (BOTH, Register(1)),
        (BOTH, Run(ck(1), "p")),
    ],
)
def test_role_allowed_by_the_listener(listener: ListenerRole, packet: Packet) -> None:
    h = H()
    conn = h.connect(listener)
    out = h.b.receive(conn, packet, 0.0)
    assert not any(isinstance(a, Close) for a in out)
    assert not any(
        isinstance(a, Send)
        and isinstance(a.packet, Result)
        and a.packet.rc is not ResultCode.NO_CAPACITY
        for a in out
    )


def test_second_hello_is_bad_packet() -> None:
    h = H()
    c = h.client(hello=True)
    assert h.feed(c, Hello(Role.CLIENT)) == [("RESULT", c, None, ResultCode.BAD_PACKET)]
    w = h.worker(hello=True)
    assert h.feed(w, Hello(Role.WORKER)) == [("RESULT", w, None, ResultCode.BAD_PACKET)]
    assert h.b.role_of(w) is Role.WORKER


def test_hello_after_run_closes_a_legacy_client() -> None:
    h = H()
    w = h.worker()
    c = h.connect()
    h.run(c, 1)
    # The answer (BAD_PACKET) would carry no cookie, which hangs ReasonChip's
    # client: it is closed instead, and its running job cancelled on the worker.
    assert h.feed(c, Hello(Role.CLIENT, features=("started",))) == [
        ("CLOSE", c),
        ("CANCEL", w, h.wc("job1")),
    ]


def test_hello_after_run_is_bad_packet_for_a_hello_peer() -> None:
    h = H()
    h.worker()
    c = h.client(hello=True)
    assert h.feed(c, Hello(Role.CLIENT)) == [("RESULT", c, None, ResultCode.BAD_PACKET)]


def test_run_from_a_legacy_worker_closes_it() -> None:
    h = H()
    w = h.worker()
    assert h.feed(w, Run(ck(1), "p")) == [("CLOSE", w)]
    assert h.b.stats.bad_packets == 1


def test_run_from_a_hello_worker_is_bad_packet() -> None:
    h = H()
    w = h.worker(hello=True)
    assert h.feed(w, Run(ck(1), "p")) == [("RESULT", w, None, ResultCode.BAD_PACKET)]
    assert h.b.role_of(w) is Role.WORKER


@pytest.mark.parametrize(
    "packet",
    [Register(1), Result(ck(1), OK), Started(ck(1)), Progress(ck(1), "x")],
    ids=repr,
)
def test_worker_packets_from_a_client_are_bad_packet(packet: Packet) -> None:
    h = H()
    w = h.worker()
    c = h.client(hello=True)
    assert h.feed(c, packet) == [("RESULT", c, None, ResultCode.BAD_PACKET)]
    assert h.b.role_of(c) is Role.CLIENT
    assert h.b.workers() == [w]
    assert h.b.stats.bad_packets == 1


def test_cancel_from_a_worker() -> None:
    h = H()
    hw = h.worker(hello=True)
    lw = h.worker()
    assert h.feed(hw, Cancel(ck(1))) == [("RESULT", hw, None, ResultCode.BAD_PACKET)]
    assert h.feed(lw, Cancel(ck(1))) == [("CLOSE", lw)]


def test_ping_is_answered_only_for_hello_peers() -> None:
    h = H()
    hc = h.client(hello=True)
    assert h.feed(hc, Ping()) == [("PONG", hc)]
    lw = h.worker()
    assert h.feed(lw, Ping()) == []
    lc = h.connect()
    assert h.feed(lc, Ping()) == []
    assert h.feed(hc, Pong()) == []


# ---------------------------------------------------------------------------
# dispatch


def test_round_robin_among_equals() -> None:
    h = H()
    ws = [h.worker(10) for _ in range(3)]
    c = h.client()
    dispatched = []
    for n in range(9):
        out = h.run(c, n)
        assert len(out) == 1
        assert out[0][0] == "RUN"
        dispatched.append(out[0][1])
    assert dispatched == ws * 3
    assert [h.b.slots(w) for w in ws] == [(10, 3)] * 3


def test_least_loaded_by_busy_over_capacity() -> None:
    h = H()
    w1 = h.worker(2)
    w2 = h.worker(4)
    c = h.client()
    order = [h.run(c, n)[0][1] for n in range(6)]
    # 0/2=0/4 -> w1 (first); then w2 (0/4 < 1/2); w2 (1/4 < 1/2); tie 1/2=2/4 -> w1
    # (least recently used); then w2, w2 (w1 is full)
    assert order == [w1, w2, w2, w1, w2, w2]
    assert h.b.slots(w1) == (2, 2)
    assert h.b.slots(w2) == (4, 4)


def test_a_batch_stays_on_one_worker_within_the_slack() -> None:
    h = H(dispatch_batch_slack=0.25)
    w1, w2 = h.worker(8), h.worker(8)
    c = h.client()
    h.batching = True
    # Slack 0.25 x 8 = 2: w1 takes jobs while its load is <= 2 above w2's (0).
    order = [h.run(c, n)[0][1] for n in range(4)]
    assert order == [w1, w1, w1, w2]
    # The batch now stays on w2, whose load (1) is within the slack of w1's (3).
    assert [h.run(c, n)[0][1] for n in range(4, 8)] == [w2, w2, w2, w2]
    assert h.b.slots(w1) == (8, 3)
    assert h.b.slots(w2) == (8, 5)
    # A new batch starts from the least-loaded worker again.
    h.b.end_batch()
    assert h.run(c, 8)[0][1] == w1


def test_a_batch_never_overfills_the_worker_it_stays_on() -> None:
    h = H(dispatch_batch_slack=1.0)
    w1, w2 = h.worker(2), h.worker(2)
    c = h.client()
    h.batching = True
    assert [h.run(c, n)[0][1] for n in range(4)] == [w1, w1, w2, w2]
    assert h.run(c, 4) == []  # queued: both full
    assert h.b.queue_depth == 1


def test_zero_slack_is_least_loaded_within_a_batch() -> None:
    h = H(dispatch_batch_slack=0)
    ws = [h.worker(8) for _ in range(3)]
    c = h.client()
    h.batching = True
    assert [h.run(c, n)[0][1] for n in range(6)] == ws * 2


def test_a_batch_does_not_stay_on_a_worker_that_left() -> None:
    h = H(dispatch_batch_slack=1.0, default_max_attempts=2)
    w1, w2 = h.worker(8), h.worker(8)
    c = h.client()
    h.batching = True
    assert h.run(c, 0)[0][1] == w1
    h.gone(w1)  # job0 is re-run on w2
    assert h.jobs["job0"][0] == w2
    assert h.run(c, 1)[0][1] == w2
    assert h.b.slots(w2) == (8, 2)


def test_a_batch_does_not_stay_on_a_worker_that_does_not_serve_the_pipeline() -> None:
    h = H(dispatch_batch_slack=1.0)
    wa = h.worker(8, pipelines=("a",))
    wb = h.worker(8, pipelines=("b",))
    c = h.client()
    h.batching = True
    assert h.run(c, 0, pipeline="a")[0][1] == wa
    assert h.run(c, 1, pipeline="b")[0][1] == wb
    assert h.run(c, 2, pipeline="a")[0][1] == wa


def test_freed_slot_makes_a_worker_least_loaded_again() -> None:
    h = H()
    w1 = h.worker(2)
    w2 = h.worker(2)
    c = h.client()
    for n in range(4):
        h.run(c, n)
    assert h.answer("job0") == [("RESULT", c, 0, OK)]  # w1 has 1 busy, w2 has 2
    assert h.run(c, 10) == [("RUN", w1, "job10")]
    assert h.b.slots(w2) == (2, 2)


def test_pipelines_filter() -> None:
    h = H()
    wa = h.worker(5, ("a",))
    wb = h.worker(5, ("b", "c"))
    c = h.client()
    assert h.run(c, 1, "a") == [("RUN", wa, "job1")]
    assert h.run(c, 2, "b") == [("RUN", wb, "job2")]
    assert h.run(c, 3, "c") == [("RUN", wb, "job3")]
    assert h.run(c, 4, "d") == [("RESULT", c, 4, ResultCode.NO_CAPACITY)]
    assert h.b.stats.rejected["NO_CAPACITY"] == 1


def test_worker_without_pipelines_serves_all() -> None:
    h = H()
    wa = h.worker(5, ("a",))
    wall = h.worker(5)
    c = h.client()
    assert h.run(c, 1, "zzz") == [("RUN", wall, "job1")]
    assert h.run(c, 2, "a") == [("RUN", wa, "job2")]  # wa is less recently used


def test_run_to_worker_carries_only_cookie_pipeline_variables() -> None:
    h = H()
    w = h.worker()
    c = h.client()
    out = h.b.receive(c, Run(ck(1), "p", "v", True, 5, 1000, 3), 0.0)
    runs = sends_to(out, w)
    assert len(runs) == 1
    run = runs[0]
    assert isinstance(run, Run)
    assert run == Run(run.cookie, "p", "v")
    assert run.cookie != ck(1)  # the broker makes the worker leg's cookie


def test_repeated_register_adds_capacity_and_unions_pipelines() -> None:
    h = H()
    w = h.worker(1, ("a",))
    assert h.feed(w, Register(2, ("b",))) == []
    assert h.b.slots(w) == (3, 0)
    c = h.client()
    assert h.run(c, 1, "a") == [("RUN", w, "job1")]
    assert h.run(c, 2, "b") == [("RUN", w, "job2")]
    assert h.run(c, 3, "c") == [("RESULT", c, 3, ResultCode.NO_CAPACITY)]
    h.feed(w, Register(1))  # no pipelines: the set stays (docs/protocol.md)
    assert h.b.slots(w) == (4, 2)
    assert h.run(c, 4, "c") == [("RESULT", c, 4, ResultCode.NO_CAPACITY)]


def test_naming_pipelines_later_narrows_a_serve_all_worker() -> None:
    # docs/protocol.md: a worker that never named a pipeline serves all; REGISTER
    # adds its pipelines to the worker's set.
    h = H()
    w = h.worker(1)
    h.feed(w, Register(1, ("a",)))
    c = h.client()
    assert h.run(c, 1, "a") == [("RUN", w, "job1")]
    assert h.run(c, 2, "b") == [("RESULT", c, 2, ResultCode.NO_CAPACITY)]


def test_narrowing_register_does_not_strand_queued_jobs() -> None:
    # Jobs queued for a pipeline the narrowed worker no longer serves (and nobody
    # else does) are answered NO_CAPACITY, as a RUN for it would be.
    h = H()
    w = h.worker(1)
    c = h.client()
    assert h.run(c, 1, "a") == [("RUN", w, "job1")]
    assert h.run(c, 2, "b") == []  # queued: w serves all
    assert h.run(c, 3, "a") == []
    assert h.feed(w, Register(1, ("a",))) == [
        ("RUN", w, "job3"),
        ("RESULT", c, 2, ResultCode.NO_CAPACITY),
    ]
    assert h.b.queue_depth == 0


def test_narrowing_register_keeps_jobs_another_worker_serves() -> None:
    h = H()
    w = h.worker(1)
    wb = h.worker(1, ("b",))
    c = h.client()
    h.run(c, 1, "b")
    h.run(c, 2, "b")
    assert h.run(c, 3, "b") == []  # queued
    assert h.feed(w, Register(1, ("a",))) == []
    assert h.b.queue_depth == 1
    assert h.answer("job2")[1] == ("RUN", wb, "job3")


def test_max_worker_capacity_clamps() -> None:
    h = H(max_worker_capacity=5)
    w = h.connect()
    out = h.b.receive(w, Register(100), 0.0)
    assert h.b.slots(w) == (5, 0)
    assert any(isinstance(a, Log) and a.event == "capacity_clamped" for a in out)
    w2 = h.worker(3)
    h.feed(w2, Register(4))
    assert h.b.slots(w2) == (5, 0)


def test_register_with_huge_capacity_is_clamped() -> None:
    h = H(max_worker_capacity=8)
    w = h.worker(10**30)
    assert h.b.slots(w) == (8, 0)


# ---------------------------------------------------------------------------
# legacy slot rest (Limits.legacy_slot_reuse_ms, docs/protocol.md "Legacy workers"):
# for ReasonChip's worker, JSON without HELLO; JSON = Codec.JSON


def test_legacy_slot_rests_before_reuse() -> None:
    h = H(legacy_slot_reuse_ms=50)
    w = h.worker(1, codec=JSON)
    c = h.client()
    h.now = 10.0
    h.run(c, 1)
    assert h.run(c, 2) == []  # queued
    assert h.answer("job1") == [("RESULT", c, 1, OK), ("WAKE", 10.05)]
    assert h.b.slots(w) == (1, 0)
    assert h.tick(10.04) == [("WAKE", 10.05)]
    assert h.tick(10.05) == [("RUN", w, "job2")]


def test_hello_worker_slot_is_refilled_at_once() -> None:
    h = H(legacy_slot_reuse_ms=50)
    w = h.worker(1, hello=True)
    c = h.client()
    h.run(c, 1)
    h.run(c, 2)
    assert h.answer("job1") == [("RESULT", c, 1, OK), ("RUN", w, "job2")]


def test_msgpack_worker_without_hello_is_refilled_at_once() -> None:
    # The rest is for ReasonChip's JSON worker; a msgpack worker that REGISTERs
    # without HELLO gets its next RUN in the same actions as its RESULT's answer.
    h = H(legacy_slot_reuse_ms=50)
    w = h.worker(1)
    c = h.client()
    h.run(c, 1)
    assert h.run(c, 2) == []  # queued
    assert h.answer("job1") == [("RESULT", c, 1, OK), ("RUN", w, "job2")]
    assert h.b.slots(w) == (1, 1)


def test_json_worker_with_hello_is_refilled_at_once() -> None:
    h = H(legacy_slot_reuse_ms=50)
    w = h.worker(1, hello=True, codec=JSON)
    c = h.client()
    h.run(c, 1)
    h.run(c, 2)
    assert h.answer("job1") == [("RESULT", c, 1, OK), ("RUN", w, "job2")]


def test_resting_slot_is_not_free_for_a_new_run() -> None:
    h = H(legacy_slot_reuse_ms=50, queue_limit=0)
    w = h.worker(1, codec=JSON)
    c = h.client()
    h.run(c, 1)
    h.answer("job1")
    assert h.run(c, 2) == [("RESULT", c, 2, ResultCode.NO_CAPACITY)]
    assert h.tick(0.05) == []
    assert h.run(c, 3) == [("RUN", w, "job3")]


def test_resting_slot_counts_as_load() -> None:
    h = H(legacy_slot_reuse_ms=50)
    legacy = h.worker(2, codec=JSON)
    ours = h.worker(2, hello=True)
    c = h.client()
    assert h.run(c, 1) == [("RUN", legacy, "job1")]
    h.answer("job1")  # legacy: 0 busy + 1 resting of 2; ours: 0 of 2, used less recently
    assert h.run(c, 2) == [("RUN", ours, "job2")]
    assert h.run(c, 3) == [("RUN", legacy, "job3")]  # 1/2 each: least recently used


def test_resting_worker_that_leaves_is_forgotten() -> None:
    h = H(legacy_slot_reuse_ms=50)
    w = h.worker(1, codec=JSON)
    c = h.client()
    h.run(c, 1)
    h.answer("job1")
    h.gone(w)
    w2 = h.connect()
    assert h.tick(0.05) == []
    assert h.b.workers() == []
    h.feed(w2, Register(1))
    assert h.b.slots(w2) == (1, 0)


def test_said_hello() -> None:
    h = H()
    hc = h.client(hello=True)
    lc = h.client()
    h.run(lc, 1)
    assert h.b.said_hello(hc)
    assert not h.b.said_hello(lc)
    assert not h.b.said_hello(999)


# ---------------------------------------------------------------------------
# queue


def test_queue_limit_zero_is_no_capacity_when_no_slot_is_free() -> None:
    h = H(queue_limit=0)
    w = h.worker(1)
    c = h.client()
    assert h.run(c, 1) == [("RUN", w, "job1")]
    assert h.run(c, 2) == [("RESULT", c, 2, ResultCode.NO_CAPACITY)]
    assert results(h.last)[0].error == "no free worker slot"
    assert h.b.queue_depth == 0
    assert h.b.live_jobs == 1


def test_queue_limit_n() -> None:
    h = H(queue_limit=2)
    w = h.worker(1)
    c = h.client()
    assert h.run(c, 1) == [("RUN", w, "job1")]
    assert h.run(c, 2) == []
    assert h.run(c, 3) == []
    assert h.b.queue_depth == 2
    assert h.run(c, 4) == [("RESULT", c, 4, ResultCode.NO_CAPACITY)]
    assert results(h.last)[0].error == "the queue is full"
    assert h.b.queue_depth == 2
    assert h.b.live_jobs == 3
    assert h.b.stats.accepted == 3


def test_no_worker_serves_the_pipeline_even_with_queue_room() -> None:
    h = H(queue_limit=10)
    h.worker(1, ("a",))
    c = h.client()
    assert h.run(c, 1, "b") == [("RESULT", c, 1, ResultCode.NO_CAPACITY)]
    assert h.b.queue_depth == 0


def test_no_workers_at_all_is_no_capacity() -> None:
    h = H()
    c = h.client()
    assert h.run(c, 1) == [("RESULT", c, 1, ResultCode.NO_CAPACITY)]
    assert h.b.live_jobs == 0


def test_queue_order_is_priority_then_arrival() -> None:
    h = H()
    w = h.worker(1)
    c = h.client()
    h.run(c, 0)
    for n, prio in [(1, 0), (2, 5), (3, 5), (4, -1), (5, 0), (6, 9)]:
        assert h.run(c, n, priority=prio) == []
    order = []
    tag = "job0"
    for _ in range(6):
        out = h.answer(tag)
        assert out[0][0] == "RESULT"
        assert len(out) == 2
        assert out[1][:2] == ("RUN", w)
        tag = out[1][2]
        order.append(tag)
    assert order == ["job6", "job2", "job3", "job1", "job5", "job4"]
    assert h.answer(tag) == [("RESULT", c, 4, OK)]
    assert h.b.queue_depth == 0


def test_freed_slot_takes_the_best_job_it_serves() -> None:
    h = H()
    wa = h.worker(1, ("a",))
    wb = h.worker(1, ("b",))
    c = h.client()
    h.run(c, 1, "a")
    h.run(c, 2, "b")
    assert h.run(c, 3, "b", priority=9) == []
    assert h.run(c, 4, "a", priority=0) == []
    assert h.answer("job1") == [("RESULT", c, 1, OK), ("RUN", wa, "job4")]
    assert h.answer("job2") == [("RESULT", c, 2, OK), ("RUN", wb, "job3")]


def test_serve_all_worker_takes_the_best_job_across_pipelines() -> None:
    h = H()
    w = h.worker(1)
    c = h.client()
    h.run(c, 1, "a")
    h.run(c, 2, "a", priority=1)
    h.run(c, 3, "b", priority=2)
    h.run(c, 4, "c", priority=2)
    assert h.answer("job1")[1] == ("RUN", w, "job3")
    assert h.answer("job3")[1] == ("RUN", w, "job4")
    assert h.answer("job4")[1] == ("RUN", w, "job2")


def test_registering_more_capacity_drains_the_queue() -> None:
    h = H()
    w = h.worker(1)
    c = h.client()
    for n in range(4):
        h.run(c, n)
    assert h.b.queue_depth == 3
    assert h.feed(w, Register(2)) == [("RUN", w, "job1"), ("RUN", w, "job2")]
    assert h.b.queue_depth == 1
    w2 = h.worker(5)
    assert h.last and rows(h.last) == [("RUN", w2, "job3")]
    assert h.b.queue_depth == 0


def test_max_inflight_per_client() -> None:
    h = H(max_inflight_per_client=2)
    h.worker(10)
    c = h.client()
    other = h.client()
    h.run(c, 1)
    h.run(c, 2)
    assert h.run(c, 3) == [("RESULT", c, 3, ResultCode.NO_CAPACITY)]
    assert h.run(other, 3)[0][0] == "RUN"  # per client
    h.answer("job1")
    assert h.run(c, 4)[0][0] == "RUN"


# ---------------------------------------------------------------------------
# cookies


def test_cookie_collision_for_a_live_cookie_of_the_same_client() -> None:
    h = H()
    w = h.worker(1)
    c = h.client()
    h.run(c, 1)  # running
    h.run(c, 2)  # queued
    assert h.run(c, 1) == [("RESULT", c, 1, ResultCode.COOKIE_COLLISION)]
    assert h.run(c, 2) == [("RESULT", c, 2, ResultCode.COOKIE_COLLISION)]
    assert h.b.stats.rejected["COOKIE_COLLISION"] == 2
    assert h.b.live_jobs == 2
    # once ended, the cookie is free again
    assert h.answer("job1") == [("RESULT", c, 1, OK), ("RUN", w, "job2")]
    assert h.run(c, 1) == []


def test_a_live_cookie_is_taken_for_every_client() -> None:
    # A cookie names one job across connections (docs/durability.md: it is
    # the job's capability for ATTACH); it is free again once the job ended
    # and (without a journal, not detached) its result is not retained.
    h = H()
    w = h.worker(2)
    c1 = h.client()
    c2 = h.client()
    assert h.run(c1, 1, variables="from c1") == [("RUN", w, "from c1")]
    assert h.run(c2, 1, variables="from c2") == [("RESULT", c2, 1, ResultCode.COOKIE_COLLISION)]
    assert h.answer("from c1", result="r1") == [("RESULT", c1, 1, OK)]
    assert results(h.last) == [Result(ck(1), OK, None, None, "r1")]
    assert h.run(c2, 1, variables="from c2") == [("RUN", w, "from c2")]
    assert h.answer("from c2", result="r2") == [("RESULT", c2, 1, OK)]


def test_cancel_unknown_cookie() -> None:
    h = H()
    h.worker()
    c = h.client()
    assert h.cancel(c, 5) == [("RESULT", c, 5, ResultCode.COOKIE_NOT_FOUND)]


def test_a_client_cannot_cancel_another_clients_job() -> None:
    h = H()
    w = h.worker(1)
    a = h.client()
    b = h.client()
    h.run(a, 1)
    h.run(a, 2)  # queued
    assert h.cancel(b, 1) == [("RESULT", b, 1, ResultCode.COOKIE_NOT_FOUND)]
    assert h.cancel(b, 2) == [("RESULT", b, 2, ResultCode.COOKIE_NOT_FOUND)]
    assert h.b.queue_depth == 1
    assert h.answer("job1") == [("RESULT", a, 1, OK), ("RUN", w, "job2")]
    assert h.answer("job2") == [("RESULT", a, 2, OK)]


def test_result_with_unknown_cookie_from_a_worker_is_dropped() -> None:
    h = H()
    w = h.worker(hello=True)
    lw = h.worker()
    assert h.feed(w, Result(ck(99), OK)) == []
    assert h.feed(lw, Result(ck(99), OK)) == []
    assert h.feed(w, Result(None, OK)) == []
    assert h.b.stats.results_dropped == 3


def test_duplicate_result_is_dropped() -> None:
    h = H()
    w = h.worker(1)
    c = h.client()
    h.run(c, 1)
    assert h.answer("job1") == [("RESULT", c, 1, OK)]
    assert h.answer("job1") == []
    assert h.b.stats.results_dropped == 1
    assert h.b.slots(w) == (1, 0)


def test_result_for_another_workers_cookie_is_dropped() -> None:
    h = H()
    w1 = h.worker(1)
    w2 = h.worker(1)
    c = h.client()
    h.run(c, 1)
    h.run(c, 2)
    assert h.jobs["job1"][0] == w1
    assert h.feed(w2, Result(h.wc("job1"), OK)) == []
    assert h.b.stats.results_dropped == 1
    assert h.b.slots(w1) == (1, 1)
    assert h.b.slots(w2) == (1, 1)
    assert h.answer("job1") == [("RESULT", c, 1, OK)]


def test_worker_cookies_are_fresh_per_dispatch() -> None:
    h = H()
    h.worker(3)
    c = h.client()
    for n in range(3):
        h.run(c, n)
    cookies = {h.wc(f"job{n}") for n in range(3)}
    assert len(cookies) == 3
    assert all(len(x) == 16 for x in cookies)
    assert not cookies & {ck(n) for n in range(3)}


def test_cookie_prefix_must_be_8_bytes() -> None:
    with pytest.raises(ValueError):
        Switchboard(Limits(), cookie_prefix=b"short")
    b = Switchboard(Limits(), cookie_prefix=b"PREFIX!!")
    b.connect(1, BOTH)
    b.connect(2, BOTH)
    b.receive(1, Register(1), 0.0)
    runs = sends_to(b.receive(2, Run(ck(1), "p"), 0.0), 1)
    assert isinstance(runs[0], Run)
    assert runs[0].cookie.startswith(b"PREFIX!!")


def test_worker_cookies_are_the_prefix_and_a_sequence_number_across_batches() -> None:
    # Cookies are packed a batch at a time; across batch boundaries they must
    # stay the prefix and the next number, so no two attempts ever share one.
    b = Switchboard(Limits(), cookie_prefix=b"PREFIX!!")
    b.connect(1, BOTH)
    b.connect(2, BOTH)
    b.receive(1, Register(1000), 0.0)
    n = 2 * _WCOOKIE_BATCH + 3
    runs = sends_to(b.receive_all(2, [Run(ck(i), "p") for i in range(n)], 0.0), 1)
    assert [r.cookie for r in runs if isinstance(r, Run)] == [
        b"PREFIX!!" + i.to_bytes(8, "big") for i in range(1, n + 1)
    ]


def _two_boards() -> tuple[Switchboard, Switchboard]:
    """Two switchboards in the same state: a client (2), a legacy worker (1)
    with two slots and a HELLO'd worker (3) with one, one job running on 1."""
    boards = (Switchboard(Limits()), Switchboard(Limits()))
    for b in boards:
        for conn in (1, 2, 3):
            b.connect(conn, BOTH)
        b.receive(1, Register(2), 0.0)
        b.receive(3, Hello(role=Role.WORKER), 0.0)
        b.receive(3, Register(1), 0.0)
        b.receive(2, Hello(role=Role.CLIENT), 0.0)
        b.receive(2, Run(ck(100), "p"), 0.0)
    return boards


@pytest.mark.parametrize(
    ("conn", "packets"),
    [
        # A client's burst: dispatched, queued, a collision, a cancel.
        (2, [Run(ck(1), "p"), Run(ck(2), "p"), Run(ck(2), "p"), Cancel(ck(1)), Ping()]),
        # A legacy worker's RESULT, then a RUN (closes it), then packets that
        # must not be acted on: its second RESULT and a REGISTER.
        (
            1,
            [
                Result(b"\x00" * 8 + (1).to_bytes(8, "big"), OK),
                Run(ck(9), "p"),
                Result(b"\x00" * 8 + (1).to_bytes(8, "big"), OK),
                Register(5),
            ],
        ),
        # A HELLO'd worker answering a cookie it never had, then registering more.
        (3, [Result(ck(7), OK), Register(2), Ping()]),
    ],
    ids=["client", "legacy worker closed midway", "worker"],
)
def test_receive_all_is_receive_one_packet_at_a_time(conn: int, packets: list[Packet]) -> None:
    together, one_by_one = _two_boards()
    expected: list[Action] = []
    for packet in packets:
        expected += one_by_one.receive(conn, packet, 1.0)
    assert together.receive_all(conn, packets, 1.0) == expected
    assert together.status_snapshot() == one_by_one.status_snapshot()
    assert together.stats == one_by_one.stats


# ---------------------------------------------------------------------------
# cancel


def test_cancel_a_queued_job() -> None:
    h = H()
    w = h.worker(1)
    c = h.client(hello=True)
    h.run(c, 1)
    h.run(c, 2)
    assert h.cancel(c, 2) == [("RESULT", c, 2, ResultCode.CANCELLED)]
    assert results(h.last) == [Result(ck(2), ResultCode.CANCELLED, "cancelled by client")]
    assert h.b.queue_depth == 0
    assert h.b.live_jobs == 1
    assert h.answer("job1") == [("RESULT", c, 1, OK)]  # job2 is never dispatched
    assert h.b.slots(w) == (1, 0)
    assert h.cancel(c, 2) == [("RESULT", c, 2, ResultCode.COOKIE_NOT_FOUND)]


def test_cancel_a_running_job_forwards_cancel_and_delivers_the_workers_result() -> None:
    h = H(cancel_grace_ms=2000)
    w = h.worker(1)
    c = h.client(hello=True)
    h.now = 10.0
    h.run(c, 1)
    assert h.cancel(c, 1) == [("CANCEL", w, h.wc("job1")), ("WAKE", 12.0)]
    assert h.cancel(c, 1) == []  # a second CANCEL is not forwarded again
    out = h.answer("job1", ResultCode.PROCESSOR_EXCEPTION, error="stopped")
    assert out == [("RESULT", c, 1, ResultCode.PROCESSOR_EXCEPTION)]
    assert results(h.last)[0].error == "stopped"
    assert h.b.slots(w) == (1, 0)
    assert h.tick(12.0) == []  # the grace deadline finds the job done
    assert h.b.live_jobs == 0


def test_cancel_grace_passes() -> None:
    h = H(cancel_grace_ms=1000)
    w = h.worker(1)
    c = h.client(hello=True)
    h.run(c, 1)
    h.run(c, 2)  # queued behind job1
    h.cancel(c, 1)
    assert h.tick(0.999) == [("WAKE", 1.0)]
    assert h.tick(1.0) == [("RESULT", c, 1, ResultCode.CANCELLED)]
    assert h.b.slots(w) == (1, 1)  # the worker is still busy with it
    assert h.b.queue_depth == 1
    assert h.cancel(c, 1) == [("RESULT", c, 1, ResultCode.COOKIE_NOT_FOUND)]
    # its late answer is not delivered; it frees the slot for job2
    assert h.answer("job1") == [("RUN", w, "job2")]
    assert h.b.stats.abandoned_results == 1
    assert h.answer("job2") == [("RESULT", c, 2, OK)]


def test_cancelled_cookie_is_reusable_while_the_old_attempt_still_runs() -> None:
    h = H(cancel_grace_ms=1000)
    w = h.worker(2)
    c = h.client(hello=True)
    h.run(c, 1, variables="old")
    h.cancel(c, 1)
    h.tick(1.0)
    assert h.run(c, 1, variables="new") == [("RUN", w, "new")]
    assert h.answer("old") == []  # never mistaken for the new job's answer
    assert h.answer("new") == [("RESULT", c, 1, OK)]


def test_legacy_client_gets_cancelled_as_exception() -> None:
    h = H(cancel_grace_ms=1000)
    h.worker(1)
    c = h.client()
    h.run(c, 1)
    h.run(c, 2)
    assert results(h.b.receive(c, Cancel(ck(2)), 0.0)) == [
        Result(ck(2), ResultCode.EXCEPTION, "CANCELLED: cancelled by client")
    ]
    h.cancel(c, 1)
    assert results(h.b.tick(1.0)) == [
        Result(ck(1), ResultCode.EXCEPTION, "CANCELLED: cancelled by client")
    ]


# ---------------------------------------------------------------------------
# detach


def test_detached_job_gets_no_result_and_its_result_is_retained() -> None:
    h = H()
    w = h.worker(2)
    c = h.client()
    assert h.run(c, 1, detach=True) == [("RUN", w, "job1")]
    assert h.run(c, 1) == [("RESULT", c, 1, ResultCode.COOKIE_COLLISION)]
    assert h.answer("job1", result="r") == []
    assert h.b.live_jobs == 0
    assert h.b.stats.completed["OK"] == 1
    # Its RESULT is kept for ATTACH, so the cookie stays taken until it expires.
    assert h.run(c, 1) == [("RESULT", c, 1, ResultCode.COOKIE_COLLISION)]
    assert len(h.b.retained) == 1


def test_detached_refusal_is_still_answered() -> None:
    h = H(queue_limit=0)
    c = h.client()
    assert h.run(c, 1, detach=True) == [("RESULT", c, 1, ResultCode.NO_CAPACITY)]


def test_cancel_a_detached_job() -> None:
    h = H()
    w = h.worker(1)
    c = h.client()
    h.run(c, 1, detach=True)
    h.run(c, 2, detach=True)  # queued
    assert h.cancel(c, 2) == []  # cancelled, but a detached job is never answered
    assert h.b.queue_depth == 0
    assert h.cancel(c, 1) == [("CANCEL", w, h.wc("job1")), ("WAKE", 5.0)]
    assert h.tick(5.0) == []
    assert h.answer("job1") == []
    assert h.b.live_jobs == 0


def test_detached_job_survives_client_disconnect() -> None:
    h = H()
    w = h.worker(1)
    c = h.client()
    h.run(c, 1, detach=True)
    h.run(c, 2, detach=True)  # queued
    h.run(c, 3)  # queued, not detached: dropped
    assert h.gone(c) == []  # no CANCEL for detached jobs
    assert h.b.live_jobs == 2
    assert h.answer("job1") == [("RUN", w, "job2")]
    assert h.answer("job2") == []
    assert h.b.live_jobs == 0
    assert h.b.slots(w) == (1, 0)


# ---------------------------------------------------------------------------
# client gone


def test_client_gone_drops_queued_and_cancels_running() -> None:
    h = H()
    w = h.worker(2)
    other = h.client()
    c = h.client()
    h.run(c, 1)
    h.run(other, 2)
    h.run(c, 3)  # queued
    h.run(c, 4)  # queued
    h.run(other, 5)  # queued behind c's jobs
    assert h.b.queue_depth == 3
    assert h.gone(c) == [("CANCEL", w, h.wc("job1"))]
    assert h.b.queue_depth == 1
    assert h.b.slots(w) == (2, 2)  # held until the worker answers
    assert h.b.stats.dropped == 3
    assert h.answer("job1") == [("RUN", w, "job5")]  # job3/job4 never dispatched
    assert h.answer("job2") == [("RESULT", other, 2, OK)]
    assert h.answer("job5") == [("RESULT", other, 5, OK)]
    assert h.b.live_jobs == 0
    assert "job3" not in h.jobs
    assert "job4" not in h.jobs


def test_client_gone_after_cancel_sends_no_second_cancel() -> None:
    h = H()
    h.worker(1)
    c = h.client()
    h.run(c, 1)
    h.cancel(c, 1)
    assert h.gone(c) == []
    assert h.answer("job1") == []
    assert h.b.live_jobs == 0


def test_disconnect_unknown_conn_is_a_no_op() -> None:
    h = H()
    assert h.b.disconnect(42, 0.0) == []
    c = h.connect()
    assert h.gone(c) == []  # never said anything
    assert h.gone(c) == []  # twice


def test_connect_twice_is_an_error() -> None:
    h = H()
    c = h.connect()
    with pytest.raises(ValueError):
        h.b.connect(c, BOTH)


# ---------------------------------------------------------------------------
# worker gone


def test_worker_gone_requeues_to_an_idle_worker() -> None:
    h = H()
    w1 = h.worker(1)
    c = h.client()
    h.run(c, 1, max_attempts=2)
    w2 = h.worker(1)
    old = h.wc("job1")
    assert h.gone(w1) == [("RUN", w2, "job1")]
    new = h.wc("job1")
    assert new != old
    assert h.b.stats.requeued == 1
    assert h.feed(w2, Result(old, OK)) == []  # the old attempt's cookie means nothing
    assert h.b.stats.results_dropped == 1
    assert h.b.slots(w2) == (1, 1)
    assert h.answer("job1") == [("RESULT", c, 1, OK)]


def test_worker_gone_requeues_behind_a_busy_worker() -> None:
    h = H()
    w1 = h.worker(1)
    w2 = h.worker(1)
    c = h.client()
    h.run(c, 1, max_attempts=2)
    h.run(c, 2)
    assert [h.jobs["job1"][0], h.jobs["job2"][0]] == [w1, w2]
    assert h.gone(w1) == []
    assert h.b.queue_depth == 1
    assert h.answer("job2") == [("RESULT", c, 2, OK), ("RUN", w2, "job1")]
    assert h.answer("job1") == [("RESULT", c, 1, OK)]


def test_default_max_attempts_from_limits() -> None:
    h = H(default_max_attempts=2)
    w1 = h.worker(1)
    c = h.client()
    h.run(c, 1)
    w2 = h.worker(1)
    assert h.gone(w1) == [("RUN", w2, "job1")]
    assert h.gone(w2) == [("RESULT", c, 1, ResultCode.WORKER_WENT_AWAY)]
    assert results(h.last)[0].error == "the worker went away (attempt 2 of 2)"


def test_max_attempts_is_clamped_to_the_limit() -> None:
    h = H(max_attempts_limit=2)
    ws = [h.worker(1) for _ in range(4)]
    c = h.client()
    h.run(c, 1, max_attempts=5)
    assert h.jobs["job1"][0] == ws[0]
    assert h.gone(ws[0]) == [("RUN", ws[1], "job1")]
    assert h.gone(ws[1]) == [("RESULT", c, 1, ResultCode.WORKER_WENT_AWAY)]


def test_attempts_exhausted_is_worker_went_away() -> None:
    h = H()
    w1 = h.worker(1)
    h.worker(1)
    c = h.client()
    h.run(c, 1)
    assert h.gone(w1) == [("RESULT", c, 1, ResultCode.WORKER_WENT_AWAY)]
    assert results(h.last)[0].error == "the worker went away (attempt 1 of 1)"
    assert h.b.live_jobs == 0


def test_job_with_a_cancel_pending_is_cancelled_not_requeued() -> None:
    h = H()
    w1 = h.worker(1)
    h.worker(1)
    c = h.client(hello=True)
    h.run(c, 1, max_attempts=3)
    h.cancel(c, 1)
    assert h.gone(w1) == [("RESULT", c, 1, ResultCode.CANCELLED)]
    assert h.b.live_jobs == 0
    assert h.tick(100.0) == []


def test_timed_out_job_is_not_requeued_when_its_worker_leaves() -> None:
    h = H()
    w1 = h.worker(1)
    w2 = h.worker(1)
    c = h.client()
    h.run(c, 1, max_attempts=3, timeout_ms=1000)
    h.tick(1.0)
    assert h.gone(w1) == []
    assert h.b.live_jobs == 0
    assert h.b.slots(w2) == (1, 0)


def test_last_worker_for_a_pipeline_leaves() -> None:
    h = H()
    wa = h.worker(1, ("a",))
    wb = h.worker(1, ("b",))
    c = h.client()
    h.run(c, 1, "a", max_attempts=3)
    h.run(c, 2, "a")  # queued
    h.run(c, 3, "b")
    h.run(c, 4, "b")  # queued, another pipeline
    out = h.gone(wa)
    assert out == [
        ("RESULT", c, 1, ResultCode.WORKER_WENT_AWAY),
        ("RESULT", c, 2, ResultCode.NO_CAPACITY),
    ]
    assert h.b.queue_depth == 1
    assert h.answer("job3") == [("RESULT", c, 3, OK), ("RUN", wb, "job4")]


def test_worker_gone_jobs_in_seq_order_to_other_workers() -> None:
    h = H()
    w1 = h.worker(3)
    c = h.client()
    for n in range(3):
        h.run(c, n, max_attempts=2)
    w2 = h.worker(2)
    assert h.gone(w1) == [("RUN", w2, "job0"), ("RUN", w2, "job1")]
    assert h.b.queue_depth == 1
    assert h.answer("job0") == [("RESULT", c, 0, OK), ("RUN", w2, "job2")]


# ---------------------------------------------------------------------------
# deadlines


def test_timeout_of_a_queued_job() -> None:
    h = H()
    h.worker(1)
    c = h.client(hello=True)
    h.run(c, 1)
    assert h.run(c, 2, timeout_ms=1000) == [("WAKE", 1.0)]
    assert h.tick(0.5) == [("WAKE", 1.0)]  # nothing fires early
    assert h.tick(1.0) == [("RESULT", c, 2, ResultCode.TIMEOUT)]
    assert results(h.last)[0].error == "timed out after 1000 ms"
    assert h.b.queue_depth == 0
    assert h.b.live_jobs == 1
    assert h.answer("job1") == [("RESULT", c, 1, OK)]


def test_timeout_of_a_running_job_holds_the_slot() -> None:
    h = H()
    w = h.worker(1)
    c = h.client(hello=True)
    h.now = 100.0
    assert h.run(c, 1, timeout_ms=2500) == [("WAKE", 102.5), ("RUN", w, "job1")]
    h.run(c, 2)
    assert h.tick(102.5) == [
        ("RESULT", c, 1, ResultCode.TIMEOUT),
        ("CANCEL", w, h.wc("job1")),
    ]
    assert h.b.slots(w) == (1, 1)
    assert h.b.queue_depth == 1
    assert h.answer("job1") == [("RUN", w, "job2")]
    assert h.b.stats.abandoned_results == 1


def test_timeout_counts_queue_time() -> None:
    h = H()
    h.worker(1)
    c = h.client(hello=True)
    h.run(c, 1)
    h.run(c, 2, timeout_ms=2000)
    h.now = 1.5
    assert h.answer("job1")[1][2] == "job2"
    assert h.tick(2.0) == [("RESULT", c, 2, ResultCode.TIMEOUT), ("CANCEL", 1, h.wc("job2"))]


def test_timeout_after_cancel_sends_no_second_cancel() -> None:
    h = H(cancel_grace_ms=10_000)
    w = h.worker(1)
    c = h.client(hello=True)
    h.run(c, 1, timeout_ms=1000)
    assert h.cancel(c, 1) == [("CANCEL", w, h.wc("job1"))]  # grace wake (10 s) is later
    assert h.tick(1.0) == [("RESULT", c, 1, ResultCode.TIMEOUT), ("WAKE", 10.0)]
    assert h.tick(10.0) == []


def test_wake_announces_the_earliest_deadline() -> None:
    h = H()
    h.worker(1)
    c = h.client(hello=True)
    h.run(c, 0)
    assert h.run(c, 1, timeout_ms=5000) == [("WAKE", 5.0)]
    assert h.run(c, 2, timeout_ms=1000) == [("WAKE", 1.0)]
    assert h.run(c, 3, timeout_ms=3000) == []  # 1.0 is still the earliest
    assert h.tick(1.0) == [("RESULT", c, 2, ResultCode.TIMEOUT), ("WAKE", 3.0)]
    assert h.tick(4.0) == [("RESULT", c, 3, ResultCode.TIMEOUT), ("WAKE", 5.0)]
    assert h.tick(6.0) == [("RESULT", c, 1, ResultCode.TIMEOUT)]
    assert h.tick(7.0) == []


def test_tick_without_deadlines_does_nothing() -> None:
    h = H()
    assert h.tick(1e9) == []


def test_completed_job_does_not_time_out() -> None:
    h = H()
    h.worker(1)
    c = h.client(hello=True)
    h.run(c, 1, timeout_ms=1000)
    assert h.answer("job1") == [("RESULT", c, 1, OK)]
    assert h.tick(2.0) == []


def test_legacy_client_gets_timeout_as_exception() -> None:
    h = H()
    c = h.client()
    h.worker(1)
    h.run(c, 1, timeout_ms=1000)
    h.tick(1.0)
    assert results(h.last) == [
        Result(ck(1), ResultCode.EXCEPTION, "TIMEOUT: timed out after 1000 ms")
    ]


def test_huge_timeout_from_a_json_client_does_not_crash() -> None:
    # JSON integers are unbounded; now + timeout_ms / 1000.0 must not overflow.
    body = json.dumps(
        {"packet_type": "RUN", "cookie": cookie_str(ck(1)), "pipeline": "p", "timeout_ms": 0}
    ).replace('"timeout_ms": 0', '"timeout_ms": 1' + "0" * 400)
    data = body.encode()
    packets = PacketDecoder(1 << 20).feed(len(data).to_bytes(4, "big") + data)
    assert len(packets) == 1
    h = H()
    h.worker(1)
    c = h.client(codec=Codec.JSON, hello=True)
    assert h.feed(c, packets[0]) == [("RESULT", c, 1, ResultCode.BAD_PACKET)]
    assert h.b.live_jobs == 0


# ---------------------------------------------------------------------------
# legacy workers are never sent a RESULT


@pytest.mark.parametrize(
    "packet",
    [
        BadPacket("RESULT", ck(9), "rc 'X' is not a result code"),
        BadPacket("RESULT", None, "cookie is a NoneType"),
        BadPacket("REGISTER", None, "capacity must be an integer >= 1"),
        Unsupported("FROB", ck(1)),
        Unsupported("FROB"),
        Shutdown(),
        Hello(Role.WORKER),
    ],
    ids=repr,
)
def test_legacy_worker_is_never_sent_a_result(packet: Packet) -> None:
    h = H()
    w = h.worker(1)
    out = h.b.receive(w, packet, 0.0)
    assert sends_to(out, w) == []
    assert not any(isinstance(a, Close) for a in out)
    hw = h.worker(1, hello=True)
    answer = sends_to(h.b.receive(hw, packet, 0.0), hw)
    assert len(answer) == 1
    assert isinstance(answer[0], Result)


# ---------------------------------------------------------------------------
# STARTED / PROGRESS


def test_started_and_progress_reach_hello_clients_that_asked() -> None:
    h = H()
    w = h.worker(3)
    both = h.client(hello=True, features=("started", "progress"))
    started_only = h.client(hello=True, features=("started",))
    legacy = h.client()
    h.run(both, 1, variables="a")
    h.run(started_only, 2, variables="b")
    h.run(legacy, 3, variables="c")
    assert h.feed(w, Started(h.wc("a"))) == [("STARTED", both, 1)]
    assert h.feed(w, Progress(h.wc("a"), {"pct": 50})) == [("PROGRESS", both, 1, {"pct": 50})]
    assert h.feed(w, Started(h.wc("b"))) == [("STARTED", started_only, 2)]
    assert h.feed(w, Progress(h.wc("b"), 1)) == []
    assert h.feed(w, Started(h.wc("c"))) == []
    assert h.feed(w, Progress(h.wc("c"), 1)) == []


def test_progress_for_unknown_or_ended_jobs_is_dropped() -> None:
    h = H()
    w = h.worker(2)
    c = h.client(hello=True, features=("started", "progress"))
    assert h.feed(w, Started(ck(5))) == []
    h.run(c, 1, timeout_ms=1000)
    h.tick(1.0)
    assert h.feed(w, Progress(h.wc("job1"), "late")) == []
    assert h.feed(w, Started(h.wc("job1"))) == []


def test_progress_not_carried_to_a_json_client() -> None:
    h = H()
    w = h.worker(1)
    c = h.client(hello=True, features=("progress",), codec=Codec.JSON)
    h.run(c, 1)
    assert h.feed(w, Progress(h.wc("job1"), b"bytes")) == []
    assert h.feed(w, Progress(h.wc("job1"), "text")) == [("PROGRESS", c, 1, "text")]


def test_progress_from_another_worker_is_dropped() -> None:
    h = H()
    h.worker(1)
    w2 = h.worker(1)
    c = h.client(hello=True, features=("started", "progress"))
    h.run(c, 1)
    assert h.feed(w2, Started(h.wc("job1"))) == []


def test_progress_for_a_detached_job_is_dropped() -> None:
    h = H()
    w = h.worker(1)
    c = h.client(hello=True, features=("started", "progress"))
    h.run(c, 1, detach=True)
    assert h.feed(w, Started(h.wc("job1"))) == []


# ---------------------------------------------------------------------------
# drain and finish


def test_begin_drain() -> None:
    h = H()
    w = h.worker(1)
    c = h.client(hello=True)
    h.run(c, 1)
    h.run(c, 2)
    h.run(c, 3, detach=True)
    assert rows(h.b.begin_drain()) == [("RESULT", c, 2, ResultCode.BROKER_WENT_AWAY)]
    assert h.b.draining
    assert h.b.queue_depth == 0
    assert h.run(c, 4) == [("RESULT", c, 4, ResultCode.BROKER_WENT_AWAY)]
    assert h.answer("job1") == [("RESULT", c, 1, OK)]  # running jobs complete normally
    assert h.b.slots(w) == (1, 0)
    assert h.b.live_jobs == 0


def test_worker_gone_during_drain_is_broker_went_away() -> None:
    h = H()
    w = h.worker(1)
    h.worker(1)
    c = h.client()
    h.run(c, 1, max_attempts=3)
    h.b.begin_drain()
    assert h.gone(w) == [("RESULT", c, 1, ResultCode.BROKER_WENT_AWAY)]


def test_finish() -> None:
    h = H()
    w1 = h.worker(1)
    w2 = h.worker(1, hello=True)
    c = h.client(hello=True)
    legacy = h.client()
    h.run(c, 1)
    h.run(legacy, 2)
    h.run(c, 3)  # queued
    out = rows(h.b.finish())
    assert out == [
        ("RESULT", c, 3, ResultCode.BROKER_WENT_AWAY),
        ("RESULT", c, 1, ResultCode.BROKER_WENT_AWAY),
        ("RESULT", legacy, 2, ResultCode.BROKER_WENT_AWAY),
        ("CLOSE", w1),
        ("CLOSE", w2),
        ("CLOSE", c),
        ("CLOSE", legacy),
    ]
    assert h.b.live_jobs == 0
    assert h.b.slots(w1) == (1, 0)
    assert h.answer("job1") == []  # a late answer after finish goes nowhere


def test_finish_after_drain_does_not_answer_twice() -> None:
    h = H()
    h.worker(1)
    c = h.client()
    h.run(c, 1)
    h.run(c, 2)
    first = rows(h.b.begin_drain())
    second = rows(h.b.finish())
    assert first == [("RESULT", c, 2, ResultCode.BROKER_WENT_AWAY)]
    assert second[0] == ("RESULT", c, 1, ResultCode.BROKER_WENT_AWAY)
    assert [r for r in second if r[0] == "RESULT"] == [second[0]]


def test_finish_skips_jobs_already_answered() -> None:
    h = H()
    h.worker(1)
    c = h.client()
    h.run(c, 1, timeout_ms=1000)
    h.tick(1.0)
    assert [r for r in rows(h.b.finish()) if r[0] == "RESULT"] == []
    assert h.b.live_jobs == 0


# ---------------------------------------------------------------------------
# bad input


def test_malformed_result_ends_the_job_with_bad_packet() -> None:
    h = H()
    w = h.worker(1)
    c = h.client(hello=True)
    h.run(c, 1)
    h.run(c, 2)
    bad = BadPacket("RESULT", h.wc("job1"), "rc 'NOPE' is not a result code")
    assert h.feed(w, bad) == [("RESULT", c, 1, ResultCode.BAD_PACKET), ("RUN", w, "job2")]
    assert results(h.last)[0].error == (
        "the worker sent a malformed RESULT: rc 'NOPE' is not a result code"
    )
    assert h.b.slots(w) == (1, 1)
    assert h.answer("job1") == []  # the job is over


def test_malformed_result_from_a_hello_worker_is_also_answered_to_it() -> None:
    h = H()
    w = h.worker(1, hello=True)
    c = h.client()
    h.run(c, 1)
    bad = BadPacket("RESULT", h.wc("job1"), "stacktrace is not a list of strings")
    assert h.feed(w, bad) == [
        ("RESULT", c, 1, ResultCode.BAD_PACKET),
        ("RESULT", w, h.wc("job1"), ResultCode.BAD_PACKET),
    ]


def test_malformed_non_result_does_not_end_the_job() -> None:
    h = H()
    w = h.worker(1)
    c = h.client()
    h.run(c, 1)
    assert h.feed(w, BadPacket("PROGRESS", h.wc("job1"), "x")) == []
    assert h.b.slots(w) == (1, 1)
    assert h.answer("job1") == [("RESULT", c, 1, OK)]


def test_bad_packet_from_a_client() -> None:
    h = H()
    hc = h.client(hello=True)
    assert h.feed(hc, BadPacket("RUN", ck(1), "pipeline is missing or empty")) == [
        ("RESULT", hc, 1, ResultCode.BAD_PACKET)
    ]
    assert h.feed(hc, BadPacket("", None, "packet_type is missing")) == [
        ("RESULT", hc, None, ResultCode.BAD_PACKET)
    ]
    lc = h.client()
    assert h.feed(lc, BadPacket("RUN", ck(1), "why")) == [("RESULT", lc, 1, ResultCode.BAD_PACKET)]
    # a legacy client hangs on a cookie-less RESULT: it is closed instead
    assert h.feed(lc, BadPacket("RUN", None, "why")) == [("CLOSE", lc)]
    assert h.b.stats.bad_packets == 4


@pytest.mark.parametrize(
    ("packet", "cookie"),
    [(Unsupported("FROB", ck(3)), 3), (Unsupported("FROB"), None), (Shutdown(), None)],
    ids=repr,
)
def test_unsupported_packet_type(packet: Packet, cookie: int | None) -> None:
    h = H()
    c = h.client(hello=True)
    assert h.feed(c, packet) == [("RESULT", c, cookie, ResultCode.UNSUPPORTED_PACKET_TYPE)]
    assert h.b.role_of(c) is Role.CLIENT
    assert h.cancel(c, 1) == [("RESULT", c, 1, ResultCode.COOKIE_NOT_FOUND)]  # still open


def test_unsupported_as_first_packet_makes_a_client() -> None:
    h = H()
    c = h.connect()
    assert h.feed(c, Unsupported("FROB", ck(2))) == [
        ("RESULT", c, 2, ResultCode.UNSUPPORTED_PACKET_TYPE)
    ]
    assert h.b.role_of(c) is Role.CLIENT


def test_malformed_first_register_makes_a_worker() -> None:
    # "I am a worker" even when the capacity is wrong: on a workers-only listener it
    # is not refused, and a legacy worker is sent no RESULT.
    h = H()
    w = h.connect(WORKERS)
    out = h.b.receive(w, BadPacket("REGISTER", None, "capacity must be an integer >= 1"), 0.0)
    assert [a for a in out if not isinstance(a, Log)] == []
    assert h.b.role_of(w) is Role.WORKER
    assert h.b.workers() == []
    assert h.feed(w, Register(2)) == []
    assert h.b.slots(w) == (2, 0)


def test_nothing_is_acted_on_after_a_role_refusal() -> None:
    # Packets decoded from the same read as the refused one must not be served.
    h = H()
    w = h.worker(1)
    c = h.connect(WORKERS)
    h.run(c, 1)
    assert ("CLOSE", c) in rows(h.last)
    assert h.run(c, 2) == []
    assert h.cancel(c, 2) == []
    assert h.b.slots(w) == (1, 0)
    assert h.b.live_jobs == 0


def test_nothing_is_acted_on_after_a_close_for_a_bad_packet() -> None:
    h = H()
    w = h.worker(1)
    c = h.client()
    assert h.feed(c, BadPacket("RUN", None, "why")) == [("CLOSE", c)]
    assert h.run(c, 1) == []
    assert h.b.slots(w) == (1, 0)
    lw = h.worker(1)
    assert h.feed(lw, Run(ck(1), "p")) == [("CLOSE", lw)]
    assert h.feed(lw, Register(5)) == []
    assert lw not in h.b.workers()  # gone from dispatch at once


def test_a_closed_worker_gets_no_new_jobs() -> None:
    h = H()
    w1 = h.worker(1)
    w2 = h.worker(1)
    c = h.client()
    assert h.feed(w1, Run(ck(9), "p")) == [("CLOSE", w1)]
    assert h.run(c, 1) == [("RUN", w2, "job1")]
    assert h.gone(w1) == []
    assert h.answer("job1") == [("RESULT", c, 1, OK)]


def test_nothing_is_sent_to_a_connection_after_its_close() -> None:
    h = H()
    w = h.worker(2)
    c = h.client()
    h.run(c, 1)
    h.run(c, 2, timeout_ms=1000)
    assert ("CLOSE", c) in h.feed(c, BadPacket("RUN", None, "why"))
    out = h.answer("job1") + h.tick(1.0)
    assert [r for r in out if r[1] == c] == []
    assert h.b.slots(w)[0] == 2


# ---------------------------------------------------------------------------
# codecs


def test_json_worker_cannot_get_non_string_variables() -> None:
    h = H()
    w = h.worker(1, codec=Codec.JSON)
    c = h.client()
    assert h.run(c, 1, variables={"a": 1}) == [("RESULT", c, 1, ResultCode.BAD_PACKET)]
    assert h.run(c, 2, variables=b"bytes") == [("RESULT", c, 2, ResultCode.BAD_PACKET)]
    assert h.b.slots(w) == (1, 0)
    assert h.b.live_jobs == 0
    assert h.run(c, 3, variables="text") == [("RUN", w, "text")]


def test_json_worker_fails_a_queued_job_it_cannot_carry() -> None:
    h = H()
    w = h.worker(1, codec=Codec.JSON)
    c = h.client()
    h.run(c, 1)
    h.feed(c, Run(ck(2), "p", [1, 2]))
    h.run(c, 3)
    assert h.b.queue_depth == 2
    assert h.answer("job1") == [
        ("RESULT", c, 1, OK),
        ("RESULT", c, 2, ResultCode.BAD_PACKET),
        ("RUN", w, "job3"),
    ]


def test_msgpack_result_bytes_to_a_json_client_is_bad_packet() -> None:
    h = H()
    h.worker(2)
    jc = h.client(codec=Codec.JSON)
    mc = h.client()
    h.run(jc, 1)
    h.run(mc, 2)
    assert h.answer("job1", result=b"\x00bytes") == [("RESULT", jc, 1, ResultCode.BAD_PACKET)]
    assert results(h.last)[0].result is None
    assert h.answer("job2", result=b"\x00bytes") == [("RESULT", mc, 2, OK)]
    assert results(h.last)[0].result == b"\x00bytes"


def test_json_client_gets_string_results() -> None:
    h = H()
    h.worker(1)
    jc = h.client(codec=Codec.JSON)
    h.run(jc, 1)
    assert h.answer("job1", result="fine") == [("RESULT", jc, 1, OK)]
    assert results(h.last)[0].result == "fine"


# ---------------------------------------------------------------------------
# bookkeeping


def test_stats_and_counts() -> None:
    h = H()
    w = h.worker(1)
    c = h.client()
    h.run(c, 1)
    h.run(c, 2)
    assert (h.b.running, h.b.queue_depth, h.b.live_jobs) == (1, 1, 2)
    h.answer("job1")
    h.answer("job2")
    assert (h.b.running, h.b.queue_depth, h.b.live_jobs) == (0, 0, 0)
    assert h.b.stats.accepted == 2
    assert h.b.stats.dispatched == 2
    assert h.b.stats.completed["OK"] == 2
    assert h.b.slots(w) == (1, 0)


def test_many_cancelled_queued_jobs_compact_the_queue() -> None:
    h = H()
    w = h.worker(1)
    c = h.client(hello=True)
    h.run(c, 0)
    for n in range(1, 3001):
        h.run(c, n)
    for n in range(1, 3000):
        assert h.cancel(c, n) == [("RESULT", c, n, ResultCode.CANCELLED)]
    assert h.b.queue_depth == 1
    assert h.answer("job0") == [("RESULT", c, 0, OK), ("RUN", w, "job3000")]
    assert h.b.queue_depth == 0


# ---------------------------------------------------------------------------
# the dashboard's counts (issue 16): per worker, per pipeline, recent failures


def test_endings_are_counted_per_worker_and_per_pipeline() -> None:
    h = H()
    w = h.worker(capacity=4)
    c = h.client()
    for n in range(3):
        h.run(c, n, pipeline="a")
    h.run(c, 3, pipeline="b")
    h.answer("job0")
    h.answer("job1")
    h.answer("job2", ResultCode.PROCESSOR_EXCEPTION, error="boom")
    h.cancel(c, 3)  # running: the worker answers CANCELLED
    h.answer("job3", ResultCode.CANCELLED)
    conn = next(x for x in h.b.connections() if x.id == w)
    assert (conn.done, conn.failed) == (2, 2)
    ends = {k: (e.done, e.failed) for k, e in h.b.pipeline_ends.items()}
    assert ends == {"a": (2, 1), "b": (0, 1)}
    assert [(f.pipeline, f.result.rc, f.result.error) for f in h.b.failures] == [
        ("a", ResultCode.PROCESSOR_EXCEPTION, "boom"),
        ("b", ResultCode.CANCELLED, None),
    ]


def test_a_queued_job_ended_by_its_client_leaving_counts_as_failed() -> None:
    h = H()
    c = h.client()
    h.worker(capacity=1)
    h.run(c, 1)
    h.run(c, 2)  # queued behind job1
    h.gone(c)
    ends = h.b.pipeline_ends["p"]
    assert (ends.done, ends.failed) == (0, 2)  # both cancelled: the client went away


def test_failures_are_bounded_and_their_texts_clipped() -> None:
    from reasonbroker.core.board import FAILURE_TEXT_CHARS, FAILURE_TRACE_LINES, FAILURES_KEPT

    h = H()
    h.worker(capacity=1)
    c = h.client()
    for n in range(FAILURES_KEPT + 5):
        h.run(c, n)
        worker, wcookie = h.jobs[f"job{n}"]
        trace = tuple(f"line {i} " + "x" * 10_000 for i in range(200))
        h.feed(worker, Result(wcookie, ResultCode.PROCESSOR_EXCEPTION, "e" * 100_000, trace))
    kept = list(h.b.failures)
    assert len(kept) == FAILURES_KEPT
    assert kept[-1].result.cookie == ck(FAILURES_KEPT + 4)  # newest last
    last = kept[-1].result
    assert last.error is not None and len(last.error) <= FAILURE_TEXT_CHARS + 3
    assert last.stacktrace is not None and len(last.stacktrace) == FAILURE_TRACE_LINES
    assert last.stacktrace[-1].startswith("line 199")
    assert all(len(line) <= FAILURE_TEXT_CHARS for line in last.stacktrace)


def test_pipeline_names_past_the_cap_are_counted_together() -> None:
    from reasonbroker.core.board import PIPELINES_COUNTED

    h = H()
    h.worker(capacity=1)
    c = h.client()
    names = [f"p{i}" for i in range(PIPELINES_COUNTED + 2)] + ["p0"]
    for n, name in enumerate(names):
        h.run(c, n, pipeline=name)
        h.answer(f"job{n}")
    ends = h.b.pipeline_ends
    assert len(ends) == PIPELINES_COUNTED + 1  # the names, and None for the rest
    assert ends["p0"].done == 2
    assert ends[None].done == 2
    assert f"p{PIPELINES_COUNTED}" not in ends
