"""The switchboard's durable-jobs rules (PROTOCOL.md section 7, docs/durability.md), pure.

Events in, actions out: journal actions, ACCEPTED, ATTACH and JOB, waiting
for workers, the drain that keeps the queue, and `restore`.
"""

from __future__ import annotations

from reasonbroker.core.actions import (
    J_ACCEPT,
    J_DISPATCH,
    J_END,
    J_FORGET,
    J_REQUEUE,
    Action,
    Close,
    Journal,
    Send,
)
from reasonbroker.core.board import Restored, restored_run
from reasonbroker.core.packets import (
    Attach,
    Cancel,
    Job,
    JobState,
    Raw,
    Result,
    ResultCode,
    Return,
    Run,
)
from reasonbroker.core.retention import Ended
from tests.test_switchboard import OK, H, ck, results, sends_to

ACCEPTS = ("accepted", "attach", "started", "progress")


def journal(out: list[Action]) -> list[tuple[int, int | bytes]]:
    """(op, client cookie number) for each Journal action."""
    rows: list[tuple[int, int | bytes]] = []
    for a in out:
        if isinstance(a, Journal):
            c = a.cookie
            rows.append((a.op, int.from_bytes(c[8:], "big") if c.startswith(b"\xcc" * 8) else c))
    return rows


def test_accept_dispatch_end_are_journaled_in_order_and_accepted_comes_after_accept() -> None:
    h = H(durable=True)
    w = h.worker()
    c = h.client(hello=True, features=ACCEPTS)
    assert h.run(c, 1) == [("ACCEPTED", c), ("RUN", w, "job1")]
    assert journal(h.last) == [(J_ACCEPT, 1), (J_DISPATCH, 1)]
    kinds = [type(a).__name__ for a in h.last if not type(a).__name__ == "Log"]
    assert kinds.index("Journal") < kinds.index("Send")  # the row before its ACCEPTED
    assert h.answer("job1", result="r") == [("RESULT", c, 1, OK)]
    assert journal(h.last) == [(J_END, 1)]
    end = next(a for a in h.last if isinstance(a, Journal))
    assert end.result == Result(ck(1), OK, None, None, "r")
    # The end is journaled before the RESULT goes out (the broker holds the
    # RESULT until that commit).
    assert isinstance(h.last[0], Journal)


def test_without_the_feature_no_accepted_and_without_journal_no_journal_actions() -> None:
    h = H()
    w = h.worker()
    c = h.client(hello=True)
    assert h.run(c, 1) == [("RUN", w, "job1")]
    assert journal(h.last) == []
    c2 = h.client(hello=True, features=("accepted",))
    assert h.run(c2, 2) == [("ACCEPTED", c2)]  # queued: the worker is busy
    assert journal(h.last) == []


def test_with_feature_ack_only_the_runs_that_ask_get_accepted() -> None:
    # docs/protocol.md, feature `ack`: the SDK's run() (no `ack`) waits for its
    # RESULT alone; submit() (`ack`) for its ACCEPTED. With or without a journal.
    for durable in (False, True):
        h = H(durable=durable)
        w = h.worker(capacity=4)
        c = h.client(hello=True, features=(*ACCEPTS, "ack"))
        assert h.run(c, 1) == [("RUN", w, "job1")]
        assert h.run(c, 2, ack=True) == [("ACCEPTED", c), ("RUN", w, "job2")]
        assert h.answer("job1", result="r") == [("RESULT", c, 1, OK)]
        # Without `ack` among its features a connection gets every ACCEPTED, as before.
        old = h.client(hello=True, features=ACCEPTS)
        assert h.run(old, 3) == [("ACCEPTED", old), ("RUN", w, "job3")]
        assert h.run(old, 4, ack=True) == [("ACCEPTED", old), ("RUN", w, "job4")]
        # `ack` alone asks for nothing: ACCEPTED needs feature `accepted`.
        bare = h.client(hello=True, features=("ack",))
        assert h.run(bare, 5, ack=True) == [("RUN", w, "job5")]


def test_a_durable_board_lets_jobs_wait_for_a_worker_of_their_pipeline() -> None:
    h = H(durable=True)
    c = h.client(hello=True, features=ACCEPTS)
    assert h.run(c, 1, pipeline="later") == [("ACCEPTED", c)]
    assert h.b.queue_depth == 1
    w = h.worker(pipelines=("later",))
    assert h.last and h.jobs["job1"][0] == w
    # A non-durable board refuses the same RUN at once (section 5).
    plain = H()
    pc = plain.client()
    assert plain.run(pc, 1, pipeline="later") == [("RESULT", pc, 1, ResultCode.NO_CAPACITY)]


def test_worker_gone_requeues_even_when_no_worker_serves_the_pipeline_any_more() -> None:
    h = H(durable=True)
    w = h.worker(pipelines=("p",))
    c = h.client()
    h.run(c, 1, max_attempts=2)
    assert h.gone(w) == []
    assert journal(h.last) == [(J_REQUEUE, 1)]
    assert h.b.queue_depth == 1


def test_attach_to_a_live_job_gets_the_result_once_like_its_owner() -> None:
    h = H()
    h.worker()
    owner = h.client(hello=True, features=ACCEPTS)
    other = h.client(hello=True, features=ACCEPTS)
    h.run(owner, 1)
    assert h.feed(other, Attach(ck(1))) == []
    assert h.feed(other, Attach(ck(1))) == []  # twice is still one RESULT
    assert h.feed(owner, Attach(ck(1))) == []  # the owner is a client already
    assert sorted(h.answer("job1")) == sorted([("RESULT", owner, 1, OK), ("RESULT", other, 1, OK)])
    assert h.b.stats.attached == 1


def test_attach_wait_false_answers_job_state() -> None:
    h = H()
    w = h.worker()
    c = h.client(hello=True, features=ACCEPTS)
    h.run(c, 1)
    h.run(c, 2)  # queued
    assert h.feed(c, Attach(ck(1), wait=False)) == [("JOB", c)]
    assert h.last[-1] == Send(c, Job(ck(1), JobState.RUNNING, "p", 1))
    h.feed(c, Attach(ck(2), wait=False))
    assert h.last[-1] == Send(c, Job(ck(2), JobState.QUEUED, "p", 0))
    assert w


def test_ended_detached_job_is_collected_by_attach_and_expires() -> None:
    h = H(result_ttl_s=10.0)
    h.worker()
    c = h.client(hello=True, features=ACCEPTS)
    h.run(c, 1, detach=True)
    assert h.answer("job1", result="kept") == []
    late = h.client(hello=True, features=ACCEPTS)
    assert h.feed(late, Attach(ck(1))) == [("RESULT", late, 1, OK)]
    assert results(h.last) == [Result(ck(1), OK, None, None, "kept")]
    assert h.feed(late, Attach(ck(1), wait=False)) == [("JOB", late)]
    assert h.last[-1] == Send(late, Job(ck(1), JobState.ENDED, "p", 1, OK, None))
    h.now = 11.0
    assert h.feed(late, Attach(ck(1))) == [("RESULT", late, 1, ResultCode.COOKIE_NOT_FOUND)]
    h.tick(11.0)
    assert len(h.b.retained) == 0
    assert h.run(c, 1, detach=True)  # the cookie is free again once expired


def test_attach_unknown_cookie_is_not_found() -> None:
    h = H()
    c = h.client(hello=True, features=ACCEPTS)
    assert h.feed(c, Attach(ck(9))) == [("RESULT", c, 9, ResultCode.COOKIE_NOT_FOUND)]


def test_retention_is_bounded_by_count_and_evictions_are_forgotten_in_the_journal() -> None:
    h = H(durable=True, result_max=2)
    h.worker(capacity=4)
    c = h.client()
    for n in (1, 2, 3):
        h.run(c, n)
        h.answer(f"job{n}")
    assert len(h.b.retained) == 2
    assert (J_FORGET, 1) in journal(h.last)
    assert 1 not in [int.from_bytes(k[8:], "big") for k in h.b.retained.entries]


def test_an_attacher_leaving_never_cancels_and_the_owner_leaving_keeps_an_attached_job() -> None:
    h = H()
    w = h.worker()
    owner = h.client(hello=True, features=ACCEPTS)
    other = h.client(hello=True, features=ACCEPTS)
    h.run(owner, 1)
    h.feed(other, Attach(ck(1)))
    assert h.gone(owner) == []  # the job runs on for its other client
    assert h.answer("job1") == [("RESULT", other, 1, OK)]
    h.run(other, 2)
    third = h.client(hello=True, features=ACCEPTS)
    h.feed(third, Attach(ck(2)))
    assert h.gone(third) == []
    assert h.answer("job2") == [("RESULT", other, 2, OK)]
    assert w


def test_any_of_a_jobs_clients_may_cancel_it() -> None:
    h = H()
    h.worker()
    owner = h.client(hello=True, features=ACCEPTS)
    other = h.client(hello=True, features=ACCEPTS)
    h.run(owner, 1)
    h.run(owner, 2)  # queued
    h.feed(other, Attach(ck(2)))
    out = h.feed(other, Cancel(ck(2)))
    assert sorted(out) == sorted(
        [("RESULT", owner, 2, ResultCode.CANCELLED), ("RESULT", other, 2, ResultCode.CANCELLED)]
    )


def test_client_gone_ends_its_jobs_in_the_journal() -> None:
    h = H(durable=True)
    h.worker()
    c = h.client()
    h.run(c, 1)
    h.run(c, 2)  # queued
    h.gone(c)
    assert sorted(journal(h.last)) == [(J_END, 1), (J_END, 2)]
    assert h.b.jobs == {}


def test_durable_drain_keeps_the_queue_and_requeues_the_running_with_the_attempt_back() -> None:
    h = H(durable=True)
    w = h.worker()
    c = h.client(hello=True, features=ACCEPTS)
    h.run(c, 1)
    h.run(c, 2)  # queued
    assert h.b.begin_drain(1.0) == []  # nothing answered BROKER_WENT_AWAY
    assert h.run(c, 3) == [("RESULT", c, 3, ResultCode.BROKER_WENT_AWAY)]
    out = h.b.finish(2.0)
    assert journal(out) == [(J_REQUEUE, 1)]
    requeue = next(a for a in out if isinstance(a, Journal))
    assert requeue.attempts == 0
    assert not results(out)
    assert {a.conn for a in out if isinstance(a, Close)} == {w, c}


def _restored(n: int, **kw: object) -> Restored:
    fields: dict[str, object] = {
        "max_attempts": 1,
        "attempts": 0,
        "crashes": 0,
        "was_running": False,
        "deadline": None,
    }
    fields.update(kw)
    return Restored(
        restored_run(ck(n), "p", b"\xa1x", False, 0, None),
        n,
        int(fields["max_attempts"]),  # type: ignore[call-overload]
        int(fields["attempts"]),  # type: ignore[call-overload]
        int(fields["crashes"]),  # type: ignore[call-overload]
        bool(fields["was_running"]),
        fields["deadline"],  # type: ignore[arg-type]
    )


def test_restore_queues_ends_and_retains() -> None:
    h = H(durable=True, max_attempts_limit=3)
    kept = Ended(Result(ck(9), OK, None, None, Raw(b"\xa2ok")), "p", 1, 0.0, 0.5)
    out = h.b.restore(
        [
            _restored(1),
            _restored(2, was_running=True, crashes=1),
            _restored(3, was_running=True, crashes=4),  # > max_attempts_limit
            _restored(4, deadline=0.5),  # passed while the broker was down
            _restored(5, deadline=99.0),
        ],
        [kept],
        1.0,
    )
    assert sorted(journal(out)) == [(J_END, 3), (J_END, 4)]
    ends = {int.from_bytes(a.cookie[8:], "big"): a.result for a in out if isinstance(a, Journal)}
    assert ends[3] is not None and ends[3].rc is ResultCode.BROKER_WENT_AWAY
    assert ends[4] is not None and ends[4].rc is ResultCode.TIMEOUT
    assert h.b.queue_depth == 3
    assert h.b.stats.recovered == 5
    assert h.b.stats.reruns == 2
    c = h.client(hello=True, features=ACCEPTS)
    assert h.feed(c, Attach(ck(9))) == [("RESULT", c, 9, OK)]
    # A recovered cookie is taken.
    assert h.run(c, 1) == [("RESULT", c, 1, ResultCode.COOKIE_COLLISION)]
    # A worker gets the recovered jobs in order, their payload the journal's bytes.
    w = h.worker(capacity=3)
    runs = [a.packet for a in h.last if isinstance(a, Send) and isinstance(a.packet, Run)]
    assert [r.variables for r in runs] == [Raw(b"\xa1x")] * 3
    # The attacher of a recovered job gets its RESULT; no one else is owed one.
    h.feed(c, Attach(ck(1)))
    wcookie = runs[0].cookie
    out = h.b.receive(w, Result(wcookie, OK, None, None, "done"), h.now)
    assert results(out) == [Result(ck(1), OK, None, None, "done")]
    assert [a.conn for a in out if isinstance(a, Send)] == [c]


def test_journal_trouble_refuses_new_runs_with_the_reason_and_keeps_the_rest() -> None:
    h = H(durable=True)
    w = h.worker()
    c = h.client()
    h.run(c, 1)
    h.b.set_journal_trouble("database or disk is full")
    assert h.run(c, 2) == [("RESULT", c, 2, ResultCode.NO_CAPACITY)]
    assert "disk is full" in (results(h.last)[0].error or "")
    assert h.answer("job1") == [("RESULT", c, 1, OK)]
    h.b.set_journal_trouble(None)
    assert h.run(c, 3) == [("RUN", w, "job3")]


def test_the_sender_of_a_detached_run_may_attach_to_it_on_the_same_connection() -> None:
    h = H()
    h.worker()
    c = h.client(hello=True, features=ACCEPTS)
    h.run(c, 1, detach=True)
    assert h.feed(c, Attach(ck(1))) == []
    assert h.answer("job1") == [("RESULT", c, 1, OK)]
    assert h.feed(c, Attach(ck(1))) == [("RESULT", c, 1, OK)]  # retained: collected again


def test_a_returned_run_is_requeued_in_the_journal_and_waits_for_a_worker() -> None:
    h = H(durable=True)
    w = h.worker(hello=True)
    c = h.client()
    h.run(c, 1)
    out = h.b.receive(w, Return(h.wc("job1")), h.now)
    assert journal(out) == [(J_REQUEUE, 1)]
    requeue = next(a for a in out if isinstance(a, Journal))
    assert requeue.attempts == 0  # it never ran
    assert h.b.queue_depth == 1  # no other worker: it waits (a journal keeps it)
    w2 = h.worker()
    assert h.jobs["job1"][0] == w2


def test_an_adopted_job_is_dispatched_attachable_and_never_journaled_as_accepted() -> None:
    """A cluster node takes on another node's job for an ATTACH (`adopt`): queued as a job
    of no client and dispatched at once; a retained RESULT adopted is collected by ATTACH;
    a cookie the board already knows is left alone."""
    h = H(durable=True)
    w = h.worker()
    c = h.client(hello=True, features=ACCEPTS)
    h.b.end_batch()
    out = h._track(h.b.adopt(Run(ck(1), "p", "job1"), None, 0))
    assert [r[0] for r in out] == ["RUN"] and out[0][1] == w
    assert journal(h.last) == [(J_DISPATCH, 1)]  # its accept is another board's
    assert h.b.knows(ck(1))
    assert h.b.adopt(restored_run(ck(1), "p", None, False, 0, None), None, 0) == []
    assert h.feed(c, Attach(ck(1), True)) == []  # now one of its clients
    assert h.answer("job1", result="r") == [("RESULT", c, 1, OK)]
    ended = Ended(Result(ck(2), OK, None, None, "kept"), "p", 1, 0.0, 0.0)
    assert h.b.adopt(restored_run(ck(2), "p", None, False, 0, None), ended, 0) == []
    h.feed(c, Attach(ck(2), True))
    assert sends_to(h.last, c) == [Result(ck(2), OK, None, None, "kept")]
